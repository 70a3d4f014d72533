"""Losses and scores of the reconstruction detectors: SSIM (DRAEM's official ``loss.py``, with the
stabilising constants as an option for the SSIM autoencoder), the focal loss of DRAEM and DSR, and
their mean-filtered maximum image score; plain functions."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gaussian_window(size: int = 11, sigma: float = 1.5, channels: int = 1, device=None, dtype=torch.float32) -> torch.Tensor:
    """Normalised 2-D Gaussian ``[channels, 1, size, size]`` for a depthwise convolution."""
    offsets = torch.arange(size, dtype=torch.float64) - size // 2
    line = torch.exp(-(offsets**2) / (2 * sigma**2))
    line = line / line.sum()
    window = torch.outer(line, line).to(device=device, dtype=dtype)
    return window.expand(channels, 1, size, size).contiguous()


def ssim_map(
    first: torch.Tensor,
    second: torch.Tensor,
    window_size: int = 11,
    value_range: float = 1.0,
    constants: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Local SSIM ``[B, C, H, W]`` of two ``[B, C, H, W]`` batches (Gaussian window, sigma 1.5).

    As DRAEM's official ``ssim``: per-channel windows with zero padding, ``c1 = (0.01 L)^2``,
    ``c2 = (0.03 L)^2``; ``constants=(c1, c2)`` replaces them. Deviation from DRAEM: ``L`` is
    fixed (1 for [0, 1] images) where the official code guesses it from the first image's value
    range on every call.
    """
    channels = int(first.shape[1])  # a Python int, also while tracing for ONNX
    window = gaussian_window(window_size, 1.5, channels, first.device, first.dtype)
    pad = window_size // 2

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, window, padding=pad, groups=channels)

    mu1, mu2 = blur(first), blur(second)
    mu1_sq, mu2_sq, mu12 = mu1 * mu1, mu2 * mu2, mu1 * mu2
    sigma1_sq = blur(first * first) - mu1_sq
    sigma2_sq = blur(second * second) - mu2_sq
    sigma12 = blur(first * second) - mu12
    c1, c2 = constants if constants is not None else ((0.01 * value_range) ** 2, (0.03 * value_range) ** 2)
    return ((2 * mu12 + c1) * (2 * sigma12 + c2)) / ((mu1_sq + mu2_sq + c1) * (sigma1_sq + sigma2_sq + c2))


def ssim_loss(reconstruction: torch.Tensor, target: torch.Tensor, window_size: int = 11, value_range: float = 1.0) -> torch.Tensor:
    """``1 - mean(SSIM)``, the official ``SSIM`` module's loss."""
    return 1.0 - ssim_map(reconstruction, target, window_size, value_range).mean()


def focal_loss(probabilities: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, smooth: float = 1e-5) -> torch.Tensor:
    """The official ``FocalLoss()`` on softmax outputs: mean of ``-(1 - p_t)^gamma log(p_t)``.

    ``probabilities`` is ``[B, K, H, W]`` (already soft-maxed, as DRAEM passes them), ``target``
    ``[B, 1, H, W]`` class indices (the 0/1 anomaly mask). As the official code (alpha = 1 for
    every class), the one-hot target is clamped to ``[smooth / (K - 1), 1 - smooth]`` and
    ``smooth`` is added to ``p_t`` before the log.
    """
    classes = probabilities.shape[1]
    flat = probabilities.permute(0, 2, 3, 1).reshape(-1, classes)
    index = target.reshape(-1, 1).long()
    one_hot = torch.zeros_like(flat).scatter_(1, index, 1.0)
    one_hot = one_hot.clamp(smooth / (classes - 1), 1.0 - smooth)
    p_t = (one_hot * flat).sum(1) + smooth
    return (-torch.pow(1 - p_t, gamma) * torch.log(p_t)).mean()


def anomaly_score(anomaly_map: torch.Tensor, window: int = 21) -> torch.Tensor:
    """Image scores ``[B]`` of ``[B, H, W]`` maps: the maximum of the ``window x window``
    mean-filtered map (DRAEM's and DSR's official test: ``avg_pool2d(map, 21, stride=1,
    padding=10)``, zero padding counted)."""
    pooled = F.avg_pool2d(anomaly_map.unsqueeze(1), window, stride=1, padding=window // 2)
    return pooled.flatten(1).max(dim=1).values

