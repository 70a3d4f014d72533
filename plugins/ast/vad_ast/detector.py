"""AST as a vad image detector (``--detector ast``) and its features as a FeatureSource.

Training follows the official code (github.com/marco-rudolph/AST, ``train_teacher.py``,
``train_student.py``, ``config.py``; networks, losses and maps in :mod:`vad_ast.network`):
features of a frozen pretrained backbone are extracted once per training image (official
``pre_extracted=True``); the teacher flow, conditioned on a 32-channel positional encoding, is
trained on them by maximum likelihood, then frozen; the student is trained to regress the
teacher's outputs. Each phase uses Adam (lr 2e-4, eps 1e-8, weight decay 1e-5) for
``meta_epochs x sub_epochs = 3 x 24 = 72`` epochs of shuffled batches of 8 images of
768 x 768 px, ImageNet-normalised. The anomaly map is the per-position mean over channels of
``(z_t - z_s)^2``, upsampled bicubically to a quarter of the input size; the image score is its
mean ("mean over maps", default) or, with ``score=max``, the maximum of the upsampled map (the
official ``eval.py`` reports both). As in the official scripts, the model is the one after the
last epoch (they also print test-set AUROCs along the way, which vad never looks at).

Both phases run in vad's shared loop (:mod:`vad.training`) as one fit of ``teacher_epochs +
epochs`` epochs: :class:`TrainingPhases`, stepped after every epoch like a learning-rate
schedule, says which network trains, so a checkpoint taken in either phase resumes in it. Each
network has its own Adam (the loop steps both; the idle one gets no gradients, so Adam leaves it
alone and the student's Adam starts with the student phase, as the official separate scripts).
The model folder stores the extractor, teacher and student: a saved model reloads without the
backbone's weights.

Every option's description gives the official value (``vad list detectors --details``).

Deviations (each also noted where it happens):

* **Backbone**: the official extractor is EfficientNet-B5 (``efficientnet_pytorch``, ImageNet)
  up to block 35, the end of its sixth stage (304 channels, stride 32: a 24 x 24 grid at
  768 px); its weights cannot be downloaded here, so the default is ``tf_efficientnet_lite0``
  (weights packaged offline) at the same place, ``blocks.5``, the end of its sixth stage
  (192 channels, stride 32). ``backbone=tf_efficientnet_b5`` with ``weights=<file>`` gives the
  official extractor (``efficientnet_pytorch``'s B5 is the TensorFlow port timm also carries).
  Inputs are normalised with the backbone's mean and std (ImageNet for B5, as official; 0.5 /
  0.5 for EfficientNet-Lite, as its weights were trained) and resized bilinearly as the
  official ``transforms.Resize``.
* **Modality**: RGB only (official ``mode='RGB'``). The official RGB-D and depth modes need MVTec
  3D-AD's depth maps and foreground masks, which vad's data sets do not have; they are left out,
  and with them the foreground masks of the losses and maps (the RGB mode uses none).
* **Batches**: the official training loader drops the last incomplete batch
  (``drop_last=True``); vad's loop trains on it too.
* **Flow code**: the official flow is an old copy of FrEIA's graph code; here it is built from
  FrEIA 0.2's ``PermuteRandom`` and ``GLOWCouplingBlock`` with the official soft clamp, which
  compute the same function (tested against a transcription of the official layers). The
  official couplings also clip their outputs to +-1e6, which only a diverged flow reaches;
  FrEIA's do not.
* **Post-processing**: vad smooths maps with a Gaussian (``--sigma``, default 4) and resizes
  them bilinearly to each image's size; the official code does neither (``--sigma 0`` gives its
  maps). Image scores come from the unsmoothed map, as official.
* ``max_steps`` counts the steps of both phases together.

Mixed precision: the teacher always runs in float32 (``vad_flows.coupling.run_flow``); with
``mixed_precision`` on CUDA only the student's convolutions use bfloat16 autocast (its loss is
taken in float32). The official code trains in float32.
"""

from __future__ import annotations

import itertools
from typing import Any, Literal

import torch
from torch import nn

from vad.contracts import Backbone, DetectorFeatures, Prediction, Preprocessing, State
from vad.errors import VadError
from vad.features import network_backbone
from vad.options import option
from vad.training import TrainedDetector, train
from vad_ast.network import AstModel, LayerOutput, student_loss, teacher_loss

#: The official EfficientNet-B5 layer (block 35) ends the sixth of seven stages; in timm's
#: EfficientNets (seven stage modules ``blocks.0`` ... ``blocks.6``) that stage is ``blocks.5``.
EFFICIENTNET_LAYER = "blocks.5"
#: Images per forward pass when extracting the training features.
CHUNK = 8


