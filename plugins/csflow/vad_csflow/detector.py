"""CS-Flow as a vad image detector (``--detector csflow``) and its latent maps as a FeatureSource.

Rudolph, Wehrbein, Rosenhahn, Wandt, "Fully Convolutional Cross-Scale-Flows for Image-based
Defect Detection", WACV 2022, and its official code (github.com/marco-rudolph/cs-flow:
``config.py``, ``model.py``, ``freia_funcs.py``, ``train.py``, ``utils.py``, ``evaluate.py``).
A frozen pretrained backbone gives the same feature layer of the image at three sizes (full,
half, quarter: official 768, 384 and 192 px, ``F.interpolate``'s nearest mode from the full
size); a fully convolutional normalizing flow of cross-scale coupling blocks maps the three
feature maps jointly to latents ``z`` that are standard normal on defect-free images
(:mod:`vad_csflow.network`).

Training, as ``train.py`` with ``config.py``: the loss is ``get_loss``, the batch mean of
``0.5 ||z||^2 - log|det J|`` over all scales divided by the latent dimension; Adam (lr 2e-4,
betas 0.9/0.999, eps 1e-4, weight decay 1e-5), gradients clipped to norm 1 before each step,
batches of 16 reshuffled every epoch, ``meta_epochs x sub_epochs = 4 x 60 = 240`` epochs; the
flow has 4 coupling blocks (kernel 3, the last 5), 1024 hidden channels, clamp 3.

Prediction, as ``evaluate.py``: the image score is the mean of ``z^2 / 2`` over every latent
entry of the three scales; the anomaly map is the mean of ``z^2`` over the channels of the
finest scale (``map_mode=official``), which vad upsamples bilinearly to the image size as the
official visualisation does; ``map_mode=product`` is anomalib's default, the product of the
three scales' maps at the input size.

Every option's description gives its official value (``vad list detectors --details``).

Deviations:

* **Backbone and input size**: the paper's EfficientNet-B5 needs weights that do not ship
  offline, so the default is ``tf_efficientnet_lite0`` (ImageNet weights packaged); any vad
  backbone can be named (``backbone=timm:tf_efficientnet_b5`` with ``weights=FILE`` for the
  paper's network). The official input is 768 px for B5 (pretrained at 456 px); the default
  here is 384 px, the same ratio to lite0's pretrained 224 px and about a quarter of the cost
  on a CPU (``image_size=768`` is the paper's size). Inputs are resized bilinearly (official
  ``transforms.Resize``) and normalised with the backbone's own mean and std (ImageNet's for
  B5, as official; 0.5/0.5 for EfficientNet-Lite, as its weights were trained).
* **Feature layer**: the official layer is the output of B5's 36th block (``use_layer=35``),
  the last of its sixth stage: stride 32, 304 channels. timm's feature extractors expose only
  the ends of stages after which the stride changes, so the default here is the deepest
  stride-32 map the backbone offers (lite0: ``blocks.6``, 320 channels; B5: ``blocks.6``,
  512 channels); ``layer`` names another.
* **No test-set monitoring**: the official loop scores the test set after every meta epoch and
  prints the AUROC with the best one so far; it saves the weights after the last epoch, the
  model here too. vad's loop never looks at test data while training.
* **The backbone is not saved** with the model: like every vad backbone it is rebuilt from its
  options (packaged weights, the ``weights`` file, the hub cache; random weights are drawn from
  ``seed``), so a reloaded model predicts the same. The flow is large, as the official one
  (275 M parameters on B5's 304 channels; 290 M, 1.2 GB in float32, on lite0's 320); training
  holds it with its gradients and Adam's two moments, about 6 GB at 384 px on a CPU.
* **Post-processing**: vad smooths maps with a Gaussian (``--sigma``, default 4) as for every
  detector; the official code does not (``--sigma 0``). Image scores are the official ones,
  computed from the latents, not from the map.

anomalib 2.7 differs from the official code in ways not copied here: its coupling returns the
log-determinant summed over the whole batch (so each sample's loss sees the batch's total), its
permutations draw the same order for the three scales, and its default map is the product of the
three scales (``map_mode=product``).

Training runs through vad's shared loop (:mod:`vad.training`): checkpoints, resume, progress.
Mixed precision (``mixed_precision=true`` on CUDA) runs only the frozen backbone in bfloat16;
the flow always runs in float32.
"""

