"""PCA along the channel dimension of patch features, in torch (CPU or CUDA).

Every spatial position of a feature grid ``[B, C, h, w]`` is one sample with C variables.
Fitting streams the training batches and keeps memory bounded:

* ``max_fit_patches=None``: the exact covariance of *every* training patch is accumulated in
  float64 (memory ``O(C^2)``, independent of the data size). Sums are taken around the first
  batch's mean (the "shifted data" algorithm) so that large feature means do not cancel
  catastrophically in ``E[xx^T] - mean mean^T``.
* ``max_fit_patches=N``: a uniform random sample of at most N patches (without replacement) is
  drawn while streaming — each patch gets a random key from a seeded generator and the N
  smallest keys are kept ("bottom-k" reservoir sampling, memory ``O(N * C)``) — and the PCA is
  the exact PCA of that sample.

The principal axes are the eigenvectors of the sample covariance (normalised by ``n - 1`` like
scikit-learn), sorted by decreasing eigenvalue, with scikit-learn's sign convention (the entry
of largest magnitude of every component is positive), so results match
``sklearn.decomposition.PCA`` up to floating-point error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vad.errors import VadError


def grid_to_patches(features: torch.Tensor) -> torch.Tensor:
    """``[B, C, h, w]`` -> ``[B*h*w, C]`` (one row per spatial position)."""
    if features.ndim != 4:
        raise VadError(f"expected feature grids [B, C, h, w], got a tensor of shape {tuple(features.shape)}")
    return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])


class CovarianceAccumulator:
    """Running mean and covariance of rows ``[N, C]`` in float64, one batch at a time."""

    def __init__(self) -> None:
        self.count = 0
        self.shift: torch.Tensor | None = None
        self.sum: torch.Tensor | None = None
        self.outer: torch.Tensor | None = None

    def update(self, rows: torch.Tensor) -> None:
        """Add the rows of one batch."""
        rows = rows.detach().to(torch.float64)
        if rows.numel() == 0:
            return
        if self.shift is None:
            self.shift = rows.mean(dim=0)
            channels = rows.shape[1]
            self.sum = torch.zeros(channels, dtype=torch.float64, device=rows.device)
            self.outer = torch.zeros(channels, channels, dtype=torch.float64, device=rows.device)
        elif rows.shape[1] != self.shift.numel():
            raise VadError(f"feature batches changed width: {self.shift.numel()} channels, then {rows.shape[1]}")
        centred = rows - self.shift
        self.sum += centred.sum(dim=0)
        self.outer += centred.T @ centred
        self.count += rows.shape[0]

    def finalize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean ``[C]`` and unbiased covariance ``[C, C]`` (float64)."""
        if self.shift is None or self.count < 2:
            raise VadError(f"PCA needs at least 2 training patches, got {self.count}")
        assert self.sum is not None and self.outer is not None
        centred_mean = self.sum / self.count
        covariance = (self.outer - self.count * torch.outer(centred_mean, centred_mean)) / (self.count - 1)
        return self.shift + centred_mean, (covariance + covariance.T) / 2


