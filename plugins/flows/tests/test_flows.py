"""The shared flow pieces: couplings against a brute-force log-determinant, likelihoods, encoding."""

import math

import numpy as np
import pytest
import torch

from vad_flows.coupling import atan_clamp, conv_subnet, coupling_flow, gated_conv_subnet, glow_flow, linear_subnet, run_flow
from vad_flows.likelihood import (
    log_det_by_jacobian,
    log_likelihood,
    negative_log_likelihood_loss,
    positional_encoding_2d,
    standard_normal_log_density,
)


def _trained_like(flow):
    """Random weights everywhere (FrEIA initialises the last subnet layer at zero: identity couplings)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in flow.parameters():
            if parameter.requires_grad:
                parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
    return flow


def test_convolutional_coupling_log_det_matches_the_brute_force_jacobian():
    flow = _trained_like(coupling_flow((4, 3, 3), [conv_subnet(3, 1.0), conv_subnet(1, 1.0)], clamp=2.0)).double()
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    _, log_jac_det = flow(x)
    for i in range(2):
        expected = log_det_by_jacobian(lambda v: flow(v.unsqueeze(0))[0][0], x[i])
        assert log_jac_det[i].item() == pytest.approx(expected.item(), abs=1e-8)
    assert abs(log_jac_det[0].item()) > 0.1  # not the identity


def test_conditional_coupling_log_det_matches_and_depends_on_the_condition():
    flow = _trained_like(coupling_flow((6,), [linear_subnet(), linear_subnet()], clamp=1.9, permute_soft=True, condition_dims=(4,))).double()
    x, condition = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    z, log_jac_det = flow(x, c=[condition])
    for i in range(3):
        expected = log_det_by_jacobian(lambda v: flow(v.unsqueeze(0), c=[condition[i : i + 1]])[0][0], x[i])
        # the soft rotation is stored in float32, so its determinant is 1 only to about 1e-8
        assert log_jac_det[i].item() == pytest.approx(expected.item(), abs=1e-6)
    other, _ = flow(x, c=[condition.flip(0)])
    assert not torch.allclose(z, other)
    back, _ = flow(z, c=[condition], rev=True)  # invertible (the stored rotation and its inverse are float32)
    torch.testing.assert_close(back, x, atol=1e-5, rtol=0)


def test_the_seed_decides_the_permutations_and_numpy_state_is_left_alone():
    np.random.seed(5)
    before = np.random.get_state()[1].copy()
    first = coupling_flow((6,), [linear_subnet()] * 3, clamp=2.0, seed=3).state_dict()
    assert np.array_equal(np.random.get_state()[1], before)
    again = coupling_flow((6,), [linear_subnet()] * 3, clamp=2.0, seed=3).state_dict()
    other = coupling_flow((6,), [linear_subnet()] * 3, clamp=2.0, seed=4).state_dict()
    permutations = [key for key in first if key.endswith("w_perm")]
    assert len(permutations) == 3
    assert all(torch.equal(first[key], again[key]) for key in permutations)
    assert any(not torch.equal(first[key], other[key]) for key in permutations)
    wrapped = coupling_flow((6,), [linear_subnet()] * 3, clamp=2.0, seed=3 - 2**32).state_dict()  # any integer seeds
    assert all(torch.equal(first[key], wrapped[key]) for key in permutations)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="at least 2"):
        coupling_flow((1, 4, 4), [conv_subnet(3, 1.0)], clamp=2.0)
    with pytest.raises(ValueError, match="at least one"):
        coupling_flow((4,), [], clamp=2.0)
    with pytest.raises(ValueError, match="odd"):
        conv_subnet(2, 1.0)
    with pytest.raises(ValueError, match="multiple of 4"):
        positional_encoding_2d(6, 2, 2)


def test_log_likelihood_is_the_change_of_variables_formula():
    z = torch.randn(5, 3)
    log_jac_det = torch.randn(5)
    reference = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(dim=1)
    torch.testing.assert_close(standard_normal_log_density(z), reference)
    torch.testing.assert_close(log_likelihood(z, log_jac_det), reference + log_jac_det)
    maps = torch.randn(2, 4, 3, 3)  # per-position densities over the channels
    torch.testing.assert_close(standard_normal_log_density(maps, 1), torch.distributions.Normal(0.0, 1.0).log_prob(maps).sum(dim=1))


def test_an_affine_flow_recovers_the_gaussian_density_of_its_input():
    # x ~ N(mu, s^2) per dimension; z = (x - mu) / s has log|det| = -sum log s, and the formula
    # must give the exact density of x.
    mu, s = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 3.0])
    x = torch.tensor([[0.3, 1.0], [2.0, -4.0]])
    z = (x - mu) / s
    log_jac_det = -torch.log(s).sum().expand(2)
    expected = torch.distributions.Normal(mu, s).log_prob(x).sum(dim=1)
    torch.testing.assert_close(log_likelihood(z, log_jac_det), expected)


def test_negative_log_likelihood_loss_sums_each_sample_then_averages():
    z = torch.ones(2, 2, 3, 3)
    log_jac_det = torch.tensor([1.0, 3.0])
    assert negative_log_likelihood_loss(z, log_jac_det).item() == pytest.approx(0.5 * 18 - 2.0)


def test_positional_encoding_matches_the_formula():
    encoding = positional_encoding_2d(8, 3, 5)
    assert encoding.shape == (8, 3, 5)
    half = 4
    for i in range(0, half, 2):
        frequency = 10000 ** (-i / half)
        for row in range(3):
            for column in range(5):
                assert encoding[i, row, column].item() == pytest.approx(math.sin(column * frequency), abs=1e-6)
                assert encoding[i + 1, row, column].item() == pytest.approx(math.cos(column * frequency), abs=1e-6)
                assert encoding[half + i, row, column].item() == pytest.approx(math.sin(row * frequency), abs=1e-6)
                assert encoding[half + i + 1, row, column].item() == pytest.approx(math.cos(row * frequency), abs=1e-6)


def test_run_flow_is_float32_under_autocast():
    flow = coupling_flow((4, 2, 2), [conv_subnet(3, 1.0)], clamp=2.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z, log_jac_det = run_flow(flow, torch.randn(2, 4, 2, 2).bfloat16())
    assert z.dtype == torch.float32 and log_jac_det.dtype == torch.float32


def test_glow_flow_log_det_matches_restores_numpy_state_and_refuses_bad_shapes():
    np.random.seed(3)
    before = np.random.get_state()[1].copy()
    flow = _trained_like(glow_flow((5, 2, 2), [gated_conv_subnet(3, 3), gated_conv_subnet(3, 1)], clamp=1.9, clamp_activation=atan_clamp(1.9), condition_dims=(4, 2, 2)))
    assert np.array_equal(np.random.get_state()[1], before)
    flow = flow.double()
    x, condition = torch.randn(2, 5, 2, 2, dtype=torch.float64), torch.randn(2, 4, 2, 2, dtype=torch.float64)
    _, log_jac_det = flow(x, c=[condition])
    for i in range(2):
        expected = log_det_by_jacobian(lambda v: flow(v.unsqueeze(0), c=[condition[i : i + 1]])[0][0], x[i])
        assert log_jac_det[i].item() == pytest.approx(expected.item(), abs=1e-8)
    with pytest.raises(ValueError, match="at least 2"):
        glow_flow((1, 2, 2), [gated_conv_subnet(3, 3)], clamp=1.0, clamp_activation=torch.tanh)
    with pytest.raises(ValueError, match="at least one"):
        glow_flow((4, 2, 2), [], clamp=1.0, clamp_activation=torch.tanh)
    with pytest.raises(ValueError, match="odd"):
        gated_conv_subnet(3, 4)
