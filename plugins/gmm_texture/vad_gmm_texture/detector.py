"""The GMM-based texture inspection model (Böttger and Ulrich, "Real-time texture error
detection on textured surfaces with compressed sensing", Pattern Recognition and Image Analysis
26(1), 2016; HALCON's texture inspection model) with the settings of the MVTec AD paper
(Bergmann et al., IJCV 2021; Bergmann's thesis, Ch. 4.6.1).

The paper's setting, followed here: images converted to gray and zoomed to 400 x 400; a
four-level image pyramid; on each level a Gaussian mixture with dense covariance matrices over
the 7 x 7 gray-value patches, trained on at most 50 randomly selected training images; the
anomaly map of a level is the negative log-likelihood of every pixel's patch; each level's
scores are standardised to mean 0 and std 1 on anomaly-free validation images; the map is the
mean of the standardised levels (upsampled to the input size), the image score its maximum.

What neither the paper nor HALCON's documentation states, and what we chose:

* the number of mixture components (HALCON chooses it internally): ``components`` = 10;
* the EM settings: HALCON ``train_class_gmm``'s defaults (at most 100 iterations, threshold
  0.001, 1e-4 added to the covariance diagonals) as scikit-learn's ``max_iter``, ``tol`` and
  ``reg_covar``, on features standardised per dimension (HALCON's GMM preprocessing
  ``'normalization'``); HALCON's threshold is on the relative change of the error,
  scikit-learn's on the absolute change of the mean log-likelihood; k-means initialisation,
  seeded; HALCON starts from a maximum number of centres and prunes, scikit-learn keeps all;
* the pyramid: 2 x 2 block means per level; patches at the borders are mirrored;
* the validation images: ``normalization_fraction`` (10 %, the thesis' seeded validation split
  of MVTec AD) of the training images are held out from the mixtures and give the levels' mean
  and std (with one training image, that image gives them);
* the patches the mixtures see: at most ``max_samples`` (50,000) per level, drawn at random and
  spread evenly over the images (HALCON's optimised training uses every pixel; scikit-learn's
  EM on 50,000 49-dimensional samples with 10 components takes about 0.5 s of CPU per
  iteration, on one BLAS thread);
* "compressed sensing": Böttger and Ulrich describe patches through random measurements;
  ``projection_dim`` projects each patch vector with a seeded Gaussian random matrix to that
  many dimensions; the default (None) keeps the p x p gray values (HALCON: "the dimension of the
  single GMMs is determined by the size of the feature patches").

vad's map post-processing blurs with sigma 4 by default; the paper's maps are not blurred:
``vad run --sigma 0`` keeps them (image scores are the unblurred maximum either way). The
mixtures are fitted with scikit-learn and stored as tensors; scoring is plain torch (convolutions
and a log-sum-exp) and exports to ONNX. The model is shift-invariant: it scores images of any
size whose top pyramid level still holds a patch. ``image_size`` is the square input (vad passes
``--image-size S`` through; rectangular inputs need ``--tile``).

No feature source: the model's only representation is the raw patch vector (a 7 x 7 gray
window), which any feature head can take from the pixels itself.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from vad.contracts import Detector, Prediction, Preprocessing, State
from vad.errors import VadError
from vad.options import option
from vad.progress import info, warn
from vad_gmm_texture.model import TextureScorer, patch_features, pyramid, to_gray

#: Version of the saved state; bump when the meaning of the saved tensors changes.
STATE_VERSION = 1
#: The MVTec AD paper's input: gray, zoomed to 400 x 400.
PAPER_SIZE = 400
#: Floor of a feature's standard deviation (a flat texture).
STD_FLOOR = 1e-6


class GmmTexture(Detector):
    """A Gaussian mixture per pyramid level over small gray-value patches; the anomaly map is the
    patches' negative log-likelihood, standardised per level and averaged over levels."""

    name = "gmm-texture"
    input = "images"
    produces_maps = True
    training_passes = 1
    #: EM per pyramid level is minutes on a CPU: ``auto`` calibration holds images out rather
    #: than fitting five more models.
    cheap_to_refit = False

    class Options(Detector.Options):
        image_size: int = option(PAPER_SIZE, "Square input side the images are zoomed to (MVTec AD paper: 400); --image-size S sets it.", ge=8)
        levels: int = option(4, "Image pyramid levels, each half the size of the previous (MVTec AD paper: 4).", ge=1)
        patch_size: int = option(7, "Side of the square gray-value patch on every level (MVTec AD paper: 7).", ge=3, rule=(lambda v: v % 2 == 1, "odd"))
        components: int = option(10, "Gaussian components per level, dense covariances (not stated by the paper; HALCON chooses it).", ge=1)
        projection_dim: int | None = option(None, "Random Gaussian projection of each patch vector to this many dimensions (compressed sensing); null: the raw patch (p*p values).", ge=1)
        max_images: int = option(50, "Training images the mixtures see at most, a seeded random choice (MVTec AD paper: 50).", ge=1)
        max_samples: int = option(50_000, "Patches per level the EM sees at most, drawn at random over those images.", ge=1)
        normalization_fraction: float = option(0.1, "Share of training images held out to standardise each level's scores (paper: a validation set); 0: all images, in-sample.", ge=0, lt=1)
        max_iter: int = option(100, "EM iterations at most (HALCON train_class_gmm: 100).", ge=1)
        tol: float = option(1e-3, "EM stops when the mean log-likelihood gains less (HALCON: 0.001).", gt=0)
        regularize: float = option(1e-4, "Added to the covariance diagonals of the standardised features (HALCON: 0.0001).", gt=0)
        seed: int = option(0, "Seed of the image choice, the hold-out, the patch draw, the projection and the EM initialisation.")

        def check(self) -> None:
            if self.projection_dim is not None and self.projection_dim > self.patch_size**2:
                raise self.invalid("projection_dim", f"at most patch_size^2 = {self.patch_size**2} (a projection compresses the patch)")
            if self.max_samples < self.components:
                raise self.invalid("max_samples", f"at least components = {self.components}")
            smallest = self.patch_size * 2 ** (self.levels - 1)
            if self.image_size < smallest:
                raise self.invalid("image_size", f"at least patch_size * 2^(levels - 1) = {smallest}, so the top pyramid level holds a patch")

    tiny_options: ClassVar[dict[str, Any]] = {"image_size": 64, "components": 2, "max_samples": 2000}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        size = self.options.image_size
        self.preprocessing = Preprocessing(size=(size, size), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), interpolation="bilinear")
        self.params: dict[str, torch.Tensor] | None = None
        self.fit_info: dict[str, Any] = {}
        self._scorer: TextureScorer | None = None

    @property
    def dim(self) -> int:
        """Dimension of the patch features: ``projection_dim`` or ``patch_size^2``."""
        return self.options.projection_dim or self.options.patch_size**2

    # ------------------------------------------------------------------ device / state

    @property
    def fitted(self) -> bool:
        """True once ``fit`` or ``load_state`` gave the detector its mixtures."""
        return self.params is not None

    def to(self, device: Any) -> GmmTexture:
        """Move the mixtures to ``device``."""
        super().to(device)
        if self.params is not None:
            self.params = {name: value.to(self.device) for name, value in self.params.items()}
        self._scorer = None
        return self

    def _shapes(self) -> dict[str, tuple[int, ...]]:
        levels, k, d, p = self.options.levels, self.options.components, self.dim, self.options.patch_size
        return {
            "projection": (levels, d, p * p), "feature_mean": (levels, d), "feature_std": (levels, d),
            "means": (levels, k, d), "precisions_cholesky": (levels, k, d, d), "weights": (levels, k),
            "nll_mean": (levels,), "nll_std": (levels,),
        }

    def state(self) -> State:
        """The levels' projections, feature standardisation, mixtures and NLL statistics."""
        if self.params is None:
            raise VadError("the GMM texture model is not fitted: call fit() before saving it")
        tensors = {name: value.detach().cpu().contiguous() for name, value in self.params.items()}
        return State(meta={"gmm_texture_state_version": STATE_VERSION, **self.fit_info}, tensors=tensors)

    def load_state(self, state: State) -> None:
        """Restore saved mixtures; checks the version and every shape before changing anything."""
        version = state.meta.get("gmm_texture_state_version")
        if version != STATE_VERSION:
            raise VadError(
                f"the saved state (gmm_texture_state_version {version!r}) and the installed vad-gmm-texture "
                f"(version {STATE_VERSION}) do not fit: refit the model or install the version that saved it"
            )
        for name, shape in self._shapes().items():
            value = state.tensors.get(name)
            if value is None or tuple(value.shape) != shape:
                got = "missing" if value is None else tuple(value.shape)
                raise VadError(f"the saved tensors do not fit its options: {name!r} is {got}, expected {shape}; refit, or build the detector with the options it was saved with")
        self.params = {name: state.tensors[name].to(self.device, torch.float32) for name in self._shapes()}
        self.fit_info = {key: value for key, value in state.meta.items() if key != "gmm_texture_state_version"}
        self._scorer = None

    # ------------------------------------------------------------------ fit

    def _check(self, batch: Any, where: str) -> torch.Tensor:
        if not isinstance(batch, torch.Tensor) or batch.ndim != 4 or batch.shape[1] != 3:
            shape = tuple(batch.shape) if isinstance(batch, torch.Tensor) else type(batch).__name__
            raise VadError(f"gmm-texture {where} expects RGB image batches [B, 3, H, W] in [0, 1], got {shape}")
        height, width = int(batch.shape[-2]), int(batch.shape[-1])
        top = min(height, width) // 2 ** (self.options.levels - 1)
        if top < self.options.patch_size:
            raise VadError(
                f"{height}x{width} images leave {top} px on the top of {self.options.levels} pyramid levels, fewer than "
                f"the {self.options.patch_size}x{self.options.patch_size} patches: use larger images or fewer levels"
            )
        return batch.detach().to(self.device, torch.float32)

    def _projection(self, generator: torch.Generator) -> torch.Tensor:
        """``[d, p^2]``: the identity, or a Gaussian random matrix with entries of variance 1/d."""
        area = self.options.patch_size**2
        if self.options.projection_dim is None:
            return torch.eye(area)
        return torch.randn(self.dim, area, generator=generator) / math.sqrt(self.dim)

    def _split(self, count: int, generator: torch.Generator) -> tuple[list[int], list[int]]:
        """``(mixture images, normalisation images)`` as positions in fit order."""
        order = torch.randperm(count, generator=generator).tolist()
        held = 0 if count < 2 or self.options.normalization_fraction == 0 else min(count - 1, max(1, round(self.options.normalization_fraction * count)))
        normalization, rest = order[:held], order[held:]
        return sorted(rest[: self.options.max_images]), sorted(normalization or rest)

    def _samples(self, grays: list[torch.Tensor], level: int, projection: torch.Tensor, generator: torch.Generator) -> np.ndarray:
        """Projected patch vectors ``[n, d]`` (float64) drawn evenly over the images of one level."""
        kernel = projection.to(self.device).view(self.dim, 1, self.options.patch_size, self.options.patch_size)
        per_image = -(-self.options.max_samples // len(grays))
        rows = []
        for gray in grays:
            image = pyramid(gray, level + 1)[level]
            features = patch_features(image, kernel, None)[0].flatten(1)  # [d, h*w]
            chosen = torch.randperm(features.shape[1], generator=generator)[:per_image].to(self.device)
            rows.append(features[:, chosen].T.double().cpu())
        return torch.cat(rows)[: self.options.max_samples].numpy()

    def _fit_mixture(self, samples: np.ndarray, level: int) -> tuple[np.ndarray, ...]:
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.mixture import GaussianMixture
        from threadpoolctl import threadpool_limits

        if len(samples) < self.options.components:
            raise VadError(f"level {level} offers {len(samples)} patches for {self.options.components} mixture components: use more or larger images, or fewer components")
        mean, std = samples.mean(0), np.maximum(samples.std(0), STD_FLOOR)
        mixture = GaussianMixture(
            self.options.components, covariance_type="full", tol=self.options.tol, reg_covar=self.options.regularize,
            max_iter=self.options.max_iter, random_state=self.options.seed + level,
        )
        # one BLAS / OpenMP thread: on busy shared cores OpenBLAS' spinning threads cost >10x the CPU time
        with warnings.catch_warnings(), threadpool_limits(limits=1):
            warnings.simplefilter("ignore", ConvergenceWarning)
            mixture.fit((samples - mean) / std)
        if not mixture.converged_:
            warn(f"gmm-texture: the mixture of pyramid level {level} did not converge in {self.options.max_iter} EM iterations")
        return mean, std, mixture.means_, mixture.precisions_cholesky_, mixture.weights_

    def fit(self, batches: Iterable[torch.Tensor]) -> None:
        """Hold out the normalisation images, fit one mixture per level on patches of (at most
        ``max_images``) others, then standardise each level on the held-out images."""
        grays: list[torch.Tensor] = []
        for batch in batches:
            images = self._check(batch, "fit")
            grays.extend(to_gray(images).split(1))
        if not grays:
            raise VadError("the GMM texture model got an empty training set: it needs normal training images")
        generator = torch.Generator().manual_seed(self.options.seed)
        mixture_images, normalization_images = self._split(len(grays), generator)
        tensors: dict[str, list[torch.Tensor]] = {name: [] for name in ("projection", "feature_mean", "feature_std", "means", "precisions_cholesky", "weights")}
        for level in range(self.options.levels):
            info(f"gmm-texture: pyramid level {level + 1}/{self.options.levels}, {self.options.components} components on {len(mixture_images)} images")
            projection = self._projection(generator)
            samples = self._samples([grays[i] for i in mixture_images], level, projection, generator)
            fitted = self._fit_mixture(samples, level)
            for name, value in zip(["projection", "feature_mean", "feature_std", "means", "precisions_cholesky", "weights"], (projection, *fitted)):
                tensors[name].append(torch.as_tensor(value, dtype=torch.float32))
        params = {name: torch.stack(values).to(self.device) for name, values in tensors.items()}
        levels = self.options.levels
        params["nll_mean"], params["nll_std"] = torch.zeros(levels, device=self.device), torch.ones(levels, device=self.device)
        scorer = self._build_scorer(params)
        with torch.no_grad():
            nll = [scorer.level_nll(grays[i]) for i in normalization_images]
        for level in range(levels):
            values = torch.cat([maps[level].flatten() for maps in nll]).double()
            params["nll_mean"][level] = values.mean().float()
            params["nll_std"][level] = values.std(unbiased=False).clamp_min(STD_FLOOR).float()
        # assign only now, so a failed fit leaves the detector as it was
        self.params, self._scorer = params, None
        self.fit_info = {
            "train_images": len(grays), "mixture_images": len(mixture_images), "normalization_positions": normalization_images,
            "normalization_in_sample": not set(normalization_images).isdisjoint(mixture_images), "fit_size": list(grays[0].shape[-2:]),
        }

    # ------------------------------------------------------------------ predict

    def _build_scorer(self, params: dict[str, torch.Tensor]) -> TextureScorer:
        """The scoring module, with the patch projection and standardisation folded into conv kernels."""
        p = self.options.patch_size
        scale = params["feature_std"]
        kernels = (params["projection"] / scale[..., None]).view(self.options.levels, self.dim, 1, p, p)
        biases = -params["feature_mean"] / scale
        return TextureScorer(kernels, biases, params["means"], params["precisions_cholesky"], params["weights"], params["nll_mean"], params["nll_std"]).to(self.device).eval()

    def scorer(self) -> TextureScorer:
        """The scoring module ``predict`` runs (built once per fit, load or move)."""
        if self.params is None:
            raise VadError("the GMM texture model is not fitted: call fit() (or load a saved model) before predict()")
        if self._scorer is None:
            self._scorer = self._build_scorer(self.params)
        return self._scorer

    def predict(self, batch: torch.Tensor) -> Prediction:
        """Scores ``[B]`` (map maxima) and maps ``[B, H, W]`` at the input resolution."""
        scorer = self.scorer()
        images = self._check(batch, "predict")
        with torch.no_grad():
            scores, maps = scorer(images)
        return Prediction(scores=scores, maps=maps)

    def export_module(self) -> nn.Module:
        """The fitted scoring as a traceable module (convolutions, log-sum-exp, bilinear upsampling)."""
        return self.scorer()


__all__ = ["GmmTexture", "PAPER_SIZE", "STATE_VERSION"]
