"""DRAEM as a vad image detector (``--detector draem``) and its discriminative features as a FeatureSource.

Training follows the official ``train_DRAEM.py``: each step rotates some normal images, turns
some of them into synthetic anomalies with masks (generators from :mod:`vad_augment`), feeds the
result to the reconstructive sub-network, the concatenation (reconstruction, input) to the
discriminative sub-network, and minimises ``L2(rec, image) + SSIM loss(rec, image) +
focal(softmax(logits), mask)`` with Adam (lr 1e-4 for both networks) and a MultiStepLR that
multiplies the learning rate by 0.2 after 80 % and 90 % of the epochs. Prediction follows
``test_DRAEM.py``: the anomaly map is the softmax probability of the anomalous class and the
image score is the maximum of its 21x21 mean-filtered version.

Deviations (each also noted where it happens):

* image size: ``image_size=None`` means 256 (the official size) on CUDA and 128 on CPU, resolved
  when first needed and written back into the hyper-parameters;
* epochs: the official 700 (the paper's schedule; seed 001 trained 3000) is the default, tests
  use 1;
* the paper's texture opacity range [0.1, 1] (see :class:`vad_augment.generators.PerlinTextureAnomaly`)
  and procedural textures by default instead of DTD (pass ``textures=<DTD images folder>``);
* seed 001's variant: ``anomalies=["perlin", "cutout"]`` (one path per image: none, Perlin or
  cutout); any registered anomaly generator name works;
* the SSIM dynamic range is fixed at 1 (images are in [0, 1]);
* all randomness comes from ``seed`` (weights, augmentations, batch order), so a fit is
  reproducible on a given device.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vad.contracts import Augmentation, Detector, FeatureSource, Prediction, Preprocessing, State
from vad.errors import VadError
from vad_draem.losses import anomaly_score, focal_loss, ssim_loss
from vad_draem.network import SIZE_MULTIPLE, DiscriminativeSubNetwork, ReconstructiveSubNetwork, init_weights

#: Training images kept in memory between epochs, at most (else they are re-read every epoch).
CACHE_BYTES = 1 << 30
CHECKPOINT_FORMAT = "vad-draem-checkpoint"
#: Encoder blocks of the discriminative sub-network a FeatureSource may expose, with their strides.
FEATURE_BLOCKS = {f"block{i + 1}": 2**i for i in range(6)}


def _positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise VadError(f"draem: {name} must be an integer >= {minimum}, got {value!r}")
    return value


def _probability(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise VadError(f"draem: {name} must be a probability in [0, 1], got {value!r}")
    return float(value)


class Draem(Detector):
    """DRAEM: reconstructive + discriminative sub-networks trained on synthetic anomalies.

    Hyper-parameters (official values in brackets):

    * ``image_size`` -- square input side, a multiple of 32 [256]; None: 256 on CUDA, 128 on CPU;
    * ``base_channels`` -- width of the discriminative network [64]; the reconstructive one is
      twice as wide [128]. Small values (4-16) train on a CPU;
    * ``epochs`` [700], ``batch_size`` [8], ``lr`` [1e-4], ``lr_milestones`` as fractions of
      ``epochs`` [0.8, 0.9], ``lr_gamma`` [0.2];
    * ``anomalies`` -- anomaly generator names [``["perlin"]``]; ``anomaly_options`` -- per-name
      constructor options; ``textures`` -- the ``perlin`` texture source (``"procedural"``,
      ``"skimage"`` or a folder of images, e.g. DTD); ``no_anomaly_probability`` -- share of
      training images left normal [0.5]; ``rotate_probability`` -- share rotated by up to 90
      degrees before anything else [0.3];
    * ``score_window`` -- mean filter size for the image score [21];
    * ``checkpoint_dir`` / ``checkpoint_every`` / ``checkpoint_start`` -- write the weights as
      ``draem-epochNNNN.safetensors`` every N epochs from epoch M (and after the last epoch);
      reload one with :meth:`from_checkpoint`;
    * ``seed`` -- all randomness of initialisation and training.
    """

    name = "draem"
    input = "images"
    produces_maps = True

    def __init__(
        self,
        image_size: int | None = None,
        base_channels: int = 64,
        epochs: int = 700,
        batch_size: int = 8,
        lr: float = 1e-4,
        lr_milestones: Sequence[float] = (0.8, 0.9),
        lr_gamma: float = 0.2,
        anomalies: Sequence[str] = ("perlin",),
        anomaly_options: dict[str, dict[str, Any]] | None = None,
        textures: str = "procedural",
        no_anomaly_probability: float = 0.5,
        rotate_probability: float = 0.3,
        score_window: int = 21,
        checkpoint_dir: str | None = None,
        checkpoint_every: int = 0,
        checkpoint_start: int = 0,
        seed: int = 0,
    ) -> None:
        if image_size is not None:
            _positive_int("image_size", image_size, SIZE_MULTIPLE)
            if image_size % SIZE_MULTIPLE:
                raise VadError(f"draem: image_size must be a multiple of {SIZE_MULTIPLE} (five 2x poolings), got {image_size}")
        _positive_int("base_channels", base_channels)
        _positive_int("epochs", epochs)
        _positive_int("batch_size", batch_size)
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
            raise VadError(f"draem: lr must be a positive number, got {lr!r}")
        try:
            milestones = [float(m) for m in lr_milestones]
        except (TypeError, ValueError):
            raise VadError(f"draem: lr_milestones must be fractions of the epochs, e.g. [0.8, 0.9], got {lr_milestones!r}") from None
        if not all(0.0 < m <= 1.0 for m in milestones):
            raise VadError(f"draem: lr_milestones are fractions of the epochs in (0, 1], got {lr_milestones!r}")
        if isinstance(lr_gamma, bool) or not isinstance(lr_gamma, (int, float)) or not lr_gamma > 0:
            raise VadError(f"draem: lr_gamma must be a positive number, got {lr_gamma!r}")
        if isinstance(anomalies, str) or not all(isinstance(a, str) and a for a in anomalies) or not list(anomalies):
            raise VadError(f"draem: anomalies must be a list of anomaly generator names such as ['perlin', 'cutout'], got {anomalies!r}")
        anomaly_options = dict(anomaly_options or {})
        if not all(isinstance(v, dict) for v in anomaly_options.values()) or set(anomaly_options) - set(anomalies):
            raise VadError(
                f"draem: anomaly_options maps generator names of `anomalies` {list(anomalies)} to option dicts, got {anomaly_options!r}"
            )
        _positive_int("score_window", score_window)
        if score_window % 2 == 0:
            raise VadError(f"draem: score_window must be odd (a centred mean filter), got {score_window}")
        _positive_int("checkpoint_every", checkpoint_every, 0)
        _positive_int("checkpoint_start", checkpoint_start, 0)
        if checkpoint_every and not checkpoint_dir:
            raise VadError("draem: checkpoint_every needs checkpoint_dir (the folder to write checkpoints into)")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise VadError(f"draem: seed must be an integer, got {seed!r}")
        self._hparams = {
            "image_size": image_size,
            "base_channels": base_channels,
            "epochs": epochs,
            "batch_size": batch_size,
            "lr": float(lr),
            "lr_milestones": milestones,
            "lr_gamma": float(lr_gamma),
            "anomalies": list(anomalies),
            "anomaly_options": anomaly_options,
            "textures": textures,
            "no_anomaly_probability": _probability("no_anomaly_probability", no_anomaly_probability),
            "rotate_probability": _probability("rotate_probability", rotate_probability),
            "score_window": score_window,
            "checkpoint_dir": None if checkpoint_dir is None else str(checkpoint_dir),
            "checkpoint_every": checkpoint_every,
            "checkpoint_start": checkpoint_start,
            "seed": seed,
        }
        #: vad caches nothing for image detectors, but says how many passes fit makes.
        self.training_passes = epochs
        self.fitted = False
        self.epochs_trained = 0
        self._device = torch.device("cpu")
        # Build under a forked RNG so that construction neither depends on nor changes global state.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.reconstructive = ReconstructiveSubNetwork(3, 3, base_width=2 * base_channels)
            self.discriminative = DiscriminativeSubNetwork(6, 2, base_width=base_channels)
        generator = torch.Generator().manual_seed(seed)
        init_weights(self.reconstructive, generator)
        init_weights(self.discriminative, generator)
        self.reconstructive.eval()
        self.discriminative.eval()

    # ------------------------------------------------------------------ contract

    @property
    def image_size(self) -> int:
        """The input side; None is resolved on first use (256 on CUDA, 128 on CPU) and kept."""
        if self._hparams["image_size"] is None:
            self._hparams["image_size"] = 256 if self.device.type == "cuda" else 128
        return self._hparams["image_size"]

    @property
    def preprocessing(self) -> Preprocessing:  # type: ignore[override]
        """Square ``image_size`` inputs in [0, 1] (mean 0, std 1), bilinear resize as DRAEM's cv2.resize."""
        size = self.image_size
        return Preprocessing(size=(size, size), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), interpolation="bilinear")

    def to(self, device: torch.device | str) -> Draem:
        """Move both sub-networks to ``device``."""
        self._device = torch.device(device)
        self.reconstructive.to(self._device)
        self.discriminative.to(self._device)
        return self

    def _check_batch(self, batch: Any, what: str) -> torch.Tensor:
        if not isinstance(batch, torch.Tensor) or batch.dim() != 4 or batch.shape[1] != 3:
            shape = tuple(batch.shape) if isinstance(batch, torch.Tensor) else type(batch).__name__
            raise VadError(f"draem {what} takes image batches [B, 3, H, W] in [0, 1], got {shape}")
        height, width = batch.shape[-2:]
        if height % SIZE_MULTIPLE or width % SIZE_MULTIPLE:
            raise VadError(
                f"draem {what} needs image sides that are multiples of {SIZE_MULTIPLE}, got {height}x{width}; "
                "prepare images with the detector's preprocessing (image_size)"
            )
        return batch.to(self.device, torch.float32)

    # ------------------------------------------------------------------ training

    def _generators(self) -> list[Augmentation]:
        """The anomaly generators named in ``anomalies`` (vad_augment's, else any registered one)."""
        from vad_augment.generators import CutoutAnomaly, PerlinTextureAnomaly, SwirlAnomaly

        builtin = {"perlin": PerlinTextureAnomaly, "cutout": CutoutAnomaly, "swirl": SwirlAnomaly}
        generators = []
        for name in self._hparams["anomalies"]:
            options = dict(self._hparams["anomaly_options"].get(name, {}))
            if name == "perlin":
                options.setdefault("textures", self._hparams["textures"])
            if name in builtin:
                cls = builtin[name]
            else:
                from vad.plugins import get_registry

                cls = get_registry().load_class("augmentations", name)
            try:
                augmentation = cls(**options)
            except TypeError as error:
                raise VadError(f"draem: bad anomaly_options for {name!r}: {error}") from error
            # Probe once on a blank image (own generator: training randomness is untouched) so a
            # transform without masks is refused before training, not at a random later step.
            probe = torch.full((1, 3, SIZE_MULTIPLE, SIZE_MULTIPLE), 0.5)
            if getattr(augmentation, "target", "image") != "image" or augmentation(probe, torch.Generator().manual_seed(0))[1] is None:
                raise VadError(f"draem: augmentation {name!r} returns no anomaly mask, so it is not an anomaly generator")
            generators.append(augmentation)
        return generators

    def synthesize(
        self, images: torch.Tensor, generators: Sequence[Augmentation], generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One training path per image: normal (``no_anomaly_probability``) or one of the
        ``generators`` chosen uniformly (seed 001's none / Perlin / cutout). Returns the
        anomalous batch and the masks ``[B, 1, H, W]``."""
        from vad_augment.noise import integers, uniform

        count = images.shape[0]
        normal = uniform(generator, count) < self._hparams["no_anomaly_probability"]
        which = integers(generator, count, 0, len(generators))
        augmented = images.clone()
        masks = torch.zeros((count, 1, *images.shape[2:]), device=images.device, dtype=images.dtype)
        for index, anomaly in enumerate(generators):
            chosen = torch.nonzero(~normal & (which == index)).flatten().tolist()
            if not chosen:
                continue
            out, mask = anomaly(images[chosen], generator)
            if mask is None:
                raise VadError(f"draem: augmentation {anomaly.name!r} returns no mask, so it is not an anomaly generator")
            augmented[chosen], masks[chosen] = out, (mask > 0.5).to(images.dtype)
        return augmented, masks

    def training_loss(self, images: torch.Tensor, augmented: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The official loss ``L2 + SSIM + focal`` for one batch, with its parts."""
        reconstruction = self.reconstructive(augmented)
        logits = self.discriminative(torch.cat((reconstruction, augmented), dim=1))
        l2 = F.mse_loss(reconstruction, images)
        ssim = ssim_loss(reconstruction, images)
        focal = focal_loss(torch.softmax(logits, dim=1), masks)
        loss = l2 + ssim + focal
        return loss, {"l2": l2.detach(), "ssim": ssim.detach(), "focal": focal.detach()}

    def _epoch_batches(self, batches: Iterable[torch.Tensor], cached: torch.Tensor | None, generator: torch.Generator):
        """Official random mini-batches of ``batch_size`` from the cached images, else the given batches."""
        if cached is None:
            for batch in batches:
                yield self._check_batch(batch, "fit")
            return
        from vad_augment.noise import uniform

        order = torch.argsort(uniform(generator, cached.shape[0]))
        size = self._hparams["batch_size"]
        for start in range(0, len(order), size):
            yield cached[order[start : start + size].to(cached.device)]

    def _cache(self, batches: Iterable[torch.Tensor]) -> torch.Tensor | None:
        """All training images in one tensor when they fit :data:`CACHE_BYTES`, else None."""
        collected, used = [], 0
        for batch in batches:
            batch = self._check_batch(batch, "fit")
            used += batch.numel() * batch.element_size()
            if used > CACHE_BYTES:
                return None
            collected.append(batch)
        if not collected:
            raise VadError("draem: the training set is empty; DRAEM needs normal training images")
        sizes = {tuple(b.shape[-2:]) for b in collected}
        if len(sizes) > 1:
            raise VadError(f"draem: training batches have different image sizes {sorted(sizes)}; prepare them with one preprocessing")
        return torch.cat(collected)

    def fit(self, batches: Iterable[torch.Tensor]) -> None:
        """Train both sub-networks for ``epochs`` passes over the normal images ``[B, 3, H, W]`` in [0, 1]."""
        from vad.progress import info, track
        from vad_augment.generators import RandomRotation

        hp = self._hparams
        self.image_size  # resolve the default size now that the device is known
        generators = self._generators()
        rotation = RandomRotation(degrees=90.0, probability=hp["rotate_probability"])
        generator = torch.Generator().manual_seed(hp["seed"])
        cached = self._cache(batches)
        parameters = [{"params": self.reconstructive.parameters(), "lr": hp["lr"]}, {"params": self.discriminative.parameters(), "lr": hp["lr"]}]
        optimizer = torch.optim.Adam(parameters)
        milestones = sorted({max(1, math.ceil(m * hp["epochs"])) for m in hp["lr_milestones"]})
        # Official milestones are epochs*0.8 and epochs*0.9 (floats, so MultiStepLR fires at the
        # first integer epoch count reaching them): ceil reproduces that.
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=hp["lr_gamma"])
        self.reconstructive.train()
        self.discriminative.train()
        self.fitted, self.epochs_trained = False, 0
        try:
            for epoch in track(range(1, hp["epochs"] + 1), "draem epochs", total=hp["epochs"]):
                steps = 0
                for images in self._epoch_batches(batches, cached, generator):
                    images, _ = rotation(images, generator)
                    augmented, masks = self.synthesize(images, generators, generator)
                    loss, _parts = self.training_loss(images, augmented, masks)
                    if not torch.isfinite(loss):
                        raise VadError(f"draem: the training loss became {float(loss)} at epoch {epoch}; lower lr")
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    steps += 1
                if steps == 0:
                    raise VadError("draem: the training set is empty; DRAEM needs normal training images")
                scheduler.step()
                self.epochs_trained = epoch
                if self._checkpoint_due(epoch):
                    path = self.save_checkpoint(epoch)
                    info(f"draem checkpoint: {path}", epoch=epoch, path=str(path))
        finally:
            self.reconstructive.eval()
            self.discriminative.eval()
        self.fitted = True

    # ------------------------------------------------------------------ checkpoints

    def _checkpoint_due(self, epoch: int) -> bool:
        hp = self._hparams
        if not hp["checkpoint_dir"]:
            return False
        if epoch == hp["epochs"]:
            return True
        return bool(hp["checkpoint_every"]) and epoch >= hp["checkpoint_start"] and epoch % hp["checkpoint_every"] == 0

    def save_checkpoint(self, epoch: int | None = None, folder: str | Path | None = None) -> Path:
        """Write the weights and hyper-parameters as ``draem-epochNNNN.safetensors`` (atomic)."""
        from vad.artifacts import save_tensors

        epoch = self.epochs_trained if epoch is None else epoch
        folder = Path(folder or self._hparams["checkpoint_dir"] or ".")
        path = folder / f"draem-epoch{epoch:04d}.safetensors"
        state = self.state()
        metadata = {
            "format": CHECKPOINT_FORMAT,
            "epoch": str(epoch),
            "hparams": json.dumps(self._hparams),
            "meta": json.dumps({**state.meta, "fitted": True}),
        }
        save_tensors(path, state.tensors, metadata=metadata)
        return path

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: torch.device | str = "cpu") -> Draem:
        """A fitted DRAEM rebuilt from a file written by :meth:`save_checkpoint`."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise VadError(f"draem checkpoint {path} does not exist")
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        except (SafetensorError, OSError) as error:
            raise VadError(f"{path} is not a readable safetensors file: {error}") from error
        if metadata.get("format") != CHECKPOINT_FORMAT:
            raise VadError(f"{path} is not a DRAEM checkpoint (format {metadata.get('format')!r})")
        detector = cls(**json.loads(metadata["hparams"]))
        detector.load_state(State(json.loads(metadata["meta"]), tensors))
        return detector.to(device)

    # ------------------------------------------------------------------ prediction

    def _require_fitted(self) -> None:
        if not self.fitted:
            raise VadError("draem: call fit (or load a fitted state) before predict")

    def forward_maps(self, images: torch.Tensor) -> torch.Tensor:
        """Anomaly probability maps ``[B, H, W]`` (softmax channel 1), networks in eval mode."""
        self.reconstructive.eval()
        self.discriminative.eval()
        reconstruction = self.reconstructive(images)
        logits = self.discriminative(torch.cat((reconstruction, images), dim=1))
        return torch.softmax(logits, dim=1)[:, 1]

    def predict(self, batch: torch.Tensor) -> Prediction:
        """Maps ``[B, H, W]`` at the input resolution and image scores ``[B]`` (max of the mean-filtered map)."""
        self._require_fitted()
        images = self._check_batch(batch, "predict")
        with torch.no_grad():
            maps = self.forward_maps(images)
            scores = anomaly_score(maps, self._hparams["score_window"])
        return Prediction(scores=scores, maps=maps)

    def export_module(self) -> nn.Module:
        """``images -> (scores, maps)`` for ONNX export."""
        self._require_fitted()
        # eval(): a fresh module is in training mode, and exporters restore that mode recursively
        # after tracing, which would switch the shared sub-networks' BatchNorm to batch statistics.
        return DraemExport(self.reconstructive, self.discriminative, self._hparams["score_window"]).eval()

    # ------------------------------------------------------------------ state

    def state(self) -> State:
        """All weights and BatchNorm statistics of both sub-networks, plus the resolved image size."""
        tensors = {f"reconstructive/{k}": v for k, v in self.reconstructive.state_dict().items()}
        tensors.update({f"discriminative/{k}": v for k, v in self.discriminative.state_dict().items()})
        meta = {"fitted": self.fitted, "epochs_trained": self.epochs_trained, "image_size": self._hparams["image_size"]}
        return State(meta=meta, tensors=tensors)

    def load_state(self, state: State) -> None:
        """Restore :meth:`state` (strict: the weights must fit this ``base_channels``)."""
        parts = []
        # Check everything before loading anything, so a bad state leaves this detector unchanged.
        for prefix, module in (("reconstructive/", self.reconstructive), ("discriminative/", self.discriminative)):
            part = {k[len(prefix) :]: v for k, v in state.tensors.items() if k.startswith(prefix)}
            expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
            given = {k: tuple(v.shape) for k, v in part.items()}
            if given != expected:
                missing = sorted(set(expected) - set(given))
                wrong = sorted(k for k in set(expected) & set(given) if expected[k] != given[k])
                detail = f"missing {missing[:3]}" if missing else f"unexpected {sorted(set(given) - set(expected))[:3]}"
                if wrong:
                    detail = f"{wrong[0]} has shape {given[wrong[0]]}, expected {expected[wrong[0]]}"
                raise VadError(
                    f"draem: the saved {prefix[:-1]} weights do not fit this network "
                    f"(base_channels={self._hparams['base_channels']}): {detail}"
                )
            parts.append((module, part))
        for module, part in parts:
            module.load_state_dict(part, strict=True)
        self.reconstructive.to(self.device).eval()
        self.discriminative.to(self.device).eval()
        if state.meta.get("image_size") is not None:
            self._hparams["image_size"] = int(state.meta["image_size"])
        self.epochs_trained = int(state.meta.get("epochs_trained", 0))
        self.fitted = bool(state.meta.get("fitted", True))

    # ------------------------------------------------------------------ features

    def feature_source(self, layers: Sequence[str] = ("block3", "block4")) -> DraemFeatures:
        """The discriminative encoder's features (default blocks 3 and 4: strides 4 and 8) as a FeatureSource."""
        return DraemFeatures(self, layers)

    def encoder_features(self, images: torch.Tensor, layers: Sequence[str]) -> list[torch.Tensor]:
        """The named discriminative encoder blocks for input images (reconstruction computed first)."""
        self.reconstructive.eval()
        self.discriminative.eval()
        reconstruction = self.reconstructive(images)
        blocks = self.discriminative.encode(torch.cat((reconstruction, images), dim=1))
        return [blocks[int(name[len("block") :]) - 1] for name in layers]


