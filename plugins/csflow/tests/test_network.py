"""CS-Flow's numerical heart: the cross-scale couplings, their log-determinant, loss, scores, maps."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vad_csflow.network import (
    CrossConvolutions,
    ParallelGlowCoupling,
    ParallelPermute,
    anomaly_maps,
    cross_scale_flow,
    csflow_loss,
    image_scores,
    input_scales,
    run_cross_scale_flow,
    scale_maps,
)
from vad_flows.likelihood import log_det_by_jacobian


def scales(channels: int, side: int = 4, batch: int = 2, seed: int = 0, dtype=torch.float32) -> list[torch.Tensor]:
    """Three feature maps on grids ``side``, ``side / 2``, ``side / 4``."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, channels, side // 2**s, side // 2**s, generator=generator, dtype=dtype) for s in range(3)]


def trained_like(module: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Random weights everywhere, gammas included (at initialisation they are 0: identity blocks)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
    return module


def tiny_flow(channels: int, clamp: float = 3.0, seed: int = 1):
    return trained_like(cross_scale_flow(channels, (4, 4), blocks=2, clamp=clamp, hidden_channels=6), seed).double()


@pytest.mark.parametrize(("channels", "clamp"), [(4, 3.0), (5, 3.0), (5, 0.0)])
def test_log_det_matches_the_brute_force_jacobian(channels, clamp):
    flow = tiny_flow(channels, clamp)
    x = scales(channels, dtype=torch.float64)
    sizes = [xi[0].numel() for xi in x]
    shapes = [tuple(xi.shape[1:]) for xi in x]
    z, log_jac_det = flow(x)
    assert log_jac_det.shape == (2,)

    for b in range(2):
        sample = torch.cat([xi[b].flatten() for xi in x])

        def function(flat: torch.Tensor) -> torch.Tensor:
            parts = [part.view(1, *shape) for part, shape in zip(flat.split(sizes), shapes)]
            return torch.cat([zi.flatten() for zi in flow(parts)[0]])

        expected = log_det_by_jacobian(function, sample)
        assert log_jac_det[b].item() == pytest.approx(expected.item(), abs=1e-8)
    assert log_jac_det.abs().min() > 0.01  # not the identity


def test_the_inverse_restores_the_input_and_negates_the_log_det():
    flow = tiny_flow(5)
    x = scales(5, dtype=torch.float64)
    z, log_jac_det = flow(x)
    back, reverse_log_det = flow(list(z), rev=True)
    for original, restored in zip(x, back):
        torch.testing.assert_close(restored, original)
    torch.testing.assert_close(reverse_log_det, -log_jac_det)


def test_a_fresh_flow_is_a_permutation_with_zero_log_det():
    flow = cross_scale_flow(6, (4, 4), blocks=3, hidden_channels=4)  # gammas start at 0
    x = scales(6)
    z, log_jac_det = flow(x)
    assert torch.equal(log_jac_det, torch.zeros(2))
    for xi, zi in zip(x, z):
        assert not torch.equal(xi, zi)
        torch.testing.assert_close(zi.sort(dim=1).values, xi.sort(dim=1).values)  # the same channels, reordered


def test_permutations_are_drawn_as_the_official_code_draws_them():
    dims = [(7, 4, 4), (7, 2, 2), (7, 1, 1)]
    np.random.seed(123)
    state = np.random.get_state()[1].copy()
    permute = ParallelPermute(dims, seed=2)
    assert np.array_equal(np.random.get_state()[1], state)  # NumPy's global generator untouched
    np.random.seed(2)  # freia_funcs.ParallelPermute: np.random.seed(seed), one permutation per input in turn
    official = [np.random.permutation(7) for _ in dims]
    assert [getattr(permute, f"perm{i}").tolist() for i in range(3)] == [p.tolist() for p in official]
    assert len({tuple(p) for p in official}) == 3  # the scales are shuffled differently
    x = scales(7)
    permuted, log_det = permute(x)
    assert log_det == 0.0
    assert all(torch.equal(p, xi[:, torch.as_tensor(o)]) for p, xi, o in zip(permuted, x, official))
    restored, _ = permute(permuted, rev=True)
    assert all(torch.equal(r, xi) for r, xi in zip(restored, x))


def test_coupling_follows_the_official_formulas():
    coupling = trained_like(ParallelGlowCoupling([(5, 4, 4), (5, 2, 2), (5, 1, 1)], clamp=2.0, channels_hidden=3, kernel_size=3))
    x = scales(5)
    y, log_det = coupling(x)

    # freia_funcs.parallel_glow_coupling_layer.forward, written out: split 2 + 3 channels
    def e_log(s):
        return 2.0 * 0.636 * torch.atan(s / 2.0)

    x1 = [xi[:, :2] for xi in x]
    x2 = [xi[:, 2:] for xi in x]
    r2 = coupling.s2(*x2)
    y1 = [torch.exp(e_log(r[:, :2])) * a + r[:, 2:] for r, a in zip(r2, x1)]
    r1 = coupling.s1(*y1)
    y2 = [torch.exp(e_log(r[:, :3])) * a + r[:, 3:] for r, a in zip(r1, x2)]
    jac = sum(e_log(r[:, :2]).sum(dim=(1, 2, 3)) + e_log(q[:, :3]).sum(dim=(1, 2, 3)) for r, q in zip(r2, r1))
    for got, first, second in zip(y, y1, y2):
        torch.testing.assert_close(got, torch.cat((first, second), 1))
    torch.testing.assert_close(log_det, jac)


def test_the_soft_clamp_bounds_the_log_scale():
    coupling = ParallelGlowCoupling([(4, 4, 4), (4, 2, 2), (4, 1, 1)], clamp=3.0, channels_hidden=2, kernel_size=3)
    s = torch.tensor([-1e4, -1.0, 0.0, 1.0, 1e4])
    log_scale = coupling.log_e(s)
    assert log_scale.abs().max() <= 3.0 * 0.636 * math.pi / 2
    torch.testing.assert_close(log_scale[2], torch.tensor(0.0))
    assert log_scale[3].item() == pytest.approx(3 * 0.636 * math.atan(1 / 3))


def test_cross_convolutions_exchange_information_between_neighbouring_scales_only():
    network = trained_like(CrossConvolutions(3, 4, channels_hidden=5, kernel_size=3))
    x = scales(3, side=8)
    base = network(*x)
    assert [tuple(o.shape) for o in base] == [(2, 4, 8, 8), (2, 4, 4, 4), (2, 4, 2, 2)]

    def changed(scale: int) -> list[bool]:
        moved = [xi.clone() for xi in x]
        moved[scale] = moved[scale] + 1.0
        return [not torch.allclose(a, b) for a, b in zip(network(*moved), base)]

    assert changed(0) == [True, True, False]  # the finest scale reaches the middle one (down_conv01)
    assert changed(1) == [True, True, True]
    assert changed(2) == [False, True, True]  # the coarsest reaches the middle one (up_conv21)
    fresh = CrossConvolutions(3, 4, channels_hidden=5, kernel_size=3)  # gammas 0: the coupling starts as the identity
    assert all(torch.equal(o, torch.zeros_like(o)) for o in fresh(*x))


def test_the_official_architecture_kernels_and_widths():
    with torch.device("meta"):  # shapes only: the official flow has about 275 M parameters
        flow = cross_scale_flow(304, (24, 24))  # the paper's B5 layer at 768 px
    couplings = [m for m in flow.modules() if isinstance(m, ParallelGlowCoupling)]
    assert len(couplings) == 4 and all(c.clamp == 3.0 for c in couplings)
    assert [c.s1.conv_scale0_0.kernel_size for c in couplings] == [(3, 3)] * 3 + [(5, 5)]
    assert couplings[0].s1.conv_scale0_0.weight.shape == (1024, 152, 3, 3)
    assert couplings[0].s2.conv_scale0_1.weight.shape == (304, 1024, 3, 3)
    assert couplings[0].s1.down_conv01.stride == (2, 2)
    assert couplings[0].s1.lr.negative_slope == 0.1
    assert [tuple(n.dims) for n in flow.in_nodes] == [(304, 24, 24), (304, 12, 12), (304, 6, 6)]
    assert sum(p.numel() for p in flow.parameters()) == 275_227_288


def test_bad_flow_shapes_are_refused():
    with pytest.raises(ValueError, match="kernel sizes"):
        cross_scale_flow(4, (4, 4), blocks=2, kernel_sizes=[3])
    with pytest.raises(ValueError, match="halve twice"):
        cross_scale_flow(4, (6, 6))
    with pytest.raises(ValueError, match="at least 2"):
        cross_scale_flow(1, (4, 4), hidden_channels=2)


def test_loss_is_the_official_get_loss():
    z = scales(3, seed=3)
    log_jac_det = torch.tensor([0.7, -1.2])
    # utils.get_loss
    flat = torch.cat([zi.reshape(zi.shape[0], -1) for zi in z], dim=1)
    official = torch.mean(0.5 * torch.sum(flat**2, dim=(1,)) - log_jac_det) / flat.shape[1]
    torch.testing.assert_close(csflow_loss(z, log_jac_det), official)
    assert flat.shape[1] == 3 * (16 + 4 + 1)


def test_scores_and_maps_are_the_official_ones():
    z = scales(3, seed=4)
    # evaluate.py: np.mean(concat_maps(z) ** 2 / 2, axis=(1, 2)); maps: torch.mean(z ** 2, dim=(1,)) per scale
    concatenated = torch.cat([zi.reshape(zi.shape[0], -1) for zi in z], dim=1)[..., None]
    torch.testing.assert_close(image_scores(z), torch.mean(concatenated**2 / 2, dim=(1, 2)))
    for got, zi in zip(scale_maps(z), z):
        torch.testing.assert_close(got, torch.mean(zi**2, dim=(1,)))
    torch.testing.assert_close(anomaly_maps(z, "official", (16, 16)), torch.mean(z[0] ** 2, dim=1))
    # anomalib's AnomalyMapMode.ALL
    expected = torch.ones(2, 1, 16, 16)
    for zi in z:
        expected *= F.interpolate((zi**2).mean(dim=1, keepdim=True), size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(anomaly_maps(z, "product", (16, 16)), expected[:, 0])
    constant = [torch.full((1, 2, 4 // 2**s, 4 // 2**s), 2.0) for s in range(3)]
    torch.testing.assert_close(anomaly_maps(constant, "product", (8, 8)), torch.full((1, 8, 8), 64.0))
    torch.testing.assert_close(image_scores(constant), torch.tensor([2.0]))


def test_input_scales_are_nearest_downsamplings_of_the_full_image():
    images = torch.rand(2, 3, 16, 24, generator=torch.Generator().manual_seed(5))
    full, half, quarter = input_scales(images)
    assert torch.equal(full, images)
    assert torch.equal(half, images[..., ::2, ::2]) and torch.equal(quarter, images[..., ::4, ::4])


def test_the_flow_runs_in_float32_under_autocast():
    flow = trained_like(cross_scale_flow(4, (4, 4), blocks=1, hidden_channels=3, kernel_sizes=[3]))
    x = [xi.bfloat16() for xi in scales(4)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z, log_jac_det = run_cross_scale_flow(flow, x)
    assert all(zi.dtype == torch.float32 for zi in z) and log_jac_det.dtype == torch.float32
    reference, _ = flow([xi.float() for xi in x])
    torch.testing.assert_close(z[0], reference[0])
