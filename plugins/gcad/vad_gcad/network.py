"""GCAD's networks and formulas (Bergmann, PhD thesis ch. 7; Bergmann et al., IJCV 2022), free of I/O.

One :class:`GcadBranch` per patch size ``p`` holds five networks:

* ``teacher`` = ``E_loc``: the pretrained Uninformed Students patch network
  (:class:`vad_uninformed_students.teacher.PatchNetwork`, dense: a 128-d descriptor for every
  pixel), frozen, its descriptors normalised by folding the training set's per-channel mean and
  std into its final layer (:func:`fold_normalisation`);
* ``local_regressor`` = ``R_loc``: a U-Net regressing ``E_loc``;
* ``global_network`` = ``E_glo``: an encoder-decoder with a ``g``-dim bottleneck and ``d_glo``
  output channels per pixel (:class:`GlobalEncoderDecoder`);
* ``decoder`` = ``U``: three 1 x 1 convolutions ``d_glo -> 128`` (:class:`DistillationDecoder`)
  through which ``E_glo`` is distilled from ``E_loc``;
* ``global_regressor`` = ``R_glo``: a U-Net regressing ``E_glo``.

**U-Net** (:class:`UNet`): the structure of github.com/jvanvugt/pytorch-unet, which the thesis
uses, with ``padding=True`` (output size = input size), ``batch_norm=False``,
``up_mode='upconv'``: ``depth`` blocks of two 3 x 3 convolutions + ReLU with ``2^(wf+i)``
channels, 2 x 2 average pooling between them (the repository's current ``unet.py``; the original
U-Net max-pools), and ``depth - 1`` up-blocks of a 2 x 2 stride-2 transposed convolution,
concatenation with the skip and a conv block; a final 1 x 1 convolution. The thesis' ``depth=5,
wf=6`` gives 64 ... 1024 channels and a 16 x 16 x 1024 latent at 256 px (about 31 M
parameters per U-Net). Own code; the module names follow the repository's (``down_path``,
``up_path``, ``last``).

**E_glo** (:class:`GlobalEncoderDecoder`; the thesis gives the channel widths only in Fig. 7.4,
so they are a design choice): the encoder is the thesis' LOCO autoencoder (Table 6.3, the same
chapter's ``g = 32`` bottleneck): five 4 x 4 stride-2 convolutions (padding 1) with 32, 32, 64,
64, 64 channels (``S/2 ... S/32``), each followed by LeakyReLU (slope 0.05, Table 6.3's), and a
linear ``S/32 x S/32`` convolution down to the ``1 x 1 x g`` bottleneck (8 x 8 at 256 px). The
decoder mirrors it with transposed convolutions: ``S/32 x S/32`` from the bottleneck to 64
channels, then 4 x 4 stride-2 ones (padding 1) to 64, 64, 32, 32 channels at ``S/16 ... S/2``
and a last one to ``d_glo`` channels at full resolution (linear output). The five skip
connections (thesis: 1 x 1 convolutions keeping the channel count) run from the encoder level
at ``S/2, S/4, S/8, S/16, S/32`` to the decoder output of the same size and channels, scaled by
the skip weights ``u, v, w, x, y`` (buffer ``skip_weights``, upper level first) and *added*
before the LeakyReLU. EfficientAD's autoencoder, which descends from this network, has the
same 32-32-64-64-64 encoder (with ReLU, and a 64-d latent).

**Skip-weight schedule** (:func:`skip_weights`): all five start at 1 and decrease linearly after
each epoch, the upper levels first, all 0 after ``decay_epochs`` (thesis 100). The thesis does
not say how the five decays overlap; here they are consecutive: level ``k`` (0 = ``u``, the
``S/2`` skip) falls from 1 to 0 during epochs ``k D/5 ... (k+1) D/5``. After that, information
reaches the decoder only through the ``g``-dim bottleneck.

**U** (:class:`DistillationDecoder`): 1 x 1 convolutions ``d_glo -> 128 -> 128 -> 128`` with a
LeakyReLU (slope 0.05) after the first two (thesis: "three 1 x 1 convolutions with
nonlinearities"; the hidden width is a design choice).

Formulas (a test checks each against a hand computation):

* :func:`regression_loss`: ``mean over images and pixels of ||target - prediction||^2`` (squared
  norm over the channels; the thesis' ``1/B sum_i ||.||^2`` per image, averaged over the pixels so
  that it does not grow with the image size, as S-T's Eq. 5.7);
* :func:`gcad_loss` (Eq. 7.4): ``L_kd / d_loc + L_glo / d_glo + L_loc / d_loc`` with
  ``L_kd = ||E_loc - U(E_glo)||^2``, ``L_glo = ||E_glo - R_glo||^2``, ``L_loc = ||E_loc - R_loc||^2``;
  before ``R_glo`` starts training the ``L_glo`` term is left out. The gradient of ``L_glo`` also
  reaches ``E_glo`` (the thesis sums the terms and says nothing about stopping it; EfficientAD's
  official code does the same with its autoencoder);
* maps ``A_loc = ||E_loc - R_loc||^2``, ``A_glo = ||E_glo - R_glo||^2`` (sum over channels), each
  standardised with the mean and std of all its values over the validation images
  (:func:`map_statistics`), ``A = A~_loc + A~_glo``; averaged over the patch sizes; the image
  score is the map's maximum.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vad_uninformed_students.teacher import DESCRIPTOR_DIM, PatchNetwork

#: Encoder widths of E_glo at S/2 ... S/32 (the thesis' LOCO autoencoder, Table 6.3).
ENCODER_WIDTHS = (32, 32, 64, 64, 64)
#: Skip connections of E_glo (u, v, w, x, y).
SKIP_LEVELS = len(ENCODER_WIDTHS)
#: LeakyReLU slope of E_glo and U (Table 6.3's autoencoder; GCAD's is not stated).
SLOPE = 0.05
#: Hidden width of U.
DECODER_WIDTH = 128


# --------------------------------------------------------------------------- U-Net


class UNetConvBlock(nn.Module):
    """Two 3 x 3 convolutions (padding 1), each followed by ReLU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class UNetUpBlock(nn.Module):
    """2 x 2 stride-2 transposed convolution, concatenation with the skip, conv block."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2)
        self.conv_block = UNetConvBlock(in_channels, out_channels)

    def forward(self, x: torch.Tensor, bridge: torch.Tensor) -> torch.Tensor:
        return self.conv_block(torch.cat([self.up(x), bridge], dim=1))


class UNet(nn.Module):
    """The jvanvugt/pytorch-unet U-Net (padding, upconv, no batch norm): ``[B, in, H, W] ->
    [B, out, H, W]`` for ``H, W`` multiples of ``2^(depth-1)``."""

    def __init__(self, in_channels: int, out_channels: int, depth: int = 5, wf: int = 6) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"U-Net depth must be at least 1, got {depth}")
        self.depth = depth
        self.down_path = nn.ModuleList()
        channels = in_channels
        for i in range(depth):
            self.down_path.append(UNetConvBlock(channels, 2 ** (wf + i)))
            channels = 2 ** (wf + i)
        self.up_path = nn.ModuleList()
        for i in reversed(range(depth - 1)):
            self.up_path.append(UNetUpBlock(channels, 2 ** (wf + i)))
            channels = 2 ** (wf + i)
        self.last = nn.Conv2d(channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bridges = []
        for i, down in enumerate(self.down_path):
            x = down(x)
            if i != len(self.down_path) - 1:
                bridges.append(x)
                x = F.avg_pool2d(x, 2)
        for i, up in enumerate(self.up_path):
            x = up(x, bridges[-i - 1])
        return self.last(x)


# --------------------------------------------------------------------------- the global branch


def skip_weights(epoch: float, decay_epochs: float, levels: int = SKIP_LEVELS) -> list[float]:
    """The skip weights ``[u, v, w, x, y]`` (upper level first) after ``epoch`` finished epochs:
    level ``k`` falls linearly from 1 to 0 during epochs ``k D / levels ... (k + 1) D / levels``
    (``D = decay_epochs``); all 0 from ``D`` on (``D = 0``: no skips at all)."""
    if decay_epochs <= 0:
        return [0.0] * levels
    progress = epoch * levels / decay_epochs  # in level windows: level k fades while k <= progress <= k + 1
    return [min(1.0, max(0.0, float(k + 1 - progress))) for k in range(levels)]


class GlobalEncoderDecoder(nn.Module):
    """``E_glo``: ``[B, 3, S, S] -> [B, d_glo, S, S]`` through a ``1 x 1 x g`` bottleneck, with five
    skip connections scaled by the buffer ``skip_weights`` (see the module docstring)."""

    def __init__(self, image_size: int, bottleneck: int = 32, out_channels: int = 10, widths: Sequence[int] = ENCODER_WIDTHS, slope: float = SLOPE) -> None:
        super().__init__()
        levels = len(widths)
        if image_size % (2**levels) or image_size < 2**levels:
            raise ValueError(f"E_glo takes square images whose side is a multiple of {2 ** levels}, got {image_size}")
        self.slope = slope
        latent_kernel = image_size // 2**levels
        self.encoder = nn.ModuleList()
        channels = 3
        for width in widths:
            self.encoder.append(nn.Conv2d(channels, width, kernel_size=4, stride=2, padding=1))
            channels = width
        self.to_latent = nn.Conv2d(channels, bottleneck, kernel_size=latent_kernel)
        self.from_latent = nn.ConvTranspose2d(bottleneck, widths[-1], kernel_size=latent_kernel)
        # decoder upconvs from level k + 1 (S / 2^(k+2)) to level k (S / 2^(k+1)), deepest first
        self.decoder = nn.ModuleList(nn.ConvTranspose2d(widths[k + 1], widths[k], kernel_size=4, stride=2, padding=1) for k in reversed(range(levels - 1)))
        self.output = nn.ConvTranspose2d(widths[0], out_channels, kernel_size=4, stride=2, padding=1)
        # skips[k] joins encoder level k (S / 2^(k+1)) to the decoder output of the same size: u = skips[0]
        self.skips = nn.ModuleList(nn.Conv2d(width, width, kernel_size=1) for width in widths)
        self.register_buffer("skip_weights", torch.ones(levels))

    def set_skip_weights(self, weights: Sequence[float]) -> None:
        """Set ``[u, v, w, x, y]`` (upper level first)."""
        self.skip_weights.copy_(torch.as_tensor(list(weights), dtype=self.skip_weights.dtype))

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The bottleneck ``[B, g, 1, 1]`` and the encoder levels (``S/2`` first)."""
        levels = []
        x = images
        for conv in self.encoder:
            x = F.leaky_relu(conv(x), self.slope)
            levels.append(x)
        return self.to_latent(x), levels

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        latent, levels = self.encode(images)
        last = len(levels) - 1
        x = self.from_latent(latent) + self.skip_weights[last] * self.skips[last](levels[last])
        x = F.leaky_relu(x, self.slope)
        for up, k in zip(self.decoder, reversed(range(last))):
            x = up(x) + self.skip_weights[k] * self.skips[k](levels[k])
            x = F.leaky_relu(x, self.slope)
        return self.output(x)


