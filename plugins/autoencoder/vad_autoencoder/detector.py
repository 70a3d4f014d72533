"""The L2- and SSIM-Autoencoder as a vad image detector (``--detector autoencoder``).

Bergmann, Löwe, Fauser, Sattlegger, Steger, "Improving Unsupervised Defect Segmentation by
Applying Structural Similarity to Autoencoders", VISAPP 2019, as Bergmann's thesis (TUM 2022)
uses it: Ch. 3 (the method, Table 3.1), Ch. 4 (the MVTec AD benchmark variant, the default
here) and Ch. 6 (Table 6.3, MVTec LOCO). MVTec released no code; the thesis text is the
reference. One model, two losses: ``loss`` sets both the training loss and the anomaly map.

* ``loss=l2`` (default): loss ``1/B sum_i ||I_i - I^_i||^2`` (eq. 3.2: summed over pixels and
  channels, averaged over the batch), map ``||J(p) - J^(p)||^2`` (eq. 3.3), colour images.
* ``loss=ssim``: loss ``1/B sum_i sum_p (1 - SSIM_i(p))``, map ``1 - SSIM(p)`` (11 x 11 Gaussian
  window, sigma 1.5), on grayscale images (ITU-R BT.601 luma): "since SSIM does not operate on
  colour images, all images are converted to grayscale" (Ch. 4). ``grayscale`` overrides it.

Why L2 is the default: in the thesis' own MVTec AD benchmark (Tables 4.2-4.4) the L2-AE beats
the SSIM-AE on the mean of every headline metric (AU-PRO 0.632 vs 0.617, image AUROC 0.764 vs
0.634, AU-PR 0.241 vs 0.148, AU-PRO@0.01 0.218 vs 0.075; only AU-PRO@1.0 ties, 0.838 vs
0.840), and grayscale inputs miss colour defects. The SSIM-AE is better where defects differ
in structure rather than intensity (Ch. 3's textures: pixel AUROC 0.688 -> 0.966 on NanoTWICE).

Defaults (Ch. 4): the Table 3.1 network extended by one convolution for 256 x 256 inputs, latent
``d = 128``, 100 epochs of Adam (lr 2e-4, weight decay 1e-5 from Ch. 3, Ch. 4 states none),
batch 128, on a fixed set of 10,000 augmented samples; the image score is the maximum of the map
(every experiment of the thesis). The thesis' two protocols:

* objects (default, ``patch_size=null``): the whole image passes through the network; training
  samples are training images under a random rotation and translation, mirrored where the object
  allows it (``horizontal_flip`` / ``vertical_flip``, per category);
* textures (``patch_size`` set): random patches cropped evenly across the training images;
  inference reconstructs patches at ``patch_stride`` (64) and averages the overlapping anomaly
  maps (``patch_average=maps``, Ch. 4; Ch. 3 averaged the reconstructed pixel values:
  ``patch_average=reconstructions``), with :func:`vad_reconstruction.patches.reconstruct_by_patches`.

Ch. 3's protocol (SSIM-AE on textures): ``loss=ssim image_size=256 patch_size=128
patch_stride=30 patch_average=reconstructions latent_dim=100 epochs=200 batch_size=64
opening=4``. Ch. 6's AE (LOCO): ``architecture=loco latent_dim=32 epochs=500 lr=1e-4
batch_size=16 vertical_flip=true horizontal_flip=true`` (where the category allows flips; Ch. 6's
colour jitter is not offered).

Deviations and choices where the thesis is silent (each also in its option's description):

* **The extra layer** for 256 px is a leading 4x4 stride-2 convolution of 32 channels: the
  thesis' 256 px depth autoencoder (Table 9.2) is laid out so, and it gives Table 4.5's
  1.20 M parameters (d = 128, 256 px). Any power-of-two side from 32 gets as many leading
  convolutions as it needs (tests use 32 px).
* **Texture patch size**: Ch. 4 says both "reconstructs patches of size 128 x 128" and "an
  additional convolution layer to process images at 256 x 256"; ``patch_size=128`` on 256 px
  images is Ch. 3's reading, ``image_size=512 patch_size=256`` keeps Table 4.5's single 1.20 M
  network for every category.
* **Augmentation magnitudes** are not stated for Ch. 4: rotations up to 3 degrees (the thesis'
  MVTec AD and LOCO augmentation, Ch. 6-7), translations up to 5 % of the side (our choice),
  the uncovered corners filled by reflection (our choice: no black wedges that test images never
  have), flips off (they depend on the category). The 10,000 samples are drawn once per fit
  from ``seed`` and reshuffled every epoch; the last, partial batch is kept.
* **SSIM constants**: the thesis prints ``c1 = 0.01, c2 = 0.03``; these are Wang et al.'s
  ``K1, K2``, whose constants are ``(K L)^2``. ``ssim_constants=standard`` (default) uses
  ``c1 = 1e-4, c2 = 9e-4`` (L = 1 for [0, 1] images); ``printed`` uses the bare values, which
  make SSIM blind to contrast changes of low-variance regions (a standard deviation of 0.05 on
  [0, 1] images has variance 0.0025, far below c2 = 0.03), against the thesis' own Fig. 3.2.
  Windows are zero-padded at the borders (vad_reconstruction's SSIM).
* **Post-processing**: Ch. 3 opens each thresholded segmentation with a disk of diameter 4.
  ``opening=4`` does it on the map itself (a flat grayscale opening, the same segmentation at
  every threshold: :func:`vad_autoencoder.network.open_maps`); off by default as in Ch. 4. vad
  blurs maps with a Gaussian (``--sigma``, default 4) like every detector: ``--sigma 0`` gives
  the thesis' maps. Image scores are the raw map maximum, before the blur.
* Weights: PyTorch's default initialisation (the thesis names none); model selection: the
  weights after the last epoch (the thesis names none).

ONNX: ``vad export`` works for ``loss=l2`` (parity tested, patches included). ``loss=ssim`` does
not export yet: ``vad_reconstruction.losses.ssim_map`` builds its window from a traced channel
count, which the ONNX exporter refuses as a convolution kernel of unknown shape.

Training runs through vad's shared loop: one loop step is one epoch over the sample set, in
which the detector takes its own Adam steps (``steps_itself``); ``max_steps`` counts Adam steps.
Checkpoints and resume come from the loop. bfloat16 autocast on CUDA is allowed: the networks
run in bfloat16, the losses and maps in float32.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from vad.contracts import DetectorFeatures, Prediction, Preprocessing
from vad.errors import VadError
from vad.options import option
from vad.training import TrainedDetector
from vad_autoencoder.augment import SamplePlan, draw_plan, render
from vad_autoencoder.network import ConvAutoencoder, Layer, encoder_layers, l2_map, layer_strides, open_maps, ssim_residual_map, to_gray, valid_side
from vad_reconstruction.patches import reconstruct_by_patches

#: Patches reconstructed per network call at inference: large, so that a traced export holds
#: the network once for every patch of a small batch.
PATCHES_PER_CALL = 256
#: The stabilising constants of ``ssim_constants``: standard ``(K L)^2`` with L = 1, or as printed.
SSIM_CONSTANTS = {"standard": None, "printed": (0.01, 0.03)}


class AutoencoderBase(TrainedDetector):
    """What the thesis' autoencoders share (``autoencoder``, ``vae``): the network for the input
    side, the augmented sample set, self-stepped training, patchwise maps, features, export.

    A method supplies :meth:`make_network`, :meth:`training_loss` and :meth:`scorer`.
    """

    input = "images"
    produces_maps = True
    fixed_input_size = True
    steps_itself = True

    class Options(TrainedDetector.Options):
        architecture: Literal["thesis", "loco"] = option("thesis", "thesis: Table 3.1 (LeakyReLU 0.2, one more 4x4 stride-2 layer per doubling of the side beyond 128); loco: Table 6.3 (stride-2 layers, batch norm, LeakyReLU 0.05).")
        image_size: int = option(256, "Square side images are resized to (thesis Ch. 4: 256); the network input when patch_size is null.", ge=32)
        patch_size: int | None = option(None, "null: whole images (Ch. 4 objects); a side (power of two >= 32): patches of it train and are reconstructed at patch_stride (Ch. 4 textures: 128, or 256 on 512 px images).", ge=32)
        patch_stride: int = option(64, "Stride of the patches at inference (thesis Ch. 4: 64; Ch. 3: 30).", ge=1)
        patch_average: Literal["maps", "reconstructions"] = option("maps", "Where patches overlap, average their anomaly maps (Ch. 4) or their reconstructions (Ch. 3).")
        latent_dim: int = option(128, "Latent dimension d (Ch. 4: 128; Ch. 3: 100 for textures, 500 for NanoTWICE; Ch. 6: 32).", ge=1)
        grayscale: bool | None = option(None, "Train and score on grayscale (BT.601 luma); null: the method's choice.")
        epochs: int = option(100, "Passes over the augmented sample set (thesis Ch. 4: 100).", ge=1)
        training_samples: int = option(10000, "Augmented samples drawn once from the training images (thesis: 10,000 per category).", ge=1)
        batch_size: int = option(128, "Samples per Adam step, reshuffled every epoch (thesis Ch. 4: 128).", ge=1)
        lr: float = option(2e-4, "Adam learning rate (thesis: 2e-4).", gt=0)
        weight_decay: float = option(1e-5, "Adam weight decay (thesis Ch. 3: 1e-5; Ch. 4 states none).", ge=0)
        rotation: float = option(3.0, "Whole-image samples: random rotation up to this many degrees (magnitude unstated in Ch. 4; Ch. 6-7: 3).", ge=0, le=180)
        translation: float = option(0.05, "Whole-image samples: random shift up to this fraction of the side per axis (unstated in the thesis; our choice).", ge=0, lt=0.5)
        horizontal_flip: bool = option(False, "Whole-image samples: mirror left-right with probability 1/2 (thesis: where the object allows it).")
        vertical_flip: bool = option(False, "Whole-image samples: mirror top-bottom with probability 1/2 (thesis: where the object allows it).")
        opening: int = option(0, "Grayscale opening of the map with a disk of this diameter in px, the same as opening every thresholded segmentation (Ch. 3: 4; Ch. 4: none, 0).", ge=0)

        def check(self) -> None:
            if self.patch_size is None:
                if not valid_side(self.image_size):
                    raise self.invalid("image_size", "a power of two >= 32 when patch_size is null (the whole image is the network input)")
            elif not valid_side(self.patch_size):
                raise self.invalid("patch_size", "null or a power of two >= 32")
            elif self.patch_size > self.image_size:
                raise self.invalid("patch_size", f"at most image_size ({self.image_size})")

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._plan: SamplePlan | None = None
        self._optimizer: torch.optim.Optimizer | None = None

    # ------------------------------------------------------------------ the method's part

    def uses_grayscale(self) -> bool:
        """Whether images become one luma channel (``grayscale``; null: colour)."""
        return bool(self.options.grayscale)

    def make_network(self) -> nn.Module:
        """A fresh network (the global random state is seeded by :meth:`build`)."""
        return ConvAutoencoder(self.network_side, self.channels, self.options.latent_dim, self.options.architecture)

    @abc.abstractmethod
    def training_loss(self, model: nn.Module, samples: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The loss of one batch of augmented samples."""

    @abc.abstractmethod
    def scorer(self) -> PatchwiseScorer:
        """The module mapping prepared images to ``(scores, maps)``."""

    # ------------------------------------------------------------------ geometry

    @property
    def network_side(self) -> int:
        """The side of the network's square input: the patch side, or the image side."""
        return self.options.patch_size or self.options.image_size

    @property
    def channels(self) -> int:
        """Input channels of the network: 1 for grayscale, else 3."""
        return 1 if self.uses_grayscale() else 3

    def network_input(self, images: torch.Tensor) -> torch.Tensor:
        """Checked RGB batches as the network sees them (luma when grayscale)."""
        return to_gray(images) if self.uses_grayscale() else images

    @property
    def preprocessing(self) -> Preprocessing:  # type: ignore[override]
        """Square ``image_size`` images in [0, 1] (mean 0, std 1), bilinear resize."""
        size = self.options.image_size
        return Preprocessing(size=(size, size), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), interpolation="bilinear")

    # ------------------------------------------------------------------ training

    def build(self, input_meta: dict[str, Any]) -> dict[str, nn.Module]:
        """The network, initialised from ``seed`` (the global random state is left as it was)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.options.seed)
            return {"model": self.make_network()}

    def fit(self, batches: Iterable[torch.Tensor]) -> None:
        """Hold the training images in memory and train through the shared loop (one loop step
        per epoch over the sample set drawn from them)."""
        pool = [self.check_batch(batch, "fit") for batch in batches]
        if not pool:
            raise VadError(f"{self.describe_owner()} got an empty training set: it needs normal training images")
        super().fit([torch.cat(pool)])

    @property
    def steps_per_epoch(self) -> int:
        """Adam steps per pass over the sample set."""
        return math.ceil(self.options.training_samples / self.options.batch_size)

    @property
    def total_epochs(self) -> int:
        """``epochs``, or fewer when ``max_steps`` Adam steps end training earlier."""
        options = self.options
        if options.max_steps is None:
            return options.epochs
        return min(options.epochs, math.ceil(options.max_steps / self.steps_per_epoch))

    def before_training(self) -> None:
        """Forget the previous fit's sample set (it depends on the training images)."""
        self._plan = None

    def optimizers(self) -> tuple[list[torch.optim.Optimizer], list[Any]]:
        """Adam (lr, weight decay as L2 on the gradients), no schedule."""
        self._optimizer = torch.optim.Adam(self.networks["model"].parameters(), lr=self.options.lr, weight_decay=self.options.weight_decay)
        return [self._optimizer], []

    def sample_plan(self, count: int) -> SamplePlan:
        """The augmented sample set for ``count`` training images, drawn from ``seed`` alone (a
        resumed fit draws the same set)."""
        options = self.options
        generator = torch.Generator().manual_seed(options.seed)
        return draw_plan(
            options.training_samples, count, options.image_size, options.patch_size, generator,
            options.rotation, options.translation, options.horizontal_flip, options.vertical_flip,
        )

    def training_step(self, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One epoch: the sample set in a fresh random order, one Adam step per ``batch_size``
        samples; returns their mean loss."""
        assert self._optimizer is not None
        images = self.network_input(batch)
        if self._plan is None:
            self._plan = self.sample_plan(len(images))
        order = torch.argsort(torch.rand(self._plan.count, generator=generator, dtype=torch.float64))
        model, size = self.networks["model"], self.options.batch_size
        done = (self.current_epoch - 1) * self.steps_per_epoch
        losses = []
        for start in range(0, len(order), size):
            if self.options.max_steps is not None and done + len(losses) >= self.options.max_steps:
                break
            samples = render(images, self._plan, order[start : start + size], self.options.patch_size)
            loss = self.training_loss(model, samples, generator)
            self.optimizer_step(self._optimizer, loss)
            losses.append(loss.detach())
        return torch.stack(losses).mean()

    # ------------------------------------------------------------------ prediction

    def predict(self, batch: torch.Tensor) -> Prediction:
        """Maps ``[B, H, W]`` at ``image_size`` and image scores ``[B]`` (map maximum)."""
        return self.scored_by(self.export_module(), batch)

    def export_module(self) -> nn.Module:
        """The scorer, ``images -> (scores, maps)``, in eval mode (exporters restore the mode
        they found after tracing)."""
        self.require_fitted()
        return self.scorer().eval()

    def scorer_options(self) -> dict[str, Any]:
        """The keyword arguments every :class:`PatchwiseScorer` takes from the options."""
        options = self.options
        return {
            "grayscale": self.uses_grayscale(), "patch_size": options.patch_size, "patch_stride": options.patch_stride,
            "patch_average": options.patch_average, "opening": options.opening,
        }

    # ------------------------------------------------------------------ features

    def feature_source(self, **options: Any) -> AutoencoderFeatures:
        """The encoder's hidden layers as a FeatureSource (default: the bottleneck's input)."""
        return AutoencoderFeatures(self, **options)

    def encoder_layers(self) -> list[Layer]:
        """The encoder's hidden layers for the options, without building the network."""
        return encoder_layers(self.network_side, self.options.architecture)

    @property
    def layer_names(self) -> list[str]:
        """The encoder's hidden layers, ``conv1`` (input side) to ``convN`` (before the latent)."""
        return [f"conv{i + 1}" for i in range(len(self.encoder_layers()))]


