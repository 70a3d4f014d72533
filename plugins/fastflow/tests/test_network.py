"""FastFlow's numerical heart: flows against a brute-force log-determinant, kernels, sizes, loss, maps."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vad_fastflow.network import FastFlowHead, FastFlowScorer, anomaly_map, fast_flow, fastflow_loss, flow_kernel_sizes, probability_maps
from vad_flows.likelihood import HALF_LOG_TWO_PI, log_det_by_jacobian, log_likelihood


def _trained_like(module: nn.Module, scale: float = 0.3) -> nn.Module:
    """Random weights everywhere, so that no coupling is close to the identity."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in module.parameters():
            if parameter.requires_grad:
                parameter.copy_(scale * torch.randn(parameter.shape, generator=generator))
    return module


def _convolutions(flow: nn.Module) -> list[nn.Conv2d]:
    return [m for m in flow.modules() if isinstance(m, nn.Conv2d)]


@pytest.mark.parametrize("conv3x3_only", [False, True])
def test_flow_log_det_matches_the_brute_force_jacobian(conv3x3_only):
    flow = _trained_like(fast_flow((4, 3, 3), steps=3, hidden_ratio=1.0, conv3x3_only=conv3x3_only, clamp=2.0, seed=0)).double()
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    _, log_jac_det = flow(x)
    for i in range(2):
        expected = log_det_by_jacobian(lambda v: flow(v.unsqueeze(0))[0][0], x[i])
        assert log_jac_det[i].item() == pytest.approx(expected.item(), abs=1e-8)
    assert abs(log_jac_det[0].item()) > 0.1  # not volume preserving


