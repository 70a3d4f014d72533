"""What teacher distillation needs, shared by the teacher-student plugins (EfficientAD's PDN,
Uninformed Students' and GCAD's patch teachers): images from memory or from any folder, an
endless reshuffled sampler, the grayscale augmentation, ImageNet-style normalisation, and
teacher files (safetensors with the facts of their distillation as metadata).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from vad.errors import VadError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


def normalize(images01: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(x - mean) / std`` per channel for ``[B, 3, H, W]`` images in [0, 1]."""
    m = torch.tensor(mean, device=images01.device, dtype=images01.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, device=images01.device, dtype=images01.dtype).view(1, 3, 1, 1)
    return (images01 - m) / s


def denormalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Back to [0, 1] from ``(x - mean) / std``."""
    m = torch.tensor(mean, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images * s + m).clamp(0, 1)


def resize(images01: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Anti-aliased bilinear resize to ``size`` (a side, or ``(h, w)``), as PIL's ``Resize``."""
    from vad.preprocess import resize_batch

    return resize_batch(images01, (size, size) if isinstance(size, int) else tuple(size), "bilinear")


class TensorImages:
    """Images held in memory, ``[N, 3, H, W]`` in [0, 1]."""

    def __init__(self, images01: torch.Tensor) -> None:
        self.images = images01

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def load(self, indices: Sequence[int], size: int) -> torch.Tensor:
        """The images at ``indices`` resized to ``size x size``."""
        return resize(self.images[list(indices)], size)


class FolderImages:
    """Every image file under a folder (recursively), decoded on demand; ``owner`` names the
    command or detector in errors."""

    def __init__(self, folder: str | Path, owner: str) -> None:
        root = Path(folder).expanduser()
        if not root.is_dir():
            raise VadError(f"{owner}: image folder {str(root)!r} does not exist; give a folder of images (any layout, searched recursively)")
        self.paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not self.paths:
            raise VadError(f"{owner}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {str(root)!r}")

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, indices: Sequence[int], size: int) -> torch.Tensor:
        """The images at ``indices`` decoded, in [0, 1], resized to ``size x size``."""
        import numpy as np

        from vad.images import read_rgb

        batch = []
        for i in indices:
            image = torch.from_numpy(np.ascontiguousarray(read_rgb(self.paths[i]))).permute(2, 0, 1)[None].float() / 255.0
            batch.append(resize(image, size))
        return torch.cat(batch)


class Sampler:
    """Random batches of indices: the images reshuffled every pass (an infinite shuffled loader)."""

    def __init__(self, count: int, generator: torch.Generator) -> None:
        self.count, self.generator = count, generator
        self.order: list[int] = []

    def take(self, size: int) -> list[int]:
        out = []
        while len(out) < size:
            if not self.order:
                self.order = torch.randperm(self.count, generator=self.generator).tolist()
            out.append(self.order.pop(0))
        return out


def random_grayscale(images01: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """``RandomGrayscale(p)`` per image (ITU-R 601 luma, as torchvision)."""
    out = images01.clone()
    for i in range(images01.shape[0]):
        if float(torch.rand(1, generator=generator)) < p:
            gray = 0.299 * images01[i, 0] + 0.587 * images01[i, 1] + 0.114 * images01[i, 2]
            out[i] = gray[None].expand(3, -1, -1)
    return out


def save_teacher_file(path: str | Path, tensors: dict[str, torch.Tensor], file_format: str, facts: dict[str, Any]) -> None:
    """Write a teacher's tensors as safetensors, atomically, with ``format`` and every fact
    (JSON-encoded) as metadata."""
    from vad.artifacts import save_tensors

    metadata = {"format": file_format, **{key: json.dumps(value) for key, value in facts.items()}}
    save_tensors(path, tensors, metadata=metadata)


def read_teacher_file(path: str | Path, owner: str, how_to_make: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A teacher file's tensors and its facts (metadata, JSON-decoded; ``format`` as written);
    a VadError naming ``owner`` and ``how_to_make`` one when the file is missing or unreadable."""
    from safetensors import safe_open

    file = Path(path).expanduser()
    if not file.is_file():
        raise VadError(f"{owner}: teacher file {str(file)!r} does not exist; {how_to_make}")
    try:
        with safe_open(str(file), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        facts = {key: (value if key == "format" else json.loads(value)) for key, value in metadata.items()}
    except Exception as error:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise VadError(f"{owner}: cannot read teacher file {str(file)!r} ({error}); {how_to_make}") from error
    return tensors, facts
