"""CS-Flow's numerical heart (Rudolph et al., WACV 2022): the cross-scale flow, its loss and scores.

Plain torch and FrEIA, free of I/O. The official code (github.com/marco-rudolph/cs-flow) builds
the flow with a copy of an old FrEIA graph framework (``freia_funcs.py``: ``Node``,
``ReversibleGraphNet``); here the same graph is a FrEIA 0.2 ``GraphINN`` of two invertible
modules written after ``freia_funcs.py``:

* :class:`ParallelPermute`: a fixed random channel permutation of each of the three scales,
  drawn as the official ``ParallelPermute(seed=k)`` draws it for block ``k``;
* :class:`ParallelGlowCoupling`: the official ``parallel_glow_coupling_layer``, an affine
  (GLOW) coupling applied to the three scales at once, whose scale and shift come from
  :class:`CrossConvolutions` (the official subnetwork: per-scale convolutions plus up- and
  down-sampling convolutions that exchange information between neighbouring scales, scaled by
  learnable gammas initialised at zero, so every block starts as the identity).

:func:`cross_scale_flow` chains ``blocks`` (official 4) permutation + coupling pairs, kernel 3
in every block but the last (5), hidden width 1024, clamp 3, leaky-ReLU slope 0.1
(``config.py``, ``model.py: get_cs_flow_model``). The rest is ``utils.py`` and ``evaluate.py``:

* :func:`csflow_loss` is ``get_loss``: the batch mean of ``0.5 ||z||^2 - log|det J|`` over
  all three scales, divided by the number of latent dimensions;
* :func:`image_scores` is the official image score: the mean of ``z^2 / 2`` over every entry of
  the three latents;
* :func:`scale_maps` gives each scale's map, the mean of ``z^2`` over the channels;
  :func:`anomaly_maps` combines them (official: the first, finest scale only).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import FrEIA.framework as Ff
import FrEIA.modules as Fm
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vad_flows.likelihood import negative_log_likelihood_loss

#: The official number of scales; :class:`CrossConvolutions` wires exactly three.
SCALES = 3
#: The official leaky-ReLU slope inside :class:`CrossConvolutions`.
LEAKY_SLOPE = 0.1
#: The official soft clamp's factor: ``log s = clamp * 0.636 * atan(s / clamp)`` (0.636 ~ 2 / pi).
SOFT_CLAMP_FACTOR = 0.636
#: The official bound on the coupling outputs (``torch.clamp(y, -1e6, 1e6)``).
OUTPUT_BOUND = 1e6

MapMode = Literal["official", "product"]


def default_kernel_sizes(blocks: int) -> list[int]:
    """The official kernel sizes: 3 in every coupling block but the last, 5 there."""
    return [3] * (blocks - 1) + [5]


class CrossConvolutions(nn.Module):
    """The official coupling subnetwork on three scales (``freia_funcs.CrossConvolutions``).

    Per scale ``s``: ``conv_scale{s}_0`` (``k x k``, ``in_channels -> channels_hidden``),
    leaky ReLU, ``conv_scale{s}_1`` (``channels_hidden -> channels``). Across scales, from the
    hidden activations: ``up_conv10`` / ``up_conv21`` (bilinear x2 upsampling, then a conv) add
    the coarser scale to the finer one, ``down_conv01`` / ``down_conv12`` (stride-2 conv) add the
    finer scale to the coarser one. Each scale's output is multiplied by its gamma (initialised
    at 0, the official ``use_gamma=True``). Module names are the official ones.
    """

    def __init__(self, in_channels: int, channels: int, channels_hidden: int, kernel_size: int, leaky_slope: float = LEAKY_SLOPE) -> None:
        super().__init__()
        pad = kernel_size // 2

        def conv(channels_in: int, channels_out: int, stride: int = 1) -> nn.Conv2d:
            return nn.Conv2d(channels_in, channels_out, kernel_size=kernel_size, padding=pad, stride=stride)

        self.gamma0 = nn.Parameter(torch.zeros(1))
        self.gamma1 = nn.Parameter(torch.zeros(1))
        self.gamma2 = nn.Parameter(torch.zeros(1))
        self.conv_scale0_0 = conv(in_channels, channels_hidden)
        self.conv_scale1_0 = conv(in_channels, channels_hidden)
        self.conv_scale2_0 = conv(in_channels, channels_hidden)
        self.conv_scale0_1 = conv(channels_hidden, channels)
        self.conv_scale1_1 = conv(channels_hidden, channels)
        self.conv_scale2_1 = conv(channels_hidden, channels)
        self.upsample = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.up_conv10 = conv(channels_hidden, channels)
        self.up_conv21 = conv(channels_hidden, channels)
        self.down_conv01 = conv(channels_hidden, channels, stride=2)
        self.down_conv12 = conv(channels_hidden, channels, stride=2)
        self.lr = nn.LeakyReLU(leaky_slope)

    def forward(self, x0: torch.Tensor, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The three scales' outputs ``[B, channels, h_s, w_s]``."""
        y0 = self.lr(self.conv_scale0_0(x0))
        y1 = self.lr(self.conv_scale1_0(x1))
        y2 = self.lr(self.conv_scale2_0(x2))
        out0 = self.conv_scale0_1(y0) + self.up_conv10(self.upsample(y1))
        out1 = self.conv_scale1_1(y1) + self.down_conv01(y0) + self.up_conv21(self.upsample(y2))
        out2 = self.conv_scale2_1(y2) + self.down_conv12(y1)
        return out0 * self.gamma0, out1 * self.gamma1, out2 * self.gamma2


