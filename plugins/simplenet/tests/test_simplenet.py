"""SimpleNet head: learns a toy shift, is deterministic, saves and loads, refuses bad input."""

from __future__ import annotations

import json

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
    # noise 0.25 x the feature std (0.43 here): about 0.1 per element
    detector = SimpleNet(**{"epochs": 15, "noise_fraction": 0.25, "hidden": 64, "discriminator_lr": 2e-3, "adaptor_lr": 1e-3, **options})
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
    with pytest.raises(VadError, match="noise_fraction"):
        SimpleNet(noise_fraction=0)
    with pytest.raises(VadError, match="noise_scale"):
        SimpleNet(noise_scale="wrn50")
    with pytest.raises(VadError, match="do not vary"):  # relative noise of constant features would be 0
        SimpleNet(epochs=1).fit([torch.ones(2, CHANNELS, 3, 3)])
    SimpleNet(epochs=1, noise_scale="absolute").fit([torch.ones(2, CHANNELS, 3, 3)])
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
    with pytest.raises(VadError, match="different shapes"):  # a failed refit leaves the fitted head as it was
        detector.fit([torch.zeros(1, 16, 2, 2), torch.zeros(1, 5, 2, 2)])
    with pytest.raises(VadError, match="16-channel"):  # the same, with the batches as given
        SimpleNet(batch_size=None, epochs=1).fit([torch.randn(1, 16, 2, 2), torch.randn(1, 5, 2, 2)])
    for name, value in detector.state().tensors.items():
        torch.testing.assert_close(value, weights[name])
    with pytest.raises(VadError, match=r"\[B, C, h, w\]"):
        detector.predict(torch.zeros(5, 2, 2))
    with pytest.raises(VadError, match="channels"):
        SimpleNet().load_state(State())
    with pytest.raises(VadError, match="do not fit"):
        SimpleNet(hidden=8).load_state(detector.state())


# --------------------------------------------------------------------------- the noise scale


def rms_channel_std(batch: torch.Tensor) -> float:
    """The documented feature scale, computed independently: sqrt(mean_c var_c) over patches."""
    rows = batch.double().permute(0, 2, 3, 1).reshape(-1, batch.shape[1])
    return float(((rows - rows.mean(0)) ** 2).mean(0).mean().sqrt())


def recorded_noise(monkeypatch, detector: SimpleNet, batches: list[torch.Tensor]) -> list[float]:
    """The noise std of every training step of a fit."""
    import vad_simplenet.detector as module

    seen: list[float] = []
    original = module.gaussian_fake_features

    def recording(features, noise_std, generator):
        seen.append(noise_std)
        return original(features, noise_std, generator)

    monkeypatch.setattr(module, "gaussian_fake_features", recording)
    detector.fit(batches)
    return seen


def test_relative_noise_is_the_fraction_of_the_first_batch_feature_std(monkeypatch):
    batches = normal_grids(seed=0)
    scaled = [10 * batch for batch in batches]
    detector = SimpleNet(epochs=2, hidden=16, noise_fraction=0.4)
    seen = recorded_noise(monkeypatch, detector, scaled)
    scale = rms_channel_std(scaled[0])
    assert detector.input_meta["feature_std"] == pytest.approx(scale, rel=1e-9)
    assert detector.noise_sigma == pytest.approx(0.4 * scale, rel=1e-9)
    assert len(seen) == 2 * 4 and all(value == detector.noise_sigma for value in seen)  # 32 images / 8, 2 epochs
    # the noise follows the features' scale: ten times larger features, ten times the noise
    small = SimpleNet(epochs=1, hidden=16, noise_fraction=0.4)
    small.fit(batches)
    assert detector.noise_sigma == pytest.approx(10 * small.noise_sigma, rel=1e-6)


def test_absolute_noise_is_the_official_noise_std_in_feature_units(monkeypatch):
    assert SimpleNet.Options.parse({}).noise_std == 0.015  # the official value
    detector = SimpleNet(epochs=1, hidden=16, noise_scale="absolute")
    seen = recorded_noise(monkeypatch, detector, [10 * batch for batch in normal_grids(seed=0)])
    assert detector.noise_sigma == 0.015 and set(seen) == {0.015}
    assert detector.input_meta["feature_std"] > 0  # measured and saved all the same


def test_noise_scale_is_saved_restored_and_deterministic():
    probe = normal_grids(seed=2, count=4)[0]
    detector = fitted(epochs=3)
    state = detector.state()
    assert state.meta["input"]["feature_std"] == detector.input_meta["feature_std"]
    restored = SimpleNet(**detector.hparams)
    restored.load_state(State(meta=json.loads(json.dumps(state.meta)), tensors=state.tensors))  # as saved to model.json
    assert restored.noise_sigma == detector.noise_sigma
    torch.testing.assert_close(restored.predict(probe).maps, detector.predict(probe).maps, rtol=0, atol=0)
    again = fitted(epochs=3)
    assert again.input_meta == detector.input_meta
    torch.testing.assert_close(again.predict(probe).maps, detector.predict(probe).maps, rtol=0, atol=0)


def test_batches_are_reshuffled_unless_batch_size_is_null():
    probe = normal_grids(seed=2, count=4)[0]
    shuffled, in_order = fitted(epochs=2), fitted(epochs=2, batch_size=None)
    assert not torch.allclose(shuffled.predict(probe).maps, in_order.predict(probe).maps)
    assert len(fitted(epochs=1, batch_size=16).history) == 1


def test_cosine_lr_schedules_the_discriminator_as_the_official_option():
    detector = fitted(epochs=1, cosine_lr=True)
    optimizers, schedules = detector.optimizers()
    assert len(schedules) == 1 and schedules[0].optimizer is optimizers[1]
    assert schedules[0].T_max == 1 and schedules[0].eta_min == pytest.approx(0.4 * 2e-3)
    assert fitted(epochs=1).optimizers()[1] == []
