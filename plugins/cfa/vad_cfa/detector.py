"""CFA as a vad image detector (``--detector cfa``) and its patch descriptors as a FeatureSource.

Lee, Lee, Song, "CFA: Coupled-hypersphere-based Feature Adaptation for Target-Oriented Anomaly
Localization", IEEE Access 2022 (arXiv 2206.04325). Official code:
github.com/sungwool/CFA_for_anomaly_localization (``trainer_cfa.py``, ``utils/cfa.py``,
``utils/coordconv.py``, ``utils/metric.py``, ``cnn/resnet.py``); the formulas are in
:mod:`vad_cfa.network`.

Training, as ``trainer_cfa.py``: a frozen pretrained backbone (eval mode) gives its levels at
strides 4, 8 and 16 (WideResNet-50-2 ``layer1``-``layer3``); a trainable patch descriptor (3 x 3
average pooling, resize to the stride-4 grid, concatenation, 1 x 1 CoordConv to
``channels // gamma_d``) maps them to patch features. Before training, the memory bank is the
randomly initialised descriptor's output averaged over the training images at each grid position
(k-means-compressed to ``h w // gamma_c`` centroids when ``gamma_c > 1``), and stays fixed. The
descriptor and the radius ``r`` (initially 1e-5) then minimise the soft-boundary loss with
``K = 3`` nearest centroids, ``J = 3`` hard negatives, margin 0.1 and weight ``1 / nu = 1000``,
by AdamW (lr 1e-3, weight decay 5e-4, AMSGrad) for 30 epochs on shuffled batches of 4 images of
224 px, ImageNet-normalised.

Prediction, as the official ``DSVDD.forward`` and ``utils/metric.py``: each patch's distance to
its nearest centroid weighted by its softmin share among the K nearest gives the map on the
stride-4 grid; vad upsamples it bilinearly to the input size and smooths it there with a Gaussian
of sigma 4 (``--sigma``, vad's default, equal to the official ``gaussian_smooth``, scipy
``gaussian_filter``); the image score is the maximum of that smoothed map (``score_sigma``).

Every option's description gives the official value (``vad list detectors --details``).

Deviations (each also noted where it happens):

* **Backbone**: the official WideResNet-50-2 (also ResNet-18, VGG-19, EfficientNet-B5) needs
  ImageNet weights from the hub, which cannot be downloaded here, so the default is
  ``tf_efficientnet_lite0`` (weights packaged offline) at its levels at strides 4, 8 and 16:
  ``blocks.1`` (24 channels), ``blocks.2`` (40) and ``blocks.4`` (112), a 176-channel descriptor.
  ``backbone=timm:wide_resnet50_2.tv_in1k`` (``weights=<file>`` offline: torchvision's first
  ImageNet weights, ``wide_resnet50_2-95faca4d.pth``, as the official ``cnn/resnet.py``) gives the
  paper's set-up (1792 channels); the official network applies a leaky ReLU to
  ``layer1``-``layer3``, which changes nothing after their closing ReLU. Inputs are normalised with the backbone's own mean
  and std (ImageNet for the ResNets, as official; 0.5 / 0.5 for EfficientNet-Lite, as its weights
  were trained). The official EfficientNet-B5 path (its own multi-block endpoints, each divided
  by its channel count, and a descriptor twice as wide) is specific to that network and not
  reproduced: every backbone takes the ResNet path.
* **Input size**: the official loader resizes to 256 px and centre-crops 224 px (``--size 224``;
  its README also reports resize-only results); the default here is a plain resize to 224 px, and
  ``vad run --resize 256 --center-crop 224`` gives the official crop. The official resize filter
  is PIL's Lanczos (``Image.ANTIALIAS``); vad resizes with antialiased bilinear interpolation
  (as anomalib), having no Lanczos filter.
* **Grid shape**: the official descriptor resizes every level to a square ``h x h`` grid
  (``F.interpolate(o, sample.size(2))``) and k-means to ``h^2 // gamma_c`` centres; here the first
  level's ``h x w`` (equal for square inputs).
* **Memory bank**: the exact mean over every training image; the official running mean of batch
  means equals it because its loader drops the last incomplete batch (here nothing is dropped).
  The k-means (``gamma_c > 1``) uses scikit-learn as official, with ``n_init=10`` (its default
  in 2022) and ``random_state=seed`` for a reproducible fit.
* **Hard negatives**: the J centroids after the K nearest (the paper's ``c^j`` other than the
  ``c^k``); the official slice ``[J:K+J]`` is the same for its ``K = J = 3``.
* **Batches**: the official loader drops the last incomplete batch (``drop_last=True``); vad's
  shared loop keeps it, so every training image is seen every epoch.
* **Model selection**: the official script evaluates the test set after every epoch and reports
  the best epoch; here the weights after the last epoch are the model (no test labels).
* **Numerics**: squared distances are clamped at 0 before the square root (the official one can
  give NaN where rounding makes them slightly negative); a grid axis of one cell gets the
  coordinate -1 (official: NaN). The official ``rescale`` (min-max over the test set) is a
  monotone map of all scores together and is left out.
* The official ``CoordConv2d`` also carries the unused weight of the ``Conv2d`` it derives from;
  it never receives a gradient and is not reproduced.

anomalib 2.7 (``anomalib.models.image.cfa``) follows the official code except: its radius is
``torch.ones(1, requires_grad=True) * radius``, a plain tensor that no optimiser sees, so ``r``
stays at 1e-5 (official: an ``nn.Parameter`` trained by AdamW with the descriptor;
``learn_radius=false`` reproduces anomalib's); its default
input is a 256 px resize without the crop; its data module's batches hold 32 images (official 4);
its backbones come with torchvision's ``DEFAULT`` weights (WideResNet-50-2: the second ImageNet
weights, official: the first); its k-means (``gamma_c > 1``) is its own (random initial centres,
one run) instead of scikit-learn's k-means++; its Gaussian blur pads by reflection without
repeating the edge pixel (scipy's ``gaussian_filter``, as official and vad, repeats it); its
README's numbers stop early (patience 5) on validation metrics, and its MVTec AD validation set is
by default the test set (the official code keeps the test-set-best of 30 epochs); EfficientNet-B5
is not implemented.

Mixed precision (``mixed_precision`` on CUDA) is sound: only the frozen backbone runs in
bfloat16; the descriptor, distances, loss and scores run in float32.
The backbone's weights are not saved with the model: like every vad backbone it is rebuilt from
its options (packaged weights, the ``weights`` file, the hub cache; random weights are drawn
from ``seed``, so a reloaded model predicts the same).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from vad.contracts import Backbone, DetectorFeatures, FeatureInfo, Prediction, Preprocessing
from vad.errors import VadError
from vad.features import FrozenLevels, MovesFrozenLevels
from vad.options import option
from vad.training import CachedBatches, TrainedDetector
from vad_cfa.network import CfaHead, CfaScorer, cfa_loss, initial_bank, mean_descriptor

#: The strides of the official levels (WideResNet-50-2 / ResNet-18 layer1, layer2, layer3).
PAPER_STRIDES = (4, 8, 16)


class Cfa(MovesFrozenLevels, TrainedDetector):
    """CFA: a patch descriptor on frozen backbone levels, adapted to a fixed memory bank of centroids."""

    name = "cfa"
    input = "images"
    produces_maps = True

    class Options(TrainedDetector.Options):
        backbone: str = option("tf_efficientnet_lite0", "Frozen pretrained backbone, a vad backbone name or timm:MODEL (official timm:wide_resnet50_2.tv_in1k; deviation: EfficientNet-Lite0, whose weights ship offline).")
        pretrained: bool = option(True, "Load the backbone's pretrained weights (packaged, weights file or hub cache); false: random weights drawn from seed, for tests only (scores are not meaningful).")
        weights: str | None = option(None, "A local weights file for the backbone (.safetensors or .pth, timm key names) instead of the packaged or hub weights.")
        layers: list[str] | None = option(None, "Backbone levels concatenated by the descriptor (names or positions); null: those at strides 4, 8, 16 (official layer1-3; lite0: blocks.1, blocks.2, blocks.4).")
        image_size: int = option(224, "Square input side in pixels (official 224, after a resize to 256 and a centre crop: --resize 256 --center-crop 224; here a plain resize).", ge=32)
        gamma_d: int = option(1, "Descriptor compression: its output has channels // gamma_d (official 1).", ge=1)
        gamma_c: int = option(1, "Memory bank compression: h w // gamma_c k-means centroids instead of one per grid position (official 1: no k-means).", ge=1)
        neighbours: int = option(3, "K: nearest centroids attracted by the loss and weighed by the score's softmin (official 3).", ge=1)
        hard_negatives: int = option(3, "J: the centroids after the K nearest, repelled by the loss (official 3; the official slice [J:K+J] equals them for K = J).", ge=1)
        radius: float = option(1e-5, "Initial hypersphere radius r (official 1e-5).", ge=0)
        learn_radius: bool = option(True, "Train r with the descriptor (official: an AdamW parameter); false: r keeps its initial value, as anomalib 2.7.")
        margin: float = option(0.1, "alpha: repulsion margin on the squared distances (official 0.1).", ge=0)
        nu: float = option(1e-3, "The losses are weighted by 1 / nu (official nu 1e-3).", gt=0)
        score_sigma: float = option(4.0, "Gaussian sigma (input pixels) of the upsampled map whose maximum is the image score (official 4); 0: the upsampled map's maximum.", ge=0)
        epochs: int = option(30, "Passes over the training images (official 30).", ge=1)
        batch_size: int = option(4, "Training images per AdamW step, reshuffled every epoch (official 4; its last incomplete batch is dropped, here kept).", ge=1)
        lr: float = option(1e-3, "AdamW learning rate (official 1e-3, constant, AMSGrad).", gt=0)
        weight_decay: float = option(5e-4, "AdamW weight decay (official 5e-4).", ge=0)

        def check(self) -> None:
            if self.layers is not None and (not self.layers or len(set(self.layers)) != len(self.layers)):
                raise self.invalid("layers", "null or a non-empty list of distinct backbone layers such as ['layer1', 'layer2', 'layer3']")

    tiny_options = {"image_size": 64, "epochs": 2, "batch_size": 4}
    #: Two epochs from a pretrained EfficientNet-Lite0 on the tiny data set (measured 1.0, seeds 0-3).
    tiny_image_auroc = 0.8

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        options = self.options
        self.frozen = FrozenLevels(
            options.backbone, pretrained=options.pretrained, weights=options.weights, layers=options.layers, strides=PAPER_STRIDES, seed=options.seed, owner=self.name
        )
        self._training: CachedBatches | None = None

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
        """The backbone levels the descriptor concatenates (name, stride, channels), shallow to deep."""
        self.backbone
        return self.frozen.levels

    @property
    def in_channels(self) -> int:
        """Channels of the concatenated levels."""
        return sum(level.channels for level in self.levels)

    @property
    def out_channels(self) -> int:
        """Channels of the patch descriptors: ``in_channels // gamma_d``."""
        width = self.in_channels // self.options.gamma_d
        if width < 1:
            raise VadError(f"cfa: gamma_d={self.options.gamma_d} leaves no descriptor channel of the {self.in_channels} the levels {self.frozen.names} give; use gamma_d <= {self.in_channels}")
        return width

    def encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The backbone's levels for ``images`` (frozen, no gradient)."""
        return self.frozen.encode(images)

    # ------------------------------------------------------------------ contract

    @property
    def preprocessing(self) -> Preprocessing:  # type: ignore[override]
        """Square ``image_size`` inputs, bilinear resize, the backbone's mean and std."""
        self.backbone
        return self.frozen.preprocessing(self.options.image_size)

    # ------------------------------------------------------------------ training

    def fit(self, batches: Iterable[torch.Tensor]) -> None:
        """Train through the shared loop; the memory bank is initialised from the same batches
        (held in memory once for both)."""
        self._training = batches if isinstance(batches, CachedBatches) else CachedBatches(batches)
        try:
            super().fit(self._training)
        finally:
            self._training = None

    def describe_input(self, first: torch.Tensor) -> dict[str, Any]:
        """The levels, their channels, the descriptor grid and the bank size it gives; a bank too
        small for the K + J nearest centroids is refused before anything changes."""
        self.out_channels  # a gamma_d that leaves no channel fails here
        with torch.no_grad():
            grid = [int(n) for n in self.encode(first[:1])[0].shape[-2:]]
        bank_size = grid[0] * grid[1] // self.options.gamma_c
        needed = self.options.neighbours + self.options.hard_negatives
        if bank_size < needed:
            raise VadError(
                f"cfa: the memory bank would hold {bank_size} centroids (a {grid[0]} x {grid[1]} descriptor grid // gamma_c={self.options.gamma_c}), "
                f"fewer than neighbours + hard_negatives = {needed}; use larger images or a smaller gamma_c"
            )
        return {"layers": self.frozen.names, "channels": [level.channels for level in self.levels], "grid": grid, "bank_size": bank_size}

    def build(self, input_meta: dict[str, Any]) -> dict[str, nn.Module]:
        """A fresh head (descriptor initialised from ``seed``, radius, empty bank) without touching
        the global random state; saved levels that the options do not give are refused."""
        expected = {"layers": self.frozen.names, "channels": [level.channels for level in self.levels]}
        saved = {key: input_meta.get(key, value) for key, value in expected.items()}
        if saved != expected:
            raise VadError(
                f"the saved cfa head was trained on backbone levels {saved['layers']} with channels {saved['channels']}, "
                f"but backbone {self.options.backbone!r} gives {expected['layers']} with {expected['channels']}: "
                "load it with the options it was trained with"
            )
        bank_size = int(input_meta.get("bank_size", 1))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.options.seed)
            head = CfaHead(self.in_channels, self.out_channels, bank_size, self.options.radius)
        return {"head": head}

    def before_training(self) -> None:
        """The memory bank from the freshly initialised descriptor over the training images
        (official ``_init_centroid`` and k-means); a resumed fit takes it from the checkpoint."""
        if self.resuming:
            return
        assert self._training is not None, "Cfa.fit passes its training batches"
        head = self.networks["head"]
        levels = (self.encode(self.check_batch(batch, "fit")) for batch in self._training)
        mean = mean_descriptor(head.descriptor, levels)
        head.bank.copy_(initial_bank(mean, self.options.gamma_c, self.options.seed))

    def minibatch(self) -> int:
        """The official loader's batch size, reshuffled every epoch."""
        return self.options.batch_size

    def optimizers(self) -> tuple[list[torch.optim.Optimizer], list[Any]]:
        """AdamW over the descriptor and the radius (``learn_radius``; official lr 1e-3, weight
        decay 5e-4, AMSGrad, no schedule)."""
        head = self.networks["head"]
        parameters = [*head.descriptor.parameters(), *([head.radius] if self.options.learn_radius else [])]
        return [torch.optim.AdamW(parameters, lr=self.options.lr, weight_decay=self.options.weight_decay, amsgrad=True)], []

    def training_step(self, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The soft-boundary loss of one batch (float32, also under autocast)."""
        head = self.networks["head"]
        levels = self.encode(batch)
        with torch.autocast(batch.device.type, enabled=False):
            _, distances = head.distances(levels)
            options = self.options
            return cfa_loss(distances, head.radius, options.neighbours, options.hard_negatives, options.nu, options.margin)

    # ------------------------------------------------------------------ prediction

    def predict(self, batch: torch.Tensor) -> Prediction:
        """Maps ``[B, h, w]`` on the descriptor grid and image scores ``[B]`` (maximum of the
        map upsampled to the input size and smoothed with ``score_sigma``)."""
        return self.scored_by(self.export_module(), batch)

    def export_module(self) -> nn.Module:
        """``images -> (scores, maps)``: backbone, descriptor, distances to the bank, score; traceable for ONNX."""
        self.require_fitted()
        return CfaScorer(self.encode, self.networks["head"], self.options.neighbours, self.options.score_sigma).eval()

    # ------------------------------------------------------------------ features

    def feature_source(self, **options: Any) -> CfaFeatures:
        """The adapted patch descriptors as a FeatureSource."""
        return CfaFeatures(self, **options)


class CfaFeatures(DetectorFeatures):
    """CFA's adapted patch descriptors as patch features (``--backbone detector:cfa``).

    Cut point: the descriptor's output ``phi(p)`` (``[B, channels // gamma_d, h, w]`` on the
    stride-4 grid), the features CFA trained to gather inside hyperspheres around the memory
    bank's centroids and whose distances to them make the score. Preprocessing is the detector's.
    """

    name = "cfa-features"

    @property
    def out_channels(self) -> int:
        """The descriptor's channels."""
        return self.detector.out_channels

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Patch descriptors ``[B, out_channels, h, w]``."""
        detector = self.detector
        detector.require_fitted()
        images = detector.check_batch(images, "features")
        with torch.no_grad():
            return detector.networks["head"].eval().descriptor([level.float() for level in detector.encode(images)])
