"""The a-contrario NFA against SciPy and a transcription of the official block NFA; the nfa threshold rule."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vad.errors import VadError
from vad_uflow.nfa import candidate_threshold, half_windows, log10_binomial_tails, log10_nfa_map, log10_number_of_tests, log10_window_probability
from vad_uflow.threshold import NfaThreshold, nfa_threshold

st = pytest.importorskip("scipy.stats")


def official_binomial_test(z, win, probability_thr):
    """The official ``binomial_test`` (src/nfa_block.py, high_precision=False), transcribed."""
    tau = st.chi2.ppf(probability_thr, 1)
    half_win = np.max([int(win // 2), 1])
    n_chann = z.shape[1]
    z2 = F.pad(z**2, tuple(4 * [half_win]), "reflect").detach().cpu()
    z2_unfold_hw = z2.unfold(-2, 2 * half_win + 1, 1).unfold(-2, 2 * half_win + 1, 1).numpy()
    observed_candidates_k = np.sum(z2_unfold_hw >= tau, axis=(-2, -1))
    observed_candidates = np.sum(observed_candidates_k, axis=1, keepdims=True)
    x = observed_candidates / n_chann
    n = int((2 * half_win + 1) ** 2)
    return torch.tensor(st.binom.logsf(x, n, 1 - probability_thr) / np.log(10))


def official_log_nfa(z, win_size=5, binomial_probability_thr=0.9, target_size=16):
    """The official ``compute_log_nfa_anomaly_score`` (src/nfa_block.py), transcribed, as log10 NFA."""
    log_prob_l = [official_binomial_test(zi, win_size / (2**scale), binomial_probability_thr) for scale, zi in enumerate(z)]
    log_prob_l_up = torch.cat([F.interpolate(lpl, size=(target_size, target_size), mode="bicubic", align_corners=True) for lpl in log_prob_l], dim=1)
    log_prob = torch.sum(log_prob_l_up, dim=1, keepdim=True)
    log_number_of_tests = torch.log10(torch.sum(torch.tensor([zi.shape[-2] * zi.shape[-1] for zi in z])))
    return (log_number_of_tests + log_prob)[:, 0]


def latents_with_a_defect(seed=0):
    """Standard normal latents at three scales, a block of large values in the middle of each."""
    generator = torch.Generator().manual_seed(seed)
    latents = [torch.randn(2, c, s, s, generator=generator) for c, s in ((6, 8), (5, 4), (4, 2))]
    latents[0][1, :, 3:6, 2:5] *= 4
    latents[1][1, :, 1:3, 1:3] *= 4
    return latents


@pytest.mark.parametrize("probability", [0.5, 0.9, 0.99])
def test_candidate_threshold_is_the_chi_square_quantile(probability):
    assert candidate_threshold(probability) == pytest.approx(st.chi2.ppf(probability, 1), rel=1e-12)


@pytest.mark.parametrize(("n", "p"), [(9, 0.1), (25, 0.1), (49, 0.5)])
def test_binomial_tails_are_scipys_survival_function(n, p):
    tails = log10_binomial_tails(n, p)
    expected = st.binom.logsf(np.arange(n), n, p) / np.log(10)
    np.testing.assert_allclose(tails[:n], expected, rtol=1e-9, atol=1e-12)
    # P(X > n) = 0: SciPy's -inf is replaced by log10 P(X >= n) = n log10 p
    assert st.binom.logsf(n, n, p) == -np.inf
    assert tails[n] == pytest.approx(n * math.log10(p), rel=1e-12)


def test_window_sizes_are_the_official_ones():
    assert half_windows(5, 3) == [2, 1, 1]  # 5 x 5, then 3 x 3
    assert half_windows(7, 2) == [3, 1]
    assert half_windows(1, 1) == [1]


def test_one_window_by_hand():
    tau = candidate_threshold(0.9)
    z = torch.zeros(1, 2, 5, 5)
    z[0, 0, 1:3, 1:4] = 2.0  # 6 candidates in channel 0 (4 >= tau)
    z[0, 1, 2, 2] = 1.0  # below tau: no candidate
    z[0, 1, 0, 0] = -3.0  # 1 candidate in channel 1
    log_prob = log10_window_probability(z, 2, tau, log10_binomial_tails(25, 0.1))
    # centre pixel: its 5 x 5 window is the whole map, 7 candidates over 2 channels: x = 3.5
    assert log_prob[0, 0, 2, 2].item() == pytest.approx(math.log10(st.binom.sf(3.5, 25, 0.1)), rel=1e-6)
    assert st.binom.sf(3.5, 25, 0.1) == pytest.approx(1 - st.binom.cdf(3, 25, 0.1))  # P(X > floor(x))


@pytest.mark.parametrize(("window", "scale"), [(5, 0), (5, 1), (5, 2), (7, 0)])
def test_window_probability_matches_the_official_binomial_test(window, scale):
    z = latents_with_a_defect()[0]
    half = half_windows(window, scale + 1)[scale]
    side = 2 * half + 1
    ours = log10_window_probability(z, half, candidate_threshold(0.9), log10_binomial_tails(side * side, 0.1))
    expected = official_binomial_test(z, window / 2**scale, 0.9)  # the official window of scale s
    assert torch.isfinite(expected).all()  # no window is all candidates here
    torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=1e-5)


def test_nfa_map_matches_the_official_block_nfa():
    latents = latents_with_a_defect()
    ours = log10_nfa_map(latents, (16, 16), window=5, probability=0.9)
    expected = official_log_nfa(latents, 5, 0.9, 16)
    torch.testing.assert_close(ours.double(), expected, rtol=1e-4, atol=1e-4)
    assert log10_number_of_tests(latents) == pytest.approx(math.log10(64 + 16 + 4))


def test_standard_normal_latents_give_no_detection_and_a_defect_does():
    # lite0's latent widths (30, 30, 56) at a 128 px input: strides 4, 8, 16
    shapes = ((30, 32), (30, 16), (56, 8))
    for seed in range(10):  # under the null: at most epsilon = 1 false detection per image on average
        generator = torch.Generator().manual_seed(seed)
        noise = [torch.randn(1, c, s, s, generator=generator) for c, s in shapes]
        assert log10_nfa_map(noise, (128, 128)).min() > 0
    noise[0][0, :, 10:16, 20:26] *= 3
    log_nfa = log10_nfa_map(noise, (128, 128))
    assert log_nfa[0, 44:60, 84:100].max() < 0  # the block, at its upsampled place
    assert log_nfa[0, :, :64].min() > 0  # nowhere near it


def test_a_window_of_candidates_only_stays_finite():
    z = torch.full((1, 3, 4, 4), 5.0)
    log_nfa = log10_nfa_map([z], (4, 4), window=3)
    assert torch.isfinite(log_nfa).all()
    torch.testing.assert_close(log_nfa, torch.full((1, 4, 4), math.log10(16) + 9 * math.log10(0.1)))


def test_bad_nfa_inputs_are_refused():
    with pytest.raises(ValueError, match="too small"):
        log10_window_probability(torch.zeros(1, 2, 2, 2), 2, 1.0, log10_binomial_tails(25, 0.1))
    with pytest.raises(ValueError, match="binomial tails"):
        log10_window_probability(torch.zeros(1, 2, 8, 8), 2, 1.0, log10_binomial_tails(9, 0.1))
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        candidate_threshold(1.0)


def test_the_nfa_threshold_is_minus_log10_epsilon_with_a_strict_inequality():
    assert NfaThreshold.needs_validation is False and not NfaThreshold.needs_anomalous
    threshold = NfaThreshold().fit(np.zeros(0), np.zeros(0, int))
    assert threshold > 0 and threshold == np.nextafter(0.0, 1.0)
    assert not 0.0 >= threshold  # log10 NFA = 0 exactly is not a detection (official: -log NFA > 0)
    assert NfaThreshold(epsilon=0.01).fit(np.array([5.0]), np.array([0])) == pytest.approx(2.0)
    assert nfa_threshold(10.0) == pytest.approx(-1.0)
    with pytest.raises(VadError):
        NfaThreshold(epsilon=0)


def test_the_nfa_threshold_keeps_the_threshold_contract():
    from vad.conformance import check_threshold

    check_threshold(NfaThreshold)
