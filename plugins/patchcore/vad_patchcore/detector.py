"""PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022).

Who does what in vad:

* the FeatureSource (``vad.features.PatchFeatures``) picks the layers, aggregates each 3x3
  neighbourhood, upsamples deeper layers bilinearly to the first layer's grid and optionally
  projects: it hands this detector feature grids ``[B, D, h, w]``;
* this detector keeps a memory bank of training patches (approximate greedy coreset), scores
  each test patch by its nearest-neighbour distance to the bank and each image by the largest
  patch score (optionally re-weighted, Eq. 7); ``predict`` returns ``scores [B]`` and
  ``maps [B, h, w]`` **on the feature grid**;
* vad's post-processing (``vad.postprocess``) upsamples the maps bilinearly to the network's
  input size, smooths them with a Gaussian (sigma = 4) and resizes them to each image's
  original size. The detector does none of that.

Options where the paper, the official code (amazon-science/patchcore-inspection) and anomalib
differ (defaults in brackets):

* ``distance`` ["euclidean"]: patch score = plain L2 distance, as the paper (Eq. 6) and
  anomalib; ``"squared"`` = squared L2, what the official code reports (faiss ``IndexFlatL2``
  returns squared distances). Image AUROC is the same (monotone), maps differ in contrast.
* ``num_neighbors`` [1]: patch score = mean distance to the ``k`` nearest bank items; the paper
  and anomalib use 1, the official CLI defaults to 5 and its published configs use 1 or 3-5.
* ``reweight`` [False], ``reweight_neighbors`` [9]: the paper's Eq. 7 re-weighting of the image
  score; the official code does not apply it, anomalib does (b = 9). Off by default because the
  official code's published numbers are without it. See :mod:`vad_patchcore.scoring`.
* ``coreset_projection_dim`` [128], ``coreset_starting_points`` [10]: the official sampler's
  random linear projection and starting points (anomalib instead uses a sparse JL projection
  and one random start). See :mod:`vad_patchcore.coreset`.

Bounded memory. With ``coreset_ratio < 1`` the training patches are streamed through
:class:`~vad_patchcore.coreset.StreamingCoreset`. Up to ``coreset_chunk_patches`` (C) patches
it is exactly the official single selection. Above, it merges and reduces: every full chunk keeps
``coreset_oversample`` times the ratio as candidates, and one selection over the pooled
candidates keeps the ratio of *all* patches (the official bank size, one budget for the whole
training set). ``coreset_oversample=1`` is the union of per-chunk coresets (the default before,
which gave every chunk the same share and lost accuracy on textures);
``coreset_chunk_patches=0`` is the official selection over all patches, whose memory grows with
the training set. The measured comparison is ``benchmarks/coreset.py``; the formulas are in the
plugin's README.

Leave-one-out. Every bank row remembers the training image it came from (``bank_sources``), so
``predict_left_out`` scores a training image against the bank without its own patches: the
threshold calibration needs no held-out images (:mod:`vad.calibration`).

Region of interest. With ``vad run --roi ... --roi-mode before`` the patches outside the region
(grid cells at least half outside) are left out of the bank (``exclude_from_training``); vad
then scores inside the region only.

Search. ``knn_backend`` picks one of :mod:`vad_patchcore.knn`'s strategies: exact ones (``auto``:
the cell-pruned scan for large banks on the CPU) return the same neighbours and identical
distances; ``faiss-ivfflat`` and ``faiss-ivfpq`` trade recall for speed. The index is built at
the end of ``fit``, so the first ``predict`` does not pay for it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any, Literal

import torch
import torch.nn.functional as F

from vad.contracts import Detector, Prediction, State
from vad.errors import VadError
from vad.options import option
from vad_patchcore.coreset import StreamingCoreset, approximate_greedy_coreset
from vad_patchcore.knn import BACKENDS, NearestNeighbours
from vad_patchcore.scoring import max_scores, most_anomalous, reweighted_scores

#: Version of the saved state; bump when the meaning of the saved tensors changes.
PATCHCORE_STATE_VERSION = 1


class PatchCore(Detector):
    """PatchCore memory-bank detector over patch-feature grids ``[B, D, h, w]``.

    See the module docstring for where the paper, the official code and anomalib differ.
    """

    name = "patchcore"
    input = "features"
    produces_maps = True
    training_passes = 1
    #: A training image is scored against the bank without its own patches (leave-one-image-out).
    leave_one_out = True

    class Options(Detector.Options):
        coreset_ratio: float = option(0.1, "Fraction of training patches kept in the memory bank (1 keeps every patch).", gt=0, le=1)
        coreset_projection_dim: int | None = option(128, "Random-projection size for the coreset selection (null or 0: none; official 128).", ge=0)
        coreset_starting_points: int = option(10, "Random points whose mean distance starts the greedy selection (official 10).", ge=1)
        coreset_chunk_patches: int = option(16384, "Training patches buffered per coreset chunk; up to this many, one selection over all (official); bounds fit memory (0: always one selection over all).", ge=0)
        coreset_oversample: float = option(4.0, "Above one chunk, each chunk keeps this multiple of coreset_ratio for one final selection (1: union of per-chunk coresets).", ge=1)
        coreset_pool_patches: int = option(32768, "Most first-stage candidates pooled for one final selection; more are reduced group by group (0: no limit).", ge=0)
        num_neighbors: int = option(1, "k of the patch score: mean distance to the k nearest bank items (paper 1).", ge=1)
        reweight: bool = option(False, "The paper's Eq. 7 image-score re-weighting (the official code does not apply it).")
        reweight_neighbors: int = option(9, "b of Eq. 7: bank neighbours of the most anomalous patch's nearest item.", ge=1)
        knn_backend: str = option("auto", "Nearest-neighbour search; auto picks the fastest exact one for the device and bank; faiss-ivfflat and faiss-ivfpq are approximate.", choices=BACKENDS)
        distance: Literal["euclidean", "squared"] = option("euclidean", "Patch score: L2 distance (paper) or squared L2 (official code's faiss distances).")
        ivf_lists: int = option(512, "faiss-ivfflat / faiss-ivfpq: inverted lists (official 512; clipped to the bank size / 39).", ge=1)
        pq_subquantizers: int = option(64, "faiss-ivfpq: product-quantizer sub-vectors (official 64).", ge=1)
        pq_bits: int = option(8, "faiss-ivfpq: bits per sub-quantizer code (official 8).", ge=1)
        ivf_probe: int = option(8, "faiss-ivfflat / faiss-ivfpq: inverted lists searched per query (more: higher recall, slower).", ge=1)
        query_chunk: int = option(4096, "Queries per block of the torch search (bounds its distance matrix).", ge=1)
        seed: int = option(0, "Seed of the coreset projection and starting points.")

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.memory_bank: torch.Tensor | None = None
        #: The training image (position in fit order) each bank row came from, int64 ``[M]``;
        #: None for models saved before it was kept (they cannot score left out).
        self.bank_sources: torch.Tensor | None = None
        #: The region of interest at the input size (:meth:`exclude_from_training`), for fit only.
        self._inspected: torch.Tensor | None = None
        self.train_patches = 0
        self.train_grid: tuple[int, int] | None = None
        #: Most training patches ``fit`` held at once (buffer, candidate pool, bank; see StreamingCoreset).
        self.fit_peak_patches = 0
        self._index: NearestNeighbours | None = None
        #: Seconds spent per stage (``fit_coreset``, ``fit_index``; accumulated over predicts: ``knn``, ``scoring``).
        self.timings: dict[str, float] = {}

    # ------------------------------------------------------------------ device / state

    def to(self, device: Any) -> PatchCore:
        """Move the memory bank (and the search) to ``device``."""
        super().to(device)
        if self.memory_bank is not None:
            self.memory_bank = self.memory_bank.to(self.device)
        if self.bank_sources is not None:
            self.bank_sources = self.bank_sources.to(self.device)
        self._index = None
        return self

    @property
    def fitted(self) -> bool:
        """True once ``fit`` or ``load_state`` gave the detector a memory bank."""
        return self.memory_bank is not None

    def state(self) -> State:
        """Memory bank (float32 ``[M, D]``) and what is needed to check it when loading."""
        if self.memory_bank is None:
            raise VadError("PatchCore is not fitted: call fit() before saving it")
        return State(
            meta={
                "patchcore_state_version": PATCHCORE_STATE_VERSION,
                "feature_dim": int(self.memory_bank.shape[1]),
                "bank_size": int(self.memory_bank.shape[0]),
                "train_patches": int(self.train_patches),
                "train_grid": None if self.train_grid is None else list(self.train_grid),
            },
            tensors={
                "memory_bank": self.memory_bank.detach().to("cpu", torch.float32).contiguous(),
                **({} if self.bank_sources is None else {"bank_sources": self.bank_sources.to("cpu", torch.int64).contiguous()}),
            },
        )

    def load_state(self, state: State) -> None:
        """Restore a saved memory bank; refuses states from another ``patchcore_state_version``."""
        version = state.meta.get("patchcore_state_version")
        if version != PATCHCORE_STATE_VERSION:
            raise VadError(
                f"this saved PatchCore model has patchcore_state_version {version!r}, but the installed "
                f"vad-patchcore reads version {PATCHCORE_STATE_VERSION}: refit the model, or install the "
                "vad-patchcore version that saved it"
            )
        bank = state.tensors.get("memory_bank")
        if bank is None or bank.ndim != 2 or bank.shape[0] == 0:
            raise VadError("the saved PatchCore state has no valid 'memory_bank' tensor [M, D]; refit the model")
        expected = (state.meta.get("bank_size"), state.meta.get("feature_dim"))
        if expected != (bank.shape[0], bank.shape[1]):
            raise VadError(f"the saved PatchCore memory bank is {tuple(bank.shape)} but its metadata says {expected}; the model folder is damaged")
        sources = state.tensors.get("bank_sources")
        if sources is not None and tuple(sources.shape) != (bank.shape[0],):
            raise VadError(f"the saved PatchCore bank_sources is {tuple(sources.shape)} for a bank of {bank.shape[0]} rows; the model folder is damaged")
        self.memory_bank = bank.to(self.device, torch.float32)
        self.bank_sources = None if sources is None else sources.to(self.device, torch.int64)
        self.train_patches = int(state.meta.get("train_patches", 0))
        grid = state.meta.get("train_grid")
        self.train_grid = None if grid is None else (int(grid[0]), int(grid[1]))
        self._index = None

    # ------------------------------------------------------------------ fit

    def _patches(self, features: torch.Tensor, where: str) -> torch.Tensor:
        """``[B, D, h, w]`` grid -> ``[B*h*w, D]`` float32 rows on the detector's device, checked."""
        if not isinstance(features, torch.Tensor) or features.ndim != 4:
            shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise VadError(f"PatchCore.{where} expects feature grids [B, D, h, w] from a feature source, got {shape}")
        batch, dim, height, width = features.shape
        if height < 1 or width < 1 or dim < 1:
            raise VadError(
                f"the feature grid is {height}x{width} with {dim} channels: the images are smaller than "
                "the feature source's receptive field (at least one stride of its deepest chosen layer, "
                "e.g. 16 px for stride-16 layers); use larger images or shallower layers"
            )
        return features.detach().permute(0, 2, 3, 1).reshape(batch * height * width, dim).to(self.device, torch.float32)

    def exclude_from_training(self, inspected: torch.Tensor) -> bool:
        """Leave the patches outside a region of interest out of the memory bank: a grid cell
        counts when at least half of the input pixels it covers (area pooling) are inside."""
        self._inspected = inspected.detach().to("cpu", torch.bool)
        return True

    def _inside_cells(self, height: int, width: int) -> torch.Tensor | None:
        """Bool ``[h * w]``: the grid cells inside the region given to :meth:`exclude_from_training`."""
        if self._inspected is None:
            return None
        cover = F.interpolate(self._inspected[None, None].float(), size=(height, width), mode="area")[0, 0]
        inside = (cover >= 0.5).reshape(-1)
        if not inside.any():
            raise VadError(f"the region of interest covers no cell of PatchCore's {height}x{width} feature grid: enlarge it")
        return inside

    def fit(self, batches: Iterable[torch.Tensor]) -> None:
        """Build the memory bank from training feature grids, streaming (see the module docstring)."""
        generator = torch.Generator().manual_seed(self.options.seed)
        stream = StreamingCoreset(
            self.options.coreset_ratio,
            self.options.coreset_chunk_patches,
            self.options.coreset_oversample,
            self.options.coreset_pool_patches,
            lambda rows, count: self._select(rows, count, generator),
        )
        dim: int | None = None
        grid: tuple[int, int] | None = None
        images = 0
        self.timings["fit_coreset"] = 0.0
        for batch in batches:
            patches = self._patches(batch, "fit")
            if dim is None:
                dim, grid = patches.shape[1], (int(batch.shape[2]), int(batch.shape[3]))
            elif patches.shape[1] != dim:
                raise VadError(f"training feature grids changed from {dim} to {patches.shape[1]} channels between batches")
            owners = torch.arange(images, images + batch.shape[0], device=patches.device).repeat_interleave(batch.shape[2] * batch.shape[3])
            images += int(batch.shape[0])
            inside = self._inside_cells(int(batch.shape[2]), int(batch.shape[3]))
            if inside is not None:
                keep = inside.to(patches.device).repeat(int(batch.shape[0]))
                patches, owners = patches[keep], owners[keep]
            stream.add(patches, owners)
        if stream.total == 0:
            raise VadError("PatchCore got an empty training set: it needs at least one normal training image")
        self.memory_bank, self.bank_sources = stream.finish()
        self.train_patches, self.train_grid = stream.total, grid
        self.fit_peak_patches = stream.peak_held
        self._index = None
        del stream  # before the index adds its own copy of the bank
        start = time.perf_counter()
        self._search_index()  # built here, so the first predict does not pay for it
        self.timings["fit_index"] = time.perf_counter() - start

    def _select(self, patches: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
        """Indices of ``count`` coreset rows of ``patches``."""
        start = time.perf_counter()
        indices = approximate_greedy_coreset(
            patches,
            count,
            projection_dim=self.options.coreset_projection_dim or None,
            starting_points=self.options.coreset_starting_points,
            generator=generator,
        )
        self.timings["fit_coreset"] = self.timings.get("fit_coreset", 0.0) + time.perf_counter() - start
        return indices

    # ------------------------------------------------------------------ predict

    def _search_index(self) -> NearestNeighbours:
        if self._index is None:
            assert self.memory_bank is not None
            self._index = NearestNeighbours(
                self.memory_bank, self.options.knn_backend, query_chunk=self.options.query_chunk, seed=self.options.seed, **self._ivf_options()
            )
        return self._index

    def _ivf_options(self) -> dict[str, int]:
        names = ("ivf_lists", "pq_subquantizers", "pq_bits", "ivf_probe")
        return {name: getattr(self.options, name) for name in names}

    def predict(self, batch: torch.Tensor) -> Prediction:
        """Image scores ``[B]`` and patch-score maps ``[B, h, w]`` on the feature grid."""
        return self._predict(batch, None)

    def predict_left_out(self, batch: torch.Tensor, indices: torch.Tensor) -> Prediction:
        """Training images (``indices``: their positions in fit order) scored against the bank
        without their own patches, and with Eq. 7 re-weighting, without their own patches in
        ``N_b(m*)`` either."""
        if self.memory_bank is not None and self.bank_sources is None:
            raise VadError("this PatchCore model was saved without the source image of each bank row, so it cannot score training images as left out; refit it")
        if len(indices) != batch.shape[0]:
            raise VadError(f"predict_left_out got {len(indices)} indices for {batch.shape[0]} images")
        return self._predict(batch, indices.to(torch.int64))

    def _predict(self, batch: torch.Tensor, left_out: torch.Tensor | None) -> Prediction:
        if self.memory_bank is None:
            raise VadError("PatchCore is not fitted: call fit() (or load a saved model) before predict()")
        patches = self._patches(batch, "predict")
        if patches.shape[1] != self.memory_bank.shape[1]:
            raise VadError(
                f"PatchCore was fitted on {self.memory_bank.shape[1]}-dim features but got "
                f"{patches.shape[1]}-dim ones: predict with the same feature source (layers, projections) as fit"
            )
        size, _, height, width = batch.shape
        index = self._search_index()
        owners = None if left_out is None else left_out.to(self.device)
        start = time.perf_counter()
        if owners is None:
            squared, nearest = index.search(patches, self.options.num_neighbors)
        else:
            squared, nearest = index.search_excluding(patches, owners.repeat_interleave(height * width), self.bank_sources, self.options.num_neighbors)
        middle = time.perf_counter()
        distances = squared if self.options.distance == "squared" else squared.sqrt()
        patch_scores = distances.mean(1).view(size, height * width)
        if self.options.reweight:
            nearest_first = nearest[:, 0].view(size, height * width)
            m_star = most_anomalous(patch_scores, nearest_first)
            if owners is None:
                _, support = index.search(self.memory_bank[m_star], self.options.reweight_neighbors)
            else:
                _, support = index.search_excluding(self.memory_bank[m_star], owners, self.bank_sources, self.options.reweight_neighbors)
            scores = reweighted_scores(
                patch_scores, nearest_first, patches.view(size, height * width, -1), self.memory_bank, support
            )
        else:
            scores = max_scores(patch_scores)
        self.timings["knn"] = self.timings.get("knn", 0.0) + middle - start
        self.timings["scoring"] = self.timings.get("scoring", 0.0) + time.perf_counter() - middle
        return Prediction(scores=scores, maps=patch_scores.view(size, height, width))

    def export_module(self) -> torch.nn.Module | None:
        """The scoring as one traceable module with the bank as a constant (exact search), or
        None before fit."""
        if self.memory_bank is None:
            return None
        from vad_patchcore.export import PatchCoreHead

        return PatchCoreHead(
            self.memory_bank, self.options.num_neighbors, self.options.distance, self.options.reweight_neighbors if self.options.reweight else None
        )


def coreset_size(patches: int, ratio: float, chunk: int, oversample: float | None = None) -> int:
    """Bank size :meth:`PatchCore.fit` produces from ``patches`` training patches (its
    ``coreset_chunk_patches`` ``chunk`` and ``coreset_oversample`` ``oversample``, default
    the option's)."""
    if oversample is None:
        oversample = PatchCore.Options.fields()["coreset_oversample"][2]
    if ratio >= 1.0:
        return patches
    if not chunk or patches <= chunk or oversample > 1.0:
        return max(1, int(patches * ratio))  # official; the two-stage selection keeps the same size
    full, rest = divmod(patches, chunk)  # oversample 1: the union of the chunks' coresets
    return full * max(1, int(chunk * ratio)) + (max(1, int(rest * ratio)) if rest else 0)


__all__ = ["PatchCore", "PATCHCORE_STATE_VERSION", "coreset_size"]
