"""Score ensembles that learn how to weigh their members, without test labels (seed 000's
"weighted, random forest etc.").

Test labels are off limits and training images are all normal, so the examples to learn from are
made: vad turns every calibration image (held out, left out or cross-fitted, as the threshold's
normals) into a synthetic anomaly with vad-augment's generators (Perlin + texture, cutout,
swirl: one chosen per image), has the members score those images exactly as the normals, and
passes both sets to :meth:`learn`. Members are first z-scored on the calibration normals as in
:mod:`vad_ensembles.scores`; what is learned works on those z-scores.

* ``learned-weights``: a weighted mean of z-scores whose weights follow each member's image
  AUROC on the calibration normals against the synthetic anomalies: ``w = max(AUROC - 0.5, 0)``,
  normalised (a member at chance gets no say). The same weights fuse the maps.
* ``stacker``: a scikit-learn model on the members' z-scored image scores, normals 0 and
  synthetic anomalies 1. ``logistic``: logistic regression; a member with a negative weight is
  dropped and the model refitted until every weight is non-negative (non-negative stacking,
  Breiman 1996: a detector whose higher score made an image look *more* normal would be fitting
  the synthetic anomalies' quirks). The image score is the logit; maps are the same linear
  function of the z-scored maps. ``forest``: a random forest with monotone-increasing
  constraints on every member; the image score is the forest's anomaly probability; maps are the
  z-scored maps weighted by the forest's impurity importances (a forest is not a pixel model).
  The forest is saved as plain arrays (no pickle) and evaluated by :func:`forest_probability`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch

from vad.contracts import Prediction, State
from vad.errors import VadError
from vad.options import option
from vad.progress import warn
from vad_ensembles.scores import CalibratedScoreEnsemble, weighted_mean

GENERATORS = ["perlin", "cutout", "swirl"]


def forest_probability(x: torch.Tensor, trees: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean leaf probability of a forest saved as padded arrays ``[T, nodes]`` (``left``,
    ``right``: child indices, -1 at leaves; ``feature``, ``threshold``: the split ``x[feature]
    <= threshold`` goes left; ``value``: the leaf's anomaly probability) for rows ``x [N, M]``."""
    left, right, feature, threshold, value = (trees[key] for key in ("left", "right", "feature", "threshold", "value"))
    count, rows = left.shape[0], x.shape[0]
    node = torch.zeros((count, rows), dtype=torch.long)
    tree = torch.arange(count)[:, None].expand(count, rows)
    for _ in range(int(trees["depth"])):
        leaf = left[tree, node] < 0
        split_feature = feature[tree, node].clamp(min=0)
        goes_left = x.T[split_feature, torch.arange(rows)[None, :].expand(count, rows)] <= threshold[tree, node]
        child = torch.where(goes_left, left[tree, node], right[tree, node])
        node = torch.where(leaf, node, child)
    return value[tree, node].mean(dim=0)


def forest_arrays(forest: Any) -> dict[str, torch.Tensor]:
    """A fitted scikit-learn forest as the padded arrays :func:`forest_probability` reads."""
    estimators = forest.estimators_
    nodes = max(e.tree_.node_count for e in estimators)

    def padded(read, fill: float, dtype: torch.dtype) -> torch.Tensor:
        out = torch.full((len(estimators), nodes), fill, dtype=dtype)
        for index, estimator in enumerate(estimators):
            values = torch.as_tensor(read(estimator.tree_))
            out[index, : values.numel()] = values.to(dtype)
        return out

    def anomaly_probability(tree: Any) -> Any:
        counts = tree.value[:, 0, :]
        return counts[:, 1] / counts.sum(axis=1)

    return {
        "left": padded(lambda t: t.children_left, -1, torch.long),
        "right": padded(lambda t: t.children_right, -1, torch.long),
        "feature": padded(lambda t: t.feature, -1, torch.long),
        "threshold": padded(lambda t: t.threshold, 0.0, torch.float64),
        "value": padded(anomaly_probability, 0.0, torch.float64),
        "depth": torch.tensor(max(e.tree_.max_depth for e in estimators)),
    }