class DraemExport(nn.Module):
    """A traceable ``images -> (scores [B], maps [B, H, W])`` module around fitted sub-networks."""

    def __init__(self, reconstructive: nn.Module, discriminative: nn.Module, score_window: int) -> None:
        super().__init__()
        self.reconstructive, self.discriminative, self.score_window = reconstructive, discriminative, score_window

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores and maps as :meth:`Draem.predict`."""
        reconstruction = self.reconstructive(images)
        maps = torch.softmax(self.discriminative(torch.cat((reconstruction, images), dim=1)), dim=1)[:, 1]
        return anomaly_score(maps, self.score_window), maps


class DraemFeatures(FeatureSource):
    """DRAEM's discriminative encoder features as patch features (seed 000's heterogeneous fusion).

    For an image batch it runs the reconstructive sub-network, then the discriminative encoder on
    (reconstruction, image), takes the named ``layers`` (``block1``..``block6``, strides 1..32),
    resizes them bilinearly to the grid of the first one and concatenates channels. Preprocessing
    is DRAEM's ([0, 1] images at ``image_size``). Built by :meth:`Draem.feature_source`, or from
    its ``config()`` (``detector`` is then DRAEM's hyper-parameters) followed by ``load_state``.
    If the DRAEM is not fitted yet, :meth:`fit` trains it.
    """

    name = "draem-features"

    def __init__(self, detector: Draem | dict[str, Any], layers: Sequence[str] = ("block3", "block4")) -> None:
        if isinstance(detector, dict):
            detector = Draem(**detector)
        if not isinstance(detector, Draem):
            raise VadError(f"draem-features wraps a Draem detector, got {type(detector).__name__}")
        if isinstance(layers, str) or not list(layers) or any(layer not in FEATURE_BLOCKS for layer in layers):
            raise VadError(f"draem-features: layers must be a non-empty list of {sorted(FEATURE_BLOCKS)}, got {layers!r}")
        self.detector = detector
        self.layers = list(layers)

    @property
    def hparams(self) -> dict[str, Any]:
        """The wrapped DRAEM's hyper-parameters and the layers."""
        return {"detector": self.detector.hparams, "layers": list(self.layers)}

    def config(self) -> dict[str, Any]:
        """``{"kind": "detector-features", "detector": "draem", "hparams": ...}``: rebuilt as
        ``Draem(**hparams["detector"]).feature_source(layers=hparams["layers"])`` then ``load_state``."""
        return {"kind": "detector-features", "detector": Draem.name, "hparams": self.hparams}

    @property
    def requires_fit(self) -> bool:  # type: ignore[override]
        """True until the wrapped DRAEM is fitted."""
        return not self.detector.fitted

    @property
    def preprocessing(self) -> Preprocessing:  # type: ignore[override]
        """DRAEM's preprocessing."""
        return self.detector.preprocessing

    @property
    def device(self) -> torch.device:
        """The wrapped DRAEM's device."""
        return self.detector.device

    def to(self, device: torch.device | str) -> DraemFeatures:
        """Move the wrapped DRAEM."""
        self.detector.to(device)
        return self

    @property
    def out_channels(self) -> int:
        """Sum of the chosen blocks' widths (c, 2c, 4c, 8c, 8c, 8c for blocks 1-6)."""
        widths = self.detector.discriminative.widths
        return sum(widths[int(layer[len("block") :]) - 1] for layer in self.layers)

    @property
    def stride(self) -> int:
        """Input pixels per grid cell (the first layer's stride)."""
        return FEATURE_BLOCKS[self.layers[0]]

    def fit(self, images: Iterable[torch.Tensor]) -> None:
        """Train the wrapped DRAEM on normal images if it is not fitted yet."""
        if not self.detector.fitted:
            self.detector.fit(images)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Features ``[B, out_channels, H / stride, W / stride]``."""
        self.detector._require_fitted()
        images = self.detector._check_batch(images, "features")
        with torch.no_grad():
            blocks = self.detector.encoder_features(images, self.layers)
            grid = blocks[0].shape[-2:]
            resized = [b if b.shape[-2:] == grid else F.interpolate(b, size=grid, mode="bilinear", align_corners=False) for b in blocks]
            return torch.cat(resized, dim=1)

    def state(self) -> State:
        """The wrapped DRAEM's state."""
        return self.detector.state()

    def load_state(self, state: State) -> None:
        """Restore the wrapped DRAEM's state."""
        self.detector.load_state(state)
