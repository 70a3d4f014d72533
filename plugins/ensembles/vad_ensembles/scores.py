"""Score-level ensembles: fuse the predictions of several fitted detectors.

Members' raw scores live on unrelated scales (a kNN distance, a negated discriminator logit,
...), so each member is first *calibrated*: :meth:`calibrate` receives one Prediction per member
computed on held-out **training normals** (vad's validation split), and stores per-member
statistics. Test predictions are then transformed with those statistics only, sample by sample:
the fused value of an image never depends on the other test images. (The official PatchCore
ensemble instead min-max normalises each member over the *test set*, which is transductive.)

* ``score-mean`` / ``score-max`` / ``weighted``: z-scores with the member's validation mean and
  standard deviation (image scores and map values separately), then the mean, the maximum, or a
  weighted mean (``weights``: one non-negative number per member, normalised to sum 1).
* ``rank-mean``: each value becomes its rank in the member's validation distribution (the
  mid-rank empirical CDF, linearly interpolated, in [0, 1]); the ranks are averaged. Beyond
  the largest (smallest) validation value the rank keeps rising (falling) by one per validation
  standard deviation, so anomalies stronger than every normal stay ordered instead of all
  tying at 1. Map values are ranked against up to ``map_quantiles`` quantiles of the
  validation map values (a seeded sample of at most ``MAX_MAP_VALUES`` values).

Maps: members may predict maps on different grids; each is transformed on its own grid, then
resized bilinearly to the largest grid before fusing. Members without maps are left out of the
map fusion; if no member has maps, the fused prediction has none.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from vad.contracts import Prediction, ScoreEnsembler, State
from vad.errors import VadError
from vad.options import REQUIRED, option

#: Validation map values used to build a member's rank table, at most (seeded sample).
MAX_MAP_VALUES = 1_000_000


def _as_float64(values: torch.Tensor) -> torch.Tensor:
    return values.detach().to(device="cpu", dtype=torch.float64)


def _spread(values: torch.Tensor) -> float:
    """Standard deviation, or 1 when it is 0 or undefined (constant or single values)."""
    std = float(values.std()) if values.numel() > 1 else 0.0
    return std if std > 0 and torch.isfinite(torch.tensor(std)) else 1.0


def rank_table(values: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct sorted ``values`` and their mean CDF position (ties share a mid-rank)."""
    order = torch.argsort(values)
    values, positions = values[order], positions[order]
    distinct, inverse = torch.unique_consecutive(values, return_inverse=True)
    summed = torch.zeros(distinct.numel(), dtype=torch.float64).index_add_(0, inverse, positions)
    counts = torch.zeros(distinct.numel(), dtype=torch.float64).index_add_(0, inverse, torch.ones_like(positions))
    return distinct, summed / counts


def rank(values: torch.Tensor, table_x: torch.Tensor, table_p: torch.Tensor, spread: float) -> torch.Tensor:
    """Piecewise-linear empirical CDF of ``values``; linear tails of slope ``1 / spread`` outside."""
    x = _as_float64(values)
    if table_x.numel() == 1:
        return table_p[0] + (x - table_x[0]) / spread
    right = torch.searchsorted(table_x, x, right=True).clamp(1, table_x.numel() - 1)
    x0, x1 = table_x[right - 1], table_x[right]
    p0, p1 = table_p[right - 1], table_p[right]
    inside = p0 + (x - x0) / (x1 - x0) * (p1 - p0)
    below = table_p[0] + (x - table_x[0]) / spread
    above = table_p[-1] + (x - table_x[-1]) / spread
    return torch.where(x < table_x[0], below, torch.where(x > table_x[-1], above, inside))


def weighted_mean(stacked: torch.Tensor, weights: torch.Tensor, present: Sequence[int]) -> torch.Tensor:
    """Mean of the calibrated values ``[M', ...]`` of the members ``present`` with their
    ``weights`` (one per member of the ensemble) renormalised to sum 1 over those present."""
    weights = weights[list(present)]
    if weights.sum() <= 0:
        raise VadError("every member with anomaly maps has weight 0: the fused map is undefined")
    return torch.einsum("m,m...->...", weights / weights.sum(), stacked)


def _resize_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


