"""The convolutional autoencoder of Bergmann's thesis, its residual maps and the map opening.

:func:`encoder_layers` gives the encoder of thesis Table 3.1 (``architecture="thesis"``) for any
square input side ``S = 2^k >= 32``: as many 4x4 stride-2 convolutions of 32 channels as bring the
side to 32 (two for the table's 128 px patches, three for the 256 px images of the MVTec AD
benchmark: Ch. 4's "additional convolution layer", laid out in Table 9.2), then the table's
3x3 / 4x4 layers down to 8 x 8 x 32 and an 8x8 convolution to the ``1 x 1 x d`` latent vector.
``architecture="loco"`` is Table 6.3 (MVTec LOCO, Ch. 6): 4x4 stride-2 convolutions only (32,
32, 64, 64, 64 channels at 256 px) with batch normalisation. The decoder mirrors the encoder:
transposed convolutions where the encoder downsamples (and for the latent), 3x3 convolutions
where it does not. Every layer is followed by LeakyReLU (slope 0.2; Table 6.3: batch norm and
slope 0.05) except the output layers of the encoder and the decoder, which are linear.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from vad_reconstruction.losses import ssim_map

Architecture = Literal["thesis", "loco"]

#: ITU-R BT.601 luma weights (PIL's ``convert("L")``): how RGB images become the single channel
#: the thesis' SSIM-Autoencoder sees.
LUMA = (0.299, 0.587, 0.114)
#: The side the latent convolution reduces to 1 x 1 (thesis: an 8x8 convolution on 8 x 8 maps).
BOTTLENECK_SIDE = 8


@dataclass(frozen=True)
class Layer:
    """One encoder convolution: output channels, kernel, stride, padding."""

    channels: int
    kernel: int
    stride: int
    padding: int


def valid_side(side: int) -> bool:
    """Whether the encoders take square inputs of ``side`` px: a power of two, at least 32."""
    return side >= 32 and side & (side - 1) == 0


def encoder_layers(side: int, architecture: Architecture = "thesis") -> list[Layer]:
    """The spatial encoder layers (without the latent convolution) for ``side`` px inputs."""
    if not valid_side(side):
        raise ValueError(f"the autoencoder takes square inputs whose side is a power of two >= 32, got {side}")
    halvings = int(math.log2(side // BOTTLENECK_SIDE))
    if architecture == "loco":  # Table 6.3: 4x4 stride-2 only; the last three 64 channels, the rest 32
        return [Layer(64 if halvings - i <= 3 else 32, 4, 2, 1) for i in range(halvings)]
    lead = halvings - 2  # Table 3.1 halves twice more after its leading convolutions (Conv4, Conv6)
    tail = [Layer(32, 3, 1, 1), Layer(64, 4, 2, 1), Layer(64, 3, 1, 1), Layer(128, 4, 2, 1), Layer(64, 3, 1, 1), Layer(32, 3, 1, 1)]
    return [Layer(32, 4, 2, 1)] * lead + tail


def layer_strides(layers: list[Layer]) -> list[int]:
    """Input pixels per output position of each layer."""
    strides, stride = [], 1
    for layer in layers:
        stride *= layer.stride
        strides.append(stride)
    return strides


def _block(convolution: nn.Module, channels: int, architecture: Architecture) -> nn.Sequential:
    """A hidden layer: the convolution, batch norm (Table 6.3 only) and LeakyReLU."""
    if architecture == "loco":
        return nn.Sequential(convolution, nn.BatchNorm2d(channels), nn.LeakyReLU(0.05))
    return nn.Sequential(convolution, nn.LeakyReLU(0.2))


class ConvAutoencoder(nn.Module):
    """Encoder to a ``latent_dim`` vector and the mirrored decoder, for ``side`` px square inputs
    of ``channels`` channels."""

    def __init__(self, side: int, channels: int, latent_dim: int, architecture: Architecture = "thesis") -> None:
        super().__init__()
        self.side, self.channels, self.latent_dim, self.architecture = side, channels, latent_dim, architecture
        self.layers = encoder_layers(side, architecture)
        widths = [channels] + [layer.channels for layer in self.layers]
        self.encoder = nn.Sequential(
            *(_block(nn.Conv2d(widths[i], layer.channels, layer.kernel, layer.stride, layer.padding), layer.channels, architecture) for i, layer in enumerate(self.layers))
        )
        self.bottleneck = nn.Conv2d(widths[-1], latent_dim, BOTTLENECK_SIDE)  # linear output layer
        decoder: list[nn.Module] = [_block(nn.ConvTranspose2d(latent_dim, widths[-1], BOTTLENECK_SIDE), widths[-1], architecture)]
        for i in reversed(range(len(self.layers))):
            layer, out = self.layers[i], widths[i]
            kind = nn.ConvTranspose2d if layer.stride > 1 else nn.Conv2d
            convolution = kind(layer.channels, out, layer.kernel, layer.stride, layer.padding)
            decoder.append(convolution if i == 0 else _block(convolution, out, architecture))  # linear output layer
        self.decoder = nn.Sequential(*decoder)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Latent vectors ``[B, d, 1, 1]``."""
        return self.bottleneck(self.encoder(images))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Reconstructions ``[B, C, side, side]`` of latent vectors ``[B, d, 1, 1]``."""
        return self.decoder(latents)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The reconstruction of ``images``."""
        return self.decode(self.encode(images))

    def features(self, images: torch.Tensor, positions: list[int]) -> list[torch.Tensor]:
        """The outputs of the encoder's hidden layers at ``positions`` (0-based, after their
        activation); convolutional, so any input side works."""
        outputs, x = {}, images
        for index, block in enumerate(self.encoder[: max(positions) + 1]):
            x = block(x)
            outputs[index] = x
        return [outputs[p] for p in positions]


