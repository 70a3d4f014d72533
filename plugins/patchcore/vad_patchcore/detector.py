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

Bounded memory. With ``coreset_ratio < 1`` the training patches are streamed: they are buffered
up to ``coreset_chunk_patches`` (C) patches, each full chunk is reduced at once to its own
``int(C * ratio)`` coreset, and the bank is the union of the chunk coresets. With
``N <= C`` training patches this is exactly the official single selection; above, it is a
composable coreset (its covering radius is the largest of the chunks' radii), and ``C`` also
keeps each greedy pass in the CPU cache, which makes selection much faster than one pass over
all N patches per selected item. ``coreset_chunk_patches=0`` selects over all patches at once
(official behaviour, memory grows with N). Peak memory of ``fit`` (float32, D feature dims,
p = min(D, coreset_projection_dim), s = coreset_starting_points, Bp patches per batch,
r = coreset_ratio, N training patches)::

    peak_bytes ~= 4 * [2 * (C + Bp) * D        # chunk buffer and its concatenation
                       + C * (p + s + 3)       # projection, start distances, norms, minima
                       + r * N * (2 * D + 27)] # the bank + one more copy: its chunk coresets at
                                               # the concatenation, then the search index's copy

Only the last term grows with the number of training images: about twice the memory bank
itself (the index is built after the chunk coresets are freed; its build temporaries are
bounded by 16384 x L floats for L cells).
With ``coreset_ratio = 1`` the bank is every patch: ``8 * N * D`` bytes at the final
concatenation. ``predict`` holds the bank plus the search's copy of it (faiss: ``4 * M * D``;
pruned: ``4 * M * (D + 27)``, cell-sorted with its head coordinates) plus, for the torch
backend, a ``query_chunk x M`` distance block. The search index is built at the end of ``fit``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import torch

from vad.contracts import Detector, Prediction, State
from vad.errors import VadError
from vad_patchcore.coreset import approximate_greedy_coreset
from vad_patchcore.knn import BACKENDS, NearestNeighbours
from vad_patchcore.scoring import max_scores, most_anomalous, reweighted_scores

#: Version of the saved state; bump when the meaning of the saved tensors changes.
PATCHCORE_STATE_VERSION = 1

DISTANCES = ("euclidean", "squared")


