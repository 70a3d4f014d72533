"""DFM, deep feature modeling (Ahuja, Ndiour, Kalyanpur and Tickoo, "Probabilistic Modeling of
Deep Features for Out-of-Distribution and Adversarial Detection", arXiv:1909.11786, 2019).

The method: the features of a frozen pretrained network at one layer are average pooled and
flattened into one vector per image; a PCA fitted on the training images keeps the leading
components that explain a fraction of the variance (``pca_level``, 0.97); an image is scored
either by

* ``fre`` (default): the feature reconstruction error of the authors' follow-up (Ndiour, Ahuja
  and Tickoo, "Out-of-Distribution Detection with Subspace Techniques and Probabilistic Modeling
  of Features", arXiv:2012.04250, 2020), the distance between the centred vector and its
  pre-image from the principal subspace, squared as anomalib does (the paper's L2 norm ranks
  alike): ``||x_c - V V^T x_c||^2``. Its map is the squared residual summed over the channels at
  each position of the pooled grid, and the image score is the sum of the map; or
* ``nll``: the negative log-likelihood of the PCA coordinates under the Gaussian fitted to the
  training coordinates (the paper's class-conditional Gaussian with the one normal class):
  ``0.5 * (sum_i z_i^2 / l_i + sum_i log l_i + k log 2 pi)``. Image-level only (no map).

Reference code: anomalib's ``src/anomalib/models/image/dfm`` (open-edge-platform/anomalib; its FRE
map came with PR #743 from Intel's nahuja-intel): ResNet-50 ``layer3``, ``pooling_kernel_size=4``,
``pca_level=0.97``, ``score_type="fre"``, 256 x 256 inputs.

Who does what in vad: the feature source (``vad.features.PatchFeatures``) gives the grids, so the
backbone and layer are chosen on the command line. The reference features are::

    vad run --detector dfm --backbone resnet50 --layer layer3 --aggregation 1 --image-size 256 --sigma 0

Without them vad's defaults apply (offline: EfficientNet-Lite0 ``blocks.2`` + ``blocks.4`` with
3x3 aggregation), because ResNet-50's ImageNet weights cannot be downloaded here (pass a file with
``--weights``). vad upsamples the pooled-grid map to the image and blurs it (``--sigma``, default
4; anomalib only upsamples bilinearly: ``--sigma 0``).

Where this differs from anomalib 2.7, and why:

* **Variance level.** anomalib keeps ``nonzero(cumulative >= level)[0]`` components, one fewer
  than the fewest that reach the level (its kept variance is just below ``pca_level``; a level
  the first component alone reaches keeps none). vad keeps the fewest leading components whose
  cumulative share reaches ``pca_level``, as the rule reads (scikit-learn's differs only at exact
  equality). A count is its own option
  (``pca_components``): anomalib reads any value <= 1 as a fraction.
* **NLL.** anomalib's ``nll`` path subtracts the training mean twice (in place, in ``PCA.fit`` and
  again in ``PCA.transform``), so its Gaussian is centred at ``-mean @ V`` and test coordinates
  are measured from it: it scores the uncentred projection ``x V``. It also fails with torch 2.13
  (``torch.mean(..., device=...)``). vad scores the centred coordinates, as the paper defines the
  likelihood. On centred coordinates anomalib's formula gives ``2 * NLL - k log 2 pi`` (same ranking).
* **Edges of the map.** As in anomalib, pooling drops the partial windows at the right and bottom
  of the grid and the pooled map is stretched over the whole image.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import nn

from vad.contracts import Detector, Prediction, State
from vad.errors import VadError
from vad.options import option
from vad_dfm.pca import PCA, check_grid, collect_vectors, pooled_grid, pooled_shape

#: Version of the saved state; bump when the meaning of the saved tensors changes.
DFM_STATE_VERSION = 1


class DFM(Detector):
    """DFM: PCA of pooled deep features; feature reconstruction error (with maps) or Gaussian NLL."""

    name = "dfm"
    input = "features"
    produces_maps = True  # with score_type="fre"; an nll detector says False (set in __init__)
    training_passes = 1

    class Options(Detector.Options):
        pooling_kernel_size: int = option(4, "Average pooling window (and stride) over the feature grid before flattening (anomalib 4; 1: no pooling).", ge=1)
        pca_level: float = option(0.97, "Keep the fewest leading principal components explaining this share of the variance (anomalib 0.97; anomalib keeps one fewer).", gt=0, le=1)
        pca_components: int | None = option(None, "Keep exactly this many principal components instead of pca_level (null: use pca_level).", ge=1)
        score_type: Literal["fre", "nll"] = option("fre", "fre: feature reconstruction error, with maps (anomalib default); nll: Gaussian negative log-likelihood of the PCA coordinates, image-level only.")

    #: FRE on the fake backbone's stage2 + stage3 grids of the tiny data set (2 x 2 pooled grid): measured 1.0.
    tiny_image_auroc = 0.9

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.produces_maps = self.options.score_type == "fre"  # type: ignore[misc]
        self.pca: PCA | None = None
        self.grid: tuple[int, int, int] | None = None
        self.train_images = 0

    @property
    def fitted(self) -> bool:
        """True once ``fit`` or ``load_state`` gave the detector its PCA."""
        return self.pca is not None

    def to(self, device: Any) -> DFM:
        """Move the PCA to ``device``."""
        super().to(device)
        if self.pca is not None:
            self.pca = self.pca.to(self.device)
        return self

    # ------------------------------------------------------------------ fit / predict

    def fit(self, batches: Iterable[torch.Tensor]) -> None:
        """Pool and flatten every training grid, fit the PCA (all at once: it needs every vector)."""
        vectors, grid = collect_vectors(batches, self.options.pooling_kernel_size, "DFM", self.device)
        options = self.options
        if options.pca_components is not None:
            pca = PCA.fit(vectors, components=options.pca_components, owner="DFM")
        else:
            pca = PCA.fit(vectors, level=options.pca_level, owner="DFM")
        self.pca, self.grid, self.train_images = pca, grid, int(vectors.shape[0])  # only now: a failed fit changes nothing

    def _checked(self, batch: torch.Tensor) -> torch.Tensor:
        if self.pca is None:
            raise VadError("DFM is not fitted: call fit() (or load a saved model) before predict()")
        features = check_grid(batch, "DFM", "predict").to(self.device)
        shape = (int(features.shape[1]), int(features.shape[2]), int(features.shape[3]))
        if shape != self.grid:
            raise VadError(
                f"DFM was fitted on {self.grid[0]}-channel grids of {self.grid[1:]} but got {shape[0]} channels on {shape[1:]}: "  # type: ignore[index]
                "predict with the same feature source and image size as fit"
            )
        return features

    def predict(self, batch: torch.Tensor) -> Prediction:
        """``fre``: scores ``[B]`` (total squared residual) and maps ``[B, h', w']`` on the pooled grid;
        ``nll``: scores only."""
        scores, maps = score_grids(self._checked(batch), self.pca, self.options.pooling_kernel_size, self.options.score_type)  # type: ignore[arg-type]
        return Prediction(scores=scores, maps=maps)

    def export_module(self) -> nn.Module:
        """A traceable head ``features [B, C, h, w] -> (scores [B], maps [B, h', w'] or None)``."""
        if self.pca is None:
            raise VadError("DFM is not fitted: nothing to export")
        return DFMHead(self.pca, self.options.pooling_kernel_size, self.options.score_type)

    # ------------------------------------------------------------------ state

    def state(self) -> State:
        """The PCA (mean, components, variances) and the grid it was fitted on."""
        if self.pca is None or self.grid is None:
            raise VadError("DFM is not fitted: call fit() before saving it")
        return State(
            meta={
                "dfm_state_version": DFM_STATE_VERSION,
                "grid": list(self.grid),
                "components": self.pca.count,
                "train_images": self.train_images,
            },
            tensors=self.pca.tensors(),
        )

    def load_state(self, state: State) -> None:
        """Restore a saved DFM; versions and shapes are checked before anything changes."""
        version = state.meta.get("dfm_state_version")
        if version != DFM_STATE_VERSION:
            raise VadError(
                f"this saved DFM model has dfm_state_version {version!r}, but the installed vad-dfm reads version "
                f"{DFM_STATE_VERSION}: refit the model, or install the vad-dfm version that saved it"
            )
        try:
            channels, height, width = grid = tuple(int(v) for v in state.meta["grid"])
        except (KeyError, TypeError, ValueError) as error:
            raise VadError(f"the saved DFM state lacks a valid grid ({error}); the model folder is damaged, refit the model") from error
        pca = PCA.from_tensors(state.tensors, "DFM")
        channels, height, width = pooled_shape(grid, self.options.pooling_kernel_size, "DFM")
        if pca.mean.shape[0] != channels * height * width:
            raise VadError(
                f"the saved DFM PCA has {pca.mean.shape[0]} features, but grid {list(grid)} pooled by "
                f"{self.options.pooling_kernel_size} gives {channels * height * width}: the model folder is damaged, or was saved with other options"
            )
        self.pca, self.grid = pca.to(self.device), grid
        self.train_images = int(state.meta.get("train_images", 0))


def score_grids(features: torch.Tensor, pca: PCA, kernel: int, score_type: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """DFM's scoring of grids ``[B, C, h, w]``: ``(scores [B], maps [B, h', w'])`` for ``fre``,
    ``(scores, None)`` for ``nll``. Shared by :meth:`DFM.predict` and :class:`DFMHead`."""
    pooled = pooled_grid(features, kernel)
    vectors = pooled.flatten(1)
    if score_type == "nll":
        return pca.gaussian_nll(vectors), None
    maps = pca.residual(vectors).reshape(pooled.shape).square().sum(1)
    return maps.sum((1, 2)), maps


class DFMHead(nn.Module):
    """The fitted DFM scoring as a plain module (buffers: the PCA)."""

    def __init__(self, pca: PCA, kernel: int, score_type: str) -> None:
        super().__init__()
        self.kernel, self.score_type = kernel, score_type
        self.register_buffer("mean", pca.mean)
        self.register_buffer("components", pca.components)
        self.register_buffer("variances", pca.variances)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scores and maps, as :meth:`DFM.predict`."""
        return score_grids(features, PCA(self.mean, self.components, self.variances), self.kernel, self.score_type)


__all__ = ["DFM", "DFMHead", "DFM_STATE_VERSION", "score_grids"]
