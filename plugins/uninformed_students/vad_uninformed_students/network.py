"""Uninformed Students' numerical heart (Bergmann et al., CVPR 2020; thesis §5.3.2-5.3.3), free of I/O.

:class:`UninformedStudentsModel` holds, for each patch size ``p`` (receptive field, thesis
p ∈ {17, 33, 65}), one :class:`StudentEnsemble`: a frozen teacher ``T`` and ``M`` students
``S_1 .. S_M`` (thesis M = 3), all dense Table 5.1 networks
(:class:`vad_uninformed_students.teacher.PatchNetwork`: one 128-d descriptor per pixel), plus the
fitted normalisations as buffers. It maps ImageNet-normalised images to ``(scores [B], maps
[B, H, W])`` in one traceable forward pass (ONNX export).

Formulas (a test checks each against a hand computation):

* teacher descriptors are standardised per dimension with the mean ``μ`` and std ``σ`` of the
  teacher's descriptors over every pixel of the training images (§5.3.2):
  ``ỹ_p = (y_p - μ) diag(σ)^-1``;
* student loss (Eq. 5.7): ``E(I) = 1/|D| Σ_p ||S_i(I)_p - ỹ_p||²``, averaged over the batch;
  each student has its own loss. :meth:`UninformedStudentsModel.loss` returns their **sum**
  over students and patch sizes: the parameters are disjoint and Adam's steps are per parameter,
  so one optimiser on the sum trains every student exactly as if alone (on the same image order);
* regression error (Eq. 5.8-5.10): ``e_p = ||1/M Σ_i S_i(I)_p - ỹ_p||²``;
* predictive variance (Eq. 5.11-5.12): ``v_p = 1/M Σ_i ||S_i(I)_p||² - ||1/M Σ_i S_i(I)_p||²``
  (the mixture's variance without its constant covariance term; 0 with one student); computed
  as written, one student at a time (no ``[M, B, 128, H, W]`` stack), and clamped at 0 against
  rounding;
* each term is standardised with its mean and std over every pixel of the validation images
  (§5.3.3): ``ẽ_p + ṽ_p = (e_p - e_μ) / e_σ + (v_p - v_μ) / v_σ``; the map is the mean of
  ``ẽ + ṽ`` over the patch sizes, at the input resolution (dense extraction: one value per
  pixel); the image score is the map's maximum (the thesis' aggregation in all experiments).

Until the normalisations are fitted the buffers are the identity (``μ = 0``, ``σ = 1``, ``e_μ =
v_μ = 0``, ``e_σ = v_σ = 1``). The teachers stay frozen and in eval mode whatever ``train()`` is
called with.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from vad_uninformed_students.teacher import DESCRIPTOR_DIM, PatchNetwork, descriptor_statistics

#: Lower bound of every fitted std (constant descriptors or maps stay finite).
MIN_STD = 1e-6


# --------------------------------------------------------------------------- formulas


def student_loss(student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Eq. 5.7: the squared L2 distance between a student's output and the normalised teacher
    descriptor ``[B, C, H, W]``, averaged over every pixel of every image."""
    return ((student - target) ** 2).sum(dim=1).mean()


