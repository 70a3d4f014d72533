"""AST's numerical heart (Rudolph et al., WACV 2023): teacher flow, student, losses and maps.

Plain torch and FrEIA, free of I/O. Every fact is from the official code
(github.com/marco-rudolph/AST; files named where used):

* the **teacher** (``model.py``, ``get_nf``; ``freia_funcs.py``) is a normalizing flow of
  ``n_coupling_blocks`` (4) blocks, each a fixed random channel permutation (NumPy seed ``k`` for
  block ``k``) followed by a GLOW coupling (``glow_coupling_layer_cond``: both halves are
  transformed affinely in turn, ``y1 = e(s2(x2)) x1 + t2(x2)``, then
  ``y2 = e(s1(y1)) x2 + t1(y1)``), with the soft clamp ``log e(s) = clamp * 0.636 * atan(s /
  clamp)`` (clamp 1.9). Each subnetwork (``F_conv``) is ``conv(k) -> ReLU -> conv(k)`` with
  replicate padding and 64 hidden channels, its output multiplied by a learned scalar ``gamma``
  initialised at 0 (each coupling starts as the identity); ``k`` is 3 for every block but the
  last, which has 5. Every subnetwork also reads the positional encoding (32 channels), appended
  to its input: :func:`teacher_flow`, built from FrEIA's ``PermuteRandom`` and
  ``GLOWCouplingBlock``, which compute the same functions;
* the **student** (``model.py``, ``Student`` and ``res_block``; the asymmetric student) is
  ``conv3x3(C + 32 -> 1024) -> LeakyReLU``, four residual blocks
  ``x + LeakyReLU(BN(conv3x3(LeakyReLU(BN(conv3x3(x))))))``, and ``conv3x3(1024 -> C)``, reading
  the positional encoding and the features concatenated in that order: :class:`Student`;
* the **teacher loss** (``utils.py``, ``get_nf_loss`` without a foreground mask) is the mean over
  positions of ``|z|^2 / 2 - log|det J|`` (per position), averaged over the batch:
  :func:`teacher_loss`; the **student loss** (``get_st_loss``) is the mean squared difference
  between the teacher's and the student's outputs: :func:`student_loss`;
* the **anomaly map** (``eval.py``) is, per position, the mean over channels of
  ``(z_t - z_s)^2`` (:func:`distance_maps`), upsampled bicubically by 8 (from the 24 x 24 grid to
  192 px, a quarter of the 768 px input); the image score is the mean of the map before
  upsampling ("mean over maps") or the maximum after it ("max over maps"): :func:`score_maps`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from vad_flows.coupling import atan_clamp, gated_conv_subnet, glow_flow, run_flow
from vad_flows.likelihood import negative_log_likelihood_loss, positional_encoding_2d

ScoreAggregation = Literal["mean", "max"]


# --------------------------------------------------------------------------- the teacher flow


def teacher_kernel_sizes(blocks: int) -> list[int]:
    """The official ``kernel_sizes``: 3 for every coupling but the last, which has 5."""
    return [3] * (blocks - 1) + [5]


def teacher_flow(channels: int, grid: tuple[int, int], *, blocks: int, clamp: float, hidden: int, condition_channels: int):
    """AST's teacher: :func:`glow_flow` with the official subnetworks and soft clamp, conditioned
    on ``condition_channels`` of positional encoding (none when 0)."""
    subnets = [gated_conv_subnet(hidden, k) for k in teacher_kernel_sizes(blocks)]
    condition = (condition_channels, *grid) if condition_channels else None
    return glow_flow((channels, *grid), subnets, clamp=clamp, clamp_activation=atan_clamp(clamp), condition_dims=condition)


# --------------------------------------------------------------------------- the student


class ResidualBlock(nn.Module):
    """The official ``res_block``: ``x + act(BN(conv3x3(act(BN(conv3x3(x))))))``, LeakyReLU 0.01."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.l1 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.l2 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.bn1 = nn.BatchNorm2d(channels)
        self.bn2 = nn.BatchNorm2d(channels)
        self.act = nn.LeakyReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.bn1(self.l1(x)))
        y = self.act(self.bn2(self.l2(y)))
        return y + x


class Student(nn.Module):
    """The official asymmetric student: ``conv3x3 -> LeakyReLU``, ``blocks`` residual blocks of
    ``hidden`` channels, ``conv3x3`` to the teacher's channels (the official class also holds a
    ``gamma`` parameter that its forward never uses; it is left out)."""

    def __init__(self, channels_in: int, channels_out: int, hidden: int, blocks: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, hidden, kernel_size=3, padding=1)
        self.res = nn.ModuleList(ResidualBlock(hidden) for _ in range(blocks))
        self.conv2 = nn.Conv2d(hidden, channels_out, kernel_size=3, padding=1)
        self.act = nn.LeakyReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.conv1(x))
        for block in self.res:
            x = block(x)
        return self.conv2(x)


# --------------------------------------------------------------------------- losses and maps


