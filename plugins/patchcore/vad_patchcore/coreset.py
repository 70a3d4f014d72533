"""Approximate greedy coreset (k-center) selection, as in the official PatchCore sampler.

The official ``ApproximateGreedyCoresetSampler`` (amazon-science/patchcore-inspection,
``sampler.py``) does, on the ``[N, D]`` patch features:

1. project them with a random ``Linear(D, 128, bias=False)`` (default PyTorch init, i.e.
   ``U(-1/sqrt(D), 1/sqrt(D))``), skipped when ``D == 128``;
2. draw ``number_of_starting_points=10`` distinct random points and initialise every point's
   "distance to the coreset" with its *mean* Euclidean distance to them (the starting points
   themselves are not added to the coreset);
3. repeat ``int(N * percentage)`` times: select the point with the largest distance, then lower
   every point's distance to ``min(distance, ||x - selected||)``.

:func:`approximate_greedy_coreset` returns exactly that selection (same indices for the same
projection matrix and starting points). Its cost is ``count`` passes over ``[N, 128]``, so
over all N training patches it grows as ``N^2`` and holds every patch: :class:`StreamingCoreset`
(the detector's default above ``coreset_chunk_patches`` patches) selects in two stages over
bounded chunks and pools instead.

Deviation from the official code, documented: when ``D <= projection_dim`` no projection is
done (the official code projects *up* to 128 dims when ``D < 128``, which only adds noise).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

def random_projection(dim_in: int, dim_out: int, generator: torch.Generator, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[dim_in, dim_out]`` matrix drawn like ``torch.nn.Linear(dim_in, dim_out).weight.T``.

    ``nn.Linear``'s default init is Kaiming-uniform with ``a = sqrt(5)``, i.e. uniform on
    ``[-1/sqrt(dim_in), 1/sqrt(dim_in)]``; drawn here from ``generator`` (on the CPU, so the
    same seed gives the same matrix on every device).
    """
    bound = 1.0 / math.sqrt(dim_in)
    weight = torch.rand(dim_in, dim_out, generator=generator, dtype=torch.float64) * (2 * bound) - bound
    return weight.to(dtype)


def project(features: torch.Tensor, projection_dim: int | None, generator: torch.Generator) -> torch.Tensor:
    """Features in the space the selection runs in (random projection, or the features as they are)."""
    if not projection_dim or features.shape[1] <= projection_dim:
        return features
    weight = random_projection(features.shape[1], projection_dim, generator, features.dtype).to(features.device)
    return features @ weight


