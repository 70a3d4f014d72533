"""U-Flow's numerical heart (Tailanian, Pardo, Musé): the U-shaped normalizing flow, its loss and
likelihood map. Plain torch and FrEIA, free of I/O.

As the official ``UFlow`` (github.com/mtailanian/uflow, ``src/model.py``) and its ResNet feature
extractor (``src/feature_extraction.py``: ``ResNetFeatureExtractor``):

* each scale's backbone features pass a trainable ``LayerNorm`` over ``[C, h, w]`` (elementwise
  affine), the flow's input;
* the U, from the coarsest scale to the finest: a *flow stage* (``flow_steps`` FrEIA
  ``AllInOneBlock`` couplings, subnet ``conv(k) -> ReLU -> conv(k)`` with ``k = 3`` at even
  steps and ``k = 1`` at odd ones, hidden width ``hidden_ratio`` (1.0) times the input, affine
  clamp 2.0, hard permutations); its output of ``V`` channels is split into the first
  ``V // 8 * 4`` channels, which the i-RevNet upsampling (4 channels -> 1 at twice the side)
  carries up, and the rest, which is that scale's latent; the upsampled part is concatenated
  *after* the next finer scale's features, the next stage's input; the finest stage's whole
  output is its latent;
* the latents come finest first (the official ``output_scale_1``, ``2``, ...); the log-determinant
  sums the stages' (split, concatenation and upsampling are permutations).

Loss (official ``train.py``: ``UFlowTrainer.step``): the batch mean of
``sum_s 1/2 |z_s|^2 - log|det J|``, i.e. the negative log-likelihood over all latents.

Likelihood map (official ``UFlow.get_probability``; score ``1 - probability`` in ``train.py`` and
``evaluate.py``): per scale ``exp(-1/2 mean_c z^2)``, upsampled bilinearly
(``align_corners=False``) to the map size, averaged over the scales; the anomaly map is one minus
that, the image score its maximum.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vad_flows.coupling import conv_subnet, coupling_flow, run_flow
from vad_flows.likelihood import negative_log_likelihood_loss


def upsampled_channels(stage_channels: int) -> int:
    """Channels a stage of ``stage_channels`` sends up (before the 4 -> 1 upsampling): the official
    split's first section, ``V // 8 * 4``."""
    return stage_channels // 8 * 4


def stage_channels(feature_channels: Sequence[int]) -> list[int]:
    """Input channels of each scale's flow stage (finest first): the coarsest takes its features,
    each finer one its features plus a quarter of what the coarser stage sends up."""
    channels = [0] * len(feature_channels)
    channels[-1] = feature_channels[-1]
    for scale in reversed(range(len(feature_channels) - 1)):
        channels[scale] = feature_channels[scale] + upsampled_channels(channels[scale + 1]) // 4
    return channels


def latent_channels(feature_channels: Sequence[int]) -> list[int]:
    """Channels of each scale's latent (finest first): the finest stage's whole output, each
    coarser stage's output less what it sends up."""
    stages = stage_channels(feature_channels)
    return [stages[0]] + [c - upsampled_channels(c) for c in stages[1:]]


def check_scales(feature_channels: Sequence[int], sizes: Sequence[tuple[int, int]]) -> None:
    """A ValueError unless the scales make a U: each side twice the next coarser one's, every
    coarser stage wide enough to send channels up (8 or more) and every stage 2 or more wide."""
    if not feature_channels or len(feature_channels) != len(sizes):
        raise ValueError(f"one size per scale is needed, got {len(feature_channels)} channel counts and {len(sizes)} sizes")
    for finer, coarser in zip(sizes, sizes[1:]):
        if tuple(finer) != (2 * coarser[0], 2 * coarser[1]):
            raise ValueError(f"each scale must be twice the size of the next coarser one (the U upsamples by 2), got {list(map(tuple, sizes))}")
    stages = stage_channels(feature_channels)
    if any(c < 8 for c in stages[1:]) or min(stages) < 2:
        raise ValueError(f"the flow stages would get {stages} channels: each coarser stage needs at least 8 (it sends channels up), every stage at least 2")


class UShapedFlow(nn.Module):
    """The official U-Flow graph on features of ``feature_channels`` at ``sizes`` (finest first)."""

    def __init__(
        self,
        feature_channels: Sequence[int],
        sizes: Sequence[tuple[int, int]],
        flow_steps: int = 4,
        clamp: float = 2.0,
        hidden_ratio: float = 1.0,
        permute_soft: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_scales(feature_channels, sizes)
        self.norms = nn.ModuleList(nn.LayerNorm([c, h, w], elementwise_affine=True) for c, (h, w) in zip(feature_channels, sizes))
        subnets = [conv_subnet(3 if step % 2 == 0 else 1, hidden_ratio) for step in range(flow_steps)]
        self.stages = nn.ModuleList(
            coupling_flow((c, h, w), subnets, clamp=clamp, permute_soft=permute_soft, seed=seed + scale)
            for scale, (c, (h, w)) in enumerate(zip(stage_channels(feature_channels), sizes))
        )

    def normalize(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Each scale's features through its LayerNorm, in float32."""
        return [norm(f.float()) for norm, f in zip(self.norms, features, strict=True)]

    def flow(self, normalized: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Latents (finest first) and the log-determinant ``[B]`` of normalised features."""
        x, log_det, latents = normalized[-1], None, []
        for scale in reversed(range(len(self.stages))):
            z, stage_log_det = run_flow(self.stages[scale], x)
            log_det = stage_log_det if log_det is None else log_det + stage_log_det
            if scale == 0:
                latents.append(z)
                break
            up = upsampled_channels(z.shape[1])
            latents.append(z[:, up:])
            x = torch.cat([normalized[scale - 1], F.pixel_shuffle(z[:, :up], 2)], dim=1)
        return latents[::-1], log_det

    def forward(self, features: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Latents (finest first) and log-determinant ``[B]`` of the backbone's features."""
        return self.flow(self.normalize(features))


def uflow_loss(latents: Sequence[torch.Tensor], log_det: torch.Tensor) -> torch.Tensor:
    """The official loss: batch mean of ``sum_s 1/2 |z_s|^2 - log|det J|``."""
    return negative_log_likelihood_loss(torch.cat([z.flatten(1) for z in latents], dim=1), log_det)


def likelihood_map(latents: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """The anomaly map ``[B, H, W]``: one minus the scales' mean upsampled ``exp(-1/2 mean_c z^2)``."""
    probabilities = [
        F.interpolate(torch.exp(-0.5 * z.float().pow(2).mean(dim=1, keepdim=True)), size=size, mode="bilinear", align_corners=False)
        for z in latents
    ]
    return 1 - torch.stack(probabilities, dim=-1).mean(dim=-1).squeeze(1)
