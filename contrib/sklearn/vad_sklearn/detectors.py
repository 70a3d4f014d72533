"""Classical anomaly detectors on globally pooled deep features (seed 003), image scores only.

Each detector pools every feature grid ``[B, C, h, w]`` from the FeatureSource to one vector
(global average pooling), optionally standardises and PCA-projects it
(:class:`vad_sklearn.pooling.VectorPreprocessor`), fits a scikit-learn estimator on the training
vectors and scores new images with the estimator's ``score_samples``, **negated** so that higher
means more anomalous. There are no anomaly maps (``produces_maps = False``): vad reports that
pixel metrics do not apply.

Registered names, estimators and what their saved state holds (no pickle):

* ``sklearn-knn``: mean distance to the k nearest training vectors (seed 003's kNN, k = 5);
  saves the training vectors;
* ``sklearn-lof``: ``LocalOutlierFactor(novelty=True)``; saves the training vectors, their
  k-distances and local reachability densities;
* ``sklearn-elliptic``: ``EllipticEnvelope`` (robust MCD Gaussian); saves location and precision;
* ``sklearn-ocsvm``: ``OneClassSVM``; saves support vectors, dual coefficients, kernel parameters;
* ``sklearn-iforest``: ``IsolationForest``; saves the training vectors, and the forest is
  refitted on load with the saved seed.

Why these states. Four estimators reduce to a few arrays that define ``score_samples`` exactly;
they are saved as tensors and scored with torch (:mod:`vad_sklearn.scoring`, checked against
scikit-learn in the tests), so loading needs neither pickle nor a refit and runs on the GPU.
An Isolation Forest is hundreds of trees whose internal arrays are scikit-learn's private
format; it is cheaper and safer to store the (pooled, preprocessed) training vectors in float64
and refit the forest on load with the saved ``seed``, which scikit-learn makes deterministic.

Hyper-parameters common to all: ``standardize`` [True] (``StandardScaler``, as seed 003),
``pca`` [None] (None = off; a variance fraction such as 0.95, seed 003's choice; or a number of
components), ``seed`` [0]. PCA is off by default because it is fitted on normal images only and
drops the directions where they do not vary, which is often where defects show up; with a few
hundred training images and 1000+ pooled channels, ``sklearn-elliptic`` needs it (see its docstring).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any, ClassVar

import numpy as np
import torch

from vad.contracts import Detector, Prediction, State
from vad.errors import VadError
from vad_sklearn import scoring
from vad_sklearn.pooling import VectorPreprocessor, global_average_pool

#: Version of the saved state; bump when the meaning of the saved tensors changes.
SKLEARN_STATE_VERSION = 1


def _positive_int(label: str, value: Any, low: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise VadError(f"{label} must be an integer >= {low}, got {value!r}")
    return value


class PooledFeatureDetector(Detector):
    """Base: pool grids to vectors, preprocess, fit an estimator, score with negated ``score_samples``.

    Subclasses set ``name``, keep their estimator options in ``self._options`` and implement
    :meth:`_fit_vectors` (returns the tensors and JSON meta to save), :meth:`_restore` and
    :meth:`score_vectors`.
    """

    input = "features"
    produces_maps = False
    training_passes = 1
    #: Fewest training images the estimator accepts.
    min_train: ClassVar[int] = 2

    def __init__(self, standardize: bool = True, pca: float | int | None = None, seed: int = 0, **options: Any) -> None:
        self.preprocessor = VectorPreprocessor(standardize, pca, seed)
        self.seed = int(seed)
        self._options = options
        self._hparams = {"standardize": bool(standardize), "pca": self.preprocessor.pca, "seed": self.seed, **options}
        self.params: dict[str, torch.Tensor] = {}
        self.meta: dict[str, Any] = {}
        self.in_channels: int | None = None

    # ------------------------------------------------------------------ subclass hooks

    def _fit_vectors(self, vectors: np.ndarray) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        raise NotImplementedError

    def _restore(self) -> None:
        """Rebuild anything not stored as tensors (after fit or load)."""

    def score_vectors(self, vectors: torch.Tensor) -> torch.Tensor:
        """Negated ``score_samples`` of preprocessed float64 vectors ``[M, D]`` -> ``[M]`` float64."""
        raise NotImplementedError

    # ------------------------------------------------------------------ fit / predict

    @property
    def fitted(self) -> bool:
        """True once ``fit`` or ``load_state`` ran."""
        return self.in_channels is not None

    def _pooled(self, features: Any, where: str) -> torch.Tensor:
        if not isinstance(features, torch.Tensor) or features.ndim != 4 or min(features.shape[1:]) < 1:
            shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise VadError(f"{self.name}.{where} expects non-empty feature grids [B, C, h, w] from a feature source, got {shape}")
        return global_average_pool(features.detach().to(self.device, torch.float64))

    def fit(self, batches: Iterable[torch.Tensor]) -> None:
        """Pool every training grid, fit the preprocessing and the estimator (vectors only are kept)."""
        pooled = [self._pooled(batch, "fit").cpu() for batch in batches]
        if not pooled:
            raise VadError(f"{self.name} got an empty training set: it needs normal training images")
        channels = {p.shape[1] for p in pooled}
        if len(channels) > 1:
            raise VadError(f"training feature grids changed channels between batches ({sorted(channels)}); use one feature source")
        vectors = torch.cat(pooled).numpy()
        if vectors.shape[0] < self.min_train:
            raise VadError(f"{self.name} needs at least {self.min_train} training images, got {vectors.shape[0]}; add normal training images")
        if not np.isfinite(vectors).all():
            raise VadError(f"{self.name}: the pooled training features contain NaN or infinity; check the feature source")
        preprocessor = VectorPreprocessor(self.preprocessor.standardize, self.preprocessor.pca, self.seed)
        transformed = preprocessor.fit(vectors)
        params, meta = self._fit_vectors(transformed)
        # assign only now, so a failed fit leaves the detector as it was
        self.preprocessor, self.params, self.meta = preprocessor, params, meta
        self.in_channels = int(vectors.shape[1])
        self.meta["train_images"] = int(vectors.shape[0])
        self.to(self.device)
        self._restore()

    def predict(self, batch: torch.Tensor) -> Prediction:
        """Image scores ``[B]`` (negated ``score_samples``; higher = more anomalous); no maps."""
        if not self.fitted:
            raise VadError(f"{self.name} is not fitted: call fit() (or load a saved model) before predict()")
        pooled = self._pooled(batch, "predict")
        if pooled.shape[1] != self.in_channels:
            raise VadError(
                f"{self.name} was fitted on {self.in_channels}-channel features but got {pooled.shape[1]}: "
                "predict with the same feature source as fit"
            )
        scores = self.score_vectors(self.preprocessor.transform(pooled))
        return Prediction(scores=scores.to(torch.float32), maps=None)

    # ------------------------------------------------------------------ device / state

    def to(self, device: Any) -> PooledFeatureDetector:
        """Move the fitted parameters to ``device``."""
        super().to(device)
        self.preprocessor.to(self.device)
        self.params = {name: value.to(self.device) for name, value in self.params.items()}
        return self

    def state(self) -> State:
        """Preprocessing and estimator parameters as float64 tensors, options as JSON."""
        if not self.fitted:
            raise VadError(f"{self.name} is not fitted: call fit() before saving it")
        tensors = {**self.preprocessor.tensors, **{f"estimator_{k}": v for k, v in self.params.items()}}
        return State(
            meta={"sklearn_state_version": SKLEARN_STATE_VERSION, "detector": self.name, "in_channels": self.in_channels, **self.meta},
            tensors={name: value.detach().cpu().contiguous() for name, value in tensors.items()},
        )

    def load_state(self, state: State) -> None:
        """Restore what :meth:`state` saved (refits nothing, except the Isolation Forest)."""
        meta = dict(state.meta)
        version = meta.pop("sklearn_state_version", None)
        if version != SKLEARN_STATE_VERSION:
            raise VadError(
                f"this saved {self.name} model has sklearn_state_version {version!r}, but the installed vad-sklearn reads "
                f"version {SKLEARN_STATE_VERSION}: refit the model, or install the vad-sklearn version that saved it"
            )
        if meta.pop("detector", self.name) != self.name:
            raise VadError(f"the saved state belongs to another detector than {self.name}; the model folder is damaged")
        channels = meta.pop("in_channels", None)
        if not isinstance(channels, int):
            raise VadError(f"the saved {self.name} state has no in_channels; the model folder is damaged")
        preprocessor = VectorPreprocessor(self.preprocessor.standardize, self.preprocessor.pca, self.seed)
        preprocessor.load(state.tensors)
        params = {k[len("estimator_") :]: v.to(torch.float64) for k, v in state.tensors.items() if k.startswith("estimator_")}
        missing = [name for name in self.saved_params if name not in params]
        if missing:
            raise VadError(f"the saved {self.name} state has no {missing[0]!r} tensor; the model folder is damaged")
        self.preprocessor, self.params, self.meta, self.in_channels = preprocessor, params, meta, channels
        self.to(self.device)
        self._restore()

    #: Names of the estimator tensors :meth:`state` saves.
    saved_params: ClassVar[tuple[str, ...]] = ()


def _quiet_fit(name: str, fit: Any) -> Any:
    """Run a scikit-learn fit; its errors become VadErrors naming the detector."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fit()
    except (ValueError, np.linalg.LinAlgError) as error:
        raise VadError(f"{name} could not be fitted on the pooled features: {error}") from error


