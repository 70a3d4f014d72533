"""U-Flow's a-contrario detection: the per-pixel number of false alarms (NFA) of the latent maps.

Under the null hypothesis (a normal image) the flow's latent entries are independent standard
normals, so each squared entry ``z^2`` follows a chi-square law with one degree of freedom. The
official block NFA (github.com/mtailanian/uflow, ``src/nfa_block.py``:
``compute_log_nfa_anomaly_score`` and ``binomial_test``; the arXiv 2022 paper's detection step)
turns this into a test per pixel and scale:

* a latent entry is a *candidate* when ``z^2 >= tau``, ``tau`` the chi-square(1) quantile at
  ``probability`` (official 0.9): under the null each entry is one with probability
  ``1 - probability``;
* around each position of scale ``s`` (0 the finest) a window of side ``2 h + 1`` with
  ``h = max(int((window / 2^s) // 2), 1)`` (official ``window`` 5: 5 x 5, then 3 x 3), reflect
  padding at the borders; the candidates of the window, summed over the channels and divided by
  their number, give ``x`` (the mean count of one channel);
* ``log10 P(X > x)``, ``X ~ Binomial(n = (2 h + 1)^2, 1 - probability)``: SciPy's
  ``binom.logsf(x, n, 1 - probability) / ln 10`` as the official code (``sf`` is ``P(X > floor(x))``);
* the scales' log-probabilities are upsampled bicubically (``align_corners=True``) to the map
  size and added (the latents of the scales are independent under the null);
* ``log10 NFA = log10(number of tests) + log10 P``, the number of tests being the count of latent
  positions over all scales; a pixel is detected when ``log10 NFA < log10 epsilon`` (official
  epsilon 1: at most one false detection per image on average under the null).

One edge differs from SciPy on purpose: when every entry of a window is a candidate in every
channel (``x = n``), ``P(X > n) = 0`` and SciPy's logarithm is ``-inf``, which the official
bicubic upsampling turns into NaN; here that window gets ``log10 P(X >= n) = n log10(1 - probability)``,
the smallest probability a window can show, so maps stay finite.

Everything is plain torch (the binomial tails are a small constant table indexed by the count),
so the NFA map traces into ONNX.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist

import torch
import torch.nn.functional as F

#: The ``score_kind`` of ``-log10 NFA`` scores (uflow ``score=nfa``), which ``--threshold nfa`` requires.
NFA_SCORES = "-log10 NFA"


def candidate_threshold(probability: float) -> float:
    """``tau``, the chi-square(1) quantile at ``probability``: ``Phi^-1((1 + probability) / 2)^2``
    (SciPy's ``chi2.ppf(probability, 1)``, as the official ``binomial_test``)."""
    if not 0 < probability < 1:
        raise ValueError(f"the candidate probability must lie in (0, 1), not {probability}")
    return NormalDist().inv_cdf((1 + probability) / 2) ** 2


def half_windows(window: int, scales: int) -> list[int]:
    """The half side ``h`` of each scale's window (scale 0 the finest), as the official
    ``max(int((window / 2**s) // 2), 1)``."""
    return [max(int((window / 2**scale) // 2), 1) for scale in range(scales)]


def log10_binomial_tails(n: int, p: float) -> list[float]:
    """``log10 P(X > k)`` for ``k = 0 .. n``, ``X ~ Binomial(n, p)``, in float64 from the
    log-probabilities (``lgamma``) and a log-sum-exp; ``k = n`` (probability 0) gets
    ``log10 P(X >= n)`` (see the module docstring)."""
    log_pmf = [math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * math.log(p) + (n - k) * math.log1p(-p) for k in range(n + 1)]
    tails = []
    for k in range(n + 1):
        upper = log_pmf[k + 1 :] or log_pmf[n:]
        peak = max(upper)
        tails.append((peak + math.log(sum(math.exp(v - peak) for v in upper))) / math.log(10))
    return tails


def log10_number_of_tests(latents: Sequence[torch.Tensor]) -> float:
    """``log10`` of the latent positions over all scales (the official number of tests)."""
    return math.log10(sum(z.shape[-2] * z.shape[-1] for z in latents))


def log10_window_probability(z: torch.Tensor, half_window: int, tau: float, tails: Sequence[float]) -> torch.Tensor:
    """``log10 P(X > x)`` ``[B, 1, h, w]`` for one scale's latent ``z`` ``[B, C, h, w]``: ``x`` the
    candidates (``z^2 >= tau``) in the ``(2 half_window + 1)^2`` window around each position
    (reflect padding), summed over channels and divided by ``C``; ``tails`` from
    :func:`log10_binomial_tails` for that window's ``n``."""
    side = 2 * half_window + 1
    if len(tails) != side * side + 1:
        raise ValueError(f"a {side} x {side} window needs {side * side + 1} binomial tails, got {len(tails)}")
    if min(z.shape[-2:]) <= half_window:
        raise ValueError(f"a {tuple(z.shape[-2:])} latent map is too small for reflect padding by {half_window} (its sides must exceed it)")
    candidates = (z.float().pow(2) >= tau).float().sum(dim=1, keepdim=True)
    padded = F.pad(candidates, [half_window] * 4, mode="reflect")
    counts = F.conv2d(padded, torch.ones(1, 1, side, side, device=z.device)).round()
    index = torch.floor(counts / z.shape[1]).long()
    return torch.tensor(tails, dtype=torch.float32, device=z.device)[index]


def log10_nfa_map(latents: Sequence[torch.Tensor], size: tuple[int, int], window: int = 5, probability: float = 0.9) -> torch.Tensor:
    """``log10 NFA`` ``[B, H, W]`` at ``size`` from the latents ``[B, C_s, h_s, w_s]`` (finest
    first): the scales' window log-probabilities upsampled bicubically (``align_corners=True``),
    added, plus ``log10`` of the number of tests. Detections: values below ``log10 epsilon``."""
    tau = candidate_threshold(probability)
    total = None
    for z, half in zip(latents, half_windows(window, len(latents))):
        side = 2 * half + 1
        level = log10_window_probability(z, half, tau, log10_binomial_tails(side * side, 1 - probability))
        upsampled = F.interpolate(level, size=size, mode="bicubic", align_corners=True)
        total = upsampled if total is None else total + upsampled
    if total is None:
        raise ValueError("the NFA needs at least one latent map")
    return (total + log10_number_of_tests(latents)).squeeze(1)