class DistillationDecoder(nn.Module):
    """``U``: three 1 x 1 convolutions ``d_glo -> 128 -> 128 -> 128``, LeakyReLU between them."""

    def __init__(self, in_channels: int = 10, out_channels: int = DESCRIPTOR_DIM, hidden: int = DECODER_WIDTH, slope: float = SLOPE) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_channels, hidden, kernel_size=1),
            nn.LeakyReLU(slope),
            nn.Conv2d(hidden, hidden, kernel_size=1),
            nn.LeakyReLU(slope),
            nn.Conv2d(hidden, out_channels, kernel_size=1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)


# --------------------------------------------------------------------------- formulas


def regression_loss(target: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
    """``mean over images and pixels of ||target - prediction||^2`` (squared norm over channels)."""
    return ((target.float() - prediction.float()) ** 2).sum(dim=1).mean()


def gcad_loss(kd: torch.Tensor, local: torch.Tensor, glo: torch.Tensor | None = None, local_depth: int = DESCRIPTOR_DIM, global_depth: int = 10) -> torch.Tensor:
    """Eq. 7.4: ``L_kd / d_loc + L_glo / d_glo + L_loc / d_loc`` (``glo=None``: without ``L_glo``)."""
    total = kd / local_depth + local / local_depth
    return total if glo is None else total + glo / global_depth


def squared_distance_map(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``||a - b||^2`` per pixel: ``[B, C, H, W] -> [B, H, W]``."""
    return ((a.float() - b.float()) ** 2).sum(dim=1)


def map_statistics(maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (population) standard deviation of every value of ``maps``; the std is kept
    positive (1e-6 at least) so that constant maps stay finite."""
    values = maps.detach().double().flatten()
    return values.mean().float(), values.std(unbiased=False).clamp_min(1e-6).float()


@torch.no_grad()
def fold_normalisation(teacher: PatchNetwork, mean: torch.Tensor, std: torch.Tensor) -> None:
    """Fold ``(T - mean) / std`` (per channel) into the teacher's final convolution:
    ``W' = W / std``, ``b' = (b - mean) / std``."""
    last = teacher.convs[-1]
    mean, std = mean.flatten().to(last.weight), std.flatten().to(last.weight)
    last.weight.div_(std.view(-1, 1, 1, 1))
    last.bias.sub_(mean).div_(std)


# --------------------------------------------------------------------------- the model


class GcadBranch(nn.Module):
    """GCAD for one patch size: ``E_loc``, ``R_loc``, ``E_glo``, ``U``, ``R_glo`` and the map
    statistics (buffers ``local_mean``, ``local_std``, ``global_mean``, ``global_std``: 0 and 1,
    i.e. no standardisation, until fitted), and the teacher's LeakyReLU slope (``teacher_slope``).
    The teacher is frozen and always in eval mode."""

    def __init__(self, patch_size: int, image_size: int, bottleneck: int = 32, global_channels: int = 10, unet_depth: int = 5, unet_width: int = 6) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.global_channels = global_channels
        self.teacher = PatchNetwork(patch_size)
        self.local_regressor = UNet(3, DESCRIPTOR_DIM, unet_depth, unet_width)
        self.global_network = GlobalEncoderDecoder(image_size, bottleneck, global_channels)
        self.decoder = DistillationDecoder(global_channels, DESCRIPTOR_DIM)
        self.global_regressor = UNet(3, global_channels, unet_depth, unet_width)
        for parameter in self.teacher.parameters():
            parameter.requires_grad_(False)
        for name, value in (("local_mean", 0.0), ("local_std", 1.0), ("global_mean", 0.0), ("global_std", 1.0)):
            self.register_buffer(name, torch.tensor(value))
        # the teacher's LeakyReLU slope (a teacher file may have been distilled with another one)
        self.register_buffer("teacher_slope", torch.tensor(float(self.teacher.slope), dtype=torch.float64))
        self.teacher.eval()

    def set_teacher_slope(self, slope: float) -> None:
        """The LeakyReLU slope the teacher was distilled with (saved with the model)."""
        self.teacher_slope.fill_(float(slope))
        self.sync_teacher_slope()

    def sync_teacher_slope(self) -> None:
        """Give the teacher the saved slope (after loading a state)."""
        self.teacher.slope = float(self.teacher_slope)

    def train(self, mode: bool = True) -> GcadBranch:
        super().train(mode)
        self.teacher.eval()
        return self

    def teacher_features(self, images: torch.Tensor) -> torch.Tensor:
        """``E_loc``: the normalised teacher descriptors (no gradient)."""
        with torch.no_grad():
            return self.teacher(images)

    def losses(self, images: torch.Tensor, with_global: bool) -> dict[str, torch.Tensor]:
        """The unnormalised terms ``kd``, ``local`` and (``with_global``) ``global`` of one batch."""
        target = self.teacher_features(images)
        features = self.global_network(images)
        terms = {
            "kd": regression_loss(target, self.decoder(features)),
            "local": regression_loss(target, self.local_regressor(images)),
        }
        if with_global:
            terms["global"] = regression_loss(features, self.global_regressor(images))
        return terms

    def loss(self, images: torch.Tensor, with_global: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Eq. 7.4 of one batch and its terms."""
        terms = self.losses(images, with_global)
        total = gcad_loss(terms["kd"], terms["local"], terms.get("global"), DESCRIPTOR_DIM, self.global_channels)
        return total, terms

    def raw_maps(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unstandardised ``A_loc`` and ``A_glo``, ``[B, H, W]``."""
        target = self.teacher_features(images)
        local = squared_distance_map(target, self.local_regressor(images))
        glo = squared_distance_map(self.global_network(images), self.global_regressor(images))
        return local, glo

    def standardise(self, local: torch.Tensor, glo: torch.Tensor) -> torch.Tensor:
        """``(A_loc - mu_loc) / sigma_loc + (A_glo - mu_glo) / sigma_glo``."""
        return (local - self.local_mean) / self.local_std + (glo - self.global_mean) / self.global_std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The standardised map ``A`` of this patch size, ``[B, H, W]``."""
        return self.standardise(*self.raw_maps(images))


class GcadModel(nn.Module):
    """Every patch size's :class:`GcadBranch` (``branches["p17"]``, ...): ``images -> (scores, maps)``."""

    def __init__(self, patch_sizes: Iterable[int], image_size: int, bottleneck: int = 32, global_channels: int = 10, unet_depth: int = 5, unet_width: int = 6) -> None:
        super().__init__()
        self.image_size = image_size
        self.branches = nn.ModuleDict({f"p{p}": GcadBranch(p, image_size, bottleneck, global_channels, unet_depth, unet_width) for p in patch_sizes})

    def set_skip_weights(self, weights: Sequence[float]) -> None:
        """The same skip weights for every branch's ``E_glo``."""
        for branch in self.branches.values():
            branch.global_network.set_skip_weights(weights)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores ``[B]`` (the map's maximum) and maps ``[B, S, S]`` (the mean over patch sizes of
        each branch's standardised ``A``), at the input resolution."""
        maps = torch.stack([branch(images) for branch in self.branches.values()]).mean(dim=0)
        return maps.flatten(1).amax(dim=1), maps


# --------------------------------------------------------------------------- augmentation


def augment(images01: torch.Tensor, generator: torch.Generator, vertical_flip: bool = False, horizontal_flip: bool = False, rotation: float = 3.0, jitter: float = 0.2) -> torch.Tensor:
    """The thesis' LOCO / MVTec AD augmentations (§6.4.1, Tables 6.2 and 7.4) on ``[B, 3, H, W]``
    images in [0, 1], drawn per image from ``generator``: vertical and horizontal flips (p = 1/2
    each, when enabled); a rotation about the centre by an angle uniform in ``[-rotation,
    rotation]`` degrees (bilinear, the corners filled with black as torchvision's
    ``RandomRotation``); brightness, contrast and saturation factors uniform in ``[1 - jitter,
    1 + jitter]``, applied in a random order (torchvision's ``ColorJitter``), clamped to [0, 1]."""
    count = images01.shape[0]
    out = images01
    if vertical_flip or horizontal_flip:
        flipped = []
        for image in out:
            if vertical_flip and float(torch.rand(1, generator=generator)) < 0.5:
                image = image.flip(-2)
            if horizontal_flip and float(torch.rand(1, generator=generator)) < 0.5:
                image = image.flip(-1)
            flipped.append(image)
        out = torch.stack(flipped)
    if rotation > 0:
        angles = (torch.rand(count, generator=generator, dtype=torch.float64) * 2 - 1) * rotation
        radians = torch.deg2rad(angles)
        cos, sin = torch.cos(radians), torch.sin(radians)
        zero = torch.zeros_like(cos)
        theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1).to(out)
        grid = F.affine_grid(theta, list(out.shape), align_corners=False)
        out = F.grid_sample(out, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if jitter > 0:
        jittered = []
        for image in out:
            factors = (1 + (torch.rand(3, generator=generator, dtype=torch.float64) * 2 - 1) * jitter).tolist()
            for kind in torch.randperm(3, generator=generator).tolist():
                gray = (0.299 * image[0] + 0.587 * image[1] + 0.114 * image[2])[None]
                if kind == 0:  # brightness: blend with black
                    image = image * factors[0]
                elif kind == 1:  # contrast: blend with the mean gray level
                    image = factors[1] * image + (1 - factors[1]) * gray.mean()
                else:  # saturation: blend with the gray image
                    image = factors[2] * image + (1 - factors[2]) * gray
                image = image.clamp(0, 1)
            jittered.append(image)
        out = torch.stack(jittered)
    return out