from __future__ import annotations

import gc
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from vad.contracts import Backbone, DetectorFeatures, FeatureInfo, Prediction, Preprocessing
from vad.errors import VadError
from vad.features import FrozenLevels, MovesFrozenLevels
from vad.options import option
from vad.training import TrainedDetector
from vad_csflow.network import (
    SCALES,
    MapMode,
    anomaly_maps,
    cross_scale_flow,
    csflow_loss,
    default_kernel_sizes,
    image_scores,
    input_scales,
    run_cross_scale_flow,
)

#: The stride of the official feature layer (EfficientNet-B5's 36th block: 768 px -> 24 x 24).
OFFICIAL_STRIDE = 32


class CsFlow(MovesFrozenLevels, TrainedDetector):
    """CS-Flow: a fully convolutional cross-scale normalizing flow on frozen backbone features."""

    name = "csflow"
    input = "images"
    produces_maps = True
    fixed_input_size = True

    class Options(TrainedDetector.Options):
        backbone: str = option("tf_efficientnet_lite0", "Frozen feature extractor, a vad backbone name or timm:MODEL (official EfficientNet-B5; default EfficientNet-Lite0, whose weights ship offline).")
        pretrained: bool = option(True, "Load the backbone's pretrained weights (packaged, weights file, or hub cache); false: random weights drawn from seed (scores not meaningful).")
        weights: str | None = option(None, "A local weights file for the backbone (.safetensors or .pth, timm key names).")
        layer: str | None = option(None, "The backbone layer read at the three input sizes; null: the deepest stride-32 map (official: B5's 36th block, stride 32; lite0: blocks.6).")
        image_size: int = option(384, "Square input side of the finest scale, the others are 1/2 and 1/4 of it; a multiple of 4 x the layer's stride (official 768 for B5; default 384 for lite0, the same ratio to its pretrained size).", ge=32, multiple_of=32)
        epochs: int = option(240, "Passes over the training images (official meta_epochs x sub_epochs = 4 x 60).", ge=1)
        batch_size: int = option(16, "Training images per optimiser step, reshuffled every epoch (official 16).", ge=1)
        lr: float = option(2e-4, "Adam learning rate (official lr_init 2e-4, constant).", gt=0)
        betas: list[float] = option([0.9, 0.999], "Adam betas (official: torch's defaults 0.9, 0.999).", ge=0, lt=1)
        eps: float = option(1e-4, "Adam eps (official 1e-4).", gt=0)
        weight_decay: float = option(1e-5, "Adam weight decay (official 1e-5).", ge=0)
        max_grad_norm: float = option(1.0, "Gradients are clipped to this total norm before each step (official max_grad_norm 1).", gt=0)
        coupling_blocks: int = option(4, "Cross-scale coupling blocks (official n_coupling_blocks 4).", ge=1)
        clamp: float = option(3.0, "Soft clamp of the couplings' log scales, clamp * 0.636 * atan(s / clamp) (official 3; 0: none).", ge=0)
        hidden_channels: int = option(1024, "Hidden channels of the cross-convolution subnetworks (official fc_internal 1024).", ge=1)
        kernel_sizes: list[int] | None = option(None, "Kernel size of each coupling block's convolutions, odd; null: 3, and 5 for the last block (official).", ge=1)
        map_mode: Literal["official", "product"] = option("official", "Anomaly map: official (mean z^2 over channels at the finest scale, evaluate.py) or product (of the three scales' maps at the input size, anomalib's default).")

        def check(self) -> None:
            if len(self.betas) != 2:
                raise self.invalid("betas", "two numbers [beta1, beta2] in [0, 1)")
            if self.kernel_sizes is not None and (len(self.kernel_sizes) != self.coupling_blocks or any(k % 2 == 0 for k in self.kernel_sizes)):
                raise self.invalid("kernel_sizes", f"null or {self.coupling_blocks} odd kernel sizes, one per coupling block")

    tiny_options = {"image_size": 128, "epochs": 2, "batch_size": 4, "hidden_channels": 16}
    #: Two epochs of a 16-channel flow on pretrained EfficientNet-Lite0 features (measured 1.0, seeds 0-2).
    tiny_image_auroc = 0.8

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        options = self.options
        self.frozen = FrozenLevels(
            options.backbone, pretrained=options.pretrained, weights=options.weights, layers=None if options.layer is None else [options.layer],
            strides=(OFFICIAL_STRIDE,), seed=options.seed, owner=self.name, option_name="layer",
        )
        self._checked = False

    # ------------------------------------------------------------------ the backbone

    @property
    def backbone(self) -> Backbone:
        """The frozen backbone, built on first use (random weights drawn from ``seed``); the
        layer is checked once and its resolved name written back into the options."""
        backbone = self.frozen.backbone
        if not self._checked:
            level = self.frozen.levels[0]
            if self.options.image_size % (4 * level.stride):
                raise VadError(
                    f"csflow: image_size {self.options.image_size} must be a multiple of 4 x the stride of layer "
                    f"{level.name!r} ({4 * level.stride}), so that its three scales' grids halve exactly"
                )
            self.options = self.options.replace(layer=level.name)
            self._checked = True
        return backbone

    @property
    def level(self) -> FeatureInfo:
        """The feature layer (name, stride, channels)."""
        self.backbone
        return self.frozen.levels[0]

    @property
    def grid(self) -> tuple[int, int]:
        """The finest scale's feature grid."""
        side = self.options.image_size // self.level.stride
        return side, side

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The layer's maps of ``images`` at full, half and quarter size (without gradient: the
        backbone is frozen; cloned out of inference mode so that the flow can train on them)."""
        self.backbone
        return [self.frozen.encode(scaled)[0] for scaled in input_scales(images)]

    # ------------------------------------------------------------------ contract

    @property
    def preprocessing(self) -> Preprocessing:  # type: ignore[override]
        """Square ``image_size`` inputs, bilinear resize, normalised with the backbone's mean/std."""
        self.backbone
        return self.frozen.preprocessing(self.options.image_size)

    # ------------------------------------------------------------------ training

    def describe_input(self, first: torch.Tensor) -> dict[str, Any]:
        """The feature layer the flow is built for (checked again when a model loads)."""
        return {"layer": self.level.name, "channels": self.level.channels}

    def build(self, input_meta: dict[str, Any]) -> dict[str, nn.Module]:
        """A fresh flow for the layer's channels and grid (torch's default initialisation, drawn
        from ``seed``; the gammas at zero make every block the identity).

        FrEIA's graph nodes reference each other (inputs and outputs), so a dropped flow's
        weights (1.2 GB at the official widths) wait for Python's cyclic garbage collector;
        collecting here keeps successive fits (categories, calibration folds) from piling up."""
        gc.collect()
        channels = self.level.channels
        saved = input_meta.get("channels")
        if saved is not None and int(saved) != channels:
            raise VadError(
                f"the saved csflow flow was trained on a {saved}-channel layer, but backbone {self.options.backbone!r} "
                f"layer {self.level.name!r} has {channels}: load it with the backbone it was trained with"
            )
        options = self.options
        kernel_sizes = list(options.kernel_sizes) if options.kernel_sizes is not None else default_kernel_sizes(options.coupling_blocks)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(options.seed)
            flow = cross_scale_flow(channels, self.grid, blocks=options.coupling_blocks, clamp=options.clamp, hidden_channels=options.hidden_channels, kernel_sizes=kernel_sizes)
        return {"flow": flow}

    def minibatch(self) -> int:
        """The official loader's batch size, reshuffled every epoch (``shuffle=True, drop_last=False``)."""
        return self.options.batch_size

    def optimizers(self) -> tuple[list[torch.optim.Optimizer], list[Any]]:
        """Adam over the flow (official lr 2e-4, eps 1e-4, weight decay 1e-5), no schedule; the
        gradients are clipped to ``max_grad_norm`` before every step, as ``train.py`` does."""
        options = self.options
        parameters = list(self.networks["flow"].parameters())
        beta1, beta2 = options.betas
        optimizer = torch.optim.Adam(parameters, lr=options.lr, betas=(beta1, beta2), eps=options.eps, weight_decay=options.weight_decay)
        max_norm = options.max_grad_norm

        def clip(*_: Any) -> None:
            nn.utils.clip_grad_norm_(parameters, max_norm)

        optimizer.register_step_pre_hook(clip)
        return [optimizer], []

    def training_step(self, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The official loss of one batch."""
        z, log_jac_det = run_cross_scale_flow(self.networks["flow"], self.features(batch))
        return csflow_loss(z, log_jac_det)

    # ------------------------------------------------------------------ prediction

    def predict(self, batch: torch.Tensor) -> Prediction:
        """Image scores ``[B]`` (mean ``z^2 / 2``) and maps (``map_mode``)."""
        return self.scored_by(self.export_module(), batch)

    def export_module(self) -> nn.Module:
        """``images -> (scores, maps)``: backbone at three sizes, flow, scores; traceable for ONNX."""
        self.require_fitted()
        return CsFlowHead(self.features, self.networks["flow"], self.options.map_mode).eval()

    def latents(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The three scales' latents ``z`` of checked ``images`` (eval mode, no gradient)."""
        with torch.no_grad():
            z, _ = run_cross_scale_flow(self.networks["flow"].eval(), self.features(images))
        return z

    # ------------------------------------------------------------------ features

    def feature_source(self, **options: Any) -> CsFlowFeatures:
        """The flow's latent maps as a FeatureSource."""
        return CsFlowFeatures(self, **options)


class CsFlowHead(nn.Module):
    """A traceable ``images -> (scores [B], maps [B, h, w])`` module around the fitted flow."""

    def __init__(self, features: Any, flow: nn.Module, map_mode: MapMode) -> None:
        super().__init__()
        self.features, self.flow, self.map_mode = features, flow, map_mode

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores and maps as :meth:`CsFlow.predict`."""
        z, _ = run_cross_scale_flow(self.flow, self.features(images))
        return image_scores(z), anomaly_maps(z, self.map_mode, tuple(images.shape[-2:]))


class CsFlowFeatures(DetectorFeatures):
    """CS-Flow's latent maps as patch features (``--backbone detector:csflow``).

    Cut point: the flow's output ``z`` at the chosen scales (default all three), the latents
    that are standard normal on defect-free images and whose squared norms make CS-Flow's scores
    and maps. Coarser scales are resized bilinearly to the grid of the first chosen one and the
    scales concatenated along the channels (``len(scales) x`` the layer's channels). The
    preprocessing is the detector's.
    """

    name = "csflow-features"

    class Options(DetectorFeatures.Options):
        scales: list[int] = option([0, 1, 2], "Latent scales to expose: 0 (finest, full-size input), 1 (half), 2 (quarter).", choices=tuple(range(SCALES)))

        def check(self) -> None:
            if not self.scales or len(set(self.scales)) != len(self.scales):
                raise self.invalid("scales", "a non-empty list of distinct scales among 0, 1, 2")

    @property
    def out_channels(self) -> int:
        """The layer's channels times the number of scales."""
        return self.detector.level.channels * len(self.options.scales)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Latents ``[B, out_channels, h, w]`` on the first chosen scale's grid."""
        detector = self.detector
        detector.require_fitted()
        z = detector.latents(detector.check_batch(images, "features"))
        chosen = [z[scale] for scale in self.options.scales]
        grid = chosen[0].shape[-2:]
        return torch.cat([c if c.shape[-2:] == grid else F.interpolate(c, size=grid, mode="bilinear", align_corners=False) for c in chosen], dim=1)
