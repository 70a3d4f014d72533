"""f-AnoGAN's networks and formulas (Schlegl et al., Medical Image Analysis 2019) as plain torch.

Architectures of the official code (github.com/tSchlegl/f-AnoGAN, ``wgangp_64x64.py`` and
``z_encoding_izif.py``; the ResNet WGAN-GP of Gulrajani et al. for 64 x 64 images), for grey
patches in [-1, 1]:

* :class:`Generator`: ``z`` (``latent_dim``, N(0, 1)) -> linear to ``8d x 4 x 4`` -> four
  residual blocks that double the size (widths 8d, 4d, 2d, d) -> BatchNorm, ReLU, 3x3 conv to
  one channel, tanh.
* :class:`Critic`: 3x3 conv to d -> four residual blocks that halve the size (2d, 4d, 8d, 8d)
  with layer normalisation (over channels and positions, one scale and offset per channel) ->
  the ``8d x 4 x 4`` features ``f`` -> linear to one unbounded score.
* :class:`Encoder` (izi_f): the critic's trunk with BatchNorm instead of layer normalisation ->
  linear to ``latent_dim`` -> tanh (the paper's ``tanh_fc`` latent).

A residual block is norm, ReLU, conv 3x3, norm, ReLU, conv 3x3 plus a 1x1-conv shortcut; down
blocks end with 2x2 mean pooling (the shortcut pools first), up blocks start with a x2
nearest-neighbour up-sampling (the official ``depth_to_space`` of four copies). Weights are
initialised as ``tflib``: uniform with standard deviation ``sqrt(4 / (fan_in + fan_out))``
(He) or ``sqrt(2 / (fan_in + fan_out))`` (Glorot: the first conv and the shortcuts; every
linear layer), biases zero. BatchNorm keeps TensorFlow's defaults (epsilon 1e-3, moving
averages with decay 0.99).

Formulas: the WGAN-GP critic loss with the gradient penalty, the izi_f residual ``A(x) =
mean((x - G(E(x)))^2) + kappa mean((f(x) - f(G(E(x))))^2)`` (the encoder's training loss is its
batch mean, the official anomaly score is its value per image), and TensorFlow 1's RMSProp, with
which the official encoder trains.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

#: Side of the patches the networks take (the official 64 x 64 architecture).
PATCH = 64

#: ITU-R 601-2 luma weights: the official loader reads images with PIL's mode ``L``.
LUMA = (0.299, 0.587, 0.114)


def conv(in_channels: int, out_channels: int, kernel: int, he_init: bool = True, bias: bool = True) -> nn.Conv2d:
    """A ``kernel`` x ``kernel`` conv ('same' padding), initialised as ``tflib.ops.conv2d``."""
    layer = nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2, bias=bias)
    fans = (in_channels + out_channels) * kernel**2
    stdev = math.sqrt((4.0 if he_init else 2.0) / fans)
    with torch.no_grad():
        layer.weight.uniform_(-stdev * math.sqrt(3), stdev * math.sqrt(3))
        if layer.bias is not None:
            layer.bias.zero_()
    return layer


def linear(in_features: int, out_features: int) -> nn.Linear:
    """A linear layer initialised as ``tflib.ops.linear`` (Glorot uniform, zero bias)."""
    layer = nn.Linear(in_features, out_features)
    stdev = math.sqrt(2.0 / (in_features + out_features))
    with torch.no_grad():
        layer.weight.uniform_(-stdev * math.sqrt(3), stdev * math.sqrt(3))
        layer.bias.zero_()
    return layer


def batch_norm(channels: int) -> nn.BatchNorm2d:
    """``tf.layers.batch_normalization`` defaults: epsilon 1e-3, moving-average decay 0.99."""
    return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01)


def layer_norm(channels: int) -> nn.GroupNorm:
    """``tflib.ops.layernorm`` over channels and positions, with a scale and offset per channel."""
    return nn.GroupNorm(1, channels, eps=1e-5)


class ResidualBlock(nn.Module):
    """The official ``ResidualBlock`` with ``resample`` 'down' (2x2 mean pooling) or 'up' (x2)."""

    def __init__(self, in_channels: int, out_channels: int, resample: Literal["down", "up"], norm: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.resample = resample
        middle = in_channels if resample == "down" else out_channels
        self.shortcut = conv(in_channels, out_channels, 1, he_init=False)
        self.norm1, self.conv1 = norm(in_channels), conv(in_channels, middle, 3, bias=False)
        self.norm2, self.conv2 = norm(middle), conv(middle, out_channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.resample == "down":
            shortcut = self.shortcut(F.avg_pool2d(x, 2))
            out = self.conv1(F.relu(self.norm1(x)))
            return shortcut + F.avg_pool2d(self.conv2(F.relu(self.norm2(out))), 2)
        shortcut = self.shortcut(_upsample(x))
        out = self.conv1(_upsample(F.relu(self.norm1(x))))
        return shortcut + self.conv2(F.relu(self.norm2(out)))


def _upsample(x: torch.Tensor) -> torch.Tensor:
    """x2 nearest-neighbour up-sampling (the official concat of four copies + depth_to_space)."""
    return F.interpolate(x, scale_factor=2.0, mode="nearest")


class Generator(nn.Module):
    """``G``: latent vectors ``[N, latent_dim]`` -> patches ``[N, 1, 64, 64]`` in [-1, 1]."""

    def __init__(self, latent_dim: int = 128, width: int = 64) -> None:
        super().__init__()
        self.width = width
        self.input = linear(latent_dim, 4 * 4 * 8 * width)
        widths = [8 * width, 8 * width, 4 * width, 2 * width, width]
        self.blocks = nn.Sequential(*(ResidualBlock(a, b, "up", batch_norm) for a, b in zip(widths, widths[1:])))
        self.output_norm = batch_norm(width)
        self.output = conv(width, 1, 3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.input(z).view(-1, 8 * self.width, 4, 4)
        return torch.tanh(self.output(F.relu(self.output_norm(self.blocks(x)))))


class _Trunk(nn.Module):
    """The critic's and the encoder's shared layout: 64 x 64 patches -> ``[N, 8d, 4, 4]``."""

    def __init__(self, width: int, norm: Callable[[int], nn.Module], out_features: int) -> None:
        super().__init__()
        self.input = conv(1, width, 3, he_init=False)
        widths = [width, 2 * width, 4 * width, 8 * width, 8 * width]
        self.blocks = nn.Sequential(*(ResidualBlock(a, b, "down", norm) for a, b in zip(widths, widths[1:])))
        self.output = linear(4 * 4 * 8 * width, out_features)

    def features(self, patches: torch.Tensor) -> torch.Tensor:
        """The last residual block's output ``[N, 8d, 4, 4]`` (the critic's ``f``)."""
        return self.blocks(self.input(patches))


class Critic(_Trunk):
    """``D``: patches -> unbounded scores ``[N]``; :meth:`features` gives ``f``."""

    def __init__(self, width: int = 64) -> None:
        super().__init__(width, layer_norm, 1)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.output(self.features(patches).flatten(1)).squeeze(1)


class Encoder(_Trunk):
    """``E`` (izi_f): patches -> latent vectors ``[N, latent_dim]`` in (-1, 1) (tanh)."""

    def __init__(self, latent_dim: int = 128, width: int = 64) -> None:
        super().__init__(width, batch_norm, latent_dim)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.output(self.features(patches).flatten(1)))


# --------------------------------------------------------------------------- formulas


def grey_levels(images: torch.Tensor) -> torch.Tensor:
    """RGB ``[B, 3, H, W]`` in [0, 1] -> grey ``[B, 1, H, W]`` in [0, 1] (PIL's mode ``L``)."""
    return (images * images.new_tensor(LUMA).view(1, 3, 1, 1)).sum(dim=1, keepdim=True)


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """RGB ``[B, 3, H, W]`` in [0, 1] -> grey ``[B, 1, H, W]`` in [-1, 1] (the official
    ``2 (x / 255 - 0.5)`` of 8-bit grey values)."""
    return grey_levels(images) * 2 - 1


def gradient_penalty(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """WGAN-GP's ``mean((||grad_x D(x_hat)||_2 - 1)^2)`` at ``x_hat = real + alpha (fake - real)``
    (``alpha`` ``[N]``, one per pair), differentiable with respect to the critic's weights."""
    interpolates = (real + alpha.view(-1, 1, 1, 1) * (fake - real)).detach().requires_grad_(True)
    (gradients,) = torch.autograd.grad(critic(interpolates).sum(), interpolates, create_graph=True)
    slopes = gradients.flatten(1).square().sum(dim=1).sqrt()
    return (slopes - 1).square().mean()


def critic_loss(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor, alpha: torch.Tensor, weight: float) -> tuple[torch.Tensor, dict[str, float]]:
    """The official critic cost ``mean D(fake) - mean D(real) + weight * gradient penalty``,
    with its parts (the negated Wasserstein estimate and the penalty)."""
    distance = critic(fake).mean() - critic(real).mean()
    penalty = gradient_penalty(critic, real, fake, alpha)
    return distance + weight * penalty, {"wasserstein": float(-distance.detach()), "gradient_penalty": float(penalty.detach())}


def izif_residual(
    patches: torch.Tensor, reconstructions: torch.Tensor, features: torch.Tensor, reconstruction_features: torch.Tensor, kappa: float
) -> torch.Tensor:
    """The izi_f residual per patch ``[N]``: ``mean((x - G(E(x)))^2) + kappa mean((f(x) -
    f(G(E(x))))^2)`` (official ``MSE(..., axis=1)``): the anomaly score of ``anomaly_detection.py``;
    its batch mean is the encoder's training loss in ``z_encoding_izif.py``."""
    image = (patches - reconstructions).square().flatten(1).mean(dim=1)
    feature = (features - reconstruction_features).square().flatten(1).mean(dim=1)
    return image + kappa * feature


def official_rmsprop(parameters: Iterator[nn.Parameter], lr: float) -> torch.optim.RMSprop:
    """TensorFlow 1's ``RMSPropOptimizer`` (the official encoder's): decay 0.9, epsilon 1e-10, and
    a mean square that starts at 1 (torch's starts at 0, which makes the first steps ~3 lr per
    weight instead of ~lr x gradient). TensorFlow adds epsilon inside the square root, torch
    outside: no difference at 1e-10."""
    optimizer = torch.optim.RMSprop(parameters, lr=lr, alpha=0.9, eps=1e-10)
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            optimizer.state[parameter] = {"step": torch.zeros(()), "square_avg": torch.ones_like(parameter)}
    return optimizer


@contextmanager
def frozen(*modules: nn.Module) -> Iterator[None]:
    """The modules' parameters need no gradients inside the block (the critic during a
    generator step), and need them again after."""
    parameters = [p for module in modules for p in module.parameters()]
    for parameter in parameters:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter in parameters:
            parameter.requires_grad_(True)