# --------------------------------------------------------------------------- maps


def to_gray(images: torch.Tensor) -> torch.Tensor:
    """``[B, 3, H, W]`` RGB to ``[B, 1, H, W]`` luma (ITU-R BT.601, as PIL)."""
    weights = torch.tensor(LUMA, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images * weights).sum(1, keepdim=True)


def l2_map(images: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
    """Thesis eq. 3.3: the squared L2 distance over channels at each pixel, ``[B, H, W]``."""
    return (images - reconstructions).pow(2).sum(1)


def ssim_residual_map(images: torch.Tensor, reconstructions: torch.Tensor, window: int = 11, constants: tuple[float, float] | None = None) -> torch.Tensor:
    """The SSIM-Autoencoder's map: ``1 - SSIM`` at each pixel (``window`` x ``window`` Gaussian
    window, sigma 1.5; mean over channels when there are several), ``[B, H, W]``."""
    return 1.0 - ssim_map(images, reconstructions, window, 1.0, constants).mean(1)


def disk_offsets(diameter: int) -> list[tuple[int, int]]:
    """The pixel offsets of a flat disk of ``diameter`` px: ``dy^2 + dx^2 <= (diameter / 2)^2``
    (diameter 4: the 13 pixels within distance 2 of the centre)."""
    radius = diameter / 2
    reach = int(math.floor(radius))
    return [(dy, dx) for dy in range(-reach, reach + 1) for dx in range(-reach, reach + 1) if dy * dy + dx * dx <= radius * radius]


def _flat_filter(maps: torch.Tensor, offsets: list[tuple[int, int]], erode: bool) -> torch.Tensor:
    reach = max(max(abs(dy), abs(dx)) for dy, dx in offsets)
    height, width = maps.shape[-2:]
    # Outside the image counts as foreground for the erosion and background for the dilation, so
    # a region at the border is opened as if the image went on.
    fill = float("inf") if erode else float("-inf")
    padded = F.pad(maps.unsqueeze(1), (reach, reach, reach, reach), value=fill)[:, 0]
    shifted = torch.stack([padded[:, reach + dy : reach + dy + height, reach + dx : reach + dx + width] for dy, dx in offsets])
    return shifted.amin(0) if erode else shifted.amax(0)


def open_maps(maps: torch.Tensor, diameter: int) -> torch.Tensor:
    """Grayscale opening of ``[B, H, W]`` maps with a flat disk of ``diameter`` px (0: none).

    Flat morphology commutes with thresholding: thresholding the opened map at any ``t`` gives
    the binary opening of the map thresholded at ``t`` (the thesis' Ch. 3 post-processing, an
    opening of each segmentation with a circle of diameter 4), so every threshold vad or a metric
    picks sees the opened segmentation.
    """
    if diameter <= 1:
        return maps
    offsets = disk_offsets(diameter)
    return _flat_filter(_flat_filter(maps, offsets, erode=True), offsets, erode=False)
