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

On the CPU the scan (steps 2-4, and the bounds of step 1 from the query-centroid distances)
runs, when the optional compiled module ``vad_patchcore._scan`` is built, as one fused loop over
groups of four consecutive queries (``_scan.cpp``), with no intermediate matrices: cell by cell;
then block by block of ``LANES`` items, a block being skipped when a ball around its centre in
the augmented space lies beyond every member's k-th distance found so far (items are ordered
within each cell so that blocks are tight); then, for a kept block, the ``LANES`` distances
accumulate in expanded form over the bank's principal axes (the bank is stored rotated into
them, with the items' squared norms), and after every ``LANES`` coordinates the partial distance
plus a bound on the rest drops the items that can no longer be nearer. Its tolerance also covers
the rotation (:func:`_native_tolerance`), so both scans find the same neighbours.

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

from vad.errors import VadError

try:  # the optional compiled scan (setup.py builds it where a C++ compiler is available)
    from vad_patchcore import _scan as native_scan
except ImportError:  # pragma: no cover - depends on the install
    native_scan = None

#: The query's nearest centroids whose bisectors bound the other cells (more: tighter, slower).
BISECTOR_CENTROIDS = 4
#: float32 unit roundoff (see "Rounding" above).
UNIT_ROUNDOFF = 2.0**-24
#: Bank rows per step of the build (bounds its temporaries to BUILD_CHUNK x D).
BUILD_CHUNK = 16384
#: Bank rows sampled for the PCA basis: it only steers the cheap bound, never the result.
PCA_SAMPLE = 4096
#: Items per block of the compiled scan (one AVX-512 register of float32; _scan.cpp's LANES).
LANES = 16


def native_available() -> bool:
    """True when the compiled scan ``vad_patchcore._scan`` was built and imports."""
    return native_scan is not None


def native_preferred() -> bool:
    """True when the compiled scan is built and runs its AVX-512 code: only then is it faster
    than the torch scan (its portable code is correct but slower, see _scan.cpp)."""
    return native_scan is not None and native_scan.isa() == "avx512"


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
    return torch.addmm(centroids.square().sum(1)[None], points, centroids.T, alpha=-2.0).argmin(1)