def ensemble_scores(students: Iterable[torch.Tensor], target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Regression error ``e`` and predictive variance ``v`` ``[B, H, W]`` of the students'
    outputs (each ``[B, C, H, W]``) against the normalised teacher descriptor (Eqs. 5.8-5.12)."""
    total = squares = None
    count = 0
    for output in students:
        output = output.float()
        norms = (output**2).sum(dim=1)
        total = output if total is None else total + output
        squares = norms if squares is None else squares + norms
        count += 1
    if total is None or squares is None:
        raise ValueError("the ensemble needs at least one student")
    mean = total / count
    error = ((mean - target) ** 2).sum(dim=1)
    variance = (squares / count - (mean**2).sum(dim=1)).clamp_min(0)
    return error, variance


def standardize(values: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``(values - mean) / std``."""
    return (values - mean) / std


# --------------------------------------------------------------------------- the networks


class StudentEnsemble(nn.Module):
    """One patch size: a frozen teacher, ``students`` students of the same architecture, and the
    fitted statistics (buffers ``teacher_mean``/``teacher_std`` ``[1, 128, 1, 1]``;
    ``error_mean``/``error_std``/``variance_mean``/``variance_std`` scalars)."""

    def __init__(self, patch_size: int, students: int, slope: float = 5e-3) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.teacher = PatchNetwork(patch_size, slope)
        self.students = nn.ModuleList(PatchNetwork(patch_size, slope) for _ in range(students))
        for parameter in self.teacher.parameters():
            parameter.requires_grad_(False)
        self.register_buffer("teacher_mean", torch.zeros(1, DESCRIPTOR_DIM, 1, 1))
        self.register_buffer("teacher_std", torch.ones(1, DESCRIPTOR_DIM, 1, 1))
        for name, value in (("error_mean", 0.0), ("error_std", 1.0), ("variance_mean", 0.0), ("variance_std", 1.0)):
            self.register_buffer(name, torch.tensor(value))
        self.teacher.eval()

    def train(self, mode: bool = True) -> StudentEnsemble:
        super().train(mode)
        self.teacher.eval()  # frozen: always inference mode
        return self

    def targets(self, images: torch.Tensor) -> torch.Tensor:
        """The normalised teacher descriptors ``ỹ`` ``[B, 128, H, W]`` (no gradient)."""
        with torch.no_grad():
            return standardize(self.teacher(images).float(), self.teacher_mean, self.teacher_std)

    @torch.no_grad()
    def fit_teacher_statistics(self, batches: Sequence[torch.Tensor]) -> None:
        """``μ`` and ``σ`` of the teacher's descriptors over every pixel of ``batches``."""
        mean, std = descriptor_statistics(self.teacher, batches)
        self.teacher_mean.copy_(mean)
        self.teacher_std.copy_(std.clamp_min(MIN_STD))

    def losses(self, images: torch.Tensor) -> torch.Tensor:
        """Eq. 5.7 for each student: ``[M]``."""
        target = self.targets(images)
        return torch.stack([student_loss(student(images).float(), target) for student in self.students])

    def raw_scores(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unnormalised ``e`` and ``v`` ``[B, H, W]``."""
        return ensemble_scores((student(images) for student in self.students), self.targets(images))

    def residual(self, images: torch.Tensor) -> torch.Tensor:
        """``1/M Σ_i S_i - ỹ`` ``[B, 128, H, W]``: the regression residual whose squared norm is ``e``."""
        mean = sum(student(images).float() for student in self.students) / len(self.students)
        return mean - self.targets(images)

    @torch.no_grad()
    def fit_score_statistics(self, batches: Sequence[torch.Tensor]) -> None:
        """``e_μ, e_σ, v_μ, v_σ`` over every pixel of the (validation) ``batches``."""
        sums = torch.zeros(4, dtype=torch.float64)
        count = 0
        for batch in batches:
            error, variance = (t.double().cpu() for t in self.raw_scores(batch))
            sums += torch.stack([error.sum(), (error**2).sum(), variance.sum(), (variance**2).sum()])
            count += error.numel()
        if count == 0:
            raise ValueError("score statistics need at least one image")
        error_mean, variance_mean = sums[0] / count, sums[2] / count
        error_std = (sums[1] / count - error_mean**2).clamp_min(0).sqrt()
        variance_std = (sums[3] / count - variance_mean**2).clamp_min(0).sqrt()
        self.error_mean.fill_(float(error_mean))
        self.error_std.fill_(max(float(error_std), MIN_STD))
        self.variance_mean.fill_(float(variance_mean))
        self.variance_std.fill_(max(float(variance_std), MIN_STD))

    def normalized_scores(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``ẽ`` and ``ṽ`` ``[B, H, W]``: each term standardised with its validation statistics."""
        error, variance = self.raw_scores(images)
        return standardize(error, self.error_mean, self.error_std), standardize(variance, self.variance_mean, self.variance_std)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``ẽ + ṽ`` ``[B, H, W]``."""
        error, variance = self.normalized_scores(images)
        return error + variance


class UninformedStudentsModel(nn.Module):
    """Student ensembles for several patch sizes: ``images -> (scores [B], maps [B, H, W])``.

    State-dict keys: ``scales.p17.teacher.convs.0.weight``, ``scales.p17.students.0...``,
    ``scales.p17.teacher_mean``, ... (one :class:`StudentEnsemble` per patch size, in the order
    given; the smallest patch size is :attr:`smallest`).
    """

    def __init__(self, patch_sizes: Sequence[int], students: int = 3, slope: float = 5e-3) -> None:
        super().__init__()
        if not patch_sizes:
            raise ValueError("at least one patch size")
        self.patch_sizes = tuple(int(p) for p in patch_sizes)
        self.scales = nn.ModuleDict({f"p{p}": StudentEnsemble(p, students, slope) for p in self.patch_sizes})

    def scale(self, patch_size: int) -> StudentEnsemble:
        """The ensemble of ``patch_size``."""
        return self.scales[f"p{patch_size}"]  # type: ignore[return-value]

    @property
    def smallest(self) -> StudentEnsemble:
        """The ensemble of the smallest patch size (the feature source's cut point)."""
        return self.scale(min(self.patch_sizes))

    def student_parameters(self) -> list[nn.Parameter]:
        """Every student's parameters (what trains)."""
        return [parameter for ensemble in self.scales.values() for student in ensemble.students for parameter in student.parameters()]

    def loss(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """The sum of every student's Eq. 5.7 loss, and each patch size's mean student loss."""
        total, parts = None, {}
        for name, ensemble in self.scales.items():
            losses = ensemble.losses(images)
            parts[name] = float(losses.detach().mean())
            total = losses.sum() if total is None else total + losses.sum()
        assert total is not None
        return total, parts

    def anomaly_map(self, images: torch.Tensor) -> torch.Tensor:
        """``1/L Σ_l (ẽ^(l) + ṽ^(l))`` ``[B, H, W]`` at the input resolution."""
        maps = [ensemble(images) for ensemble in self.scales.values()]
        return sum(maps) / len(maps)  # type: ignore[return-value]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores ``[B]`` (the map's maximum) and maps ``[B, H, W]``."""
        maps = self.anomaly_map(images)
        return maps.flatten(1).amax(dim=1), maps
