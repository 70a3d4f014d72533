"""EfficientAD's networks and formulas (Batzner, Heckler, König, WACV 2024), free of I/O.

Architectures follow the paper's appendix and the reproduction the authors point to
(github.com/nelson1425/EfficientAD, ``common.py``), layer for layer and in the same
``nn.Sequential`` order, so the state dicts have the official keys (``0.weight``, ``3.weight``, ...)
and the official ``teacher_small.pth`` / ``teacher_medium.pth`` load into :func:`pdn`:

* **PDN-S** (patch description network, small): conv 4x4 3->128, ReLU, avg-pool 2x2/2, conv 4x4
  128->256, ReLU, avg-pool 2x2/2, conv 3x3 256->256, ReLU, conv 4x4 256->C. Receptive field
  33 x 33 px, output stride 4.
* **PDN-M** (medium): conv 4x4 3->256, ReLU, avg-pool, conv 4x4 256->512, ReLU, avg-pool, conv 1x1
  512->512, ReLU, conv 3x3 512->512, ReLU, conv 4x4 512->C, ReLU, conv 1x1 C->C. Same 33 px field.
* ``padding=True`` (used only to distil the teacher, as ``pretraining.py``) pads the 4x4 convs by
  3, the 3x3 conv and the pools by 1; ``padding=False`` (training and inference) pads nothing:
  a 256 px image gives a 56 x 56 output (``image_size / 4 - 8``).
* **Autoencoder**: encoder of five strided 4x4 convs (3->32->32->64->64->64, stride 2, pad 1,
  ReLU) and a conv 64->64 with kernel ``image_size / 32`` (8 at 256 px) down to a 64 x 1 x 1
  latent; decoder of six (bilinear upsample, conv 4x4 pad 2, ReLU, dropout 0.2) stages to sizes
  3, 8, 15, 32, 63, 127 (at 256 px), a bilinear upsample to the PDN output size, conv 3x3 + ReLU
  and a conv 3x3 to C channels. At other sizes the stage sizes scale as anomalib's
  (``S//64 - 1, S//32, S//16 - 1, S//8, S//4 - 1, S//2 - 1``, at least 1): identical at 256 px.

Formulas (official ``efficientad.py``; a test checks each against a hand computation):

* teacher outputs are normalised per channel with the mean and std over the training images;
* hard-feature loss: ``d = (T - S_st)^2``; ``d_hard = quantile(d, 0.999)``;
  ``L_hard = mean(d[d >= d_hard])`` (the whole batch's elements, as official);
* penalty: ``mean(S_st(P)^2)`` on a pretraining image ``P`` (official: ImageNet);
* autoencoder loss ``mean((T(A) - AE(A))^2)`` and student-autoencoder loss
  ``mean((AE(A) - S_ae(A))^2)`` on the augmented image ``A``;
* maps ``M_st = mean_c (T - S_st)^2`` and ``M_ae = mean_c (AE - S_ae)^2``; each normalised as
  ``0.1 (M - q_a) / (q_b - q_a)`` with its quantiles ``q_a = Q(0.9)``, ``q_b = Q(0.995)`` over
  the validation images' maps; combined ``0.5 M_st + 0.5 M_ae``; zero-padded by 4 on every side
  (back to ``image_size / 4``, aligned with the image) before the bilinear upsampling; the
  image score is the maximum of the upsampled map.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

ModelSize = Literal["small", "medium"]

#: Channels of the teacher's output (the student has twice as many).
OUT_CHANNELS = 384
#: Quantiles of the map normalisation (official q_a = 0.9, q_b = 0.995).
Q_START, Q_END = 0.9, 0.995
#: Quantile of the hard-feature loss (official 0.999).
Q_HARD = 0.999
#: Receptive field of both PDNs (paper: 33 x 33 px patches).
RECEPTIVE_FIELD = 33


def pdn(size: ModelSize, out_channels: int = OUT_CHANNELS, padding: bool = False) -> nn.Sequential:
    """PDN-S or PDN-M (official ``get_pdn_small`` / ``get_pdn_medium``, same module order)."""
    p = 1 if padding else 0
    if size == "small":
        return nn.Sequential(
            nn.Conv2d(3, 128, kernel_size=4, padding=3 * p),
            nn.ReLU(inplace=True),
            nn.AvgPool2d(kernel_size=2, stride=2, padding=1 * p),
            nn.Conv2d(128, 256, kernel_size=4, padding=3 * p),
            nn.ReLU(inplace=True),
            nn.AvgPool2d(kernel_size=2, stride=2, padding=1 * p),
            nn.Conv2d(256, 256, kernel_size=3, padding=1 * p),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, out_channels, kernel_size=4),
        )
    if size == "medium":
        return nn.Sequential(
            nn.Conv2d(3, 256, kernel_size=4, padding=3 * p),
            nn.ReLU(inplace=True),
            nn.AvgPool2d(kernel_size=2, stride=2, padding=1 * p),
            nn.Conv2d(256, 512, kernel_size=4, padding=3 * p),
            nn.ReLU(inplace=True),
            nn.AvgPool2d(kernel_size=2, stride=2, padding=1 * p),
            nn.Conv2d(512, 512, kernel_size=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(512, 512, kernel_size=3, padding=1 * p),
            nn.ReLU(inplace=True),
            nn.Conv2d(512, out_channels, kernel_size=4),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, kernel_size=1),
        )
    raise ValueError(f"model size must be 'small' or 'medium', got {size!r}")


def pdn_output_size(image_size: int) -> int:
    """Side of an unpadded PDN's output for a square input (``image_size / 4 - 8`` for multiples of 4)."""
    side = image_size - 3  # conv 4x4
    side //= 2  # pool
    side -= 3  # conv 4x4
    side //= 2  # pool
    side -= 2  # conv 3x3
    return side - 3  # conv 4x4


