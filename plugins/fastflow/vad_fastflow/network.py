"""FastFlow's numerical heart (Yu et al., arXiv 2111.07677): per-scale 2D flows, loss, anomaly map.

Plain torch, free of I/O. Facts from the reference code the community and anomalib use (the
authors released none): github.com/gathierry/FastFlow, ``fastflow.py``:

* one flow per feature scale on the whole ``[C, h, w]`` map (``nf_fast_flow``): ``flow_steps``
  FrEIA ``AllInOneBlock`` affine couplings (hard channel permutations, affine clamp 2.0), whose
  subnetwork is ``conv(k) -> ReLU -> conv(k)`` with ``int(hidden_ratio * C_in)`` hidden channels
  (``subnet_conv_func``; :func:`vad_flows.coupling.conv_subnet`); ``k`` alternates 3, 1, 3, 1, ...
  from the first step, or is 3 at every step with ``conv3x3_only`` -> :func:`fast_flow`;
* before its flow, each CNN feature map goes through a trainable ``LayerNorm([C, h, w])``
  (elementwise affine): the paper does not mention it, the reference found it necessary to
  reach the paper's numbers -> :class:`FastFlowHead`;
* loss (:func:`fastflow_loss`): the sum over scales of the batch mean of
  ``1/2 sum_{c,i,j} z^2 - log|det J|``, the negative log-likelihood without its constant;
* anomaly map (:func:`anomaly_map`): per scale the probability ``exp(-mean_c z^2 / 2)`` at each
  position (mean, not sum, over the channels), its negative upsampled bilinearly
  (``align_corners=False``) to the input size, averaged over the scales; values lie in
  ``[-1, 0]``, higher is more anomalous. The image score is the map's maximum (anomalib's
  ``torch.amax``; the reference code computes no image score).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vad_flows.coupling import conv_subnet, coupling_flow, run_flow
from vad_flows.likelihood import negative_log_likelihood_loss


def flow_kernel_sizes(steps: int, conv3x3_only: bool) -> list[int]:
    """The subnetworks' kernel size at each flow step: 3 at even steps and 1 at odd ones (the
    reference's ``i % 2 == 1 -> 1``), or 3 everywhere with ``conv3x3_only``."""
    return [3 if conv3x3_only or step % 2 == 0 else 1 for step in range(steps)]


def fast_flow(dims: Sequence[int], steps: int, hidden_ratio: float, conv3x3_only: bool, clamp: float, seed: int) -> nn.Module:
    """One scale's 2D flow on ``dims = (C, h, w)``: ``steps`` affine couplings with hard
    permutations drawn from ``seed`` (the reference's ``nf_fast_flow``)."""
    subnets = [conv_subnet(kernel, hidden_ratio) for kernel in flow_kernel_sizes(steps, conv3x3_only)]
    return coupling_flow(tuple(dims), subnets, clamp=clamp, permute_soft=False, seed=seed)


def fastflow_loss(latents: Sequence[torch.Tensor], log_jac_dets: Sequence[torch.Tensor]) -> torch.Tensor:
    """The training loss: per scale the batch mean of ``1/2 |z|^2 - log|det J|``, summed over scales."""
    losses = [negative_log_likelihood_loss(z, log_jac_det) for z, log_jac_det in zip(latents, log_jac_dets, strict=True)]
    if not losses:
        raise ValueError("fastflow_loss needs at least one scale")
    return torch.stack(losses).sum()


def probability_maps(latents: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Per scale ``exp(-mean_c z^2 / 2)`` at each position, ``[B, h_l, w_l]`` in ``(0, 1]``."""
    return [torch.exp(-0.5 * z.pow(2).mean(dim=1)) for z in latents]


def anomaly_map(latents: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """Minus the per-scale probability maps upsampled bilinearly to ``size`` and averaged over
    the scales: ``[B, H, W]`` in ``[-1, 0]``."""
    maps = probability_maps(latents)
    if not maps:
        raise ValueError("anomaly_map needs at least one scale")
    upsampled = [F.interpolate(-level.unsqueeze(1), size=size, mode="bilinear", align_corners=False) for level in maps]
    return torch.cat(upsampled, dim=1).mean(dim=1)


class FastFlowHead(nn.Module):
    """The trainable part: a LayerNorm and a 2D flow per scale, for maps of ``shapes`` ``(C, h, w)``.

    The flows' weights come from torch's random state when built (the caller seeds it); the
    hard permutations of scale ``l`` are drawn from ``seed + l``.
    """

    def __init__(self, shapes: Sequence[Sequence[int]], steps: int, hidden_ratio: float, conv3x3_only: bool, clamp: float, seed: int) -> None:
        super().__init__()
        self.shapes = [tuple(int(v) for v in shape) for shape in shapes]
        self.norms = nn.ModuleList(nn.LayerNorm(list(shape), elementwise_affine=True) for shape in self.shapes)
        self.flows = nn.ModuleList(
            fast_flow(shape, steps, hidden_ratio, conv3x3_only, clamp, seed + scale) for scale, shape in enumerate(self.shapes)
        )

    def latents(self, features: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Each scale's latent map ``z`` ``[B, C, h, w]`` and ``log|det dz/dx|`` ``[B]`` (float32)."""
        if len(features) != len(self.flows):
            raise ValueError(f"FastFlowHead has {len(self.flows)} scales, got {len(features)} feature maps")
        latents, log_jac_dets = [], []
        for norm, flow, feature in zip(self.norms, self.flows, features):
            z, log_jac_det = run_flow(flow, norm(feature.float()))
            latents.append(z)
            log_jac_dets.append(log_jac_det)
        return latents, log_jac_dets


class FastFlowScorer(nn.Module):
    """A traceable ``images -> (scores [B], maps [B, H, W])`` module: the frozen backbone's
    levels (``encode``), the head's latent maps, :func:`anomaly_map` at the input size and its
    maximum as the image score."""

    def __init__(self, encode: Callable[[torch.Tensor], list[torch.Tensor]], head: FastFlowHead) -> None:
        super().__init__()
        self.encode, self.head = encode, head

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores and maps as :meth:`vad_fastflow.detector.FastFlow.predict`."""
        latents, _ = self.head.latents(self.encode(images))
        maps = anomaly_map(latents, (int(images.shape[-2]), int(images.shape[-1])))
        return maps.flatten(1).amax(dim=1), maps
