"""Global average pooling of feature grids and the optional standardisation + PCA of seed 003.

Seed 003 (a benchmark of classical detectors on deep features of MVTec AD) pools each image's
backbone feature maps to one vector, standardises the vectors with scikit-learn's
``StandardScaler`` fitted on the training images, and optionally projects them with a PCA that
keeps 95 % of the training variance, before One-Class SVM, Isolation Forest, LOF or Elliptic
Envelope. :class:`VectorPreprocessor` does the same, fitted with scikit-learn, but keeps the
fitted parameters as tensors (no pickle) and applies them with torch on any device.
"""

from __future__ import annotations

import numpy as np
import torch

from vad.errors import VadError


def global_average_pool(features: torch.Tensor) -> torch.Tensor:
    """``[B, C, h, w] -> [B, C]``: the mean of each channel over the grid."""
    return features.mean(dim=(2, 3))


class VectorPreprocessor:
    """Standardisation (``StandardScaler``) then PCA (``PCA``), fitted on training vectors.

    ``transform`` computes ``((x - mean) / scale - pca_mean) @ components.T`` in float64. The
    arguments are the detector's already validated options (``pca``: None, a variance fraction
    in (0, 1) or an integer count of components >= 1).
    """

    def __init__(self, standardize: bool, pca: float | int | None, seed: int) -> None:
        self.standardize, self.pca, self.seed = standardize, pca, seed
        self.tensors: dict[str, torch.Tensor] = {}

    def fit(self, vectors: np.ndarray) -> np.ndarray:
        """Fit on training vectors ``[N, C]`` (float64) and return them transformed."""
        from sklearn.decomposition import PCA
        from sklearn.preprocessing import StandardScaler

        tensors: dict[str, torch.Tensor] = {}
        if self.standardize:
            scaler = StandardScaler().fit(vectors)
            tensors["scaler_mean"] = torch.from_numpy(scaler.mean_.astype(np.float64))
            tensors["scaler_scale"] = torch.from_numpy(scaler.scale_.astype(np.float64))
            vectors = scaler.transform(vectors)
        if self.pca is not None:
            limit = min(vectors.shape)
            if isinstance(self.pca, int) and self.pca > limit:
                raise VadError(
                    f"pca={self.pca} components asked for, but {vectors.shape[0]} training images of "
                    f"{vectors.shape[1]} features allow at most {limit}; lower pca or use a variance fraction such as 0.95"
                )
            projection = PCA(n_components=self.pca, svd_solver="full", random_state=self.seed).fit(vectors)
            tensors["pca_mean"] = torch.from_numpy(projection.mean_.astype(np.float64))
            tensors["pca_components"] = torch.from_numpy(projection.components_.astype(np.float64))
            vectors = projection.transform(vectors)
        self.tensors = tensors
        return vectors

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore fitted parameters (as returned in :attr:`tensors`)."""
        needed = (["scaler_mean", "scaler_scale"] if self.standardize else []) + (["pca_mean", "pca_components"] if self.pca is not None else [])
        missing = [name for name in needed if name not in tensors]
        if missing:
            raise VadError(f"the saved detector has no {missing[0]!r} tensor; the model folder is damaged, refit the model")
        self.tensors = {name: tensors[name].to(torch.float64) for name in needed}

    def to(self, device: torch.device) -> None:
        """Move the parameters to ``device``."""
        self.tensors = {name: value.to(device) for name, value in self.tensors.items()}

    @property
    def out_features(self) -> int | None:
        """Dimension after PCA (None without PCA: the input dimension)."""
        return int(self.tensors["pca_components"].shape[0]) if "pca_components" in self.tensors else None

    def transform(self, vectors: torch.Tensor) -> torch.Tensor:
        """Apply the fitted standardisation and PCA to ``[B, C]`` vectors (float64)."""
        vectors = vectors.to(torch.float64)
        if "scaler_mean" in self.tensors:
            vectors = (vectors - self.tensors["scaler_mean"]) / self.tensors["scaler_scale"]
        if "pca_components" in self.tensors:
            vectors = (vectors - self.tensors["pca_mean"]) @ self.tensors["pca_components"].T
        return vectors