def teacher_loss(z: torch.Tensor, log_jac_det: torch.Tensor) -> torch.Tensor:
    """Official ``get_nf_loss``: the batch mean of ``mean over positions of (|z|^2 / 2 - log|det
    J|)``. The flow's log-determinant is the sum of the per-position ones, so this is the
    per-sample negative log-likelihood (without its constant) divided by the positions."""
    positions = z.shape[-2] * z.shape[-1]
    return negative_log_likelihood_loss(z, log_jac_det) / positions


def student_loss(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """Official ``get_st_loss``: the mean of ``(z_t - z_s)^2`` over channels, positions and images."""
    return (teacher - student).pow(2).mean()


def distance_maps(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """Per-position anomaly map ``[B, h, w]``: the mean over channels of ``(z_t - z_s)^2``
    (official ``get_st_loss(per_pixel=True)``)."""
    return (teacher - student).pow(2).mean(dim=1)


def score_maps(maps: torch.Tensor, size: tuple[int, int], aggregation: ScoreAggregation) -> tuple[torch.Tensor, torch.Tensor]:
    """Image scores ``[B]`` and the maps upsampled bicubically to ``size`` ``[B, *size]``
    (official ``eval.py``): ``mean`` is the mean of the map before upsampling, ``max`` the maximum
    after it."""
    upsampled = F.interpolate(maps.unsqueeze(1), size=size, mode="bicubic", align_corners=False).squeeze(1)
    if aggregation == "mean":
        scores = maps.mean(dim=(1, 2))
    elif aggregation == "max":
        scores = upsampled.amax(dim=(1, 2))
    else:
        raise ValueError(f"unknown score aggregation {aggregation!r}")
    return scores, upsampled


# --------------------------------------------------------------------------- the pair


class LayerOutput(nn.Module):
    """The output of one named module of ``network``, caught by a forward hook that lives only
    while the network runs: the feature map of a backbone layer that is not among its returned
    ones, such as EfficientNet's ``blocks.5``."""

    def __init__(self, network: nn.Module, layer: str) -> None:
        super().__init__()
        if not layer or layer not in dict(network.named_modules()):
            raise ValueError(f"LayerOutput: the network has no module {layer!r}")
        self.network, self.layer = network, layer

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        caught: list[torch.Tensor] = []
        handle = self.network.get_submodule(self.layer).register_forward_hook(lambda module, inputs, output: caught.append(output))
        try:
            self.network(images)
        finally:
            handle.remove()
        return caught[0]


class AstModel(nn.Module):
    """The frozen feature extractor, the teacher flow and the student.

    ``images -> (scores [B], maps [B, *map_size])``. The extractor never trains: its parameters
    do not require gradients and :meth:`train` keeps it in eval mode. The positional encoding of
    the feature grid is a fixed buffer, rebuilt rather than saved.
    """

    def __init__(
        self,
        extractor: nn.Module,
        channels: int,
        grid: tuple[int, int],
        *,
        coupling_blocks: int,
        clamp: float,
        teacher_hidden: int,
        student_hidden: int,
        student_blocks: int,
        pos_enc_dim: int,
        map_size: tuple[int, int],
        score: ScoreAggregation,
    ) -> None:
        super().__init__()
        self.extractor = extractor.requires_grad_(False).eval()
        self.teacher = teacher_flow(channels, grid, blocks=coupling_blocks, clamp=clamp, hidden=teacher_hidden, condition_channels=pos_enc_dim)
        self.student = Student(channels + pos_enc_dim, channels, student_hidden, student_blocks)
        position = positional_encoding_2d(pos_enc_dim, *grid).unsqueeze(0) if pos_enc_dim else torch.zeros(1, 0, *grid)
        self.register_buffer("position", position, persistent=False)
        self.map_size, self.score = tuple(map_size), score

    def train(self, mode: bool = True) -> AstModel:
        """Set the teacher's and student's mode; the extractor stays in eval mode."""
        super().train(mode)
        self.extractor.eval()
        return self

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The extractor's feature map ``[B, C, h, w]`` (without gradients)."""
        with torch.no_grad():
            return self.extractor(images).float()

    def _condition(self, features: torch.Tensor) -> torch.Tensor:
        return self.position.expand(features.shape[0], -1, -1, -1)

    def teacher_latents(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z_t, log|det J|)`` of the teacher flow, in float32 (``run_flow``)."""
        condition = self._condition(features) if self.position.shape[1] else None
        return run_flow(self.teacher, features, condition)

    def student_latents(self, features: torch.Tensor) -> torch.Tensor:
        """The student's regression of ``z_t``: it reads ``[positional encoding, features]``."""
        return self.student(torch.cat([self._condition(features), features], dim=1))

    def latents(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z_t, z_s)`` of a batch of images, both float32."""
        features = self.features(images)
        teacher, _ = self.teacher_latents(features)
        return teacher, self.student_latents(features).float()

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        teacher, student = self.latents(images)
        return score_maps(distance_maps(teacher, student), self.map_size, self.score)
