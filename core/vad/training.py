"""The shared training loop of detectors that learn (SimpleNet, DRAEM, every trained method next).

A trained method derives from :class:`TrainedDetector` and supplies only its numerical parts:

* :meth:`~TrainedDetector.build`: fresh networks (deterministic from the ``seed`` option) for
  the facts :meth:`~TrainedDetector.describe_input` took from the first training batch;
* :meth:`~TrainedDetector.optimizers`: its optimisers and learning-rate schedules (stepped once
  per epoch);
* :meth:`~TrainedDetector.training_step`: the loss of one batch (methods with several losses
  and optimisers, e.g. GANs, set ``steps_itself`` and step with ``optimizer_step``; phased
  methods read ``current_epoch`` and give the sum of their phases as ``total_epochs``).

The loop does everything else, the same way for every method:

* ``epochs``, or a ``max_steps`` budget of optimiser steps;
* the inputs (images or features) in the order given, or, for methods whose official loader
  shuffles (:meth:`~TrainedDetector.minibatch`), the inputs held in memory (within
  :data:`CACHE_BYTES`) reshuffled every epoch into batches of the method's size;
* a progress bar with the epoch's mean loss; device placement; bfloat16 autocast on CUDA when
  the method allows it and ``mixed_precision`` is on (the CPU always trains in float32);
* seeding: all randomness of a fit comes from the ``seed`` option;
* checkpoints and resume: inside a :func:`session` with a folder (``vad run`` gives one per
  member), a resumable checkpoint (networks, optimisers, schedules, random states) is written
  atomically at the end of an epoch every ``every_minutes``; with ``resume`` a fit continues
  from it and reaches exactly the weights of an uninterrupted fit;
* interruption safety: a fit that fails or is interrupted (Ctrl-C) leaves the detector as it
  was before (its previous networks, or unfitted);
* model selection never looks at test labels: the loop sees training batches only, and the
  weights after the last epoch are the model;
* a fitted (or loaded) detector's networks are frozen: eval mode, no gradients, so that a fused
  feature source or an ONNX trace takes them as constants.
"""

from __future__ import annotations

import abc
import contextlib
import contextvars
import json
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from vad.contracts import Detector, Prediction, State
from vad.errors import VadError
from vad.options import option

CHECKPOINT_FILE = "checkpoint.safetensors"
CHECKPOINT_FORMAT = "vad-training-checkpoint"


# --------------------------------------------------------------------------- session


@dataclass(frozen=True)
class Session:
    """Where a fit may keep checkpoints (None: nowhere), whether to resume from them, how often."""

    folder: Path | None = None
    resume: bool = False
    every_minutes: float = 5.0

    def child(self, name: str) -> Session:
        """The session of one member (its own checkpoint folder)."""
        return self if self.folder is None else replace(self, folder=self.folder / name)


_session: contextvars.ContextVar[Session] = contextvars.ContextVar("vad_training_session", default=Session())


def current_session() -> Session:
    """The session fits run in (no checkpoints outside :func:`session`)."""
    return _session.get()


@contextlib.contextmanager
def session(folder: str | Path | None, resume: bool = False, every_minutes: float = 5.0) -> Iterator[Session]:
    """Fits inside the block checkpoint under ``folder`` (and resume from it with ``resume``)."""
    token = _session.set(Session(None if folder is None else Path(folder), resume, every_minutes))
    try:
        yield _session.get()
    finally:
        _session.reset(token)


@contextlib.contextmanager
def member_session(name: str) -> Iterator[Session]:
    """The current session narrowed to one member's checkpoint folder."""
    token = _session.set(_session.get().child(name))
    try:
        yield _session.get()
    finally:
        _session.reset(token)


# --------------------------------------------------------------------------- the contract


