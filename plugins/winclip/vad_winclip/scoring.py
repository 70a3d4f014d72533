"""WinCLIP's numerical core, plain torch (traceable for ONNX): window embeddings, the
language-guided (zero-shot) scores, the reference association (few-shot) and their aggregation.

Notation of the paper (Jeong et al., CVPR 2023): an image of a ``g_h x g_w`` patch grid; a
*window* of scale ``s`` covers ``s x s`` neighbouring patches, one window at every patch
position where it fits (stride 1 patch). Its embedding is the class token of the CLIP image
encoder run on the class token and the window's patch tokens only (the others masked out, each
kept token with its own positional embedding), projected to the joint space.

* zero-shot score of an embedding ``f`` (eq. 1): ``softmax(scale * [cos(f, g_n), cos(f, g_a)])``
  at the anomalous class, ``scale`` the CLIP logit scale (1 / temperature), ``g_n`` and ``g_a``
  the text embeddings of the prompt ensemble;
* harmonic aggregation: the score of a patch at one scale is the harmonic mean of the scores of
  the windows that cover it;
* zero-shot map ``M_0``: the harmonic mean over the window scales and the image scale (the
  image-level score spread over the grid); zero-shot image score: the image-level score;
* few-shot (WinCLIP+): the distance of an embedding to a memory of the reference images'
  embeddings of the same kind is ``min_r (1 - cos(f, r)) / 2`` (eq. 4); patch level (the
  encoder's output patch tokens) and each window scale, window distances harmonically aggregated,
  give ``M_W`` = their mean;
* WinCLIP+: map ``(M_0 + M_W) / 2``, image score ``(score_0 + max M_W) / 2``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: Memory rows compared at once in the reference association (bounds the similarity matrix).
ASSOCIATION_CHUNK = 16384


def window_indices(grid: tuple[int, int], scale: int) -> torch.Tensor:
    """``[n, scale * scale]`` patch indices (row-major in the grid) of every ``scale x scale``
    window at stride 1, windows ordered by their top-left patch, row by row."""
    height, width = grid
    positions = torch.arange(height * width).reshape(height, width)
    windows = positions.unfold(0, scale, 1).unfold(1, scale, 1)  # [h - s + 1, w - s + 1, s, s]
    return windows.reshape(-1, scale * scale).contiguous()


def coverage(grid: tuple[int, int], indices: torch.Tensor) -> torch.Tensor:
    """``[patches, windows]`` bool: which windows (``indices`` from :func:`window_indices`) cover
    which patch."""
    patches = torch.arange(grid[0] * grid[1]).view(-1, 1, 1)
    return (indices.unsqueeze(0) == patches).any(dim=2)


def harmonic_aggregation(window_scores: torch.Tensor, covered: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Per patch, the harmonic mean of the scores ``[B, windows]`` of the windows covering it
    (``covered`` from :func:`coverage`): ``[B, h, w]``. A zero score makes the mean zero."""
    inverse = torch.where(covered.unsqueeze(0), (1.0 / window_scores).unsqueeze(1), torch.zeros((), dtype=window_scores.dtype, device=window_scores.device))
    return (covered.sum(dim=1).to(window_scores.dtype) / inverse.sum(dim=2)).reshape(-1, *grid)


def harmonic_mean(maps: list[torch.Tensor]) -> torch.Tensor:
    """Element-wise harmonic mean of equally shaped tensors (zero where any of them is zero)."""
    return len(maps) / sum(1.0 / m for m in maps)