class KNNDetector(PooledFeatureDetector):
    """Mean Euclidean distance to the ``n_neighbors`` nearest training images (pooled features).

    Seed 003's kNN on ResNet-50 features (k = 5). With ``n_neighbors = 1`` the score is the
    distance to the nearest normal image. ``n_neighbors`` above the number of training images
    uses them all. The reference for the tests is scikit-learn's ``NearestNeighbors``.
    """

    name = "sklearn-knn"
    min_train = 1
    saved_params = ("train",)

    def __init__(self, n_neighbors: int = 5, standardize: bool = True, pca: float | int | None = None, seed: int = 0) -> None:
        super().__init__(standardize, pca, seed, n_neighbors=_positive_int("n_neighbors", n_neighbors))

    def _fit_vectors(self, vectors: np.ndarray) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {"train": torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float64))}, {}

    def score_vectors(self, vectors: torch.Tensor) -> torch.Tensor:
        train = self.params["train"]
        return scoring.knn_scores(vectors, train, min(self._options["n_neighbors"], train.shape[0]))


class LOFDetector(PooledFeatureDetector):
    """Local Outlier Factor in novelty mode (``LocalOutlierFactor(novelty=True)``, Euclidean).

    ``n_neighbors`` [20] (scikit-learn's default; seed 003 searched 10-50) is capped at the
    number of training images minus one, as scikit-learn does.
    """

    name = "sklearn-lof"
    saved_params = ("train", "k_distance", "lrd")

    def __init__(self, n_neighbors: int = 20, standardize: bool = True, pca: float | int | None = None, seed: int = 0) -> None:
        super().__init__(standardize, pca, seed, n_neighbors=_positive_int("n_neighbors", n_neighbors))

    def _fit_vectors(self, vectors: np.ndarray) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        train = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float64))
        k = min(self._options["n_neighbors"], train.shape[0] - 1)
        k_distance, lrd = scoring.lof_training_statistics(train, k)
        return {"train": train, "k_distance": k_distance, "lrd": lrd}, {"neighbors_used": k}

    def score_vectors(self, vectors: torch.Tensor) -> torch.Tensor:
        p = self.params
        return scoring.lof_scores(vectors, p["train"], p["k_distance"], p["lrd"], int(self.meta["neighbors_used"]))


