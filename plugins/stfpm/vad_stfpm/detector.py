"""STFPM as a vad image detector (``--detector stfpm``) and its features as a FeatureSource.

Training follows the official code (github.com/gdwang08/STFPM, ``main.py``): the teacher is a
pretrained network, frozen and in eval mode; the student has the same architecture, randomly
initialised and trained from scratch (train mode) to match the teacher's L2-normalised feature
maps at three pyramid levels, with SGD (lr 0.4, momentum 0.9, weight decay 1e-4) for 100 epochs
on shuffled batches of 32 images of 256 x 256 px, ImageNet-normalised. Prediction follows the
paper (eq. 4) and anomalib: the anomaly map is the product over the levels of
``1/2 ||F^_t - F^_s||^2`` upsampled bilinearly to the input size; the image score is its maximum.
The formulas are in :mod:`vad_stfpm.network`.

Every option's description gives the official value (``vad list detectors --details``).

Deviations (each also noted where it happens):

* **Backbone**: the paper's ResNet-18 needs ImageNet weights from the hub, which cannot be
  downloaded here, so the default is ``tf_efficientnet_lite0`` (weights packaged offline). Its
  levels at the paper's strides 4, 8 and 16 (ResNet-18 ``layer1``, ``layer2``, ``layer3``, the
  paper's conv2-conv4) are ``blocks.1`` (24 channels), ``blocks.2`` (40) and ``blocks.4``
  (112), the last block of each stage at that stride; ``layers=null`` picks the levels at those
  strides for any backbone. ``backbone=resnet18`` gives the paper's network (with
  ``weights=<file>`` offline, or ``pretrained=false`` for a random teacher in tests). Inputs are
  normalised with the backbone's own mean and std (ImageNet for ResNet-18, as official; 0.5 / 0.5
  for EfficientNet-Lite, as its weights were trained) and resized bilinearly as the official
  ``transforms.Resize``.
* **Model selection**: the official script trains on 80 % of the training images and keeps the
  epoch with the lowest mean anomaly map on the other 20 % (normal images, no test labels). vad's
  shared loop (:mod:`vad.training`) trains on every training image and keeps the weights after
  the last epoch.
* **Map resolution**: the official ``test()`` multiplies the level maps at the stride-4 grid
  (64 x 64 for 256 px) and then resizes to 256 px; here, as in the paper and anomalib, each level
  map is upsampled to the input size before the product.
* **Post-processing**: vad smooths maps with a Gaussian (``--sigma``, default 4) as for every
  detector; neither the official code nor anomalib smooths STFPM maps: ``--sigma 0`` gives the
  official maps. Image scores are the raw map maximum, before smoothing, as official.
* **Loss reduction**: ``loss_reduction=official`` (default) is ``main.py``'s loss; ``anomalib``
  is anomalib's, whose SGD steps are B/2 times larger (anomalib also uses weight decay 1e-3:
  ``weight_decay=0.001`` reproduces it); see :mod:`vad_stfpm.network`.

Training runs through vad's shared loop: the images are held in memory and reshuffled every
epoch into ``batch_size`` batches as the official loader (``shuffle=True, drop_last=False``), and
``vad run`` checkpoints and resumes it. The model folder stores both networks, so a saved model
reloads without the teacher's weights file or the hub.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from vad.contracts import Backbone, DetectorFeatures, Prediction, Preprocessing
from vad.errors import VadError
from vad.features import layers_at_strides, network_backbone
from vad.options import option
from vad.training import TrainedDetector
from vad_stfpm.network import LossReduction, StudentTeacher, normalized_differences, stfpm_loss

#: The strides of the paper's pyramid levels (ResNet-18 conv2_x, conv3_x, conv4_x).
PAPER_STRIDES = (4, 8, 16)


class Stfpm(TrainedDetector):
    """STFPM: a student trained from scratch to match a frozen teacher's feature pyramid."""

    name = "stfpm"
    input = "images"
    produces_maps = True

    class Options(TrainedDetector.Options):
        backbone: str = option("tf_efficientnet_lite0", "Teacher and student architecture, a backbone spec with a timm network (official resnet18; deviation: EfficientNet-Lite0, whose weights ship offline).")
        pretrained: bool = option(True, "Teacher with pretrained weights (official: ImageNet); false: a random teacher, for tests only (scores are not meaningful).")
        weights: str | None = option(None, "A local weights file (.safetensors or .pth, a timm state dict) for the teacher instead of the packaged or hub weights.")
        layers: list[str] | None = option(None, "Pyramid levels matched (backbone layer names or positions); null: those at strides 4, 8, 16 (official resnet18 layer1-3; lite0 blocks.1, blocks.2, blocks.4).")
        image_size: int = option(256, "Square input side in pixels (official 256).", ge=32)
        epochs: int = option(100, "Passes over the training images (official 100).", ge=1)
        batch_size: int = option(32, "Training images per SGD step, reshuffled every epoch (official 32).", ge=1)
        lr: float = option(0.4, "SGD learning rate of the student (official 0.4, constant).", gt=0)
        momentum: float = option(0.9, "SGD momentum (official 0.9).", ge=0, lt=1)
        weight_decay: float = option(1e-4, "SGD weight decay (official 1e-4; anomalib 1e-3).", ge=0)
        loss_reduction: Literal["official", "anomalib"] = option("official", "official: 2 x the batch mean of the paper's per-image loss (main.py); anomalib: its batch sum (STFPMLoss).")

        def check(self) -> None:
            if self.layers is not None and (not self.layers or len(set(self.layers)) != len(self.layers)):
                raise self.invalid("layers", "null or a non-empty list of distinct backbone layers such as ['layer1', 'layer2', 'layer3']")

    tiny_options = {"backbone": "resnet18", "pretrained": False, "image_size": 64, "epochs": 1, "batch_size": 8}
    #: No claim: offline the kit's teacher is a random ResNet-18, so its ranking says nothing about STFPM.
    tiny_image_auroc = None

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._skeleton: Backbone | None = None

    # ------------------------------------------------------------------ the backbone

    def _backbone(self, pretrained: bool) -> Backbone:
        """The backbone spec built as a vad Backbone (weights only when ``pretrained``): a
        registered name, or ``family:model`` such as ``timm:resnet34`` (as ``--backbone``)."""
        return network_backbone(
            self.options.backbone, pretrained=pretrained, weights=self.options.weights, owner="stfpm",
            purpose="no student can be trained against it", examples="resnet18 or tf_efficientnet_lite0",
        )

    @property
    def skeleton(self) -> Backbone:
        """A randomly initialised build of the backbone (its preprocessing and levels), made once."""
        if self._skeleton is None:
            self._skeleton = self._backbone(pretrained=False)
        return self._skeleton

    @property
    def layers(self) -> list[str]:
        """The matched levels' names; ``layers=null`` is resolved to the levels at strides 4, 8, 16
        on first use and written back into the hyper-parameters."""
        if self.options.layers is None:
            levels = layers_at_strides(self.skeleton, PAPER_STRIDES, self.name)
            self.options = self.options.replace(layers=[level.name for level in levels])
        names = [self.skeleton.resolve_layer(layer) for layer in self.options.layers]
        if len(set(names)) != len(names):
            raise VadError(f"stfpm: layers {list(self.options.layers)} name the same level twice ({names})")
        return names

    def _positions(self, layers: Sequence[str]) -> list[int]:
        """The positions of ``layers`` among the backbone's feature maps."""
        names = [info.name for info in self.skeleton.feature_info()]
        return [names.index(layer) for layer in layers]

    def channels(self, layers: Sequence[str]) -> list[int]:
        """The channels of the named levels."""
        widths = {info.name: info.channels for info in self.skeleton.feature_info()}
        return [widths[layer] for layer in layers]

    # ------------------------------------------------------------------ contract

    @property
    def preprocessing(self) -> Preprocessing:  # type: ignore[override]
        """Square ``image_size`` inputs, bilinear resize (official ``transforms.Resize``), the backbone's mean and std."""
        size, own = self.options.image_size, self.skeleton.preprocessing
        return Preprocessing(size=(size, size), mean=own.mean, std=own.std, interpolation="bilinear")

    # ------------------------------------------------------------------ training

    def build(self, input_meta: dict[str, Any]) -> dict[str, nn.Module]:
        """Teacher and student, both randomly initialised from ``seed`` (timm's initialisation, as
        torchvision's for ResNet); :meth:`before_training` gives the teacher its weights, and
        ``load_state`` restores both. The global random state is left as it was."""
        positions = self._positions(self.layers)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.options.seed)
            teacher = self._backbone(pretrained=False).model
            student = self._backbone(pretrained=False).model
        return {"model": StudentTeacher(teacher, student, positions)}

    def minibatch(self) -> int:
        """The official loader's batch size, reshuffled every epoch."""
        return self.options.batch_size

    def before_training(self) -> None:
        """Load the teacher's pretrained weights (packaged, hub or ``weights`` file)."""
        model = self.networks["model"]
        if not self.options.pretrained:
            from vad.progress import warn

            warn("stfpm: the teacher is RANDOMLY INITIALISED (pretrained=false): scores are not meaningful")
            return
        model.teacher.load_state_dict(self._backbone(pretrained=True).model.state_dict())

    def optimizers(self) -> tuple[list[torch.optim.Optimizer], list[Any]]:
        """SGD over the student's parameters (official: lr 0.4, momentum 0.9, weight decay 1e-4, no schedule)."""
        options = self.options
        student = self.networks["model"].student
        return [torch.optim.SGD(student.parameters(), lr=options.lr, momentum=options.momentum, weight_decay=options.weight_decay)], []

    def training_step(self, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The STFPM loss of one batch (in float32, also under autocast)."""
        teacher, student = self.networks["model"].features(batch)
        reduction: LossReduction = self.options.loss_reduction
        return stfpm_loss([t.float() for t in teacher], [s.float() for s in student], reduction)

    # ------------------------------------------------------------------ prediction

    def predict(self, batch: torch.Tensor) -> Prediction:
        """Maps ``[B, H, W]`` at the input size and image scores ``[B]`` (map maximum)."""
        return self.scored_by(self.export_module(), batch)

    def export_module(self) -> nn.Module:
        """The teacher-student pair: ``images -> (scores, maps)`` (in eval mode: exporters restore
        the mode they found after tracing)."""
        self.require_fitted()
        return self.networks["model"].eval()

    # ------------------------------------------------------------------ features

    def feature_source(self, **options: Any) -> StfpmFeatures:
        """The teacher-student discrepancy (or the student's features) as a FeatureSource."""
        return StfpmFeatures(self, **options)


class StfpmFeatures(DetectorFeatures):
    """STFPM's features as patch features (``--backbone detector:stfpm``).

    Cut point: the matched pyramid levels, channel-wise L2-normalised. ``output=difference``
    (default) gives ``F^_t - F^_s`` per level, the vectors whose half squared norm is STFPM's
    per-level anomaly map (near 0 where the student learned to follow the teacher);
    ``output=student`` gives the student's normalised features ``F^_s``. The chosen levels are
    resized bilinearly to the grid of the first one and concatenated along the channels.
    Preprocessing is the detector's.
    """

    name = "stfpm-features"

    class Options(DetectorFeatures.Options):
        layers: list[str] | None = option(None, "Levels to expose, among the detector's matched layers; null: all of them.")
        output: Literal["difference", "student"] = option("difference", "difference: teacher minus student normalised features (the anomaly vectors); student: the student's normalised features.")

        def check(self) -> None:
            if self.layers is not None and not self.layers:
                raise self.invalid("layers", "null or a non-empty list of the detector's layers")

    @property
    def exposed(self) -> list[str]:
        """The exposed levels (checked against the detector's matched ones)."""
        matched = self.detector.layers
        chosen = list(self.options.layers) if self.options.layers is not None else matched
        unknown = [layer for layer in chosen if layer not in matched]
        if unknown:
            raise VadError(f"stfpm-features: layers {unknown} are not among the detector's matched layers {matched}")
        return chosen

    @property
    def out_channels(self) -> int:
        """Sum of the exposed levels' channels."""
        return sum(self.detector.channels(self.exposed))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Features ``[B, out_channels, h, w]`` on the first exposed level's grid."""
        detector = self.detector
        detector.require_fitted()
        images = detector.check_batch(images, "features")
        matched, exposed = detector.layers, self.exposed
        with torch.no_grad():
            teacher, student = detector.networks["model"].eval().features(images)
            if self.options.output == "difference":
                levels = normalized_differences(teacher, student)
            else:
                levels = [F.normalize(s, dim=1) for s in student]
            chosen = [levels[matched.index(layer)] for layer in exposed]
            grid = chosen[0].shape[-2:]
            resized = [c if c.shape[-2:] == grid else F.interpolate(c, size=grid, mode="bilinear", align_corners=False) for c in chosen]
            return torch.cat(resized, dim=1)