class ParallelPermute(Fm.InvertibleModule):
    """A fixed random permutation of each scale's channels (official ``ParallelPermute``).

    The official module seeds NumPy's global generator with ``seed`` (the block's index) and
    draws the three scales' permutations one after the other; a private ``RandomState(seed)``
    draws the same numbers without touching the global generator. The permutations are buffers,
    saved with the weights. Log-determinant 0.
    """

    def __init__(self, dims_in: Sequence[tuple[int, ...]], seed: int = 0) -> None:
        super().__init__(dims_in)
        generator = np.random.RandomState(seed)
        for index, dims in enumerate(dims_in):
            permutation = torch.as_tensor(generator.permutation(dims[0]), dtype=torch.long)
            self.register_buffer(f"perm{index}", permutation)
            self.register_buffer(f"perm_inv{index}", torch.argsort(permutation))

    def forward(self, x_or_z: Sequence[torch.Tensor], c: Sequence[torch.Tensor] | None = None, rev: bool = False, jac: bool = True) -> tuple[list[torch.Tensor], float]:
        """Each scale's channels permuted (``rev``: restored)."""
        name = "perm_inv" if rev else "perm"
        return [x[:, getattr(self, f"{name}{i}")] for i, x in enumerate(x_or_z)], 0.0

    def output_dims(self, input_dims: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
        """Shapes are kept."""
        return input_dims


class ParallelGlowCoupling(Fm.InvertibleModule):
    """The official ``parallel_glow_coupling_layer``: one affine coupling on three scales at once.

    Each scale's channels split into ``x_1`` (the first ``C // 2``) and ``x_2`` (the rest). Then,
    with ``r = (s, t)`` the :class:`CrossConvolutions` outputs split along the channels and the
    soft clamp ``e(s) = exp(clamp * 0.636 * atan(s / clamp))``, on every scale at once::

        y_1 = e(s_2(x_2)) * x_1 + t_2(x_2)          (subnet s2 sees the x_2 of all scales)
        y_2 = e(s_1(y_1)) * x_2 + t_1(y_1)          (subnet s1 sees the y_1 of all scales)

    and ``log|det J|`` of each sample is the sum of the clamped ``log e`` over every scale. The
    outputs are clamped to +-1e6 as official. The inverse (``rev=True``) undoes both steps; the
    official reverse pass slices ``s`` and ``t`` wrongly (``r01`` for ``t02``), which is not
    copied: it is never used for training or scoring.
    """

    def __init__(self, dims_in: Sequence[tuple[int, ...]], clamp: float, channels_hidden: int, kernel_size: int, leaky_slope: float = LEAKY_SLOPE) -> None:
        super().__init__(dims_in)
        channels = dims_in[0][0]
        if channels < 2 or any(dims[0] != channels for dims in dims_in) or len(dims_in) != SCALES:
            raise ValueError(f"ParallelGlowCoupling needs {SCALES} inputs with the same number (at least 2) of channels, got {list(dims_in)}")
        self.split_len1, self.split_len2 = channels // 2, channels - channels // 2
        self.clamp = clamp
        self.s1 = CrossConvolutions(self.split_len1, 2 * self.split_len2, channels_hidden, kernel_size, leaky_slope)
        self.s2 = CrossConvolutions(self.split_len2, 2 * self.split_len1, channels_hidden, kernel_size, leaky_slope)

    def log_e(self, s: torch.Tensor) -> torch.Tensor:
        """The soft-clamped log scale (official ``log_e``; no clamp when ``clamp <= 0``)."""
        return self.clamp * SOFT_CLAMP_FACTOR * torch.atan(s / self.clamp) if self.clamp > 0 else s

    def forward(self, x_or_z: Sequence[torch.Tensor], c: Sequence[torch.Tensor] | None = None, rev: bool = False, jac: bool = True) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The three scales transformed and ``log|det J|`` per sample (``rev``: the inverse and ``-log|det J|``)."""
        first = [x[:, : self.split_len1] for x in x_or_z]
        second = [x[:, self.split_len1 :] for x in x_or_z]
        log_det = x_or_z[0].new_zeros(x_or_z[0].shape[0])
        if not rev:
            log_scales, shifts = self._affine(self.s2(*second), self.split_len1)
            first = [torch.exp(s) * x + t for s, x, t in zip(log_scales, first, shifts)]
            log_det = log_det + sum(s.flatten(1).sum(1) for s in log_scales)
            log_scales, shifts = self._affine(self.s1(*first), self.split_len2)
            second = [torch.exp(s) * x + t for s, x, t in zip(log_scales, second, shifts)]
            log_det = log_det + sum(s.flatten(1).sum(1) for s in log_scales)
        else:
            log_scales, shifts = self._affine(self.s1(*first), self.split_len2)
            second = [(x - t) * torch.exp(-s) for s, x, t in zip(log_scales, second, shifts)]
            log_det = log_det - sum(s.flatten(1).sum(1) for s in log_scales)
            log_scales, shifts = self._affine(self.s2(*second), self.split_len1)
            first = [(x - t) * torch.exp(-s) for s, x, t in zip(log_scales, first, shifts)]
            log_det = log_det - sum(s.flatten(1).sum(1) for s in log_scales)
        outputs = [torch.clamp(torch.cat((a, b), dim=1), -OUTPUT_BOUND, OUTPUT_BOUND) for a, b in zip(first, second)]
        return outputs, log_det

    def _affine(self, outputs: Sequence[torch.Tensor], split: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Soft-clamped log scales (the first ``split`` channels) and shifts (the rest) per scale."""
        return [self.log_e(r[:, :split]) for r in outputs], [r[:, split:] for r in outputs]

    def output_dims(self, input_dims: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
        """Shapes are kept."""
        return input_dims


def cross_scale_flow(channels: int, grid: tuple[int, int], *, blocks: int = 4, clamp: float = 3.0, hidden_channels: int = 1024, kernel_sizes: Sequence[int] | None = None):
    """The official CS-Flow graph (``model.py: get_cs_flow_model``) as a FrEIA ``GraphINN``.

    Inputs: three feature maps with ``channels`` channels on ``grid``, ``grid // 2`` and
    ``grid // 4`` (the same backbone layer at the full, half and quarter input size); block ``k``
    is ``ParallelPermute(seed=k)`` then :class:`ParallelGlowCoupling` with ``kernel_sizes[k]``.
    ``flow([f0, f1, f2])`` gives ``((z0, z1, z2), log|det J|)`` with ``log|det J|`` ``[B]``.
    """
    kernel_sizes = list(kernel_sizes) if kernel_sizes is not None else default_kernel_sizes(blocks)
    if blocks < 1 or len(kernel_sizes) != blocks:
        raise ValueError(f"cross_scale_flow: {blocks} blocks need as many kernel sizes, got {kernel_sizes}")
    height, width = grid
    if height % 4 or width % 4:
        raise ValueError(f"cross_scale_flow: the finest grid {grid} must halve twice exactly (sides multiples of 4)")
    inputs = [Ff.InputNode(channels, height // 2**s, width // 2**s, name=f"input{s}") for s in range(SCALES)]
    nodes: list = list(inputs)
    previous = [(node, 0) for node in inputs]
    for k in range(blocks):
        permute = Ff.Node(previous, ParallelPermute, {"seed": k}, name=f"permute_{k}")
        coupling = Ff.Node(
            [(permute, s) for s in range(SCALES)],
            ParallelGlowCoupling,
            {"clamp": clamp, "channels_hidden": hidden_channels, "kernel_size": kernel_sizes[k]},
            name=f"coupling_{k}",
        )
        nodes += [permute, coupling]
        previous = [(coupling, s) for s in range(SCALES)]
    nodes += [Ff.OutputNode(previous[s], name=f"output{s}") for s in range(SCALES)]
    return Ff.GraphINN(nodes)


def run_cross_scale_flow(flow: nn.Module, features: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``(z per scale, log|det J|)`` of the three feature maps, in float32 with autocast off (as
    :func:`vad_flows.coupling.run_flow` does for a single input: the couplings' exponentials are
    not safe in half precision)."""
    with torch.autocast(device_type=features[0].device.type, enabled=False):
        z, log_jac_det = flow([f.float() for f in features])
    return list(z), log_jac_det


def flatten_scales(z: Sequence[torch.Tensor]) -> torch.Tensor:
    """The three latents of each sample flattened and concatenated, ``[B, D]`` (official ``cat_maps``)."""
    return torch.cat([zi.reshape(zi.shape[0], -1) for zi in z], dim=1)


def csflow_loss(z: Sequence[torch.Tensor], log_jac_det: torch.Tensor) -> torch.Tensor:
    """The official ``get_loss``: ``mean_b(0.5 ||z_b||^2 - log|det J_b|) / D``, ``D`` the latent
    dimension of one sample (all scales)."""
    flat = flatten_scales(z)
    return negative_log_likelihood_loss(flat, log_jac_det) / flat.shape[1]


def image_scores(z: Sequence[torch.Tensor]) -> torch.Tensor:
    """The official image score ``[B]``: the mean of ``z^2 / 2`` over every latent entry of all scales."""
    return flatten_scales(z).pow(2).div(2).mean(dim=1)


def scale_maps(z: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Each scale's map ``[B, h_s, w_s]``: the mean of ``z^2`` over the channels (official ``evaluate.py``)."""
    return [zi.pow(2).mean(dim=1) for zi in z]


def anomaly_maps(z: Sequence[torch.Tensor], mode: MapMode, size: tuple[int, int]) -> torch.Tensor:
    """The anomaly map ``[B, h, w]``: ``official`` is the finest scale's map on its own grid
    (``evaluate.py`` keeps ``likelihood_grouped[0]``; vad upsamples it bilinearly as the official
    visualisation does); ``product`` is anomalib's default (``AnomalyMapMode.ALL``): the three
    maps upsampled bilinearly to the input ``size`` and multiplied."""
    maps = scale_maps(z)
    if mode == "official":
        return maps[0]
    if mode == "product":
        upsampled = [F.interpolate(m.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1) for m in maps]
        return math.prod(upsampled[1:], start=upsampled[0])
    raise ValueError(f"unknown map mode {mode!r}")


def input_scales(images: torch.Tensor) -> list[torch.Tensor]:
    """The image at full, half and quarter size, as the official ``FeatureExtractor.forward``:
    ``F.interpolate`` with its default nearest mode from the full-size input."""
    height, width = images.shape[-2:]
    return [images] + [F.interpolate(images, size=(height // 2**s, width // 2**s)) for s in range(1, SCALES)]