def _squared_distances(points: torch.Tensor, squared_norms: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """``||x - c||^2`` for every row x of ``points`` (clamped at 0 against cancellation)."""
    return (squared_norms - 2.0 * (points @ centre) + centre.dot(centre)).clamp_min_(0.0)


def approximate_greedy_coreset(
    features: torch.Tensor,
    count: int,
    projection_dim: int | None = 128,
    starting_points: int = 10,
    generator: torch.Generator | None = None,
    start_indices: torch.Tensor | None = None,
) -> torch.Tensor:
    """Indices (int64, selection order) of ``count`` rows chosen by approximate greedy k-center.

    ``features`` is ``[N, D]`` on any device. ``projection_dim`` None or 0 disables the random
    projection. ``start_indices`` overrides the random starting points (tests); otherwise
    ``starting_points`` distinct rows are drawn from ``generator``.
    """
    n = features.shape[0]
    count = max(0, min(int(count), n))
    if count == 0:
        return torch.zeros(0, dtype=torch.long)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    with torch.no_grad():
        points = project(features, projection_dim, generator)
        if start_indices is None:
            starts = torch.randperm(n, generator=generator)[: max(1, min(starting_points, n))]
        else:
            starts = torch.as_tensor(start_indices, dtype=torch.long)
        starts = starts.to(points.device)
        squared_norms = (points * points).sum(1)
        # official: mean of plain Euclidean distances to the starting points. Distances are kept
        # squared below; squaring is monotone, so min / argmax (the selection) are unchanged.
        start_distances = torch.addmm(squared_norms[starts][None], points, points[starts].T, alpha=-2.0)
        start_distances = (start_distances + squared_norms[:, None]).clamp_min_(0.0).sqrt_()
        min_distances = start_distances.mean(1).square_()
        del start_distances
        return _greedy_loop(points, squared_norms, min_distances, count)


def _greedy_loop(points: torch.Tensor, squared_norms: torch.Tensor, min_distances: torch.Tensor, count: int) -> torch.Tensor:
    """The official loop: one distance pass over every point per selected centre."""
    selected = torch.empty(count, dtype=torch.long, device=points.device)
    for step in range(count):
        index = torch.argmax(min_distances)
        selected[step] = index
        torch.minimum(min_distances, _squared_distances(points, squared_norms, points[index]), out=min_distances)
    return selected.cpu()


class StreamingCoreset:
    """The bank of ``ratio`` of a stream of rows, in bounded memory: merge and reduce.

    Rows are buffered up to ``chunk`` (C). A stream of at most C rows gets one ``select`` over
    all of them (the official selection); ``chunk=0`` always does that (memory grows with the
    stream). Beyond C, every full buffer is reduced as it fills (first stage): split into
    ``oversample`` (m) blocks of about C / m rows, each block keeps its ``ceil(m * ratio * n)``
    first greedy picks as candidates (so the first stage costs what one selection of
    ``ratio`` per chunk costs). The candidates are pooled, and one ``select`` over the pool
    (second stage) keeps ``ratio`` of the rows the pool stands for: a budget shared by the
    whole pool, where a composable coreset gives every chunk the same share whatever its
    diversity. When adding a chunk's candidates would take the pool above ``pool`` rows
    (``0``: no limit), the pool is reduced first and its selection joins the bank; group
    budgets are rounded cumulatively, so the bank has ``max(1, int(N * ratio))`` rows for N
    streamed rows in every case (the official size). ``oversample <= 1`` gives the plain
    composable coreset instead: each chunk reduced to its own ``max(1, int(n * ratio))`` rows.

    Every row comes with an owner (an int64 label, e.g. the training image it came from) that
    follows it into the bank. ``select(rows, count)`` returns the indices of ``count`` of the
    rows, e.g. the approximate greedy coreset. :attr:`held` counts the rows held at once
    (buffer, including a chunk until its candidates are pooled; pool; bank; not the transient
    copies inside one concatenation or selection) and :attr:`peak_held` its maximum, which stays
    below ``C + B + max(pool, C) + bank`` for batches of at most B rows, whatever N (``N + B``
    with ``chunk=0`` or ``ratio >= 1``).
    """

    def __init__(
        self, ratio: float, chunk: int, oversample: float, pool: int, select: Callable[[torch.Tensor, int], torch.Tensor]
    ) -> None:
        self.ratio, self.chunk, self.oversample, self.pool_limit = ratio, chunk, oversample, pool
        self.select = select
        self.total = 0  # rows streamed
        self.reduced = False  # a full chunk was reduced: no single selection any more
        self._buffer: list[Rows] = []
        self._buffered = 0
        self._pool: list[Rows] = []
        self._pooled = 0  # candidate rows in the pool
        self._pool_sources = 0  # streamed rows the pool stands for
        self._bank: list[Rows] = []
        self._banked = 0  # rows in the bank
        self._bank_sources = 0  # streamed rows the bank stands for
        self.peak_held = 0

    @property
    def held(self) -> int:
        """Rows held now: buffer, pool and bank."""
        return self._buffered + self._pooled + self._banked

    def _note(self) -> None:
        self.peak_held = max(self.peak_held, self.held)

    def _take(self, rows: Rows, count: int) -> Rows:
        """``count`` of ``rows`` by ``select`` (copies, so the rows can be freed)."""
        indices = self.select(rows.values, count).to(rows.values.device)
        return Rows(rows.values[indices], rows.owners[indices.to(rows.owners.device)])

    def add(self, rows: torch.Tensor, owners: torch.Tensor) -> None:
        """Stream ``[n, D]`` rows in, with their owners ``[n]``."""
        self._buffer.append(Rows(rows, owners))
        self._buffered += rows.shape[0]
        self.total += rows.shape[0]
        self._note()
        if self.ratio >= 1.0 or not self.chunk:
            return
        while self._buffered >= self.chunk:
            pending = Rows.cat(self._buffer)
            self._buffer = [pending]
            self._reduce(pending.slice(0, self.chunk))  # counted as held until its candidates are pooled
            rest = pending.slice(self.chunk, None).clone()  # so the chunk's rows can be freed
            self._buffer = [rest] if len(rest) else []
            self._buffered = len(rest)
            del pending, rest

    def _reduce(self, rows: Rows) -> None:
        """First stage for one chunk: its candidates into the pool (or, composable, its coreset into the bank)."""
        self.reduced = True
        n = len(rows)
        if self.oversample <= 1.0:
            self._bank.append(self._take(rows, max(1, int(n * self.ratio))))
            self._banked += len(self._bank[-1])
            self._bank_sources += n
            self._note()
            return
        blocks = max(1, min(n, round(self.oversample * n / self.chunk)))
        candidates = []
        for block in rows.split(blocks):
            count = math.ceil(self.oversample * self.ratio * len(block))
            candidates.append(block.clone() if count >= len(block) else self._take(block, count))
        pooled = Rows.cat(candidates)
        if self.pool_limit and self._pool and self._pooled + len(pooled) > self.pool_limit:
            self._flush(final=False)
        self._pool.append(pooled)
        self._pooled += len(pooled)
        self._pool_sources += n
        self._note()

    def _flush(self, final: bool) -> None:
        """Second stage: one selection over the pool, into the bank."""
        sources = self._bank_sources + self._pool_sources
        target = max(1, int(sources * self.ratio)) if final else int(sources * self.ratio)
        count = target - self._banked
        pool = Rows.cat(self._pool)
        self._pool, self._pooled, self._pool_sources = [], 0, 0
        if count > 0:
            self._bank.append(pool if count >= len(pool) else self._take(pool, count))
            self._banked += len(self._bank[-1])
        self._bank_sources = sources
        del pool
        self._note()

    def finish(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The bank ``[M, D]`` and its rows' owners ``[M]`` (call once, after the last :meth:`add`)."""
        if self.total == 0:
            raise ValueError("no rows were streamed")
        if self.ratio >= 1.0:
            bank = Rows.cat(self._buffer).clone() if len(self._buffer) == 1 else Rows.cat(self._buffer)
            return bank.values, bank.owners
        if not self.reduced:  # the whole stream fits one chunk: the official single selection
            rows = Rows.cat(self._buffer)
            self._buffer, self._buffered = [], 0
            bank = self._take(rows, max(1, int(len(rows) * self.ratio)))
            return bank.values, bank.owners
        if self._buffer:  # the last, partial chunk
            rows = Rows.cat(self._buffer)
            self._buffer = [rows]
            self._reduce(rows)
            self._buffer, self._buffered = [], 0
            del rows
        if self._pool:
            self._flush(final=True)
        bank = Rows.cat(self._bank)
        self._bank, self._banked = [], 0
        return bank.values, bank.owners


@dataclass(frozen=True)
class Rows:
    """Feature rows ``[n, D]`` and their owners ``[n]``, kept together through the selection."""

    values: torch.Tensor
    owners: torch.Tensor

    def __len__(self) -> int:
        return int(self.values.shape[0])

    @staticmethod
    def cat(parts: list[Rows]) -> Rows:
        if len(parts) == 1:
            return parts[0]
        return Rows(torch.cat([part.values for part in parts]), torch.cat([part.owners for part in parts]))

    def slice(self, start: int, stop: int | None) -> Rows:
        return Rows(self.values[start:stop], self.owners[start:stop])

    def split(self, sections: int) -> list[Rows]:
        return [Rows(v, o) for v, o in zip(torch.tensor_split(self.values, sections), torch.tensor_split(self.owners, sections))]

    def clone(self) -> Rows:
        return Rows(self.values.clone(), self.owners.clone())