class EllipticDetector(PooledFeatureDetector):
    """Robust Gaussian (``EllipticEnvelope``: Minimum Covariance Determinant), squared Mahalanobis score.

    ``support_fraction`` [None = scikit-learn's default], ``assume_centered`` [False]; ``seed``
    seeds the MCD's random subsets. The MCD needs clearly more training images than feature
    dimensions: with pooled backbone features (hundreds to thousands of channels) use
    ``pca`` (e.g. 0.95, seed 003) or a small number of components.
    """

    name = "sklearn-elliptic"
    saved_params = ("location", "precision")

    def __init__(
        self,
        support_fraction: float | None = None,
        assume_centered: bool = False,
        standardize: bool = True,
        pca: float | int | None = None,
        seed: int = 0,
    ) -> None:
        if support_fraction is not None and not (isinstance(support_fraction, (int, float)) and 0 < support_fraction <= 1):
            raise VadError(f"support_fraction must be None or in (0, 1], got {support_fraction!r}")
        super().__init__(standardize, pca, seed, support_fraction=support_fraction, assume_centered=bool(assume_centered))

    def _fit_vectors(self, vectors: np.ndarray) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        from sklearn.covariance import EllipticEnvelope

        if vectors.shape[0] <= vectors.shape[1]:
            raise VadError(
                f"sklearn-elliptic fits a Gaussian of {vectors.shape[1]} dimensions on {vectors.shape[0]} training images: "
                "it needs more images than dimensions; reduce them with --set sklearn-elliptic.pca=0.95 (or a number "
                f"of components below {vectors.shape[0]})"
            )
        estimator = EllipticEnvelope(random_state=self.seed, **self._options)
        _quiet_fit(self.name, lambda: estimator.fit(vectors))
        return {
            "location": torch.from_numpy(estimator.location_.astype(np.float64)),
            "precision": torch.from_numpy(np.asarray(estimator.get_precision(), dtype=np.float64)),
        }, {}

    def score_vectors(self, vectors: torch.Tensor) -> torch.Tensor:
        return scoring.squared_mahalanobis(vectors, self.params["location"], self.params["precision"])


