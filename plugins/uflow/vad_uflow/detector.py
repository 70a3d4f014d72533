"""U-Flow as a vad image detector (``--detector uflow``) and its latent maps as a FeatureSource.

Tailanian, Pardo, Musé, "U-Flow: A U-shaped Normalizing Flow for Anomaly Detection with
Unsupervised Threshold" (arXiv 2211.12353, 2022; JMIV 2024) and its official code
(github.com/mtailanian/uflow: ``src/model.py``, ``src/feature_extraction.py``, ``src/train.py``,
``src/nfa_block.py``, ``src/evaluate.py``, ``configs/mvtec_default.yaml``). A frozen pretrained
backbone gives features at several scales; a trainable LayerNorm per scale and the U-shaped
normalizing flow map them to latents that are standard normal on normal images
(:mod:`vad_uflow.network`); the anomaly map comes from the latents' likelihood, and the
a-contrario NFA (:mod:`vad_uflow.nfa`) gives a detection threshold without any labels.

Training, as ``train.py`` and ``configs/mvtec_default.yaml``: Adam (lr 1e-4, weight decay 1e-5)
over the LayerNorms and the flow, batches of 8 reshuffled every epoch, 200 epochs, the loss
``sum_s 1/2 |z_s|^2 - log|det J|`` averaged over the batch. The schedule is the official
``LinearLR(start_factor=1, end_factor=0.4, total_iters=25000)`` stepped once per epoch (Lightning's
default interval; ``total_iters`` is the code's fallback when counting the iterations fails, and
the count calls ``Trainer.reset_train_dataloader``, removed in Lightning 2.0 while the official
requirements pin Lightning 2.2.4), so the rate falls by only 0.5 % over 200 epochs; anomalib 2.7
does the same (with lr 1e-3). The official per-category configurations tune lr, batch size and epochs
(e.g. carpet lr 3.2e-5, batch 13; grid 500 epochs): set them with ``--set``.

Scores (option ``score``):

* ``likelihood`` (default): the official map ``1 - get_probability`` (one minus the scales' mean
  ``exp(-1/2 mean_c z^2)``, bilinear) at the input size; the image score is its maximum, as the
  official validation (``train.py``) and anomalib.
* ``nfa``: ``-log10 NFA`` of the official block NFA (``nfa_block.py``, window 5, candidate
  probability 0.9) at the input size; the image score is its maximum (an image is flagged when one
  pixel is). The ``nfa`` threshold rule (:mod:`vad_uflow.threshold`, ``--threshold nfa``) decides
  at ``-log10 NFA > -log10 epsilon`` (0 for the official epsilon 1) with no validation images.

Every option's description gives the official value (``vad list detectors --details``).

Deviations:

* **Backbone**: the paper's MS-CaiT (``cait_m48_448`` + ``cait_s24_224``, strides 16 and 32 of
  448 px inputs) and the official code's other extractors (ResNet-18, WideResNet-50-2) need hub
  weights that cannot be downloaded here. The default is EfficientNet-Lite0
  (``tf_efficientnet_lite0``, packaged ImageNet weights) at the official CNN extractor's strides
  4, 8 and 16 (``ResNetFeatureExtractor``: timm ``out_indices=[1, 2, 3]``; lite0 ``blocks.1``,
  ``blocks.2``, ``blocks.4``: 24, 40, 112 channels) with the official trainable LayerNorm per
  scale; ``backbone=resnet18`` or ``wide_resnet50_2`` with ``weights=FILE`` gives the official CNN
  extractors (their mean/std are ImageNet's, as the official data module). Inputs are normalised
  with the backbone's own mean and std (0.5 / 0.5 for Lite0, as its weights were trained).
* **Input size**: 256 px (the official ``UFlow`` default and the configs' alternative for the CNN
  extractors; 448 is MS-CaiT's fixed input). Maps are computed at the input size; the official
  evaluation resizes maps to 256 px.
* **Model selection**: the official trainer runs ``epochs + 1`` epochs, evaluates the test set
  every epoch, keeps the checkpoints with the best test AUROC / AUPRO / mIoU and stops early on the
  test pixel AUROC. vad never looks at test labels: the weights after the last epoch are the model.
* **NFA**: the official code has two NFA detectors: the block NFA of the 2022 paper
  (``nfa_block.py``, implemented here) and the region-tree NFA of the 2024 JMIV version
  (``nfa_tree.py``: a max-tree of the latent score with prune-and-merge, and a polyomino count of
  tests), which is not implemented. Of the block NFA's two precisions the default one
  (``high_precision=False``: SciPy's binomial tail) is implemented; the ``high_precision`` variant
  (an mpmath quadrature of the binomial density over a continuous count) is not. The one edge case
  where SciPy gives ``-inf`` is kept finite (:mod:`vad_uflow.nfa`).
* **Post-processing**: vad smooths maps with a Gaussian (``--sigma``, default 4) for every
  detector; the official code does not: ``--sigma 0`` gives the official maps, and with
  ``score=nfa`` it makes the pixel decision the exact a-contrario one (a blurred ``-log10 NFA`` map
  is no longer one). Image scores are the raw map maximum, before smoothing.
* The backbone's weights are not saved with the model: like every vad backbone it is rebuilt from
  its options (packaged weights, the ``weights`` file, the hub cache; random weights drawn from
  ``seed``), so a reloaded model predicts the same.

Precision: the flow (LayerNorms, couplings, log-determinant) always runs in float32
(``vad_flows.coupling.run_flow``), so ``mixed_precision`` on CUDA only runs the frozen backbone in
bfloat16, which is safe.

``--backbone detector:uflow`` exposes the latents as patch features (:class:`UFlowFeatures`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from vad.contracts import Backbone, DetectorFeatures, FeatureInfo, Prediction, Preprocessing
from vad.errors import VadError
from vad.features import FrozenLevels, MovesFrozenLevels
from vad.options import option
from vad.training import TrainedDetector
from vad_uflow.network import UShapedFlow, latent_channels, likelihood_map, uflow_loss
from vad_uflow.nfa import NFA_SCORES, half_windows, log10_nfa_map

#: Strides of the official CNN extractor's scales (timm ``out_indices=[1, 2, 3]``: ResNet layer1-3).
OFFICIAL_STRIDES = (4, 8, 16)


class UFlow(MovesFrozenLevels, TrainedDetector):
    """U-Flow: a U-shaped normalizing flow on multi-scale features, with an a-contrario threshold."""

    name = "uflow"
    input = "images"
    produces_maps = True
    #: The per-scale LayerNorms are built for one feature size.
    fixed_input_size = True

    class Options(TrainedDetector.Options):
        backbone: str = option("tf_efficientnet_lite0", "Frozen feature extractor, a vad backbone name or timm:MODEL (paper: MS-CaiT; official code also resnet18, wide_resnet50_2; default EfficientNet-Lite0, weights packaged offline).")
        pretrained: bool = option(True, "Load the backbone's pretrained weights (packaged, weights file or hub cache); false: random weights drawn from seed, for tests (scores not meaningful).")
        weights: str | None = option(None, "A local weights file for the backbone (.safetensors or .pth, timm key names).")
        layers: list[str] | None = option(None, "Backbone levels, fine to coarse, each at twice the stride of the one before; null: strides 4, 8, 16 (official CNN extractor out_indices 1-3; lite0 blocks.1, blocks.2, blocks.4).")
        image_size: int = option(256, "Square input side in pixels, a multiple of the coarsest stride (official 256 for the CNN extractors, 448 for MS-CaiT).", ge=32, multiple_of=16)
        flow_steps: int = option(4, "Coupling blocks per flow stage (official configs 4).", ge=1)
        clamp: float = option(2.0, "Affine clamping of the couplings (official 2.0).", gt=0)
        hidden_ratio: float = option(1.0, "Hidden channels of the coupling subnets per input channel (official 1.0).", gt=0)
        permute_soft: bool = option(False, "Random rotations instead of hard channel permutations between couplings (official false).")
        epochs: int = option(200, "Passes over the training images (official mvtec_default 200; some categories 400-500).", ge=1)
        batch_size: int = option(8, "Training images per Adam step, reshuffled every epoch (official mvtec_default 8).", ge=1)
        lr: float = option(1e-4, "Adam learning rate (official mvtec_default 1e-4, tuned per category; anomalib 1e-3).", gt=0)
        weight_decay: float = option(1e-5, "Adam weight decay (official configs 1e-5).", ge=0)
        lr_end_factor: float = option(0.4, "LinearLR end factor of the learning rate (official 0.4).", gt=0, le=1)
        lr_decay_epochs: int = option(25000, "Epochs over which LinearLR reaches its end factor, stepped once per epoch (official total_iters 25000, Lightning's epoch interval).", ge=1)
        score: Literal["likelihood", "nfa"] = option("likelihood", "likelihood: official map 1 - mean_s exp(-mean_c z^2 / 2); nfa: -log10 NFA of the a-contrario block test (for --threshold nfa).")
        nfa_window: int = option(5, "NFA window side at the finest scale, halved at each coarser scale, never below 3 (official 5).", ge=1)
        nfa_probability: float = option(0.9, "NFA candidates: latent entries whose z^2 exceeds the chi-square(1) quantile at this probability (official 0.9).", gt=0, lt=1)

        def check(self) -> None:
            if self.layers is not None and (not self.layers or len(set(self.layers)) != len(self.layers)):
                raise self.invalid("layers", "null or a non-empty list of distinct backbone layers, fine to coarse")

    tiny_options = {"image_size": 64, "epochs": 3, "batch_size": 4, "flow_steps": 2}
    #: Three epochs on EfficientNet-Lite0 features of the tiny data set (measured 1.0, seeds 0-3).
    tiny_image_auroc = 0.8

    @property
    def score_kind(self) -> str | None:
        """``-log10 NFA`` with ``score=nfa`` (what ``--threshold nfa`` requires); else ordinary scores."""
        return NFA_SCORES if self.options.score == "nfa" else None

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        options = self.options
        self.frozen = FrozenLevels(
            options.backbone, pretrained=options.pretrained, weights=options.weights, layers=options.layers, strides=OFFICIAL_STRIDES, seed=options.seed, owner=self.name
        )
        self._checked = False

    # ------------------------------------------------------------------ the backbone

    @property
    def backbone(self) -> Backbone:
        """The frozen backbone, built on first use (random weights drawn from ``seed``); its
        levels are checked once and the resolved ``layers`` written back into the options."""
        backbone = self.frozen.backbone
        if not self._checked:
            levels = self.frozen.levels
            check_doubling_strides(backbone, levels)
            self._check_geometry(levels)
            self.options = self.options.replace(layers=self.frozen.names)
            self._checked = True
        return backbone

    @property
    def levels(self) -> list[FeatureInfo]:
        """The backbone levels the flow reads (name, stride, channels), fine to coarse."""
        self.backbone
        return self.frozen.levels

    @property
    def sizes(self) -> list[tuple[int, int]]:
        """Each scale's feature side at ``image_size``."""
        side = self.options.image_size
        return [(side // level.stride, side // level.stride) for level in self.levels]

    def _check_geometry(self, levels: Sequence[FeatureInfo]) -> None:
        """``image_size`` must divide by the coarsest stride and, with ``score=nfa``, each scale's
        side must exceed its window's half side (reflect padding)."""
        side, coarsest = self.options.image_size, levels[-1].stride
        if side % coarsest:
            raise VadError(f"uflow: image_size {side} is not a multiple of the coarsest level's stride {coarsest} ({levels[-1].name})")
        if self.options.score == "nfa":
            for level, half in zip(levels, half_windows(self.options.nfa_window, len(levels))):
                if side // level.stride <= half:
                    raise VadError(
                        f"uflow: the {side // level.stride} px latent of {level.name} is too small for the NFA window "
                        f"(half side {half}); raise image_size or lower nfa_window"
                    )

    def encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The backbone's levels for ``images`` (frozen, no gradient)."""
        self.backbone
        return self.frozen.encode(images)

    def latents(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The flow's latents of checked ``images``, finest first, without gradients."""
        self.require_fitted()
        with torch.no_grad():
            return self.networks["flow"].eval()(self.encode(images))[0]

    # ------------------------------------------------------------------ contract

    @property
    def preprocessing(self) -> Preprocessing:  # type: ignore[override]
        """Square ``image_size`` inputs, bilinear resize (official ``transforms.Resize``), the backbone's mean and std."""
        self.backbone
        return self.frozen.preprocessing(self.options.image_size)

    # ------------------------------------------------------------------ training

    def describe_input(self, first: torch.Tensor) -> dict[str, Any]:
        """The backbone levels the flow is built for (checked again when a model loads)."""
        return {"layers": [level.name for level in self.levels], "channels": [level.channels for level in self.levels]}

    def build(self, input_meta: dict[str, Any]) -> dict[str, nn.Module]:
        """LayerNorms and the U-shaped flow for the backbone's levels, initialised from ``seed``."""
        channels = [level.channels for level in self.levels]
        saved = input_meta.get("channels")
        if saved is not None and list(saved) != channels:
            raise VadError(
                f"the saved uflow networks were trained on backbone levels with {list(saved)} channels, but backbone "
                f"{self.options.backbone!r} gives {channels}: load it with the backbone it was trained with"
            )
        options = self.options
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(options.seed)
                flow = UShapedFlow(channels, self.sizes, options.flow_steps, options.clamp, options.hidden_ratio, options.permute_soft, options.seed)
        except ValueError as error:
            raise VadError(f"uflow cannot build its flow on backbone levels {[level.name for level in self.levels]}: {error}") from error
        return {"flow": flow}

    def minibatch(self) -> int:
        """The official loader's batch size, reshuffled every epoch."""
        return self.options.batch_size

    def optimizers(self) -> tuple[list[torch.optim.Optimizer], list[Any]]:
        """Adam over the LayerNorms and the flow (official lr 1e-4, weight decay 1e-5) and the
        official LinearLR, stepped once per epoch."""
        options = self.options
        optimizer = torch.optim.Adam(self.networks["flow"].parameters(), lr=options.lr, weight_decay=options.weight_decay)
        schedule = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0, end_factor=options.lr_end_factor, total_iters=options.lr_decay_epochs)
        return [optimizer], [schedule]

    def training_step(self, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The official loss of one batch (the flow in float32, also under autocast)."""
        latents, log_det = self.networks["flow"](self.encode(batch))
        return uflow_loss(latents, log_det)

    # ------------------------------------------------------------------ prediction

    def predict(self, batch: torch.Tensor) -> Prediction:
        """Maps ``[B, H, W]`` at the input size and image scores ``[B]`` (map maximum)."""
        return self.scored_by(self.export_module(), batch)

    def export_module(self) -> nn.Module:
        """``images -> (scores, maps)``: backbone, LayerNorms, flow and the chosen map; traceable
        for ONNX (in eval mode: exporters restore the mode they found after tracing)."""
        self.require_fitted()
        options = self.options
        side = options.image_size
        return UFlowHead(self.encode, self.networks["flow"], (side, side), options.score, options.nfa_window, options.nfa_probability).eval()

    # ------------------------------------------------------------------ features

    def feature_source(self, **options: Any) -> UFlowFeatures:
        """The flow's latent maps as a FeatureSource."""
        return UFlowFeatures(self, **options)


class UFlowHead(nn.Module):
    """A traceable ``images -> (scores [B], maps [B, H, W])`` module around the fitted flow."""

    def __init__(self, encode: Callable[[torch.Tensor], list[torch.Tensor]], flow: nn.Module, size: tuple[int, int], score: str, window: int, probability: float) -> None:
        super().__init__()
        self.encode, self.flow, self.size = encode, flow, size
        self.score, self.window, self.probability = score, window, probability

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The likelihood map or the ``-log10 NFA`` map, and its maximum per image."""
        latents, _ = self.flow(self.encode(images))
        if self.score == "nfa":
            maps = -log10_nfa_map(latents, self.size, self.window, self.probability)
        else:
            maps = likelihood_map(latents, self.size)
        return maps.flatten(1).amax(dim=1), maps


class UFlowFeatures(DetectorFeatures):
    """U-Flow's latents as patch features (``--backbone detector:uflow``).

    Cut point: the flow's output, the latent ``z`` of each scale (finest first), which the flow
    makes standard normal on normal images, so its squared norm per position is the method's
    anomaly evidence. ``scales`` chooses which (0 the finest); they are resized bilinearly to the
    grid of the first chosen one and concatenated. Preprocessing is the detector's.
    """

    name = "uflow-features"

    class Options(DetectorFeatures.Options):
        scales: list[int] | None = option(None, "Latent scales to expose, 0 the finest (stride 4 by default); null: all of them.", ge=0)

        def check(self) -> None:
            if self.scales is not None and (not self.scales or len(set(self.scales)) != len(self.scales)):
                raise self.invalid("scales", "null or a non-empty list of distinct scale indices")

    @property
    def exposed(self) -> list[int]:
        """The chosen scales, checked against the detector's."""
        count = len(self.detector.levels)
        chosen = list(self.options.scales) if self.options.scales is not None else list(range(count))
        if any(scale >= count for scale in chosen):
            raise VadError(f"uflow-features: scales {chosen} do not exist: the flow has {count} scales (0 to {count - 1})")
        return chosen

    @property
    def out_channels(self) -> int:
        """Sum of the chosen latents' channels."""
        widths = latent_channels([level.channels for level in self.detector.levels])
        return sum(widths[scale] for scale in self.exposed)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Latents ``[B, out_channels, h, w]`` on the first chosen scale's grid."""
        detector = self.detector
        latents = detector.latents(detector.check_batch(images, "features"))
        chosen = [latents[scale] for scale in self.exposed]
        grid = chosen[0].shape[-2:]
        return torch.cat([c if c.shape[-2:] == grid else F.interpolate(c, size=grid, mode="bilinear", align_corners=False) for c in chosen], dim=1)


def check_doubling_strides(backbone: Backbone, levels: Sequence[FeatureInfo]) -> None:
    """Each level the flow reads must have twice the stride of the one before (the U upsamples by 2)."""
    strides = [level.stride for level in levels]
    if any(coarser != 2 * finer for finer, coarser in zip(strides, strides[1:])):
        offered = ", ".join(f"{f.name} (stride {f.stride}, {f.channels} ch)" for f in backbone.feature_info())
        names = [level.name for level in levels]
        raise VadError(f"uflow needs backbone levels each at twice the stride of the one before, got {names} at strides {strides}; the backbone offers: {offered}")
