"""GCAD as a vad image detector (``--detector gcad``) and its features as a FeatureSource.

Method (Bergmann, PhD thesis ch. 7; Bergmann, Batzner, Fauser, Sattlegger, Steger, "Beyond Dents
and Scratches", IJCV 2022): for each patch size ``p`` (thesis p ∈ {17, 33}, one model each) a
local branch, the frozen Uninformed Students patch teacher ``E_loc`` (128-d descriptor per
pixel, normalised by folding the training set's per-channel mean and std into its final layer)
and a U-Net ``R_loc`` regressing it, finds structural anomalies; a global branch, an
encoder-decoder ``E_glo`` with a 32-d bottleneck and 10 output channels per pixel distilled from
``E_loc`` through ``U`` (three 1 x 1 convolutions), and a U-Net ``R_glo`` regressing ``E_glo``,
finds logical ones. Loss (Eq. 7.4) ``L_kd / 128 + L_glo / 10 + L_loc / 128``; the first 50 of
500 epochs train ``E_glo``, ``U`` and ``R_loc`` only, then ``R_glo`` as well; ``E_glo``'s skip
connections fade out over the first 100 epochs, upper levels first. Maps ``||E_loc - R_loc||^2``
and ``||E_glo - R_glo||^2``, each standardised with its mean and std over validation normals,
summed, averaged over the patch sizes; the image score is the map's maximum. Thesis settings,
the defaults here: 256 x 256 images, Adam lr 1e-4, weight decay 1e-5, 500 epochs on augmented
data. Every option's description gives the thesis value (``vad list detectors --details``).
Architectures and formulas: :mod:`vad_gcad.network`.

Deviations and choices for what the thesis leaves open (each also noted where it happens):

* **Teacher**: the thesis' ``E_loc`` is the S-T teacher distilled from ResNet-18 on ImageNet
  (50,000 iterations); neither can be downloaded here. ``teacher_weights=FILE`` loads teachers
  distilled beforehand on any generic image folder (``vad uninformed-students distill``, one file
  for all patch sizes, the file format of Uninformed Students). Without one, ``fit`` first distils
  each teacher from ``distill_backbone`` (default ``tf_efficientnet_lite0``, weights packaged
  offline) on patches of the training images themselves, ``distill_steps`` steps (default 2,000)
  of ``distill_batch_size`` patches (:func:`vad_uninformed_students.teacher.distill_teacher`):
  a teacher that has seen the category's normal images and far fewer patches, a weaker, less
  generic descriptor than the thesis'. ``distill_steps=0`` keeps randomly initialised teachers
  (tests only; said loudly). Each patch is resized to 64 px for the backbone (Uninformed
  Students' ``backbone_input`` default; the thesis does not say). A teacher file's LeakyReLU
  slope (its facts; default 5e-3) travels with the model. The teachers, with the normalisation
  folded in, are saved with the model; a fit resumed from a checkpoint (``vad run --resume``)
  takes them from it instead of distilling and folding again.
* **Validation set**: the thesis standardises the maps with a separate validation set of normal
  images; a detector receives training images only, so ``validation_fraction`` (default 0.1, at
  least one image) of them is held out with the seed, as EfficientAD does: training and the
  teacher statistics see the rest. With a single training image, or ``validation_fraction=0``,
  the statistics come from the training images themselves (biased low).
* **Batch size**: not stated in the thesis; default 8 images per step, reshuffled every epoch
  (the U-Nets have no batch normalisation, so it only trades gradient noise for speed).
* **E_glo channel widths**: given only in the thesis' Fig. 7.4; chosen as the thesis' LOCO
  autoencoder (Table 6.3: 32, 32, 64, 64, 64 channels, 8 x 8 convolution to the bottleneck) and
  mirrored, LeakyReLU 0.05 (:mod:`vad_gcad.network`). ``U``'s hidden width (128) likewise.
* **Skip schedule**: the thesis says the five weights decrease linearly after each epoch,
  upper levels first, all 0 after 100 epochs; here each level fades during its own fifth of
  ``skip_decay_epochs`` (u during epochs 0-20, v 20-40, ..., y 80-100). The weights are set at
  the start of every epoch and kept in the model (scoring uses those after the last epoch).
* **Shorter schedules**: ``skip_decay_epochs`` and ``global_regressor_start`` are used as given
  when they are smaller than ``epochs``; when one is not (e.g. ``epochs=2`` with the thesis'
  100 and 50), it becomes the thesis' share of ``epochs``: ``floor(epochs / 5)`` for the skip
  decay (so the last epochs train through the bottleneck alone, as the scoring model runs) and
  ``floor(epochs / 10)`` for ``R_glo``'s start, said once at fit time and saved with the model
  (``schedule`` in ``model.json``). ``max_steps`` may end training before the decay completes;
  the model then scores with the skip weights it reached.
* **Losses**: each term is the squared channel norm averaged over pixels and images (the thesis'
  per-image sum ``1/B Σ ||.||²`` averaged over the pixels, so that it does not grow with the image
  size) and divided by its feature depth (Eq. 7.4). The gradient of ``L_glo`` reaches ``E_glo``
  too (not stopped: the thesis sums the terms); before ``global_regressor_start`` the term is
  left out, so ``R_glo`` gets no gradient and Adam leaves it unchanged. All patch sizes train in
  one loop on the same image order, on the sum of their losses (disjoint parameters,
  per-parameter Adam: each model gets exactly its own updates).
* **Augmentation**: the thesis' Table 6.2 / 7.4 switches per category: rotation up to 3° and
  colour jitter (every LOCO category) on by default, vertical and horizontal flips opt-in. The
  jitter magnitudes are not stated; brightness, contrast and saturation factors are drawn from
  ``[1 - color_jitter, 1 + color_jitter]`` (default 0.2). They run on the resized image
  (the thesis does not say where); the teacher sees the same augmented image.
* **Borders**: ``E_loc`` zero-pads the normalised image by its receptive field (the padding is
  the ImageNet mean colour); the thesis does not say how borders are handled.
* **Maps**: ``image_size x image_size``, one value per pixel; vad upsamples them bilinearly to
  each image's original size (the thesis does not say how) and applies its default Gaussian
  smoothing (``--sigma``), which the thesis does not: ``--sigma 0`` gives the method's maps.
* **Image size**: any square side that is a multiple of 32 (``E_glo``'s five stride-2 levels) and
  of ``2^(unet_depth - 1)`` (thesis 256).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from vad.contracts import DetectorFeatures, Prediction, Preprocessing, State
from vad.distillation import denormalize, normalize
from vad.errors import VadError
from vad.options import option
from vad.training import TrainedDetector, train
from vad_gcad.network import GcadModel, augment, fold_normalisation, map_statistics, skip_weights
from vad_uninformed_students.teacher import BACKBONE_INPUT, DESCRIPTOR_DIM, IMAGENET_MEAN, IMAGENET_STD, descriptor_statistics, give_teachers

#: Images per forward pass outside training (teacher statistics, map statistics).
CHUNK = 4
#: The thesis' schedule: 500 epochs, skip weights 0 after 100, R_glo from epoch 50.
THESIS_EPOCHS, THESIS_SKIP_DECAY, THESIS_REGRESSOR_START = 500, 100, 50
#: Patch sizes GCAD may use (Table 5.1 defines teachers for these; thesis GCAD: 17 and 33).
GCAD_PATCH_SIZES = (17, 33, 65)
#: E_glo halves the image five times.
SIZE_MULTIPLE = 32


def resolve_schedule(epochs: int, skip_decay_epochs: int, global_regressor_start: int) -> dict[str, Any]:
    """The epochs actually used: each option as given when it is smaller than ``epochs``, else
    the thesis' share of ``epochs`` (skip decay ``floor(epochs / 5)``, ``R_glo`` start
    ``floor(epochs / 10)``); ``scaled`` names the options that were replaced."""
    scaled = []
    decay, start = skip_decay_epochs, global_regressor_start
    if decay >= epochs and decay > 0:
        decay = epochs * THESIS_SKIP_DECAY // THESIS_EPOCHS
        scaled.append("skip_decay_epochs")
    if start >= epochs:
        start = epochs * THESIS_REGRESSOR_START // THESIS_EPOCHS
        scaled.append("global_regressor_start")
    return {"epochs": epochs, "skip_decay_epochs": decay, "global_regressor_start": start, "scaled": scaled}


class GcadSchedule:
    """The per-epoch schedule of a fit, stepped by the shared loop after every epoch like a
    learning-rate schedule (so checkpoints save it and resume restores it): ``epoch`` finished
    epochs, the skip weights of every ``E_glo`` set for the next one, and whether ``R_glo`` trains.
    It also carries the fit's ``teacher_facts`` through checkpoints (a resumed fit does not
    distil its teachers again: they come with the checkpoint's weights)."""

    def __init__(self, model: GcadModel, skip_decay_epochs: int, global_regressor_start: int, teacher_facts: dict[str, Any] | None = None) -> None:
        self.model = model
        self.skip_decay_epochs = skip_decay_epochs
        self.global_regressor_start = global_regressor_start
        self.teacher_facts = dict(teacher_facts or {})
        self.epoch = 0
        self.apply()

    @property
    def trains_global_regressor(self) -> bool:
        """True from epoch ``global_regressor_start`` on (0-based: the thesis' epochs 51-500)."""
        return self.epoch >= self.global_regressor_start

    def apply(self) -> None:
        """Set the skip weights for the epoch that starts now."""
        self.model.set_skip_weights(skip_weights(self.epoch, self.skip_decay_epochs))

    def step(self) -> None:
        """One epoch finished."""
        self.epoch += 1
        self.apply()

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "skip_decay_epochs": self.skip_decay_epochs, "global_regressor_start": self.global_regressor_start, "teacher": self.teacher_facts}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the schedule (after the checkpoint's weights, which the loop loads first)."""
        self.epoch = int(state["epoch"])
        self.skip_decay_epochs = int(state["skip_decay_epochs"])
        self.global_regressor_start = int(state["global_regressor_start"])
        self.teacher_facts = dict(state.get("teacher") or {})
        for branch in self.model.branches.values():
            branch.sync_teacher_slope()  # the checkpoint's teacher_slope buffer
        self.apply()


class Gcad(TrainedDetector):
    """GCAD: local (patch teacher + U-Net) and global (bottleneck encoder-decoder + U-Net) branches per patch size."""

    name = "gcad"
    input = "images"
    produces_maps = True
    #: The networks are built for ``image_size`` (check_batch refuses other sizes).
    fixed_input_size = True

    class Options(TrainedDetector.Options):
        image_size: int = option(256, "Square input side in pixels (thesis 256); a multiple of 32 and of 2^(unet_depth - 1).", ge=SIZE_MULTIPLE, multiple_of=SIZE_MULTIPLE)
        patch_sizes: list[int] = option([17, 33], "Receptive fields p of the local teacher, one model each; the map averages them (thesis 17, 33).", choices=GCAD_PATCH_SIZES)
        epochs: int = option(500, "Passes over the training images (thesis 500).", ge=1)
        batch_size: int = option(8, "Training images per step, reshuffled every pass (thesis: unstated).", ge=1)
        lr: float = option(1e-4, "Adam learning rate (thesis 1e-4).", gt=0)
        weight_decay: float = option(1e-5, "Adam weight decay (thesis 1e-5).", ge=0)
        bottleneck: int = option(32, "Bottleneck size g of the global encoder-decoder E_glo (thesis 32).", ge=1)
        global_channels: int = option(10, "Output channels d_glo of E_glo per pixel (thesis 10).", ge=1)
        skip_decay_epochs: int = option(100, "Epochs over which E_glo's skip weights fall from 1 to 0, upper levels first (thesis 100 of 500); if not below epochs: floor(epochs / 5), the thesis' share.", ge=0)
        global_regressor_start: int = option(50, "Epochs that train E_glo, U and R_loc only before R_glo joins (thesis 50 of 500); if not below epochs: floor(epochs / 10), the thesis' share.", ge=0)
        vertical_flip: bool = option(False, "Augmentation: random vertical flip, p = 0.5 (thesis: per category; off for breakfast box and juice bottle).")
        horizontal_flip: bool = option(False, "Augmentation: random horizontal flip, p = 0.5 (thesis: per category; off for breakfast box and juice bottle).")
        rotation: float = option(3.0, "Augmentation: random rotation up to this many degrees about the centre (thesis 3, every category); 0: off.", ge=0, le=180)
        color_jitter: float = option(0.2, "Augmentation: brightness, contrast and saturation factors in [1 - x, 1 + x] (thesis: every category, magnitude unstated); 0: off.", ge=0, lt=1)
        validation_fraction: float = option(0.1, "Share of the training images held out for the map standardisation (thesis: a separate validation set of normal images).", ge=0, lt=1)
        teacher_weights: str | None = option(None, "A teacher file from `vad uninformed-students distill` holding every patch size; null: distil teachers in fit (thesis: ResNet-18 distilled on ImageNet).")
        distill_backbone: str = option("tf_efficientnet_lite0", "Without teacher_weights: the vad backbone whose pooled deepest features the teachers regress (thesis resnet18, not offline).")
        distill_weights: str | None = option(None, "A local weights file for distill_backbone instead of the packaged or hub weights.")
        distill_steps: int = option(2000, "Without teacher_weights: distillation steps per teacher on patches of the training images (thesis 50,000 on ImageNet); 0: random teachers, tests only.", ge=0)
        distill_batch_size: int = option(64, "Patches per distillation step (thesis 64).", ge=2)
        unet_depth: int = option(5, "Blocks of the U-Nets R_loc and R_glo (thesis 5: 16 x 16 x 1024 latent at 256 px).", ge=1, le=8)
        unet_width: int = option(6, "log2 of the U-Nets' first-block channels, wf (thesis 6: 64 ... 1024 channels).", ge=0, le=8)

        def check(self) -> None:
            if not self.patch_sizes:
                raise self.invalid("patch_sizes", f"at least one of {list(GCAD_PATCH_SIZES)}")
            if len(set(self.patch_sizes)) != len(self.patch_sizes):
                raise self.invalid("patch_sizes", "a list without repeats")
            multiple = 2 ** (self.unet_depth - 1)
            if self.image_size % multiple:
                raise self.invalid("image_size", f"a multiple of {multiple} (2^(unet_depth - 1) for unet_depth={self.unet_depth})")

    tiny_options = {"image_size": 32, "patch_sizes": [17], "epochs": 1, "batch_size": 8, "distill_steps": 1, "distill_batch_size": 4, "unet_depth": 2, "unet_width": 3}
    #: No claim: one step with a barely distilled teacher say nothing about the method.
    tiny_image_auroc = None

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._train_pool: torch.Tensor | None = None
        self._schedule: GcadSchedule | None = None
        #: Facts about the teachers (their source, and the distillation's cost when fit made them).
        self.teacher_facts: dict[str, Any] = {}
        #: The schedule a fit used (:func:`resolve_schedule`).
        self.schedule_facts: dict[str, Any] = {}

    # ------------------------------------------------------------------ contract

    @property
    def preprocessing(self) -> Preprocessing:  # type: ignore[override]
        """Square ``image_size`` inputs, bilinear resize, ImageNet mean and std (what the teachers are distilled on)."""
        size = self.options.image_size
        return Preprocessing(size=(size, size), mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bilinear")

    # ------------------------------------------------------------------ training

    def fit(self, batches: Any) -> None:
        """Hold out the validation images, train through the shared loop, fit the map statistics
        on the held-out images."""
        train_images, validation = self.held_out_split(batches, self.options.validation_fraction)
        self._train_pool = train_images
        previous = (self.teacher_facts, self.schedule_facts)
        try:
            train(self, [train_images])
            self.teacher_facts = self._schedule.teacher_facts  # a resumed fit's come from its checkpoint
            self._fit_map_statistics(validation)
        except BaseException:
            self.teacher_facts, self.schedule_facts = previous  # the loop restored the previous networks
            raise
        finally:
            self._train_pool, self._schedule = None, None

    def build(self, input_meta: dict[str, Any]) -> dict[str, nn.Module]:
        """Every patch size's networks, initialised from ``seed`` (PyTorch's defaults); the global
        random state is left as it was."""
        o = self.options
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(o.seed)
            model = GcadModel(o.patch_sizes, o.image_size, o.bottleneck, o.global_channels, o.unet_depth, o.unet_width)
        return {"model": model}

    def minibatch(self) -> int:
        """``batch_size`` images per step, reshuffled every pass."""
        return self.options.batch_size

    def before_training(self) -> None:
        """Give the teachers their weights (file or distillation), fold their descriptor
        statistics over every pixel of the training images into their last layer, and resolve
        the schedule."""
        from vad.progress import info

        options, model = self.options, self.networks["model"]
        assert self._train_pool is not None, "gcad trains through fit()"

        def adopt_slope(p: int, slope: float | None) -> None:  # a teacher file's slope wins
            branch = model.branches[f"p{p}"]
            branch.set_teacher_slope(branch.teacher.slope if slope is None else float(slope))

        teachers = {p: model.branches[f"p{p}"].teacher for p in options.patch_sizes}
        self.teacher_facts = give_teachers(self.name, options, teachers, self._train_pool, BACKBONE_INPUT, self.device, self.resuming, adopt_slope)
        model.to(self.device).train()
        if not self.resuming:
            for branch in model.branches.values():
                mean, std = descriptor_statistics(branch.teacher, self._train_pool.split(CHUNK))
                fold_normalisation(branch.teacher, mean, std)
        self.schedule_facts = resolve_schedule(options.epochs, options.skip_decay_epochs, options.global_regressor_start)
        if self.schedule_facts["scaled"]:
            facts = self.schedule_facts
            info(
                f"gcad: epochs={options.epochs} is too short for {', '.join(f'{name}={getattr(options, name)}' for name in facts['scaled'])}: "
                f"using the thesis' shares, skip weights 0 after {facts['skip_decay_epochs']} epochs, R_glo from epoch {facts['global_regressor_start']}",
                **{k: v for k, v in facts.items() if k != "scaled"},
            )

    def optimizers(self) -> tuple[list[torch.optim.Optimizer], list[Any]]:
        """Adam over ``R_loc``, ``E_glo``, ``U`` and ``R_glo`` of every patch size (thesis lr 1e-4,
        weight decay 1e-5; the teachers are frozen), and the epoch schedule (:class:`GcadSchedule`)."""
        model = self.networks["model"]
        parameters = [p for branch in model.branches.values() for net in (branch.local_regressor, branch.global_network, branch.decoder, branch.global_regressor) for p in net.parameters()]
        optimizer = torch.optim.Adam(parameters, lr=self.options.lr, weight_decay=self.options.weight_decay)
        facts = self.schedule_facts or resolve_schedule(self.options.epochs, self.options.skip_decay_epochs, self.options.global_regressor_start)
        self._schedule = GcadSchedule(model, facts["skip_decay_epochs"], facts["global_regressor_start"], self.teacher_facts)
        return [optimizer], [self._schedule]

    def training_step(self, batch: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        """Eq. 7.4 on the augmented batch, summed over the patch sizes; ``L_glo`` only from
        ``global_regressor_start`` on."""
        o = self.options
        assert self._schedule is not None, "gcad trains through fit()"
        images = batch.float()
        if o.vertical_flip or o.horizontal_flip or o.rotation > 0 or o.color_jitter > 0:
            images01 = augment(denormalize(images, IMAGENET_MEAN, IMAGENET_STD), generator, o.vertical_flip, o.horizontal_flip, o.rotation, o.color_jitter)
            images = normalize(images01, IMAGENET_MEAN, IMAGENET_STD)
        with_global = self._schedule.trains_global_regressor
        total, parts = None, {}
        for key, branch in self.networks["model"].branches.items():
            loss, terms = branch.loss(images, with_global)
            total = loss if total is None else total + loss
            parts.update({f"{key}.{name}": float(value.detach()) for name, value in terms.items()})
        return total, parts

    @torch.no_grad()
    def _fit_map_statistics(self, validation: torch.Tensor) -> None:
        """Mean and std of ``A_loc`` and ``A_glo`` over every pixel of the validation images."""
        model = self.networks["model"].eval()
        for branch in model.branches.values():
            maps = [branch.raw_maps(chunk) for chunk in validation.split(CHUNK)]
            local_mean, local_std = map_statistics(torch.cat([m[0] for m in maps]))
            global_mean, global_std = map_statistics(torch.cat([m[1] for m in maps]))
            for buffer, value in ((branch.local_mean, local_mean), (branch.local_std, local_std), (branch.global_mean, global_mean), (branch.global_std, global_std)):
                buffer.fill_(float(value))

    # ------------------------------------------------------------------ state

    def state(self) -> State:
        """The networks (teachers included, normalisation folded in: a model reloads without the
        teacher file), map statistics and skip weights; the teachers' facts and the schedule."""
        state = super().state()
        return State(meta={**state.meta, "teacher": self.teacher_facts, "schedule": self.schedule_facts}, tensors=state.tensors)

    def load_state(self, state: State) -> None:
        super().load_state(state)
        for branch in self.networks["model"].branches.values():
            branch.sync_teacher_slope()
        self.teacher_facts = dict(state.meta.get("teacher") or {})
        self.schedule_facts = dict(state.meta.get("schedule") or {})

    # ------------------------------------------------------------------ prediction

    def predict(self, batch: torch.Tensor) -> Prediction:
        """Maps ``[B, image_size, image_size]`` and image scores ``[B]`` (map maximum)."""
        return self.scored_by(self.export_module(), batch)

    def export_module(self) -> nn.Module:
        """Every branch with its statistics: ``images -> (scores, maps)`` (eval mode)."""
        self.require_fitted()
        return self.networks["model"].eval()

    # ------------------------------------------------------------------ features

    def feature_source(self, **options: Any) -> GcadFeatures:
        """``E_glo``'s features and the two regression residuals as a FeatureSource."""
        return GcadFeatures(self, **options)


#: Channels of each part a feature source can expose, per patch size.
def _part_channels(detector: Gcad) -> dict[str, int]:
    d_glo = detector.options.global_channels
    return {"global": d_glo, "local-residual": DESCRIPTOR_DIM, "global-residual": d_glo}


OUTPUTS = {"all": ("global", "local-residual", "global-residual"), "global": ("global",), "residual": ("local-residual", "global-residual")}


class GcadFeatures(DetectorFeatures):
    """GCAD's features as patch features (``--backbone detector:gcad``).

    Cut point: the per-pixel outputs of each patch size's branches at the input resolution
    (stride 1, ``image_size`` per side), concatenated over the patch sizes in ``patch_sizes``
    order. For each patch size, ``output=all`` (default) gives ``[E_glo, E_loc - R_loc, E_glo -
    R_glo]`` (``d_glo + 128 + d_glo`` = 148 channels at the thesis' widths): the global branch's
    logical-context features and the two regression residuals, whose squared norms are the raw
    maps ``A_loc`` and ``A_glo``; ``output=global`` gives ``E_glo`` only (``d_glo``),
    ``output=residual`` the two residuals (138). ``stride`` average-pools the grid (default 8:
    32 x 32 at 256 px, a grid memory-bank heads such as PatchCore can hold; 1: every pixel).
    Preprocessing is the detector's.
    """

    name = "gcad-features"

    class Options(DetectorFeatures.Options):
        output: Literal["all", "global", "residual"] = option("all", "all: [E_glo, E_loc - R_loc, E_glo - R_glo] per patch size; global: E_glo; residual: the two regression residuals.")
        stride: int = option(8, "Average-pool the per-pixel grid with this kernel and stride (1: one vector per pixel).", choices=(1, 2, 4, 8, 16, 32))

    @property
    def out_channels(self) -> int:
        """The chosen parts' channels times the number of patch sizes."""
        channels = _part_channels(self.detector)
        return len(self.detector.options.patch_sizes) * sum(channels[part] for part in OUTPUTS[self.options.output])

    def grid_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """``image_size // stride`` per side."""
        side = self.detector.options.image_size // self.options.stride
        return (side, side)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        detector = self.detector
        detector.require_fitted()
        images = detector.check_batch(images, "features")
        parts = OUTPUTS[self.options.output]
        grids = []
        with torch.no_grad():
            for branch in detector.networks["model"].eval().branches.values():
                features = branch.global_network(images)
                if "global" in parts:
                    grids.append(features)
                if "local-residual" in parts:
                    grids.append(branch.teacher_features(images) - branch.local_regressor(images))
                if "global-residual" in parts:
                    grids.append(features - branch.global_regressor(images))
        grid = torch.cat(grids, dim=1)
        stride = self.options.stride
        return F.avg_pool2d(grid, stride) if stride > 1 else grid
