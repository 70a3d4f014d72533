"""Exact nearest-neighbour search that skips most of the memory bank: Voronoi-cell pruning.

Brute force compares every test patch with every bank item: at PatchCore's sizes (784
patches per 224 px image, a bank of ~16k items of 152-1536 dims) that is several times the
backbone's own arithmetic. This search returns the same neighbours while computing distances
to about a tenth of the bank.

Build (once per bank, cheap next to the fit): centre the bank, partition it by k-means into
``L`` cells (``L ~ sqrt(M) / 2``), store it sorted by cell, with each cell's radius and the
distances between centroids, and a PCA basis of the bank's leading ``head_dims`` directions.

Search, per block of queries (all steps are matrix products on contiguous slices of the bank):

1. distances from each query to every centroid. Two lower bounds on the distance from a
   query ``q`` to any item of cell ``j`` follow from them without touching the items:
   the ball bound ``||q - c_j|| - r_j`` and the bisector bound of the Voronoi cell,
   ``(||q - c_j||^2 - ||q - c_i||^2) / (2 ||c_i - c_j||)`` for the query's nearest centroids
   ``i`` (every item of cell ``j`` lies on ``c_j``'s side of the bisecting hyperplane);
2. exact distances to the items of the query's nearest cell give an upper bound ``u`` on
   its k-th neighbour distance;
3. every other cell whose lower bound is below ``u`` is a candidate. For each candidate
   (query, cell) pair a cheaper bound is computed first: the distance in the PCA head
   space augmented by the norm of the rest, ``||q_h - b_h||^2 + (||q_t|| - ||b_t||)^2 <=
   ||q - b||^2`` (an orthogonal split of the space; the triangle inequality on the tail).
   It is one product with ``head_dims + 1`` columns instead of ``D``;
4. pairs whose cheap bound is still below ``u`` get exact distances, and the k nearest are
   kept.

Nothing is approximate: a cell or pair is skipped only when a proven lower bound exceeds a
distance already found. How much is skipped depends on the data (and the partition), never the
result: a poor partition is only slower.

Rounding. A float32 squared distance in the expanded form ``||x||^2 - 2 x.y + ||y||^2`` is off by
at most ``2 g (||x||^2 + ||y||^2)`` with ``g = (D + 3) 2^-24``. Every comparison carries the
tolerance ``t = 16 g (||q||^2 + R^2)`` (``R`` the largest centred bank norm; centroids are means of
items, so no larger): it covers the two query-centroid distances of a bisector bound, the
float32 cell assignment (an item may be up to ``8 g R^2`` nearer another centroid than its own,
which loosens its cell's bisector by that much) and the distance found so far. So rounding
never prunes the true neighbour; only ties within rounding may resolve to another item at the
same distance, as they may between any two brute-force implementations.
"""

from __future__ import annotations

import math

import torch

#: The query's nearest centroids whose bisectors bound the other cells (more: tighter, slower).
BISECTOR_CENTROIDS = 4
#: float32 unit roundoff (see "Rounding" above).
UNIT_ROUNDOFF = 2.0**-24
#: Bank rows per step of the build: its temporaries are a few BUILD_CHUNK x D blocks.
BUILD_CHUNK = 4096
#: Bank rows sampled for the PCA basis: it only steers the cheap bound, never the result.
PCA_SAMPLE = 4096


def default_cells(bank_size: int) -> int:
    """Number of k-means cells for a bank of ``bank_size`` items (about sqrt(M) / 2)."""
    return max(1, min(1024, round(math.sqrt(bank_size) / 2)))


def kmeans(points: torch.Tensor, cells: int, iterations: int, generator: torch.Generator) -> torch.Tensor:
    """Lloyd's k-means from ``cells`` distinct random rows; returns the centroids ``[cells, D]``."""
    centroids = points[torch.randperm(points.shape[0], generator=generator)[:cells].to(points.device)].clone()
    for _ in range(iterations):
        assignment = _nearest_rows(points, centroids)
        sums = torch.zeros_like(centroids).index_add_(0, assignment, points)
        counts = torch.bincount(assignment, minlength=cells)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None].to(sums.dtype)
    return centroids