class CalibratedScoreEnsemble(ScoreEnsembler):
    """Per-member calibration on validation normals, then an elementwise fusion of members."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.members: int | None = None
        self.image_stats: list[dict[str, torch.Tensor]] = []
        self.map_stats: list[dict[str, torch.Tensor] | None] = []

    # ------------------------------------------------------------------ calibration

    def _check_members(self, predictions: Sequence[Prediction], when: str) -> None:
        if len(predictions) < 2:
            raise VadError(f"score ensemble {self.name!r} needs at least two members (detectors), got {len(predictions)}")
        if when != "calibrate" and len(predictions) != self.members:
            raise VadError(
                f"score ensemble {self.name!r} was calibrated on {self.members} members but {when} got {len(predictions)}"
            )

    def calibrate(self, member_predictions: Sequence[Prediction]) -> None:
        """Store each member's statistics from its predictions on validation normals.

        Statistics are computed aside and stored only when every member succeeded.
        """
        self._check_members(member_predictions, "calibrate")
        image_stats, map_stats = [], []
        for index, prediction in enumerate(member_predictions):
            scores = _as_float64(prediction.scores).reshape(-1)
            if scores.numel() == 0:
                raise VadError(f"member {index} has no validation predictions to calibrate on")
            if not torch.isfinite(scores).all():
                raise VadError(f"member {index} predicted non-finite validation scores; cannot calibrate the ensemble")
            image_stats.append(self.statistics(scores, seed=index))
            if prediction.maps is None:
                map_stats.append(None)
            else:
                values = _as_float64(prediction.maps).reshape(-1)
                map_stats.append(self.statistics(values, seed=1000 + index))
        self._check_options(len(member_predictions))
        self.image_stats, self.map_stats = image_stats, map_stats
        self.members = len(member_predictions)

    def statistics(self, values: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
        """Mean and standard deviation (z-score calibration)."""
        return {"mean": values.mean().reshape(1), "std": torch.tensor([_spread(values)], dtype=torch.float64)}

    def transform(self, values: torch.Tensor, stats: dict[str, torch.Tensor]) -> torch.Tensor:
        """Calibrated values (float64, CPU)."""
        return (_as_float64(values) - stats["mean"]) / stats["std"]

    def _check_options(self, members: int) -> None:
        """Check the options against the number of members (none to check by default)."""

    # ------------------------------------------------------------------ fusion

    def fuse(self, stacked: torch.Tensor, present: Sequence[int]) -> torch.Tensor:
        """Fuse calibrated values ``[M, ...]`` of the members ``present`` (indices)."""
        raise NotImplementedError

    def fuse_scores(self, stacked: torch.Tensor) -> torch.Tensor:
        """Fuse every member's calibrated image scores ``[M, B]`` (default: as :meth:`fuse`)."""
        return self.fuse(stacked, list(range(stacked.shape[0])))

    def combine(self, member_predictions: Sequence[Prediction]) -> Prediction:
        """Fuse one batch: calibrated scores (and maps) of every member, then :meth:`fuse`."""
        if self.members is None:
            raise VadError(f"score ensemble {self.name!r} must be calibrated on validation normals before combine()")
        self._check_members(member_predictions, "combine")
        sizes = {int(p.scores.reshape(-1).numel()) for p in member_predictions}
        if len(sizes) != 1:
            raise VadError(f"members predicted different numbers of images for one batch: {sorted(sizes)}")
        device = member_predictions[0].scores.device
        scores = torch.stack(
            [self.transform(p.scores.reshape(-1), s) for p, s in zip(member_predictions, self.image_stats)]
        )
        fused_scores = self.fuse_scores(scores)

        present = [i for i, p in enumerate(member_predictions) if p.maps is not None and self.map_stats[i] is not None]
        fused_maps = None
        if present:
            calibrated = [self.transform(member_predictions[i].maps, self.map_stats[i]) for i in present]  # type: ignore[arg-type]
            size = max((tuple(m.shape[-2:]) for m in calibrated), key=lambda s: s[0] * s[1])
            fused_maps = self.fuse(torch.stack([_resize_maps(m, size) for m in calibrated]), present)
            fused_maps = fused_maps.to(device=device, dtype=torch.float32)
        return Prediction(fused_scores.to(device=device, dtype=torch.float32), fused_maps)

    # ------------------------------------------------------------------ state

    def state(self) -> State:
        """Per-member statistics as tensors ``member{i}.image.*`` / ``member{i}.map.*``."""
        if self.members is None:
            raise VadError(f"score ensemble {self.name!r} has not been calibrated; nothing to save")
        tensors: dict[str, torch.Tensor] = {}
        for index in range(self.members):
            for key, value in self.image_stats[index].items():
                tensors[f"member{index}.image.{key}"] = value.clone()
            for key, value in (self.map_stats[index] or {}).items():
                tensors[f"member{index}.map.{key}"] = value.clone()
        return State(meta={"members": self.members, "has_maps": [s is not None for s in self.map_stats]}, tensors=tensors)

    def load_state(self, state: State) -> None:
        """Restore the statistics saved by :meth:`state`."""
        members = state.meta.get("members")
        has_maps = state.meta.get("has_maps")
        if not isinstance(members, int) or not isinstance(has_maps, list) or len(has_maps) != members:
            raise VadError(f"the saved score ensemble {self.name!r} has no valid calibration metadata")

        def collect(prefix: str) -> dict[str, torch.Tensor]:
            found = {k[len(prefix) :]: v.to(torch.float64) for k, v in state.tensors.items() if k.startswith(prefix)}
            if not found:
                raise VadError(f"the saved score ensemble {self.name!r} lacks tensors {prefix}*")
            return found

        self.image_stats = [collect(f"member{i}.image.") for i in range(members)]
        self.map_stats = [collect(f"member{i}.map.") if has_maps[i] else None for i in range(members)]
        self._check_options(members)
        self.members = members