def test_alternating_kernels_reach_half_as_far_as_3x3_only():
    # a subnet conv(k) -> ReLU -> conv(k) reaches k - 1 positions: two 3x3 steps reach 4, a 3x3 and a 1x1 step 2
    x = torch.randn(1, 8, 1, 11, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for conv3x3_only, reach in ((True, 4), (False, 2)):
        flow = _trained_like(fast_flow((8, 1, 11), steps=2, hidden_ratio=2.0, conv3x3_only=conv3x3_only, clamp=2.0, seed=0)).double()
        jacobian = torch.autograd.functional.jacobian(lambda v: flow(v)[0], x).reshape(8, 11, 8, 11)
        depends = [bool((jacobian[:, 5, :, 5 + distance].abs() > 0).any()) for distance in range(6)]
        assert depends == [distance <= reach for distance in range(6)]


def test_kernels_alternate_3x3_and_1x1_or_are_all_3x3():
    assert flow_kernel_sizes(8, conv3x3_only=False) == [3, 1, 3, 1, 3, 1, 3, 1]
    assert flow_kernel_sizes(8, conv3x3_only=True) == [3] * 8
    flow = fast_flow((6, 4, 4), steps=4, hidden_ratio=0.5, conv3x3_only=False, clamp=2.0, seed=0)
    convolutions = _convolutions(flow)
    assert [c.kernel_size[0] for c in convolutions] == [3, 3, 1, 1, 3, 3, 1, 1]
    # each subnet maps the passive half (3 channels) through int(0.5 * 3) = 1 hidden channel to
    # a scale and a shift for the active half (2 x 3)
    assert {(c.in_channels, c.out_channels) for c in convolutions} == {(3, 1), (1, 6)}
    assert all(block.clamp == 2.0 for block in flow.module_list)


def test_the_clamp_bounds_each_coupling_log_scale():
    flow = fast_flow((4, 2, 2), steps=1, hidden_ratio=1.0, conv3x3_only=True, clamp=0.5, seed=0)
    block = flow.module_list[0]
    x = torch.randn(8, 4, 2, 2, generator=torch.Generator().manual_seed(4))
    global_part = 4 * torch.log(block.global_scale_activation(block.global_scale)).sum().detach()  # per pixel, 2 x 2 pixels
    last = block.subnet[-1]
    for sign in (1.0, -1.0):
        with torch.no_grad():
            for parameter in block.subnet.parameters():
                parameter.zero_()
            last.bias[:2] = sign * 1e4  # the log-scales of the 2 active channels, far past the clamp
        _, log_jac_det = flow(x)
        # clamp 0.5 x 2 active channels x 4 pixels
        torch.testing.assert_close(log_jac_det.detach() - global_part, torch.full((8,), sign * 4.0))
    _trained_like(flow, scale=50.0)
    global_part = 4 * torch.log(block.global_scale_activation(block.global_scale)).sum()
    _, log_jac_det = flow(x)
    assert bool(((log_jac_det - global_part).abs() <= 4.0 + 1e-4).all())


def test_permutations_come_from_the_seed():
    first = fast_flow((6, 2, 2), steps=3, hidden_ratio=1.0, conv3x3_only=False, clamp=2.0, seed=7).state_dict()
    again = fast_flow((6, 2, 2), steps=3, hidden_ratio=1.0, conv3x3_only=False, clamp=2.0, seed=7).state_dict()
    other = fast_flow((6, 2, 2), steps=3, hidden_ratio=1.0, conv3x3_only=False, clamp=2.0, seed=8).state_dict()
    permutations = [key for key in first if key.endswith("w_perm")]
    assert all(torch.equal(first[key], again[key]) for key in permutations)
    assert any(not torch.equal(first[key], other[key]) for key in permutations)


def _trainable(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def test_flow_sizes_are_the_references():
    # ResNet-18 at 256 px: layer1-3 maps; the counts of gathierry/FastFlow (issue #2: 2.6M with
    # alternating kernels, 4.7M with 3x3 only, against the paper's 2.7M and 4.9M quoted there)
    resnet18 = [[64, 64, 64], [128, 32, 32], [256, 16, 16]]
    assert _trainable(FastFlowHead(resnet18, 8, 1.0, True, 2.0, 0).flows) == 4_657_408
    assert _trainable(FastFlowHead(resnet18, 8, 1.0, False, 2.0, 0).flows) == 2_593_024
    # WideResNet-50-2, alternating kernels: the paper's 41.3M additional parameters (on the meta device: no memory)
    with torch.device("meta"):
        wide = FastFlowHead([[256, 64, 64], [512, 32, 32], [1024, 16, 16]], 8, 1.0, False, 2.0, 0)
    assert _trainable(wide.flows) == 41_337_856
    # the LayerNorms: an affine weight and bias per feature value
    assert _trainable(FastFlowHead(resnet18, 1, 1.0, False, 2.0, 0).norms) == 2 * (64 * 64 * 64 + 128 * 32 * 32 + 256 * 16 * 16)


def test_head_layer_normalises_each_map_over_channels_and_positions():
    head = FastFlowHead([[3, 4, 4], [5, 2, 2]], 2, 1.0, False, 2.0, 0)
    assert [list(norm.normalized_shape) for norm in head.norms] == [[3, 4, 4], [5, 2, 2]]
    features = [10 + 5 * torch.randn(2, 3, 4, 4), -3 + 2 * torch.randn(2, 5, 2, 2)]
    for norm, feature in zip(head.norms, features):
        normed = norm(feature).flatten(1)
        torch.testing.assert_close(normed.mean(1), torch.zeros(2), atol=1e-5, rtol=0)
        torch.testing.assert_close(normed.var(1, unbiased=False), torch.ones(2), atol=1e-3, rtol=0)
    latents, log_jac_dets = head.latents(features)
    assert [tuple(z.shape) for z in latents] == [(2, 3, 4, 4), (2, 5, 2, 2)] and [tuple(d.shape) for d in log_jac_dets] == [(2,), (2,)]
    with pytest.raises(ValueError, match="2 scales"):
        head.latents(features[:1])


def test_loss_is_the_references_summed_per_scale_negative_log_likelihood():
    generator = torch.Generator().manual_seed(5)
    latents = [torch.randn(3, 2, 4, 4, generator=generator), torch.randn(3, 5, 2, 2, generator=generator)]
    log_jac_dets = [torch.randn(3, generator=generator), torch.randn(3, generator=generator)]
    loss = fastflow_loss(latents, log_jac_dets)
    # reference fastflow.py: loss += torch.mean(0.5 * torch.sum(output**2, dim=(1, 2, 3)) - log_jac_dets)
    reference = sum(torch.mean(0.5 * torch.sum(z**2, dim=(1, 2, 3)) - d) for z, d in zip(latents, log_jac_dets))
    torch.testing.assert_close(loss, reference)
    # = minus the mean log-likelihood of each scale's features, up to the Gaussian's constant
    likelihood = sum(log_likelihood(z, d, dim=(1, 2, 3)).mean() for z, d in zip(latents, log_jac_dets))
    constant = (2 * 16 + 5 * 4) * HALF_LOG_TWO_PI
    torch.testing.assert_close(loss, -likelihood - constant)


def test_probability_averages_the_squared_latents_over_channels():
    z = torch.zeros(1, 2, 1, 2)
    z[0, 0, 0, 1] = 2.0  # mean over the two channels of z^2: 2 (a sum would give 4)
    torch.testing.assert_close(probability_maps([z])[0], torch.tensor([[[1.0, math.exp(-1.0)]]]))


def test_the_map_averages_minus_the_upsampled_probabilities_over_scales():
    generator = torch.Generator().manual_seed(6)
    fine, coarse = torch.randn(2, 3, 4, 4, generator=generator), torch.randn(2, 5, 2, 2, generator=generator)
    maps = anomaly_map([fine, coarse], (8, 8))
    expected = 0.5 * sum(
        F.interpolate(-torch.exp(-0.5 * (z**2).mean(1, keepdim=True)), size=(8, 8), mode="bilinear", align_corners=False)[:, 0]
        for z in (fine, coarse)
    )
    torch.testing.assert_close(maps, expected)
    # the best possible normal (z = 0 everywhere) gives -1; a far outlier at one scale lifts the map towards 0
    assert torch.equal(anomaly_map([torch.zeros(1, 3, 2, 2), torch.zeros(1, 5, 1, 1)], (4, 4)), torch.full((1, 4, 4), -1.0))
    outlier = anomaly_map([torch.full((1, 3, 2, 2), 100.0), torch.zeros(1, 5, 1, 1)], (4, 4))
    torch.testing.assert_close(outlier, torch.full((1, 4, 4), -0.5))


def test_scorer_gives_maps_at_the_input_size_and_their_maximum():
    head = _trained_like(FastFlowHead([[4, 4, 4], [6, 2, 2]], 2, 1.0, False, 2.0, 0))
    pool = nn.AvgPool2d(2)

    def encode(images):  # a stand-in backbone: two levels at strides 2 and 4
        first = pool(torch.cat([images, images[:, :1]], dim=1))
        return [first, pool(torch.cat([first, first[:, :2]], dim=1))]

    images = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(7))
    scores, maps = FastFlowScorer(encode, head).eval()(images)
    assert maps.shape == (3, 8, 8) and bool((maps <= 0).all()) and bool((maps >= -1).all())
    latents, _ = head.latents(encode(images))
    torch.testing.assert_close(maps, anomaly_map(latents, (8, 8)))
    torch.testing.assert_close(scores, maps.amax(dim=(1, 2)))
