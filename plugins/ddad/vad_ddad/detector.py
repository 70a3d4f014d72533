"""DDAD as a vad image detector (``--detector ddad``) and its adapted features as a FeatureSource.

Mousakhan, Brox, Tayyub, "Anomaly Detection with Conditioned Denoising Diffusion Models",
arXiv 2305.15956, and its official code (github.com/arimousa/DDAD, commit 4323a15:
``config.yaml``, ``main.py``, ``train.py``, ``loss.py``, ``unet.py``, ``reconstruction.py``,
``feature_extractor.py``, ``anomaly_map.py``, ``ddad.py``). The formulas are in
:mod:`vad_ddad.network`.

Training has two phases, run one after the other by vad's shared loop (``total_epochs`` =
``epochs + da_epochs``; :meth:`Ddad.training_step` reads ``current_epoch``):

1. **The denoising UNet** (``train.py``): images in [-1, 1] at 256 px, shuffled batches of 32,
   a timestep ``t ~ U{0..T-1}`` per image (T = 1000, linear betas 1e-4 to 0.02), the noise
   prediction's squared error summed over pixels and averaged over the batch, Adam (lr 3e-4,
   L2 weight decay 0.05), no learning-rate schedule, no EMA. The official run trains 3000 epochs
   and evaluates the checkpoint of epoch 2000 (``load_chp``); without a schedule that is a
   2000-epoch run, so ``epochs`` defaults to 2000 (the README's per-category table uses
   1000-3000).
2. **Domain adaptation of the feature extractor** (``feature_extractor.py``), 4 epochs: each
   shuffled batch of 16 is split in halves, targets ``y`` (first half) and inputs (second half);
   each input is noised to ``da_steps`` and denoised conditioned on its target with ``w_DA`` =
   3 (the UNet in eval mode, without gradients), giving ``x_0``; the extractor, in train mode,
   learns with AdamW (lr 1e-4, torch's default weight decay 0.01) on ``L_DA`` over its levels at
   strides 4, 8, 16 (WideResNet ``layer1``-``layer3``), with a frozen copy of the pretrained
   extractor for the two distillation terms weighted by ``DLlambda`` = 0.1.

Prediction (``ddad.py``, ``anomaly_map.py``): each image is noised to ``test_steps`` = 250 and
denoised conditioned on itself with ``w`` = 2 in DDIM steps of ``skip`` = 25 (``eta`` = 1:
stochastic steps), giving ``x_0``. The map is ``D_f + v (max D_f / max D_p) D_p`` (``v`` = 1)
with ``D_p`` the L1 distance of ``x_0`` and the image averaged over the colour channels and
``D_f`` the sum over the extractor's levels at strides 8 and 16 (``layer2``, ``layer3``) of
``1 - cos`` between the 3x3-averaged features of ``x_0`` and of the image, upsampled to the
image size; the image score is the maximum of the map blurred by a Gaussian of sigma 4.

The UNet is written here (:class:`vad_ddad.network.UNetModel`), faithful to ``unet.py``:
diffusers' ``UNet2DModel`` cannot express it, because DDAD fixes the number of attention heads
(4, so the head width grows with the channels) where diffusers fixes the head width, and it
initialises differently (DDAD zeroes the last convolution of each residual branch, attention
projection and output). diffusers provides the noise schedule, the forward noising and the DDIM
step (:func:`vad_ddad.network.noise_schedule`).

Every option's description gives the official value (``vad list detectors --details``); the
README tunes ``w`` per category (MVTec AD: carpet 0, grid 4, leather 11, tile 4, wood 11,
bottle 3, cable 3, capsule 8, hazelnut 5, metal nut 7, pill 9, screw 2, toothbrush 0,
transistor 0, zipper 10), the training epochs (1000-3000) and the DA epochs (0-16).

Deviations (each also noted where it happens):

* **Feature extractor**: the official ``wide_resnet101_2`` (config default; ``wide_resnet50_2``
  and ``resnet50`` are its alternatives) needs ImageNet weights from the hub, which cannot be
  downloaded here, so the default is ``tf_efficientnet_lite0`` (weights packaged offline) at
  the same strides: ``blocks.1``, ``blocks.2``, ``blocks.4`` for the adaptation,
  ``blocks.2``, ``blocks.4`` for the map. ``backbone=wide_resnet50_2`` (or
  ``timm:wide_resnet101_2``) with ``weights=FILE`` gives the paper's; inputs are normalised with
  the extractor's own mean and std (ImageNet's for ResNets, as official).
* **Map normalisation per image**: the official ``max D_f / max D_p`` is taken over the whole
  test batch (16 images), so a score depends on the other images of its batch; here each
  image's own maxima are used (the paper's formula for one image).
* **Fixed sampling noise at prediction**: the official code draws fresh noise from the global
  generator (seeded 42 at start), so a score depends on the order of the test images; here the
  initial noise and the noise of each DDIM step are one draw from ``seed``, the same for every
  image, so an image's score depends on that image only, the ONNX graph is deterministic and
  calibration scores compare with test scores. Training draws fresh noise from the fit's
  generator, as official.
* **No MVTec centre crop**: the official code crops maps to the central 224 x 224 of 256 px
  before scoring and evaluation (an MVTec-specific step); here the score is the maximum over
  the whole map, and vad's ``--center-crop`` (which crops the input, not the map) is not the
  same thing.
* **Batches**: the official loaders drop the last incomplete batch (``drop_last=True``: with
  fewer than 32 images nothing trains); here every image trains. A domain-adaptation batch of
  odd size leaves its last image out, and a batch of one image (an epoch's last) trains nothing.
* **Blur of the maps**: the score is the maximum of the map blurred as the official code does
  (kornia's ``gaussian_blur2d``, sigma 4, kernel 33, border mirrored without the edge pixel).
  The maps are returned unblurred and vad's post-processing blurs them (``--sigma``, default 4),
  whose mirror repeats the edge pixel (scipy's ``reflect``): the maps the pixel metrics see
  differ from the official ones within 16 px of the border.
* **Model selection**: the weights after the last epoch of each phase are the model (the
  official README picks per category the checkpoint and the DA epoch that gave the best test
  results).
* **Image sizes**: the official channel table offers 32, 64, 128, 256 (and a 512 entry that
  cannot run); ``channel_mults`` sets other depths and sizes.

On a CPU the defaults are infeasible, even for a demo: a prediction takes ``test_steps / skip``
= 10 passes of the 33-million-parameter 256 px UNet (about a minute per image on two shared
cores), and the training 2000 epochs. A CPU run of minutes takes small images
(``--image-size 64``), a narrower UNet without the 32 x 32 attention (``base_channels=32``,
``attention_resolutions=[16, 8]``), longer DDIM steps (``skip=50``, ``da_skip=50``: 5 UNet
passes) and a few epochs: a smoke run, not a trained diffusion model.

``--backbone detector:ddad`` reads the adapted extractor's features of the image
(:class:`DdadFeatures`).

Mixed precision (bfloat16 autocast on CUDA) is allowed: the UNet is guided-diffusion's, which
trains in half precision with the same float32 GroupNorm and softmax.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vad.contracts import Backbone, DetectorFeatures, Prediction, Preprocessing
from vad.errors import VadError
from vad.features import chosen_levels, network_backbone
from vad.options import option
from vad.training import TrainedDetector
from vad_ddad.network import (
    CHANNEL_MULTS,
    FeatureExtractor,
    UNetModel,
    combine_maps,
    conditioned_reconstruction,
    diffusion_loss,
    domain_adaptation_loss,
    feature_distance,
    gaussian_blur,
    noise_schedule,
    patchify,
    pixel_distance,
    trajectory,
)

#: Strides of the official extractor levels: WideResNet layer1-layer3 for the adaptation, layer2
#: and layer3 for the map (``anomaly_map.py`` skips the first).
ADAPTATION_STRIDES = (4, 8, 16)
MAP_STRIDES = (8, 16)


class Ddad(TrainedDetector):
    """DDAD: a denoising UNet reconstructs each image conditioned on itself; pixel and adapted-feature distances."""

    name = "ddad"
    input = "images"
    produces_maps = True
    steps_itself = True
    fixed_input_size = True

    class Options(TrainedDetector.Options):
        image_size: int = option(256, "Square input side in pixels (official 256); 32, 64, 128, 256 take the official channel table, other sizes need channel_mults.", ge=8)
        epochs: int = option(2000, "Passes of the UNet's training (official: 3000 trained, epoch 2000 evaluated, load_chp; the README's categories 1000-3000).", ge=1)
        batch_size: int = option(32, "Images per Adam step of the UNet, reshuffled every epoch (official 32).", ge=1)
        lr: float = option(3e-4, "Adam learning rate of the UNet (official 3e-4, constant).", gt=0)
        weight_decay: float = option(0.05, "Adam (L2) weight decay of the UNet (official 0.05).", ge=0)
        base_channels: int = option(64, "UNet width (official 64; DDAD-S 32; 32 with image_size 64 trains on a CPU).", ge=1)
        channel_mults: list[int] | None = option(None, "UNet width multipliers per level; null: the official table (256: 1,1,2,2,4,4; 128: 1,1,2,3,4; 64 and 32: 1,2,3,4).", ge=1)
        res_blocks: int = option(2, "Residual blocks per UNet level (official 2).", ge=1)
        attention_resolutions: list[int] = option([32, 16, 8], "Feature-map sides of the UNet with self-attention, as image_size // resolution (official 32, 16, 8).", ge=1)
        heads: int = option(4, "Attention heads, a fixed count (official 4; DDAD-S 2).", ge=1)
        dropout: float = option(0.0, "Dropout in the UNet's residual blocks (official 0; DDAD-S 0.3).", ge=0, lt=1)
        norm_groups: int = option(32, "GroupNorm groups of the UNet (official 32; must divide every width).", ge=1)
        trajectory_steps: int = option(1000, "Diffusion steps T of the noise schedule (official 1000).", ge=2)
        beta_start: float = option(1e-4, "First beta of the linear schedule (official 1e-4).", gt=0, lt=1)
        beta_end: float = option(0.02, "Last beta of the linear schedule (official 0.02).", gt=0, lt=1)
        w: float = option(2.0, "Conditioning weight at prediction (official 2; README per category 0-11).", ge=0)
        test_steps: int = option(250, "Noise level the test images are noised to before denoising (official test_trajectoy_steps 250).", ge=1)
        skip: int = option(25, "Timesteps per DDIM step at prediction, dividing trajectory_steps (official 25: 10 UNet passes; 50 halves the time).", ge=1)
        eta: float = option(1.0, "DDIM stochasticity (official 1; 0: deterministic steps).", ge=0)
        v: float = option(1.0, "Weight of the pixel distance against the feature distance (official 1 for MVTec AD, 7 for VisA).", ge=0)
        sigma: float = option(4.0, "Gaussian sigma of the map whose maximum is the image score (official 4, kernel 33; 0: raw maximum).", ge=0)
        backbone: str = option("tf_efficientnet_lite0", "Feature extractor, a vad backbone or timm:MODEL (official wide_resnet101_2; deviation: EfficientNet-Lite0, weights packaged offline; wide_resnet50_2 with weights=FILE).")
        pretrained: bool = option(True, "Extractor with pretrained weights (official: ImageNet); false: random weights from seed, for tests only (scores not meaningful).")
        weights: str | None = option(None, "A local weights file (.safetensors or .pth, timm key names) for the extractor instead of the packaged or hub weights.")
        layers: list[str] | None = option(None, "Extractor levels the domain adaptation aligns; null: those at strides 4, 8, 16 (official layer1-3; lite0 blocks.1, blocks.2, blocks.4).")
        map_layers: list[str] | None = option(None, "Extractor levels of the feature distance; null: those at strides 8, 16 (official layer2, layer3; lite0 blocks.2, blocks.4).")
        da_epochs: int = option(4, "Passes of the extractor's domain adaptation after the UNet's training (official DA_epochs 4; README per category 0-16; 0: none).", ge=0)
        da_batch_size: int = option(16, "Images per domain-adaptation step, half targets and half inputs (official DA_batch_size 16).", ge=2)
        da_lr: float = option(1e-4, "AdamW learning rate of the extractor (official 1e-4).", gt=0)
        w_da: float = option(3.0, "Conditioning weight of the domain adaptation's reconstructions (official w_DA 3).", ge=0)
        da_steps: int = option(250, "Noise level of the domain adaptation's inputs (official test_trajectoy_steps_DA 250).", ge=1)
        da_skip: int = option(25, "Timesteps per DDIM step in the domain adaptation, dividing trajectory_steps (official skip_DA 25).", ge=1)
        da_lambda: float = option(0.1, "Weight of the distillation terms to the frozen extractor (official DLlambda 0.1 for MVTec AD, 0.01 for VisA).", ge=0)

        def check(self) -> None:
            mults = self.channel_mults or CHANNEL_MULTS.get(self.image_size)
            if mults is None:
                raise self.invalid("image_size", f"one of {sorted(CHANNEL_MULTS)} (the official channel table), or any size with channel_mults")
            if self.image_size % 2 ** (len(mults) - 1):
                raise self.invalid("image_size", f"a multiple of {2 ** (len(mults) - 1)} for {len(mults)} UNet levels")
            for mult in mults:
                width = self.base_channels * mult
                if width % self.norm_groups:
                    raise self.invalid("norm_groups", f"a divisor of every UNet width (base_channels x channel_mults: {width})")
                if width % self.heads:
                    raise self.invalid("heads", f"a divisor of every UNet width (base_channels x channel_mults: {width})")
            for name in ("skip", "da_skip"):
                if self.trajectory_steps % getattr(self, name):
                    raise self.invalid(name, f"a divisor of trajectory_steps {self.trajectory_steps}")
            for name in ("test_steps", "da_steps"):
                if getattr(self, name) >= self.trajectory_steps:
                    raise self.invalid(name, f"below trajectory_steps {self.trajectory_steps}")
            if self.beta_end <= self.beta_start:
                raise self.invalid("beta_end", f"above beta_start {self.beta_start}")
            for name in ("layers", "map_layers"):
                layers = getattr(self, name)
                if layers is not None and (not layers or len(set(layers)) != len(layers)):
                    raise self.invalid(name, "null or a non-empty list of distinct extractor layers such as ['layer2', 'layer3']")
            if self.attention_resolutions and len(set(self.attention_resolutions)) != len(self.attention_resolutions):
                raise self.invalid("attention_resolutions", "distinct feature-map sides such as [32, 16, 8]")

    tiny_options = {
        "backbone": "resnet18", "pretrained": False, "image_size": 32, "channel_mults": [1, 2], "base_channels": 8, "norm_groups": 4,
        "attention_resolutions": [16], "res_blocks": 1, "epochs": 1, "batch_size": 8,
        "test_steps": 2, "skip": 1, "da_epochs": 1, "da_batch_size": 8, "da_steps": 2, "da_skip": 1,
    }
    #: No claim: one epoch of an 8-channel UNet and a random extractor rank nothing in particular.
    tiny_image_auroc = None

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._skeleton: Backbone | None = None
        self._scheduler = None
        self._frozen: FeatureExtractor | None = None

    # ------------------------------------------------------------------ the extractor

    def _backbone(self, pretrained: bool) -> Backbone:
        """The extractor spec built as a vad Backbone (weights only when ``pretrained``)."""
        return network_backbone(
            self.options.backbone, pretrained=pretrained, weights=self.options.weights, owner="ddad",
            purpose="it cannot be fine-tuned", examples="tf_efficientnet_lite0 or wide_resnet50_2",
        )

    @property
    def skeleton(self) -> Backbone:
        """The extractor randomly initialised from ``seed`` (its levels, mean and std, and the
        network :meth:`build` copies), made once; the global random state is left as it was."""
        if self._skeleton is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.options.seed)
                self._skeleton = self._backbone(pretrained=False)
        return self._skeleton

    @property
    def layers(self) -> list[str]:
        """The adapted levels' names (``layers=null`` resolved on first use and saved)."""
        if self.options.layers is None or self.options.map_layers is None:
            self._resolve_layers()
        return list(self.options.layers)

    @property
    def map_layers(self) -> list[str]:
        """The levels of the feature distance (``map_layers=null`` resolved on first use and saved)."""
        if self.options.layers is None or self.options.map_layers is None:
            self._resolve_layers()
        return list(self.options.map_layers)

    def _resolve_layers(self) -> None:
        adapted = chosen_levels(self.skeleton, self.options.layers, ADAPTATION_STRIDES, self.name, "layers")
        mapped = chosen_levels(self.skeleton, self.options.map_layers, MAP_STRIDES, self.name, "map_layers")
        self.options = self.options.replace(layers=[level.name for level in adapted], map_layers=[level.name for level in mapped])

    @property
    def extracted(self) -> list[str]:
        """Every level the extractor returns (adapted and mapped), shallow to deep."""
        wanted = set(self.layers) | set(self.map_layers)
        return [info.name for info in self.skeleton.feature_info() if info.name in wanted]

    def channels(self, layers: Sequence[str]) -> list[int]:
        """The channels of the named levels."""
        widths = {info.name: info.channels for info in self.skeleton.feature_info()}
        return [widths[layer] for layer in layers]

    def _extractor(self) -> FeatureExtractor:
        """A trainable copy of the skeleton's network returning :attr:`extracted`."""
        names = [info.name for info in self.skeleton.feature_info()]
        own = self.skeleton.preprocessing
        model = copy.deepcopy(self.skeleton.model).requires_grad_(True)
        return FeatureExtractor(model, [names.index(layer) for layer in self.extracted], own.mean, own.std)

    def pick_levels(self, features: list[torch.Tensor], layers: Sequence[str]) -> list[torch.Tensor]:
        """The maps of the named levels among the extractor's outputs (:attr:`extracted`)."""
        extracted = self.extracted
        return [features[extracted.index(layer)] for layer in layers]

    @property
    def scheduler(self):
        """diffusers' DDIM scheduler with the official linear betas (made once)."""
        if self._scheduler is None:
            options = self.options
            self._scheduler = noise_schedule(options.trajectory_steps, options.beta_start, options.beta_end)
        return self._scheduler

    # ------------------------------------------------------------------ contract

    @property
    def preprocessing(self) -> Preprocessing:  # type: ignore[override]
        """Square ``image_size`` inputs scaled to [-1, 1] (mean 0.5, std 0.5: official ``2 x - 1``), bilinear resize."""
        size = self.options.image_size
        return Preprocessing(size=(size, size), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bilinear")

    @property
    def total_epochs(self) -> int:
        """The UNet's epochs, then the domain adaptation's."""
        return self.options.epochs + self.options.da_epochs

    @property
    def adapting(self) -> bool:
        """Whether the loop is in the domain-adaptation phase."""
        return self.current_epoch > self.options.epochs

    # ------------------------------------------------------------------ training

    def build(self, input_meta: dict[str, Any]) -> dict[str, nn.Module]:
        """The UNet and the extractor, randomly initialised from ``seed`` (the UNet as official,
        the extractor as timm); :meth:`before_training` gives the extractor its pretrained
        weights and ``load_state`` restores both. The global random state is left as it was."""
        options = self.options
        extractor = self._extractor()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(options.seed)
            unet = UNetModel(
                options.image_size, options.base_channels, options.channel_mults or CHANNEL_MULTS[options.image_size], heads=options.heads,
                num_res_blocks=options.res_blocks, dropout=options.dropout, attention_resolutions=options.attention_resolutions, groups=options.norm_groups,
            )
        return {"unet": unet, "extractor": extractor}

    def minibatch(self) -> int:
        """The official loaders' batch sizes, reshuffled every epoch: ``batch_size`` for the UNet, ``da_batch_size`` for the adaptation."""
        return self.options.da_batch_size if self.adapting else self.options.batch_size

    def before_training(self) -> None:
        """Give the extractor its pretrained weights and keep a frozen copy of them (the
        adaptation's reference; on resume the checkpoint then restores the adapted extractor)."""
        extractor = self.networks["extractor"]
        if self.options.pretrained:
            extractor.model.load_state_dict(self._backbone(pretrained=True).model.state_dict())
        else:
            from vad.progress import warn

            warn("ddad: the feature extractor is RANDOMLY INITIALISED (pretrained=false): scores are not meaningful")
        self._frozen = copy.deepcopy(extractor).requires_grad_(False).eval()

    def optimizers(self) -> tuple[list[torch.optim.Optimizer], list[Any]]:
        """Adam over the UNet (lr, L2 weight decay) and AdamW over the extractor (``da_lr``, torch's default weight decay 0.01), as official."""
        options = self.options
        self._unet_optimizer = torch.optim.Adam(self.networks["unet"].parameters(), lr=options.lr, weight_decay=options.weight_decay)
        self._extractor_optimizer = torch.optim.AdamW(self.networks["extractor"].parameters(), lr=options.da_lr)
        return [self._unet_optimizer, self._extractor_optimizer], []

    def training_step(self, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One Adam step of the UNet's noise prediction, or (after ``epochs``) one AdamW step of the domain adaptation."""
        return self._adaptation_step(batch, generator) if self.adapting else self._diffusion_step(batch, generator)

    def _diffusion_step(self, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        unet = self.networks["unet"].train()
        timesteps = torch.randint(0, self.options.trajectory_steps, (batch.shape[0],), generator=generator).to(batch.device)
        noise = torch.randn(batch.shape, generator=generator).to(batch.device)
        loss = diffusion_loss(unet, self.scheduler, batch, timesteps, noise)
        self.optimizer_step(self._unet_optimizer, loss)
        return loss.detach()

    def _adaptation_step(self, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        assert self._frozen is not None
        pairs = batch.shape[0] // 2
        if pairs == 0:  # a lone image (an epoch's last batch) has no target to be reconstructed towards
            return torch.zeros((), device=batch.device)
        options = self.options
        targets, inputs = batch[:pairs], batch[pairs : 2 * pairs]
        unet, extractor = self.networks["unet"].eval(), self.networks["extractor"].train()
        noises = [torch.randn(inputs.shape, generator=generator).to(batch.device) for _ in range(len(trajectory(options.da_steps, options.da_skip)) + 1)]
        with torch.no_grad():
            reconstruction = conditioned_reconstruction(unet, self.scheduler, inputs, targets, options.w_da, options.da_steps, options.da_skip, options.eta, noises)
            frozen = self.pick_levels(self._frozen(torch.cat([targets, reconstruction])), self.layers)  # eval mode: one pass
            target_frozen, reconstruction_frozen = [f[:pairs] for f in frozen], [f[pairs:] for f in frozen]
        reconstructed = self.pick_levels(extractor(reconstruction), self.layers)
        target = self.pick_levels(extractor(targets), self.layers)
        loss = domain_adaptation_loss(
            [f.float() for f in reconstructed], [f.float() for f in target], [f.float() for f in target_frozen], [f.float() for f in reconstruction_frozen], options.da_lambda
        )
        self.optimizer_step(self._extractor_optimizer, loss)
        return loss.detach()

    # ------------------------------------------------------------------ prediction

    def sampling_noise(self, device: torch.device) -> torch.Tensor:
        """The prediction's noise: the initial one and one per DDIM step, ``[steps + 1, 1, 3, H, W]``,
        one draw from ``seed`` shared by every image (see the module docstring)."""
        options = self.options
        count = len(trajectory(options.test_steps, options.skip)) + 1
        generator = torch.Generator().manual_seed(options.seed)
        return torch.randn(count, 1, 3, options.image_size, options.image_size, generator=generator).to(device)

    def predict(self, batch: torch.Tensor) -> Prediction:
        """Maps ``[B, H, W]`` (unblurred) and image scores ``[B]`` (maximum of the blurred map)."""
        return self.scored_by(self.export_module(), batch)

    def export_module(self) -> nn.Module:
        """The whole scoring, the DDIM loop unrolled: ``images -> (scores, maps)`` (in eval mode:
        exporters restore the mode they found after tracing)."""
        self.require_fitted()
        return DdadScorer(self, self.sampling_noise(self.device)).eval()

    # ------------------------------------------------------------------ features

    def feature_source(self, **options: Any) -> DdadFeatures:
        """The adapted extractor's features of the image as a FeatureSource."""
        return DdadFeatures(self, **options)


class DdadScorer(nn.Module):
    """DDAD's prediction as one traceable module: conditioned reconstruction (the loop over the
    ``test_steps / skip`` DDIM steps unrolled, fixed noise as buffers), map and score."""

    def __init__(self, detector: Ddad, noise: torch.Tensor) -> None:
        super().__init__()
        options = detector.options
        self.unet, self.extractor, self.scheduler = detector.networks["unet"], detector.networks["extractor"], detector.scheduler
        self.register_buffer("noise", noise)
        self.w, self.start, self.skip, self.eta, self.v, self.sigma = options.w, options.test_steps, options.skip, options.eta, options.v, options.sigma
        extracted = detector.extracted
        self.mapped = [extracted.index(layer) for layer in detector.map_layers]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores ``[B]`` and maps ``[B, H, W]`` for images in [-1, 1]."""
        reconstruction = conditioned_reconstruction(self.unet, self.scheduler, images, images, self.w, self.start, self.skip, self.eta, list(self.noise))
        count = images.shape[0]
        both = self.extractor(torch.cat([images, reconstruction]))  # one pass (eval mode: batch-independent)
        size = (images.shape[-2], images.shape[-1])
        features = feature_distance([both[i][count:].float() for i in self.mapped], [both[i][:count].float() for i in self.mapped], size)
        maps = combine_maps(pixel_distance(reconstruction, images), features, self.v)
        scores = gaussian_blur(maps, self.sigma).flatten(1).amax(dim=1)
        return scores, maps


class DdadFeatures(DetectorFeatures):
    """DDAD's features as patch features (``--backbone detector:ddad``).

    Cut point: the domain-adapted extractor's features of the image at the map's levels (default
    strides 8 and 16), each averaged over 3x3 neighbourhoods as the feature distance compares
    them, resized bilinearly to the grid of the first level and concatenated. These are the
    features ``D_f`` compares with the reconstruction's (no sampling here, so they are cheap);
    with ``da_epochs=0`` they are the pretrained extractor's. Preprocessing is the detector's.
    """

    name = "ddad-features"

    class Options(DetectorFeatures.Options):
        layers: list[str] | None = option(None, "Extractor levels to expose, among the detector's layers and map_layers; null: its map_layers.")

        def check(self) -> None:
            if self.layers is not None and (not self.layers or len(set(self.layers)) != len(self.layers)):
                raise self.invalid("layers", "null or a non-empty list of distinct extractor levels")

    @property
    def exposed(self) -> list[str]:
        """The exposed levels (checked against those the extractor returns)."""
        detector = self.detector
        chosen = list(self.options.layers) if self.options.layers is not None else detector.map_layers
        unknown = [layer for layer in chosen if layer not in detector.extracted]
        if unknown:
            raise VadError(f"ddad-features: layers {unknown} are not among the extractor's levels {detector.extracted}")
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
        exposed = self.exposed
        with torch.no_grad():
            levels = [patchify(level.float()) for level in detector.pick_levels(detector.networks["extractor"].eval()(images), exposed)]
            grid = levels[0].shape[-2:]
            return torch.cat([level if level.shape[-2:] == grid else F.interpolate(level, size=grid, mode="bilinear", align_corners=False) for level in levels], dim=1)
