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
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from vad.contracts import Detector, Prediction, State
from vad.errors import VadError
from vad.options import option
from vad_sklearn import scoring
from vad_sklearn.pooling import VectorPreprocessor, global_average_pool

#: Version of the saved state; bump when the meaning of the saved tensors changes.
SKLEARN_STATE_VERSION = 1


def _pca_allowed(value: float | int) -> bool:
    """``pca``: a variance fraction (a float in (0, 1)) or a number of components (an integer >= 1)."""
    return 0.0 < value < 1.0 if isinstance(value, float) else value >= 1


def _max_samples_allowed(value: float | int) -> bool:
    """``max_samples``: a count (an integer >= 1) or a fraction of the training images (a float in (0, 1])."""
    return value >= 1 if isinstance(value, int) else 0.0 < value <= 1.0


class PooledFeatureDetector(Detector):
    """Base: pool grids to vectors, preprocess, fit an estimator, score with negated ``score_samples``.

    Subclasses set ``name``, extend :class:`Options` with their estimator's options (read as
    ``self.options.<name>``) and implement :meth:`_fit_vectors` (returns the tensors and JSON
    meta to save), :meth:`_restore` and :meth:`score_vectors`.
    """

    input = "features"
    produces_maps = False
    training_passes = 1
    #: Fewest training images the estimator accepts.
    min_train: ClassVar[int] = 2

    class Options(Detector.Options):
        standardize: bool = option(True, "Standardise the pooled vectors (StandardScaler fitted on the training images, as seed 003).")
        pca: float | int | None = option(
            None,
            "PCA after standardising: null = off (default; seed 003 used 0.95), a variance fraction to keep, or a number of components.",
            rule=(_pca_allowed, "a variance fraction in (0, 1) such as 0.95 or an integer count of components >= 1"),
        )
        seed: int = option(0, "random_state of the PCA and of the estimators that draw at random (Elliptic Envelope, Isolation Forest).")

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.preprocessor = self._new_preprocessor()
        self.params: dict[str, torch.Tensor] = {}
        self.meta: dict[str, Any] = {}
        self.in_channels: int | None = None

    def _new_preprocessor(self) -> VectorPreprocessor:
        return VectorPreprocessor(self.options.standardize, self.options.pca, self.options.seed)

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
        preprocessor = self._new_preprocessor()
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
        preprocessor = self._new_preprocessor()
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
    #: Measured on vad.testing's tiny data set (fake backbone, default PatchFeatures): 1.0.
    tiny_image_auroc = 0.9

    class Options(PooledFeatureDetector.Options):
        n_neighbors: int = option(5, "Training images averaged over (seed 003: 5); more than there are uses them all.", ge=1)

    def _fit_vectors(self, vectors: np.ndarray) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {"train": torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float64))}, {}

    def score_vectors(self, vectors: torch.Tensor) -> torch.Tensor:
        train = self.params["train"]
        return scoring.knn_scores(vectors, train, min(self.options.n_neighbors, train.shape[0]))


class LOFDetector(PooledFeatureDetector):
    """Local Outlier Factor in novelty mode (``LocalOutlierFactor(novelty=True)``, Euclidean).

    ``n_neighbors`` [20] (scikit-learn's default; seed 003 searched 10-50) is capped at the
    number of training images minus one, as scikit-learn does.
    """

    name = "sklearn-lof"
    saved_params = ("train", "k_distance", "lrd")
    #: Measured on vad.testing's tiny data set (8 images: n_neighbors capped at 7): 1.0.
    tiny_image_auroc = 0.9

    class Options(PooledFeatureDetector.Options):
        n_neighbors: int = option(20, "Neighbours of the local density (scikit-learn's default; seed 003 searched 10-50); capped at training images - 1.", ge=1)

    def _fit_vectors(self, vectors: np.ndarray) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        train = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float64))
        k = min(self.options.n_neighbors, train.shape[0] - 1)
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
    #: 8 training images on the tiny data set: a Gaussian of 4 PCA components (fewer dimensions
    #: than images, as the MCD needs).
    tiny_options = {"pca": 4}
    #: No claim: 1.0 on the tiny data set, but an MCD of 8 images is fragile (median 0.78 over
    #: 20 other data / backbone seeds).
    tiny_image_auroc = None

    class Options(PooledFeatureDetector.Options):
        support_fraction: float | None = option(
            None, "Share of training images in the MCD's support; null: scikit-learn's default (n + d + 1) / 2n.", gt=0, le=1
        )
        assume_centered: bool = option(False, "Estimate the covariance around zero instead of the robust location.")

    def _fit_vectors(self, vectors: np.ndarray) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        from sklearn.covariance import EllipticEnvelope

        if vectors.shape[0] <= vectors.shape[1]:
            raise VadError(
                f"sklearn-elliptic fits a Gaussian of {vectors.shape[1]} dimensions on {vectors.shape[0]} training images: "
                "it needs more images than dimensions; reduce them with --set sklearn-elliptic.pca=0.95 (or a number "
                f"of components below {vectors.shape[0]})"
            )
        o = self.options
        estimator = EllipticEnvelope(support_fraction=o.support_fraction, assume_centered=o.assume_centered, random_state=o.seed)
        _quiet_fit(self.name, lambda: estimator.fit(vectors))
        return {
            "location": torch.from_numpy(estimator.location_.astype(np.float64)),
            "precision": torch.from_numpy(np.asarray(estimator.get_precision(), dtype=np.float64)),
        }, {}

    def score_vectors(self, vectors: torch.Tensor) -> torch.Tensor:
        return scoring.squared_mahalanobis(vectors, self.params["location"], self.params["precision"])


