"""DSR's trained modules (official ``dsr_model.py``) as plain torch modules, with its layer names.

* :class:`SubspaceRestrictionModule`: an encoder-decoder (no skip connections) on a quantized
  feature map, re-quantized with the VQ model's codebook: it projects features onto the subspace
  of normal appearance (one for Q_hi, one for Q_lo; width = the code dimension, official 128);
* :class:`ImageReconstructionNetwork`: the object-specific decoder, rendering the restored
  ``cat(upsample_t(Q_lo), Q_hi)`` into an image;
* :class:`AnomalyDetectionModule`: a U-Net on (object-specific image, general image) giving
  anomaly logits (official width 64);
* :class:`UpsamplingModule`: a U-Net on (object-specific image, general image, anomaly
  softmax) refining the map to full resolution (official width 64).

Convolutions are 3x3 with InstanceNorm (no affine parameters) and ReLU; bilinear up-sampling
with ``align_corners=True``, as official.
"""

from __future__ import annotations

import torch
from torch import nn

from vad_dsr.vq import ResidualStack, VectorQuantizerEMA

#: Image sides must be a multiple of this (stride-8 codes pooled twice by the restriction module).
SIZE_MULTIPLE = 32


def _conv_norm_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1), nn.InstanceNorm2d(out_channels), nn.ReLU(inplace=True)]


def _double(in_channels: int, middle: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(*_conv_norm_relu(in_channels, middle), *_conv_norm_relu(middle, out_channels))


def _up(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True), *_conv_norm_relu(in_channels, out_channels))