class TrainedDetector(Detector):
    """A detector that learns networks by gradient descent through the shared loop."""

    class Options(Detector.Options):
        epochs: int = option(1, "Passes over the training data.", ge=1)
        max_steps: int | None = option(None, "Stop after this many optimiser steps (null: run all epochs).", ge=1)
        mixed_precision: bool = option(False, "bfloat16 autocast on CUDA where the method allows it: faster, not the official float32 numerics (the CPU always trains in float32).")
        seed: int = option(0, "All randomness of initialisation and training.")

    #: Whether bfloat16 autocast on CUDA keeps this method's training sound.
    allows_mixed_precision: ClassVar[bool] = True
    #: Whether the networks take only the size ``preprocessing`` gives (layers built for one
    #: size, e.g. an autoencoder's bottleneck): :meth:`check_batch` then refuses other sizes.
    fixed_input_size: ClassVar[bool] = False
    #: Whether :meth:`training_step` takes its own optimiser steps with :meth:`optimizer_step`
    #: (GANs alternating discriminator and generator, flows stepping on sub-batches): the loop
    #: then only checks and records the loss it returns.
    steps_itself: ClassVar[bool] = False

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.networks: dict[str, nn.Module] = {}
        self.input_meta: dict[str, Any] = {}
        #: Mean training loss of each epoch.
        self.history: list[float] = []
        self.epochs_trained = 0
        #: True during a fit that continues from a checkpoint: the networks' weights and buffers
        #: come from it after :meth:`before_training`, which can skip costly set-up (a teacher's
        #: distillation or statistics).
        self.resuming = False
        #: The epoch being trained (1-based) while the loop runs, for methods whose training
        #: changes between phases (f-AnoGAN: the GAN, then the encoder).
        self.current_epoch = 0

    #: Training networks again for each calibration fold costs too much: ``auto`` holds images out.
    cheap_to_refit = False

    @property
    def training_passes(self) -> int:  # type: ignore[override]
        """One pass per epoch: vad keeps the inputs in memory between them."""
        return self.total_epochs

    @property
    def total_epochs(self) -> int:
        """Epochs the loop runs: ``epochs``, or the sum of a phased method's phases."""
        return self.options.epochs

    @property
    def fitted(self) -> bool:
        """True once ``fit`` or ``load_state`` gave the detector its networks."""
        return bool(self.networks)

    def require_fitted(self) -> None:
        """A clear error when predict comes before fit."""
        if not self.fitted:
            raise VadError(f"{self.describe_owner()} is not fitted: call fit() (or load a saved model) before predict()")

    # ------------------------------------------------------------------ the method's part

    def describe_input(self, first: torch.Tensor) -> dict[str, Any]:
        """JSON-safe facts :meth:`build` needs from the first training batch (e.g. channels)."""
        return {}

    @abc.abstractmethod
    def build(self, input_meta: dict[str, Any]) -> dict[str, nn.Module]:
        """Fresh networks, initialised deterministically from the ``seed`` option."""

    @abc.abstractmethod
    def optimizers(self) -> tuple[list[torch.optim.Optimizer], list[Any]]:
        """Optimisers over ``self.networks`` and learning-rate schedules stepped once per epoch."""

    @abc.abstractmethod
    def training_step(self, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor | tuple[torch.Tensor, dict[str, float]]:
        """The loss of one batch (and optionally its named parts); randomness only from ``generator``."""

    def optimizer_step(self, optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
        """One step of ``optimizer`` on ``loss``, for methods that step themselves
        (:attr:`steps_itself`); a non-finite loss is a clear error, as in the loop."""
        check_finite_loss(self, loss, self.current_epoch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def check_batch(self, batch: Any, where: str) -> torch.Tensor:
        """A training or test batch checked and on the detector's device: ``[B, C, H, W]``, and for
        an image detector ``C = 3`` (override to check sizes, calling this first)."""
        images = self.input == "images"
        if not isinstance(batch, torch.Tensor) or batch.ndim != 4 or (images and batch.shape[1] != 3):
            shape = tuple(batch.shape) if isinstance(batch, torch.Tensor) else type(batch).__name__
            expected = "image batches [B, 3, H, W] prepared with the detector's preprocessing" if images else "batches [B, C, H, W]"
            raise VadError(f"{self.name} {where} takes {expected}, got {shape}")
        if self.fixed_input_size:
            height, width = self.preprocessing.size
            if tuple(batch.shape[-2:]) != (height, width):
                raise VadError(f"{self.name} {where} takes {height} x {width} px images (its networks are built for its preprocessing's size), got {tuple(batch.shape[-2:])}")
        return batch.to(self.device, torch.float32)

    def held_out_split(self, batches: Iterable[torch.Tensor], fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The training batches, checked and concatenated, split with ``seed`` into the images
        that train and ``fraction`` of them (at least one) held out as validation normals, for
        methods that normalise their maps on normals they did not train on. With one image or
        ``fraction`` 0 nothing is held out and the validation images are the training images."""
        pool = [self.check_batch(batch, "fit") for batch in batches]
        if not pool:
            raise VadError(f"{self.describe_owner()} got an empty training set: it needs normal training images")
        images = torch.cat(pool)
        count = images.shape[0]
        order = torch.randperm(count, generator=torch.Generator().manual_seed(self.options.seed)).to(images.device)
        kept = max(1, int((1 - fraction) * count))
        train_images = images[order[:kept]]
        return train_images, (images[order[kept:]] if kept < count else train_images)

    def scored_by(self, module: nn.Module, batch: Any) -> Prediction:
        """The prediction of a network that maps checked batches to ``(scores, maps)`` (run in
        eval mode, without gradients): :meth:`predict` of methods whose whole scoring is one module."""
        self.require_fitted()
        images = self.check_batch(batch, "predict")
        with torch.no_grad():
            scores, maps = module.eval()(images)
        return Prediction(scores=scores, maps=maps)

    def before_training(self) -> None:
        """Called once per fit after :meth:`build`, before the first step (e.g. to build
        augmentations, so a bad setting fails before any training)."""

    def generator(self) -> torch.Generator:
        """The generator of all training randomness (shuffling, augmentation, noise): a CPU
        generator seeded with ``seed`` unless the method's official code draws elsewhere."""
        return torch.Generator().manual_seed(self.options.seed)

    def minibatch(self) -> int | None:
        """None: train on the batches as given, in order; a size: reshuffle the inputs held in
        memory every epoch into batches of that size (as the method's official loader does)."""
        return None

    # ------------------------------------------------------------------ contract

    def to(self, device: torch.device | str) -> TrainedDetector:
        """Move the networks to ``device``."""
        super().to(device)
        for network in self.networks.values():
            network.to(self.device)
        return self

    def fit(self, batches: Iterable[torch.Tensor]) -> None:
        """Train through the shared loop (see the module docstring)."""
        train(self, batches)

    def state(self) -> State:
        """Every network's weights and buffers, and the input facts they were built for."""
        self.require_fitted()
        tensors = {f"{name}/{key}": value.detach().cpu().clone() for name, network in self.networks.items() for key, value in network.state_dict().items()}
        return State(meta={"input": self.input_meta, "epochs_trained": self.epochs_trained, "history": self.history}, tensors=tensors)

    def load_state(self, state: State) -> None:
        """Rebuild the networks for the saved input facts and load their weights (strict; a
        mismatch is a clear error and changes nothing)."""
        input_meta = dict(state.meta.get("input") or {})
        networks = self.build(input_meta)
        for name, network in networks.items():
            prefix = f"{name}/"
            part = {key[len(prefix) :]: value for key, value in state.tensors.items() if key.startswith(prefix)}
            try:
                network.load_state_dict(part, strict=True)
            except RuntimeError as error:
                raise VadError(f"the saved {self.describe_owner()} weights of {name!r} do not fit its options: {error}") from error
            network.to(self.device).eval().requires_grad_(False)
        self.networks, self.input_meta = networks, input_meta
        self.epochs_trained = int(state.meta.get("epochs_trained", 0))
        self.history = [float(v) for v in state.meta.get("history", [])]


# --------------------------------------------------------------------------- the loop


#: Inputs (images or features) kept in memory between the training passes of multi-pass
#: detectors, at most this many bytes.
CACHE_BYTES = 1 << 30


class CachedBatches:
    """Re-iterable batches kept in memory after the first complete pass, within
    :data:`CACHE_BYTES` (beyond it every pass recomputes them): what multi-pass detectors get,
    images and features alike."""

    def __init__(self, batches: Iterable[torch.Tensor]) -> None:
        self.batches = batches
        self._cached: list[torch.Tensor] | None = None
        self._over_budget = False

    def __len__(self) -> int:
        return len(self._cached) if self._cached is not None else len(self.batches)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[torch.Tensor]:
        if self._cached is not None:
            yield from self._cached
            return
        collected: list[torch.Tensor] | None = None if self._over_budget else []
        used = 0
        for batch in self.batches:
            if collected is not None:
                used += batch.numel() * batch.element_size()
                if used <= CACHE_BYTES:
                    collected.append(batch)
                else:
                    collected, self._over_budget = None, True
            yield batch
        if collected is not None:
            self._cached = collected

    def materialize(self) -> list[torch.Tensor] | None:
        """Every batch in memory (one pass if needed), or None when they exceed the budget."""
        if self._cached is None and not self._over_budget:
            for _ in self:
                pass
        return self._cached


def _batches_in_memory(batches: Iterable[torch.Tensor]) -> list[torch.Tensor] | None:
    """Every batch in memory (one pass if needed), or None when they exceed :data:`CACHE_BYTES`."""
    return (batches if isinstance(batches, CachedBatches) else CachedBatches(batches)).materialize()


def _epoch_order(count: int, generator: torch.Generator) -> torch.Tensor:
    """A random order of ``count`` inputs from ``generator`` (float64 uniform draws, argsorted)."""
    return torch.argsort(torch.rand(count, generator=generator, device=generator.device, dtype=torch.float64).cpu())


class _Run:
    """One fit's mutable progress (what a checkpoint stores besides the networks)."""

    def __init__(self, detector: TrainedDetector, generator: torch.Generator) -> None:
        self.detector, self.generator = detector, generator
        self.epoch = 0
        self.steps = 0
        self.history: list[float] = []


def train(detector: TrainedDetector, batches: Iterable[torch.Tensor]) -> None:
    """Fit ``detector``'s networks on ``batches`` (re-iterable, one pass per epoch)."""
    from vad.progress import info, track

    options = detector.options
    in_memory = _batches_in_memory(batches) if detector.minibatch() is not None else None
    data: Sequence[torch.Tensor] | Iterable[torch.Tensor] = in_memory if in_memory is not None else batches
    first = next(iter(data), None)
    if first is None:
        raise VadError(f"{detector.describe_owner()} got an empty training set: it needs normal training images")
    first = detector.check_batch(first, "fit")
    pool = None
    if in_memory is not None:
        checked = [detector.check_batch(batch, "fit") for batch in in_memory]
        sizes = {tuple(batch.shape[1:]) for batch in checked}
        if len(sizes) > 1:
            raise VadError(f"{detector.describe_owner()}: training batches have different shapes {sorted(sizes)}; prepare them with one preprocessing")
        pool = torch.cat(checked)

    previous = (detector.networks, detector.input_meta, detector.history, detector.epochs_trained)
    input_meta = detector.describe_input(first)
    torch.manual_seed(options.seed)
    detector.networks, detector.input_meta = detector.build(input_meta), input_meta
    try:
        for network in detector.networks.values():
            network.to(detector.device).train()
        where = current_session()
        checkpoint = None if where.folder is None else where.folder / CHECKPOINT_FILE
        detector.resuming = checkpoint is not None and where.resume and checkpoint.is_file()
        detector.before_training()
        optimizers, schedulers = detector.optimizers()
        run = _Run(detector, detector.generator())
        if detector.resuming:
            _load_checkpoint(checkpoint, run, optimizers, schedulers)
            info(f"{detector.describe_owner()}: resumed from {checkpoint} after epoch {run.epoch}", path=str(checkpoint), epoch=run.epoch)
        autocast = detector.device.type == "cuda" and options.mixed_precision and detector.allows_mixed_precision
        last_checkpoint = time.monotonic()
        status = {"loss": None}
        total_epochs = detector.total_epochs
        epochs = range(run.epoch + 1, total_epochs + 1)
        for epoch in track(epochs, f"{detector.name} epochs", total=len(epochs), status=lambda: _loss_text(status["loss"])):
            if options.max_steps is not None and run.steps >= options.max_steps:
                break
            detector.current_epoch = epoch
            losses = []
            for batch in _epoch_batches(detector, data, pool, run.generator):
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                    result = detector.training_step(batch, run.generator)
                loss = result[0] if isinstance(result, tuple) else result
                check_finite_loss(detector, loss, epoch)
                if not detector.steps_itself:
                    for optimizer in optimizers:
                        optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    for optimizer in optimizers:
                        optimizer.step()
                losses.append(float(loss.detach()))
                run.steps += 1
                if options.max_steps is not None and run.steps >= options.max_steps:
                    break
            for scheduler in schedulers:
                scheduler.step()
            run.epoch = epoch
            run.history.append(sum(losses) / max(1, len(losses)))
            status["loss"] = run.history[-1]
            if checkpoint is not None and epoch < total_epochs and time.monotonic() - last_checkpoint >= 60 * where.every_minutes:
                _save_checkpoint(checkpoint, run, optimizers, schedulers)
                last_checkpoint = time.monotonic()
    except BaseException:
        detector.networks, detector.input_meta, detector.history, detector.epochs_trained = previous
        raise
    finally:
        detector.resuming, detector.current_epoch = False, 0
    for network in detector.networks.values():
        network.eval().requires_grad_(False)
    detector.history, detector.epochs_trained = run.history, run.epoch


def check_finite_loss(detector: TrainedDetector, loss: torch.Tensor, epoch: int) -> None:
    """A clear error when a training loss stops being finite (diverged training)."""
    if not torch.isfinite(loss.detach()).all():
        raise VadError(f"{detector.describe_owner()}: the training loss became {float(loss.detach())} at epoch {epoch}; lower the learning rate")


def _loss_text(loss: float | None) -> str:
    return "" if loss is None else f"loss {loss:.4g}"


def _epoch_batches(detector: TrainedDetector, data: Iterable[torch.Tensor], pool: torch.Tensor | None, generator: torch.Generator) -> Iterator[torch.Tensor]:
    if pool is None:
        for batch in data:
            yield detector.check_batch(batch, "fit")
        return
    size = detector.minibatch() or len(pool)
    order = _epoch_order(pool.shape[0], generator)
    for start in range(0, len(order), size):
        yield pool[order[start : start + size].to(pool.device)]


# --------------------------------------------------------------------------- checkpoints


def _pack(value: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    """JSON-safe form of nested optimiser/scheduler states: tensors go to ``tensors``."""
    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach().cpu().clone()
        return {"__tensor__": path}
    if isinstance(value, Counter):  # MultiStepLR's milestones
        return {"__counter__": [[_pack(k, tensors, f"{path}/k{i}"), v] for i, (k, v) in enumerate(value.items())]}
    if isinstance(value, dict):
        return {"__items__": [[_pack(k, tensors, f"{path}/k{i}"), _pack(v, tensors, f"{path}/{i}")] for i, (k, v) in enumerate(value.items())]}
    if isinstance(value, (list, tuple)):
        return {"__list__": [_pack(v, tensors, f"{path}/{i}") for i, v in enumerate(value)], "tuple": isinstance(value, tuple)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise VadError(f"cannot checkpoint a value of type {type(value).__name__} at {path}")


def _unpack(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, dict):
        if "__tensor__" in value:
            return tensors[value["__tensor__"]]
        if "__counter__" in value:
            return Counter({_unpack(k, tensors): v for k, v in value["__counter__"]})
        if "__items__" in value:
            return {_unpack(k, tensors): _unpack(v, tensors) for k, v in value["__items__"]}
        items = [_unpack(v, tensors) for v in value["__list__"]]
        return tuple(items) if value["tuple"] else items
    return value


def _save_checkpoint(path: Path, run: _Run, optimizers: list[Any], schedulers: list[Any]) -> None:
    from vad.artifacts import save_tensors

    detector = run.detector
    tensors: dict[str, torch.Tensor] = {}
    for name, network in detector.networks.items():
        for key, value in network.state_dict().items():
            tensors[f"networks/{name}/{key}"] = value.detach().cpu().clone()
    progress = {
        "hparams": detector.hparams,
        "input": detector.input_meta,
        "epoch": run.epoch,
        "steps": run.steps,
        "history": run.history,
        "optimizers": _pack([o.state_dict() for o in optimizers], tensors, "optimizers"),
        "schedulers": _pack([s.state_dict() for s in schedulers], tensors, "schedulers"),
        "random": _pack({"generator": run.generator.get_state(), "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}, tensors, "random"),
    }
    save_tensors(path, tensors, metadata={"format": CHECKPOINT_FORMAT, "progress": json.dumps(progress)})


def _load_checkpoint(path: Path, run: _Run, optimizers: list[Any], schedulers: list[Any]) -> None:
    from safetensors import SafetensorError, safe_open

    detector = run.detector
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        progress = json.loads(metadata["progress"])
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as error:
        raise VadError(f"{path} is not a readable vad training checkpoint ({error}); delete it to train from the start") from error
    if metadata.get("format") != CHECKPOINT_FORMAT:
        raise VadError(f"{path} is not a vad training checkpoint; delete it to train from the start")
    if progress["hparams"] != detector.hparams or progress["input"] != detector.input_meta:
        raise VadError(
            f"the checkpoint {path} was written by {detector.describe_owner()} with other options or inputs; "
            "delete it (or the run folder) to train from the start"
        )
    for name, network in detector.networks.items():
        prefix = f"networks/{name}/"
        network.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}, strict=True)
        network.to(detector.device)
    for optimizer, saved in zip(optimizers, _unpack(progress["optimizers"], tensors)):
        optimizer.load_state_dict(saved)
    for scheduler, saved in zip(schedulers, _unpack(progress["schedulers"], tensors)):
        scheduler.load_state_dict(saved)
    random = _unpack(progress["random"], tensors)
    run.generator.set_state(random["generator"])
    torch.set_rng_state(random["torch"])
    if random["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(random["cuda"])
    run.epoch, run.steps, run.history = int(progress["epoch"]), int(progress["steps"]), [float(v) for v in progress["history"]]


__all__ = ["CACHE_BYTES", "CachedBatches", "Session", "TrainedDetector", "current_session", "member_session", "session", "train", "CHECKPOINT_FILE"]