class OneClassSVMDetector(PooledFeatureDetector):
    """One-Class SVM (``OneClassSVM``); the score is ``-sum_i alpha_i K(sv_i, x)``.

    ``kernel`` ["rbf"], ``nu`` [0.5], ``gamma`` ["scale"], ``degree`` [3], ``coef0`` [0.0] as
    scikit-learn (seed 003 searched kernel rbf/linear/poly, gamma scale/auto, nu = 0.001).
    ``gamma="scale"`` / ``"auto"`` are resolved on the training vectors (``1 / (D * var)`` /
    ``1 / D``) and saved as a number.
    """

    name = "sklearn-ocsvm"
    saved_params = ("support_vectors", "dual_coef")
    #: Measured on vad.testing's tiny data set: 1.0.
    tiny_image_auroc = 0.9

    class Options(PooledFeatureDetector.Options):
        kernel: Literal["rbf", "linear", "poly", "sigmoid"] = option("rbf", "libsvm kernel (seed 003 searched rbf, linear, poly).")
        nu: float = option(0.5, "Upper bound on the share of training outliers (scikit-learn's default; seed 003: 0.001).", gt=0, le=1)
        gamma: Literal["scale", "auto"] | float = option(
            "scale", "Kernel coefficient: 'scale' = 1 / (D * var), 'auto' = 1 / D (resolved on the training vectors), or a number.", gt=0
        )
        degree: int = option(3, "Degree of the poly kernel.", ge=1)
        coef0: float = option(0.0, "Constant term of the poly and sigmoid kernels.")

    def _fit_vectors(self, vectors: np.ndarray) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        from sklearn.svm import OneClassSVM

        o = self.options
        gamma = o.gamma
        if gamma == "scale":
            variance = float(vectors.var())
            gamma = 1.0 / (vectors.shape[1] * variance) if variance != 0 else 1.0
        elif gamma == "auto":
            gamma = 1.0 / vectors.shape[1]
        estimator = OneClassSVM(kernel=o.kernel, nu=o.nu, gamma=float(gamma), degree=o.degree, coef0=o.coef0)
        _quiet_fit(self.name, lambda: estimator.fit(vectors))
        params = {
            "support_vectors": torch.from_numpy(np.ascontiguousarray(estimator.support_vectors_, dtype=np.float64)),
            "dual_coef": torch.from_numpy(np.ascontiguousarray(estimator.dual_coef_[0], dtype=np.float64)),
        }
        return params, {"gamma_value": float(gamma), "offset": float(estimator.offset_[0])}

    def score_vectors(self, vectors: torch.Tensor) -> torch.Tensor:
        o = self.options
        return scoring.ocsvm_scores(
            vectors, self.params["support_vectors"], self.params["dual_coef"], o.kernel, float(self.meta["gamma_value"]), o.degree, o.coef0
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
    #: No claim: 0.86 on vad.testing's tiny data set (8 training images are few for a forest).
    tiny_image_auroc = None

    class Options(PooledFeatureDetector.Options):
        n_estimators: int = option(100, "Trees in the forest (scikit-learn's default; seed 003 searched 100-400).", ge=1)
        max_samples: Literal["auto"] | int | float = option(
            "auto",
            "Training images per tree: 'auto' = min(256, all), a count, or a fraction of them.",
            rule=(_max_samples_allowed, "an integer count >= 1 or a fraction in (0, 1]"),
        )
        max_features: float = option(1.0, "Fraction of the vector's features each tree draws from (seed 003 searched 0.9, 1.0).", gt=0, le=1)

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._forest: Any = None

    def _fit_vectors(self, vectors: np.ndarray) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {"train": torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float64))}, {}

    def _restore(self) -> None:
        from sklearn.ensemble import IsolationForest

        o = self.options
        train = self.params["train"].cpu().numpy()
        forest = IsolationForest(
            n_estimators=o.n_estimators, max_samples=o.max_samples, max_features=o.max_features, random_state=o.seed
        )
        self._forest = _quiet_fit(self.name, lambda: forest.fit(train))

    def score_vectors(self, vectors: torch.Tensor) -> torch.Tensor:
        scores = -self._forest.score_samples(vectors.cpu().numpy())
        return torch.from_numpy(np.asarray(scores, dtype=np.float64)).to(vectors.device)


DETECTORS = (KNNDetector, LOFDetector, EllipticDetector, OneClassSVMDetector, IsolationForestDetector)

__all__ = [cls.__name__ for cls in DETECTORS] + ["PooledFeatureDetector", "SKLEARN_STATE_VERSION", "DETECTORS"]