def tile_order(images: int, height: int, width: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The patch rows of ``images`` grids ``height x width`` (row-major, image after image) in
    2x2 tiles: a permutation whose consecutive fours are the tiles, left to right, top to bottom
    (tiles on an odd last row or column hold two patches, or one in the corner)."""
    rows = torch.arange(height, device=device)[:, None]
    columns = torch.arange(width, device=device)[None, :]
    tile = (rows // 2) * ((width + 1) // 2) + columns // 2
    within = torch.argsort((tile * 4 + (rows % 2) * 2 + columns % 2).reshape(-1))
    return (torch.arange(images, device=device)[:, None] * (height * width) + within[None, :]).reshape(-1)


class PatchCore(Detector):
    """PatchCore memory-bank detector over patch-feature grids ``[B, D, h, w]``.

    Hyper-parameters (all JSON-safe; see the module docstring for where the paper, the official
    code and anomalib differ):

    * ``coreset_ratio`` fraction of training patches kept (1.0 keeps all);
    * ``coreset_projection_dim`` random-projection size for the selection (None/0: none);
    * ``coreset_starting_points`` random points whose mean distance initialises the greedy;
    * ``coreset_chunk_patches`` patches buffered per coreset chunk (0: one chunk; bounds memory);
    * ``num_neighbors`` k of the patch score (mean distance to the k nearest bank items);
    * ``reweight`` / ``reweight_neighbors`` the paper's Eq. 7 image score with b neighbours;
    * ``knn_backend`` "auto", "faiss" (exact), "torch" (exact, GPU on CUDA), "pruned" (exact,
      cell-pruned, the CPU default for banks >= 2048 items), "faiss-ivfpq"
      (approximate; ``ivf_lists``, ``pq_subquantizers``, ``pq_bits``, ``ivf_probe``);
    * ``distance`` "euclidean" (paper) or "squared" (official code's faiss distances);
    * ``query_chunk`` queries per block of the torch search (bounds its memory);
    * ``seed`` for the projection and the starting points.
    """

    name = "patchcore"
    input = "features"
    produces_maps = True
    training_passes = 1

    def __init__(
        self,
        coreset_ratio: float = 0.1,
        coreset_projection_dim: int | None = 128,
        coreset_starting_points: int = 10,
        coreset_chunk_patches: int = 16384,
        num_neighbors: int = 1,
        reweight: bool = False,
        reweight_neighbors: int = 9,
        knn_backend: str = "auto",
        distance: str = "euclidean",
        ivf_lists: int = 512,
        pq_subquantizers: int = 64,
        pq_bits: int = 8,
        ivf_probe: int = 8,
        query_chunk: int = 4096,
        seed: int = 0,
    ) -> None:
        if not (isinstance(coreset_ratio, (int, float)) and 0.0 < coreset_ratio <= 1.0):
            raise VadError(f"coreset_ratio must be in (0, 1] (1.0 keeps every patch), got {coreset_ratio!r}")
        for label, value, low in (
            ("coreset_starting_points", coreset_starting_points, 1),
            ("coreset_chunk_patches", coreset_chunk_patches, 0),
            ("num_neighbors", num_neighbors, 1),
            ("reweight_neighbors", reweight_neighbors, 1),
            ("ivf_lists", ivf_lists, 1),
            ("pq_subquantizers", pq_subquantizers, 1),
            ("pq_bits", pq_bits, 1),
            ("ivf_probe", ivf_probe, 1),
            ("query_chunk", query_chunk, 1),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise VadError(f"{label} must be an integer >= {low}, got {value!r}")
        if coreset_projection_dim is not None and (not isinstance(coreset_projection_dim, int) or coreset_projection_dim < 0):
            raise VadError(f"coreset_projection_dim must be a positive integer, or None/0 for no projection, got {coreset_projection_dim!r}")
        if knn_backend not in BACKENDS:
            raise VadError(f"unknown knn_backend {knn_backend!r}; choose one of {', '.join(BACKENDS)}")
        if distance not in DISTANCES:
            raise VadError(f"unknown distance {distance!r}; choose 'euclidean' (paper) or 'squared' (official code)")
        self.coreset_ratio = float(coreset_ratio)
        self.coreset_projection_dim = coreset_projection_dim or None
        self.coreset_starting_points = coreset_starting_points
        self.coreset_chunk_patches = coreset_chunk_patches
        self.num_neighbors = num_neighbors
        self.reweight = bool(reweight)
        self.reweight_neighbors = reweight_neighbors
        self.knn_backend = knn_backend
        self.distance = distance
        self.ivf = {"ivf_lists": ivf_lists, "pq_subquantizers": pq_subquantizers, "pq_bits": pq_bits, "ivf_probe": ivf_probe}
        self.query_chunk = query_chunk
        self.seed = seed
        self._hparams = {
            "coreset_ratio": self.coreset_ratio,
            "coreset_projection_dim": self.coreset_projection_dim,
            "coreset_starting_points": coreset_starting_points,
            "coreset_chunk_patches": coreset_chunk_patches,
            "num_neighbors": num_neighbors,
            "reweight": self.reweight,
            "reweight_neighbors": reweight_neighbors,
            "knn_backend": knn_backend,
            "distance": distance,
            **self.ivf,
            "query_chunk": query_chunk,
            "seed": seed,
        }
        self.memory_bank: torch.Tensor | None = None
        self.train_patches = 0
        self.train_grid: tuple[int, int] | None = None
        self._index: NearestNeighbours | None = None
        #: Seconds spent per stage (``fit_coreset``, ``fit_index``; accumulated over predicts: ``knn``, ``scoring``).
        self.timings: dict[str, float] = {}

    # ------------------------------------------------------------------ device / state

    def to(self, device: Any) -> PatchCore:
        """Move the memory bank (and the search) to ``device``."""
        super().to(device)
        if self.memory_bank is not None:
            self.memory_bank = self.memory_bank.to(self.device)
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
            tensors={"memory_bank": self.memory_bank.detach().to("cpu", torch.float32).contiguous()},
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
        self.memory_bank = bank.to(self.device, torch.float32)
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

    def fit(self, batches: Iterable[torch.Tensor]) -> None:
        """Build the memory bank from training feature grids, streaming (see the module docstring)."""
        generator = torch.Generator().manual_seed(int(self.seed))
        keep_all = self.coreset_ratio >= 1.0
        chunk = self.coreset_chunk_patches
        kept: list[torch.Tensor] = []
        buffer: list[torch.Tensor] = []
        buffered = total = 0
        dim: int | None = None
        grid: tuple[int, int] | None = None
        self.timings["fit_coreset"] = 0.0
        for batch in batches:
            patches = self._patches(batch, "fit")
            if dim is None:
                dim, grid = patches.shape[1], (int(batch.shape[2]), int(batch.shape[3]))
            elif patches.shape[1] != dim:
                raise VadError(f"training feature grids changed from {dim} to {patches.shape[1]} channels between batches")
            total += patches.shape[0]
            if keep_all:
                kept.append(patches)
                continue
            buffer.append(patches)
            buffered += patches.shape[0]
            while chunk and buffered >= chunk:
                pending = torch.cat(buffer)
                buffer = [pending[chunk:]] if pending.shape[0] > chunk else []
                buffered = pending.shape[0] - chunk
                kept.append(self._select(pending[:chunk], generator))
                del pending
        if total == 0:
            raise VadError("PatchCore got an empty training set: it needs at least one normal training image")
        if buffer:
            kept.append(self._select(torch.cat(buffer), generator))
        self.memory_bank = torch.cat(kept) if len(kept) > 1 else kept[0].clone()
        self.train_patches, self.train_grid = total, grid
        self._index = None
        del kept, buffer  # before the index adds its own copy of the bank
        start = time.perf_counter()
        self._search_index()  # built here, so the first predict does not pay for it
        self.timings["fit_index"] = time.perf_counter() - start

    def _select(self, patches: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The coreset rows of one chunk of patches (a copy, so the chunk can be freed)."""
        start = time.perf_counter()
        count = max(1, int(patches.shape[0] * self.coreset_ratio))  # official: int(N * percentage)
        indices = approximate_greedy_coreset(
            patches,
            count,
            projection_dim=self.coreset_projection_dim,
            starting_points=self.coreset_starting_points,
            generator=generator,
        )
        selected = patches[indices.to(patches.device)]
        self.timings["fit_coreset"] = self.timings.get("fit_coreset", 0.0) + time.perf_counter() - start
        return selected

    # ------------------------------------------------------------------ predict

    def _search_index(self) -> NearestNeighbours:
        if self._index is None:
            assert self.memory_bank is not None
            self._index = NearestNeighbours(
                self.memory_bank, self.knn_backend, query_chunk=self.query_chunk, seed=int(self.seed), **self.ivf
            )
        return self._index

    def predict(self, batch: torch.Tensor) -> Prediction:
        """Image scores ``[B]`` and patch-score maps ``[B, h, w]`` on the feature grid."""
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
        start = time.perf_counter()
        # searched in 2x2 tiles of neighbouring patches: the compiled pruned scan takes four
        # consecutive queries together, and a tile's four share more of the bank's blocks than
        # four patches of a row (~5% faster search on the benchmark); the result is the same
        order = tile_order(size, height, width, patches.device)
        tiled_squared, tiled_nearest = index.search(patches[order], self.num_neighbors)
        squared, nearest = torch.empty_like(tiled_squared), torch.empty_like(tiled_nearest)
        squared[order], nearest[order] = tiled_squared, tiled_nearest
        middle = time.perf_counter()
        distances = squared if self.distance == "squared" else squared.sqrt()
        patch_scores = distances.mean(1).view(size, height * width)
        if self.reweight:
            nearest_first = nearest[:, 0].view(size, height * width)
            m_star = most_anomalous(patch_scores, nearest_first)
            _, support = index.search(self.memory_bank[m_star], self.reweight_neighbors)
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
            self.memory_bank, self.num_neighbors, self.distance, self.reweight_neighbors if self.reweight else None
        )


def coreset_size(patches: int, ratio: float, chunk: int) -> int:
    """Bank size :meth:`PatchCore.fit` produces from ``patches`` training patches (chunks of ``chunk``)."""
    if ratio >= 1.0:
        return patches
    if not chunk or patches <= chunk:
        return max(1, int(patches * ratio))
    full, rest = divmod(patches, chunk)
    return full * max(1, int(chunk * ratio)) + (max(1, int(rest * ratio)) if rest else 0)


__all__ = ["PatchCore", "PATCHCORE_STATE_VERSION", "coreset_size"]
