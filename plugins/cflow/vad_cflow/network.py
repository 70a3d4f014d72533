"""CFLOW-AD's numerical heart (Gudovskiy et al., WACV 2022): decoders, likelihoods, maps, schedule.

Plain torch, free of I/O. Names follow the official code (github.com/gudovskiy/cflow-ad,
``model.py``, ``train.py``, ``utils.py``, ``custom_models/utils.py``):

* a **fiber** is the feature vector of one position of one encoder level; a level's fibers
  ``[B, C, h, w]`` become ``B h w`` rows of ``C`` values (``e_r``), each conditioned on the 2-D
  sine/cosine positional encoding of its position (``c_r``, ``condition_vec`` channels,
  :func:`vad_flows.likelihood.positional_encoding_2d`) -> :func:`fibers_and_conditions`;
* one **decoder** per level: ``coupling_blocks`` FrEIA ``AllInOneBlock`` couplings with
  ``subnet_fc`` (``Linear(d, 2d) -> ReLU -> Linear(2d, out)``), ``affine_clamping=clamp_alpha``,
  ``global_affine_type='SOFTPLUS'``, ``permute_soft`` and the condition -> :class:`CflowDecoders`;
* the **log-likelihood per dimension** of a fiber ``x`` with ``z = f(x | c)``:
  ``log p(x) / C = (-C log(2 pi) / 2 - |z|^2 / 2 + log|det J|) / C`` (``get_logp(C, z, J) / C``)
  -> :func:`decode_level`;
* the **training loss** of a fiber batch: the mean of ``-log sigmoid(log p(x) / C)``
  (``log_theta = LogSigmoid()``) -> :func:`fiber_loss`;
* the **anomaly map** (``train.py``, after ``test_meta_epoch``): per level
  ``exp(log p / C - max)`` (likelihoods normalised to (-inf, 0], then probabilities), upsampled
  bilinearly (``align_corners=True``) to the input size, summed over the levels, and inverted as
  ``max(sum) - sum`` -> :func:`summed_probabilities`, :func:`anomaly_maps`. The two maxima are
  statistics of a set of images: officially of the *test* set, here of the training images
  (stored with the model; see :mod:`vad_cflow.detector`);
* the **learning rate** (``main.py`` settings, ``adjust_learning_rate`` and
  ``warmup_learning_rate``): cosine decay per meta-epoch from ``lr`` to ``lr * 0.1^3``, after a
  linear warm-up per iteration over the first meta-epochs -> :func:`learning_rate`,
  :class:`OfficialSchedule`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vad_flows.coupling import coupling_flow, linear_subnet, run_flow
from vad_flows.likelihood import log_likelihood, positional_encoding_2d

#: ``subnet_fc``'s hidden width relative to its input (official ``2 * dims_in``).
SUBNET_HIDDEN_RATIO = 2.0
#: ``main.py``: ``lr_decay_rate``; the cosine schedule ends at ``lr * LR_DECAY_RATE ** 3``.
LR_DECAY_RATE = 0.1
#: ``main.py``: the warm-up starts at ``lr / LR_WARMUP_DIVISOR`` (``lr_warmup_from = lr / 10``).
LR_WARMUP_DIVISOR = 10.0


def fibers_and_conditions(features: torch.Tensor, condition_vec: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A level's fibers ``[B h w, C]`` and their positional conditions ``[B h w, condition_vec]``,
    rows in the official order (image, row, column)."""
    _, channels, height, width = features.shape
    fibers = features.permute(0, 2, 3, 1).reshape(-1, channels)
    encoding = positional_encoding_2d(condition_vec, height, width).to(device=features.device, dtype=features.dtype)
    per_image = encoding.permute(1, 2, 0).reshape(1, height * width, condition_vec)
    conditions = per_image.expand(features.shape[0], -1, -1).reshape(-1, condition_vec)
    return fibers, conditions


