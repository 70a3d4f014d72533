"""AnomalyDINO (Damm et al., "AnomalyDINO: Boosting Patch-based Few-shot Anomaly Detection with
DINOv2", WACV 2025) as a vad image detector.

The method, as the official code (github.com/dammsi/AnomalyDINO: ``run_anomalydino.py``,
``src/detection.py``, ``src/backbones.py``, ``src/utils.py``, ``src/post_eval.py``) runs it:

* features: DINOv2 ViT-S/14 (``dinov2_vits14`` from torch hub), the patch tokens of the last block
  after the final norm (``get_intermediate_layers``, ``norm=True``), the class token dropped;
  images resized (bicubic, antialiased) so the shorter side is 448 px (``--resolution 448``;
  672 in the batched zero-shot script) and normalised with ImageNet's mean and std;
* memory bank: every patch of the ``K`` reference (normal) images, each image also rotated by
  45, 90, ..., 315 degrees (the ``agnostic`` preprocessing rotates the references of every
  category); the references themselves are not masked (``--mask_ref_images`` is off);
* patch score: cosine distance ``1 - cos`` to the nearest bank patch (faiss on unit vectors,
  ``k = 1``); image score: the mean of the 1 % largest patch scores (``mean_top1p``);
* zero-shot masking of test images (:func:`vad_anomaly_dino.scoring.background_mask`): patches
  whose first principal component says background score 0. The official code switches it per
  category, decided by the paper's masking test: on for MVTec AD's capsule, hazelnut, pill,
  screw and toothbrush and every VisA category, off for the others. Here it is the option
  ``masking`` (off by default), set per category in a config file as the paper does:
  ``category_options: {capsule: {anomaly-dino: {masking: true}}, ...}``;
* maps: the patch distances on the grid, bilinearly upsampled and smoothed with a Gaussian of
  sigma 4 (``dists2map``): vad's post-processing does exactly that (``--sigma 4``).

:meth:`AnomalyDINO.feature_source` offers the bank's features (the unit-normalised patch tokens)
to feature-level ensembles (``--backbone detector:anomaly-dino``).

The few-shot protocol: ``vad run --train-count K`` gives the detector ``K`` normal training images
(the official code takes the images ``seed*K .. (seed+1)*K - 1`` of the sorted list; vad takes
the first ``K`` of a seeded permutation).

Deviations (each also in its option's description):

* **Weights**: DINOv2 comes through timm (``timm:vit_small_patch14_dinov2``, the same LVD-142M
  weights converted, with the official position-embedding interpolation:
  ``position_interpolation=dinov2``), from the Hugging Face hub when online or a local file
  (``weights``: timm's ``model.safetensors`` or the official ``dinov2_vits14_pretrain.pth``);
  offline without a file the detector stops at once and says how to get one.
* **Input size**: square ``image_size`` inputs (a multiple of the patch size). The official code
  keeps the aspect ratio (shorter side 448) and crops the longer one to a multiple of 14; for the
  square MVTec AD images the two agree.
* **Rotations** are applied to the preprocessed tensors (rotating a normalised image equals
  normalising the rotated one), about the exact image centre; the official code rotates the
  decoded image with OpenCV before resizing, about ``(w/2, h/2)``, half a pixel off.
* **First principal component**: repeated squaring of the covariance (exact, and exportable)
  instead of sklearn's randomized PCA; same sign convention (sklearn >= 1.5).
* **Image score** ``mean_top1p`` is computed before vad's map smoothing, as officially; vad's
  report uses it unchanged.

anomalib 2.7 (``AnomalyDINO``) differs from the official code in: 252 px square inputs; no
rotation of the references; when ``masking`` is on it also masks the references; dilation and
closing on the 2D grid (``mask_morphology="grid"`` here); optional coreset (not offered here).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from vad.contracts import Backbone, Detector, DetectorFeatures, Prediction, Preprocessing, State
from vad.errors import VadError
from vad.options import option
from vad_anomaly_dino.scoring import ROTATION_ANGLES, background_mask, nearest_distances, rotate, top_percent_mean

#: Version of the saved state; bump when the meaning of the saved tensors changes.
ANOMALY_DINO_STATE_VERSION = 1

#: Where the official backbone's weights can be had, for the offline message.
WEIGHTS_HINT = (
    "AnomalyDINO's backbone is DINOv2 ViT-S/14. Get its weights once on a machine with internet access, e.g. timm's "
    "https://huggingface.co/timm/vit_small_patch14_dinov2.lvd142m/resolve/main/model.safetensors or the official "
    "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth, and pass it with "
    "--weights FILE (or --set anomaly-dino.weights=FILE)."
)


class AnomalyDINO(Detector):
    """AnomalyDINO: a memory bank of DINOv2 patch features, cosine nearest-neighbour distances."""

    name = "anomaly-dino"
    input = "images"
    produces_maps = True
    training_passes = 1
    #: A training image is scored against the bank without its own patches (and their rotations).
    leave_one_out = True

    class Options(Detector.Options):
        backbone: str = option("timm:vit_small_patch14_dinov2", "Vision transformer whose patch tokens are the features, a timm ViT spec (official: DINOv2 ViT-S/14, here through timm with the official position-embedding interpolation).")
        pretrained: bool = option(True, "Load the backbone's pretrained weights (hub or its cache, or weights); false: random weights drawn from seed, for tests only (scores are not meaningful).")
        weights: str | None = option(None, "A local weights file for the backbone: timm's model.safetensors or the official dinov2_vits14_pretrain.pth (deviation: the official code loads them from torch hub).")
        layer: int = option(-1, "Transformer block whose patch tokens are the features, by index (official: -1, the last).")
        final_norm: bool = option(True, "Pass the block's tokens through the network's final norm (official: get_intermediate_layers(norm=True)).")
        position_interpolation: Literal["timm", "dinov2"] | None = option(None, "How the backbone's position embedding is resized to the input grid; null: the official code of the weights (DINOv2: dinov2, no antialias; with registers or other ViTs: timm, antialiased; anomalib 2.7 uses timm's for every DINOv2).")
        image_size: int = option(448, "Square input side in pixels, a multiple of the patch size (official: shorter side 448 for few-shot, 672 batched zero-shot; deviation: square, the official code keeps the aspect ratio).", ge=1)
        rotation: bool = option(True, "Add the reference images rotated by 45, 90, ..., 315 degrees to the bank (official agnostic preprocessing: on for every category).")
        masking: bool = option(False, "Zero-shot masking: test patches the first principal component calls background score 0 (official: per category, on for MVTec capsule, hazelnut, pill, screw, toothbrush and all of VisA).")
        mask_references: bool = option(False, "Mask the reference images too, leaving their background out of the bank (official --mask_ref_images: off; anomalib 2.7: on with masking).")
        mask_threshold: float = option(10.0, "Foreground where the first principal component exceeds this (official 10).")
        mask_border: float = option(0.2, "Border share left out of the central crop that decides the component's sign (official 0.2).", ge=0, lt=0.5)
        mask_centre_share: float = option(0.35, "The sign is flipped when at most this share of the central crop is foreground (official 0.35).", ge=0, le=1)
        mask_kernel: int = option(3, "Width of the dilation and closing kernel (official 3).", ge=1, rule=(lambda v: v % 2 == 1, "odd"))
        mask_morphology: Literal["raster", "grid"] = option("raster", "Dilation and closing along the flattened patch sequence (official: OpenCV on the N x 1 patch column) or on the 2D patch grid (anomalib 2.7).")
        num_neighbors: int = option(1, "Patch score from the k nearest bank patches (official --k_neighbors 1).", ge=1)
        metric: Literal["cosine", "euclidean"] = option("cosine", "cosine: mean squared distance of unit vectors halved, 1 - cos for k = 1 (official L2_normalized); euclidean: root mean squared distance of the raw features (official L2).")
        query_chunk: int = option(4096, "Test patches compared with the bank at once in predict (bounds memory).", ge=1)
        bank_chunk: int = option(16384, "Bank patches compared at once (bounds the distance block, also in the ONNX graph).", ge=1)
        seed: int = option(0, "Seed of random backbone weights (pretrained=false only).")

    tiny_options: ClassVar[dict[str, Any]] = {"backbone": "timm:test_vit", "pretrained": False, "image_size": 64}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.backbone = self._build_backbone()
        self.layer_name = self.backbone.resolve_layer(str(self.options.layer))
        self.patch_size = self.backbone.tokens.patch
        self.channels = next(f.channels for f in self.backbone.feature_info() if f.name == self.layer_name)
        if self.options.image_size % self.patch_size:
            lower = self.options.image_size - self.options.image_size % self.patch_size
            nearest = f"{lower} or {lower + self.patch_size}" if lower else str(self.patch_size)
            raise self.options.invalid("image_size", f"a multiple of the patch size {self.patch_size} of {self.options.backbone!r} (e.g. {nearest})")
        self.bank: torch.Tensor | None = None  # [M, C], unit rows for the cosine metric
        self.bank_sources: torch.Tensor | None = None  # [M] int64: the training image of each row
        self.train_images = 0

    # ------------------------------------------------------------------ backbone

    def _build_backbone(self) -> Backbone:
        """The vision transformer (random weights drawn from ``seed``); a clear error for other
        backbones, and for missing weights one that says where to get DINOv2's."""
        from vad.plugins import backbone_entry, create_backbone, get_registry
        from vad_timm.backbone import TimmBackbone
        from vad_timm.compat import import_timm
        from vad_timm.vit import is_vision_transformer
        from vad_timm.weights import WeightsError, split_model_name

        spec, options = self.options.backbone, self.options
        registry = get_registry()
        entry, model_name = backbone_entry(spec, registry)
        known = entry in registry.entries("backbones")
        if not (known and issubclass(registry.load_class("backbones", entry), TimmBackbone) and is_vision_transformer(import_timm(), split_model_name(model_name)[0])):
            raise VadError(
                f"{self.describe_owner()} reads the patch tokens of a vision transformer, and backbone {spec!r} is not a timm "
                "vision transformer: use timm:vit_small_patch14_dinov2 (official), timm:vit_base_patch14_dinov2, "
                "timm:vit_small_patch14_reg4_dinov2, timm:vit_small_patch16_dinov3 or another timm ViT"
            )
        built = {"pretrained": options.pretrained, "final_norm": options.final_norm, "position_interpolation": options.position_interpolation}
        if options.pretrained and options.weights is not None:
            built["weights"] = options.weights
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(options.seed)
                return create_backbone(spec, registry, **built)
        except WeightsError as error:
            raise WeightsError(f"{str(error).rstrip('.')}. {WEIGHTS_HINT}") from error

    def patch_features(self, images: torch.Tensor) -> torch.Tensor:
        """The chosen block's patch tokens ``[B, C, H/p, W/p]`` (float32, out of inference mode)."""
        return self.backbone.forward_features(images, [self.layer_name])[self.layer_name].clone()

    # ------------------------------------------------------------------ contract

    @property
    def preprocessing(self) -> Preprocessing:  # type: ignore[override]
        """Square ``image_size`` inputs, bicubic (official), the backbone's mean and std (ImageNet for DINOv2)."""
        own = self.backbone.preprocessing
        size = self.options.image_size
        return Preprocessing(size=(size, size), mean=own.mean, std=own.std, interpolation="bicubic")

    @property
    def fitted(self) -> bool:
        """True once ``fit`` or ``load_state`` gave the detector its memory bank."""
        return self.bank is not None

    def to(self, device: Any) -> AnomalyDINO:
        """Move the backbone and the memory bank."""
        super().to(device)
        self.backbone.to(self.device)
        if self.bank is not None:
            self.bank = self.bank.to(self.device)
            self.bank_sources = self.bank_sources.to(self.device)
        return self

    def state(self) -> State:
        """The memory bank (float32 ``[M, C]``) and the training image of each row."""
        if self.bank is None or self.bank_sources is None:
            raise VadError("AnomalyDINO is not fitted: call fit() before saving it")
        return State(
            meta={
                "anomaly_dino_state_version": ANOMALY_DINO_STATE_VERSION,
                "bank_size": int(self.bank.shape[0]),
                "channels": int(self.bank.shape[1]),
                "layer": self.layer_name,
                "metric": self.options.metric,
                "train_images": self.train_images,
            },
            tensors={"bank": self.bank.detach().to("cpu", torch.float32).contiguous(), "bank_sources": self.bank_sources.to("cpu", torch.int64).contiguous()},
        )

    def load_state(self, state: State) -> None:
        """Restore a saved memory bank; checks it against these options before changing anything."""
        meta, tensors = state.meta, state.tensors
        version = meta.get("anomaly_dino_state_version")
        if version != ANOMALY_DINO_STATE_VERSION:
            raise VadError(
                f"this saved AnomalyDINO model has anomaly_dino_state_version {version!r}, but the installed vad-anomaly-dino "
                f"reads version {ANOMALY_DINO_STATE_VERSION}: refit the model, or install the version that saved it"
            )
        bank, sources = tensors.get("bank"), tensors.get("bank_sources")
        if bank is None or sources is None or bank.ndim != 2 or tuple(sources.shape) != (bank.shape[0],) or bank.shape[0] == 0:
            raise VadError("the saved AnomalyDINO state has no valid 'bank' [M, C] and 'bank_sources' [M] tensors; the model folder is damaged")
        saved = (meta.get("layer"), meta.get("metric"), int(bank.shape[1]))
        expected = (self.layer_name, self.options.metric, self.channels)
        if saved != expected:
            raise VadError(
                f"the saved AnomalyDINO bank holds {saved[2]}-channel {saved[1]} features of {saved[0]}, but these options give "
                f"{expected[2]}-channel {expected[1]} features of {expected[0]} (backbone {self.options.backbone!r}): "
                "load it with the options it was fitted with"
            )
        self.bank = bank.to(self.device, torch.float32)
        self.bank_sources = sources.to(self.device, torch.int64)
        self.train_images = int(meta.get("train_images", int(sources.max()) + 1))

    # ------------------------------------------------------------------ fit

    def _checked(self, batch: Any, where: str) -> torch.Tensor:
        if not isinstance(batch, torch.Tensor) or batch.ndim != 4 or batch.shape[1] != 3:
            shape = tuple(batch.shape) if isinstance(batch, torch.Tensor) else type(batch).__name__
            raise VadError(f"AnomalyDINO.{where} expects an image batch [B, 3, H, W], got {shape}")
        return batch.detach().to(self.device, torch.float32)

    def _mask(self, features: torch.Tensor) -> torch.Tensor:
        options = self.options
        return background_mask(features, options.mask_threshold, options.mask_border, options.mask_centre_share, options.mask_kernel, options.mask_morphology)

    def _rows(self, features: torch.Tensor) -> torch.Tensor:
        """``[B, C, h, w] -> [B, h*w, C]`` patch rows, unit vectors for the cosine metric."""
        rows = features.flatten(2).transpose(1, 2)
        return F.normalize(rows, dim=2) if self.options.metric == "cosine" else rows

    def fit(self, batches: Iterable[torch.Tensor]) -> None:
        """The memory bank: every patch of every reference image and of its rotations (those the
        mask calls background left out with ``mask_references``)."""
        rows: list[torch.Tensor] = []
        owners: list[torch.Tensor] = []
        images = 0
        angles = ROTATION_ANGLES if self.options.rotation else (0,)
        for batch in batches:
            batch = self._checked(batch, "fit")
            index = torch.arange(images, images + batch.shape[0], device=self.device)
            for angle in angles:
                with torch.inference_mode():
                    features = self.patch_features(rotate(batch, angle))
                    patches = self._rows(features)
                    keep = self._mask(features).flatten(1) if self.options.masking and self.options.mask_references else torch.ones(patches.shape[:2], dtype=torch.bool, device=self.device)
                rows.append(patches[keep].clone())
                owners.append(index[:, None].expand_as(keep)[keep].clone())
            images += batch.shape[0]
        if images == 0:
            raise VadError("AnomalyDINO got an empty training set: it needs at least one normal reference image")
        bank = torch.cat(rows)
        if bank.shape[0] == 0:
            raise VadError("the background mask left no reference patch in the memory bank: lower mask_threshold, or set mask_references=false")
        self.bank, self.bank_sources, self.train_images = bank, torch.cat(owners), images

    # ------------------------------------------------------------------ predict

    def predict(self, batch: torch.Tensor) -> Prediction:
        """Image scores ``[B]`` (mean of the top 1 % patch distances) and distance maps ``[B, h, w]`` on the patch grid."""
        return self._predict(batch, None)

    def predict_left_out(self, batch: torch.Tensor, indices: torch.Tensor) -> Prediction:
        """Training images (``indices``: positions in fit order) scored against the bank without
        their own patches and rotations."""
        if len(indices) != batch.shape[0]:
            raise VadError(f"predict_left_out got {len(indices)} indices for {batch.shape[0]} images")
        return self._predict(batch, indices.to(self.device, torch.int64))

    def _predict(self, batch: Any, left_out: torch.Tensor | None) -> Prediction:
        if self.bank is None or self.bank_sources is None:
            raise VadError("AnomalyDINO is not fitted: call fit() (or load a saved model) before predict()")
        batch = self._checked(batch, "predict")
        if left_out is not None:
            others = min(int((self.bank_sources != image).sum()) for image in left_out.tolist())
            if others < self.options.num_neighbors:
                raise VadError(
                    f"scoring a training image as left out needs {self.options.num_neighbors} bank patch(es) of other images, "
                    f"and the bank has {others}: fit on at least 2 reference images"
                )
        with torch.inference_mode():
            features = self.patch_features(batch)
            size, _, height, width = features.shape
            queries = self._rows(features).reshape(size * height * width, -1)
            owners = None if left_out is None else left_out.repeat_interleave(height * width)
            parts = []
            for start in range(0, queries.shape[0], self.options.query_chunk):
                stop = start + self.options.query_chunk
                parts.append(
                    nearest_distances(
                        queries[start:stop], self.bank, self.options.num_neighbors, self.options.metric, self.options.bank_chunk,
                        None if owners is None else owners[start:stop], None if owners is None else self.bank_sources,
                    )
                )
            distances = torch.cat(parts).reshape(size, height, width)
            if self.options.masking:
                distances = distances * self._mask(features)
        return Prediction(scores=top_percent_mean(distances.flatten(1)).clone(), maps=distances.clone())

    def feature_source(self, **options: Any) -> AnomalyDINOFeatures:
        """The patch features the bank holds, as a FeatureSource (``--backbone detector:anomaly-dino``)."""
        return AnomalyDINOFeatures(self, **options)

    def export_module(self) -> nn.Module:
        """A traceable module ``images -> (scores [B], maps [B, h, w])`` for ONNX export."""
        if self.bank is None:
            raise VadError("AnomalyDINO is not fitted: nothing to export")
        return AnomalyDINOHead(self)