class PrunedExactSearch:
    """Exact k-nearest-neighbour search in a fixed ``bank [M, D]`` (float32, any device).

    ``cells`` k-means cells (None: :func:`default_cells`), ``head_dims`` PCA directions of the
    cheap bound (0 disables it), ``seed`` for the k-means initialisation, ``native`` the compiled
    scan (None: where :func:`native_preferred` and the bank is on the CPU; True: required, a
    :class:`VadError` where it cannot run). See the module docstring for the method and why its
    result equals brute force.
    """

    def __init__(
        self,
        bank: torch.Tensor,
        cells: int | None = None,
        head_dims: int = 24,
        kmeans_iterations: int = 10,
        seed: int = 0,
        native: bool | None = None,
    ) -> None:
        bank = bank.float()
        size, dim = bank.shape
        if native is None:
            native = native_preferred() and bank.device.type == "cpu"
        elif native and not (native_available() and bank.device.type == "cpu"):
            raise VadError(
                "the compiled pruned scan needs a CPU bank and the vad_patchcore._scan module "
                "(reinstall vad-patchcore where a C++ compiler is available), or pass native=False"
            )
        self.native = bool(native)
        #: the compiled scan's kernel: ``native_scan.isa()``; "portable" runs its portable code
        #: on any CPU (the tests check it where AVX-512 is the default)
        self.kernel = native_scan.isa() if self.native else None
        generator = torch.Generator().manual_seed(int(seed))
        self.mean = bank.double().mean(0).float()
        cells = min(cells or default_cells(size), size)
        # trained on at most 256 points per cell, as faiss does: the partition only steers the
        # pruning, so its quality changes the speed, never the neighbours found
        sample = bank
        if size > 256 * cells:
            sample = bank[torch.randperm(size, generator=generator)[: 256 * cells].to(bank.device)]
        centroids = kmeans(sample - self.mean, cells, kmeans_iterations, generator)
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
            (chunk - centroids[cells_of]).norm(dim=1)
            for chunk, cells_of in zip(items.split(BUILD_CHUNK), assignment.split(BUILD_CHUNK))
        ])
        radii = torch.zeros(centroids.shape[0], device=bank.device).scatter_reduce(0, assignment, reach, "amax")
        self.radii = radii * (1.0 + 2.0 * gamma)  # a difference-form norm is accurate to ~D ulps
        self.centroid_gaps = torch.cdist(centroids.double(), centroids.double()).float()
        self.squared_radius = float(items.square().sum(1).max())
        self.tolerance_scale = 16.0 * gamma
        self.head_dims = min(int(head_dims), dim - 1) if dim > 2 * head_dims else 0
        augmented = None
        if self.native:
            # the compiled scan stores the bank rotated into its principal axes (see _native_tolerance)
            self.rotation = self._principal_directions(items, generator, dim)
            self.tolerance_scale = _native_tolerance(dim)
            rotated = torch.empty_like(items)
            for start in range(0, size, BUILD_CHUNK):  # in place of a list of chunks and their concatenation
                torch.mm(items[start : start + BUILD_CHUNK], self.rotation, out=rotated[start : start + BUILD_CHUNK])
            items = rotated
            augmented = _rotated_augmented(items, self.head_dims)
        elif self.head_dims:
            self.head_basis = self._principal_directions(items, generator, self.head_dims)
            augmented = torch.cat([self._augmented(chunk) for chunk in items.split(BUILD_CHUNK)])

        #: share of (query, bank item) distances the last search computed (or began, compiled scan)
        self.scanned_fraction = 0.0
        self.cell_sizes = counts
        #: number of bank rows
        self.size = size
        if self.native:
            self._build_blocks(items, augmented, order, gamma)
            return
        #: bank row of each position of the cell-sorted bank
        self.positions = order
        #: position of each cell's first item in the sorted bank
        self.cell_starts = torch.tensor(bounds[:-1], device=bank.device)
        self.items = items  # the only full copy of the bank the search keeps
        self.item_norms = items.square().sum(1)
        #: per cell: (items transposed, squared norms as a row), views into the sorted bank; the
        #: products are taken as queries @ items.T: on CPU that orientation runs up to twice as fast
        self._exact_cells = [(items[a:b].T, self.item_norms[None, a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
        if self.head_dims:
            augmented_norms = augmented.square().sum(1)
            self._augmented_cells = [
                (augmented[a:b].T, augmented_norms[None, a:b]) for a, b in zip(bounds[:-1], bounds[1:])
            ]

    def _build_blocks(self, rotated: torch.Tensor, augmented: torch.Tensor, order: torch.Tensor, gamma: float) -> None:
        """The compiled scan's tables, with every cell padded to whole blocks of LANES items and
        rows to a multiple of LANES coordinates: the rotated bank as ``[chunk, block, coordinate,
        LANES]`` panels of LANES coordinates of LANES items (NaN in padding lanes, so they never
        pass a comparison), each item's norm past 1, 2, ... chunks as ``[chunk - 1, block,
        LANES]`` and its squared norm as ``[block * LANES]`` (NaN in padding), and per block the
        centre and radius of its items in the augmented space.
        ``rotated`` and ``augmented`` are cell-sorted; ``order`` gives their bank rows."""
        size, dim = rotated.shape
        counts = self.cell_sizes
        starts = counts.cumsum(0) - counts
        within = torch.cat([_block_order(augmented[a : a + n]) + a for a, n in zip(starts.tolist(), counts.tolist())])
        rank = torch.empty_like(within)  # each row's place in its cell's block order (rows are not moved)
        rank[within] = torch.arange(size, device=rotated.device)
        self.cell_blocks = (counts + LANES - 1) // LANES
        first_block = self.cell_blocks.cumsum(0) - self.cell_blocks
        blocks = int(self.cell_blocks.sum())
        # the slot of each row: its cell's first slot plus its place within the cell
        cell = torch.repeat_interleave(torch.arange(counts.numel(), device=rotated.device), counts)
        slots = first_block[cell] * LANES + rank - starts[cell]
        self.row = -(-dim // LANES) * LANES
        chunks = self.row // LANES
        #: bank row of each slot of the cell-sorted, block-padded bank; -1 in padding slots
        self.positions = torch.full((blocks * LANES,), -1, dtype=torch.long, device=rotated.device)
        self.positions[slots] = order
        #: slot of each cell's first item
        self.cell_starts = first_block * LANES
        block, lane = slots // LANES, slots % LANES
        padding = torch.ones(blocks * LANES, dtype=torch.bool, device=rotated.device)
        padding[slots] = False
        padding = padding.nonzero()[:, 0]
        # filled through views indexed as [block, lane, ...]: leading indices do not make torch
        # expand index tensors to the size of the bank, as indices behind a slice would
        #: the only full copy of the bank the compiled scan keeps
        self._panels = rotated.new_zeros((chunks, blocks, LANES, LANES))
        by_item = self._panels.permute(1, 3, 0, 2)  # [block, lane, chunk, coordinate]
        by_item[padding // LANES, padding % LANES] = math.nan
        squares = rotated.new_zeros(rotated.shape[0], chunks)
        for chunk in range(chunks):  # chunk by chunk: no padded copy of the bank
            columns = rotated[:, chunk * LANES : (chunk + 1) * LANES]
            by_item[block, lane, chunk, : columns.shape[1]] = columns
            squares[:, chunk] = columns.square().sum(1)
        self._suffix_norms = rotated.new_full((chunks - 1, blocks, LANES), math.nan)
        self._suffix_norms.permute(1, 2, 0)[block, lane] = squares.flip(1).cumsum(1).flip(1)[:, 1:].sqrt()
        self._item_squares = rotated.new_full((blocks * LANES,), math.nan)
        self._item_squares[slots] = squares.sum(1)
        width = augmented.shape[1]
        members = torch.bincount(block, minlength=blocks)[:, None]
        centres = augmented.new_zeros(blocks, width).index_add_(0, block, augmented) / members
        reach = (augmented - centres[block]).norm(dim=1)
        radii = augmented.new_zeros(blocks).scatter_reduce(0, block, reach, "amax") * (1.0 + 2.0 * gamma)
        panels = -(-blocks // LANES)
        padded_centres = augmented.new_zeros(panels * LANES, width)
        padded_centres[:blocks] = centres
        self._centres = padded_centres.view(panels, LANES, width).transpose(1, 2).contiguous()
        self._centre_norms = padded_centres.square().sum(1)
        self._block_radii = augmented.new_full((panels * LANES,), math.nan)
        self._block_radii[:blocks] = radii
        self._half_inverse_gaps = (2.0 * self.centroid_gaps).reciprocal()  # inf on the diagonal
        cell_panels = -(-self.cells // LANES)
        padded = self.centroids.new_zeros(cell_panels * LANES, dim)
        padded[: self.cells] = self.centroids
        self._centroid_panels = padded.view(cell_panels, LANES, dim).transpose(1, 2).contiguous()

    @property
    def cells(self) -> int:
        """Number of non-empty k-means cells."""
        return self.centroids.shape[0]

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
        ascending. Distances are float32 values of the scan (expanded form; the compiled scan's
        are taken between rotated rows): callers that need them exact recompute them from the
        differences."""
        queries = queries.float() - self.mean
        count = queries.shape[0]
        k = min(int(k), self.size)
        device = queries.device
        if count == 0:
            return torch.zeros(0, k, device=device), torch.zeros(0, k, dtype=torch.long, device=device)
        norms = queries.square().sum(1)
        tolerance = self.tolerance_scale * (norms + self.squared_radius)
        if self.native:  # the compiled scan computes step 1 itself
            return self._native_search(queries, tolerance, k)
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

    def _native_search(self, queries: torch.Tensor, tolerance: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Steps 1 to 4 by the compiled scan (``_scan.cpp``); torch only rotates the queries."""
        count, dim = queries.shape
        rows = queries.new_zeros(count, self.row)
        torch.mm(queries, self.rotation, out=rows[:, :dim])
        distances = queries.new_empty(count, k)
        positions = torch.empty(count, k, dtype=torch.long)
        queries, tolerance = queries.contiguous(), tolerance.contiguous()
        begun = native_scan.scan(
            self._panels.data_ptr(), self._suffix_norms.data_ptr(), self._centres.data_ptr(),
            self._centre_norms.data_ptr(), self._block_radii.data_ptr(), self.cell_starts.data_ptr(),
            self.cell_blocks.data_ptr(), self.radii.data_ptr(), self._half_inverse_gaps.data_ptr(),
            self._centroid_panels.data_ptr(), self._item_squares.data_ptr(),
            self.row, self.head_dims, self.cells, min(BISECTOR_CENTROIDS, self.cells),
            int(self.cell_blocks.max()), self._panels.shape[1], dim,
            rows.data_ptr(), queries.data_ptr(), tolerance.data_ptr(), distances.data_ptr(), positions.data_ptr(),
            count, k, torch.get_num_threads(), self.kernel,
        )
        self.scanned_fraction = begun / (count * self.size)
        return distances, self.positions[positions]

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


def _native_tolerance(dim: int) -> float:
    """Tolerance scale of the compiled scan, whose distances are taken between rotated rows.

    A float32 product ``x @ P`` with orthonormal ``P`` is off by at most ``g sqrt(D) ||x||`` (in
    norm, ``g = (D + 3) 2^-24``), so a squared distance between rotated rows differs from the
    true one by at most ``e = 4 g sqrt(D) (||q||^2 + R^2)``. A bound or a distance found may be
    off by ``e`` each, hence ``2 e`` on top of the torch scan's ``16 g (||q||^2 + R^2)``. The
    compiled scan's block distances are expanded-form sums like the torch scan's, and its
    partial bounds ``||q||^2 + ||x||^2 - 2 (q_lead . x_lead + |q_rest| |x_rest|)`` add one product
    of two norms, off by at most ``2 g ||q|| ||x|| <= g (||q||^2 + R^2)``: within the same part.
    """
    return (16.0 + 8.0 * math.sqrt(dim)) * (dim + 3) * UNIT_ROUNDOFF


def _rotated_augmented(rotated: torch.Tensor, head_dims: int) -> torch.Tensor:
    """The augmented vectors of rows already in the principal axes: the leading ``head_dims``
    coordinates and the norm of the rest."""
    return torch.cat([rotated[:, :head_dims], rotated[:, head_dims:].norm(dim=1, keepdim=True)], dim=1)


def _block_order(augmented: torch.Tensor) -> torch.Tensor:
    """A permutation of one cell's items such that consecutive blocks of ``LANES`` items are
    tight (small balls in the augmented space, so the compiled scan can skip whole blocks):
    recursive halving along the principal direction, each left part a whole number of blocks."""
    if augmented.shape[0] <= LANES:
        return torch.arange(augmented.shape[0], device=augmented.device)
    centred = (augmented - augmented.mean(0)).double()
    direction = torch.linalg.eigh(centred.T @ centred).eigenvectors[:, -1]
    order = torch.argsort(centred @ direction)
    left = min(-(-((order.numel() + 1) // 2) // LANES) * LANES, order.numel() - 1)
    return torch.cat([order[:left][_block_order(augmented[order[:left]])], order[left:][_block_order(augmented[order[left:]])]])


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
