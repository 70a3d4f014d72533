"""Reverse Distillation's numerical core (Deng & Li, CVPR 2022): plain torch, no I/O.

* :class:`OneClassBottleneck` (OCBE): multi-scale feature fusion of the three encoder levels
  (level 1: two strided 3x3 conv + BN + ReLU, level 2: one, level 3 as is; concatenated) and the
  one-class embedding block, a ResNet "layer4"-like stage of residual blocks at stride 2
  (official ``resnet.py: BN_layer``);
* :class:`ReverseDecoder`: the encoder's levels 3..1 mirrored with upsampling residual blocks
  whose strided convolutions are 2x2 deconvolutions of stride 2 (official ``de_resnet.py``);
* :func:`distillation_loss`, :func:`anomaly_map`, :func:`gaussian_blur`: the training loss,
  the multi-scale map and the smoothing before the image score (official ``main.py`` and
  ``test.py``).

Both networks are built from the encoder levels' channels ``(c1, c2, c3)`` and an
:class:`Architecture` (residual block, blocks per stage, bottleneck width). With a ResNet's
``layer1..3`` channels (``64e, 128e, 256e`` for block expansion ``e``) and the official
architecture of :data:`OFFICIAL_ARCHITECTURES` this is exactly the official ``BN_layer`` and
``de_resnet*`` (module names, shapes, initialisation), so the official checkpoints' ``bn`` and
``decoder`` state dicts load into them (without the official ``conv4``/``bn4``, see
:class:`OneClassBottleneck`). Any other encoder gets :data:`GENERIC_ARCHITECTURE`, the ResNet-18
recipe on its own channels.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    """3x3 convolution, padding 1, no bias."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, groups=groups, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution, no bias."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


def deconv2x2(in_planes: int, out_planes: int, groups: int = 1) -> nn.ConvTranspose2d:
    """2x2 deconvolution of stride 2 (doubles the side), no bias."""
    return nn.ConvTranspose2d(in_planes, out_planes, kernel_size=2, stride=2, groups=groups, bias=False)


# --------------------------------------------------------------------------- residual blocks


class BasicBlock(nn.Module):
    """ResNet's basic block (two 3x3 convs); ``up=True``: the first conv is a 2x2 deconvolution
    of stride 2 (the decoder's upsampling block), else a 3x3 conv of ``stride``."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, shortcut: nn.Module | None = None, up: bool = False, groups: int = 1, base_width: int = 64) -> None:
        super().__init__()
        self.conv1 = deconv2x2(inplanes, planes) if up else conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        # the official names: "downsample" in the encoder-side OCBE, "upsample" in the decoder
        setattr(self, "upsample" if up else "downsample", shortcut)
        self._shortcut = "upsample" if up else "downsample"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = getattr(self, self._shortcut)
        identity = x if shortcut is None else shortcut(x)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """ResNet's bottleneck block (1x1, 3x3, 1x1; width ``planes * base_width / 64 * groups``);
    ``up=True``: the 3x3 conv is a 2x2 deconvolution of stride 2."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, shortcut: nn.Module | None = None, up: bool = False, groups: int = 1, base_width: int = 64) -> None:
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = deconv2x2(width, width, groups) if up else conv3x3(width, width, stride, groups)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        setattr(self, "upsample" if up else "downsample", shortcut)
        self._shortcut = "upsample" if up else "downsample"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = getattr(self, self._shortcut)
        identity = x if shortcut is None else shortcut(x)
        return self.relu(out + identity)


BLOCKS: dict[str, type[BasicBlock] | type[Bottleneck]] = {"basic": BasicBlock, "bottleneck": Bottleneck}


@dataclass(frozen=True)
class Architecture:
    """The residual recipe of the OCBE and the decoder.

    ``block``: ``"basic"`` or ``"bottleneck"``; ``oce_blocks``: blocks of the one-class
    embedding stage; ``decoder_blocks``: blocks of the decoder stages that rebuild levels 3, 2, 1
    (in that order, as the official ``de_resnet``'s ``layer1..3``); ``base_width``: the
    bottleneck width per group (128 for Wide ResNets).
    """

    block: Literal["basic", "bottleneck"]
    oce_blocks: int
    decoder_blocks: tuple[int, int, int]
    base_width: int = 64