def _nearest_rows(points: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid of each point (float32 expanded form)."""
    norms = centroids.square().sum(1)[None]
    return torch.cat([torch.addmm(norms, chunk, centroids.T, alpha=-2.0).argmin(1) for chunk in points.split(BUILD_CHUNK)])


def _squared_norms(rows: torch.Tensor) -> torch.Tensor:
    """``||row||^2`` of each row, without a squared copy of all rows."""
    return torch.cat([chunk.square().sum(1) for chunk in rows.split(BUILD_CHUNK)])


class PrunedExactSearch:
    """Exact k-nearest-neighbour search in a fixed ``bank [M, D]`` (float32, any device); the
    ``"pruned"`` :class:`vad_patchcore.knn.SearchBackend`.

    ``cells`` k-means cells (None: :func:`default_cells`), ``head_dims`` PCA directions of the
    cheap bound (0 disables it), ``seed`` for the k-means initialisation. See the module
    docstring for the method and why its result equals brute force.
    """

    name = "pruned"
    exact = True
    oversample = 1

    def __init__(
        self,
        bank: torch.Tensor,
        cells: int | None = None,
        head_dims: int = 24,
        kmeans_iterations: int = 10,
        seed: int = 0,
    ) -> None:
        bank = bank.float()
        size, dim = bank.shape
        generator = torch.Generator().manual_seed(int(seed))
        # in float64, chunk by chunk (a float64 copy of the bank would double the build's peak)
        self.mean = (sum(chunk.double().sum(0) for chunk in bank.split(BUILD_CHUNK)) / size).float()
        cells = min(cells or default_cells(size), size)
        # trained on at most 256 points per cell, as faiss does: the partition only steers the
        # pruning, so its quality changes the speed, never the neighbours found
        if size > 256 * cells:
            sample = bank[torch.randperm(size, generator=generator)[: 256 * cells].to(bank.device)].sub_(self.mean)
        else:
            sample = bank - self.mean
        centroids = kmeans(sample, cells, kmeans_iterations, generator)
        del sample
        assignment = torch.cat([_nearest_rows(chunk - self.mean, centroids) for chunk in bank.split(BUILD_CHUNK)])
        used = torch.unique(assignment)  # drop empty cells
        centroids = centroids[used].contiguous()
        assignment = torch.searchsorted(used, assignment)
        order = torch.argsort(assignment, stable=True)
        items = bank[order].sub_(self.mean)  # cell-sorted, centred
        assignment = assignment[order]
        counts = torch.bincount(assignment, minlength=centroids.shape[0])
        bounds = [0, *counts.cumsum(0).tolist()]
        self.centroids = centroids
        self.centroid_norms = centroids.square().sum(1)
        gamma = (dim + 3) * UNIT_ROUNDOFF
        reach = torch.cat([
            centroids[cells_of].sub_(chunk).norm(dim=1)
            for chunk, cells_of in zip(items.split(BUILD_CHUNK), assignment.split(BUILD_CHUNK))
        ])
        radii = torch.zeros(centroids.shape[0], device=bank.device).scatter_reduce(0, assignment, reach, "amax")
        self.radii = radii * (1.0 + 2.0 * gamma)  # a difference-form norm is accurate to ~D ulps
        self.centroid_gaps = torch.cdist(centroids.double(), centroids.double()).float()
        self.item_norms = _squared_norms(items)
        self.squared_radius = float(self.item_norms.max())
        self.tolerance_scale = 16.0 * gamma
        del assignment, reach
        self.head_dims = min(int(head_dims), dim - 1) if dim > 2 * head_dims else 0

        #: share of (query, bank item) distances the last search computed
        self.scanned_fraction = 0.0
        self.cell_sizes = counts
        #: number of bank rows
        self.size = size
        #: bank row of each position of the cell-sorted bank
        self.positions = order
        #: position of each cell's first item in the sorted bank
        self.cell_starts = torch.tensor(bounds[:-1], device=bank.device)
        self.items = items  # the only full copy of the bank the search keeps
        #: per cell: (items transposed, squared norms as a row), views into the sorted bank; the
        #: products are taken as queries @ items.T, the faster orientation on the CPU
        self._exact_cells = [(items[a:b].T, self.item_norms[None, a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
        if self.head_dims:
            self.head_basis = self._principal_directions(items, generator, self.head_dims)
            augmented = items.new_empty(size, self.head_dims + 1)
            for start in range(0, size, BUILD_CHUNK):  # filled in place: no list of chunks to concatenate
                augmented[start : start + BUILD_CHUNK] = self._augmented(items[start : start + BUILD_CHUNK])
            augmented_norms = _squared_norms(augmented)
            self._augmented_cells = [
                (augmented[a:b].T, augmented_norms[None, a:b]) for a, b in zip(bounds[:-1], bounds[1:])
            ]

    @property
    def cells(self) -> int:
        """Number of non-empty k-means cells."""
        return self.centroids.shape[0]

    @property
    def description(self) -> str:
        """The backend and its partition (for logs and benchmark tables)."""
        return f"pruned (exact, {self.cells} cells, {self.head_dims} head dims)"

    @staticmethod
    def _principal_directions(rows: torch.Tensor, generator: torch.Generator, count: int) -> torch.Tensor:
        """``[D, count]`` orthonormal leading directions of (a sample of) the centred ``rows``."""
        if rows.shape[0] > PCA_SAMPLE:
            rows = rows[torch.randperm(rows.shape[0], generator=generator)[:PCA_SAMPLE].to(rows.device)]
        _, vectors = torch.linalg.eigh((rows.T @ rows).double())
        # re-orthonormalised in float64 so that the float32 basis is orthonormal to rounding
        return torch.linalg.qr(vectors[:, -count:].flip(1)).Q.float().contiguous()

    def _augmented(self, centred: torch.Tensor) -> torch.Tensor:
        """``[head coordinates, norm of the rest]``: distances between these vectors are lower
        bounds of the true distances (the tail norm is taken of the residual, not by subtracting
        squared norms, so it stays accurate when the tail is small)."""
        head = centred @ self.head_basis
        tail = torch.addmm(centred, head, self.head_basis.T, alpha=-1.0).norm(dim=1, keepdim=True)
        return torch.cat([head, tail], dim=1)

    # ------------------------------------------------------------------ search

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` nearest bank rows of each query: ``(squared distances, indices)``, ``[n, k]``,
        ascending. Distances are float32 values of the scan (expanded form): callers that need them
        exact recompute them from the differences."""
        queries = queries.float() - self.mean
        count = queries.shape[0]
        k = min(int(k), self.size)
        device = queries.device
        if count == 0:
            return torch.zeros(0, k, device=device), torch.zeros(0, k, dtype=torch.long, device=device)
        norms = queries.square().sum(1)
        tolerance = self.tolerance_scale * (norms + self.squared_radius)
        to_centroids = torch.addmm(self.centroid_norms[None], queries, self.centroids.T, alpha=-2.0)
        to_centroids.add_(norms[:, None]).clamp_min_(0.0)
        nearest_cells = to_centroids.topk(min(BISECTOR_CENTROIDS, self.cells), dim=1, largest=False).indices
        lower = self._cell_lower_bounds(to_centroids, nearest_cells, tolerance)

        home = nearest_cells[:, 0]
        order = torch.argsort(home)
        best, best_positions = self._scan(home[order], order, queries, norms, k)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(count, device=device)
        best, best_positions = best[inverse], best_positions[inverse]

        # a cell may hold a nearer item only if its lower bound is below the k-th distance found
        limit = best[:, -1] + tolerance
        candidates = lower.square_() <= limit[:, None]
        candidates[torch.arange(count, device=device), home] = False  # scanned already (also when limit is inf)
        cells, rows = candidates.T.nonzero(as_tuple=True)
        if self.head_dims and rows.numel():
            augmented = self._augmented(queries)
            keep = self._cheap_bounds(cells, rows, augmented) <= limit[rows]
            cells, rows = cells[keep], rows[keep]
        scanned = int(self.cell_sizes[home].sum())
        if rows.numel():
            values, positions = self._scan(cells, rows, queries, norms, k)
            best, best_positions = _merge(best, best_positions, rows, values, positions)
            scanned += int(self.cell_sizes[cells].sum())
        self.scanned_fraction = scanned / (count * self.size)
        return best, self.positions[best_positions]

    def _cell_lower_bounds(self, to_centroids: torch.Tensor, nearest_cells: torch.Tensor, tolerance: torch.Tensor) -> torch.Tensor:
        """``[n, L]`` lower bounds (distance units) from each query to the items of each cell."""
        slack = tolerance[:, None]
        lower = ((to_centroids - slack).clamp_min(0.0).sqrt_() - self.radii).clamp_min_(0.0)  # ball
        for column in range(nearest_cells.shape[1]):
            centre = nearest_cells[:, column : column + 1]
            # bisector of the cells of centre and j: items of j lie on j's side of it
            numerator = to_centroids - to_centroids.gather(1, centre) - 2.0 * slack
            lower = torch.maximum(lower, numerator.div_(2.0 * self.centroid_gaps[centre[:, 0]]))
        return lower.nan_to_num_(nan=0.0, posinf=math.inf)

    def _cheap_bounds(self, cells: torch.Tensor, rows: torch.Tensor, augmented: torch.Tensor) -> torch.Tensor:
        """Per (cell, query) pair, sorted by cell: the smallest augmented-space squared distance
        to the cell's items, a lower bound of the smallest true one."""
        gathered = augmented.index_select(0, rows)  # (much faster than advanced indexing on CPU)
        smallest = [
            torch.addmm(norms, gathered[start:stop], items_t, alpha=-2.0).amin(1)
            for (items_t, norms), start, stop in self._runs(cells, self._augmented_cells)
        ]
        return torch.cat(smallest).add_(gathered.square().sum(1))

    def _scan(
        self, cells: torch.Tensor, rows: torch.Tensor, queries: torch.Tensor, norms: torch.Tensor, k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact squared distances of each (cell, query) pair, sorted by cell: the ``k`` nearest
        items of the pair's cell, ``[P, k]`` values (inf where a cell has fewer) and positions."""
        gathered = queries.index_select(0, rows)
        values, positions = [], []
        for (items_t, item_norms), start, stop in self._runs(cells, self._exact_cells):
            partial = torch.addmm(item_norms, gathered[start:stop], items_t, alpha=-2.0)
            if k == 1:
                nearest, found = partial.min(1, keepdim=True)
            else:
                nearest, found = partial.topk(min(k, items_t.shape[1]), dim=1, largest=False)
                if nearest.shape[1] < k:  # a cell smaller than k: pad with "no item"
                    missing = k - nearest.shape[1]
                    nearest = torch.cat([nearest, nearest.new_full((nearest.shape[0], missing), math.inf)], dim=1)
                    found = torch.cat([found, found.new_zeros(found.shape[0], missing)], dim=1)
            values.append(nearest)
            positions.append(found)
        first = self.cell_starts[cells]
        return torch.cat(values).add_(norms[rows, None]), torch.cat(positions).add_(first[:, None])

    @staticmethod
    def _runs(cells: torch.Tensor, per_cell: list):
        """``(per_cell[cell], start, stop)`` for each run of equal values in the sorted ``cells``."""
        values, counts = torch.unique_consecutive(cells, return_counts=True)
        start = 0
        for cell, count in zip(values.tolist(), counts.tolist()):
            yield per_cell[cell], start, start + count
            start += count


def _merge(
    best: torch.Tensor, best_positions: torch.Tensor, rows: torch.Tensor, values: torch.Tensor, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` smallest of each query's current ``best [n, k]`` and its candidates ``values [P, k]``
    (candidate ``p`` belongs to query ``rows[p]``); ties keep the earlier entry."""
    count, k = best.shape
    device = best.device
    owners = torch.cat([torch.arange(count, device=device).repeat_interleave(k), rows.repeat_interleave(values.shape[1])])
    pooled_values = torch.cat([best.reshape(-1), values.reshape(-1)])
    pooled_positions = torch.cat([best_positions.reshape(-1), positions.reshape(-1)])
    order = torch.argsort(pooled_values, stable=True)
    order = order[torch.argsort(owners[order], stable=True)]  # by query, ascending distance within
    starts = torch.bincount(owners, minlength=count).cumsum(0) - torch.bincount(owners, minlength=count)
    take = order[starts[:, None] + torch.arange(k, device=device)]
    return pooled_values[take], pooled_positions[take]
