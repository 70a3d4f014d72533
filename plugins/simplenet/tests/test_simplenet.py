"""SimpleNet head: learns a toy shift, is deterministic, saves and loads, refuses bad input."""

from __future__ import annotations

import pytest
import torch

from vad.contracts import State
from vad.errors import VadError
from vad.plugins import get_registry
from vad_simplenet.detector import SimpleNet
from vad_simplenet.network import truncated_l1_loss

CHANNELS = 16


def normal_grids(seed: int, count: int = 32, batch: int = 8) -> list[torch.Tensor]:
    """Features on a 3-d subspace of 16 channels (real features live near a low-d manifold)."""
    basis = torch.linalg.qr(torch.randn(CHANNELS, CHANNELS, generator=torch.Generator().manual_seed(99)))[0]
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(count, 6, 6, 3, generator=g)
    features = z @ basis[:, :3].T + 0.01 * torch.randn(count, 6, 6, CHANNELS, generator=g)
    return list(features.permute(0, 3, 1, 2).contiguous().split(batch))


def off_manifold_direction() -> torch.Tensor:
    basis = torch.linalg.qr(torch.randn(CHANNELS, CHANNELS, generator=torch.Generator().manual_seed(99)))[0]
    return basis[:, 7]


def fitted(**options) -> SimpleNet:
    detector = SimpleNet(**{"epochs": 15, "noise_std": 0.1, "hidden": 64, "discriminator_lr": 2e-3, "adaptor_lr": 1e-3, **options})
    detector.fit(normal_grids(seed=0))
    return detector


def test_registered():
    assert "simplenet" in get_registry().entries("detectors")


def test_learns_to_separate_a_shift_off_the_normal_manifold():
    detector = fitted()
    assert detector.history[-1] < detector.history[0]
    good = normal_grids(seed=1, count=8)[0]
    bad = good.clone()
    bad[:, :, 2, 3] += 0.6 * off_manifold_direction()[None, :]
    good_pred, bad_pred = detector.predict(good), detector.predict(bad)
    assert good_pred.maps.shape == (8, 6, 6)
    assert bad_pred.scores.min() > good_pred.scores.max()  # every shifted image outranks every normal one
    assert bool((bad_pred.maps.flatten(1).argmax(1) == 2 * 6 + 3).all())  # the map points at the patch
    torch.testing.assert_close(good_pred.scores, good_pred.maps.amax(dim=(1, 2)))


def test_training_is_deterministic_for_a_seed_and_depends_on_it():
    probe = normal_grids(seed=2, count=4)[0]
    first, second = fitted(epochs=3), fitted(epochs=3)
    torch.testing.assert_close(first.predict(probe).maps, second.predict(probe).maps, rtol=0, atol=0)
    assert not torch.allclose(fitted(epochs=3, seed=1).predict(probe).maps, first.predict(probe).maps)


def test_truncated_l1_loss_is_zero_beyond_the_margin():
    assert truncated_l1_loss(torch.tensor([0.6, 2.0]), torch.tensor([-0.5, -3.0]), 0.5) == 0
    torch.testing.assert_close(truncated_l1_loss(torch.tensor([0.0]), torch.tensor([0.0]), 0.5), torch.tensor(1.0))


def test_clear_errors():
    with pytest.raises(VadError, match="epochs"):
        SimpleNet(epochs=0)
    with pytest.raises(VadError, match="noise_std"):
        SimpleNet(noise_std=-1)
    with pytest.raises(VadError, match="seed"):
        SimpleNet(seed="x")
    with pytest.raises(VadError, match="before predict"):
        SimpleNet().predict(torch.zeros(1, CHANNELS, 2, 2))
    with pytest.raises(VadError, match="is not fitted"):
        SimpleNet().state()
    with pytest.raises(VadError, match="empty training set"):
        SimpleNet().fit([])
    detector = fitted(epochs=1)
    with pytest.raises(VadError, match="16-channel"):
        detector.predict(torch.zeros(1, 5, 2, 2))
    weights = {k: v.clone() for k, v in detector.state().tensors.items()}
    with pytest.raises(VadError, match="16-channel"):  # a failed refit leaves the fitted head as it was
        detector.fit([torch.zeros(1, 16, 2, 2), torch.zeros(1, 5, 2, 2)])
    for name, value in detector.state().tensors.items():
        torch.testing.assert_close(value, weights[name])
    with pytest.raises(VadError, match=r"\[B, C, h, w\]"):
        detector.predict(torch.zeros(5, 2, 2))
    with pytest.raises(VadError, match="channels"):
        SimpleNet().load_state(State())
    with pytest.raises(VadError, match="do not fit"):
        SimpleNet(hidden=8).load_state(detector.state())