class PatchReservoir:
    """A uniform sample of at most ``capacity`` rows from a stream (bottom-k random keys)."""

    def __init__(self, capacity: int, seed: int) -> None:
        self.capacity = capacity
        self.generator = torch.Generator().manual_seed(seed)
        self.keys = torch.empty(0, dtype=torch.float64)
        self.rows: torch.Tensor | None = None
        self.seen = 0

    def update(self, rows: torch.Tensor) -> None:
        """Offer the rows of one batch to the sample."""
        rows = rows.detach()
        keys = torch.rand(rows.shape[0], generator=self.generator, dtype=torch.float64)
        self.seen += rows.shape[0]
        merged_rows = rows if self.rows is None else torch.cat([self.rows, rows.to(self.rows.dtype)])
        merged_keys = torch.cat([self.keys, keys])
        if merged_keys.numel() > self.capacity:
            kept = torch.topk(merged_keys, self.capacity, largest=False, sorted=False).indices
            kept = kept.sort().values  # keep stream order: the sample does not depend on topk internals
            merged_keys = merged_keys[kept]
            merged_rows = merged_rows[kept.to(merged_rows.device)]
        self.keys, self.rows = merged_keys, merged_rows

    def finalize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and covariance of the sample."""
        accumulator = CovarianceAccumulator()
        if self.rows is not None:
            for start in range(0, self.rows.shape[0], 65536):  # bound the float64 copy
                accumulator.update(self.rows[start : start + 65536])
        return accumulator.finalize()


@dataclass
class PCA:
    """A fitted channel PCA: ``mean [C]``, ``components [K, C]``, explained variances ``[K]``."""

    mean: torch.Tensor
    components: torch.Tensor
    explained_variance: torch.Tensor
    explained_variance_ratio: torch.Tensor

    @classmethod
    def from_covariance(cls, mean: torch.Tensor, covariance: torch.Tensor, n_components: int | float, count: int) -> PCA:
        """Eigen-decompose a float64 covariance and keep ``n_components`` (int or variance fraction)."""
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        eigenvalues = eigenvalues.flip(0).clamp(min=0.0)
        eigenvectors = eigenvectors.flip(1).T  # [C, C], one component per row, decreasing variance
        total = eigenvalues.sum()
        ratio = eigenvalues / total if total > 0 else torch.zeros_like(eigenvalues)
        channels = covariance.shape[0]
        # A sample of n patches spans at most n - 1 directions (scikit-learn: min(n_samples, n_features)).
        available = min(channels, count)
        if isinstance(n_components, float) and 0.0 < n_components < 1.0:
            # Smallest K whose cumulative ratio exceeds the fraction (scikit-learn's rule).
            cumulative = torch.cumsum(ratio, 0)
            keep = int(torch.searchsorted(cumulative, torch.tensor([n_components], dtype=cumulative.dtype, device=cumulative.device), right=True).item()) + 1
            keep = min(keep, available)
        else:
            keep = int(n_components)
            if keep > available:
                raise VadError(
                    f"n_components={keep} but PCA was fitted on only {count} training patches of "
                    f"{channels} channels; use fewer components or more training images"
                )
        components = eigenvectors[:keep]
        # scikit-learn's svd_flip (u_based_decision=False): largest-magnitude entry positive.
        pivot = components.abs().argmax(dim=1)
        signs = torch.sign(components.gather(1, pivot[:, None]))
        signs[signs == 0] = 1.0
        components = components * signs
        return cls(
            mean=mean.float(),
            components=components.float().contiguous(),
            explained_variance=eigenvalues[:keep].float(),
            explained_variance_ratio=ratio[:keep].float(),
        )

    @property
    def n_components(self) -> int:
        """K, the number of kept components."""
        return int(self.components.shape[0])

    def transform(self, features: torch.Tensor) -> torch.Tensor:
        """Project a grid ``[B, C, h, w]`` onto the components: ``[B, K, h, w]``."""
        if features.shape[1] != self.mean.numel():
            raise VadError(f"PCA was fitted on {self.mean.numel()} channels, got features with {features.shape[1]}")
        centred = features - self.mean.to(features)[None, :, None, None]
        return torch.einsum("bchw,kc->bkhw", centred, self.components.to(features))

    def to(self, device: torch.device | str) -> PCA:
        """Move every tensor to ``device``."""
        return PCA(*(t.to(device) for t in (self.mean, self.components, self.explained_variance, self.explained_variance_ratio)))

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """Named tensors for a State (on the CPU)."""
        return {
            f"{prefix}.mean": self.mean.detach().cpu(),
            f"{prefix}.components": self.components.detach().cpu(),
            f"{prefix}.explained_variance": self.explained_variance.detach().cpu(),
            f"{prefix}.explained_variance_ratio": self.explained_variance_ratio.detach().cpu(),
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str) -> PCA:
        """Inverse of :meth:`tensors`; a VadError names any missing tensor."""
        names = ("mean", "components", "explained_variance", "explained_variance_ratio")
        missing = [f"{prefix}.{n}" for n in names if f"{prefix}.{n}" not in tensors]
        if missing:
            raise VadError(f"the saved feature ensemble lacks tensor(s) {', '.join(missing)}; the model folder is incomplete")
        return cls(*(tensors[f"{prefix}.{n}"].float() for n in names))


class PCAFitter:
    """Streams patch rows into an exact covariance or a bounded random sample, then fits a PCA."""

    def __init__(self, max_fit_patches: int | None, seed: int) -> None:
        self.sampler: CovarianceAccumulator | PatchReservoir = (
            CovarianceAccumulator() if max_fit_patches is None else PatchReservoir(max_fit_patches, seed)
        )

    def update(self, features: torch.Tensor) -> None:
        """Add one grid ``[B, C, h, w]``."""
        self.sampler.update(grid_to_patches(features))

    @property
    def count(self) -> int:
        """Patches the PCA is fitted on."""
        if isinstance(self.sampler, PatchReservoir):
            return 0 if self.sampler.rows is None else int(self.sampler.rows.shape[0])
        return self.sampler.count

    def fit(self, n_components: int | float) -> PCA:
        """The PCA of what was streamed."""
        mean, covariance = self.sampler.finalize()
        return PCA.from_covariance(mean, covariance, n_components, self.count)
