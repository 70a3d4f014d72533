"""CFLOW-AD's numerical parts: fibers, likelihoods against a brute-force Jacobian, the loss, fiber
sampling, map aggregation and normalisation, the learning-rate schedule."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from vad_cflow.network import (
    CflowDecoders,
    OfficialSchedule,
    anomaly_maps,
    decode_level,
    fiber_batches,
    fiber_loss,
    fibers_and_conditions,
    learning_rate,
    summed_probabilities,
)
from vad_flows.likelihood import log_det_by_jacobian, positional_encoding_2d, standard_normal_log_density


def _trained_like(module, seed=1):
    """Random weights in every trainable parameter (FrEIA starts close to the identity)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            if parameter.requires_grad:
                parameter.copy_(0.2 * torch.randn(parameter.shape, generator=generator))
    return module


def _decoders(channels=(6, 4), **changes):
    options = {"condition_vec": 8, "coupling_blocks": 2, "clamp_alpha": 1.9, "permute_soft": True, "seed": 0, **changes}
    return _trained_like(CflowDecoders(list(channels), **options))


def test_fibers_and_conditions_follow_the_official_row_order():
    features = torch.randn(2, 5, 3, 4)
    fibers, conditions = fibers_and_conditions(features, 8)
    assert fibers.shape == (24, 5) and conditions.shape == (24, 8)
    # official: e.reshape(B, C, S).transpose(1, 2).reshape(E, C), and likewise the encoding
    torch.testing.assert_close(fibers, features.reshape(2, 5, 12).transpose(1, 2).reshape(24, 5), rtol=0, atol=0)
    encoding = positional_encoding_2d(8, 3, 4).unsqueeze(0).repeat(2, 1, 1, 1)
    torch.testing.assert_close(conditions, encoding.reshape(2, 8, 12).transpose(1, 2).reshape(24, 8), rtol=0, atol=0)
    torch.testing.assert_close(fibers[1 * 12 + 2 * 4 + 3], features[1, :, 2, 3], rtol=0, atol=0)


def test_per_dimension_log_likelihood_is_the_change_of_variables_with_the_brute_force_jacobian():
    decoders = _decoders()
    flow = decoders.decoders[0]
    reference = copy.deepcopy(flow).double()
    features = torch.randn(1, 6, 2, 2)
    z_level, log_p = decode_level(flow, features, 8)
    assert log_p.shape == (1, 2, 2) and z_level.shape == (1, 6, 2, 2)
    fibers, conditions = fibers_and_conditions(features.double(), 8)
    for row in range(4):

        def transform(x, condition=conditions[row : row + 1]):
            return reference(x.unsqueeze(0), c=[condition])[0][0]

        z = transform(fibers[row])
        log_det = log_det_by_jacobian(transform, fibers[row])
        expected = (standard_normal_log_density(z, dim=0) + log_det) / 6  # log p(x) / C
        assert abs(log_det.item()) > 0.05  # the flow is not the identity
        assert log_p.flatten()[row].item() == pytest.approx(expected.item(), abs=1e-4)
        torch.testing.assert_close(z_level.permute(0, 2, 3, 1).reshape(4, 6)[row].double(), z, atol=1e-5, rtol=0)


def test_the_condition_changes_the_likelihood():
    decoders = _decoders()
    features = torch.randn(1, 6, 1, 1).expand(1, 6, 2, 2).contiguous()  # one feature vector at every position
    _, log_p = decode_level(decoders.decoders[0], features, 8)
    assert log_p.flatten().unique().numel() == 4


def test_fiber_loss_is_the_official_formula():
    decoders = _decoders()
    flow = decoders.decoders[1]
    fibers, conditions = torch.randn(10, 4), torch.randn(10, 8)
    loss, losses = fiber_loss(flow, fibers, conditions)
    z, log_jac_det = flow(fibers, c=[conditions])
    # official utils.get_logp with _GCONST_ = -0.9189385332046727, divided by C, then -LogSigmoid
    log_p = (4 * -0.9189385332046727 - 0.5 * torch.sum(z**2, 1) + log_jac_det) / 4
    torch.testing.assert_close(losses, -torch.nn.LogSigmoid()(log_p))
    torch.testing.assert_close(loss, losses.mean())
    assert loss.requires_grad and not losses.requires_grad


def test_fiber_batches_cut_one_permutation():
    batches = fiber_batches(10, 3, torch.Generator().manual_seed(0))
    assert [len(b) for b in batches] == [3, 3, 3]  # 10 // 3 batches, one fiber left out this time
    assert len(torch.cat(batches).unique()) == 9
    again = fiber_batches(10, 3, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(batches, again))
    few = fiber_batches(5, 8, torch.Generator().manual_seed(0))  # fewer fibers than a batch: one batch of all
    assert len(few) == 1 and sorted(few[0].tolist()) == [0, 1, 2, 3, 4]


def test_map_aggregation_by_hand():
    fine = torch.tensor([[[0.0, -1.0], [-2.0, -3.0]]])  # [1, 2, 2]
    coarse = torch.tensor([[[-1.0]]])  # [1, 1, 1]
    maxima = torch.tensor([0.0, -1.0])
    total = summed_probabilities([fine, coarse], maxima, (2, 2))
    expected = torch.tensor([[[2.0, 1 + math.exp(-1)], [1 + math.exp(-2), 1 + math.exp(-3)]]])
    torch.testing.assert_close(total, expected)
    maps = anomaly_maps([fine, coarse], maxima, torch.tensor(2.5), (2, 2))
    torch.testing.assert_close(maps, 2.5 - expected)
    # another per-level maximum only scales that level's probabilities
    shifted = summed_probabilities([fine, coarse], torch.tensor([1.0, -1.0]), (2, 2))
    torch.testing.assert_close(shifted, torch.exp(fine - 1.0) + 1.0)