KERNELS = ("rbf", "linear", "poly", "sigmoid")


class OneClassSVMDetector(PooledFeatureDetector):
    """One-Class SVM (``OneClassSVM``); the score is ``-sum_i alpha_i K(sv_i, x)``.

    ``kernel`` ["rbf"], ``nu`` [0.5], ``gamma`` ["scale"], ``degree`` [3], ``coef0`` [0.0] as
    scikit-learn (seed 003 searched kernel rbf/linear/poly, gamma scale/auto, nu = 0.001).
    ``gamma="scale"`` / ``"auto"`` are resolved on the training vectors (``1 / (D * var)`` /
    ``1 / D``) and saved as a number.
    """

    name = "sklearn-ocsvm"
    saved_params = ("support_vectors", "dual_coef")

    def __init__(
        self,
        kernel: str = "rbf",
        nu: float = 0.5,
        gamma: str | float = "scale",
        degree: int = 3,
        coef0: float = 0.0,
        standardize: bool = True,
        pca: float | int | None = None,
        seed: int = 0,
    ) -> None:
        if kernel not in KERNELS:
            raise VadError(f"unknown kernel {kernel!r}; choose one of {', '.join(KERNELS)}")
        if not (isinstance(nu, (int, float)) and 0 < nu <= 1):
            raise VadError(f"nu must be in (0, 1], got {nu!r}")
        if not (gamma in ("scale", "auto") or (isinstance(gamma, (int, float)) and not isinstance(gamma, bool) and gamma > 0)):
            raise VadError(f"gamma must be 'scale', 'auto' or a positive number, got {gamma!r}")
        super().__init__(
            standardize, pca, seed, kernel=kernel, nu=float(nu), gamma=gamma, degree=_positive_int("degree", degree), coef0=float(coef0)
        )

    def _fit_vectors(self, vectors: np.ndarray) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        from sklearn.svm import OneClassSVM

        options = dict(self._options)
        gamma = options.pop("gamma")
        if gamma == "scale":
            variance = float(vectors.var())
            gamma = 1.0 / (vectors.shape[1] * variance) if variance != 0 else 1.0
        elif gamma == "auto":
            gamma = 1.0 / vectors.shape[1]
        estimator = OneClassSVM(gamma=float(gamma), **options)
        _quiet_fit(self.name, lambda: estimator.fit(vectors))
        params = {
            "support_vectors": torch.from_numpy(np.ascontiguousarray(estimator.support_vectors_, dtype=np.float64)),
            "dual_coef": torch.from_numpy(np.ascontiguousarray(estimator.dual_coef_[0], dtype=np.float64)),
        }
        return params, {"gamma_value": float(gamma), "offset": float(estimator.offset_[0])}

    def score_vectors(self, vectors: torch.Tensor) -> torch.Tensor:
        o = self._options
        return scoring.ocsvm_scores(
            vectors, self.params["support_vectors"], self.params["dual_coef"], o["kernel"], float(self.meta["gamma_value"]), o["degree"], o["coef0"]
        )


