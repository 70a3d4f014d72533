"""Uninformed Students as a vad image detector (``--detector uninformed-students``) and its features
as a FeatureSource.

Method (Bergmann, Fauser, Sattlegger, Steger, CVPR 2020; thesis §5.3): for each patch size ``p``
(receptive field, thesis p ∈ {17, 33, 65}) a teacher pretrained on natural-image patches gives a
128-d descriptor for the patch around every pixel (dense Table 5.1 networks,
:mod:`vad_uninformed_students.teacher`); ``M`` randomly initialised students of the same
architecture (thesis M = 3) learn to regress the teacher's descriptors, standardised with their
mean and std over every pixel of the training images, on normal images (Eq. 5.7). Anomalies
show as the ensemble's regression error and predictive variance; each is standardised with its
mean and std over validation normals, summed, averaged over the patch sizes; the image score is
the map's maximum. Formulas: :mod:`vad_uninformed_students.network`. Thesis MVTec AD settings,
the defaults here: 256 x 256 images, 100 epochs of batch size 1, Adam lr 1e-4, weight decay
1e-5, LeakyReLU slope 5e-3. Every option's description gives the thesis value
(``vad list detectors --details``).

Deviations (each also noted where it happens):

* **Teacher**: the thesis distils each teacher for 50,000 iterations of 64 ImageNet patches from
  ResNet-18's 512-d pooled features, and the teacher never sees the evaluation data set.
  Neither ImageNet nor those weights can be downloaded here. ``teacher_weights=FILE`` loads
  teachers distilled beforehand on any generic image folder (``vad uninformed-students distill``,
  one file for all patch sizes). Without one, ``fit`` first distils each teacher from
  ``distill_backbone`` (default ``tf_efficientnet_lite0``, weights packaged offline) on patches of
  the training images themselves, ``distill_steps`` steps (default 2,000) of
  ``distill_batch_size`` patches: a teacher that has seen the category's normal images and far
  fewer patches, a weaker, less generic descriptor than the thesis'. The distillation itself
  (compactness loss, zoom range, grayscale, Adam 2e-4) and its own deviations are in
  :mod:`vad_uninformed_students.teacher`. ``distill_steps=0`` keeps randomly initialised teachers
  (tests only; said loudly). The teachers are saved with the model.
* **Validation set**: the thesis standardises ``e`` and ``v`` with a separate validation set of
  normal images; a detector receives training images only, so ``validation_fraction`` (default
  0.1, at least one image) of them is held out with the seed: the students and the teacher
  statistics see the rest. With a single training image, or ``validation_fraction=0``, the
  statistics come from the training images themselves (biased low).
* **Training order**: all students of all patch sizes train in one loop on the same shuffled
  image order, on the sum of their losses (disjoint parameters, per-parameter Adam: each student
  gets exactly its own gradient steps); the thesis does not say whether students see different
  orders.
* **Borders**: the dense networks zero-pad the normalised image by the receptive field (the
  padding is the ImageNet mean colour); the thesis does not say how borders are handled. The
  p = 33 and p = 65 networks read 32 and 60 px (Table 5.1's stride-2 pools drop a row).
* **Table 5.1**: three printed sizes contradict the printed output sizes; the kernels follow the
  output sizes (:mod:`vad_uninformed_students.teacher`). Slope 5e-3 from the §5.4 text (the
  caption says 0.05).
* **Maps**: ``image_size x image_size``, one value per pixel; vad upsamples them bilinearly to
  each image's original size (the thesis does not say how) and applies its default Gaussian
  smoothing (``--sigma``), which the thesis does not: ``--sigma 0`` gives the method's maps.
* **Image size**: any square side of at least 16 px (thesis 256).

Cost: every network runs densely at full resolution (the p = 17 network alone is about 200
GMAC per 256 px image), and the defaults train 9 students for 100 epochs after distilling 3
teachers: GPU work. On a CPU, distil the teachers once with ``vad uninformed-students distill``
and pass ``teacher_weights``, and use fewer patch sizes, epochs or pixels.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from vad.contracts import DetectorFeatures, Prediction, Preprocessing, State
from vad.errors import VadError
from vad.options import option
from vad.training import TrainedDetector, train
from vad_uninformed_students.network import UninformedStudentsModel
from vad_uninformed_students.teacher import DESCRIPTOR_DIM, IMAGENET_MEAN, IMAGENET_STD, PATCH_SIZES, give_teachers

#: Images per forward pass outside training (teacher and score statistics).
CHUNK = 4


class UninformedStudents(TrainedDetector):
    """Uninformed Students: ensembles of students regressing dense patch-teacher descriptors at several receptive fields."""

    name = "uninformed-students"
    input = "images"
    produces_maps = True
    #: The networks are built for ``image_size`` (check_batch refuses other sizes).
    fixed_input_size = True

    class Options(TrainedDetector.Options):
        image_size: int = option(256, "Square input side in pixels (thesis 256); at least 16.", ge=16)
        patch_sizes: list[int] = option([17, 33, 65], "Receptive fields p, one teacher and one student ensemble each; the map averages them (thesis 17, 33, 65).", choices=PATCH_SIZES)
        students: int = option(3, "Students M per patch size (thesis 3); with 1 the predictive variance is 0.", ge=1)
        epochs: int = option(100, "Passes over the training images (thesis 100).", ge=1)
        batch_size: int = option(1, "Training images per step, reshuffled every pass (thesis 1).", ge=1)
        lr: float = option(1e-4, "Adam learning rate of the students (thesis 1e-4).", gt=0)
        weight_decay: float = option(1e-5, "Adam weight decay (thesis 1e-5).", ge=0)
        slope: float = option(5e-3, "LeakyReLU slope of teachers and students (thesis §5.4 text 5e-3; Table 5.1 caption 0.05).", gt=0, lt=1)
        validation_fraction: float = option(0.1, "Share of the training images held out for the e/v standardisation (thesis: a separate validation set of normal images).", ge=0, lt=1)
        teacher_weights: str | None = option(None, "A teacher file from `vad uninformed-students distill` holding every patch size; null: distil teachers in fit (thesis: ResNet-18 distilled on ImageNet).")
        distill_backbone: str = option("tf_efficientnet_lite0", "Without teacher_weights: the vad backbone whose pooled deepest features the teachers regress (thesis resnet18, not offline).")
        distill_weights: str | None = option(None, "A local weights file for distill_backbone instead of the packaged or hub weights.")
        distill_steps: int = option(2000, "Without teacher_weights: distillation steps per teacher on patches of the training images (thesis 50,000 on ImageNet); 0: random teachers, tests only.", ge=0)
        distill_batch_size: int = option(64, "Patches per distillation step (thesis 64).", ge=2)
        backbone_input: int = option(64, "Side in pixels each patch is resized to for distill_backbone (thesis: unstated).", ge=32)

        def check(self) -> None:
            if not self.patch_sizes:
                raise self.invalid("patch_sizes", f"at least one of {list(PATCH_SIZES)}")
            if len(set(self.patch_sizes)) != len(self.patch_sizes):
                raise self.invalid("patch_sizes", "a list without repeats")

    tiny_options = {"image_size": 16, "patch_sizes": [17], "students": 2, "epochs": 1, "distill_steps": 1, "distill_batch_size": 4, "backbone_input": 32}
    #: No claim: one epoch with a barely distilled teacher says nothing about the method.
    tiny_image_auroc = None

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._train_pool: torch.Tensor | None = None
        #: Facts about the teachers (their source, and the distillation's cost when fit made them).
        self.teacher_facts: dict[str, Any] = {}

    # ------------------------------------------------------------------ contract

    @property
    def preprocessing(self) -> Preprocessing:  # type: ignore[override]
        """Square ``image_size`` inputs, bilinear resize, ImageNet mean and std (what the teachers are distilled on)."""
        size = self.options.image_size
        return Preprocessing(size=(size, size), mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bilinear")

    # ------------------------------------------------------------------ training

    def fit(self, batches: Any) -> None:
        """Hold out the validation images, train the students through the shared loop, fit the
        e/v standardisation on the held-out images."""
        train_images, validation = self.held_out_split(batches, self.options.validation_fraction)
        self._train_pool = train_images
        try:
            train(self, [train_images])
            self.networks["model"].eval()
            for ensemble in self.networks["model"].scales.values():
                ensemble.fit_score_statistics(validation.split(CHUNK))
        finally:
            self._train_pool = None

    def build(self, input_meta: dict[str, Any]) -> dict[str, nn.Module]:
        """Teachers and students for every patch size, initialised from ``seed`` (PyTorch's
        defaults); the global random state is left as it was."""
        options = self.options
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(options.seed)
            model = UninformedStudentsModel(options.patch_sizes, options.students, options.slope)
        return {"model": model}

    def minibatch(self) -> int:
        """The thesis' training: ``batch_size`` images per step (1), reshuffled every pass."""
        return self.options.batch_size

    def before_training(self) -> None:
        """Give the teachers their weights (file or distillation), then their descriptor
        statistics over every pixel of the training images; a resumed fit takes both from the
        checkpoint instead."""
        options, model = self.options, self.networks["model"]
        assert self._train_pool is not None, "uninformed-students trains through fit()"

        def same_slope(p: int, slope: float | None) -> None:
            if slope is not None and float(slope) != options.slope:
                raise VadError(
                    f"uninformed-students teacher_weights: the p={p} teacher in {str(options.teacher_weights)!r} was distilled "
                    f"with LeakyReLU slope {slope}; set uninformed-students.slope={slope}"
                )

        teachers = {p: model.scale(p).teacher for p in options.patch_sizes}
        self.teacher_facts = give_teachers(self.name, options, teachers, self._train_pool, options.backbone_input, self.device, self.resuming, same_slope)
        model.to(self.device).train()
        if not self.resuming:
            for ensemble in model.scales.values():
                ensemble.fit_teacher_statistics(self._train_pool.split(CHUNK))

    def optimizers(self) -> tuple[list[torch.optim.Optimizer], list[Any]]:
        """Adam over every student (thesis lr 1e-4, weight decay 1e-5); the teachers are frozen."""
        parameters = self.networks["model"].student_parameters()
        return [torch.optim.Adam(parameters, lr=self.options.lr, weight_decay=self.options.weight_decay)], []

    def training_step(self, batch: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        """Every student's Eq. 5.7 loss, summed (each patch size's mean student loss as parts)."""
        return self.networks["model"].loss(batch.float())

    # ------------------------------------------------------------------ state

    def state(self) -> State:
        """The networks (teachers included: a model reloads without the teacher file) and statistics."""
        state = super().state()
        return State(meta={**state.meta, "teacher": self.teacher_facts}, tensors=state.tensors)

    def load_state(self, state: State) -> None:
        super().load_state(state)
        self.teacher_facts = dict(state.meta.get("teacher") or {})

    # ------------------------------------------------------------------ prediction

    def predict(self, batch: torch.Tensor) -> Prediction:
        """Maps ``[B, image_size, image_size]`` and image scores ``[B]`` (map maximum)."""
        return self.scored_by(self.export_module(), batch)

    def export_module(self) -> nn.Module:
        """Teachers and students with their statistics: ``images -> (scores, maps)`` (eval mode)."""
        self.require_fitted()
        return self.networks["model"].eval()

    # ------------------------------------------------------------------ features

    def feature_source(self, **options: Any) -> UninformedStudentsFeatures:
        """The students' regression residual (or the normalised teacher descriptors) as a FeatureSource."""
        return UninformedStudentsFeatures(self, **options)


class UninformedStudentsFeatures(DetectorFeatures):
    """Uninformed Students' features as patch features (``--backbone detector:uninformed-students``).

    Cut point: the dense 128-d descriptors of the smallest patch size, one per pixel (stride 1,
    ``image_size`` per side; each describes the ``p x p`` patch around its pixel).
    ``output=residual`` (default) gives the students' mean minus the normalised teacher
    descriptor, ``1/M Σ_i S_i - ỹ``, whose squared norm is the regression error ``e``;
    ``output=teacher`` gives the normalised teacher descriptors ``ỹ``, a distilled patch
    descriptor. ``stride`` average-pools the grid (1: every pixel; 4 or 8 keep memory-bank heads
    such as PatchCore small). Preprocessing is the detector's.
    """

    name = "uninformed-students-features"

    class Options(DetectorFeatures.Options):
        output: Literal["residual", "teacher"] = option("residual", "residual: the students' mean minus the normalised teacher descriptor; teacher: the normalised teacher descriptor (128 channels each, smallest patch size).")
        stride: int = option(1, "Average-pool the dense grid with this kernel and stride (1: one descriptor per pixel).", ge=1)

    @property
    def out_channels(self) -> int:
        """128: the descriptor dimension."""
        return DESCRIPTOR_DIM

    def grid_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """``image_size // stride`` per side."""
        side = self.detector.options.image_size // self.options.stride
        return (side, side)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        detector = self.detector
        detector.require_fitted()
        images = detector.check_batch(images, "features")
        if self.options.stride > detector.options.image_size:
            raise VadError(f"uninformed-students features: stride {self.options.stride} exceeds image_size {detector.options.image_size}")
        ensemble = detector.networks["model"].eval().smallest
        with torch.no_grad():
            grid = ensemble.targets(images) if self.options.output == "teacher" else ensemble.residual(images)
        stride = self.options.stride
        return F.avg_pool2d(grid, stride) if stride > 1 else grid