class ScoreMean(CalibratedScoreEnsemble):
    """Mean of members' z-scores (validation-normal mean/std per member)."""

    name = "score-mean"

    def fuse(self, stacked: torch.Tensor, present: Sequence[int]) -> torch.Tensor:
        return stacked.mean(dim=0)


class ScoreMax(CalibratedScoreEnsemble):
    """Maximum of members' z-scores (validation-normal mean/std per member)."""

    name = "score-max"

    def fuse(self, stacked: torch.Tensor, present: Sequence[int]) -> torch.Tensor:
        return stacked.max(dim=0).values


class WeightedScores(CalibratedScoreEnsemble):
    """Weighted mean of members' z-scores; ``weights``: one non-negative number per member."""

    name = "weighted"

    class Options(CalibratedScoreEnsemble.Options):
        weights: list[float] = option(REQUIRED, "One non-negative weight per member (normalised to sum 1), e.g. [2, 1].", ge=0)

        def check(self) -> None:
            if not sum(self.weights) > 0:
                raise self.invalid("weights", "non-negative numbers with a positive sum, one per member")

    tiny_options = {"weights": [2.0, 1.0]}

    def _check_options(self, members: int) -> None:
        if len(self.options.weights) != members:
            raise self.options.invalid("weights", f"one number per member: {len(self.options.weights)} weights for {members} members")

    def fuse(self, stacked: torch.Tensor, present: Sequence[int]) -> torch.Tensor:
        return weighted_mean(stacked, torch.tensor(self.options.weights, dtype=torch.float64), present)


class RankMean(CalibratedScoreEnsemble):
    """Mean of members' ranks in their validation-normal distributions (empirical CDF).

    ``map_quantiles``: size of each member's rank table for map values.
    """

    name = "rank-mean"

    class Options(CalibratedScoreEnsemble.Options):
        map_quantiles: int = option(1001, "Size of each member's rank table for map values (quantiles of its validation map values).", ge=2)

    def statistics(self, values: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
        """A rank table: sorted distinct values with CDF positions, and the spread for the tails."""
        spread = torch.tensor([_spread(values)], dtype=torch.float64)
        if values.numel() <= self.options.map_quantiles:
            positions = (torch.arange(values.numel(), dtype=torch.float64) + 0.5) / values.numel()
            x, p = rank_table(values, positions[torch.argsort(torch.argsort(values))])
        else:
            if values.numel() > MAX_MAP_VALUES:
                generator = torch.Generator().manual_seed(seed)
                values = values[torch.randperm(values.numel(), generator=generator)[:MAX_MAP_VALUES]]
            levels = torch.linspace(0.0, 1.0, self.options.map_quantiles, dtype=torch.float64)
            x, p = rank_table(torch.quantile(values, levels), levels)
        return {"x": x, "p": p, "spread": spread}

    def transform(self, values: torch.Tensor, stats: dict[str, torch.Tensor]) -> torch.Tensor:
        return rank(values, stats["x"], stats["p"], float(stats["spread"]))

    def fuse(self, stacked: torch.Tensor, present: Sequence[int]) -> torch.Tensor:
        return stacked.mean(dim=0)