class FeatureEncoder(nn.Module):
    """Three double-conv blocks (c, 2c, 4c) with 2x2 max pooling between them."""

    def __init__(self, in_channels: int, base_width: int) -> None:
        super().__init__()
        c = base_width
        self.block1, self.mp1 = _double(in_channels, c, c), nn.Sequential(nn.MaxPool2d(2))
        self.block2, self.mp2 = _double(c, 2 * c, 2 * c), nn.Sequential(nn.MaxPool2d(2))
        self.block3 = _double(2 * c, 4 * c, 4 * c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The deepest block (the official decoder uses no skip connections)."""
        return self.block3(self.mp2(self.block2(self.mp1(self.block1(x)))))


class FeatureDecoder(nn.Module):
    """Two up-sampling stages back to width c, then a 3x3 conv to ``out_channels``."""

    def __init__(self, base_width: int, out_channels: int) -> None:
        super().__init__()
        c = base_width
        self.up2, self.db2 = _up(4 * c, 2 * c), _double(2 * c, 2 * c, 2 * c)
        self.up3, self.db3 = _up(2 * c, c), _double(c, c, c)
        self.fin_out = nn.Sequential(nn.Conv2d(c, out_channels, kernel_size=3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fin_out(self.db3(self.up3(self.db2(self.up2(x)))))


class SubspaceRestrictionNetwork(nn.Module):
    """:class:`FeatureEncoder` then :class:`FeatureDecoder`, same width in and out."""

    def __init__(self, in_channels: int, out_channels: int, base_width: int) -> None:
        super().__init__()
        self.encoder = FeatureEncoder(in_channels, base_width)
        self.decoder = FeatureDecoder(base_width, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


class SubspaceRestrictionModule(nn.Module):
    """Restores a quantized feature map to normality and re-quantizes it."""

    def __init__(self, embedding_dim: int = 128) -> None:
        super().__init__()
        self.unet = SubspaceRestrictionNetwork(embedding_dim, embedding_dim, embedding_dim)

    def forward(self, x: torch.Tensor, quantizer: VectorQuantizerEMA) -> tuple[torch.Tensor, torch.Tensor]:
        """``(restored features before quantization, their quantization)`` (straight-through)."""
        restored = self.unet(x)
        return restored, quantizer(restored)[0]


class ImageReconstructionNetwork(nn.Module):
    """The object-specific decoder: two conv blocks with pooling (in, 2 in, 4 in channels), a
    1x1 bottleneck of ``bottleneck`` channels (official 64), two 4x4 transposed convs, then the
    general decoder's layout (3x3 conv, residual stack, two transposed convs) to an image."""

    def __init__(self, in_channels: int, num_hiddens: int, num_residual_layers: int, num_residual_hiddens: int, bottleneck: int = 64) -> None:
        super().__init__()
        c, b = in_channels, bottleneck
        self.block1, self.mp1 = _double(c, c, 2 * c), nn.Sequential(nn.MaxPool2d(2))
        self.block2, self.mp2 = _double(2 * c, 2 * c, 4 * c), nn.Sequential(nn.MaxPool2d(2))
        self.pre_vq_conv = nn.Conv2d(4 * c, b, kernel_size=1)
        self.upblock1 = nn.ConvTranspose2d(b, b, kernel_size=4, stride=2, padding=1)
        self.upblock2 = nn.ConvTranspose2d(b, b, kernel_size=4, stride=2, padding=1)
        self._conv_1 = nn.Conv2d(b, num_hiddens, kernel_size=3, padding=1)
        self._residual_stack = ResidualStack(num_hiddens, num_hiddens, num_residual_layers, num_residual_hiddens)
        self._conv_trans_1 = nn.ConvTranspose2d(num_hiddens, num_hiddens // 2, kernel_size=4, stride=2, padding=1)
        self._conv_trans_2 = nn.ConvTranspose2d(num_hiddens // 2, 3, kernel_size=4, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pre_vq_conv(self.mp2(self.block2(self.mp1(self.block1(x)))))
        x = torch.relu(self.upblock2(torch.relu(self.upblock1(x))))
        x = self._residual_stack(self._conv_1(x))
        return self._conv_trans_2(torch.relu(self._conv_trans_1(x)))


class UnetEncoder(nn.Module):
    """Four double-conv blocks (c, 2c, 4c, 4c) with max pooling between them."""

    def __init__(self, in_channels: int, base_width: int) -> None:
        super().__init__()
        c = base_width
        self.block1, self.mp1 = _double(in_channels, c, c), nn.Sequential(nn.MaxPool2d(2))
        self.block2, self.mp2 = _double(c, 2 * c, 2 * c), nn.Sequential(nn.MaxPool2d(2))
        self.block3, self.mp3 = _double(2 * c, 4 * c, 4 * c), nn.Sequential(nn.MaxPool2d(2))
        self.block4 = _double(4 * c, 4 * c, 4 * c)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        b1 = self.block1(x)
        b2 = self.block2(self.mp1(b1))
        b3 = self.block3(self.mp2(b2))
        return b1, b2, b3, self.block4(self.mp3(b3))


class UnetDecoder(nn.Module):
    """Three up-sampling stages with skip connections, then a 3x3 conv to ``out_channels``."""

    def __init__(self, base_width: int, out_channels: int) -> None:
        super().__init__()
        c = base_width
        self.up1, self.db1 = _up(4 * c, 4 * c), _double(8 * c, 4 * c, 4 * c)
        self.up2, self.db2 = _up(4 * c, 2 * c), _double(4 * c, 2 * c, 2 * c)
        self.up3, self.db3 = _up(2 * c, c), _double(2 * c, c, c)
        self.fin_out = nn.Sequential(nn.Conv2d(c, out_channels, kernel_size=3, padding=1))

    def forward(self, b1: torch.Tensor, b2: torch.Tensor, b3: torch.Tensor, b4: torch.Tensor) -> torch.Tensor:
        x = self.db1(torch.cat((self.up1(b4), b3), dim=1))
        x = self.db2(torch.cat((self.up2(x), b2), dim=1))
        x = self.db3(torch.cat((self.up3(x), b1), dim=1))
        return self.fin_out(x)


class UnetModel(nn.Module):
    """:class:`UnetEncoder` then :class:`UnetDecoder`."""

    def __init__(self, in_channels: int, out_channels: int, base_width: int) -> None:
        super().__init__()
        self.encoder = UnetEncoder(in_channels, base_width)
        self.decoder = UnetDecoder(base_width, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(*self.encoder(x))


class AnomalyDetectionModule(nn.Module):
    """Anomaly logits ``[B, 2, H, W]`` from the object-specific and the general image."""

    def __init__(self, base_width: int = 64) -> None:
        super().__init__()
        self.unet = UnetModel(6, 2, base_width)

    def forward(self, specific: torch.Tensor, general: torch.Tensor) -> torch.Tensor:
        return self.unet(torch.cat((specific, general), dim=1))


class UpsamplingModule(nn.Module):
    """Refined anomaly logits ``[B, 2, H, W]`` from both images and the detection softmax."""

    def __init__(self, base_width: int = 64) -> None:
        super().__init__()
        self.unet = UnetModel(8, 2, base_width)

    def forward(self, specific: torch.Tensor, general: torch.Tensor, probabilities: torch.Tensor) -> torch.Tensor:
        return self.unet(torch.cat((specific, general, probabilities), dim=1))
