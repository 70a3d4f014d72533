"""Vision transformers as feature grids: the patch tokens of chosen blocks as ``[B, C, H/p, W/p]``.

timm's ``features_only`` wrapper of a ViT keeps a fixed input size and the last blocks only, so
:class:`~vad_timm.backbone.TimmBackbone` builds the whole network instead (with
``dynamic_img_size``) and reads its blocks through timm's ``forward_intermediates``, which stops
after the deepest block asked for. Which networks take this path: those of timm's
``vision_transformer`` (DINOv2 ``vit_*_patch14_dinov2``, their ``reg4`` register variants, CLIP
``vit_*_clip_*``, SigLIP, DeiT-style ViTs), ``deit`` and ``eva`` (DINOv3
``vit_*_patch16_dinov3``) modules.

What the grid holds:

* the **patch tokens** only: the prefix tokens (class token, register tokens) are dropped; the
  token of patch ``(i, j)`` is grid cell ``(i, j)``, so the stride of every block is the patch
  size ``p``;
* inputs must be a **multiple of the patch size** (any such size: the position embedding is
  resized to the grid); other sizes are refused with a clear error rather than cropped or
  padded, which would shift the grid against the image;
* ``final_norm``: every returned block passes the network's final norm (what DINOv2's
  ``get_intermediate_layers(norm=True)`` returns); off, the raw residual stream.

Position embedding: it is resized once per input grid, from the pretrained one, and cached; it
takes the pretrained one's place during the forward pass only (the network's state dict stays the
pretrained one). The resize is two matrix products (:func:`resize_matrix`), so an ONNX trace holds
no interpolation operator (torch's antialiased bicubic has no ONNX export). Two rules
(``position_interpolation``): ``timm`` (bicubic, antialiased, to the exact grid: timm's dynamic
size, the official code of DINOv2 with registers) and ``dinov2`` (bicubic without antialiasing at
the scale factor ``(n + 0.1) / N``: the official DINOv2 code without registers,
``interpolate_offset=0.1``). RoPE networks (DINOv3) have no learned position embedding; their
rotary embedding follows the grid by itself.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from vad.errors import VadError

#: timm modules whose networks take the token-grid path.
TRANSFORMER_MODULES = ("vision_transformer", "deit", "eva")

#: The official DINOv2 code's offset of the interpolation scale factor (``interpolate_offset``).
DINOV2_INTERPOLATE_OFFSET = 0.1


def is_vision_transformer(timm: Any, architecture: str) -> bool:
    """Whether timm's ``architecture`` (no pretrained tag) is a ViT read as a token grid."""
    return bool(timm.models.is_model_in_modules(architecture, list(TRANSFORMER_MODULES)))


def default_position_interpolation(architecture: str) -> str:
    """The official rule for the weights: ``dinov2`` for DINOv2 without registers, else ``timm``."""
    return "dinov2" if architecture.endswith("_dinov2") and "_reg" not in architecture else "timm"