class LearnedScoreEnsemble(CalibratedScoreEnsemble):
    """Shared part: the synthetic anomalies, the z-scored examples, the learned member weights."""

    learns_from_anomalies = True

    class Options(CalibratedScoreEnsemble.Options):
        anomalies: list[str] = option(list(GENERATORS), "Synthetic anomaly generators, one drawn per calibration image; any registered generator name.")
        anomaly_options: dict[str, dict[str, Any]] = option({}, "Options per generator name of anomalies, e.g. {cutout: {size: [0.1, 0.3]}}.")

        def check(self) -> None:
            if not self.anomalies:
                raise self.invalid("anomalies", "a non-empty list of anomaly generator names such as ['perlin', 'cutout']")
            if set(self.anomaly_options) - set(self.anomalies):
                raise self.invalid("anomaly_options", f"a mapping from names in anomalies {list(self.anomalies)} to their options")

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.weights: torch.Tensor | None = None
        self._generators: list | None = None

    def synthesize(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor | None:
        """One of ``anomalies`` applied to the image; None when its mask came out empty."""
        from vad_augment.generators import anomaly_generators, one_anomaly_each

        if self._generators is None:
            self._generators = anomaly_generators(self.options.anomalies, self.options.anomaly_options, f"ensemble {self.name!r}")
        anomalous, mask = one_anomaly_each(image, self._generators, generator, 0.0, f"ensemble {self.name!r}")
        return anomalous if bool(mask.any()) else None

    def examples(self, normal: Sequence[Prediction], anomalous: Sequence[Prediction]) -> tuple[torch.Tensor, torch.Tensor]:
        """Z-scored image scores ``[N, M]`` of normals then anomalies, and their labels ``[N]``."""
        self._check_members(normal, "learn")
        self._check_members(anomalous, "learn")
        columns = []
        for member, (good, bad) in enumerate(zip(normal, anomalous)):
            values = torch.cat([good.scores.reshape(-1), bad.scores.reshape(-1)])
            if not torch.isfinite(values).all():
                raise VadError(f"member {member} predicted non-finite scores on the calibration images or their synthetic anomalies")
            columns.append(self.transform(values, self.image_stats[member]))
        features = torch.stack(columns, dim=1)
        counts = (int(normal[0].scores.numel()), int(anomalous[0].scores.numel()))
        if min(counts) == 0:
            raise VadError(f"score ensemble {self.name!r} needs normal and synthetic anomalous calibration images, got {counts[0]} and {counts[1]}")
        labels = torch.cat([torch.zeros(counts[0]), torch.ones(counts[1])]).to(torch.int64)
        return features, labels

    def learn(self, normal_predictions: Sequence[Prediction], anomalous_predictions: Sequence[Prediction]) -> None:
        features, labels = self.examples(normal_predictions, anomalous_predictions)
        self.fit_examples(features, labels)

    def fit_examples(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Learn from z-scored examples; sets ``self.weights`` (one non-negative number per member)."""
        raise NotImplementedError

    def _learned(self) -> torch.Tensor:
        if self.weights is None:
            raise VadError(f"score ensemble {self.name!r} has not learned its weights: it needs learn() after calibrate()")
        return self.weights

    def fuse(self, stacked: torch.Tensor, present: Sequence[int]) -> torch.Tensor:
        return weighted_mean(stacked, self._learned(), present)

    def state(self) -> State:
        state = super().state()
        state.tensors["learned.weights"] = self._learned().clone()
        return state

    def load_state(self, state: State) -> None:
        if "learned.weights" not in state.tensors:
            raise VadError(f"the saved score ensemble {self.name!r} lacks its learned weights (learned.weights)")
        super().load_state(state)
        self.weights = state.tensors["learned.weights"].to(torch.float64)


class LearnedWeights(LearnedScoreEnsemble):
    """Weighted mean of z-scores, weights ``max(AUROC - 0.5, 0)`` on synthetic anomalies."""

    name = "learned-weights"

    def fit_examples(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        from sklearn.metrics import roc_auc_score

        separation = torch.tensor([roc_auc_score(labels.numpy(), features[:, m].numpy()) for m in range(features.shape[1])], dtype=torch.float64)
        weights = (separation - 0.5).clamp(min=0)
        if weights.sum() <= 0:
            warn(f"ensemble {self.name!r}: no member separates the synthetic anomalies from the normals (AUROCs {separation.tolist()}); equal weights")
            weights = torch.ones_like(weights)
        self.weights = weights / weights.sum()


class Stacker(LearnedScoreEnsemble):
    """A scikit-learn model (``logistic`` or ``forest``) on members' z-scored image scores."""

    name = "stacker"

    class Options(LearnedScoreEnsemble.Options):
        model: Literal["logistic", "forest"] = option("logistic", "logistic: non-negative logistic regression (score: logit); forest: random forest, monotone in every member (score: probability).")
        regularization: float = option(1.0, "Logistic regression's inverse L2 strength C (scikit-learn's default 1).", gt=0)
        trees: int = option(200, "Trees of the forest.", ge=1)
        depth: int = option(3, "Maximum depth of the forest's trees (shallow: few calibration images).", ge=1)
        seed: int = option(0, "Seed of the forest's bootstrap samples and feature draws.")

    tiny_options = {"trees": 8}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.linear: torch.Tensor | None = None  # logistic: [weights..., intercept] over all members
        self.trees: dict[str, torch.Tensor] | None = None

    def fit_examples(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        x, y = features.numpy(), labels.numpy()
        if self.options.model == "logistic":
            self._fit_logistic(x, y)
        else:
            self._fit_forest(x, y)

    def _fit_logistic(self, x: Any, y: Any) -> None:
        from sklearn.linear_model import LogisticRegression

        members = x.shape[1]
        kept = list(range(members))
        while True:
            model = LogisticRegression(C=self.options.regularization).fit(x[:, kept], y)
            coefficients = torch.as_tensor(model.coef_[0], dtype=torch.float64)
            if bool((coefficients >= 0).all()) or len(kept) == 1:
                break
            kept = [member for member, weight in zip(kept, coefficients.tolist()) if weight > 0] or kept[: 1]
        weights = torch.zeros(members, dtype=torch.float64)
        weights[kept] = coefficients.clamp(min=0)
        if weights.sum() <= 0:
            raise VadError("stacker: the logistic regression gives no member a positive weight; the members do not separate the synthetic anomalies")
        self.linear = torch.cat([weights, torch.tensor([float(model.intercept_[0])], dtype=torch.float64)])
        self.weights = weights / weights.sum()

    def _fit_forest(self, x: Any, y: Any) -> None:
        from sklearn.ensemble import RandomForestClassifier

        forest = RandomForestClassifier(
            n_estimators=self.options.trees, max_depth=self.options.depth, monotonic_cst=[1] * x.shape[1], random_state=self.options.seed
        ).fit(x, y)
        importances = torch.as_tensor(forest.feature_importances_, dtype=torch.float64)
        self.trees = forest_arrays(forest)
        self.weights = importances / importances.sum() if importances.sum() > 0 else torch.full_like(importances, 1 / len(importances))

    def fuse_scores(self, stacked: torch.Tensor) -> torch.Tensor:
        """Image scores from the stacked model on the members' z-scores ``[M, B]``; maps stay
        the learned-weights mean (:meth:`fuse`)."""
        self._learned()
        if self.options.model == "logistic":
            return stacked.T @ self.linear[:-1] + self.linear[-1]  # type: ignore[index]
        return forest_probability(stacked.T, self.trees)  # type: ignore[arg-type]

    def state(self) -> State:
        state = super().state()
        if self.options.model == "logistic":
            state.tensors["learned.linear"] = self.linear.clone()
        else:
            state.tensors.update({f"learned.forest.{key}": value.clone() for key, value in self.trees.items()})
        return state

    def load_state(self, state: State) -> None:
        key = "learned.linear" if self.options.model == "logistic" else "learned.forest.value"
        if key not in state.tensors:
            raise VadError(f"the saved stacker ({self.options.model}) lacks its fitted model ({key})")
        super().load_state(state)
        if self.options.model == "logistic":
            self.linear = state.tensors["learned.linear"].to(torch.float64)
        else:
            prefix = "learned.forest."
            self.trees = {k[len(prefix) :]: v for k, v in state.tensors.items() if k.startswith(prefix)}
