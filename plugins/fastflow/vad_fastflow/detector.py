"""FastFlow as a vad image detector (``--detector fastflow``) and its latent maps as a FeatureSource.

Yu et al., "FastFlow: Unsupervised Anomaly Detection and Localization via 2D Normalizing Flows",
arXiv 2111.07677 (2021). The authors released no code; this follows the paper and the reference
implementation that the community and anomalib use, github.com/gathierry/FastFlow (``fastflow.py``,
``main.py``, ``constants.py``, ``dataset.py``, ``configs/*.yaml``); anomalib 2.7 follows it too.

Training, as the reference ``main.py``: the backbone is frozen (eval mode, no gradients); its
levels at strides 4, 8 and 16 (ResNet ``layer1``-``layer3``, the reference's
``out_indices=[1, 2, 3]``) each pass a trainable ``LayerNorm([C, h, w])`` and their own 2D flow
(:mod:`vad_fastflow.network`); Adam (lr 1e-3, weight decay 1e-5) minimises the summed per-scale
negative log-likelihood on shuffled batches of 32 images of 256 x 256 px for 500 epochs. The
flows: 8 steps and hidden ratio 1.0 (the reference's ResNet-18 and WideResNet-50 configs; the
paper's CaiT and DeiT use 20 steps and 0.16), affine clamp 2.0, subnetwork kernels alternating
3 x 3 and 1 x 1, or 3 x 3 only (``conv3x3_only``: the reference's ``resnet18.yaml``).

Prediction, as the reference's ``forward`` in eval mode: minus the per-position probability
``exp(-mean_c z^2 / 2)`` upsampled to the input size and averaged over the scales; the image score
is the maximum of that map (anomalib; the reference evaluates pixels only).

Every option's description gives the paper's or reference's value (``vad list detectors --details``).

Deviations (each also noted where it happens):

* **Backbone**: the paper's ResNet-18 / WideResNet-50-2 need ImageNet weights from the hub, which
  cannot be downloaded here, so the default is ``tf_efficientnet_lite0`` (weights packaged
  offline) at its levels at strides 4, 8 and 16: ``blocks.1`` (24 channels), ``blocks.2`` (40)
  and ``blocks.4`` (112); ``layers=null`` picks the levels at those strides for any backbone.
  ``backbone=resnet18`` or ``wide_resnet50_2`` (with ``weights=<file>`` offline) gives the
  paper's CNN set-up. Inputs are normalised with the backbone's own mean and std (ImageNet for
  ResNets, as the reference's ``dataset.py``; 0.5 / 0.5 for EfficientNet-Lite, as its weights
  were trained) and resized bilinearly (the reference's ``transforms.Resize``).
* **Vision transformers**: the paper's CaiT / DeiT path (one stride-16 map after block 40 / 7,
  passed through the transformer's pretrained final norm instead of a trainable LayerNorm) is not
  offered: vad's timm backbones return transformer blocks without that final norm. Any backbone
  levels can be named with ``layers``, but they get the CNN treatment (trainable LayerNorm).
* **Batches**: the reference loader drops the last incomplete batch (``drop_last=True``); vad's
  shared loop keeps it, so every training image is seen every epoch (with fewer than 32 images
  the reference would not train at all).
* **anomalib** (2.7) follows the reference except that its default ResNet-18 alternates 3 x 3 and
  1 x 1 kernels (``conv3x3_only=False``); ``conv3x3_only=null`` follows the reference's
  ``resnet18.yaml`` (3 x 3 only), ``false`` gives anomalib's.
* **Model selection**: the reference evaluates the test set every 10 epochs (its README reports
  both the last and the best epoch); here the weights after the last epoch are the model.
* **Post-processing**: vad smooths maps with a Gaussian (``--sigma``, default 4) as for every
  detector; neither the reference nor anomalib smooths FastFlow maps: ``--sigma 0`` gives their
  maps. Image scores are the raw map maximum, before smoothing.
* The backbone's weights are not saved with the model: like every vad backbone it is rebuilt from
  its options (packaged weights, the ``weights`` file, the hub cache; random weights are drawn
  from ``seed``, so a reloaded model predicts the same).

Mixed precision (``mixed_precision`` on CUDA) is sound: only the frozen backbone runs in
bfloat16; the LayerNorms run in float32 under autocast and the flows, loss and maps in float32
(:func:`vad_flows.coupling.run_flow`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vad.contracts import Backbone, DetectorFeatures, FeatureInfo, Prediction, Preprocessing
from vad.errors import VadError
from vad.features import FrozenLevels, MovesFrozenLevels
from vad.options import option
from vad.training import TrainedDetector
from vad_fastflow.network import FastFlowHead, FastFlowScorer, fastflow_loss

#: The strides of the paper's feature scales (ResNet layer1, layer2, layer3).
PAPER_STRIDES = (4, 8, 16)
#: The backbone whose reference config uses 3 x 3 kernels at every step (``configs/resnet18.yaml``).
CONV3X3_ONLY_BACKBONES = ("resnet18",)


def backbone_architecture(spec: str) -> str:
    """The timm architecture a backbone spec names: ``timm:resnet18.a1_in1k`` -> ``resnet18``."""
    return spec.rpartition(":")[2].partition(".")[0]


class FastFlow(MovesFrozenLevels, TrainedDetector):
    """FastFlow: a LayerNorm and a 2D normalizing flow per frozen backbone scale."""

    name = "fastflow"
    input = "images"
    produces_maps = True
    #: The LayerNorms are built for the feature maps of ``image_size`` inputs (as the reference).
    fixed_input_size = True

    class Options(TrainedDetector.Options):
        backbone: str = option("tf_efficientnet_lite0", "Frozen pretrained backbone, a vad backbone name or timm:MODEL (paper: resnet18, wide_resnet50_2, CaiT, DeiT; deviation: EfficientNet-Lite0, whose weights ship offline).")
        pretrained: bool = option(True, "Load the backbone's pretrained weights (packaged, weights file or hub cache); false: random weights drawn from seed, for tests only (scores are not meaningful).")
        weights: str | None = option(None, "A local weights file for the backbone (.safetensors or .pth, timm key names) instead of the packaged or hub weights.")
        layers: list[str] | None = option(None, "Backbone levels, one flow each (names or positions); null: those at strides 4, 8, 16 (paper: ResNet layer1-3; lite0: blocks.1, blocks.2, blocks.4).")
        image_size: int = option(256, "Square input side in pixels (paper 256 for the CNNs).", ge=32)
        flow_steps: int = option(8, "Coupling steps per flow (paper 8 for ResNet-18 and WideResNet-50; 20 for CaiT and DeiT).", ge=1)
        hidden_ratio: float = option(1.0, "Hidden channels of the coupling subnetworks per input channel (paper 1.0 for the ResNets; 0.16 for CaiT and DeiT).", gt=0)
        conv3x3_only: bool | None = option(None, "3x3 kernels at every step instead of alternating 3x3 and 1x1; null: true for resnet18 (reference resnet18.yaml; anomalib: false), else false (the paper's alternation).")
        clamp: float = option(2.0, "Affine clamping of the couplings' log-scales (reference 2.0).", gt=0)
        epochs: int = option(500, "Passes over the training images (reference 500).", ge=1)
        batch_size: int = option(32, "Training images per Adam step, reshuffled every epoch (reference 32; its last incomplete batch is dropped, here kept).", ge=1)
        lr: float = option(1e-3, "Adam learning rate (reference 1e-3, constant).", gt=0)
        weight_decay: float = option(1e-5, "Adam weight decay (reference 1e-5).", ge=0)

        def check(self) -> None:
            if self.layers is not None and (not self.layers or len(set(self.layers)) != len(self.layers)):
                raise self.invalid("layers", "null or a non-empty list of distinct backbone layers such as ['layer1', 'layer2', 'layer3']")

    tiny_options = {"image_size": 64, "epochs": 3, "batch_size": 4}
    #: Three epochs from a pretrained EfficientNet-Lite0 on the tiny data set (measured 1.0, seeds 0-3).
    tiny_image_auroc = 0.8

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        if self.options.conv3x3_only is None:
            resolved = backbone_architecture(self.options.backbone) in CONV3X3_ONLY_BACKBONES
            self.options = self.options.replace(conv3x3_only=resolved)
        options = self.options
        self.frozen = FrozenLevels(
            options.backbone, pretrained=options.pretrained, weights=options.weights, layers=options.layers, strides=PAPER_STRIDES, seed=options.seed, owner=self.name
        )
        self._shapes: list[list[int]] | None = None

    # ------------------------------------------------------------------ the backbone

    @property
    def backbone(self) -> Backbone:
        """The frozen backbone, built on first use (random weights drawn from ``seed``); the
        resolved ``layers`` are written back into the options."""
        backbone = self.frozen.backbone
        if self.options.layers is None or list(self.options.layers) != self.frozen.names:
            self.options = self.options.replace(layers=self.frozen.names)
        return backbone

    @property
    def levels(self) -> list[FeatureInfo]:
        """The backbone levels with a flow each (name, stride, channels), shallow to deep."""
        self.backbone
        return self.frozen.levels

    def level_shapes(self) -> list[list[int]]:
        """``[C, h, w]`` of each level for ``image_size`` inputs (measured once on a blank image)."""
        if self._shapes is None:
            size = self.options.image_size
            probe = torch.zeros(1, 3, size, size, device=self.device)
            self._shapes = [list(level.shape[1:]) for level in self.encode(probe)]
        return [list(shape) for shape in self._shapes]

    def encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The backbone's levels for ``images`` (frozen, no gradient)."""
        return self.frozen.encode(images)

    # ------------------------------------------------------------------ contract

    @property
    def preprocessing(self) -> Preprocessing:  # type: ignore[override]
        """Square ``image_size`` inputs, bilinear resize (reference ``transforms.Resize``), the backbone's mean and std."""
        self.backbone
        return self.frozen.preprocessing(self.options.image_size)

    # ------------------------------------------------------------------ training

    def describe_input(self, first: torch.Tensor) -> dict[str, Any]:
        """The levels and their ``[C, h, w]``, which the LayerNorms and flows are built for."""
        return {"layers": [level.name for level in self.levels], "shapes": self.level_shapes()}

    def build(self, input_meta: dict[str, Any]) -> dict[str, nn.Module]:
        """A fresh head (LayerNorm and flow per level) initialised from ``seed``, without
        touching the global random state; saved levels that the options do not give are refused."""
        expected = {"layers": [level.name for level in self.levels], "shapes": self.level_shapes()}
        saved = {key: input_meta.get(key, value) for key, value in expected.items()}
        if saved != expected:
            raise VadError(
                f"the saved fastflow head was trained on backbone levels {saved['layers']} of shapes {saved['shapes']}, "
                f"but backbone {self.options.backbone!r} at image_size {self.options.image_size} gives {expected['layers']} "
                f"of shapes {expected['shapes']}: load it with the options it was trained with"
            )
        options = self.options
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(options.seed)
            head = FastFlowHead(expected["shapes"], options.flow_steps, options.hidden_ratio, bool(options.conv3x3_only), options.clamp, options.seed)
        return {"head": head}

    def minibatch(self) -> int:
        """The reference loader's batch size, reshuffled every epoch."""
        return self.options.batch_size

    def optimizers(self) -> tuple[list[torch.optim.Optimizer], list[Any]]:
        """Adam over the LayerNorms and flows (reference lr 1e-3, weight decay 1e-5, no schedule)."""
        head = self.networks["head"]
        return [torch.optim.Adam(head.parameters(), lr=self.options.lr, weight_decay=self.options.weight_decay)], []

    def training_step(self, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The summed per-scale negative log-likelihood of one batch (float32)."""
        latents, log_jac_dets = self.networks["head"].latents(self.encode(batch))
        return fastflow_loss(latents, log_jac_dets)

    # ------------------------------------------------------------------ prediction

    def predict(self, batch: torch.Tensor) -> Prediction:
        """Maps ``[B, H, W]`` at the input size (in ``[-1, 0]``) and image scores ``[B]`` (map maximum)."""
        return self.scored_by(self.export_module(), batch)

    def export_module(self) -> nn.Module:
        """``images -> (scores, maps)``: backbone, LayerNorms, flows, map, score; traceable for ONNX."""
        self.require_fitted()
        return FastFlowScorer(self.encode, self.networks["head"]).eval()

    # ------------------------------------------------------------------ features

    def feature_source(self, **options: Any) -> FastFlowFeatures:
        """The flows' latent maps as a FeatureSource."""
        return FastFlowFeatures(self, **options)


class FastFlowFeatures(DetectorFeatures):
    """FastFlow's latent maps as patch features (``--backbone detector:fastflow``).

    Cut point: each flow's output ``z`` (``[B, C_l, h_l, w_l]``, the backbone level's channels and
    grid), where normal features are standard normal and ``mean_c z^2`` is what the anomaly map
    turns into a probability. The chosen levels are resized bilinearly to the grid of the first
    and concatenated along the channels. Preprocessing is the detector's.
    """

    name = "fastflow-features"

    class Options(DetectorFeatures.Options):
        layers: list[str] | None = option(None, "Levels whose latent maps are exposed, among the detector's; null: all of them.")

        def check(self) -> None:
            if self.layers is not None and (not self.layers or len(set(self.layers)) != len(self.layers)):
                raise self.invalid("layers", "null or a non-empty list of distinct levels of the detector")

    @property
    def exposed(self) -> list[str]:
        """The exposed levels (checked against the detector's)."""
        names = [level.name for level in self.detector.levels]
        chosen = list(self.options.layers) if self.options.layers is not None else names
        unknown = [layer for layer in chosen if layer not in names]
        if unknown:
            raise VadError(f"fastflow-features: layers {unknown} are not among the detector's levels {names}")
        return chosen

    @property
    def out_channels(self) -> int:
        """Sum of the exposed levels' channels."""
        channels = {level.name: level.channels for level in self.detector.levels}
        return sum(channels[layer] for layer in self.exposed)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Latent maps ``[B, out_channels, h, w]`` on the first exposed level's grid."""
        detector = self.detector
        detector.require_fitted()
        images = detector.check_batch(images, "features")
        names, exposed = [level.name for level in detector.levels], self.exposed
        with torch.no_grad():
            latents, _ = detector.networks["head"].eval().latents(detector.encode(images))
            chosen = [latents[names.index(layer)] for layer in exposed]
            grid = chosen[0].shape[-2:]
            return torch.cat([c if c.shape[-2:] == grid else F.interpolate(c, size=grid, mode="bilinear", align_corners=False) for c in chosen], dim=1)
