"""AnomalyDINO's numerical parts in plain torch, traceable for ONNX export.

Each follows the official code (github.com/dammsi/AnomalyDINO, ``src/detection.py``,
``src/backbones.py``, ``src/utils.py``, ``src/post_eval.py``):

* :func:`nearest_distances`: the official kNN is faiss ``IndexFlatL2`` on the features, which for
  ``knn_metric="L2_normalized"`` (default) are unit vectors: the mean squared distance to the
  ``k`` nearest reference patches halved, i.e. the cosine distance ``1 - cos`` for ``k = 1``;
  ``"L2"``: the square root of that mean on the raw features. Exact, in blocks of bank rows;
* :func:`top_percent_mean`: ``mean_top1p``, the image score: the mean of the ``int(0.01 N)``
  largest patch distances of the ``N`` patches (the largest one when that is 0), masked
  background patches counting as 0;
* :func:`background_mask`: the zero-shot foreground mask of ``compute_background_mask``: the
  first principal component of the image's patch features thresholded (``> 10``), its sign
  flipped when no more than 35 % of the central crop (20 % border) is foreground, then a
  dilation and a closing with a 3-wide kernel. The official code applies the two to the ``N x 1``
  column of patches, i.e. along the flattened (row-major) patch sequence (``morphology="raster"``);
  anomalib 2.7 applies them on the 2D patch grid (``"grid"``);
* :func:`rotate`: the reference augmentation of ``augment_image``: rotations by 0, 45, ..., 315
  degrees (counter-clockwise), bilinear, the border reflected without repeating its last pixel
  (OpenCV ``BORDER_REFLECT_101``).

The first principal component: sklearn's randomized PCA in the official code; here the
covariance matrix raised to the power ``2^12`` by repeated squaring (each normalised), its
dominant column refined by two power steps: exact to float precision whenever the first
eigenvalue is distinct, with no iteration count that depends on the data, so it traces into a
fixed ONNX graph. Its sign follows sklearn (>= 1.5): the component's largest-magnitude entry is
positive.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

#: The official reference augmentation: rotations in degrees (``augment_image``).
ROTATION_ANGLES = (0, 45, 90, 135, 180, 225, 270, 315)
#: Repeated squarings of the covariance for the first principal component (power 2**12).
PCA_SQUARINGS = 12
#: Power steps refining the component on the covariance itself.
PCA_REFINEMENTS = 2


def rotate(images: torch.Tensor, degrees: float) -> torch.Tensor:
    """``images [B, C, H, W]`` rotated counter-clockwise by ``degrees`` about the image centre,
    same size, bilinear, border reflected (OpenCV ``BORDER_REFLECT_101``)."""
    if degrees % 360 == 0:
        return images
    _, _, height, width = images.shape
    angle = math.radians(degrees)
    cos, sin = math.cos(angle), math.sin(angle)
    ys, xs = torch.meshgrid(
        torch.arange(height, dtype=torch.float32, device=images.device),
        torch.arange(width, dtype=torch.float32, device=images.device),
        indexing="ij",
    )
    cx, cy = (width - 1) / 2, (height - 1) / 2
    # the source pixel of each output pixel: the inverse rotation (cv2.warpAffine's convention)
    source_x = cos * (xs - cx) - sin * (ys - cy) + cx
    source_y = sin * (xs - cx) + cos * (ys - cy) + cy
    grid = torch.stack([2 * source_x / max(width - 1, 1) - 1, 2 * source_y / max(height - 1, 1) - 1], dim=-1)
    grid = grid[None].expand(images.shape[0], -1, -1, -1)
    # align_corners=True reflects about the border pixels' centres: BORDER_REFLECT_101
    return F.grid_sample(images, grid.to(images.dtype), mode="bilinear", padding_mode="reflection", align_corners=True)


def nearest_distances(
    queries: torch.Tensor,
    bank: torch.Tensor,
    k: int,
    metric: str,
    bank_chunk: int,
    query_owners: torch.Tensor | None = None,
    bank_owners: torch.Tensor | None = None,
) -> torch.Tensor:
    """Distance ``[Q]`` of each query row to its ``k`` nearest bank rows, compared ``bank_chunk``
    rows at a time: ``mean_k(d^2) / 2`` for ``cosine`` (rows are unit vectors: ``1 - cos`` for
    ``k = 1``), ``sqrt(mean_k(d^2))`` for ``euclidean``. With owners, bank rows of a query's own
    owner are left out (leave-one-image-out)."""
    query_norms = queries.square().sum(1, keepdim=True)
    best: torch.Tensor | None = None  # [Q, k] smallest squared distances so far
    for start in range(0, bank.shape[0], bank_chunk):
        rows = bank[start : start + bank_chunk]
        squared = (query_norms + rows.square().sum(1)[None, :] - 2.0 * (queries @ rows.T)).clamp_min(0.0)
        if query_owners is not None and bank_owners is not None:
            own = query_owners[:, None] == bank_owners[None, start : start + bank_chunk]
            squared = squared.masked_fill(own, float("inf"))
        smallest = squared.topk(min(k, rows.shape[0]), dim=1, largest=False).values
        best = smallest if best is None else torch.cat([best, smallest], dim=1).topk(min(k, best.shape[1] + smallest.shape[1]), dim=1, largest=False).values
    assert best is not None, "the memory bank is empty"
    mean = best.mean(1)
    return mean / 2 if metric == "cosine" else mean.sqrt()


def top_percent_mean(distances: torch.Tensor, fraction: float = 0.01) -> torch.Tensor:
    """``[B, N] -> [B]``: the mean of each row's ``int(fraction * N)`` largest values (the largest
    value when that is 0), the official ``mean_top1p``."""
    count = max(1, int(distances.shape[1] * fraction))
    return distances.topk(count, dim=1).values.mean(1)


def first_principal_scores(tokens: torch.Tensor) -> torch.Tensor:
    """``[B, N, C] -> [B, N]``: each image's patches projected on the first principal component
    of its own patches (centred), sign as sklearn's PCA (module docstring)."""
    centred = tokens - tokens.mean(1, keepdim=True)
    covariance = centred.transpose(1, 2) @ centred  # [B, C, C]
    power = covariance / covariance.flatten(1).norm(dim=1).clamp_min(1e-30)[:, None, None]
    for _ in range(PCA_SQUARINGS):
        power = power @ power
        power = power / power.flatten(1).norm(dim=1).clamp_min(1e-30)[:, None, None]
    # the rank-one limit's largest column points along the component
    column = power.norm(dim=1).argmax(dim=1)  # [B]
    vector = torch.gather(power, 2, column[:, None, None].expand(-1, power.shape[1], 1))  # [B, C, 1]
    for _ in range(PCA_REFINEMENTS):
        vector = covariance @ vector
        vector = vector / vector.norm(dim=1, keepdim=True).clamp_min(1e-30)
    largest = vector.abs().argmax(dim=1, keepdim=True)  # [B, 1, 1]
    vector = vector * torch.gather(vector, 1, largest).sign()
    return (centred @ vector)[:, :, 0]