def anomaly_probability(embeddings: torch.Tensor, text: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """The zero-shot score (eq. 1): the softmax over ``logit_scale`` times the cosine similarities
    to the normal and anomalous text embeddings ``text [2, D]``, at the anomalous class; ``[...]``
    for ``embeddings [..., D]``."""
    cosine = F.normalize(embeddings, dim=-1) @ F.normalize(text, dim=-1).T
    return (logit_scale * cosine).softmax(dim=-1)[..., 1]


def association_distance(
    queries: torch.Tensor,
    memory: torch.Tensor,
    owners: torch.Tensor | None = None,
    exclude: torch.Tensor | None = None,
    chunk: int = ASSOCIATION_CHUNK,
) -> torch.Tensor:
    """The reference association (eq. 4): ``min_r (1 - cos(q, r)) / 2`` over the memory rows
    ``memory [M, C]`` (L2-normalised) for ``queries [B, N, C]``: ``[B, N]``.

    With ``owners [M]`` (the reference image of each row) and ``exclude [B]``, the rows of
    reference image ``exclude[b]`` are left out for query image ``b`` (leave-one-out)."""
    normalised = F.normalize(queries, dim=-1)
    best: torch.Tensor | None = None
    for start in range(0, memory.shape[0], chunk):
        similarity = normalised @ memory[start : start + chunk].T  # [B, N, c]
        if exclude is not None and owners is not None:
            own = owners[start : start + chunk].unsqueeze(0) == exclude.unsqueeze(1)  # [B, c]
            similarity = similarity.masked_fill(own.unsqueeze(1), float("-inf"))
        nearest = similarity.amax(dim=2)
        best = nearest if best is None else torch.maximum(best, nearest)
    assert best is not None, "the memory is empty"
    return ((1.0 - best) / 2.0).clamp_min(0.0)


class WindowEncoder(nn.Module):
    """An open_clip ``VisionTransformer`` giving, for images ``[B, 3, H, W]``, the image
    embedding ``[B, D]``, the window embeddings of each scale ``[B, n_s, D]`` and the output patch
    tokens ``[B, P, W]`` (after the final layer norm, not projected)."""

    def __init__(self, visual: nn.Module, scales: tuple[int, ...]) -> None:
        super().__init__()
        self.visual = visual.eval().requires_grad_(False)
        self.grid = tuple(int(g) for g in visual.grid_size)
        self.scales = tuple(scales)
        for scale in self.scales:
            self.register_buffer(f"windows_{scale}", window_indices(self.grid, scale), persistent=False)

    def window_index(self, scale: int) -> torch.Tensor:
        """The ``[n, scale * scale]`` patch indices of the windows of ``scale``."""
        return getattr(self, f"windows_{scale}")

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Class token and patch tokens with their positional embeddings: ``[B, 1 + P, W]``."""
        visual = self.visual
        patches = visual.conv1(images).flatten(2).transpose(1, 2)  # [B, P, W]
        cls = visual.class_embedding.to(patches.dtype).view(1, 1, -1).expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + visual.positional_embedding.to(patches.dtype)

    def transform(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder from its input tokens ``[N, L, W]``: the projected class-token embedding
        ``[N, D]`` and the normalised output tokens ``[N, L - 1, W]``."""
        visual = self.visual
        x = visual.transformer(visual.ln_pre(tokens))  # open_clip's transformer takes [N, L, W]
        pooled, rest = visual._pool(x)  # final layer norm, class token and patch tokens
        if visual.proj is not None:
            pooled = pooled @ visual.proj
        return pooled, rest

    def patch_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """The output patch tokens ``[B, P, W]`` alone (no windows)."""
        return self.transform(self.tokens(images))[1]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """``(image embedding, [window embeddings per scale], patch tokens)``."""
        tokens = self.tokens(images)
        image, patches = self.transform(tokens)
        batch, width = tokens.shape[0], tokens.shape[2]
        windows = []
        for scale in self.scales:
            index = self.window_index(scale)
            count = index.shape[0]
            inside = tokens[:, 1 + index]  # [B, n, s*s, W]
            cls = tokens[:, :1].unsqueeze(1).expand(batch, count, 1, width)
            pooled, _ = self.transform(torch.cat([cls, inside], dim=2).reshape(batch * count, 1 + index.shape[1], width))
            windows.append(pooled.reshape(batch, count, -1))
        return image, windows, patches


class WinClipHead(nn.Module):
    """The fitted WinCLIP: ``images -> (scores [B], maps [B, h, w])`` on the patch grid.

    Buffers: the text embeddings ``[2, D]`` (normal, anomalous); with a reference memory
    (WinCLIP+), the L2-normalised patch tokens ``[K * P, W]`` and window embeddings
    ``[K * n_s, D]`` of the ``K`` reference images and each row's reference image.
    """

    def __init__(
        self,
        encoder: WindowEncoder,
        text: torch.Tensor,
        logit_scale: float,
        memory: dict[str, torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.grid = encoder.grid
        self.scales = encoder.scales
        self.logit_scale = float(logit_scale)
        self.register_buffer("text", text)
        for scale in self.scales:
            self.register_buffer(f"coverage_{scale}", coverage(self.grid, encoder.window_index(scale)), persistent=False)
        self.few_shot = memory is not None
        if memory is not None:
            for name, embeddings in memory.items():  # [K, N, C]
                references, count = embeddings.shape[:2]
                self.register_buffer(f"memory_{name}", F.normalize(embeddings.reshape(references * count, -1), dim=-1))
                self.register_buffer(f"owners_{name}", torch.arange(references, device=embeddings.device).repeat_interleave(count))

    def covered(self, scale: int) -> torch.Tensor:
        """Which windows of ``scale`` cover which patch (``[P, n]``)."""
        return getattr(self, f"coverage_{scale}")

    def zero_shot(self, image: torch.Tensor, windows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Language-guided image scores ``[B]`` and map ``M_0 [B, h, w]``."""
        score = anomaly_probability(image, self.text, self.logit_scale)
        maps = [score.view(-1, 1, 1).expand(-1, *self.grid)]
        for scale, embeddings in zip(self.scales, windows):
            maps.append(harmonic_aggregation(anomaly_probability(embeddings, self.text, self.logit_scale), self.covered(scale), self.grid))
        return score, harmonic_mean(maps)

    def few_shot_map(self, windows: list[torch.Tensor], patches: torch.Tensor, exclude: torch.Tensor | None = None) -> torch.Tensor:
        """Vision-based map ``M_W [B, h, w]``: the mean of the patch-level and the window scales'
        association maps; ``exclude [B]``: each image's own reference rows are left out."""
        maps = [association_distance(patches, self.memory_patches, self.owners_patches, exclude).reshape(-1, *self.grid)]
        for scale, embeddings in zip(self.scales, windows):
            memory, owners = getattr(self, f"memory_window_{scale}"), getattr(self, f"owners_window_{scale}")
            maps.append(harmonic_aggregation(association_distance(embeddings, memory, owners, exclude), self.covered(scale), self.grid))
        return sum(maps) / len(maps)

    def score(
        self, encoded: tuple[torch.Tensor, list[torch.Tensor], torch.Tensor], exclude: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores and maps from :class:`WindowEncoder` outputs."""
        image, windows, patches = encoded
        score, maps = self.zero_shot(image, windows)
        if not self.few_shot:
            return score, maps
        vision = self.few_shot_map(windows, patches, exclude)
        return (score + vision.flatten(1).amax(dim=1)) / 2.0, (maps + vision) / 2.0

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scores [B], maps [B, h, w])``."""
        if not torch.onnx.is_in_onnx_export():
            return self.score(self.encoder(images))
        # attention's fused inference kernel has no ONNX form: trace the plain computation
        fused = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            return self.score(self.encoder(images))
        finally:
            torch.backends.mha.set_fastpath_enabled(fused)


__all__ = [
    "ASSOCIATION_CHUNK",
    "WinClipHead",
    "WindowEncoder",
    "anomaly_probability",
    "association_distance",
    "coverage",
    "harmonic_aggregation",
    "harmonic_mean",
    "window_indices",
]