class Autoencoder(AutoencoderBase):
    """The L2- or SSIM-Autoencoder: ``loss`` sets the training loss and the anomaly map."""

    name = "autoencoder"

    class Options(AutoencoderBase.Options):
        loss: Literal["l2", "ssim"] = option("l2", "Training loss and anomaly map: l2 (per-pixel squared L2, colour) or ssim (1 - SSIM, grayscale); l2 leads the thesis' MVTec AD benchmark.")
        ssim_window: int = option(11, "SSIM window side K (thesis: 11).", ge=3, rule=(lambda v: v % 2 == 1, "odd"))
        ssim_constants: Literal["standard", "printed"] = option("standard", "SSIM c1, c2: standard (0.01 L)^2, (0.03 L)^2 with L = 1; printed: the thesis' bare 0.01, 0.03 (deviation: standard).")

    tiny_options = {"image_size": 32, "latent_dim": 16, "training_samples": 8, "batch_size": 4, "epochs": 1}
    #: Two Adam steps learn nothing to rank by.
    tiny_image_auroc = None

    def uses_grayscale(self) -> bool:
        """``grayscale``, or by default the SSIM-AE's grayscale (SSIM is single-channel in the thesis)."""
        return self.options.grayscale if self.options.grayscale is not None else self.options.loss == "ssim"

    def residual(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The anomaly map function of the chosen loss: ``(images, reconstructions) -> [B, H, W]``."""
        if self.options.loss == "l2":
            return l2_map
        return partial(ssim_residual_map, window=self.options.ssim_window, constants=SSIM_CONSTANTS[self.options.ssim_constants])

    def training_loss(self, model: nn.Module, samples: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """``1/B`` times the sum of the anomaly map over each sample's pixels (eq. 3.2 for l2),
        in float32 outside autocast."""
        reconstructions = model(samples)
        with torch.autocast(samples.device.type, enabled=False):
            return self.residual()(samples.float(), reconstructions.float()).flatten(1).sum(1).mean()

    def scorer(self) -> AutoencoderScorer:
        """Reconstruction and the chosen residual map."""
        return AutoencoderScorer(self.networks["model"], self.residual(), **self.scorer_options())


class PatchwiseScorer(nn.Module, abc.ABC):
    """``images [B, 3, H, W] -> (scores [B], maps [B, H, W])`` around a fitted network.

    A subclass gives :meth:`reconstruct` (``samples`` reconstructions of a batch) and
    :meth:`residual` (their anomaly map). With patches, the image is cut at ``patch_stride``
    (:func:`vad_reconstruction.patches.reconstruct_by_patches`) and either each patch's map or
    its reconstructions are averaged where patches overlap. Then the optional opening, and the
    score: the map's maximum.
    """

    #: Reconstructions :meth:`reconstruct` returns per image.
    samples = 1

    def __init__(self, model: nn.Module, *, grayscale: bool, patch_size: int | None, patch_stride: int, patch_average: str, opening: int) -> None:
        super().__init__()
        self.model = model
        self.grayscale, self.patch_size, self.patch_stride = grayscale, patch_size, patch_stride
        self.patch_average, self.opening = patch_average, opening

    @abc.abstractmethod
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """``[samples, N, C, h, w]`` reconstructions of network-sized inputs ``[N, C, h, w]``."""

    @abc.abstractmethod
    def residual(self, x: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
        """The anomaly map ``[N, h, w]`` of inputs and their reconstructions."""

    def maps(self, x: torch.Tensor) -> torch.Tensor:
        """Anomaly maps ``[B, H, W]`` of network inputs ``[B, C, H, W]`` (patchwise if set)."""
        if self.patch_size is None:
            return self.residual(x, self.reconstruct(x))
        p, stride, size = self.patch_size, self.patch_stride, PATCHES_PER_CALL
        if self.patch_average == "maps":

            def patch_maps(patches: torch.Tensor) -> torch.Tensor:
                return self.residual(patches, self.reconstruct(patches)).unsqueeze(1)

            return reconstruct_by_patches(x, patch_maps, p, stride, size)[:, 0]
        batch, channels, height, width = x.shape

        def stacked(patches: torch.Tensor) -> torch.Tensor:  # every sample's reconstruction along the channels
            return self.reconstruct(patches[:, :channels]).transpose(0, 1).reshape(patches.shape)

        averaged = reconstruct_by_patches(x.repeat(1, self.samples, 1, 1), stacked, p, stride, size)
        return self.residual(x, averaged.view(batch, self.samples, channels, height, width).transpose(0, 1))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores and maps as the detector's ``predict``."""
        x = to_gray(images) if self.grayscale else images
        maps = open_maps(self.maps(x), self.opening)
        return maps.flatten(1).amax(1), maps


class AutoencoderScorer(PatchwiseScorer):
    """The deterministic autoencoder: one reconstruction, a residual map function."""

    def __init__(self, model: nn.Module, residual: Any, **options: Any) -> None:
        super().__init__(model, **options)
        self._residual = residual

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """The network's reconstruction, ``[1, N, C, h, w]``."""
        return self.model(x).unsqueeze(0)

    def residual(self, x: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
        """The chosen map of the one reconstruction (float32)."""
        return self._residual(x.float(), reconstructions[0].float())


class AutoencoderFeatures(DetectorFeatures):
    """The encoder's hidden layers as patch features (``--backbone detector:autoencoder``).

    Cut point: the outputs (after the activation) of the chosen encoder convolutions, by default
    the last one, the input of the latent convolution. The encoder is convolutional, so it runs
    on the whole (grayscale when the detector is) image, also when the detector reconstructs
    patches. Several layers are resized bilinearly to the first one's grid and concatenated.
    """

    name = "autoencoder-features"

    class Options(DetectorFeatures.Options):
        layers: list[str] | None = option(None, "Encoder layers conv1..convN to expose (N depends on the input side); null: convN, the input of the latent convolution.")

        def check(self) -> None:
            if self.layers is not None and (not self.layers or len(set(self.layers)) != len(self.layers)):
                raise self.invalid("layers", "null or a non-empty list of distinct encoder layers such as ['conv5', 'conv8']")

    @property
    def exposed(self) -> list[str]:
        """The chosen layers (checked against the detector's encoder)."""
        names = self.detector.layer_names
        chosen = list(self.options.layers) if self.options.layers is not None else names[-1:]
        unknown = [name for name in chosen if name not in names]
        if unknown:
            raise VadError(f"{self.detector.name}-features: layers {unknown} are not among the encoder's layers {names}")
        return chosen

    @property
    def out_channels(self) -> int:
        """Sum of the chosen layers' channels."""
        layers, names = self.detector.encoder_layers(), self.detector.layer_names
        return sum(layers[names.index(name)].channels for name in self.exposed)

    @property
    def stride(self) -> int:
        """Input pixels per grid cell (the first chosen layer's stride)."""
        names = self.detector.layer_names
        return layer_strides(self.detector.encoder_layers())[names.index(self.exposed[0])]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Features ``[B, out_channels, H / stride, W / stride]``."""
        detector = self.detector
        detector.require_fitted()
        images = detector.check_batch(images, "features")
        positions = [detector.layer_names.index(name) for name in self.exposed]
        with torch.no_grad():
            levels = detector.networks["model"].eval().features(detector.network_input(images), positions)
            grid = levels[0].shape[-2:]
            resized = [level if level.shape[-2:] == grid else F.interpolate(level, size=grid, mode="bilinear", align_corners=False) for level in levels]
            return torch.cat(resized, dim=1)