def fiber_log_likelihood(flow: nn.Module, fibers: torch.Tensor, conditions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(z [N, C], log p(x) / C [N])`` of fibers through a conditional decoder (float32)."""
    z, log_jac_det = run_flow(flow, fibers, conditions)
    return z, log_likelihood(z, log_jac_det) / fibers.shape[1]


def fiber_loss(flow: nn.Module, fibers: torch.Tensor, conditions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The official loss of a fiber batch, ``mean(-log sigmoid(log p / C))``, and the per-fiber
    losses (detached) the official code sums into its reported training loss."""
    _, log_p = fiber_log_likelihood(flow, fibers, conditions)
    losses = -F.logsigmoid(log_p)
    return losses.mean(), losses.detach()


def fiber_batches(count: int, size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """The official fiber sampling of one level: a random permutation of its ``count`` fibers cut
    into ``count // size`` batches of ``size`` (the remainder left out this time); with fewer
    fibers than ``size`` (where the official code stops with an assertion) one batch of all."""
    order = torch.randperm(count, generator=generator, device=generator.device).cpu()
    return [order[start * size : (start + 1) * size] for start in range(max(1, count // size))]


def decode_level(flow: nn.Module, features: torch.Tensor, condition_vec: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole level through its decoder: latents ``z`` ``[B, C, h, w]`` and per-dimension
    log-likelihoods ``[B, h, w]`` (all fibers at once: the official test loop's chunks of ``N``
    fibers only bound memory, fibers are decoded independently)."""
    _, channels, height, width = features.shape
    fibers, conditions = fibers_and_conditions(features, condition_vec)
    z, log_p = fiber_log_likelihood(flow, fibers, conditions)
    return z.reshape(-1, height, width, channels).permute(0, 3, 1, 2), log_p.reshape(-1, height, width)


def summed_probabilities(log_likelihoods: Sequence[torch.Tensor], maxima: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``sum_l up(exp(log p_l / C_l - max_l))`` ``[B, H, W]``: each level's likelihoods ``[B, h, w]``
    normalised by its maximum, made probabilities, upsampled bilinearly (``align_corners=True``)
    to ``size`` and summed (official ``test_map`` and ``score_map``)."""
    total = None
    for level, log_p in enumerate(log_likelihoods):
        probabilities = torch.exp(log_p - maxima[level]).unsqueeze(1)
        upsampled = F.interpolate(probabilities, size=size, mode="bilinear", align_corners=True).squeeze(1)
        total = upsampled if total is None else total + upsampled
    if total is None:
        raise ValueError("summed_probabilities needs at least one level")
    return total


def anomaly_maps(log_likelihoods: Sequence[torch.Tensor], maxima: torch.Tensor, probability_max: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The official anomaly map ``max - sum_l up(exp(log p_l / C_l - max_l))`` ``[B, H, W]``
    (``super_mask = score_mask.max() - score_mask``), with fixed ``maxima`` per level and
    ``probability_max`` instead of the test set's."""
    return probability_max - summed_probabilities(log_likelihoods, maxima, size)


class CflowDecoders(nn.Module):
    """One conditional flow decoder per encoder level, and the normalisation statistics of the
    anomaly map (buffers, saved with the weights): ``log_likelihood_max`` (per level, the largest
    per-dimension log-likelihood) and ``probability_max`` (the largest summed probability)."""

    def __init__(self, channels: Sequence[int], *, condition_vec: int, coupling_blocks: int, clamp_alpha: float, permute_soft: bool, seed: int) -> None:
        super().__init__()
        self.condition_vec = condition_vec
        self.decoders = nn.ModuleList(
            coupling_flow(
                (width,),
                [linear_subnet(SUBNET_HIDDEN_RATIO)] * coupling_blocks,
                clamp=clamp_alpha,
                permute_soft=permute_soft,
                condition_dims=(condition_vec,),
                seed=seed + level,
            )
            for level, width in enumerate(channels)
        )
        self.register_buffer("log_likelihood_max", torch.zeros(len(channels)))
        self.register_buffer("probability_max", torch.zeros(()))

    def decode(self, levels: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(z, log p / C)`` of every level (see :func:`decode_level`)."""
        return [decode_level(flow, features, self.condition_vec) for flow, features in zip(self.decoders, levels, strict=True)]

    def maps(self, levels: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        """Anomaly maps ``[B, H, W]`` at ``size`` from the encoder's levels."""
        log_likelihoods = [log_p for _, log_p in self.decode(levels)]
        return anomaly_maps(log_likelihoods, self.log_likelihood_max, self.probability_max, size)


class CflowHead(nn.Module):
    """A traceable ``images -> (scores [B], maps [B, H, W])``: the frozen encoder's levels, the
    decoders' maps at the input size, the image score their maximum (official ``score_label``)."""

    def __init__(self, encode: Callable[[torch.Tensor], list[torch.Tensor]], decoders: CflowDecoders) -> None:
        super().__init__()
        self.encode, self.decoders = encode, decoders

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores and maps as :meth:`vad_cflow.detector.Cflow.predict`."""
        maps = self.decoders.maps(self.encode(images), (images.shape[-2], images.shape[-1]))
        return maps.flatten(1).amax(dim=1), maps


# --------------------------------------------------------------------------- learning rate


def learning_rate(lr: float, *, epoch: int, batch: int, batches_per_epoch: int, epochs: int, sub_epochs: int, warmup_meta_epochs: int) -> float:
    """The official learning rate of image batch ``batch`` (0-based) of epoch ``epoch`` (0-based;
    one epoch = one official sub-epoch, ``sub_epochs`` of them make a meta-epoch, and ``epochs``
    of them ``ceil(epochs / sub_epochs)`` meta-epochs). Meta-epoch ``m`` has the cosine rate
    ``eta + (lr - eta) (1 + cos(pi m / M)) / 2`` with ``eta = lr * 0.1^3``; during the first
    ``warmup_meta_epochs`` it rises linearly per batch from ``lr / 10`` to the cosine rate of
    meta-epoch ``warmup_meta_epochs``."""
    meta_epochs = math.ceil(epochs / sub_epochs)
    meta = epoch // sub_epochs
    eta_min = lr * LR_DECAY_RATE**3

    def cosine(meta_epoch: int) -> float:
        return eta_min + (lr - eta_min) * (1 + math.cos(math.pi * meta_epoch / meta_epochs)) / 2

    if meta >= warmup_meta_epochs:
        return cosine(meta)
    per_meta_epoch = batches_per_epoch * sub_epochs
    done = batch + (epoch % sub_epochs) * batches_per_epoch + meta * per_meta_epoch
    progress = done / (warmup_meta_epochs * per_meta_epoch)
    start, end = lr / LR_WARMUP_DIVISOR, cosine(warmup_meta_epochs)
    return start + progress * (end - start)


class OfficialSchedule:
    """Sets :func:`learning_rate` on an optimiser before every image batch (:meth:`before_batch`);
    the shared loop calls :meth:`step` after every epoch and checkpoints :meth:`state_dict`, so a
    resumed fit continues with the same rates."""

    def __init__(self, optimizer: torch.optim.Optimizer, lr: float, *, batches_per_epoch: int, epochs: int, sub_epochs: int, warmup_meta_epochs: int) -> None:
        self.optimizer, self.lr = optimizer, lr
        self.settings = {"batches_per_epoch": batches_per_epoch, "epochs": epochs, "sub_epochs": sub_epochs, "warmup_meta_epochs": warmup_meta_epochs}
        self.epoch, self.batch = 0, 0

    def before_batch(self) -> float:
        """Set the rate of the next batch on every parameter group; returns it."""
        rate = learning_rate(self.lr, epoch=self.epoch, batch=self.batch, **self.settings)
        for group in self.optimizer.param_groups:
            group["lr"] = rate
        self.batch += 1
        return rate

    def step(self) -> None:
        """An epoch ended."""
        self.epoch, self.batch = self.epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        """Where the schedule stands."""
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a :meth:`state_dict`."""
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])
