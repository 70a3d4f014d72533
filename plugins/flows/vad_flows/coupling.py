"""FrEIA coupling chains and the subnetworks the flow papers put inside them."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

#: FrEIA's subnet constructor: ``(channels_in, channels_out) -> module``.
SubnetConstructor = Callable[[int, int], nn.Module]


def conv_subnet(kernel_size: int, hidden_ratio: float) -> SubnetConstructor:
    """``conv(k) -> ReLU -> conv(k)`` with ``hidden_ratio * channels_in`` hidden channels and
    'same' padding: FastFlow's and U-Flow's coupling subnetwork (their official and reference
    code: ``subnet_conv_func``)."""
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"conv_subnet: kernel_size must be a positive odd number, not {kernel_size}")

    def build(channels_in: int, channels_out: int) -> nn.Module:
        hidden = max(1, int(channels_in * hidden_ratio))
        return nn.Sequential(
            nn.Conv2d(channels_in, hidden, kernel_size, padding="same"),
            nn.ReLU(),
            nn.Conv2d(hidden, channels_out, kernel_size, padding="same"),
        )

    return build


def linear_subnet(hidden_ratio: float = 2.0) -> SubnetConstructor:
    """``Linear -> ReLU -> Linear`` with ``hidden_ratio * channels_in`` hidden units: CFLOW-AD's
    ``subnet_fc`` (official: twice the input width)."""

    def build(channels_in: int, channels_out: int) -> nn.Module:
        hidden = max(1, int(channels_in * hidden_ratio))
        return nn.Sequential(nn.Linear(channels_in, hidden), nn.ReLU(), nn.Linear(hidden, channels_out))

    return build


def coupling_flow(
    dims: Sequence[int],
    subnets: Sequence[SubnetConstructor],
    *,
    clamp: float,
    permute_soft: bool = False,
    condition_dims: Sequence[int] | None = None,
    global_affine_type: str = "SOFTPLUS",
    seed: int = 0,
):
    """A chain of ``len(subnets)`` FrEIA ``AllInOneBlock`` couplings on inputs of shape ``dims``
    (``(C,)`` or ``(C, H, W)``, without the batch), the i-th with ``subnets[i]``.

    ``clamp`` is the blocks' affine clamping (the papers' ``clamp_alpha``), ``permute_soft`` their
    random rotation instead of a hard channel permutation. With ``condition_dims`` every block is
    conditioned on one extra input of that shape (CFLOW-AD's and AST's positional encoding), passed
    as ``flow(x, c=[condition])``. The chain maps ``x -> (z, log|det dz/dx|)`` per sample.

    FrEIA draws each block's fixed permutation from NumPy's global generator; it is seeded here
    with ``seed`` (any integer, taken modulo 2^32) and restored afterwards, so the same seed builds
    the same flow (the permutations are non-trainable parameters, saved and restored with the
    weights).
    """
    import FrEIA.framework as Ff
    import FrEIA.modules as Fm

    if not subnets:
        raise ValueError("coupling_flow: at least one coupling block is needed")
    if dims[0] < 2:
        raise ValueError(f"coupling_flow: couplings split the channels in two, so at least 2 are needed, not {dims[0]}")
    saved = np.random.get_state()
    try:
        np.random.seed(seed % 2**32)
        flow = Ff.SequenceINN(*dims)
        for subnet in subnets:
            condition = {"cond": 0, "cond_shape": tuple(condition_dims)} if condition_dims is not None else {}
            flow.append(
                Fm.AllInOneBlock,
                subnet_constructor=subnet,
                affine_clamping=clamp,
                permute_soft=permute_soft,
                global_affine_type=global_affine_type,
                **condition,
            )
    finally:
        np.random.set_state(saved)
    return flow


def run_flow(flow: nn.Module, features: torch.Tensor, condition: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(z, log|det J|)`` of ``features`` through a :func:`coupling_flow`, in float32 (the
    couplings' exponentials are not safe in half precision, so autocast is switched off here)."""
    device_type = features.device.type
    with torch.autocast(device_type=device_type, enabled=False):
        conditions = [condition.float()] if condition is not None else []
        z, log_jac_det = flow(features.float(), c=conditions) if conditions else flow(features.float())
    return z, log_jac_det


