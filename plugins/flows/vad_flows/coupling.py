"""FrEIA coupling chains and the subnetworks the flow papers put inside them."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
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
    with ``seed`` and restored afterwards, so the same seed builds the same flow (the permutations
    are non-trainable parameters, saved and restored with the weights).
    """
    import FrEIA.framework as Ff
    import FrEIA.modules as Fm

    if not subnets:
        raise ValueError("coupling_flow: at least one coupling block is needed")
    if dims[0] < 2:
        raise ValueError(f"coupling_flow: couplings split the channels in two, so at least 2 are needed, not {dims[0]}")
    saved = np.random.get_state()
    try:
        np.random.seed(seed)
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
