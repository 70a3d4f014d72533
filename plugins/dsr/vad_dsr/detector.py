"""DSR as a vad image detector (``--detector dsr``) and its VQ codes as a FeatureSource.

DSR (Zavrtanik, Kristan, Skočaj, ECCV 2022) as the official code defines it
(github.com/VitjanZ/DSR_anomaly_detection, ``train_dsr.py``, ``test_dsr.py``): a frozen two-level
VQ-VAE (:mod:`vad_dsr.vq`) quantizes an image into codes Q_lo (stride 8) and Q_hi (stride 4); its
general appearance decoder renders them faithfully, anomalies included. Two subspace restriction
modules restore the codes to normal appearance, an object-specific decoder renders the restored
codes, and an anomaly detection U-Net compares the two images (:mod:`vad_dsr.network`).

Training runs in phases through vad's shared loop (``total_epochs`` is their sum; each phase
steps its own Adam optimiser):

1. **VQ pretraining** (only without ``vq_weights``): the VQ-VAE loss (MSE reconstruction plus the
   commitment losses, cost 0.25; EMA codebooks, decay 0.99) with Adam (``vq_lr``, 2e-4) on
   batches of ``vq_batch_size`` (64) for ``vq_epochs`` (100), the learning rate x0.1 after 80 %
   and 90 % of them, convolutions initialised N(0, 0.02): the authors' VQ pretraining script,
   which the DSR repository does not ship and 3DSR's does (github.com/VitjanZ/3DSR,
   ``train_dada.py``, which uses an L1 reconstruction and keeps this MSE as commented-out lines).
2. **Main training** (``epochs``, official 100): per batch of 8, 40 % of the images rotated by
   U(-90, 90) degrees; a Perlin mask per image (zeroed for half of them); anomalies made in
   code space (:mod:`vad_dsr.anomalies`) on Q_lo, Q_hi or both (each with chance 1/2, then
   1/2); the restriction modules, the object-specific decoder and the detection module learn
   ``focal(detection, mask) + L2(F~_hi, Q_hi) + L2(F~_lo, Q_lo) + 10 L2(image, object-specific
   image)`` with Adam (lr 2e-4), x0.1 after 80 % of the epochs; the mask is pooled to the grid of
   the altered level. Convolutions of the decoder and detection module start from N(0, 0.02).
3. **Up-sampling module** (``upsampling_epochs``, official ``epochs // 2`` = 50): 30 % of the
   images rotated, half of them given a Perlin region of one random colour blended at opacity
   U[0.2, 1]; the frozen model runs as at test time and the up-sampling U-Net learns the focal
   loss against the full-resolution mask with Adam (lr 2e-4, constant: the official schedule's
   milestones 80 and 90 lie beyond its 50 epochs).

Prediction (``test_dsr.py``): the anomaly map is the up-sampling module's softmax (anomalous
class) at the input resolution; the image score is the maximum of the 21 x 21 mean-filtered
detection-module softmax (:func:`vad_reconstruction.losses.anomaly_score`).

Deviations (each also in the option it concerns, where there is one):

* **VQ weights**: the official VQ-VAE is pretrained on ImageNet, which cannot be downloaded here.
  ``vq_weights=FILE`` loads any VQ model of the same sizes: ``vad dsr pretrain-vq --images
  FOLDER`` pretrains one on a folder of images (e.g. ImageNet), once for every category, and the
  official ``vq_model_pretrained_128_4096.pckl`` converted to safetensors loads as it is (same
  layer names). Without a file, fit pretrains the VQ-VAE on the category's own training images
  (phase 1): its codebooks then only know normal appearance, so a real defect is encoded by
  normal codes and rendered less faithfully by the general decoder than with ImageNet codes.
  The official EMA quantizer starts collapsed: after the first update every unused code is its
  EMA sum divided by the Laplace-smoothed count (about 1e-5), far from the data, and it only
  comes back into reach as that sum decays (by 0.99 per step: over a thousand steps or more).
  A short VQ pretraining leaves nearly every position on one code, and DSR then cannot tell
  images apart: give the full schedule, or a VQ model file (``vad dsr pretrain-vq
  --codebook-init data --dead-code-steps 10`` avoids the collapse in short runs, a deviation).
* **Epochs**: an official epoch is 1000 batches drawn at random whatever the number of training
  images (``__len__`` 8000 at batch 8; 64,000 at batch 64 for the VQ). ``steps_per_epoch``
  (1000) keeps that: each phase runs as many passes over the N training images as its epochs x
  1000 steps need (``ceil(epochs * 1000 / ceil(N / batch))``; ``null``: one pass per epoch, as
  anomalib). Passes reshuffle the images instead of drawing them with replacement.
* **Channel order**: the official loaders read images with ``cv2.imread`` (BGR) and the networks
  see BGR; vad feeds them BGR too, so a converted official VQ model sees what it saw.
* **Widths**: ``hidden_channels``, ``residual_channels``, ``residual_layers``, ``embedding_dim``,
  ``codebook_size`` and ``base_width`` default to the official 128, 64, 2, 128, 4096 and 64;
  ``base_width`` sets both U-Nets and the object-specific decoder's bottleneck (official 64
  each). Smaller values are for tests and CPUs.
* **Evaluation**: the official test crops maps and masks to the central 224 x 224 pixels for its
  pixel metrics; vad scores whole maps at each image's original resolution. vad also smooths
  maps with a Gaussian (``--sigma``, default 4), which the official code does not: ``--sigma 0``
  gives the official maps. The image score comes from the raw detection map, as official.
* **Numerics**: float32 only (``allows_mixed_precision`` is False: nearest-code search and the
  EMA updates need it); Perlin noise and rotations from :mod:`vad_augment` (DRAEM's construction,
  bilinear, zero fill) instead of NumPy/imgaug; images resized with vad's bilinear resize instead
  of ``cv2.resize``; replacement codes drawn only for the masked positions (the official code
  draws one for every position and discards the rest); every random draw comes from ``seed``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vad.contracts import DetectorFeatures, Prediction, Preprocessing
from vad.errors import VadError
from vad.options import option
from vad.training import CachedBatches, TrainedDetector
from vad_augment.noise import integers, uniform
from vad_dsr.anomalies import code_anomalies, color_anomalies, segmentation_target
from vad_dsr.network import SIZE_MULTIPLE, AnomalyDetectionModule, ImageReconstructionNetwork, SubspaceRestrictionModule, UpsamplingModule
from vad_dsr.vq import VQ_GAMMA, VQ_MILESTONES, DiscreteLatentModel, bgr, init_weights, load_vq, multistep_milestones, vq_pretraining_loss
from vad_dsr.vq_options import VqArchitecture
from vad_reconstruction.losses import anomaly_score, focal_loss

#: Official chances: an image rotated in the main / up-sampling training, an image left normal.
ROTATE_MAIN, ROTATE_UPSAMPLING, NORMAL_CHANCE = 0.4, 0.3, 0.5
#: Weight of the object-specific image's L2 loss in the main training (official 10).
IMAGE_LOSS_WEIGHT = 10.0
#: Feature levels a FeatureSource may expose, with their strides.
LEVEL_STRIDES = {"hi": 4, "lo": 8}


class Dsr(TrainedDetector):
    """DSR: dual subspace re-projection on a VQ-VAE's codes, trained on code-space anomalies."""

    name = "dsr"
    input = "images"
    produces_maps = True
    steps_itself = True
    allows_mixed_precision = False

    class Options(TrainedDetector.Options, VqArchitecture):
        image_size: int = option(256, "Square input side, a multiple of 32 (official 256).", ge=SIZE_MULTIPLE, multiple_of=SIZE_MULTIPLE)
        epochs: int = option(100, "Epochs of the main training (official 100); an epoch is steps_per_epoch steps.", ge=1)
        upsampling_epochs: int = option(50, "Epochs of the up-sampling module's training after it (official epochs // 2 = 50).", ge=0)
        steps_per_epoch: int | None = option(1000, "Steps in an epoch (official 1000 random batches whatever the number of images); null: one pass over the training images (anomalib).", ge=1)
        batch_size: int = option(8, "Images per step of the main and up-sampling training (official 8).", ge=1)
        lr: float = option(2e-4, "Adam learning rate of the main and up-sampling training (official 0.0002).", gt=0)
        lr_milestones: list[float] = option([0.8], "Fractions of the main epochs after which its learning rate is multiplied by lr_gamma (official 0.8).", gt=0, le=1)
        lr_gamma: float = option(0.1, "Learning-rate factor at each main milestone (official 0.1).", gt=0)
        anomaly_strength: float = option(0.2, "Lowest code-replacement strength; each image and level draws U[this, 1] (official 0.2).", gt=0, le=1)
        vq_weights: str | None = option(None, "VQ model file (safetensors: vad dsr pretrain-vq, or the official ImageNet checkpoint converted); null: pretrain on the training images in fit (deviation: official ImageNet).")
        vq_epochs: int = option(100, "Without vq_weights: epochs of VQ-VAE pretraining on the training images in fit (authors' ImageNet schedule, 3DSR; short runs leave the codebooks collapsed); 0: random VQ, tests only.", ge=0)
        vq_batch_size: int = option(64, "Images per VQ pretraining step (authors' 64).", ge=1)
        vq_lr: float = option(2e-4, "Adam learning rate of the VQ pretraining (authors' 0.0002), x0.1 after 80 % and 90 % of vq_epochs.", gt=0)
        base_width: int = option(64, "Width of the detection and up-sampling U-Nets and of the object-specific decoder's bottleneck (official 64).", ge=1)
        score_window: int = option(21, "Mean filter size of the image score (official 21).", ge=1, rule=(lambda v: v % 2 == 1, "odd"))

    tiny_options = {
        "image_size": 64, "epochs": 1, "upsampling_epochs": 0, "steps_per_epoch": None, "batch_size": 8, "vq_epochs": 1, "vq_batch_size": 8,
        "hidden_channels": 8, "residual_channels": 4, "residual_layers": 1, "embedding_dim": 4, "codebook_size": 32, "base_width": 4,
    }
    #: One VQ step and one main step with tiny widths learn nothing to rank by.
    tiny_image_auroc = None

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        #: Training images of the current fit (sets the passes per phase with steps_per_epoch).
        self.image_count: int | None = None
        self._optimizers: dict[str, torch.optim.Optimizer] = {}
        self._rotations: dict[str, Any] = {}
        self._perlin: Any = None

    # ------------------------------------------------------------------ contract

    @property
    def preprocessing(self) -> Preprocessing:  # type: ignore[override]
        """Square ``image_size`` inputs in [0, 1] (mean 0, std 1), bilinear resize as ``cv2.resize``."""
        size = self.options.image_size
        return Preprocessing(size=(size, size), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), interpolation="bilinear")

    def check_batch(self, batch: Any, where: str) -> torch.Tensor:
        """Image batches ``[B, 3, H, W]`` with sides that are multiples of 32."""
        batch = super().check_batch(batch, where)
        height, width = batch.shape[-2:]
        if height % SIZE_MULTIPLE or width % SIZE_MULTIPLE:
            raise VadError(f"dsr {where} needs image sides that are multiples of {SIZE_MULTIPLE}, got {height}x{width}; prepare images with the detector's preprocessing (image_size)")
        return batch

    # ------------------------------------------------------------------ phases

    def phase_epochs(self) -> tuple[int, int, int]:
        """Loop epochs (passes over the training images) of the VQ, main and up-sampling phases."""
        options = self.options
        vq_epochs = 0 if options.vq_weights is not None else options.vq_epochs
        plan = ((vq_epochs, options.vq_batch_size), (options.epochs, options.batch_size), (options.upsampling_epochs, options.batch_size))
        return tuple(self._passes(epochs, batch) for epochs, batch in plan)  # type: ignore[return-value]

    def _passes(self, epochs: int, batch_size: int) -> int:
        """Passes giving ``epochs * steps_per_epoch`` steps over the fit's images (``epochs`` without them)."""
        if epochs == 0 or self.options.steps_per_epoch is None or not self.image_count:
            return epochs
        return math.ceil(epochs * self.options.steps_per_epoch / math.ceil(self.image_count / batch_size))

    @property
    def total_epochs(self) -> int:
        """The three phases' loop epochs together."""
        return sum(self.phase_epochs())

    def phase(self, epoch: int) -> str:
        """``"vq"``, ``"main"`` or ``"upsampling"``: the phase loop epoch ``epoch`` (1-based) belongs to."""
        vq, main, _ = self.phase_epochs()
        return "vq" if epoch <= vq else "main" if epoch <= vq + main else "upsampling"

    def minibatch(self) -> int:
        """The current phase's batch size (the official loaders shuffle)."""
        return self.options.vq_batch_size if self.current_epoch and self.phase(self.current_epoch) == "vq" else self.options.batch_size

    # ------------------------------------------------------------------ training

    def fit(self, batches: Iterable[torch.Tensor]) -> None:
        """Count the training images (they set each phase's passes), then the shared loop."""
        cached = batches if isinstance(batches, CachedBatches) else CachedBatches(batches)
        held = cached.materialize()
        self.image_count = sum(int(b.shape[0]) for b in (cached if held is None else held) if isinstance(b, torch.Tensor))
        super().fit(cached)

    def build(self, input_meta: dict[str, Any]) -> dict[str, nn.Module]:
        """The VQ-VAE and the five DSR modules from ``seed``; convolutions of the VQ-VAE, the
        object-specific decoder and the detection module start from N(0, 0.02) (the authors'
        ``weights_init``), the others keep PyTorch's initialisation, as official."""
        o = self.options
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(o.seed)
            networks: dict[str, nn.Module] = {
                "vq": o.build_vq(),
                "restriction_hi": SubspaceRestrictionModule(o.embedding_dim),
                "restriction_lo": SubspaceRestrictionModule(o.embedding_dim),
                "decoder": ImageReconstructionNetwork(2 * o.embedding_dim, o.hidden_channels, o.residual_layers, o.residual_channels, o.base_width),
                "detection": AnomalyDetectionModule(o.base_width),
                "upsampling": UpsamplingModule(o.base_width),
            }
        generator = torch.Generator().manual_seed(o.seed)
        for name in ("vq", "decoder", "detection"):
            init_weights(networks[name], generator)
        return networks

    def before_training(self) -> None:
        """Load ``vq_weights`` (a bad file fails here, before any step) and build the augmentations."""
        from vad.progress import warn
        from vad_augment.generators import PerlinTextureAnomaly, RandomRotation

        options = self.options
        if options.vq_weights is not None and not self.resuming:
            load_vq(self.networks["vq"], options.vq_weights, "dsr")
        elif options.vq_weights is None and options.vq_epochs == 0:
            warn("dsr: the VQ model is RANDOMLY INITIALISED (vq_epochs=0, no vq_weights): scores are not meaningful")
        self._perlin = PerlinTextureAnomaly()  # DSR's Perlin masks are DRAEM's: scales 2^0..2^5, +-90 degrees, threshold 0.5
        self._rotations = {"main": RandomRotation(degrees=90.0, probability=ROTATE_MAIN), "upsampling": RandomRotation(degrees=90.0, probability=ROTATE_UPSAMPLING)}

    def optimizers(self) -> tuple[list[torch.optim.Optimizer], list[Any]]:
        """One Adam per phase; their learning rates follow :meth:`learning_rate` (no scheduler objects:
        the rate is set from the loop epoch before each step)."""
        o, nets = self.options, self.networks
        main = [p for name in ("restriction_hi", "restriction_lo", "decoder", "detection") for p in nets[name].parameters()]
        self._optimizers = {"main": torch.optim.Adam(main, lr=o.lr), "upsampling": torch.optim.Adam(nets["upsampling"].parameters(), lr=o.lr)}
        if self.phase_epochs()[0]:
            self._optimizers["vq"] = torch.optim.Adam(nets["vq"].parameters(), lr=o.vq_lr)
        return list(self._optimizers.values()), []

    def learning_rate(self, epoch: int) -> float:
        """The rate at loop epoch ``epoch`` (1-based) of its phase's optimiser, as a MultiStepLR
        stepped once per epoch of that phase: x``lr_gamma`` after each of ``lr_milestones`` of the
        main epochs, x0.1 after 80 % and 90 % of the VQ epochs, constant for the up-sampling module."""
        o = self.options
        vq_epochs, main_epochs, _ = self.phase_epochs()
        phase = self.phase(epoch)
        if phase == "upsampling":
            return o.lr
        base, gamma, fractions, length, done = (
            (o.vq_lr, VQ_GAMMA, VQ_MILESTONES, vq_epochs, epoch - 1) if phase == "vq" else (o.lr, o.lr_gamma, o.lr_milestones, main_epochs, epoch - 1 - vq_epochs)
        )
        passed = sum(1 for milestone in multistep_milestones(fractions, length) if milestone <= done)
        return base * gamma**passed

    def training_step(self, batch: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        """One step of the current phase's optimiser; returns the detached loss and its parts."""
        phase = self.phase(self.current_epoch)
        vq = self.networks["vq"]
        vq.train(phase == "vq").requires_grad_(phase == "vq")
        if phase == "vq":
            loss, parts = vq_pretraining_loss(vq, bgr(batch))
        elif phase == "main":
            loss, parts = self.main_loss(batch, generator)
        else:
            loss, parts = self.upsampling_loss(batch, generator)
        optimizer = self._optimizers[phase]
        for group in optimizer.param_groups:
            group["lr"] = self.learning_rate(self.current_epoch)
        self.optimizer_step(optimizer, loss)
        return loss.detach(), {name: float(value) for name, value in parts.items()}

    def perlin_masks(self, count: int, height: int, width: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        """One Perlin mask per image ``[B, 1, H, W]``, all zero for the images left normal (half)."""
        masks = torch.stack([self._perlin.perlin_mask(height, width, generator, device) for _ in range(count)])
        anomalous = (uniform(generator, count) >= NORMAL_CHANCE).to(device=device, dtype=masks.dtype)
        return masks * anomalous.view(count, 1, 1, 1)

    @torch.no_grad()
    def synthesize_codes(self, images: torch.Tensor, masks: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """The official code-space anomalies of a (BGR) batch: ``q_lo``, ``q_hi`` (the normal
        codes), ``anomalous_lo``, ``anomalous_hi`` (altered on Q_lo, Q_hi or both) and ``target``
        (the mask on the altered level's grid)."""
        vq = self.networks["vq"]
        count = images.shape[0]
        strength_lo = uniform(generator, count, self.options.anomaly_strength, 1.0)
        strength_hi = uniform(generator, count, self.options.anomaly_strength, 1.0)
        encoded, z_lo = vq.encode_lo(images)
        q_lo = vq.quantizer_lo(z_lo)[0]
        altered_lo = code_anomalies(z_lo, q_lo, vq.quantizer_lo.codebook, masks, strength_lo, generator)
        z_hi_after_lo, z_hi = vq.features_hi(encoded, altered_lo), vq.features_hi(encoded, q_lo)
        q_hi_after_lo, q_hi = vq.quantizer_hi(z_hi_after_lo)[0], vq.quantizer_hi(z_hi)[0]
        codebook_hi = vq.quantizer_hi.codebook
        altered_both_hi = code_anomalies(z_hi_after_lo, q_hi_after_lo, codebook_hi, masks, strength_hi, generator)
        altered_hi = code_anomalies(z_hi, q_hi, codebook_hi, masks, strength_hi, generator)
        use_both = integers(generator, count, 0, 2).to(images).view(count, 1, 1, 1)
        use_lo = integers(generator, count, 0, 2).to(images).view(count, 1, 1, 1)
        anomalous_hi = use_both * altered_both_hi + (1 - use_both) * (use_lo * q_hi + (1 - use_lo) * altered_hi)
        anomalous_lo = use_both * altered_lo + (1 - use_both) * (use_lo * altered_lo + (1 - use_lo) * q_lo)
        target = segmentation_target(masks, tuple(q_hi.shape[2:]), tuple(q_lo.shape[2:]), use_both, use_lo)
        return {"q_lo": q_lo, "q_hi": q_hi, "anomalous_lo": anomalous_lo, "anomalous_hi": anomalous_hi, "target": target}

    def main_loss(self, batch: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The main training's loss for one batch (see the module docstring), with its parts."""
        nets = self.networks
        vq = nets["vq"]
        rotated, _ = self._rotations["main"](batch, generator)
        masks = self.perlin_masks(batch.shape[0], batch.shape[2], batch.shape[3], generator, batch.device)
        images = bgr(rotated)
        codes = self.synthesize_codes(images, masks, generator)
        with torch.no_grad():
            general = vq.decode(codes["anomalous_lo"], codes["anomalous_hi"])
        features_hi, restored_hi = nets["restriction_hi"](codes["anomalous_hi"], vq.quantizer_hi)
        features_lo, restored_lo = nets["restriction_lo"](codes["anomalous_lo"], vq.quantizer_lo)
        specific = nets["decoder"](torch.cat((vq.upsample_t(restored_lo), restored_hi), dim=1))
        probabilities = torch.softmax(nets["detection"](specific.detach(), general), dim=1)
        parts = {
            "focal": focal_loss(probabilities, codes["target"]),
            "l2_hi": F.mse_loss(features_hi, codes["q_hi"]),
            "l2_lo": F.mse_loss(features_lo, codes["q_lo"]),
            "l2_image": F.mse_loss(specific, images),
        }
        loss = parts["focal"] + parts["l2_hi"] + parts["l2_lo"] + IMAGE_LOSS_WEIGHT * parts["l2_image"]
        return loss, {name: value.detach() for name, value in parts.items()}

    def upsampling_loss(self, batch: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The up-sampling module's focal loss on colour anomalies, everything else frozen."""
        rotated, _ = self._rotations["upsampling"](batch, generator)
        masks = self.perlin_masks(batch.shape[0], batch.shape[2], batch.shape[3], generator, batch.device)
        images = bgr(color_anomalies(rotated, masks, generator))
        head = self.export_module()
        with torch.no_grad():
            specific, general, probabilities = head.parts(images)
        refined = torch.softmax(self.networks["upsampling"].train()(specific, general, probabilities), dim=1)
        focal = focal_loss(refined, masks)
        return focal, {"focal": focal.detach()}

    # ------------------------------------------------------------------ prediction

    def predict(self, batch: torch.Tensor) -> Prediction:
        """Maps ``[B, H, W]`` (up-sampling module) and scores ``[B]`` (mean-filtered detection map's maximum)."""
        self.require_fitted()
        return self.scored_by(self.export_module(), batch)

    def export_module(self) -> nn.Module:
        """``images -> (scores, maps)``, every network in eval mode (also for ONNX export)."""
        self.require_fitted()
        nets = self.networks
        return DsrModel(nets["vq"], nets["restriction_hi"], nets["restriction_lo"], nets["decoder"], nets["detection"], nets["upsampling"], self.options.score_window).eval()

    # ------------------------------------------------------------------ features

    def feature_source(self, **options: Any) -> DsrFeatures:
        """The VQ-VAE's codes (or its features before quantization) as a FeatureSource."""
        return DsrFeatures(self, **options)


class DsrModel(nn.Module):
    """The fitted DSR at test time: ``images [B, 3, H, W] (RGB) -> (scores [B], maps [B, H, W])``."""

    def __init__(
        self, vq: DiscreteLatentModel, restriction_hi: nn.Module, restriction_lo: nn.Module, decoder: nn.Module, detection: nn.Module, upsampling: nn.Module, score_window: int
    ) -> None:
        super().__init__()
        self.vq, self.restriction_hi, self.restriction_lo = vq, restriction_hi, restriction_lo
        self.decoder, self.detection, self.upsampling, self.score_window = decoder, detection, upsampling, score_window

    def parts(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For BGR ``images``: ``(object-specific image, general image, detection softmax [B, 2, H, W])``."""
        general, q_lo, q_hi, _ = self.vq(images)
        _, restored_hi = self.restriction_hi(q_hi, self.vq.quantizer_hi)
        _, restored_lo = self.restriction_lo(q_lo, self.vq.quantizer_lo)
        specific = self.decoder(torch.cat((self.vq.upsample_t(restored_lo), restored_hi), dim=1))
        return specific, general, torch.softmax(self.detection(specific, general), dim=1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image scores from the detection map, anomaly maps from the up-sampling module."""
        specific, general, probabilities = self.parts(bgr(images))
        refined = torch.softmax(self.upsampling(specific, general, probabilities), dim=1)
        return anomaly_score(probabilities[:, 1], self.score_window), refined[:, 1]


class DsrFeatures(DetectorFeatures):
    """DSR's VQ-VAE codes as patch features (seed 000's heterogeneous fusion).

    ``levels`` picks Q_hi (stride 4) and/or Q_lo (stride 8), ``quantized=false`` the encoder
    features before quantization instead; levels are resized bilinearly to the first one's grid
    and concatenated (``embedding_dim`` channels each). Preprocessing is DSR's ([0, 1] images at
    ``image_size``).
    """

    name = "dsr-features"

    class Options(DetectorFeatures.Options):
        levels: list[str] = option(["hi", "lo"], "Code levels: hi (Q_hi, stride 4), lo (Q_lo, stride 8); the first sets the grid.", choices=tuple(LEVEL_STRIDES))
        quantized: bool = option(True, "The quantized codes (true) or the encoder features before quantization (false).")

        def check(self) -> None:
            if not self.levels or len(set(self.levels)) != len(self.levels):
                raise self.invalid("levels", "a non-empty list of distinct levels among hi, lo")

    @property
    def out_channels(self) -> int:
        """``embedding_dim`` per level."""
        return self.detector.options.embedding_dim * len(self.options.levels)

    @property
    def stride(self) -> int:
        """Input pixels per grid cell (the first level's stride)."""
        return LEVEL_STRIDES[self.options.levels[0]]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Features ``[B, out_channels, H / stride, W / stride]``."""
        self.detector.require_fitted()
        images = self.detector.check_batch(images, "features")
        kind = "q" if self.options.quantized else "z"
        with torch.no_grad():
            latents = self.detector.networks["vq"].eval().latents(bgr(images))
            maps = [latents[f"{kind}_{level}"] for level in self.options.levels]
            grid = maps[0].shape[-2:]
            return torch.cat([m if m.shape[-2:] == grid else F.interpolate(m, size=grid, mode="bilinear", align_corners=False) for m in maps], dim=1)