# --------------------------------------------------------------------------- GLOW couplings (DifferNet, CS-Flow, AST)

#: The official soft clamp's constant (the official DifferNet / CS-Flow / AST ``log_e``): about 2 / pi,
#: so that ``log e(s)`` stays within about ``+-clamp``.
ATAN_SCALE = 0.636


def _atan_clamp(u: torch.Tensor, clamp: float) -> torch.Tensor:
    return ATAN_SCALE * torch.atan(u / clamp)


def atan_clamp(clamp: float):
    """The official soft clamp in FrEIA's form: FrEIA computes ``clamp * f(s)``, so ``f(s) =
    0.636 atan(s / clamp)`` gives the official ``log e(s) = clamp * 0.636 * atan(s / clamp)``
    (FrEIA's own ``"ATAN"`` is ``0.636 atan(s)``, without the division)."""
    return functools.partial(_atan_clamp, clamp=clamp)


class GatedConvSubnet(nn.Module):
    """The official DifferNet / AST coupling subnetwork ``F_conv``: ``gamma * conv(k)(ReLU(conv(k)(x)))`` with
    replicate padding, biases, and ``gamma`` a learned scalar initialised at 0."""

    def __init__(self, channels_in: int, channels_out: int, hidden: int, kernel_size: int) -> None:
        super().__init__()
        padding = kernel_size // 2
        self.conv1 = nn.Conv2d(channels_in, hidden, kernel_size, padding=padding, padding_mode="replicate")
        self.conv2 = nn.Conv2d(hidden, channels_out, kernel_size, padding=padding, padding_mode="replicate")
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.relu(self.conv1(x))) * self.gamma


def gated_conv_subnet(hidden: int, kernel_size: int) -> SubnetConstructor:
    """A FrEIA subnet constructor building :class:`GatedConvSubnet`."""
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"gated_conv_subnet: kernel_size must be a positive odd number, not {kernel_size}")
    return lambda channels_in, channels_out: GatedConvSubnet(channels_in, channels_out, hidden, kernel_size)


def glow_flow(
    dims: Sequence[int],
    subnets: Sequence[SubnetConstructor],
    *,
    clamp: float,
    clamp_activation,
    condition_dims: Sequence[int] | None = None,
):
    """A chain of ``len(subnets)`` blocks, each FrEIA's ``PermuteRandom`` (a fixed channel
    permutation drawn with NumPy seed ``k`` for block ``k``) followed by a ``GLOWCouplingBlock``
    splitting the channels at ``C // 2``, on inputs of shape ``dims`` (``(C, H, W)``). With
    ``condition_dims`` every coupling's subnetworks also read one condition of that shape
    (``flow(x, c=[condition])``). The chain maps ``x -> (z, log|det dz/dx|)`` per sample.

    The couplings of the official DifferNet and AST code, ``permute_layer`` +
    ``glow_coupling_layer_cond``; NumPy's global state is restored afterwards.
    """
    import FrEIA.framework as Ff
    import FrEIA.modules as Fm

    if not subnets:
        raise ValueError("glow_flow: at least one coupling block is needed")
    channels = int(dims[0])
    if channels < 2:
        raise ValueError(f"glow_flow: couplings split the channels in two, so at least 2 are needed, not {channels}")
    condition = {"cond": 0, "cond_shape": tuple(condition_dims)} if condition_dims is not None else {}
    saved = np.random.get_state()
    try:
        flow = Ff.SequenceINN(*dims)
        for k, subnet in enumerate(subnets):
            flow.append(Fm.PermuteRandom, seed=k)
            flow.append(Fm.GLOWCouplingBlock, subnet_constructor=subnet, clamp=clamp, clamp_activation=clamp_activation, split_len=channels // 2, **condition)
    finally:
        np.random.set_state(saved)
    return flow
