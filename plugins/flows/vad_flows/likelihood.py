"""Gaussian likelihoods of flow outputs, the flows' loss, positional encoding, and a brute-force
log-determinant for tests."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

#: ``log(2 pi) / 2``: the per-dimension constant of the standard normal log-density.
HALF_LOG_TWO_PI = 0.5 * math.log(2 * math.pi)


def standard_normal_log_density(z: torch.Tensor, dim: int | tuple[int, ...] = 1) -> torch.Tensor:
    """``log N(z; 0, I)`` summed over ``dim``: ``-|z|^2 / 2 - d log(2 pi) / 2`` with ``d`` the
    number of summed entries."""
    dims = (dim,) if isinstance(dim, int) else dim
    count = math.prod(z.shape[d] for d in dims)
    return -0.5 * z.pow(2).sum(dim=dims) - count * HALF_LOG_TWO_PI


def log_likelihood(z: torch.Tensor, log_jac_det: torch.Tensor, dim: int | tuple[int, ...] = 1) -> torch.Tensor:
    """``log p(x) = log N(z; 0, I) + log|det dz/dx|`` by change of variables, ``z = f(x)``, with
    the density summed over ``dim`` (what ``log_jac_det`` covers)."""
    return standard_normal_log_density(z, dim) + log_jac_det


def negative_log_likelihood_loss(z: torch.Tensor, log_jac_det: torch.Tensor) -> torch.Tensor:
    """The flows' training loss: the batch mean of ``|z|^2 / 2 - log|det J|`` per sample, the
    per-sample sum over every non-batch dimension (the constant is dropped, as in FastFlow's,
    CS-Flow's and U-Flow's code). Callers that normalise by the dimension divide the result."""
    return (0.5 * z.pow(2).flatten(1).sum(dim=1) - log_jac_det).mean()


def positional_encoding_2d(channels: int, height: int, width: int) -> torch.Tensor:
    """The 2-D sine/cosine positional encoding ``[channels, height, width]`` of CFLOW-AD and AST
    (their ``positionalencoding2d``): the first half of the channels encode the column, the second
    half the row, each as interleaved ``sin`` / ``cos`` at frequencies ``10000^(-2i / (channels/2))``."""
    if channels % 4:
        raise ValueError(f"positional_encoding_2d: channels must be a multiple of 4, not {channels}")
    half = channels // 2
    encoding = torch.zeros(channels, height, width)
    frequencies = torch.exp(torch.arange(0.0, half, 2) * -(math.log(10000.0) / half))
    columns = torch.arange(0.0, width).unsqueeze(1)
    rows = torch.arange(0.0, height).unsqueeze(1)
    encoding[0:half:2] = torch.sin(columns * frequencies).t().unsqueeze(1).expand(-1, height, -1)
    encoding[1:half:2] = torch.cos(columns * frequencies).t().unsqueeze(1).expand(-1, height, -1)
    encoding[half::2] = torch.sin(rows * frequencies).t().unsqueeze(2).expand(-1, -1, width)
    encoding[half + 1 :: 2] = torch.cos(rows * frequencies).t().unsqueeze(2).expand(-1, -1, width)
    return encoding


def log_det_by_jacobian(function: Callable[[torch.Tensor], torch.Tensor], sample: torch.Tensor) -> torch.Tensor:
    """``log|det d function(x) / dx|`` of one sample (no batch dimension), from the full Jacobian
    computed by autograd in float64: the brute-force reference a flow's own log-determinant is
    tested against on tiny inputs."""
    flat = sample.detach().double().flatten()

    def flat_function(values: torch.Tensor) -> torch.Tensor:
        return function(values.view(sample.shape)).flatten()

    jacobian = torch.autograd.functional.jacobian(flat_function, flat)
    if jacobian.shape[0] != jacobian.shape[1]:
        raise ValueError(f"log_det_by_jacobian: the function maps {flat.numel()} values to {jacobian.shape[0]}; a flow keeps the dimension")
    return torch.linalg.slogdet(jacobian).logabsdet