def _keys_cubic(distance: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel with parameter ``a`` at ``|distance|`` (0 beyond 2)."""
    inner = ((a + 2.0) * distance - (a + 3.0)) * distance * distance + 1.0
    outer = (((distance - 5.0) * distance + 8.0) * distance - 4.0) * a
    return np.where(distance < 1.0, inner, np.where(distance < 2.0, outer, 0.0))


def resize_matrix(length: int, size: int, rule: str) -> np.ndarray:
    """``[size, length]``: torch's bicubic interpolation along one axis as a matrix.

    ``timm``: ``F.interpolate(size=..., mode="bicubic", antialias=True)`` (Keys a = -0.5, the
    kernel widened by the shrink factor, weights normalised over the samples inside the axis);
    ``dinov2``: ``F.interpolate(scale_factor=(size + 0.1) / length, mode="bicubic",
    antialias=False)`` (a = -0.75, source ``(i + 0.5) / scale - 0.5``, indices clamped to the
    axis). A matrix, not an interpolation call, so an ONNX trace holds only products.
    """
    outputs = np.arange(size, dtype=np.float64)
    matrix = np.zeros((size, length))
    if rule == "dinov2":
        source = (outputs + 0.5) * length / (size + DINOV2_INTERPOLATE_OFFSET) - 0.5
        first = np.floor(source)
        for offset in (-1, 0, 1, 2):
            index = np.clip(first + offset, 0, length - 1).astype(np.int64)
            np.add.at(matrix, (np.arange(size), index), _keys_cubic(np.abs(source - (first + offset)), -0.75))
        return matrix
    scale = length / size
    distance = (np.arange(length)[None, :] + 0.5 - scale * (outputs[:, None] + 0.5)) / max(scale, 1.0)
    weights = _keys_cubic(np.abs(distance), -0.5)
    return weights / weights.sum(axis=1, keepdims=True)


def resize_position_embedding(
    embedding: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int], prefix: int, rule: str
) -> torch.Tensor:
    """``[1, prefix + h*w, C]`` position embedding of ``old_grid`` resized to ``new_grid``.

    The first ``prefix`` entries (those of the class token, when the network adds one to it) are
    kept; the patch entries are resized as ``rule`` says (module docstring, :func:`resize_matrix`).
    """
    if tuple(old_grid) == tuple(new_grid):
        return embedding
    if rule == "dinov2" and old_grid[0] != old_grid[1]:
        raise VadError(f"position_interpolation 'dinov2' resizes a square pretrained grid, this network's is {old_grid[0]}x{old_grid[1]}; use 'timm'")
    head, patches = embedding[:, :prefix], embedding[:, prefix:]
    channels = patches.shape[-1]
    rows = torch.from_numpy(resize_matrix(old_grid[0], new_grid[0], rule)).to(patches.device, torch.float32)
    cols = torch.from_numpy(resize_matrix(old_grid[1], new_grid[1], rule)).to(patches.device, torch.float32)
    grid = patches.float().reshape(old_grid[0], old_grid[1], channels)
    resized = torch.einsum("ij,jkc,lk->ilc", rows, grid, cols).reshape(1, -1, channels).to(embedding.dtype)
    return torch.cat([head, resized], dim=1)


class TokenGrid:
    """A timm ViT read as feature grids at any input size that is a multiple of its patch size."""

    def __init__(self, model: nn.Module, position_interpolation: str) -> None:
        self.model = model
        self.rule = position_interpolation
        self.patch = int(model.patch_embed.patch_size[0])
        if tuple(model.patch_embed.patch_size) != (self.patch, self.patch):
            raise VadError(f"vision transformers with non-square patches {tuple(model.patch_embed.patch_size)} are not supported")
        self.native_grid = tuple(int(n) for n in model.patch_embed.grid_size)
        self.prefix = 0 if getattr(model, "no_embed_class", False) else int(model.num_prefix_tokens)
        #: Position embeddings resized to other grids, by grid (on the network's device).
        self._resized: dict[tuple[int, int], nn.Parameter] = {}

    @property
    def class_tokens(self) -> int:
        """1 when the network has a class token, else 0."""
        return int(getattr(self.model, "cls_token", None) is not None)

    @property
    def register_tokens(self) -> int:
        """The network's register tokens (DINOv2 ``reg4``, DINOv3)."""
        registers = getattr(self.model, "reg_token", None)
        return 0 if registers is None else int(registers.shape[1])

    @property
    def has_position_embedding(self) -> bool:
        """False for networks with rotary position embeddings only (DINOv3)."""
        return getattr(self.model, "pos_embed", None) is not None

    def check_size(self, height: int, width: int) -> None:
        """A clear error unless both sides are multiples of the patch size."""
        if height % self.patch or width % self.patch:
            def near(side: int) -> str:
                lower = side - side % self.patch
                return str(side) if lower == side else f"{lower} or {lower + self.patch}" if lower else str(self.patch)

            raise VadError(
                f"the vision transformer reads {self.patch} x {self.patch} px patches, and a {height}x{width} px input is not a "
                f"multiple of {self.patch}: resize the images to a multiple (height {near(height)}, width {near(width)}), "
                "e.g. with --image-size"
            )

    @contextlib.contextmanager
    def grid(self, grid: tuple[int, int]) -> Iterator[None]:
        """Within the block, ``grid`` is the network's own: its position embedding resized (once
        per grid, from the pretrained one, which is back in place afterwards) and the patch
        embedding's size set, so the forward pass resizes nothing."""
        model = self.model
        if grid == self.native_grid or not self.has_position_embedding:
            yield
            return
        native = model.pos_embed
        if grid not in self._resized:
            resized = resize_position_embedding(native.detach(), self.native_grid, grid, self.prefix, self.rule)
            self._resized[grid] = nn.Parameter(resized, requires_grad=False)
        model.pos_embed = self._resized[grid]
        model.patch_embed.set_input_size(img_size=(grid[0] * self.patch, grid[1] * self.patch))
        try:
            yield
        finally:
            model.pos_embed = native
            model.patch_embed.set_input_size(img_size=(self.native_grid[0] * self.patch, self.native_grid[1] * self.patch))

    def to(self, device: torch.device) -> None:
        """Forget the resized embeddings (they are made again on the network's new device)."""
        self._resized.clear()

    def run(self, images: torch.Tensor, blocks: Sequence[int], final_norm: bool) -> dict[int, torch.Tensor]:
        """``{block: [B, C, H/p, W/p]}``: the patch tokens after each of ``blocks`` (0-based)."""
        height, width = (int(side) for side in images.shape[-2:])  # plain ints also in a trace: the grid is fixed
        self.check_size(height, width)
        wanted = sorted(set(blocks))
        with self.grid((height // self.patch, width // self.patch)):
            maps = self.model.forward_intermediates(
                images, indices=wanted, norm=final_norm, output_fmt="NCHW", intermediates_only=True, stop_early=True
            )
        return dict(zip(wanted, maps))

    def facts(self, final_norm: bool) -> dict[str, Any]:
        """What ``describe`` says about the token grid."""
        return {
            "patch_size": self.patch,
            "input_multiple": self.patch,
            "pretrained_grid": list(self.native_grid),
            "prefix_tokens": {
                "class": self.class_tokens,
                "registers": self.register_tokens,
                "other": int(self.model.num_prefix_tokens) - self.class_tokens - self.register_tokens,  # DeiT's distillation token
            },
            "grid": "patch tokens only: every prefix token (class, registers) is dropped",
            "final_norm": final_norm,
            "position_interpolation": self.rule if self.has_position_embedding else "none (rotary position embedding follows the grid)",
        }
