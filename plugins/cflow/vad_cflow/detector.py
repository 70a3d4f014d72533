"""CFLOW-AD as a vad image detector (``--detector cflow``) and its latents as a FeatureSource.

Gudovskiy, Ishizaka, Kozuka, "CFLOW-AD: Real-Time Unsupervised Anomaly Detection with
Localization via Conditional Normalizing Flows", WACV 2022, and its official code
(github.com/gudovskiy/cflow-ad: ``main.py``, ``config.py``, ``model.py``, ``train.py``,
``utils.py``, ``custom_models/utils.py``, ``custom_datasets/loader.py``). The formulas are in
:mod:`vad_cflow.network`.

A frozen pretrained encoder gives ``pool_layers = 3`` feature levels (WideResNet-50 ``layer2``,
``layer3``, ``layer4``: strides 8, 16, 32). Each level has its own conditional normalizing flow
decoder (8 FrEIA ``AllInOneBlock`` couplings, ``subnet_fc``, ``clamp_alpha`` 1.9, soft
permutations), conditioned on the 128-channel 2-D positional encoding of each position.

Training, as ``train.py: train_meta_epoch``: images resized to 256 px, randomly rotated by up to
5 degrees (``T.RandomRotation(5)``: nearest neighbour, black fill), normalised, in shuffled
batches of 32. For every image batch and every level in turn, the ``B h w`` fibers are randomly
permuted and cut into fiber batches of ``N = 256``; each fiber batch takes one Adam step
(lr 2e-4) on ``mean(-log sigmoid(log p(x) / C))``. One Adam optimises all decoders. 25
meta-epochs of 8 sub-epochs (one sub-epoch = one pass over the images = one vad epoch, 200 in
all); the learning rate follows a cosine per meta-epoch down to ``lr * 1e-3`` after a linear
warm-up per batch over the first 2 meta-epochs from ``lr / 10``.

Prediction, as the test part of ``train.py: train``: per level the per-dimension log-likelihood
minus its maximum, exponentiated, upsampled bilinearly (``align_corners=True``) to the input
size, summed over the levels; the map is ``max - sum`` and the image score its maximum.

Every option's description gives the official value (``vad list detectors --details``).

Deviations (each also noted where it happens):

* **Normalisation statistics from the training images, not the test set.** The official map
  subtracts, per level, the largest log-likelihood over the whole *test* set and inverts the
  summed probabilities with their largest value over the test set (anomalib: over each
  prediction batch, so an image's score depends on its batch). Both are test-set statistics;
  here both maxima are taken once, after training, over the training images (augmentation off)
  and stored with the model, so a score depends on its image only. Per level the maximum only
  scales that level's probabilities, which weighs the levels in the sum; the final maximum only
  shifts the scores.
* **Encoder**: WideResNet-50's ImageNet weights cannot be downloaded here, so the default encoder
  is ``tf_efficientnet_lite0`` (ImageNet weights packaged offline) at the official strides 8, 16
  and 32: ``blocks.2``, ``blocks.4``, ``blocks.6`` (40, 112, 320 channels). ``encoder=`` takes any
  vad backbone (``wide_resnet50_2``, ``resnet18``, ``timm:MODEL``) with ``weights=FILE`` offline;
  ``layers=null`` picks the levels at strides 8, 16, 32. Inputs are normalised with the
  encoder's own mean and std (ImageNet's for ResNets, as official; the official EfficientNet path
  passes the mean as the std, a bug not reproduced) and resized bilinearly with anti-aliasing
  (official: PIL ``Image.ANTIALIAS``); the official EfficientNet/ViT path uses the encoder's
  pretrained input size, here ``image_size`` (256, the official ``--input-size``) for every
  encoder. Per category the README's results use 128, 256 or 512 px: set ``image_size``.
* **Batches**: the official loader drops the last incomplete batch (``drop_last=True``) and stops
  when a level has fewer fibers than ``N``; here every image trains (the last batch may be
  smaller) and a level with fewer fibers than ``fiber_batch_size`` takes one fiber batch of all
  of them.
* **Optimiser steps of unused decoders**: the official code, tested on PyTorch 1.8, zeroes
  gradients with ``optimizer.zero_grad()``, which there keeps zero-filled gradients, so every
  Adam step also moves the other levels' decoders on their stale momentum. With PyTorch 2's
  ``set_to_none`` (and here) a fiber batch's step updates its own level's decoder only, which is
  what the paper describes (independent decoders).
* **Model selection**: the official script evaluates on the test set after each meta-epoch and
  saves the weights of the best segmentation AUROC; here the weights after the last epoch are
  the model (no test labels are seen).
* **Post-processing**: vad smooths maps with a Gaussian (``--sigma``, default 4) as for every
  detector; the official code does not: ``--sigma 0`` gives the official maps. Image scores are
  the raw map maximum, before smoothing, as official.
* **Mixed precision**: not used (``allows_mixed_precision`` is False): the flows must run in
  float32, and the frozen encoder in bfloat16 would give the decoders other features in training
  than in prediction.

Training runs through vad's shared loop (:mod:`vad.training`): images held in memory and
reshuffled every epoch into ``batch_size`` batches, checkpoints and resume. CFLOW takes one
optimiser step per fiber batch, so it steps itself (``steps_itself``) and returns the mean loss
over all the batch's fibers (the official training loss) for the loop to record. The encoder's weights are not saved with the model: like every vad backbone it is rebuilt
from its options (packaged weights, ``weights`` file, hub cache; random weights from ``seed``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from vad.contracts import Backbone, DetectorFeatures, FeatureInfo, Prediction, Preprocessing, State
from vad.errors import VadError
from vad.features import FrozenLevels, MovesFrozenLevels
from vad.options import option
from vad.training import TrainedDetector, train
from vad_cflow.network import CflowDecoders, CflowHead, OfficialSchedule, fiber_batches, fiber_loss, fibers_and_conditions, summed_probabilities

#: The strides of the official levels (WideResNet-50 layer2, layer3, layer4; ``pool_layers=3``).
OFFICIAL_STRIDES = (8, 16, 32)
#: Images per forward pass when the normalisation statistics are taken.
CHUNK = 8


class Cflow(MovesFrozenLevels, TrainedDetector):
    """CFLOW-AD: frozen encoder, one conditional normalizing flow per level, likelihood maps."""

    name = "cflow"
    input = "images"
    produces_maps = True
    #: The flows run in float32 and the encoder must give the same features in fit and predict.
    allows_mixed_precision = False
    steps_itself = True

    class Options(TrainedDetector.Options):
        encoder: str = option("tf_efficientnet_lite0", "Frozen pretrained encoder, a vad backbone name or timm:MODEL (official wide_resnet50_2; default EfficientNet-Lite0, weights packaged offline).")
        pretrained: bool = option(True, "Load the encoder's pretrained weights (packaged, weights file, or hub cache); false: random weights drawn from seed (scores not meaningful).")
        weights: str | None = option(None, "A local weights file for the encoder (.safetensors or .pth, timm key names).")
        layers: list[str] | None = option(None, "Encoder levels, one decoder each; null: those at strides 8, 16, 32 (official pool_layers=3: wide_resnet50_2 layer2-4; lite0 blocks.2, blocks.4, blocks.6).")
        image_size: int = option(256, "Square input side in pixels (official --input-size 256; the README's per-category runs use 128-512).", ge=32)
        epochs: int = option(200, "Passes over the training images, official sub-epochs (official 25 meta-epochs x 8 sub-epochs = 200).", ge=1)
        max_steps: int | None = option(None, "Stop after this many image batches, each of several Adam steps (one per fiber batch); null: run all epochs.", ge=1)
        sub_epochs: int = option(8, "Passes per meta-epoch, the unit of the learning-rate schedule (official 8); short runs keep the schedule's shape with fewer (epochs=25, sub_epochs=1).", ge=1)
        warmup_meta_epochs: int = option(2, "Meta-epochs of linear learning-rate warm-up from lr/10, per batch (official lr_warm_epochs 2; 0: none).", ge=0)
        batch_size: int = option(32, "Training images per batch, reshuffled every epoch (official 32).", ge=1)
        fiber_batch_size: int = option(256, "Fibers (positions) per Adam step, drawn at random from a level of an image batch (official N = 256; anomalib 64).", ge=1)
        lr: float = option(2e-4, "Adam learning rate before the schedule (official 2e-4; anomalib 1e-4).", gt=0)
        condition_vec: int = option(128, "Channels of the 2-D positional encoding conditioning every decoder (official 128).", ge=4, multiple_of=4)
        coupling_blocks: int = option(8, "Coupling blocks per decoder (official 8).", ge=1)
        clamp_alpha: float = option(1.9, "Soft clamping of the couplings' log-scales (official 1.9).", gt=0)
        permute_soft: bool = option(True, "Random rotations between couplings instead of channel permutations (official true; anomalib false).")
        rotation: float = option(5.0, "Random rotation of each training image, uniform within +-degrees, nearest neighbour, black fill (official RandomRotation(5)); 0: none.", ge=0, le=180)

        def check(self) -> None:
            if self.layers is not None and (not self.layers or len(set(self.layers)) != len(self.layers)):
                raise self.invalid("layers", "null or a non-empty list of distinct encoder layers such as ['layer2', 'layer3', 'layer4']")

    tiny_options = {"image_size": 64, "layers": ["blocks.2", "blocks.4"], "epochs": 2, "batch_size": 4, "fiber_batch_size": 64}
    #: Two epochs on two levels of a pretrained EfficientNet-Lite0 on the tiny data set (measured 1.0, seeds 0-3).
    tiny_image_auroc = 0.8

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        options = self.options
        self.frozen = FrozenLevels(
            options.encoder, pretrained=options.pretrained, weights=options.weights, layers=options.layers, strides=OFFICIAL_STRIDES, seed=options.seed, owner=self.name
        )
        self._optimizer: torch.optim.Optimizer | None = None
        self._schedule: OfficialSchedule | None = None
        self._batches_per_epoch = 0
        #: True while load_state builds decoders whose every value the saved weights replace.
        self._loading = False

    # ------------------------------------------------------------------ the encoder

    @property
    def encoder(self) -> Backbone:
        """The frozen encoder, built on first use (random weights drawn from ``seed``); the
        resolved ``layers`` are written back into the options."""
        encoder = self.frozen.backbone
        if self.options.layers is None or list(self.options.layers) != self.frozen.names:
            self.options = self.options.replace(layers=self.frozen.names)
        return encoder

    @property
    def levels(self) -> list[FeatureInfo]:
        """The encoder levels with a decoder (name, stride, channels), shallow to deep."""
        self.encoder
        return self.frozen.levels

    def encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The encoder's levels for ``images`` (frozen, no gradient)."""
        return self.frozen.encode(images)

    # ------------------------------------------------------------------ contract

    @property
    def preprocessing(self) -> Preprocessing:  # type: ignore[override]
        """Square ``image_size`` inputs, bilinear resize, normalised with the encoder's mean/std."""
        self.encoder
        return self.frozen.preprocessing(self.options.image_size)

    # ------------------------------------------------------------------ training

    def fit(self, batches: Iterable[torch.Tensor]) -> None:
        """Train the decoders through the shared loop, then take the map's normalisation
        statistics on the training images; a failure leaves the detector as it was."""
        images = self._training_images(batches)
        previous = (self.networks, self.input_meta, self.history, self.epochs_trained)
        self._batches_per_epoch = math.ceil(len(images) / self.options.batch_size)
        try:
            train(self, [images])
            self.fit_statistics(images)
        except BaseException:
            self.networks, self.input_meta, self.history, self.epochs_trained = previous
            raise
        finally:
            self._optimizer, self._schedule = None, None

    def _training_images(self, batches: Iterable[torch.Tensor]) -> torch.Tensor:
        """The checked training batches as one tensor (a clear error when empty or mixed)."""
        pool = [self.check_batch(batch, "fit") for batch in batches]
        if not pool:
            raise VadError(f"{self.describe_owner()} got an empty training set: it needs normal training images")
        sizes = sorted({tuple(batch.shape[1:]) for batch in pool})
        if len(sizes) > 1:
            raise VadError(f"{self.describe_owner()}: training batches have different shapes {sizes}; prepare them with one preprocessing")
        return torch.cat(pool)

    def describe_input(self, first: torch.Tensor) -> dict[str, Any]:
        """The encoder levels the decoders are built for (checked again when a model loads)."""
        return {"layers": [level.name for level in self.levels], "channels": [level.channels for level in self.levels]}

    def build(self, input_meta: dict[str, Any]) -> dict[str, nn.Module]:
        """Fresh decoders for the encoder's levels, initialised from ``seed`` (PyTorch's and
        FrEIA's defaults, as official); the global random states are left as they were."""
        channels = [level.channels for level in self.levels]
        saved = input_meta.get("channels")
        if saved is not None and list(saved) != channels:
            raise VadError(
                f"the saved cflow decoders were trained on encoder levels with {list(saved)} channels, "
                f"but encoder {self.options.encoder!r} gives {channels}: load it with the encoder it was trained with"
            )
        options = self.options
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(options.seed)
                decoders = CflowDecoders(
                    channels, condition_vec=options.condition_vec, coupling_blocks=options.coupling_blocks,
                    clamp_alpha=options.clamp_alpha, permute_soft=options.permute_soft and not self._loading, seed=options.seed,
                )
        except ValueError as error:
            raise VadError(f"cflow cannot build its decoders for encoder levels {[level.name for level in self.levels]}: {error}") from error
        return {"decoders": decoders}

    def load_state(self, state: State) -> None:
        """Rebuild the decoders and load the saved weights. They are built with hard channel
        permutations, which the saved soft ones replace: drawing random rotations of SO(C) takes
        seconds for wide levels (WideResNet-50: 2048 channels) and would be thrown away."""
        self._loading = True
        try:
            super().load_state(state)
        finally:
            self._loading = False

    def minibatch(self) -> int:
        """The official loader's batch size, reshuffled every epoch."""
        return self.options.batch_size

    def optimizers(self) -> tuple[list[torch.optim.Optimizer], list[Any]]:
        """One Adam over every decoder (official lr 2e-4), and the official schedule, which sets
        the rate before every image batch and counts the epochs."""
        options = self.options
        self._optimizer = torch.optim.Adam(self.networks["decoders"].parameters(), lr=options.lr)
        self._schedule = OfficialSchedule(
            self._optimizer, options.lr, batches_per_epoch=max(1, self._batches_per_epoch), epochs=options.epochs,
            sub_epochs=options.sub_epochs, warmup_meta_epochs=options.warmup_meta_epochs,
        )
        return [self._optimizer], [self._schedule]

    def augment(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The official training transform's random rotation, on the resized images: each by an
        angle uniform in +-``rotation`` degrees, nearest neighbour, black outside."""
        if self.options.rotation == 0:
            return images
        from vad.distillation import denormalize, normalize
        from vad_augment.noise import uniform
        from vad_augment.warp import rotate_images

        degrees = self.options.rotation
        angles = uniform(generator, images.shape[0], -degrees, degrees)
        mean, std = self.preprocessing.mean, self.preprocessing.std
        return normalize(rotate_images(denormalize(images, mean, std), angles, mode="nearest"), mean, std)

    def training_step(self, batch: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        """One image batch as ``train_meta_epoch``: for every level in turn, one Adam step per
        random fiber batch (``steps_itself``). Returns the mean loss over every fiber of the
        batch (the official training loss) and the last fiber batch's loss."""
        assert self._optimizer is not None and self._schedule is not None, "cflow trains through fit()"
        optimizer, decoders = self._optimizer, self.networks["decoders"]
        self._schedule.before_batch()
        levels = self.encode(self.augment(batch, generator))
        total, count = torch.zeros((), device=batch.device), 0
        for flow, features in zip(decoders.decoders, levels, strict=True):
            fibers, conditions = fibers_and_conditions(features, self.options.condition_vec)
            for chosen in fiber_batches(len(fibers), self.options.fiber_batch_size, generator):
                chosen = chosen.to(fibers.device)
                loss, losses = fiber_loss(flow, fibers[chosen], conditions[chosen])
                total, count = total + losses.detach().sum(), count + losses.numel()
                self.optimizer_step(optimizer, loss)
        return total / count, {"last_fiber_batch": float(loss.detach())}

    # ------------------------------------------------------------------ statistics

    @torch.no_grad()
    def fit_statistics(self, images: torch.Tensor) -> None:
        """The map's normalisation on ``images`` (official: on the test set): each level's largest
        per-dimension log-likelihood, then the largest sum of the levels' upsampled probabilities."""
        decoders = self.networks["decoders"].eval()
        size = (images.shape[-2], images.shape[-1])
        chunks = [[log_p for _, log_p in decoders.decode(self.encode(chunk))] for chunk in images.split(CHUNK)]
        maxima = torch.stack([torch.stack([chunk[level].max() for chunk in chunks]).max() for level in range(len(self.levels))])
        decoders.log_likelihood_max.copy_(maxima)
        largest = max(float(summed_probabilities(chunk, maxima, size).max()) for chunk in chunks)
        decoders.probability_max.fill_(largest)

    # ------------------------------------------------------------------ prediction

    def predict(self, batch: torch.Tensor) -> Prediction:
        """Maps ``[B, H, W]`` at the input size and image scores ``[B]`` (map maximum)."""
        return self.scored_by(self.export_module(), batch)

    def export_module(self) -> nn.Module:
        """``images -> (scores, maps)``: encoder, decoders, normalised likelihood maps; traceable
        for ONNX (eval mode: exporters restore the mode they found)."""
        self.require_fitted()
        return CflowHead(self.encode, self.networks["decoders"]).eval()

    # ------------------------------------------------------------------ features

    def feature_source(self, **options: Any) -> CflowFeatures:
        """The decoders' latents (or per-position log-likelihoods) as a FeatureSource."""
        return CflowFeatures(self, **options)


class CflowFeatures(DetectorFeatures):
    """CFLOW-AD's learned features as patch features (``--backbone detector:cflow``).

    Cut point: the decoders' outputs per position. ``output=latent`` (default) gives the latent
    ``z = f(x | c)`` of every fiber, ``[B, C_l, h_l, w_l]`` per level: standard normal where the
    flow learned the normal features, large where they are unlikely. ``output=log_likelihood``
    gives each level's per-dimension log-likelihood ``log p(x) / C_l`` (one channel per level,
    before the map's normalisation). The chosen levels are resized bilinearly to the grid of the
    first one and concatenated along the channels. Preprocessing is the detector's.
    """

    name = "cflow-features"

    class Options(DetectorFeatures.Options):
        layers: list[str] | None = option(None, "Levels to expose, among the detector's layers; null: all of them.")
        output: Literal["latent", "log_likelihood"] = option("latent", "latent: the flows' z per position (C_l channels per level); log_likelihood: log p(x) / C_l per position (one channel per level).")

        def check(self) -> None:
            if self.layers is not None and not self.layers:
                raise self.invalid("layers", "null or a non-empty list of the detector's layers")

    @property
    def exposed(self) -> list[int]:
        """Positions of the exposed levels among the detector's (checked)."""
        names = [level.name for level in self.detector.levels]
        chosen = list(self.options.layers) if self.options.layers is not None else names
        unknown = [layer for layer in chosen if layer not in names]
        if unknown:
            raise VadError(f"cflow-features: layers {unknown} are not among the detector's layers {names}")
        return [names.index(layer) for layer in chosen]

    @property
    def out_channels(self) -> int:
        """Sum of the exposed levels' channels (latent) or their number (log_likelihood)."""
        if self.options.output == "log_likelihood":
            return len(self.exposed)
        levels = self.detector.levels
        return sum(levels[position].channels for position in self.exposed)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Features ``[B, out_channels, h, w]`` on the first exposed level's grid."""
        detector = self.detector
        detector.require_fitted()
        images = detector.check_batch(images, "features")
        exposed = self.exposed
        with torch.no_grad():
            decoded = detector.networks["decoders"].eval().decode(detector.encode(images))
            if self.options.output == "latent":
                chosen = [decoded[position][0] for position in exposed]
            else:
                chosen = [decoded[position][1].unsqueeze(1) for position in exposed]
            grid = chosen[0].shape[-2:]
            return torch.cat([c if c.shape[-2:] == grid else F.interpolate(c, size=grid, mode="bilinear", align_corners=False) for c in chosen], dim=1)
