"""AST's numerical heart against transcriptions of the official code and a brute-force Jacobian."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vad_ast.network import (
    AstModel,
    LayerOutput,
    Student,
    distance_maps,
    score_maps,
    student_loss,
    teacher_flow,
    teacher_kernel_sizes,
    teacher_loss,
)
from vad_flows.coupling import GatedConvSubnet
from vad_flows.likelihood import log_det_by_jacobian, positional_encoding_2d

CLAMP = 1.9


def _trained_like(module, scale=0.3, seed=1):
    """Random weights everywhere (the official gamma starts at 0: identity couplings)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            if parameter.requires_grad:
                parameter.copy_(scale * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
    return module


def official_flow(flow, x, condition):
    """The official ``ReversibleGraphNet`` forward of ``get_nf``, transcribed from
    ``freia_funcs.py`` (``permute_layer`` with ``np.random.seed(k)``,
    ``glow_coupling_layer_cond``), with the subnetworks of our FrEIA blocks as ``s1`` and ``s2``.
    Returns ``z`` and the per-position log-determinant ``[B, h, w]``."""
    couplings = [m for m in flow.module_list if hasattr(m, "subnet1")]
    jac = torch.zeros(x.shape[0], *x.shape[2:], dtype=x.dtype)

    def log_e(s):
        return CLAMP * 0.636 * torch.atan(s / CLAMP)

    for k, block in enumerate(couplings):
        np.random.seed(k)
        x = x[:, torch.as_tensor(np.random.permutation(x.shape[1]))]
        np.random.seed()
        split1 = x.shape[1] // 2
        x1, x2 = x[:, :split1], x[:, split1:]
        r2 = block.subnet2(torch.cat([x2, condition], dim=1))
        s2, t2 = torch.split(r2, r2.shape[1] // 2, 1)
        y1 = torch.exp(log_e(s2)) * x1 + t2
        r1 = block.subnet1(torch.cat([y1, condition], dim=1))
        s1, t1 = torch.split(r1, r1.shape[1] // 2, 1)
        y2 = torch.exp(log_e(s1)) * x2 + t1
        x = torch.cat((y1, y2), 1)
        jac = jac + torch.sum(log_e(s1), dim=1) + torch.sum(log_e(s2), dim=1)
    return x, jac


@pytest.mark.parametrize("channels", [6, 7])
def test_teacher_flow_computes_the_official_couplings(channels):
    flow = _trained_like(teacher_flow(channels, (3, 4), blocks=3, clamp=CLAMP, hidden=5, condition_channels=4)).double()
    x = torch.randn(2, channels, 3, 4, dtype=torch.float64)
    condition = positional_encoding_2d(4, 3, 4).double().unsqueeze(0).expand(2, -1, -1, -1)
    z, log_jac_det = flow(x, c=[condition])
    expected_z, per_position = official_flow(flow, x, condition)
    torch.testing.assert_close(z, expected_z, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(log_jac_det, per_position.sum(dim=(1, 2)), rtol=1e-12, atol=1e-12)
    assert float(per_position.detach().abs().max()) > 0.1  # not the identity


def test_teacher_log_det_matches_the_brute_force_jacobian():
    flow = _trained_like(teacher_flow(4, (3, 3), blocks=2, clamp=CLAMP, hidden=4, condition_channels=4)).double()
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    condition = positional_encoding_2d(4, 3, 3).double().unsqueeze(0)
    _, log_jac_det = flow(x, c=[condition.expand(2, -1, -1, -1)])
    for i in range(2):
        expected = log_det_by_jacobian(lambda v: flow(v.unsqueeze(0), c=[condition])[0][0], x[i])
        assert log_jac_det[i].item() == pytest.approx(expected.item(), abs=1e-9)
    assert abs(log_jac_det[0].item()) > 0.1
    back, _ = flow(flow(x, c=[condition.expand(2, -1, -1, -1)])[0], c=[condition.expand(2, -1, -1, -1)], rev=True)
    torch.testing.assert_close(back, x)  # invertible


def test_the_soft_clamp_bounds_each_log_scale_by_clamp():
    flow = teacher_flow(4, (2, 2), blocks=1, clamp=CLAMP, hidden=3, condition_channels=0)
    coupling = flow.module_list[1]
    huge = torch.tensor([-1e6, -1.0, 0.0, 1.0, 1e6])
    scaled = coupling.clamp * coupling.f_clamp(huge)
    torch.testing.assert_close(scaled, CLAMP * 0.636 * torch.atan(huge / CLAMP))
    assert float(scaled.abs().max()) <= CLAMP * 0.636 * math.pi / 2


def test_teacher_starts_as_the_identity_and_has_the_official_subnetworks():
    flow = teacher_flow(6, (2, 2), blocks=4, clamp=CLAMP, hidden=64, condition_channels=32)
    x = torch.randn(3, 6, 2, 2)
    z, log_jac_det = flow(x, c=[positional_encoding_2d(32, 2, 2).unsqueeze(0).expand(3, -1, -1, -1)])
    permutation = torch.arange(6)
    for k in range(4):
        np.random.seed(k)
        permutation = permutation[torch.as_tensor(np.random.permutation(6))]
    torch.testing.assert_close(z, x[:, permutation])  # gamma = 0: only the fixed permutations act
    assert torch.equal(log_jac_det, torch.zeros(3))
    subnets = [m for m in flow.modules() if isinstance(m, GatedConvSubnet)]
    assert teacher_kernel_sizes(4) == [3, 3, 3, 5]
    assert [s.conv1.kernel_size[0] for s in subnets] == [3, 3, 3, 3, 3, 3, 5, 5]
    first = subnets[0]  # subnet1 of block 0: (C/2 + 32) -> 64 -> 2 (C - C/2), replicate padding
    assert (first.conv1.in_channels, first.conv1.out_channels, first.conv2.out_channels) == (3 + 32, 64, 6)
    assert first.conv1.padding_mode == first.conv2.padding_mode == "replicate"
    assert all(float(s.gamma.detach()) == 0.0 for s in subnets)


def test_teacher_loss_is_the_official_nf_loss():
    flow = _trained_like(teacher_flow(4, (3, 5), blocks=2, clamp=CLAMP, hidden=4, condition_channels=4)).double()
    x = torch.randn(3, 4, 3, 5, dtype=torch.float64)
    condition = positional_encoding_2d(4, 3, 5).double().unsqueeze(0).expand(3, -1, -1, -1)
    z, log_jac_det = flow(x, c=[condition])
    _, jac = official_flow(flow, x, condition)
    # official get_nf_loss with the all-ones mask of the RGB mode
    mask = torch.ones(3, 1, 3, 5, dtype=torch.float64)
    per_pixel = 0.5 * torch.sum(mask * z**2, dim=1) - jac * mask[:, 0]
    torch.testing.assert_close(teacher_loss(z, log_jac_det), per_pixel.mean(dim=(-1, -2)).mean())


def test_student_loss_and_maps_are_the_official_st_loss():
    generator = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(2, 5, 3, 4, generator=generator), torch.randn(2, 5, 3, 4, generator=generator)
    per_pixel = torch.mean((teacher - student) ** 2, dim=1)  # official get_st_loss(per_pixel=True)
    torch.testing.assert_close(distance_maps(teacher, student), per_pixel)
    torch.testing.assert_close(student_loss(teacher, student), per_pixel.mean(dim=(-1, -2)).mean())
    assert distance_maps(teacher, teacher).abs().max() == 0


def test_scores_are_the_official_mean_and_max_over_maps():
    generator = torch.Generator().manual_seed(1)
    maps = torch.rand(3, 4, 4, generator=generator)
    maps[1, 2, 1] = 5.0
    # official eval.py: Upsample(scale_factor=depth_len // map_len = 8, mode='bicubic')
    upsampled = torch.nn.Upsample(scale_factor=8, mode="bicubic", align_corners=False)(maps[:, None])[:, 0]
    scores, out = score_maps(maps, (32, 32), "mean")
    torch.testing.assert_close(out, upsampled)
    torch.testing.assert_close(scores, maps.mean(dim=(1, 2)))  # "mean over maps": before upsampling
    scores, _ = score_maps(maps, (32, 32), "max")
    torch.testing.assert_close(scores, upsampled.amax(dim=(1, 2)))  # "max over maps": after it
    assert float(scores[1]) != pytest.approx(5.0, abs=1e-3)  # the upsampled map's maximum, not the grid's
    assert int(scores.argmax()) == 1
    with pytest.raises(ValueError, match="unknown score"):
        score_maps(maps, (32, 32), "median")


def test_student_has_the_official_architecture():
    with torch.device("meta"):
        student = Student(304 + 32, 304, 1024, 4)  # official MVTec AD RGB: B5's 304 features + 32
    count = sum(p.numel() for p in student.parameters())
    conv = lambda cin, cout: cin * cout * 9 + cout  # noqa: E731
    official = conv(336, 1024) + 4 * (2 * conv(1024, 1024) + 2 * 2 * 1024) + conv(1024, 304)  # without the unused gamma
    assert count == official
    assert [type(m).__name__ for m in student.res[0].children()] == ["Conv2d", "Conv2d", "BatchNorm2d", "BatchNorm2d", "LeakyReLU"]
    small = _trained_like(Student(4, 3, 6, 1))
    x = torch.randn(2, 4, 3, 3)
    block = small.res[0].eval()
    hidden = F.leaky_relu(small.conv1(x))
    expected_hidden = hidden + F.leaky_relu(block.bn2(block.l2(F.leaky_relu(block.bn1(block.l1(hidden))))))
    torch.testing.assert_close(small.eval()(x), small.conv2(expected_hidden))


def test_model_reads_positions_then_features_and_keeps_the_extractor_frozen():
    extractor = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, stride=4, padding=1), torch.nn.BatchNorm2d(6))
    model = AstModel(
        LayerOutput(extractor, "1"), 6, (4, 4), coupling_blocks=2, clamp=CLAMP, teacher_hidden=4,
        student_hidden=5, student_blocks=1, pos_enc_dim=8, map_size=(8, 8), score="mean",
    )
    model.train()
    assert not model.extractor.training and model.student.training
    assert not any(p.requires_grad for p in model.extractor.parameters())
    assert "position" not in model.state_dict()  # rebuilt, not saved
    images = torch.randn(2, 3, 16, 16)
    features = model.features(images)
    torch.testing.assert_close(features, extractor.eval()(images))
    assert not extractor[1]._forward_hooks  # the hook lives only while the extractor runs
    position = positional_encoding_2d(8, 4, 4).unsqueeze(0).expand(2, -1, -1, -1)
    torch.testing.assert_close(model.student_latents(features), model.student(torch.cat([position, features], 1)))
    scores, maps = model.eval()(images)
    assert scores.shape == (2,) and maps.shape == (2, 8, 8)
    with pytest.raises(ValueError, match="no module"):
        LayerOutput(extractor, "7")
