"""DRAEM's two sub-networks (Zavrtanik, Kristan, Skocaj, ICCV 2021) as plain torch modules.

Same layer structure as the official ``model_unet.py``:

* :class:`ReconstructiveSubNetwork`: an encoder of five double-conv blocks (widths c, 2c, 4c,
  8c, 8c; 2x2 max pooling between them) and a decoder of four bilinear up-sampling stages
  without skip connections, back to 3 channels. Official width c = 128.
* :class:`DiscriminativeSubNetwork`: a U-Net on the 6-channel concatenation (reconstruction,
  input): six encoder blocks (c, 2c, 4c, 8c, 8c, 8c), five up-sampling stages with skip
  connections, 2 output channels (normal, anomalous). Official width c = 64.

Every conv is 3x3 with padding 1 followed by BatchNorm and ReLU (except the last). Inputs must
be a multiple of 32 pixels on each side (five poolings).
"""

from __future__ import annotations

import torch
from torch import nn

#: Input sides must be a multiple of this (the discriminative encoder pools five times).
SIZE_MULTIPLE = 32


def conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    """3x3 conv (padding 1), BatchNorm, ReLU."""
    return [nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]


def double_conv(in_channels: int, middle_channels: int, out_channels: int | None = None) -> nn.Sequential:
    """Two :func:`conv_bn_relu` layers."""
    out_channels = middle_channels if out_channels is None else out_channels
    return nn.Sequential(*conv_bn_relu(in_channels, middle_channels), *conv_bn_relu(middle_channels, out_channels))


def up_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    """x2 bilinear up-sampling (``align_corners=True`` as official) then :func:`conv_bn_relu`."""
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True), *conv_bn_relu(in_channels, out_channels))


class ReconstructiveSubNetwork(nn.Module):
    """Encoder-decoder that maps a (possibly anomalous) image to its anomaly-free reconstruction."""

    def __init__(self, in_channels: int = 3, out_channels: int = 3, base_width: int = 128) -> None:
        super().__init__()
        c = base_width
        self.encoder = nn.ModuleList(
            [double_conv(in_channels, c), double_conv(c, 2 * c), double_conv(2 * c, 4 * c), double_conv(4 * c, 8 * c), double_conv(8 * c, 8 * c)]
        )
        self.pool = nn.MaxPool2d(2)
        self.decoder = nn.Sequential(
            up_conv(8 * c, 8 * c),
            double_conv(8 * c, 8 * c, 4 * c),
            up_conv(4 * c, 4 * c),
            double_conv(4 * c, 4 * c, 2 * c),
            up_conv(2 * c, 2 * c),
            double_conv(2 * c, 2 * c, c),
            up_conv(c, c),
            double_conv(c, c),
            nn.Conv2d(c, out_channels, kernel_size=3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction ``[B, out_channels, H, W]`` (no output activation, as official)."""
        for index, block in enumerate(self.encoder):
            x = block(x if index == 0 else self.pool(x))
        return self.decoder(x)


def discriminative_encoder_widths(base_width: int) -> list[int]:
    """Channels of the discriminative encoder's six blocks: c, 2c, 4c, 8c, 8c, 8c."""
    return [base_width * factor for factor in (1, 2, 4, 8, 8, 8)]


class DiscriminativeSubNetwork(nn.Module):
    """U-Net that segments anomalies from the concatenated (reconstruction, image) pair."""

    def __init__(self, in_channels: int = 6, out_channels: int = 2, base_width: int = 64) -> None:
        super().__init__()
        c = base_width
        widths = discriminative_encoder_widths(c)
        self.widths = widths
        self.encoder = nn.ModuleList([double_conv(in_channels, widths[0])] + [double_conv(widths[i - 1], widths[i]) for i in range(1, 6)])
        self.pool = nn.MaxPool2d(2)
        # Official up_b/db_b, up1/db1 .. up4/db4: stage k up-samples to stage_widths[k], concatenates
        # the encoder block of the same resolution (widths[4 - k]) and fuses back to stage_widths[k].
        stage_widths = [8 * c, 4 * c, 2 * c, c, c]
        inputs = [widths[5]] + stage_widths[:-1]
        self.up = nn.ModuleList([up_conv(inputs[k], stage_widths[k]) for k in range(5)])
        self.fuse = nn.ModuleList([double_conv(stage_widths[k] + widths[4 - k], stage_widths[k]) for k in range(5)])
        self.head = nn.Conv2d(c, out_channels, kernel_size=3, padding=1)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The six encoder block outputs (strides 1, 2, 4, 8, 16, 32)."""
        features = []
        for index, block in enumerate(self.encoder):
            x = block(x if index == 0 else self.pool(x))
            features.append(x)
        return features

    def decode(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Logits ``[B, out_channels, H, W]`` from :meth:`encode`'s outputs."""
        x = features[-1]
        for k in range(5):
            x = self.fuse[k](torch.cat((self.up[k](x), features[4 - k]), dim=1))
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Segmentation logits (softmax over dim 1 gives the anomaly probability in channel 1)."""
        return self.decode(self.encode(x))


def init_weights(module: nn.Module, generator: torch.Generator) -> None:
    """Official ``weights_init``: conv weights N(0, 0.02), BatchNorm weights N(1, 0.02) and biases
    0; conv biases keep PyTorch's default initialisation. Draws come from ``generator``."""
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            with torch.no_grad():
                layer.weight.normal_(0.0, 0.02, generator=generator)
        elif isinstance(layer, nn.BatchNorm2d):
            with torch.no_grad():
                layer.weight.normal_(1.0, 0.02, generator=generator)
                layer.bias.zero_()