class TrainingPhases:
    """Which network trains in the epoch that starts now: the teacher during the first
    ``teacher_epochs`` epochs, then the student. Stepped by the shared loop after every epoch
    like a learning-rate schedule, so checkpoints save it and a resumed fit continues in the
    right phase; it also puts the teacher in eval mode once it is frozen."""

    def __init__(self, model: AstModel, teacher_epochs: int) -> None:
        self.model = model
        self.teacher_epochs = teacher_epochs
        self.epoch = 0
        self.apply()

    @property
    def trains_teacher(self) -> bool:
        """True during the teacher phase."""
        return self.epoch < self.teacher_epochs

    def apply(self) -> None:
        """The teacher trains in its phase and is frozen (eval mode) in the student's."""
        self.model.teacher.train(self.trains_teacher)

    def step(self) -> None:
        """One epoch finished."""
        self.epoch += 1
        self.apply()

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "teacher_epochs": self.teacher_epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.teacher_epochs = int(state["teacher_epochs"])
        self.apply()


class Ast(TrainedDetector):
    """AST: a convolutional student regressing a normalizing-flow teacher's latent maps."""

    name = "ast"
    input = "images"
    produces_maps = True
    #: The positional encoding is built for the feature grid of ``image_size``.
    fixed_input_size = True

    class Options(TrainedDetector.Options):
        backbone: str = option("tf_efficientnet_lite0", "Frozen feature extractor, a backbone spec with a timm network (official EfficientNet-B5; deviation: EfficientNet-Lite0, whose weights ship offline).")
        pretrained: bool = option(True, "Extractor with pretrained weights (official: ImageNet); false: a random extractor, for tests only (scores are not meaningful).")
        weights: str | None = option(None, "A local weights file (.safetensors or .pth, a timm state dict) for the extractor instead of the packaged or hub weights.")
        layer: str | None = option(None, "Extractor module whose output teacher and student read; null: blocks.5 on EfficientNets (end of the sixth stage, stride 32: official B5 block 35), else the deepest feature map.")
        image_size: int = option(768, "Square input side in pixels (official 768: a 24 x 24 grid at stride 32); a multiple of 32.", ge=32, multiple_of=32)
        epochs: int = option(72, "Epochs of each phase: the teacher trains this many, then the student as many (official meta_epochs x sub_epochs = 3 x 24 = 72 each).", ge=1)
        teacher_epochs: int | None = option(None, "Epochs of the teacher phase when they should differ from epochs; null: epochs (official 72).", ge=1)
        batch_size: int = option(8, "Training images per Adam step, reshuffled every epoch (official 8).", ge=1)
        lr: float = option(2e-4, "Adam learning rate of teacher and student (official 2e-4, constant).", gt=0)
        weight_decay: float = option(1e-5, "Adam weight decay of teacher and student (official 1e-5).", ge=0)
        coupling_blocks: int = option(4, "Coupling blocks of the teacher flow (official n_coupling_blocks 4); kernels 3, the last 5.", ge=1)
        clamp: float = option(1.9, "Soft clamp of the couplings' log-scales, clamp * 0.636 * atan(s / clamp) (official 1.9).", gt=0)
        teacher_hidden: int = option(64, "Hidden channels of the couplings' subnetworks (official channels_hidden_teacher 64).", ge=1)
        student_hidden: int = option(1024, "Hidden channels of the student (official channels_hidden_student 1024).", ge=1)
        student_blocks: int = option(4, "Residual blocks of the student (official n_st_blocks 4).", ge=0)
        pos_enc_dim: int = option(32, "Channels of the 2-D sine/cosine positional encoding both networks read (official 32); 0: none (official pos_enc=False).", ge=0, multiple_of=4)
        score: Literal["mean", "max"] = option("mean", "Image score: mean of the map (official 'mean over maps') or maximum of the bicubically upsampled map ('max over maps').")

    tiny_options = {
        "pretrained": False, "layer": "blocks.2", "image_size": 64, "epochs": 1, "batch_size": 4,
        "coupling_blocks": 2, "teacher_hidden": 8, "student_hidden": 16, "student_blocks": 1, "pos_enc_dim": 8,
    }
    #: No claim: the kit's extractor is a random EfficientNet-Lite0 (the packaged weights are an
    #: optional install), so its ranking says nothing about AST.
    tiny_image_auroc = None

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._skeleton: Backbone | None = None
        self._extractor: LayerOutput | None = None
        self._phases: TrainingPhases | None = None
        self._training_features = False
        self._feature_shape: tuple[int, int, int] | None = None

    # ------------------------------------------------------------------ the extractor

    def _backbone(self, pretrained: bool) -> Backbone:
        """The backbone spec built as a vad Backbone (weights only when ``pretrained``)."""
        return network_backbone(
            self.options.backbone, pretrained=pretrained, weights=self.options.weights, owner="ast",
            purpose="no layer can be read from it", examples="tf_efficientnet_lite0 or resnet18",
        )

    @property
    def skeleton(self) -> Backbone:
        """A randomly initialised build of the backbone (its preprocessing and modules), made once."""
        if self._skeleton is None:
            self._skeleton = self._backbone(pretrained=False)
        return self._skeleton

    @property
    def layer(self) -> str:
        """The module whose output is the feature map; ``layer=null`` is resolved on first use
        (``blocks.5`` on seven-stage EfficientNets, else the deepest feature map) and written
        back into the hyper-parameters. A position among the feature maps (``"3"``) names that map."""
        network = self.skeleton.model
        modules = dict(network.named_modules())
        if self.options.layer is None:
            blocks = getattr(network, "blocks", None)
            chosen = EFFICIENTNET_LAYER if isinstance(blocks, nn.Sequential) and len(blocks) == 7 else self.skeleton.feature_info()[-1].name
            self.options = self.options.replace(layer=chosen)
        layer = self.options.layer
        if layer in modules and layer:
            return layer
        try:
            return self.skeleton.resolve_layer(layer)
        except VadError:
            offered = ", ".join(f"{f.name} (stride {f.stride}, {f.channels} ch)" for f in self.skeleton.feature_info())
            raise VadError(f"ast: backbone {self.options.backbone!r} has no module {layer!r}; name one of its modules (e.g. blocks.5) or feature maps: {offered}") from None

    def _extractor_module(self, backbone: Backbone) -> LayerOutput:
        return LayerOutput(backbone.model, self.layer)

    def feature_shape(self) -> tuple[int, int, int]:
        """``(C, h, w)`` of the feature map at ``image_size``: from the fitted networks' input
        facts, else from one pass of the random skeleton."""
        if self.input_meta:
            return int(self.input_meta["channels"]), *(int(v) for v in self.input_meta["grid"])
        if self._feature_shape is None:
            size = self.options.image_size
            with torch.no_grad():
                shape = self._extractor_module(self.skeleton)(torch.zeros(1, 3, size, size)).shape
            self._feature_shape = (int(shape[1]), int(shape[2]), int(shape[3]))
        return self._feature_shape

    # ------------------------------------------------------------------ contract

    @property
    def preprocessing(self) -> Preprocessing:  # type: ignore[override]
        """Square ``image_size`` inputs, bilinear resize (official ``transforms.Resize``), the backbone's mean and std."""
        size, own = self.options.image_size, self.skeleton.preprocessing
        return Preprocessing(size=(size, size), mean=own.mean, std=own.std, interpolation="bilinear")

    def check_batch(self, batch: Any, where: str) -> torch.Tensor:
        """Image batches as every image detector; inside :meth:`fit` the shared loop gets the
        extracted training features instead, which fit made itself."""
        if where == "fit" and self._training_features:
            return batch.to(self.device, torch.float32)
        return super().check_batch(batch, where)

    # ------------------------------------------------------------------ training

    def fit(self, batches: Any) -> None:
        """Extract the training images' features once, then train teacher and student on them
        through the shared loop (``teacher_epochs + epochs`` epochs)."""
        from vad.progress import warn

        iterator = iter(batches)
        first = next(iterator, None)
        if first is None:
            raise VadError(f"{self.describe_owner()} got an empty training set: it needs normal training images")
        first = self.check_batch(first, "fit")  # a bad batch is refused before any weights load
        if not self.options.pretrained:
            warn("ast: the feature extractor is RANDOMLY INITIALISED (pretrained=false): scores are not meaningful")
        extractor = self._extractor_module(self._backbone(pretrained=self.options.pretrained)).to(self.device).eval()
        pieces = []
        with torch.no_grad():
            for batch in itertools.chain([first], iterator):
                pieces += [extractor(chunk).float() for chunk in self.check_batch(batch, "fit").split(CHUNK)]
        features = torch.cat(pieces)
        del pieces
        declared = self.options
        teacher_epochs = declared.teacher_epochs if declared.teacher_epochs is not None else declared.epochs
        self.options = declared.replace(epochs=teacher_epochs + declared.epochs, teacher_epochs=teacher_epochs)
        self._extractor, self._training_features = extractor, True
        try:
            train(self, [features])
        finally:
            self.options, self._extractor, self._phases, self._training_features = declared, None, None, False

    def describe_input(self, first: torch.Tensor) -> dict[str, Any]:
        """The feature map's channels and grid (the flow and the student are built for them)."""
        return {"channels": int(first.shape[1]), "grid": [int(first.shape[2]), int(first.shape[3])]}

    def build(self, input_meta: dict[str, Any]) -> dict[str, nn.Module]:
        """Extractor (randomly initialised: :meth:`before_training` or ``load_state`` gives it its
        weights), teacher flow and student, initialised from ``seed`` (PyTorch's defaults, as
        official; the flow's permutations are the official fixed ones); the global random state
        is left as it was."""
        o = self.options
        channels, grid = int(input_meta["channels"]), (int(input_meta["grid"][0]), int(input_meta["grid"][1]))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(o.seed)
            extractor = self._extractor_module(self._backbone(pretrained=False))
            model = AstModel(
                extractor, channels, grid, coupling_blocks=o.coupling_blocks, clamp=o.clamp, teacher_hidden=o.teacher_hidden,
                student_hidden=o.student_hidden, student_blocks=o.student_blocks, pos_enc_dim=o.pos_enc_dim,
                map_size=(o.image_size // 4, o.image_size // 4), score=o.score,
            )
        return {"model": model}

    def minibatch(self) -> int:
        """The official loader's batch size, reshuffled every epoch."""
        return self.options.batch_size

    def before_training(self) -> None:
        """Give the extractor the weights the features were extracted with (a resumed fit's
        come with the checkpoint)."""
        assert self._extractor is not None, "ast trains through fit()"
        if not self.resuming:
            self.networks["model"].extractor.load_state_dict(self._extractor.state_dict())

    def optimizers(self) -> tuple[list[torch.optim.Optimizer], list[Any]]:
        """One Adam per network (official lr 2e-4, eps 1e-8, weight decay 1e-5) and the phase
        schedule (:class:`TrainingPhases`)."""
        o, model = self.options, self.networks["model"]
        teacher = torch.optim.Adam([p for p in model.teacher.parameters() if p.requires_grad], lr=o.lr, eps=1e-8, weight_decay=o.weight_decay)
        student = torch.optim.Adam(model.student.parameters(), lr=o.lr, eps=1e-8, weight_decay=o.weight_decay)
        self._phases = TrainingPhases(model, o.teacher_epochs)
        return [teacher, student], [self._phases]

    def training_step(self, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Teacher phase: the flow's negative log-likelihood per position; student phase: the
        squared distance to the frozen teacher's outputs (both in float32)."""
        assert self._phases is not None, "ast trains through fit()"
        model = self.networks["model"]
        features = batch.float()
        if self._phases.trains_teacher:
            z, log_jac_det = model.teacher_latents(features)
            return teacher_loss(z, log_jac_det)
        with torch.no_grad():
            target, _ = model.teacher_latents(features)
        return student_loss(target, model.student_latents(features).float())

    # ------------------------------------------------------------------ state

    def load_state(self, state: State) -> None:
        """Rebuild the networks for the saved feature facts and load their weights."""
        facts = state.meta.get("input") or {}
        if "channels" not in facts or "grid" not in facts:
            raise VadError(f"the saved {self.describe_owner()} state has no feature facts (input channels and grid): it is not an AST model")
        super().load_state(state)

    # ------------------------------------------------------------------ prediction

    def predict(self, batch: torch.Tensor) -> Prediction:
        """Maps ``[B, image_size / 4, image_size / 4]`` and image scores ``[B]`` (``score``)."""
        return self.scored_by(self.export_module(), batch)

    def export_module(self) -> nn.Module:
        """Extractor, teacher and student: ``images -> (scores, maps)`` (eval mode)."""
        self.require_fitted()
        return self.networks["model"].eval()

    # ------------------------------------------------------------------ features

    def feature_source(self, **options: Any) -> AstFeatures:
        """The student-teacher differences (or the student's outputs) as a FeatureSource."""
        return AstFeatures(self, **options)


class AstFeatures(DetectorFeatures):
    """AST's features as patch features (``--backbone detector:ast``).

    Cut point: the teacher's and student's outputs on the extractor's grid (stride 32 for the
    default layer). ``output=difference`` (default) gives ``z_t - z_s``, whose mean square over
    the channels is AST's anomaly map before upsampling; ``output=student`` gives the student's
    regression ``z_s`` of the teacher's latents. Either has the extractor's channels.
    Preprocessing is the detector's.
    """

    name = "ast-features"

    class Options(DetectorFeatures.Options):
        output: Literal["difference", "student"] = option("difference", "difference: teacher minus student outputs (the anomaly vectors); student: the student's outputs.")

    @property
    def out_channels(self) -> int:
        """The extractor's channels (the flow keeps the dimension)."""
        return self.detector.feature_shape()[0]

    def grid_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """The extractor's grid at the detector's ``image_size``."""
        _, height, width = self.detector.feature_shape()
        return (height, width)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        detector = self.detector
        detector.require_fitted()
        images = detector.check_batch(images, "features")
        with torch.no_grad():
            teacher, student = detector.networks["model"].eval().latents(images)
        return teacher - student if self.options.output == "difference" else student


__all__ = ["Ast", "AstFeatures", "TrainingPhases"]
