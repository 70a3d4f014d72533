"""SimpleNet as a vad detector head on any FeatureSource (``--detector simplenet``).

Training, per feature batch (as the official ``_train_discriminator``): adapt the normal patch
features, add Gaussian noise to get fake anomalous features, run the discriminator on both in
one batch (so BatchNorm sees both), take the truncated L1 loss, step both optimisers.
Scoring (as the official ``_predict``): patch score ``-D(adaptor(x))``; the anomaly map is the
patch scores on the feature grid ``[B, h, w]`` (vad upsamples and blurs it, sigma 4, as the
official ``RescaleSegmentor``); the image score is the maximum patch score.

Hyper-parameters and their official values (``run.sh`` for MVTec AD, ``simplenet.py``):

==========================  =========================  ===========================================
option                      default here               official
==========================  =========================  ===========================================
``epochs``                  20                         160 passes: ``meta_epochs=40`` x ``gan_epochs=4``
``noise_std``               0.015                      0.015
``margin`` (loss ``th``)    0.5                        ``dsc_margin=0.5``
``hidden``                  1024                       ``dsc_hidden=1024``
``adaptor_lr``              1e-4 (AdamW, wd 0.01)      ``lr * 0.1`` with ``lr=1e-3``, AdamW defaults
``discriminator_lr``        2e-4 (Adam, wd 1e-5)       ``dsc_lr=0.0002``, ``weight_decay=1e-5``
``seed``                    0                          ``--seed 0``
==========================  =========================  ===========================================

Deviations, on purpose:

* ``epochs`` defaults to 20 so a CPU demo finishes in minutes; pass ``epochs=160`` for the
  official schedule.

``noise_std`` is in the units of the features, so the official 0.015 only means what it meant
there for features of a similar scale: the official 1536-d WideResNet-50 patch features (averages
of post-ReLU activations). EfficientNet-Lite patch features are about ten times larger (per-
channel std 2-3.5 on the demo data), and with 0.015 the discriminator learns to spot noise the
real defects do not carry: on the demo data (lite0, 160 epochs) the maps are *anti*-correlated
with the defects (mean pixel AUROC 0.34), while ``noise_std=0.15`` gives mean image AUROC 0.85,
pixel AUROC 0.73 (brick 1.00 / 0.95). The default stays the official value; scale it with
the features you use (``--set simplenet.noise_std=0.15`` for EfficientNet-Lite).
* The official loop evaluates on the *test set* after every meta-epoch and keeps the
  discriminator of the best test AUROC; that selects the model on test labels, so vad keeps
  the weights after the last epoch.
* The official loader shuffles training images every epoch; vad feeds the feature batches in
  the order it gets them (one optimiser step per batch either way).
* Backbone, layers, local aggregation (patch size 3) and the 1536-d embedding are the
  FeatureSource's job here (``PatchFeatures`` with ``layer_dim``/``target_dim`` reproduces them),
  so SimpleNet runs on fused ensemble features too (seed 000's discriminator).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any

import torch

from vad.contracts import Detector, Prediction, State
from vad.errors import VadError

from vad_simplenet.network import SimpleNetHead, gaussian_fake_features, truncated_l1_loss


def _positive(name: str, value: Any, kind: type = float, minimum: float = 0.0, inclusive: bool = False) -> Any:
    valid = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        valid = valid and float(value).is_integer()
    if not valid or (value < minimum if inclusive else value <= minimum):
        bound = f">= {minimum}" if inclusive else f"> {minimum}"
        raise VadError(f"simplenet option {name} must be a {'whole number' if kind is int else 'number'} {bound}, got {value!r}")
    return kind(value)


class SimpleNet(Detector):
    """SimpleNet: feature adaptor + Gaussian-noise fake features + MLP discriminator (truncated L1)."""

    name = "simplenet"
    input = "features"
    produces_maps = True

    def __init__(
        self,
        epochs: int = 20,
        noise_std: float = 0.015,
        margin: float = 0.5,
        hidden: int = 1024,
        adaptor_lr: float = 1e-4,
        discriminator_lr: float = 2e-4,
        seed: int = 0,
    ) -> None:
        self.epochs = _positive("epochs", epochs, int, 1, inclusive=True)
        self.noise_std = _positive("noise_std", noise_std)
        self.margin = _positive("margin", margin, inclusive=True)
        self.hidden = _positive("hidden", hidden, int, 1, inclusive=True)
        self.adaptor_lr = _positive("adaptor_lr", adaptor_lr)
        self.discriminator_lr = _positive("discriminator_lr", discriminator_lr)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise VadError(f"simplenet option seed must be an int, got {seed!r}")
        self.seed = seed
        #: vad caches the feature batches in memory between these passes.
        self.training_passes = self.epochs
        self.head: SimpleNetHead | None = None
        self.channels: int | None = None
        self.history: list[float] = []
        self._hparams = {
            "epochs": self.epochs,
            "noise_std": self.noise_std,
            "margin": self.margin,
            "hidden": self.hidden,
            "adaptor_lr": self.adaptor_lr,
            "discriminator_lr": self.discriminator_lr,
            "seed": self.seed,
        }

    # ------------------------------------------------------------------ helpers

    def _patches(self, features: torch.Tensor, channels: int | None) -> torch.Tensor:
        if features.ndim != 4:
            raise VadError(f"simplenet expects feature grids [B, C, h, w], got shape {tuple(features.shape)}")
        if channels is not None and features.shape[1] != channels:
            raise VadError(f"simplenet was built for {channels}-channel features, got {features.shape[1]}")
        return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1]).to(self.device, torch.float32)

    def to(self, device: torch.device | str) -> SimpleNet:
        super().to(device)
        if self.head is not None:
            self.head.to(self.device)
        return self

    # ------------------------------------------------------------------ fit / predict

    def fit(self, batches: Iterable[torch.Tensor]) -> None:
        """Train adaptor and discriminator for ``epochs`` passes over the training feature batches."""
        iterator = iter(batches)
        try:
            first = next(iterator)
        except StopIteration:
            raise VadError("simplenet got no training features to fit on") from None
        if first.ndim != 4:
            raise VadError(f"simplenet expects feature grids [B, C, h, w], got shape {tuple(first.shape)}")
        channels = int(first.shape[1])
        # Built and trained aside: a failure half-way leaves a previously fitted head untouched.
        head = SimpleNetHead(channels, self.hidden, torch.Generator().manual_seed(self.seed)).to(self.device)
        adaptor_opt = torch.optim.AdamW(head.adaptor.parameters(), lr=self.adaptor_lr)  # official: AdamW defaults
        discriminator_opt = torch.optim.Adam(head.discriminator.parameters(), lr=self.discriminator_lr, weight_decay=1e-5)
        noise = torch.Generator(device=self.device).manual_seed(self.seed + 1)
        history: list[float] = []
        head.train()

        def passes():
            yield itertools.chain([first], iterator)  # the first pass reuses the batch we peeked at
            for _ in range(self.epochs - 1):
                yield batches

        from vad.progress import track

        with torch.enable_grad():
            for epoch_batches in track(passes(), "simplenet epochs", total=self.epochs):
                losses = []
                for features in epoch_batches:
                    normal = head.adaptor(self._patches(features, channels))
                    fake = gaussian_fake_features(normal, self.noise_std, noise)
                    logits = head.discriminator(torch.cat([normal, fake]))
                    loss = truncated_l1_loss(logits[: len(normal)], logits[len(normal) :], self.margin)
                    adaptor_opt.zero_grad(set_to_none=True)
                    discriminator_opt.zero_grad(set_to_none=True)
                    loss.backward()
                    adaptor_opt.step()
                    discriminator_opt.step()
                    losses.append(float(loss.detach()))
                history.append(sum(losses) / max(1, len(losses)))
        self.head, self.channels, self.history = head.eval(), channels, history

    def predict(self, batch: torch.Tensor) -> Prediction:
        """Maps ``[B, h, w]`` of ``-D(adaptor(x))`` per patch; image score = max of its map."""
        if self.head is None:
            raise VadError("simplenet must be fitted (or loaded) before predict")
        b, _, h, w = batch.shape if batch.ndim == 4 else (0, 0, 0, 0)
        patches = self._patches(batch, self.channels)
        self.head.eval()
        with torch.no_grad():
            maps = self.head.anomaly_scores(patches).reshape(b, h, w)
        return Prediction(scores=maps.amax(dim=(1, 2)), maps=maps)

    # ------------------------------------------------------------------ state

    def state(self) -> State:
        """Adaptor and discriminator weights (incl. BatchNorm running statistics)."""
        if self.head is None:
            raise VadError("simplenet has not been fitted; nothing to save")
        tensors = {name: value.detach().cpu().clone() for name, value in self.head.state_dict().items()}
        return State(meta={"channels": self.channels, "final_loss": self.history[-1] if self.history else None}, tensors=tensors)

    def load_state(self, state: State) -> None:
        """Rebuild the modules for the saved width and load their weights."""
        channels = state.meta.get("channels")
        if not isinstance(channels, int) or channels < 1:
            raise VadError("the saved simplenet state has no valid 'channels'; the model folder is incomplete")
        head = SimpleNetHead(channels, self.hidden, torch.Generator().manual_seed(self.seed))
        try:
            head.load_state_dict(state.tensors, strict=True)
        except RuntimeError as error:
            raise VadError(f"the saved simplenet weights do not fit its hyper-parameters: {error}") from error
        self.channels = channels
        self.head = head.to(self.device).eval()