class AnomalyDINOHead(nn.Module):
    """The fitted AnomalyDINO as one module: backbone tokens, exact nearest neighbours against the
    bank (a constant, compared ``bank_chunk`` rows at a time), masking, top-1 % score."""

    def __init__(self, detector: AnomalyDINO) -> None:
        super().__init__()
        self.detector = detector
        self.register_buffer("bank", detector.bank.detach().to("cpu", torch.float32).contiguous())

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores and grid maps, as :meth:`AnomalyDINO.predict`."""
        detector, options = self.detector, self.detector.options
        features = detector.patch_features(images)
        size, _, height, width = features.shape
        queries = detector._rows(features).reshape(size * height * width, -1)
        distances = nearest_distances(queries, self.bank, options.num_neighbors, options.metric, options.bank_chunk)
        distances = distances.reshape(size, height, width)
        if options.masking:
            distances = distances * detector._mask(features)
        return top_percent_mean(distances.flatten(1)), distances


class AnomalyDINOFeatures(DetectorFeatures):
    """AnomalyDINO's patch features (``--backbone detector:anomaly-dino``).

    Cut point: the chosen block's patch tokens (after the final norm when ``final_norm``), unit
    vectors for the cosine metric: what the memory bank holds. They need no fitting: the source
    is the frozen transformer, and its state is empty.
    """

    name = "anomaly-dino-features"
    requires_fit = False  # type: ignore[assignment]

    @property
    def out_channels(self) -> int:
        return self.detector.channels

    def fit(self, images: Iterable[torch.Tensor]) -> None:
        """Nothing to learn: the transformer is frozen."""

    def state(self) -> State:
        """Empty: the features follow from the options."""
        return State(meta={}, tensors={})

    def load_state(self, state: State) -> None:
        """Nothing to restore."""

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        features = self.detector.patch_features(self.detector._checked(images, "feature_source"))
        return self.detector._rows(features).transpose(1, 2).reshape(features.shape).contiguous()


__all__ = ["ANOMALY_DINO_STATE_VERSION", "AnomalyDINO", "AnomalyDINOFeatures", "AnomalyDINOHead"]