#: The official encoder/OCBE/decoder triples (``resnet.py`` and ``de_resnet.py``): note that the
#: official decoders reuse the encoder's first three block counts in order, so the decoder stage
#: rebuilding level 3 has as many blocks as the encoder's layer1 (3 for ResNet-50), not layer3.
OFFICIAL_ARCHITECTURES: dict[str, Architecture] = {
    "resnet18": Architecture("basic", 2, (2, 2, 2)),
    "resnet34": Architecture("basic", 3, (3, 4, 6)),
    "resnet50": Architecture("bottleneck", 3, (3, 4, 6)),
    "wide_resnet50_2": Architecture("bottleneck", 3, (3, 4, 6), base_width=128),
}
#: Any other encoder (EfficientNet-Lite, ...): the ResNet-18 recipe on the encoder's channels.
GENERIC_ARCHITECTURE = OFFICIAL_ARCHITECTURES["resnet18"]


def check_channels(channels: Sequence[int], architecture: Architecture) -> tuple[int, int, int]:
    """The three levels' channels as ints; a ValueError when the block cannot produce them."""
    if len(channels) != 3:
        raise ValueError(f"reverse distillation distils exactly three encoder levels, got {len(channels)}")
    expansion = BLOCKS[architecture.block].expansion
    if any(int(c) % expansion for c in channels):
        raise ValueError(f"encoder channels {list(channels)} are not multiples of the {architecture.block} block's expansion {expansion}")
    return int(channels[0]), int(channels[1]), int(channels[2])


