"""DDAD's numerical heart (Mousakhan, Brox, Tayyub, arXiv 2305.15956): plain torch, free of I/O.

Everything follows the official code (github.com/arimousa/DDAD, commit 4323a15); file names
below are that repository's.

* :class:`UNetModel` -- the denoiser, ``unet.py`` (guided-diffusion's UNet as DDAD trimmed it):
  BigGAN-style residual up/down-sampling blocks, the timestep's sinusoidal embedding added to
  every residual block (no scale-shift norm), legacy-order QKV self-attention with a fixed
  number of heads at the resolutions ``image_size // ds in attention_resolutions``, GroupNorm
  computed in float32, and the last convolution of every residual branch, of every attention
  projection and of the output zero-initialised. Module names match the official ones, so an
  official state dict (without DataParallel's ``module.`` prefix) has the same keys.
* :func:`noise_schedule` -- diffusers' :class:`~diffusers.DDIMScheduler` with the official
  linear betas (``np.linspace(beta_start, beta_end, T)``); its ``alphas_cumprod[t]`` is the
  official ``alpha_t``, its ``add_noise`` the forward process and its ``step`` the DDIM update.
* :func:`diffusion_loss` -- ``loss.py``: ``sum_{c,h,w} (eps - eps_theta(sqrt(a_t) x_0 +
  sqrt(1 - a_t) eps, t))^2`` averaged over the batch.
* :func:`conditioned_reconstruction` -- ``reconstruction.py``: noise the input to ``start``,
  then DDIM steps ``t = start - skip, ..., 0`` (``range(0, start, skip)`` reversed; note the
  first step is taken at ``start - skip`` from a sample noised to ``start``, as official) with
  the conditioned noise ``eps^ = eps - w sqrt(1 - a_t) (y_t - x_t)``, ``y_t = sqrt(a_t) y +
  sqrt(1 - a_t) eps``; the output is the last step's sample (its predicted ``x_0``).
* :func:`pixel_distance`, :func:`feature_distance`, :func:`combine_maps`, :func:`gaussian_blur`
  (the score's smoothing) -- ``anomaly_map.py``.
* :func:`domain_adaptation_loss` -- ``feature_extractor.py: loss_fucntion``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

#: The official channel multipliers per image size (``unet.py``). The official 512 entry
#: ``(0.5, 1, 1, 2, 2, 4, 4)`` cannot run there (the first residual block expects half the
#: stem's channels), so it is not offered.
CHANNEL_MULTS = {32: (1, 2, 3, 4), 64: (1, 2, 3, 4), 128: (1, 1, 2, 3, 4), 256: (1, 1, 2, 2, 4, 4)}


# --------------------------------------------------------------------------- the UNet


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input's dtype (as official)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


def zero_module(module: nn.Module) -> nn.Module:
    """``module`` with its parameters set to zero (official initialisation of output layers)."""
    for parameter in module.parameters():
        parameter.detach().zero_()
    return module


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding of the (float) timestep: ``[sin(t f_k), cos(t f_k)]``, ``f_k = 10000^(-k / (dim / 2))``."""

    def __init__(self, dim: int, scale: float = 1.0) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"the positional embedding needs an even dimension, got {dim}")
        self.dim, self.scale = dim, scale

    def forward(self, time: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        frequencies = torch.exp(torch.arange(half, device=time.device, dtype=torch.float32) * -(math.log(10000) / half))
        angles = (time.float() * self.scale)[:, None] * frequencies[None, :]  # torch.outer, traceable
        return torch.cat((angles.sin(), angles.cos()), dim=-1)


class TimestepEmbedSequential(nn.Sequential):
    """A sequence passing the time embedding to the residual blocks in it."""

    def forward(self, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, embedding) if isinstance(layer, ResBlock) else layer(x)
        return x


class Resample(nn.Module):
    """Parameter-free 2x down-sampling (average pooling) or up-sampling (nearest), as official
    ``Downsample`` / ``Upsample`` with ``use_conv=False``."""

    def __init__(self, up: bool) -> None:
        super().__init__()
        self.up = up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2, mode="nearest") if self.up else F.avg_pool2d(x, kernel_size=2, stride=2)