def _dilate(mask: torch.Tensor, kernel: int, raster: bool) -> torch.Tensor:
    """Max over a ``kernel`` window (positions outside the image do not count): along the
    flattened patch sequence (``raster``) or over the 2D grid; ``mask`` is float ``[B, h, w]``."""
    batch, height, width = mask.shape
    if raster:
        return F.max_pool1d(mask.reshape(batch, 1, height * width), kernel, 1, kernel // 2).reshape(batch, height, width)
    return F.max_pool2d(mask[:, None], kernel, 1, kernel // 2)[:, 0]


def background_mask(
    features: torch.Tensor, threshold: float, border: float, centre_share: float, kernel: int, morphology: str
) -> torch.Tensor:
    """Foreground patches ``[B, h, w]`` (bool) of each image's grid ``features [B, C, h, w]``,
    as the official ``compute_background_mask`` (module docstring)."""
    batch, _, height, width = features.shape
    scores = first_principal_scores(features.flatten(2).transpose(1, 2)).reshape(batch, height, width)
    positive = scores > threshold
    top, bottom = int(height * border), int(height * (1 - border))
    left, right = int(width * border), int(width * (1 - border))
    centre = positive[:, top:bottom, left:right].flatten(1)
    keeps_sign = centre.float().sum(1) > centre_share * centre.shape[1]
    mask = torch.where(keeps_sign[:, None, None], positive.float(), (-scores > threshold).float())
    raster = morphology == "raster"
    mask = _dilate(mask, kernel, raster)  # dilation
    mask = _dilate(mask, kernel, raster)  # closing: dilation, then erosion
    mask = -_dilate(-mask, kernel, raster)
    return mask > 0.5