class IsolationForestDetector(PooledFeatureDetector):
    """Isolation Forest (``IsolationForest``); refitted from the saved training vectors on load.

    ``n_estimators`` [100], ``max_samples`` ["auto"], ``max_features`` [1.0] as scikit-learn
    (seed 003 searched 100-400 trees, max_samples auto/1.0, max_features 0.9/1.0); ``seed`` is
    the forest's ``random_state``, so the refit on load builds the same trees. Scoring runs on
    the CPU with scikit-learn.
    """

    name = "sklearn-iforest"
    saved_params = ("train",)

    def __init__(
        self,
        n_estimators: int = 100,
        max_samples: str | int | float = "auto",
        max_features: float = 1.0,
        standardize: bool = True,
        pca: float | int | None = None,
        seed: int = 0,
    ) -> None:
        if not (max_samples == "auto" or (isinstance(max_samples, (int, float)) and not isinstance(max_samples, bool) and max_samples > 0)):
            raise VadError(f"max_samples must be 'auto', a count >= 1 or a fraction in (0, 1], got {max_samples!r}")
        if not (isinstance(max_features, (int, float)) and 0 < max_features <= 1):
            raise VadError(f"max_features must be a fraction in (0, 1], got {max_features!r}")
        super().__init__(
            standardize, pca, seed, n_estimators=_positive_int("n_estimators", n_estimators), max_samples=max_samples, max_features=float(max_features)
        )
        self._forest: Any = None

    def _fit_vectors(self, vectors: np.ndarray) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {"train": torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float64))}, {}

    def _restore(self) -> None:
        from sklearn.ensemble import IsolationForest

        train = self.params["train"].cpu().numpy()
        forest = IsolationForest(random_state=self.seed, **self._options)
        self._forest = _quiet_fit(self.name, lambda: forest.fit(train))

    def score_vectors(self, vectors: torch.Tensor) -> torch.Tensor:
        scores = -self._forest.score_samples(vectors.cpu().numpy())
        return torch.from_numpy(np.asarray(scores, dtype=np.float64)).to(vectors.device)


DETECTORS = (KNNDetector, LOFDetector, EllipticDetector, OneClassSVMDetector, IsolationForestDetector)

__all__ = [cls.__name__ for cls in DETECTORS] + ["PooledFeatureDetector", "SKLEARN_STATE_VERSION", "DETECTORS"]