def test_levels_are_upsampled_bilinearly_with_aligned_corners():
    log_p = torch.log(torch.tensor([[[1.0, 2.0], [3.0, 4.0]]]))
    upsampled = summed_probabilities([log_p], torch.tensor([0.0]), (4, 4))
    # align_corners=True: the corners keep their values, the rest in equal steps between them
    torch.testing.assert_close(upsampled[0, 0], torch.tensor([1.0, 4 / 3, 5 / 3, 2.0]))
    torch.testing.assert_close(upsampled[0, :, 0], torch.tensor([1.0, 5 / 3, 7 / 3, 3.0]))
    assert upsampled[0, -1, -1].item() == pytest.approx(4.0)


def test_decoders_maps_use_the_stored_statistics():
    decoders = _decoders().eval()
    levels = [torch.randn(2, 6, 4, 4), torch.randn(2, 4, 2, 2)]
    decoders.log_likelihood_max.copy_(torch.tensor([0.5, -0.5]))
    decoders.probability_max.fill_(3.0)
    with torch.no_grad():
        maps = decoders.maps(levels, (8, 8))
        log_ps = [decode_level(flow, level, 8)[1] for flow, level in zip(decoders.decoders, levels)]
    expected = 3.0 - sum(
        F.interpolate(torch.exp(log_p - m).unsqueeze(1), size=(8, 8), mode="bilinear", align_corners=True).squeeze(1)
        for log_p, m in zip(log_ps, (0.5, -0.5))
    )
    torch.testing.assert_close(maps, expected)
    with torch.no_grad():  # an image's map does not depend on the other images of its batch
        torch.testing.assert_close(decoders.maps([level[1:] for level in levels], (8, 8)), maps[1:])


def test_decoders_have_the_official_architecture():
    decoders = CflowDecoders([6], condition_vec=8, coupling_blocks=3, clamp_alpha=1.9, permute_soft=True, seed=0)
    blocks = list(decoders.decoders[0].module_list)
    assert len(blocks) == 3
    block = blocks[0]
    assert block.clamp == 1.9 and block.conditional
    # subnet_fc: Linear(d, 2d) -> ReLU -> Linear(2d, 2 * (C - C // 2)), d = C // 2 + condition
    linears = [m for m in block.subnet if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(3 + 8, 22), (22, 6)]
    rotation = block.w_perm.view(6, 6)  # soft permutation: a random rotation, not a permutation
    torch.testing.assert_close(rotation @ rotation.T, torch.eye(6), atol=1e-5, rtol=0)
    assert ((rotation.abs() > 1e-3) & (rotation.abs() < 0.999)).any()
    hard = CflowDecoders([6], condition_vec=8, coupling_blocks=1, clamp_alpha=1.9, permute_soft=False, seed=0)
    assert set(hard.decoders[0].module_list[0].w_perm.flatten().tolist()) == {0.0, 1.0}


def test_learning_rate_follows_the_official_warm_up_and_cosine():
    settings = {"batches_per_epoch": 10, "epochs": 200, "sub_epochs": 8, "warmup_meta_epochs": 2}
    lr = 2e-4
    assert learning_rate(lr, epoch=0, batch=0, **settings) == pytest.approx(2e-5)  # lr / 10
    # halfway through the warm-up (meta-epoch 1 of 2 starts): the midpoint towards cosine(2)
    assert learning_rate(lr, epoch=8, batch=0, **settings) == pytest.approx(1.0843072889837513e-4)
    assert learning_rate(lr, epoch=15, batch=9, **settings) == pytest.approx(2e-5 + 159 / 160 * (1.9686145779675027e-4 - 2e-5))
    assert learning_rate(lr, epoch=16, batch=0, **settings) == pytest.approx(1.9686145779675027e-4)  # cosine(2 of 25)
    assert learning_rate(lr, epoch=24, batch=5, **settings) == pytest.approx(1.929846709402363e-4)  # cosine(3), whole meta-epoch
    assert learning_rate(lr, epoch=199, batch=3, **settings) == pytest.approx(9.877413386836713e-7)  # cosine(24 of 25)
    no_warm_up = {**settings, "warmup_meta_epochs": 0}
    assert learning_rate(lr, epoch=0, batch=0, **no_warm_up) == pytest.approx(lr)
    # 3 epochs of sub_epochs 2 are 2 meta-epochs: cosine(1 of 2) is the midpoint of lr and lr / 1000
    short = {"batches_per_epoch": 1, "epochs": 3, "sub_epochs": 2, "warmup_meta_epochs": 0}
    assert learning_rate(lr, epoch=2, batch=0, **short) == pytest.approx((lr + lr / 1000) / 2)


def test_schedule_sets_the_rate_per_batch_and_resumes():
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([parameter], lr=1.0)
    settings = {"batches_per_epoch": 2, "epochs": 4, "sub_epochs": 2, "warmup_meta_epochs": 1}
    schedule = OfficialSchedule(optimizer, 1.0, **settings)
    rates = []
    for _ in range(2):
        for _ in range(2):
            rates.append(schedule.before_batch())
            assert optimizer.param_groups[0]["lr"] == rates[-1]
        schedule.step()
    assert rates == pytest.approx([0.1 + k / 4 * (0.5005 - 0.1) for k in range(4)])  # warm-up: lr / 10 towards cosine(1 of 2)
    resumed = OfficialSchedule(optimizer, 1.0, **settings)
    resumed.load_state_dict(schedule.state_dict())
    assert resumed.before_batch() == schedule.before_batch() == pytest.approx(0.5005)  # cosine(1 of 2)