def init_official(module: nn.Module) -> None:
    """The official initialisation: Kaiming-normal (fan_out, ReLU) for every ``Conv2d``, BN to
    weight 1 and bias 0. Deconvolutions (``ConvTranspose2d`` is no ``Conv2d``) keep torch's default."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)


# --------------------------------------------------------------------------- OCBE


class OneClassBottleneck(nn.Module):
    """OCBE: multi-scale feature fusion + one-class embedding (official ``BN_layer``).

    Levels ``(c1, c2, c3)`` at strides ``(s, 2s, 4s)``: level 1 goes through ``conv1`` (3x3,
    stride 2, c1 -> c2) and ``conv2`` (3x3, stride 2, c2 -> c3), level 2 through ``conv3`` (3x3,
    stride 2, c2 -> c3), each followed by BN and ReLU; concatenated with level 3 (``3 * c3``
    channels at stride 4s) they enter ``bn_layer``, a residual stage of stride 2 with
    ``2 * c3`` output channels (ResNet's layer4 for ResNet channels).

    Deviation: the official ``BN_layer`` also declares ``conv4`` (1x1) and ``bn4``, which its
    ``forward`` never uses (no gradient reaches them, Adam leaves them as initialised); they are
    left out here.
    """

    def __init__(self, channels: Sequence[int], architecture: Architecture) -> None:
        super().__init__()
        c1, c2, c3 = check_channels(channels, architecture)
        block = BLOCKS[architecture.block]
        planes = 2 * c3 // block.expansion
        # module order as the official code: bn_layer first
        self.bn_layer = _stage(block, 3 * c3, planes, architecture.oce_blocks, architecture.base_width, up=False)
        self.conv1 = conv3x3(c1, c2, 2)
        self.bn1 = nn.BatchNorm2d(c2)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(c2, c3, 2)
        self.bn2 = nn.BatchNorm2d(c3)
        self.conv3 = conv3x3(c2, c3, 2)
        self.bn3 = nn.BatchNorm2d(c3)
        self.out_channels = 2 * c3
        init_official(self)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """The one-class embedding ``[B, 2 * c3, h / 2, w / 2]`` of the levels ``[f1, f2, f3]``."""
        level1 = self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(features[0]))))))
        level2 = self.relu(self.bn3(self.conv3(features[1])))
        return self.bn_layer(torch.cat([level1, level2, features[2]], 1)).contiguous()


def _stage(block: type[BasicBlock] | type[Bottleneck], inplanes: int, planes: int, blocks: int, base_width: int, up: bool) -> nn.Sequential:
    """A residual stage changing the side by 2 (down with stride 2, or up with deconvolutions);
    its first block has a projection shortcut (conv 1x1 stride 2 or deconv 2x2 stride 2, + BN)."""
    out = planes * block.expansion
    shortcut = nn.Sequential(deconv2x2(inplanes, out) if up else conv1x1(inplanes, out, 2), nn.BatchNorm2d(out))
    layers = [block(inplanes, planes, 2, shortcut, up=up, base_width=base_width)]
    layers += [block(out, planes, base_width=base_width) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------- decoder


class ReverseDecoder(nn.Module):
    """The student: the encoder's levels 3, 2, 1 mirrored (official ``de_resnet``).

    From the one-class embedding (``2 * c3`` channels, stride 8s) ``layer1`` rebuilds level 3
    (c3, stride 4s), ``layer2`` level 2 (c2, 2s) and ``layer3`` level 1 (c1, s), each a stage of
    upsampling residual blocks whose first block doubles the side with 2x2 deconvolutions.
    """

    def __init__(self, channels: Sequence[int], architecture: Architecture) -> None:
        super().__init__()
        c1, c2, c3 = check_channels(channels, architecture)
        block = BLOCKS[architecture.block]
        e, width = block.expansion, architecture.base_width
        first, second, third = architecture.decoder_blocks
        self.layer1 = _stage(block, 2 * c3, c3 // e, first, width, up=True)
        self.layer2 = _stage(block, c3, c2 // e, second, width, up=True)
        self.layer3 = _stage(block, c2, c1 // e, third, width, up=True)
        init_official(self)

    def forward(self, embedding: torch.Tensor) -> list[torch.Tensor]:
        """Rebuilt levels ``[f1, f2, f3]`` (shallow to deep, as the encoder's)."""
        level3 = self.layer1(embedding)
        level2 = self.layer2(level3)
        level1 = self.layer3(level2)
        return [level1, level2, level3]


# --------------------------------------------------------------------------- loss and maps


def distillation_loss(encoder: Sequence[torch.Tensor], decoder: Sequence[torch.Tensor], mode: Literal["flattened", "per-position"] = "flattened") -> torch.Tensor:
    """Sum over the levels of the mean of ``1 - cosine similarity`` between the encoder's and the
    decoder's features.

    ``flattened`` (official ``main.py: loss_fucntion``, and anomalib's ``ReverseDistillationLoss``):
    each image's whole level ``[C, H, W]`` is one vector, one cosine per image, mean over the
    batch. ``per-position``: the paper's Eq. 2-3, a cosine along channels at every position,
    mean over positions and batch.
    """
    total = torch.zeros((), device=encoder[0].device)
    for teacher, student in zip(encoder, decoder, strict=True):
        teacher, student = teacher.float(), student.float()
        if mode == "flattened":
            similarity = F.cosine_similarity(teacher.flatten(1), student.flatten(1), dim=1)
        else:
            similarity = F.cosine_similarity(teacher, student, dim=1)
        total = total + torch.mean(1 - similarity)
    return total


def anomaly_map(encoder: Sequence[torch.Tensor], decoder: Sequence[torch.Tensor], size: tuple[int, int], mode: Literal["add", "multiply"] = "add") -> torch.Tensor:
    """``[B, H, W]``: per level, ``1 - cosine similarity`` along channels, upsampled bilinearly
    (``align_corners=True``) to ``size``, then added (official ``test.py: evaluation`` calls
    ``cal_anomaly_map(..., amap_mode='a')``) or multiplied (that function's default ``'mul'``)."""
    combined = None
    for teacher, student in zip(encoder, decoder, strict=True):
        distance = 1 - F.cosine_similarity(teacher.float(), student.float(), dim=1)
        distance = F.interpolate(distance.unsqueeze(1), size=size, mode="bilinear", align_corners=True)[:, 0]
        if combined is None:
            combined = distance
        else:
            combined = combined + distance if mode == "add" else combined * distance
    assert combined is not None, "at least one level"
    return combined


@functools.lru_cache(maxsize=16)
def blur_matrix(size: int, sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """``[size, size]`` float64 matrix of scipy's ``gaussian_filter1d`` (``truncate=4``, mode
    ``'reflect'``: mirrored with the edge sample repeated, repeatedly for tiny axes)."""
    radius = int(truncate * sigma + 0.5)
    taps = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel = kernel / kernel.sum()
    source = torch.arange(size).unsqueeze(1) + taps.long().unsqueeze(0)
    source = source.remainder(2 * size)
    source = torch.where(source >= size, 2 * size - 1 - source, source)
    matrix = torch.zeros(size, size, dtype=torch.float64)
    matrix.scatter_add_(1, source, kernel.expand(size, -1).contiguous())
    return matrix


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """``[B, H, W]`` maps smoothed by a Gaussian of ``sigma`` pixels as scipy's
    ``gaussian_filter`` (official ``test.py``); ``sigma == 0`` returns them unchanged."""
    if sigma <= 0:
        return maps
    rows = blur_matrix(int(maps.shape[-2]), float(sigma)).to(maps.device, maps.dtype)
    cols = blur_matrix(int(maps.shape[-1]), float(sigma)).to(maps.device, maps.dtype)
    return torch.matmul(torch.matmul(rows, maps), cols.T)


def image_scores(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """``[B]``: the maximum of each map after the Gaussian smoothing (official ``np.max``)."""
    return gaussian_blur(maps, sigma).flatten(1).amax(1)
