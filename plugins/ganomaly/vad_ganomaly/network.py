"""GANomaly's networks, losses and score as plain torch (official ``lib/networks.py``,
``lib/model.py`` and ``lib/loss.py`` of github.com/samet-akcay/ganomaly).

The modules keep the official structure and layer names (``main.initial-conv-3-64`` ...), so an
official ``netG.pth`` state dict maps onto :class:`Generator` key for key.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: Side of the feature map the encoders' pyramid stops at (the latent convolution is 4 x 4).
LAST_SIDE = 4


def is_valid_size(size: int) -> bool:
    """A power of two of at least 16: the official encoder asserts a multiple of 16 and its
    decoder doubles from 4 px until it reaches the size (other sizes never end)."""
    return size >= 16 and size & (size - 1) == 0


def pyramid_channels(size: int, width: int) -> int:
    """Channels of an encoder's last feature map (before the latent convolution): the width
    doubles at every halving from ``size / 2`` down to 4 px."""
    return width * (size // 2 // LAST_SIDE)


class Encoder(nn.Module):
    """The official DCGAN encoder: a 4x4 stride-2 convolution and LeakyReLU(0.2), optional extra
    3x3 layers, stride-2 convolutions doubling the width down to 4 x 4 px (BatchNorm and
    LeakyReLU each), then a 4x4 convolution to ``nz`` x 1 x 1 (``add_final_conv``). No biases."""

    def __init__(self, size: int, nz: int, channels: int, width: int, extra_layers: int = 0, add_final_conv: bool = True) -> None:
        super().__init__()
        main = nn.Sequential()
        main.add_module(f"initial-conv-{channels}-{width}", nn.Conv2d(channels, width, 4, 2, 1, bias=False))
        main.add_module(f"initial-relu-{width}", nn.LeakyReLU(0.2, inplace=True))
        side, current = size // 2, width
        for t in range(extra_layers):
            main.add_module(f"extra-layers-{t}-{current}-conv", nn.Conv2d(current, current, 3, 1, 1, bias=False))
            main.add_module(f"extra-layers-{t}-{current}-batchnorm", nn.BatchNorm2d(current))
            main.add_module(f"extra-layers-{t}-{current}-relu", nn.LeakyReLU(0.2, inplace=True))
        while side > LAST_SIDE:
            main.add_module(f"pyramid-{current}-{current * 2}-conv", nn.Conv2d(current, current * 2, 4, 2, 1, bias=False))
            main.add_module(f"pyramid-{current * 2}-batchnorm", nn.BatchNorm2d(current * 2))
            main.add_module(f"pyramid-{current * 2}-relu", nn.LeakyReLU(0.2, inplace=True))
            current, side = current * 2, side // 2
        if add_final_conv:
            main.add_module(f"final-{current}-1-conv", nn.Conv2d(current, nz, 4, 1, 0, bias=False))
        self.main = main

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, nz, 1, 1]`` latent codes (or the last feature map without the final convolution)."""
        return self.main(images)


