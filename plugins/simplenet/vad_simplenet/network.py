"""SimpleNet's trainable parts as plain torch modules (Liu et al., CVPR 2023; DonaldRR/SimpleNet).

* :class:`FeatureAdaptor`: one linear layer, same width in and out (official ``pre_proj=1``,
  ``Projection`` with ``n_layers=1``), mapping pretrained features towards the target domain.
* :class:`Discriminator`: the two-layer MLP ``Linear(C, hidden) -> BatchNorm1d -> LeakyReLU(0.2)
  -> Linear(hidden, 1, bias=False)`` (official ``dsc_layers=2``, ``dsc_hidden=1024``); its
  output is a *normality* score, positive for normal features.
* :func:`truncated_l1_loss`: ``mean(max(0, th - D(normal))) + mean(max(0, th + D(fake)))`` with
  ``th = 0.5`` (official ``dsc_margin``).
* :func:`gaussian_fake_features`: normal features plus i.i.d. ``N(0, noise_std^2)`` noise
  (official ``noise_std=0.015``, ``mix_noise=1``); the detector scales ``noise_std`` with
  :func:`feature_std` unless told to use the official absolute value.

Linear weights use Xavier-normal initialisation as the official ``init_weight``; all randomness
comes from an explicit :class:`torch.Generator`, so training is reproducible for a seed.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _init_linear(layer: nn.Linear, generator: torch.Generator) -> None:
    """Xavier-normal weight (official), PyTorch's default uniform bias, both from ``generator``."""
    with torch.no_grad():
        nn.init.xavier_normal_(layer.weight, generator=generator)
        if layer.bias is not None:
            bound = 1.0 / math.sqrt(layer.in_features)
            nn.init.uniform_(layer.bias, -bound, bound, generator=generator)


class FeatureAdaptor(nn.Module):
    """A single linear layer ``C -> C`` applied to every patch feature."""

    def __init__(self, channels: int, generator: torch.Generator) -> None:
        super().__init__()
        self.linear = nn.Linear(channels, channels)
        _init_linear(self.linear, generator)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``[N, C] -> [N, C]``."""
        return self.linear(features)


class Discriminator(nn.Module):
    """Two-layer MLP giving one normality logit per patch feature."""

    def __init__(self, channels: int, hidden: int, generator: torch.Generator) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(channels, hidden), nn.BatchNorm1d(hidden), nn.LeakyReLU(0.2))
        self.tail = nn.Linear(hidden, 1, bias=False)
        _init_linear(self.body[0], generator)
        _init_linear(self.tail, generator)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``[N, C] -> [N]`` (positive: normal)."""
        return self.tail(self.body(features))[:, 0]


class SimpleNetHead(nn.Module):
    """Adaptor + discriminator; :meth:`anomaly_scores` is the official ``-D(adaptor(x))``."""

    def __init__(self, channels: int, hidden: int, generator: torch.Generator) -> None:
        super().__init__()
        self.adaptor = FeatureAdaptor(channels, generator)
        self.discriminator = Discriminator(channels, hidden, generator)

    def anomaly_scores(self, features: torch.Tensor) -> torch.Tensor:
        """Per-patch anomaly scores ``[N]`` for patch features ``[N, C]`` (higher: more anomalous)."""
        return -self.discriminator(self.adaptor(features))


def gaussian_fake_features(features: torch.Tensor, noise_std: float, generator: torch.Generator) -> torch.Tensor:
    """Synthetic anomalous features: ``features + N(0, noise_std^2)`` per element."""
    noise = torch.randn(features.shape, generator=generator, device=features.device, dtype=features.dtype)
    return features + noise_std * noise


def feature_std(features: torch.Tensor) -> float:
    """The scale of patch features ``[B, C, h, w]``: the root mean square over channels of each
    channel's std over all patches (float64). A Xavier-initialised linear adaptor maps features
    of this scale to adapted features whose per-element spread has this size in expectation."""
    rows = features.detach().permute(0, 2, 3, 1).reshape(-1, features.shape[1]).to(torch.float64)
    return float(rows.var(dim=0, unbiased=False).mean().sqrt())


def truncated_l1_loss(normal_logits: torch.Tensor, fake_logits: torch.Tensor, margin: float) -> torch.Tensor:
    """SimpleNet's truncated L1 loss: push normal logits above ``margin``, fake ones below ``-margin``."""
    normal_loss = torch.clamp(margin - normal_logits, min=0)
    fake_loss = torch.clamp(fake_logits + margin, min=0)
    return normal_loss.mean() + fake_loss.mean()
