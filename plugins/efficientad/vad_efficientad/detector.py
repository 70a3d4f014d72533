"""EfficientAD as a vad image detector (``--detector efficientad``) and its features as a FeatureSource.

Training follows the official-equivalent code (github.com/nelson1425/EfficientAD,
``efficientad.py``, which the authors point to; anomalib's ``efficient_ad`` agrees): a frozen PDN
teacher, a PDN student with 2 x 384 output channels (the first half regresses the teacher, the
second half the autoencoder) and an autoencoder, trained together with Adam (lr 1e-4, weight decay
1e-5) for 70,000 iterations of one 256 px ImageNet-normalised image, the learning rate x 0.1
after 95 % of them. The loss is the hard-feature loss (q = 0.999) of the student on the image,
plus the penalty on a pretraining image when ``penalty_images`` is given, plus the autoencoder and
student-autoencoder losses on the image augmented by a random brightness, contrast or saturation
change (0.8-1.2). The teacher's outputs are normalised by their channel mean and std over the
training images. After training, the student-teacher and autoencoder-student maps are each
normalised by their 0.9 and 0.995 quantiles over validation images (official: 10 % of the
training images, held out from training with the seed), combined as ``0.5 st + 0.5 ae``,
zero-padded by 4 and upsampled bilinearly; the image score is the map maximum. Formulas and
architectures: :mod:`vad_efficientad.network`.

Every option's description gives the official value (``vad list detectors --details``).

Deviations (each also noted where it happens):

* **Teacher**: the official teacher is distilled from WideResNet-101 on ImageNet; neither can be
  downloaded here. ``teacher_weights=FILE`` loads a user's teacher (a ``vad efficientad distill``
  safetensors file, or the official ``teacher_small.pth`` / ``teacher_medium.pth``). Without one,
  ``fit`` first distils a teacher from ``distill_backbone`` (default ``tf_efficientnet_lite0``,
  weights packaged offline) on the training images themselves, ``distill_steps`` steps of
  ``distill_batch_size`` images (official pretraining: 60,000 steps of 16 ImageNet images), and
  saves it with the model (:mod:`vad_efficientad.distill`). A teacher distilled on the category's
  own normal images is a weaker, less generic descriptor than an ImageNet-distilled one;
  ``distill_steps=0`` keeps a random teacher (tests only).
* **Penalty**: the official student loss adds ``mean(S(P)^2)`` on an ImageNet image ``P``
  (resized to 512, random grayscale 0.3, centre crop 256). There is no ImageNet here: with
  ``penalty_images=DIR`` any folder of generic images serves (same transform); by default
  (null) the penalty is skipped, as the official script does with ``--imagenet_train_path none``.
  Using augmented training images instead would pull the student towards zero on the very images
  it must match to the teacher, so that is not offered.
* **Augmentation**: the colour jitter runs on the resized 256 px image (official: on the
  original image before resizing); brightness and saturation are pixel-wise, so only the
  contrast mean differs slightly.
* **Validation split**: as official for MVTec AD (10 %, at least one image); with a single
  training image, or ``validation_fraction=0``, the quantiles come from the training images.
* **Schedule**: the shared loop counts epochs; ``epochs=null`` (default) runs as many passes as
  ``max_steps`` (official 70,000 iterations) needs, and the learning-rate drop happens at
  ``int(0.95 * max_steps)`` optimiser steps, as the official ``StepLR``.
* **Image score**: the maximum of the map upsampled to the input size (official: to the original
  image size; the maximum barely differs). vad upsamples the padded ``image_size / 4`` map to each
  image's original size itself, bilinearly, as official; vad's default Gaussian smoothing
  (``vad run --sigma``, default 4) is not official: ``--sigma 0`` gives the official maps.
* **Image sizes**: the autoencoder's fixed sizes (256 px) scale with ``image_size`` (a multiple of
  32, at least 64), as anomalib; identical at 256.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import nn

from vad.contracts import DetectorFeatures, Prediction, Preprocessing, State
from vad.errors import VadError
from vad.options import option
from vad.training import TrainedDetector, train
from vad.distillation import FolderImages, Sampler, TensorImages, denormalize, normalize, random_grayscale
from vad_efficientad.distill import IMAGENET_MEAN, IMAGENET_STD, distill_teacher, feature_extractor, load_teacher
from vad_efficientad.network import OUT_CHANNELS, EfficientAdModel, channel_statistics, color_jitter, hard_feature_loss, map_quantiles, pdn_output_size

#: Images per forward pass outside training (teacher statistics, quantiles).
CHUNK = 8


class EfficientAd(TrainedDetector):
    """EfficientAD-S / -M: PDN student-teacher plus autoencoder, quantile-normalised maps."""

    name = "efficientad"
    input = "images"
    produces_maps = True
    #: The networks are built for ``image_size`` (check_batch refuses other sizes).
    fixed_input_size = True

    class Options(TrainedDetector.Options):
        model_size: Literal["small", "medium"] = option("small", "PDN size: small (EfficientAD-S) or medium (EfficientAD-M, extra 1x1 convs, wider).")
        image_size: int = option(256, "Square input side in pixels (official 256); a multiple of 32, at least 64.", ge=64, multiple_of=32)
        epochs: int | None = option(None, "Passes over the training images; null (official): as many as max_steps needs.", ge=1)
        max_steps: int | None = option(70000, "Training iterations (official 70,000).", ge=1)
        batch_size: int = option(1, "Training images per step, reshuffled every pass (official 1).", ge=1)
        lr: float = option(1e-4, "Adam learning rate of student and autoencoder (official 1e-4).", gt=0)
        weight_decay: float = option(1e-5, "Adam weight decay (official 1e-5).", ge=0)
        lr_drop: float = option(0.95, "Share of max_steps after which the learning rate is multiplied by 0.1 (official 0.95).", gt=0, le=1)
        validation_fraction: float = option(0.1, "Share of the training images held out to fit the map quantiles (official 0.1 on MVTec AD).", ge=0, lt=1)
        teacher_weights: str | None = option(None, "A teacher file (vad efficientad distill .safetensors, or the official teacher_small/medium.pth); null: distil one in fit (official: WideResNet-101 on ImageNet).")
        penalty_images: str | None = option(None, "A folder of generic images for the student's penalty term (official: ImageNet train); null: no penalty (official --imagenet_train_path none).")
        distill_backbone: str = option("tf_efficientnet_lite0", "Without teacher_weights: the vad backbone a teacher is distilled from (official wide_resnet101_2, not offline).")
        distill_weights: str | None = option(None, "A local weights file for distill_backbone instead of the packaged or hub weights.")
        distill_steps: int = option(3000, "Without teacher_weights: distillation steps on the training images (official pretraining 60,000 on ImageNet); 0: random teacher, tests only.", ge=0)
        distill_batch_size: int = option(8, "Images per distillation step (official 16).", ge=1)

        def check(self) -> None:
            if self.epochs is None and self.max_steps is None:
                raise self.invalid("epochs", "a number of passes when max_steps is null (both null would train forever)")

    tiny_options = {"image_size": 64, "max_steps": 6, "distill_steps": 2, "distill_batch_size": 4}
    #: No claim: a few steps with a barely distilled teacher say nothing about EfficientAD.
    tiny_image_auroc = None

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._train_pool: torch.Tensor | None = None
        self._penalty: tuple[FolderImages, Sampler] | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._total_steps = 0
        #: Facts about the teacher (its source, and the distillation's cost when fit made it).
        self.teacher_facts: dict[str, Any] = {}

    # ------------------------------------------------------------------ contract

    @property
    def training_passes(self) -> int:  # type: ignore[override]
        """Several passes: vad keeps the images in memory."""
        return self.options.epochs or 2

    @property
    def preprocessing(self) -> Preprocessing:  # type: ignore[override]
        """Square ``image_size`` inputs, bilinear resize, ImageNet mean and std (official ``default_transform``)."""
        size = self.options.image_size
        return Preprocessing(size=(size, size), mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bilinear")

    # ------------------------------------------------------------------ training

    def fit(self, batches: Any) -> None:
        """Hold out the validation images, train through the shared loop, fit the map quantiles."""
        train_images, validation = self.held_out_split(batches, self.options.validation_fraction)
        per_pass = math.ceil(len(train_images) / self.options.batch_size)
        declared = self.options
        self._total_steps = declared.max_steps if declared.max_steps is not None else declared.epochs * per_pass
        if declared.epochs is None:  # as many passes as max_steps needs (restored after the fit)
            self.options = declared.replace(epochs=math.ceil(declared.max_steps / per_pass))
        self._train_pool = train_images
        try:
            train(self, [train_images])
            self._fit_quantiles(validation)
        finally:
            self.options, self._train_pool, self._penalty, self._optimizer = declared, None, None, None

    def build(self, input_meta: dict[str, Any]) -> dict[str, nn.Module]:
        """Teacher, student and autoencoder, initialised from ``seed`` (PyTorch's defaults, as
        official); the global random state is left as it was."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.options.seed)
            model = EfficientAdModel(self.options.model_size, self.options.image_size)
        return {"model": model}

    def minibatch(self) -> int:
        """The official loader: one image per step, reshuffled every pass."""
        return self.options.batch_size

    def before_training(self) -> None:
        """Give the teacher its weights (file or distillation), then its channel statistics on the
        training images; open the penalty images."""
        from vad.progress import info, warn

        options, model = self.options, self.networks["model"]
        assert self._train_pool is not None, "efficientad trains through fit()"
        if self.resuming:
            # teacher and its statistics come with the checkpoint's weights and buffers
            self.teacher_facts = {"source": "checkpoint (the resumed fit's teacher)"}
        elif options.teacher_weights is not None:
            model.teacher.load_state_dict(load_teacher(options.teacher_weights, options.model_size))
            self.teacher_facts = {"source": "file", "file": str(options.teacher_weights)}
        elif options.distill_steps > 0:
            extractor = feature_extractor(options.distill_backbone, options.distill_weights, device=self.device)
            images01 = denormalize(self._train_pool, IMAGENET_MEAN, IMAGENET_STD)
            info(f"efficientad: distilling a PDN-{options.model_size} teacher from {options.distill_backbone} on {len(images01)} training images ({options.distill_steps} steps)")
            network, facts = distill_teacher(
                options.model_size, TensorImages(images01), extractor, image_size=options.image_size,
                steps=options.distill_steps, batch_size=options.distill_batch_size, seed=options.seed, device=self.device,
            )
            model.teacher.load_state_dict(network.state_dict())
            self.teacher_facts = {"source": "distilled", "backbone": options.distill_backbone, **facts}
            info(f"efficientad: teacher distilled in {facts['seconds']:.1f} s (loss {facts['first_loss']:.3g} -> {facts['last_loss']:.3g})", **facts)
        else:
            warn("efficientad: the teacher is RANDOMLY INITIALISED (distill_steps=0, no teacher_weights): scores are not meaningful")
            self.teacher_facts = {"source": "random"}
        model.to(self.device)
        model.teacher.eval()
        if not self.resuming:
            mean, std = channel_statistics(model.teacher, self._train_pool.split(CHUNK))
            model.teacher_mean.copy_(mean)
            model.teacher_std.copy_(std.clamp_min(1e-6))
        self._penalty = None
        if options.penalty_images is not None:
            folder = FolderImages(options.penalty_images, "efficientad penalty_images")
            self._penalty = (folder, Sampler(len(folder), torch.Generator().manual_seed(options.seed + 1)))

    def optimizers(self) -> tuple[list[torch.optim.Optimizer], list[Any]]:
        """Adam over student and autoencoder (official lr 1e-4, weight decay 1e-5); the 0.1 drop
        after ``lr_drop`` of the steps is applied per step in :meth:`training_step`."""
        model = self.networks["model"]
        parameters = [*model.student.parameters(), *model.autoencoder.parameters()]
        self._optimizer = torch.optim.Adam(parameters, lr=self.options.lr, weight_decay=self.options.weight_decay)
        return [self._optimizer], []

    def steps_done(self) -> int:
        """Optimiser steps taken so far (Adam's own count: restored with a checkpoint)."""
        optimizer = self._optimizer
        if optimizer is None:
            return 0
        first = optimizer.param_groups[0]["params"][0]
        step = optimizer.state.get(first, {}).get("step", 0)
        return int(step)

    def learning_rate(self, step: int) -> float:
        """Official ``StepLR(step_size=int(0.95 T), gamma=0.1)`` stepped every iteration."""
        drop_at = max(1, int(self.options.lr_drop * self._total_steps))
        return self.options.lr * (0.1 ** (step // drop_at))

    def training_step(self, batch: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        """The official total loss ``L_st (+ penalty) + L_ae + L_stae`` of one batch."""
        model = self.networks["model"]
        if self._optimizer is not None:
            lr = self.learning_rate(self.steps_done())
            for group in self._optimizer.param_groups:
                group["lr"] = lr
        c = OUT_CHANNELS
        images = batch.float()
        loss_hard = hard_feature_loss(model.teacher_features(images), model.student(images)[:, :c].float())
        parts = {"hard": float(loss_hard.detach())}
        loss_st = loss_hard
        if self._penalty is not None:
            folder, sampler = self._penalty
            penalty = self._penalty_batch(folder, sampler, images.shape[0], generator)
            loss_penalty = torch.mean(model.student(penalty)[:, :c].float() ** 2)
            loss_st = loss_st + loss_penalty
            parts["penalty"] = float(loss_penalty.detach())
        augmented = normalize(color_jitter(denormalize(images, IMAGENET_MEAN, IMAGENET_STD), generator), IMAGENET_MEAN, IMAGENET_STD)
        reconstruction = model.autoencoder(augmented).float()
        loss_ae = torch.mean((model.teacher_features(augmented) - reconstruction) ** 2)
        loss_stae = torch.mean((reconstruction - model.student(augmented)[:, c:].float()) ** 2)
        parts.update(ae=float(loss_ae.detach()), stae=float(loss_stae.detach()))
        return loss_st + loss_ae + loss_stae, parts

    def _penalty_batch(self, folder: FolderImages, sampler: Sampler, size: int, generator: torch.Generator) -> torch.Tensor:
        """Official penalty transform: resize to 2 x image_size, random grayscale (0.3), centre crop, ImageNet-normalise."""
        side = self.options.image_size
        images01 = random_grayscale(folder.load(sampler.take(size), 2 * side), 0.3, generator)
        top = (2 * side - side) // 2
        crop = images01[..., top : top + side, top : top + side]
        return normalize(crop, IMAGENET_MEAN, IMAGENET_STD).to(self.device)

    @torch.no_grad()
    def _fit_quantiles(self, validation: torch.Tensor) -> None:
        """q_a = Q(0.9) and q_b = Q(0.995) of each map over the validation images (official ``map_normalization``)."""
        model = self.networks["model"].eval()
        maps = [model.raw_maps(chunk) for chunk in validation.split(CHUNK)]
        q_st = map_quantiles(torch.cat([m[0] for m in maps]))
        q_ae = map_quantiles(torch.cat([m[1] for m in maps]))
        for buffer, value in zip((model.q_st_start, model.q_st_end, model.q_ae_start, model.q_ae_end), (*q_st, *q_ae)):
            buffer.fill_(float(value))
        if not float(model.q_st_end) > float(model.q_st_start) or not float(model.q_ae_end) > float(model.q_ae_start):
            # constant maps (e.g. one validation image of a trivial texture): keep the scale finite
            for start, end in ((model.q_st_start, model.q_st_end), (model.q_ae_start, model.q_ae_end)):
                if not float(end) > float(start):
                    end.fill_(float(start) + 1e-6)

    # ------------------------------------------------------------------ state

    def state(self) -> State:
        """The networks (teacher included: a model reloads without the teacher file) and buffers."""
        state = super().state()
        return State(meta={**state.meta, "teacher": self.teacher_facts}, tensors=state.tensors)

    def load_state(self, state: State) -> None:
        super().load_state(state)
        self.teacher_facts = dict(state.meta.get("teacher") or {})

    # ------------------------------------------------------------------ prediction

    def predict(self, batch: torch.Tensor) -> Prediction:
        """Maps ``[B, image_size / 4, image_size / 4]`` and image scores ``[B]`` (map maximum)."""
        return self.scored_by(self.export_module(), batch)

    def export_module(self) -> nn.Module:
        """Teacher, student and autoencoder: ``images -> (scores, maps)`` (eval mode)."""
        self.require_fitted()
        return self.networks["model"].eval()

    # ------------------------------------------------------------------ features

    def feature_source(self, **options: Any) -> EfficientAdFeatures:
        """The student's discrepancies (or the teacher's normalised features) as a FeatureSource."""
        return EfficientAdFeatures(self, **options)


class EfficientAdFeatures(DetectorFeatures):
    """EfficientAD's features as patch features (``--backbone detector:efficientad``).

    Cut point: the PDN output grid (``image_size / 4 - 8`` per side, stride 4, each position
    describing a 33 px patch). ``output=difference`` (default) concatenates ``T - S_st`` (the
    normalised teacher minus the student's first half, whose squared mean is the student-teacher
    map) and ``AE - S_ae`` (the autoencoder minus the student's second half): 768 channels;
    ``output=teacher`` gives the normalised teacher features (384), a distilled patch descriptor.
    Preprocessing is the detector's.
    """

    name = "efficientad-features"

    class Options(DetectorFeatures.Options):
        output: Literal["difference", "teacher"] = option("difference", "difference: [T - S_st, AE - S_ae] (768 channels); teacher: the normalised teacher features (384).")

    @property
    def out_channels(self) -> int:
        """768 for the differences, 384 for the teacher."""
        return 2 * OUT_CHANNELS if self.options.output == "difference" else OUT_CHANNELS

    def grid_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """The PDN output grid."""
        side = pdn_output_size(self.detector.options.image_size)
        return (side, side)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        detector = self.detector
        detector.require_fitted()
        images = detector.check_batch(images, "features")
        model = detector.networks["model"].eval()
        with torch.no_grad():
            teacher = model.teacher_features(images)
            if self.options.output == "teacher":
                return teacher
            student = model.student(images)
            reconstruction = model.autoencoder(images)
            c = OUT_CHANNELS
            return torch.cat([teacher - student[:, :c], reconstruction - student[:, c:]], dim=1)