class Decoder(nn.Module):
    """The official DCGAN decoder: a 4x4 transposed convolution from ``nz`` x 1 x 1 to 4 x 4 px,
    transposed stride-2 convolutions halving the width up to ``size / 2`` (BatchNorm and ReLU
    each), optional extra 3x3 layers, a last transposed convolution to the image and tanh."""

    def __init__(self, size: int, nz: int, channels: int, width: int, extra_layers: int = 0) -> None:
        super().__init__()
        current, side = width // 2, LAST_SIDE
        while side != size:
            current, side = current * 2, side * 2
        main = nn.Sequential()
        main.add_module(f"initial-{nz}-{current}-convt", nn.ConvTranspose2d(nz, current, 4, 1, 0, bias=False))
        main.add_module(f"initial-{current}-batchnorm", nn.BatchNorm2d(current))
        main.add_module(f"initial-{current}-relu", nn.ReLU(True))
        side = LAST_SIDE
        while side < size // 2:
            main.add_module(f"pyramid-{current}-{current // 2}-convt", nn.ConvTranspose2d(current, current // 2, 4, 2, 1, bias=False))
            main.add_module(f"pyramid-{current // 2}-batchnorm", nn.BatchNorm2d(current // 2))
            main.add_module(f"pyramid-{current // 2}-relu", nn.ReLU(True))
            current, side = current // 2, side * 2
        for t in range(extra_layers):
            main.add_module(f"extra-layers-{t}-{current}-conv", nn.Conv2d(current, current, 3, 1, 1, bias=False))
            main.add_module(f"extra-layers-{t}-{current}-batchnorm", nn.BatchNorm2d(current))
            main.add_module(f"extra-layers-{t}-{current}-relu", nn.ReLU(True))
        main.add_module(f"final-{current}-{channels}-convt", nn.ConvTranspose2d(current, channels, 4, 2, 1, bias=False))
        main.add_module(f"final-{channels}-tanh", nn.Tanh())
        self.main = main

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        """Images ``[B, channels, size, size]`` in [-1, 1] from latent codes ``[B, nz, 1, 1]``."""
        return self.main(latent)


class Generator(nn.Module):
    """The official ``NetG``: encoder G_E, decoder G_D, second encoder E, all of width ``width``."""

    def __init__(self, size: int, nz: int, width: int, extra_layers: int = 0, channels: int = 3) -> None:
        super().__init__()
        self.encoder1 = Encoder(size, nz, channels, width, extra_layers)
        self.decoder = Decoder(size, nz, channels, width, extra_layers)
        self.encoder2 = Encoder(size, nz, channels, width, extra_layers)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(reconstruction x^, latent z = G_E(x), latent z^ = E(x^))``."""
        latent_i = self.encoder1(images)
        reconstruction = self.decoder(latent_i)
        return reconstruction, latent_i, self.encoder2(reconstruction)

    def encoder_features(self, images: torch.Tensor) -> torch.Tensor:
        """G_E's last feature map ``[B, C, 4, 4]``, before its latent convolution."""
        return self.encoder1.main[:-1](images)


class Discriminator(nn.Module):
    """The official ``NetD``: the encoder's architecture with one output; ``features`` is every
    layer but the last convolution, ``classifier`` that convolution and a sigmoid."""

    def __init__(self, size: int, width: int, extra_layers: int = 0, channels: int = 3) -> None:
        super().__init__()
        layers = list(Encoder(size, 1, channels, width, extra_layers).main.children())
        self.features = nn.Sequential(*layers[:-1])
        self.classifier = nn.Sequential(layers[-1])
        self.classifier.add_module("Sigmoid", nn.Sigmoid())

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(probability of being real [B], features [B, C, 4, 4])``."""
        features = self.features(images)
        return self.classifier(features).view(-1, 1).squeeze(1), features


def dcgan_init(module: nn.Module, generator: torch.Generator) -> None:
    """The official ``weights_init`` (DCGAN's): every (transposed) convolution's weights
    N(0, 0.02), BatchNorm weights N(1, 0.02) and biases 0. Draws come from ``generator`` (on the
    CPU, then copied to the module's device) in module order."""
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
                layer.weight.copy_(torch.empty(layer.weight.shape).normal_(0.0, 0.02, generator=generator))
            elif isinstance(layer, nn.BatchNorm2d):
                layer.weight.copy_(torch.empty(layer.weight.shape).normal_(1.0, 0.02, generator=generator))
                layer.bias.zero_()


def generator_losses(
    images: torch.Tensor,
    reconstruction: torch.Tensor,
    latent_i: torch.Tensor,
    latent_o: torch.Tensor,
    real_features: torch.Tensor,
    fake_features: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The official ``backward_g`` terms ``(adversarial, contextual, encoder)``: the mean squared
    difference of the discriminator's features of the images and of their reconstructions
    (feature matching), the mean absolute reconstruction error, and the mean squared difference
    of the two latent codes."""
    adversarial = torch.mean((real_features - fake_features) ** 2)
    contextual = torch.mean(torch.abs(reconstruction - images))
    encoder = torch.mean((latent_o - latent_i) ** 2)
    return adversarial, contextual, encoder


def discriminator_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """The official ``backward_d``: ``(BCE(D(x), 1) + BCE(D(x^), 0)) / 2`` on the sigmoid outputs."""
    return 0.5 * (F.binary_cross_entropy(real, torch.ones_like(real)) + F.binary_cross_entropy(fake, torch.zeros_like(fake)))


def latent_distance(latent_i: torch.Tensor, latent_o: torch.Tensor) -> torch.Tensor:
    """The anomaly score ``mean((z - z^)^2)`` over the latent dimensions, one per image ``[B]``."""
    return ((latent_i - latent_o) ** 2).flatten(1).mean(dim=1)


class LatentScore(nn.Module):
    """A fitted generator as ``images -> (scores [B], None)`` for scoring and ONNX export
    (GANomaly has no anomaly map)."""

    def __init__(self, generator: Generator) -> None:
        super().__init__()
        self.generator = generator

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, None]:
        """Latent-distance scores."""
        _, latent_i, latent_o = self.generator(images)
        return latent_distance(latent_i, latent_o), None
