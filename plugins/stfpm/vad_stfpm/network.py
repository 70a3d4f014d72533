"""STFPM's numerical heart (Wang et al., BMVC 2021): the teacher-student pair, loss and maps.

Plain torch, free of I/O. Notation of the paper: ``F_t^l`` and ``F_s^l`` are the teacher's and
the student's feature maps at pyramid level ``l`` (``[B, C_l, h_l, w_l]``); a hat means
L2-normalised along the channels at each position (``F.normalize(x, dim=1)``, as the official
code and anomalib).

* per-position discrepancy (paper eq. 1): ``1/2 ||F^_t - F^_s||^2`` -> :func:`layer_maps`;
* the paper's loss of one image (eqs. 2-3, all level weights 1):
  ``sum_l 1/(h_l w_l) sum_ij 1/2 ||F^_t - F^_s||_ij^2`` -> :func:`image_losses`;
* the loss of a batch (:func:`stfpm_loss`): the official ``main.py`` omits the 1/2 and averages
  over the images (``sum_l mean_{b,i,j} ||F^_t - F^_s||^2`` = 2 x the batch mean of the paper's
  image loss); anomalib's ``STFPMLoss`` sums the paper's image loss over the batch
  (``0.5 / (h w) * MSELoss(reduction="sum")``). With SGD the two differ by a factor B / 2 in
  step size, so the reduction is an option;
* anomaly map (paper eq. 4, anomalib): the product over the levels of the per-level maps
  upsampled bilinearly (``align_corners=False``) to the input size -> :func:`combine_maps`;
  the image score is the maximum of that map.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

LossReduction = Literal["official", "anomalib"]


def normalized_differences(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``F^_t - F^_s`` per level, ``[B, C_l, h_l, w_l]`` (channel-wise L2 normalisation)."""
    return [F.normalize(t, dim=1) - F.normalize(s, dim=1) for t, s in zip(teacher, student, strict=True)]


def layer_maps(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Per-level discrepancy maps ``1/2 ||F^_t - F^_s||^2`` over the channels, ``[B, h_l, w_l]``."""
    return [0.5 * difference.pow(2).sum(dim=1) for difference in normalized_differences(teacher, student)]


def image_losses(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor]) -> torch.Tensor:
    """The paper's loss of each image ``[B]``: the per-level maps averaged over positions, summed over levels."""
    return torch.stack([level.mean(dim=(1, 2)) for level in layer_maps(teacher, student)]).sum(dim=0)


def stfpm_loss(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor], reduction: LossReduction = "official") -> torch.Tensor:
    """The training loss of a batch: ``official`` = 2 x the batch mean of :func:`image_losses`
    (``main.py``), ``anomalib`` = their batch sum (``STFPMLoss``); see the module docstring."""
    losses = image_losses(teacher, student)
    if reduction == "official":
        return 2.0 * losses.mean()
    if reduction == "anomalib":
        return losses.sum()
    raise ValueError(f"unknown loss reduction {reduction!r}")


def combine_maps(maps: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """Product of the per-level maps ``[B, h_l, w_l]`` after bilinear upsampling to ``size``: ``[B, H, W]``."""
    combined = None
    for level in maps:
        upsampled = F.interpolate(level.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)
        combined = upsampled if combined is None else combined * upsampled
    if combined is None:
        raise ValueError("combine_maps needs at least one level")
    return combined


def pick_levels(outputs: torch.Tensor | Sequence[torch.Tensor] | dict[str, torch.Tensor], positions: Sequence[int]) -> list[torch.Tensor]:
    """The feature maps at ``positions`` of a timm ``features_only`` network's output (list or dict)."""
    maps = list(outputs.values()) if isinstance(outputs, dict) else list(outputs)
    return [maps[p] for p in positions]


class StudentTeacher(nn.Module):
    """A frozen teacher and a trainable student of the same architecture.

    Both are feature networks returning every pyramid level (timm ``features_only``);
    ``positions`` say which levels STFPM matches. The teacher never trains: its parameters do not
    require gradients and :meth:`train` keeps it in eval mode (BatchNorm with its running
    statistics, as the official ``teacher.eval()``), whatever the mode of the pair.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, positions: Sequence[int]) -> None:
        super().__init__()
        self.teacher, self.student = teacher, student
        self.positions = list(positions)
        self.teacher.requires_grad_(False).eval()
        self.student.requires_grad_(True)

    def train(self, mode: bool = True) -> StudentTeacher:
        """Set the student's mode; the teacher stays in eval mode."""
        super().train(mode)
        self.teacher.eval()
        return self

    def features(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The chosen levels of the teacher (without gradients) and of the student."""
        with torch.no_grad():
            teacher = pick_levels(self.teacher(images), self.positions)
        return teacher, pick_levels(self.student(images), self.positions)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image scores ``[B]`` (map maximum) and anomaly maps ``[B, H, W]`` at the input size."""
        teacher, student = self.features(images)
        maps = combine_maps(layer_maps(teacher, student), tuple(images.shape[-2:]))
        return maps.flatten(1).amax(dim=1), maps