def decoder_sizes(image_size: int) -> list[int]:
    """The six decoder stage sizes (official 3, 8, 15, 32, 63, 127 at 256 px) for ``image_size``."""
    s = image_size
    return [max(1, v) for v in (s // 64 - 1, s // 32, s // 16 - 1, s // 8, s // 4 - 1, s // 2 - 1)]


def autoencoder(image_size: int = 256, out_channels: int = OUT_CHANNELS) -> nn.Sequential:
    """The official autoencoder (``get_autoencoder``) for square ``image_size`` inputs (a multiple of 32)."""
    layers: list[nn.Module] = []
    channels = [3, 32, 32, 64, 64, 64]
    for c_in, c_out in zip(channels[:-1], channels[1:]):
        layers += [nn.Conv2d(c_in, c_out, kernel_size=4, stride=2, padding=1), nn.ReLU(inplace=True)]
    layers.append(nn.Conv2d(64, 64, kernel_size=image_size // 32))
    for size in decoder_sizes(image_size):
        layers += [
            nn.Upsample(size=size, mode="bilinear"),
            nn.Conv2d(64, 64, kernel_size=4, stride=1, padding=2),
            nn.ReLU(inplace=True),
            nn.Dropout(0.2),
        ]
    layers += [
        nn.Upsample(size=pdn_output_size(image_size), mode="bilinear"),
        nn.Conv2d(64, 64, kernel_size=3, stride=1, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(64, out_channels, kernel_size=3, stride=1, padding=1),
    ]
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------- formulas


def hard_feature_loss(teacher: torch.Tensor, student: torch.Tensor, q: float = Q_HARD) -> torch.Tensor:
    """``mean(d[d >= quantile(d, q)])`` with ``d = (teacher - student)^2`` over the whole batch."""
    distance = (teacher - student) ** 2
    d_hard = torch.quantile(distance.detach().flatten().float(), q)
    return torch.mean(distance[distance >= d_hard])


def normalize_map(values: torch.Tensor, q_start: torch.Tensor, q_end: torch.Tensor) -> torch.Tensor:
    """``0.1 (M - q_a) / (q_b - q_a)``: q_a maps to 0, q_b to 0.1 (official ``predict``)."""
    return 0.1 * (values - q_start) / (q_end - q_start)


def map_quantiles(maps: torch.Tensor, q_start: float = Q_START, q_end: float = Q_END) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Q(q_a), Q(q_b))`` over every value of ``maps`` (official ``map_normalization``).

    ``torch.quantile`` takes at most 2^24 values; above, the exact order statistics are found by
    sorting (same linear interpolation)."""
    flat = maps.detach().flatten().float()
    if flat.numel() <= 1 << 24:
        return torch.quantile(flat, q_start), torch.quantile(flat, q_end)
    ordered = flat.sort().values
    return _sorted_quantile(ordered, q_start), _sorted_quantile(ordered, q_end)


def _sorted_quantile(ordered: torch.Tensor, q: float) -> torch.Tensor:
    position = q * (ordered.numel() - 1)
    low = int(position)
    high = min(low + 1, ordered.numel() - 1)
    return ordered[low] + (position - low) * (ordered[high] - ordered[low])


@torch.no_grad()
def channel_statistics(network: nn.Module, batches: Iterable[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of ``network``'s outputs (official ``teacher_normalization``:
    the mean of per-image channel means, then the mean of per-image mean squared deviations),
    as ``[1, C, 1, 1]``."""
    batches = list(batches)
    means = torch.cat([network(b).mean(dim=(2, 3)) for b in batches])  # one row per image, whatever the chunking
    mean = means.mean(dim=0)[None, :, None, None]
    variances = torch.cat([((network(b) - mean) ** 2).mean(dim=(2, 3)) for b in batches])
    std = variances.mean(dim=0).sqrt()[None, :, None, None]
    return mean, std


def color_jitter(images01: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The official autoencoder augmentation on ``[B, 3, H, W]`` images in [0, 1]: per image, one of
    brightness, contrast or saturation (``RandomChoice`` of three ``ColorJitter(0.2)``), with a
    factor uniform in [0.8, 1.2], as torchvision's functional ``adjust_*`` (blend, clamp to [0, 1])."""
    out = []
    for image in images01:
        kind = int(torch.randint(0, 3, (1,), generator=generator))
        factor = float(torch.empty(1).uniform_(0.8, 1.2, generator=generator))
        gray = (0.299 * image[0] + 0.587 * image[1] + 0.114 * image[2])[None]
        if kind == 0:  # brightness: blend with black
            jittered = image * factor
        elif kind == 1:  # contrast: blend with the mean gray level
            jittered = factor * image + (1 - factor) * gray.mean()
        else:  # saturation: blend with the gray image
            jittered = factor * image + (1 - factor) * gray
        out.append(jittered.clamp(0, 1))
    return torch.stack(out)


# --------------------------------------------------------------------------- the model


class EfficientAdModel(nn.Module):
    """Teacher, student and autoencoder with the fitted normalisations: ``images -> (scores, maps)``.

    Buffers: the teacher's channel ``teacher_mean`` / ``teacher_std`` and the map quantiles
    ``q_st_start``, ``q_st_end``, ``q_ae_start``, ``q_ae_end`` (0 and 0.1 until fitted: the maps are
    then left unnormalised, as the official ``predict`` without quantiles). The teacher stays in
    eval mode and frozen whatever ``train()`` is called with.
    """

    def __init__(self, size: ModelSize, image_size: int, out_channels: int = OUT_CHANNELS) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.image_size = image_size
        self.teacher = pdn(size, out_channels)
        self.student = pdn(size, 2 * out_channels)
        self.autoencoder = autoencoder(image_size, out_channels)
        for parameter in self.teacher.parameters():
            parameter.requires_grad_(False)
        self.register_buffer("teacher_mean", torch.zeros(1, out_channels, 1, 1))
        self.register_buffer("teacher_std", torch.ones(1, out_channels, 1, 1))
        # identity normalisation (0.1 (M - 0) / 0.1) until fitted, as the official predict without quantiles
        for name, value in (("q_st_start", 0.0), ("q_st_end", 0.1), ("q_ae_start", 0.0), ("q_ae_end", 0.1)):
            self.register_buffer(name, torch.tensor(value))
        self.teacher.eval()

    def train(self, mode: bool = True) -> EfficientAdModel:
        super().train(mode)
        self.teacher.eval()  # frozen: always inference mode
        return self

    def teacher_features(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised teacher output (no gradient)."""
        with torch.no_grad():
            return (self.teacher(images) - self.teacher_mean) / self.teacher_std

    def raw_maps(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unnormalised ``M_st`` and ``M_ae``, ``[B, h, w]`` at the PDN output size."""
        teacher = self.teacher_features(images)
        student = self.student(images)
        reconstruction = self.autoencoder(images)
        c = self.out_channels
        map_st = torch.mean((teacher - student[:, :c]) ** 2, dim=1)
        map_ae = torch.mean((reconstruction - student[:, c:]) ** 2, dim=1)
        return map_st, map_ae

    def combine(self, map_st: torch.Tensor, map_ae: torch.Tensor) -> torch.Tensor:
        """``0.5 norm(M_st) + 0.5 norm(M_ae)`` zero-padded by 4 (to ``image_size / 4``)."""
        map_st = normalize_map(map_st, self.q_st_start, self.q_st_end)
        map_ae = normalize_map(map_ae, self.q_ae_start, self.q_ae_end)
        combined = 0.5 * map_st + 0.5 * map_ae
        return F.pad(combined, (4, 4, 4, 4))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores ``[B]`` (maximum of the map upsampled bilinearly to the input size) and maps
        ``[B, image_size / 4, image_size / 4]`` (padded; vad upsamples them to each image's size)."""
        maps = self.combine(*self.raw_maps(images))
        upsampled = F.interpolate(maps[:, None], size=tuple(images.shape[-2:]), mode="bilinear", align_corners=False)
        return upsampled.flatten(1).amax(dim=1), maps