class ResBlock(nn.Module):
    """Residual block: ``GN-SiLU-conv``, plus the projected time embedding, ``GN-SiLU-dropout-conv``
    (zero-initialised), plus the skip (1x1 conv when the width changes); ``up`` / ``down``
    resample both paths between the first activation and convolution (BigGAN style)."""

    def __init__(self, in_channels: int, time_embed_dim: int, dropout: float, out_channels: int | None = None, groups: int = 32, up: bool = False, down: bool = False) -> None:
        super().__init__()
        out_channels = out_channels or in_channels
        self.in_layers = nn.Sequential(GroupNorm32(groups, in_channels), nn.SiLU(), nn.Conv2d(in_channels, out_channels, 3, padding=1))
        self.updown = up or down
        if self.updown:
            self.h_upd, self.x_upd = Resample(up), Resample(up)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.embed_layers = nn.Sequential(nn.SiLU(), nn.Linear(time_embed_dim, out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm32(groups, out_channels), nn.SiLU(), nn.Dropout(p=dropout), zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        )
        self.skip_connection = nn.Identity() if out_channels == in_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        if self.updown:
            h = self.in_layers[:-1](x)
            h, x = self.h_upd(h), self.x_upd(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        h = h + self.embed_layers(embedding).type(h.dtype)[..., None, None]
        return self.skip_connection(x) + self.out_layers(h)


class QKVAttention(nn.Module):
    """Multi-head attention on a ``[B, 3 H C, T]`` tensor in guided-diffusion's legacy order
    (each head's q, k, v consecutive), scaled by ``C^-1/4`` on both q and k."""

    def __init__(self, heads: int) -> None:
        super().__init__()
        self.heads = heads

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        batch, width, length = qkv.shape
        channels = width // (3 * self.heads)
        q, k, v = qkv.reshape(batch * self.heads, channels * 3, length).split(channels, dim=1)
        scale = 1 / math.sqrt(math.sqrt(channels))
        weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)
        weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
        return torch.einsum("bts,bcs->bct", weight, v).reshape(batch, -1, length)


class AttentionBlock(nn.Module):
    """Self-attention over all positions with a residual connection (zero-initialised output)."""

    def __init__(self, channels: int, heads: int, groups: int = 32) -> None:
        super().__init__()
        self.norm = GroupNorm32(groups, channels)
        self.to_qkv = nn.Conv1d(channels, channels * 3, 1)
        self.attention = QKVAttention(heads)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        h = self.proj_out(self.attention(self.to_qkv(self.norm(x))))
        return (x + h).reshape(b, c, *spatial)


class UNetModel(nn.Module):
    """The official DDAD UNet (``unet.py: UNetModel`` with ``biggan_updown=True``, ``conv_resample``
    unused, ``n_head_channels=-1``): ``(x_t [B, C, H, W], t [B] or [1]) -> eps_theta [B, C, H, W]``."""

    def __init__(
        self,
        image_size: int,
        base_channels: int,
        channel_mults: Sequence[int],
        heads: int = 4,
        num_res_blocks: int = 2,
        dropout: float = 0.0,
        attention_resolutions: Sequence[int] = (32, 16, 8),
        in_channels: int = 3,
        groups: int = 32,
    ) -> None:
        super().__init__()
        attention_ds = [image_size // int(resolution) for resolution in attention_resolutions]
        time_embed_dim = base_channels * 4
        self.time_embedding = nn.Sequential(
            PositionalEmbedding(base_channels), nn.Linear(base_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)
        )
        ch = channel_mults[0] * base_channels
        self.down = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_channels, base_channels, 3, padding=1))])
        channels, ds = [ch], 1
        for level, mult in enumerate(channel_mults):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, time_embed_dim, dropout, base_channels * mult, groups)]
                ch = base_channels * mult
                if ds in attention_ds:
                    layers.append(AttentionBlock(ch, heads, groups))
                self.down.append(TimestepEmbedSequential(*layers))
                channels.append(ch)
            if level != len(channel_mults) - 1:
                self.down.append(TimestepEmbedSequential(ResBlock(ch, time_embed_dim, dropout, ch, groups, down=True)))
                ds *= 2
                channels.append(ch)
        self.middle = TimestepEmbedSequential(
            ResBlock(ch, time_embed_dim, dropout, groups=groups), AttentionBlock(ch, heads, groups), ResBlock(ch, time_embed_dim, dropout, groups=groups)
        )
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mults))):
            for block in range(num_res_blocks + 1):
                layers = [ResBlock(ch + channels.pop(), time_embed_dim, dropout, base_channels * mult, groups)]
                ch = base_channels * mult
                if ds in attention_ds:
                    layers.append(AttentionBlock(ch, heads, groups))
                if level and block == num_res_blocks:
                    layers.append(ResBlock(ch, time_embed_dim, dropout, ch, groups, up=True))
                    ds //= 2
                self.up.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(GroupNorm32(groups, ch), nn.SiLU(), zero_module(nn.Conv2d(base_channels * channel_mults[0], in_channels, 3, padding=1)))

    def encode(self, x: torch.Tensor, time: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The down path's outputs (the skips) and the time embedding."""
        embedding = self.time_embedding(time)
        skips = []
        for module in self.down:
            x = module(x, embedding)
            skips.append(x)
        return skips, embedding

    def forward(self, x: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        skips, embedding = self.encode(x, time)
        h = self.middle(skips[-1], embedding)
        for module in self.up:
            h = module(torch.cat([h, skips.pop()], dim=1), embedding)
        return self.out(h)


# --------------------------------------------------------------------------- the diffusion


def noise_schedule(trajectory_steps: int, beta_start: float, beta_end: float):
    """diffusers' DDIM scheduler with DDAD's linear betas over ``trajectory_steps`` (T = 1000),
    no clipping of the predicted ``x_0``, and ``alpha = 1`` before step 0 (``set_alpha_to_one``:
    the official ``_compute_alpha(-1)`` is 1). diffusers is imported here, after
    huggingface_hub was put offline when the hub is unreachable (it never downloads anything
    for a scheduler)."""
    from vad_timm.compat import use_offline_hub_if_unreachable

    use_offline_hub_if_unreachable()
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=trajectory_steps, beta_start=beta_start, beta_end=beta_end, beta_schedule="linear",
        clip_sample=False, set_alpha_to_one=True, steps_offset=0, prediction_type="epsilon", timestep_spacing="leading",
    )


def diffusion_loss(unet: nn.Module, scheduler, images: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The official training loss of a batch: the squared error of the predicted noise summed
    over channels and pixels, averaged over the images (``loss.py: get_loss``)."""
    noisy = scheduler.add_noise(images, noise, timesteps)
    predicted = unet(noisy, timesteps.float())
    return (noise - predicted.float()).square().sum(dim=(1, 2, 3)).mean(dim=0)


def trajectory(start: int, skip: int) -> list[int]:
    """The timesteps of the conditioned denoising, ``reversed(range(0, start, skip))``."""
    return list(range(0, start, skip))[::-1]


def conditioned_reconstruction(
    unet: nn.Module, scheduler, images: torch.Tensor, targets: torch.Tensor, w: float, start: int, skip: int, eta: float, noises: Sequence[torch.Tensor]
) -> torch.Tensor:
    """DDAD's reconstruction of ``images`` conditioned on ``targets`` (``reconstruction.py``).

    ``noises``: the initial noise and one noise per step (each broadcastable to ``images``);
    ``len(trajectory(start, skip)) + 1`` of them. ``skip`` must divide the scheduler's
    ``num_train_timesteps``: its ``step`` then goes back by ``skip`` (to ``alpha = 1`` after 0).
    """
    steps = trajectory(start, skip)
    if len(noises) != len(steps) + 1:
        raise ValueError(f"conditioned_reconstruction needs {len(steps) + 1} noise tensors, got {len(noises)}")
    total = scheduler.config.num_train_timesteps
    if total % skip or not 0 < start < total:
        raise ValueError(f"conditioned_reconstruction needs a skip dividing {total} and 0 < start < {total}, got skip {skip}, start {start}")
    scheduler.set_timesteps(total // skip)
    alphas = scheduler.alphas_cumprod
    x = scheduler.add_noise(images, noises[0].to(images.dtype).expand_as(images), torch.tensor([start]))
    time = torch.ones(1, device=images.device)
    for index, t in enumerate(steps):
        epsilon = unet(x, time * t).to(images.dtype)
        alpha = alphas[t].to(images.device, images.dtype)
        y = alpha.sqrt() * targets + (1 - alpha).sqrt() * epsilon
        corrected = epsilon - (1 - alpha).sqrt() * w * (y - x)
        x = scheduler.step(corrected, t, x, eta=eta, variance_noise=noises[index + 1].to(images.dtype).expand_as(images)).prev_sample
    return x


# --------------------------------------------------------------------------- the anomaly map


def pixel_distance(reconstruction: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """``D_p``: the L1 distance averaged over the colour channels, ``[B, 1, H, W]``."""
    return (reconstruction - images).abs().mean(dim=1, keepdim=True)


def patchify(features: torch.Tensor) -> torch.Tensor:
    """The mean of each 3x3 neighbourhood, zero padding counted (official ``patchify``: unfold + mean)."""
    return F.avg_pool2d(features, 3, stride=1, padding=1, count_include_pad=True)


def feature_distance(reconstructed: Sequence[torch.Tensor], original: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """``D_f``: per level ``1 - cos`` of the patchified features along the channels, upsampled
    bilinearly (``align_corners=True``) to ``size`` and summed over the levels, ``[B, 1, H, W]``."""
    total = None
    for out, inp in zip(reconstructed, original, strict=True):
        level = 1 - F.cosine_similarity(patchify(inp), patchify(out), dim=1)
        level = F.interpolate(level[:, None], size=size, mode="bilinear", align_corners=True)
        total = level if total is None else total + level
    if total is None:
        raise ValueError("feature_distance needs at least one level")
    return total


def blur_matrix(size: int, sigma: float) -> torch.Tensor:
    """``[size, size]`` float64 matrix of kornia's ``gaussian_blur2d`` along an axis of ``size``
    samples (the official score's blur): kernel ``2 int(4 sigma + 0.5) + 1`` wide (33 for sigma
    4), normalised, and the border mirrored without repeating the edge sample (``reflect``),
    repeatedly for axes shorter than the kernel."""
    radius = int(4 * sigma + 0.5)
    taps = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-(taps**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    if size == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    period = 2 * size - 2
    source = (torch.arange(size).unsqueeze(1) + taps.long().unsqueeze(0)).remainder(period)
    source = torch.where(source >= size, period - source, source)
    return torch.zeros(size, size, dtype=torch.float64).scatter_add_(1, source, kernel.expand(size, -1).contiguous())


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """``[B, H, W]`` maps smoothed as kornia's ``gaussian_blur2d`` with sigma ``sigma`` (two matrix
    products, constants in a traced graph); ``sigma == 0`` returns them unchanged."""
    if sigma <= 0:
        return maps
    rows = blur_matrix(int(maps.shape[-2]), float(sigma)).to(maps.device, maps.dtype)
    cols = blur_matrix(int(maps.shape[-1]), float(sigma)).to(maps.device, maps.dtype)
    return torch.matmul(torch.matmul(rows, maps), cols.T)


def combine_maps(pixel: torch.Tensor, feature: torch.Tensor, v: float) -> torch.Tensor:
    """``D_f + v (max D_f / max D_p) D_p`` with the maxima of each image (official: of the batch),
    ``[B, H, W]``; an all-zero ``D_p`` (a perfect reconstruction) adds nothing."""
    top_feature = feature.flatten(1).amax(dim=1).view(-1, 1, 1, 1)
    top_pixel = pixel.flatten(1).amax(dim=1).view(-1, 1, 1, 1).clamp_min(torch.finfo(pixel.dtype).tiny)
    return (feature + v * (top_feature / top_pixel) * pixel)[:, 0]


# --------------------------------------------------------------------------- domain adaptation


def _cosine_distance(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """``mean_b (1 - cos(first_b, second_b))`` of each image's flattened features."""
    return (1 - F.cosine_similarity(first.flatten(1), second.flatten(1), dim=1)).mean()


def domain_adaptation_loss(
    reconstructed: Sequence[torch.Tensor], target: Sequence[torch.Tensor], target_frozen: Sequence[torch.Tensor], reconstructed_frozen: Sequence[torch.Tensor], weight: float
) -> torch.Tensor:
    """``L_DA`` (``feature_extractor.py: loss_fucntion``), summed over the levels ``j``:
    ``(1 - cos(phi_j(x_0), phi_j(y))) + lambda (1 - cos(phi_j(y), phi0_j(y))) + lambda (1 -
    cos(phi_j(x_0), phi0_j(x_0)))``, each cosine over an image's flattened features and averaged
    over the images; ``phi0`` is the frozen extractor, ``lambda`` = ``weight`` (DLlambda)."""
    loss = torch.zeros((), device=reconstructed[0].device)
    for a, b, c, d in zip(reconstructed, target, target_frozen, reconstructed_frozen, strict=True):
        loss = loss + _cosine_distance(a, b) + weight * _cosine_distance(b, c) + weight * _cosine_distance(a, d)
    return loss


class FeatureExtractor(nn.Module):
    """A feature network (timm ``features_only``) on DDAD's ``[-1, 1]`` images: maps them to
    ``[0, 1]`` and normalises them with the network's own mean and std (official: ImageNet's),
    then returns the maps at ``positions``."""

    def __init__(self, model: nn.Module, positions: Sequence[int], mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.model, self.positions = model, list(positions)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        outputs = self.model(((images + 1) / 2 - self.mean) / self.std)
        maps = list(outputs.values()) if isinstance(outputs, dict) else list(outputs)
        return [maps[p] for p in self.positions]
