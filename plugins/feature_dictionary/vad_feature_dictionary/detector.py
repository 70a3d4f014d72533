"""The CNN feature dictionary (Napoletano, Piccoli, Schettini, "Anomaly Detection in Nanofibrous
Materials by CNN-Based Self-Similarity", Sensors 18(1):209, 2018) as the MVTec AD paper uses it as
a baseline (Bergmann et al., CVPR 2019 / IJCV 2021; Bergmann's dissertation, Ch. 2.4.3 and 4).
Neither paper released code; the facts below are the MVTec AD paper's set-up unless marked.

Training: square patches of ``patch_size`` (paper 128 px) are cropped at random locations of the
normal training images, ``train_patches`` in all (paper 100 000), each zoomed to the network's
input size (ResNet-18: 224 px) and described by the average pool of the backbone's last stage
(ResNet-18's 512-d ``avgpool``); the descriptors are L1-normalised (Napoletano et al.'s
experiments), PCA keeps the principal axes explaining ``pca_variance`` of their variance (paper
95 %), k-means finds ``n_words`` centres (paper 50) and the training descriptor nearest to each
centre becomes a dictionary word (Napoletano et al.: a dictionary of anomaly-free subregions).

Prediction: patches at every ``stride`` pixels (paper 8) of the image, each scored by its mean
Euclidean distance to its ``neighbors`` nearest words (Napoletano et al.'s ``m``; the MVTec AD
paper takes the minimum distance, ``m = 1``); the anomaly map gives each pixel the mean score of
the patches covering it, and the image score is the map's maximum (the MVTec AD paper's
classification rule). Napoletano et al. threshold patch scores with a value from training
patches; in vad the raw score is kept and the ``--threshold`` plugins decide.

Deviations, each also in the option's description:

* **Backbone**: ImageNet ResNet-18 weights cannot be downloaded here, so the default is
  ``tf_efficientnet_lite0`` (weights packaged offline), pooled at its deepest level ``blocks.6``
  (320 channels, before the 1x1 ``conv_head``). ``backbone=resnet18`` with ``weights=<file>``
  (``vad run --set cnn-dictionary.backbone=resnet18 --weights FILE``) gives the paper's
  descriptor: ``layer4`` average-pooled is exactly ResNet-18's ``avgpool`` output.
* **Resolution**: the MVTec AD paper evaluates each image at its original resolution (1024 px
  for 10 of the 15 categories, 700 to 1000 px for the others); vad feeds one working size,
  ``image_size`` (default 1024), so images of other sizes are resized to it (``--image-size``
  sets it, e.g. 900 for bottle).
* **Patch locations**: the ``train_patches`` are spread evenly over the training images (the
  first ``train_patches mod N`` images give one more), each image's at uniformly random
  positions; the paper says "random locations" without saying how images are chosen. At test
  time one more row and column of patches ends at the image border when the stride does not
  reach it, so every pixel has a score.
* **Zoom**: bilinear, without antialiasing (the papers do not say); at the defaults it enlarges.
* **k-means**: k-means++ seeding and ``kmeans_restarts`` (10) runs, the lowest inertia kept
  (scikit-learn's defaults when the MVTec AD paper was written; it does not say).
* **Post-processing**: vad smooths every map with a Gaussian (``--sigma``, default 4); neither
  paper mentions smoothing: ``--sigma 0`` gives their maps. Image scores are the raw map maximum.
* The backbone's weights are not saved with the model: like every vad backbone it is rebuilt
  from its options (packaged weights, the ``weights`` file, or random weights drawn from
  ``seed``); the PCA and the dictionary are saved.

Cost: a fit runs ``train_patches`` forward passes at ``patch_input_size``; a test image of side
``S`` runs ``((S - patch_size) / stride + 1)^2`` of them (12 769 at the defaults on 1024 px:
seconds per image on a GPU, as the MVTec AD paper reports). ``--set cnn-dictionary.stride=32``
or a smaller ``image_size`` make it cheaper.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from vad.contracts import Backbone, Detector, DetectorFeatures, Prediction, Preprocessing, State
from vad.errors import VadError
from vad.options import option
from vad.progress import info
from vad_feature_dictionary.dictionary import (
    coverage,
    coverage_average,
    fit_pca,
    kmeans,
    nearest_rows,
    patch_starts,
    word_score,
)

#: Version of the saved state; bump when the meaning of the saved tensors changes.
STATE_VERSION = 1


class CnnFeatureDictionary(Detector):
    """Pooled CNN descriptors of image patches, a k-means dictionary of normal ones, and the
    distance to the nearest words as each patch's anomaly score."""

    name = "cnn-dictionary"
    input = "images"
    produces_maps = True
    #: One pass counts the training images (to spread the patches evenly), one extracts them;
    #: vad's ``auto`` calibration then holds images out instead of refitting on folds.
    training_passes = 2

    class Options(Detector.Options):
        backbone: str = option("tf_efficientnet_lite0", "Frozen pretrained backbone, a vad backbone name or timm:MODEL (paper: ImageNet resnet18; deviation: EfficientNet-Lite0, whose weights ship offline).")
        pretrained: bool = option(True, "Load the backbone's pretrained weights (packaged, weights file or hub cache); false: random weights drawn from seed, for tests only.")
        weights: str | None = option(None, "A local weights file for the backbone (.safetensors or .pth, timm key names), e.g. ImageNet ResNet-18 for the paper's descriptor.")
        layer: str | None = option(None, "Backbone level whose global average pool describes a patch; null: the deepest (resnet18: layer4 = the paper's 512-d avgpool; lite0: blocks.6, 320-d).")
        image_size: int = option(1024, "Square working size in pixels (paper: each image's original resolution, 1024 for most MVTec AD categories; deviation: one size for all).", ge=8)
        patch_size: int = option(128, "Side of the square patches in pixels, at the working size (MVTec AD paper 128).", ge=1)
        stride: int = option(8, "Step between test patches in pixels (MVTec AD paper 8).", ge=1)
        patch_input_size: int | None = option(None, "Side each patch is zoomed to before the backbone (bilinear); null: the backbone's pretrained input size (224 for ResNet-18 and lite0, as the paper).", ge=8)
        train_patches: int = option(100_000, "Training patches cropped at random locations, spread evenly over the training images (MVTec AD paper 100000).", ge=1)
        l1_normalize: bool = option(True, "L1-normalise each pooled descriptor before PCA (Napoletano et al.; the MVTec AD paper does not say).")
        pca_variance: float = option(0.95, "Share of the descriptors' variance the kept principal axes explain (paper 0.95); 1: every axis.", gt=0, le=1)
        n_words: int = option(50, "Dictionary size: k-means centres, each replaced by its nearest training descriptor (MVTec AD paper 50).", ge=1)
        neighbors: int = option(1, "m: a patch's score is its mean distance to its m nearest words (MVTec AD paper: the minimum, m = 1).", ge=1)
        kmeans_restarts: int = option(10, "k-means runs from different k-means++ seeds, the lowest inertia kept (not in the papers: scikit-learn's default then).", ge=1)
        kmeans_iterations: int = option(300, "Most Lloyd iterations per k-means run (scikit-learn's default).", ge=1)
        patch_batch: int = option(128, "Patches per backbone forward pass (memory against speed; the scores do not change).", ge=1)
        seed: int = option(0, "Seed of the patch locations, the k-means++ draws and random backbone weights.")

        def check(self) -> None:
            if self.patch_size > self.image_size:
                raise self.invalid("patch_size", f"at most image_size={self.image_size}")
            if self.neighbors > self.n_words:
                raise self.invalid("neighbors", f"at most n_words={self.n_words}")
            if self.train_patches < self.n_words:
                raise self.invalid("train_patches", f"at least n_words={self.n_words}")

    #: Random ResNet-18 weights (cheap to build, no download) read at ``layer2``, whose random
    #: features still tell the kit's red squares from its stripes; four 16 px patches per image.
    tiny_options: ClassVar[dict[str, Any]] = {
        "backbone": "resnet18", "pretrained": False, "layer": "layer2", "image_size": 32, "patch_size": 16, "stride": 16,
        "patch_input_size": 16, "train_patches": 64, "n_words": 8, "kmeans_restarts": 2,
    }
    #: The claim these options keep on the kit's data set (the red squares stand out in layer2).
    tiny_image_auroc: ClassVar[float | None] = 0.9

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._backbone: Backbone | None = None
        self.pca_mean: torch.Tensor | None = None  # [C]
        self.pca_components: torch.Tensor | None = None  # [C, d]
        self.words: torch.Tensor | None = None  # [K, d]
        self.fit_facts: dict[str, Any] = {}

    # ------------------------------------------------------------------ the backbone

    @property
    def backbone(self) -> Backbone:
        """The frozen backbone, built on first use (random weights drawn from ``seed`` without
        touching the global random state); the resolved ``layer`` and ``patch_input_size`` are
        written back into the options, so the saved options say what was used."""
        if self._backbone is None:
            from vad.plugins import create_backbone

            options = self.options
            extra = {"weights": options.weights} if options.weights is not None else {}
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(options.seed)
                backbone = create_backbone(options.backbone, pretrained=options.pretrained, **extra)
            levels = [entry.name for entry in backbone.feature_info()]
            layer = backbone.resolve_layer(options.layer) if options.layer is not None else backbone.feature_info()[-1].name
            if layer not in levels:
                raise VadError(f"{self.describe_owner()}: backbone {options.backbone!r} has no level {options.layer!r}; it offers {', '.join(levels)}")
            size = options.patch_input_size or backbone.preprocessing.size[0]
            self.options = options.replace(layer=layer, patch_input_size=size)
            self._backbone = backbone.to(self.device)
        return self._backbone

    def pooled(self, patches: torch.Tensor) -> torch.Tensor:
        """``[N, C]``: the chosen level of the backbone, average-pooled, for patches ``[N, 3, p, p]``
        zoomed to ``patch_input_size``."""
        backbone = self.backbone
        size = self.options.patch_input_size
        if patches.shape[-1] != size or patches.shape[-2] != size:
            patches = F.interpolate(patches, size=(size, size), mode="bilinear", align_corners=False)
        level = backbone.forward_features(patches, [self.options.layer])[self.options.layer]
        return level.mean(dim=(2, 3))

    @property
    def preprocessing(self) -> Preprocessing:  # type: ignore[override]
        """Square ``image_size`` inputs, resized with the backbone's interpolation, its mean and std."""
        own = self.backbone.preprocessing
        size = self.options.image_size
        return Preprocessing(size=(size, size), mean=own.mean, std=own.std, interpolation=own.interpolation)

    def to(self, device: Any) -> CnnFeatureDictionary:
        """Move the backbone, the PCA and the dictionary."""
        super().to(device)
        if self._backbone is not None:
            self._backbone.to(self.device)
        for name in ("pca_mean", "pca_components", "words"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(self.device))
        return self

    # ------------------------------------------------------------------ state

    @property
    def fitted(self) -> bool:
        """True once ``fit`` or ``load_state`` gave the detector its dictionary."""
        return self.words is not None

    def state(self) -> State:
        """The PCA (mean, axes) and the dictionary words, float32, and facts about the fit."""
        if not self.fitted:
            raise VadError("the CNN feature dictionary is not fitted: call fit() before saving it")
        assert self.pca_mean is not None and self.pca_components is not None and self.words is not None
        tensors = {name: getattr(self, name).detach().cpu().contiguous() for name in ("pca_mean", "pca_components", "words")}
        meta = {"state_version": STATE_VERSION, "layer": self.options.layer, "in_channels": int(self.pca_mean.shape[0]), **self.fit_facts}
        return State(meta=meta, tensors=tensors)

    def load_state(self, state: State) -> None:
        """Restore a saved dictionary; versions, shapes and the backbone level are checked before
        anything changes."""
        meta, tensors = state.meta, state.tensors
        if meta.get("state_version") != STATE_VERSION:
            raise VadError(
                f"this saved CNN feature dictionary has state_version {meta.get('state_version')!r}, but the installed "
                f"vad-feature-dictionary reads version {STATE_VERSION}: refit the model, or install the version that saved it"
            )
        try:
            mean, components, words = tensors["pca_mean"], tensors["pca_components"], tensors["words"]
        except KeyError as error:
            raise VadError(f"the saved CNN feature dictionary lacks the tensor {error}; the model folder is damaged, refit the model") from error
        channels = int(mean.shape[0]) if mean.ndim == 1 else -1
        if components.ndim != 2 or words.ndim != 2 or components.shape[0] != channels or words.shape[1] != components.shape[1]:
            raise VadError(
                f"the saved CNN feature dictionary's tensors do not fit together (mean {tuple(mean.shape)}, axes "
                f"{tuple(components.shape)}, words {tuple(words.shape)}); the model folder is damaged"
            )
        backbone = self.backbone  # built first: it resolves the level the options name
        level = next(entry for entry in backbone.feature_info() if entry.name == self.options.layer)
        if words.shape[0] != self.options.n_words or meta.get("layer") != level.name or level.channels != channels:
            raise VadError(
                f"the saved dictionary has {words.shape[0]} words over {channels}-channel descriptors of level {meta.get('layer')!r}, "
                f"which do not fit its options (n_words={self.options.n_words}; backbone {self.options.backbone!r} gives "
                f"{level.channels} channels on {level.name!r}); load it with the options it was fitted with"
            )
        self.pca_mean = mean.to(self.device, torch.float32)
        self.pca_components = components.to(self.device, torch.float32)
        self.words = words.to(self.device, torch.float32)
        self.fit_facts = {key: meta[key] for key in ("feature_dim", "explained_variance", "train_patches", "train_images", "inertia") if key in meta}

    # ------------------------------------------------------------------ fit

    def check_batch(self, batch: Any, where: str, move: bool = True) -> torch.Tensor:
        """A float batch ``[B, 3, H, W]`` with sides of at least ``patch_size``, on the device
        (``move=False``: only checked)."""
        if not isinstance(batch, torch.Tensor) or batch.ndim != 4 or batch.shape[1] != 3:
            shape = tuple(batch.shape) if isinstance(batch, torch.Tensor) else type(batch).__name__
            raise VadError(f"cnn-dictionary.{where} expects an image batch [B, 3, H, W], got {shape}")
        if min(batch.shape[-2:]) < self.options.patch_size:
            raise VadError(
                f"cnn-dictionary.{where}: images of {tuple(batch.shape[-2:])} px are smaller than patch_size={self.options.patch_size}; "
                "use larger images (--image-size) or a smaller --set cnn-dictionary.patch_size"
            )
        return batch.detach().to(self.device, torch.float32) if move else batch

    def _quotas(self, images: int) -> list[int]:
        """Training patches per image: ``train_patches`` spread evenly, the first ones one more."""
        base, extra = divmod(self.options.train_patches, images)
        return [base + (index < extra) for index in range(images)]

    def fit(self, batches: Iterable[torch.Tensor]) -> None:
        """Crop ``train_patches`` random patches, describe them, fit PCA and k-means, keep the
        nearest descriptor to each centre as a word. Two passes: count, then extract."""
        images = sum(int(self.check_batch(batch, "fit", move=False).shape[0]) for batch in batches)
        if images == 0:
            raise VadError("the CNN feature dictionary got an empty training set: it needs normal training images")
        quotas = iter(self._quotas(images))
        generator = torch.Generator().manual_seed(self.options.seed)
        patch = self.options.patch_size
        descriptors = []
        with torch.no_grad():
            for batch in batches:
                batch = self.check_batch(batch, "fit")
                for image in batch:
                    count = next(quotas, None)
                    if count is None:
                        raise VadError("the training batches gave more images on the second pass than on the first: fit needs re-iterable batches")
                    tops = torch.randint(0, image.shape[-2] - patch + 1, (count,), generator=generator).tolist()
                    lefts = torch.randint(0, image.shape[-1] - patch + 1, (count,), generator=generator).tolist()
                    for first in range(0, count, self.options.patch_batch):
                        chosen = zip(tops[first : first + self.options.patch_batch], lefts[first : first + self.options.patch_batch])
                        crops = torch.stack([image[:, top : top + patch, left : left + patch] for top, left in chosen])
                        descriptors.append(self.pooled(crops))
            rows = torch.cat(descriptors)
            if len(rows) != self.options.train_patches:
                raise VadError("the training batches gave fewer images on the second pass than on the first: fit needs re-iterable batches")
            if self.options.l1_normalize:
                rows = l1_normalized(rows)
            if not float(rows.double().var(0).sum()) > 0:
                raise VadError("every training patch has the same descriptor: the training images show no variation the dictionary could learn")
            mean, components, explained = fit_pca(rows, self.options.pca_variance)
            projected = (rows - mean) @ components
            centres, _, inertia = kmeans(projected, self.options.n_words, generator, self.options.kmeans_restarts, self.options.kmeans_iterations)
            words = projected[nearest_rows(projected, centres)]
        # assign only now, so a failed fit leaves the detector as it was
        self.pca_mean, self.pca_components, self.words = mean, components, words
        self.fit_facts = {
            "feature_dim": int(components.shape[1]),
            "explained_variance": explained,
            "train_patches": int(len(rows)),
            "train_images": images,
            "inertia": inertia,
        }
        info(
            f"cnn-dictionary: {len(rows)} patches of {patch} px from {images} images, {rows.shape[1]}-d {self.options.layer} descriptors, "
            f"PCA keeps {components.shape[1]} axes ({explained:.1%} of the variance), {self.options.n_words} words"
        )

    # ------------------------------------------------------------------ predict

    def predict(self, batch: torch.Tensor) -> Prediction:
        """Maps ``[B, H, W]`` at the input size (mean score of the patches covering each pixel)
        and image scores ``[B]`` (their maximum)."""
        scorer = self.export_module()
        images = self.check_batch(batch, "predict")
        with torch.no_grad():
            scores, maps = scorer(images)
        return Prediction(scores=scores, maps=maps)

    def export_module(self) -> DictionaryScorer:
        """``images -> (scores, maps)``: patches, backbone, pooling, PCA, word distances and the
        coverage average, traceable for ONNX (the patch batches are unrolled in the graph)."""
        if not self.fitted:
            raise VadError("the CNN feature dictionary is not fitted: call fit() (or load a saved model) before predict()")
        return DictionaryScorer(self).eval()

    # ------------------------------------------------------------------ features

    def feature_source(self, **options: Any) -> CnnDictionaryFeatures:
        """The patches' PCA descriptors on the stride grid as a FeatureSource."""
        return CnnDictionaryFeatures(self, **options)


def l1_normalized(rows: torch.Tensor) -> torch.Tensor:
    """Each row divided by its L1 norm (rows of zeros stay zero)."""
    return rows / rows.abs().sum(-1, keepdim=True).clamp_min(1e-12)


class DictionaryScorer(nn.Module):
    """The fitted dictionary as a module: ``images [B, 3, H, W] -> (scores [B], maps [B, H, W])``.

    Patches are cut by gathering pixel indices (a static pattern for the input size) and sent
    through the backbone ``patch_batch`` at a time (all images of the batch together)."""

    def __init__(self, detector: CnnFeatureDictionary) -> None:
        super().__init__()
        options = detector.options
        self.pooled = detector.pooled
        self.patch, self.stride, self.batch = options.patch_size, options.stride, options.patch_batch
        self.l1, self.neighbors = options.l1_normalize, options.neighbors
        self.register_buffer("pca_mean", detector.pca_mean)
        self.register_buffer("pca_components", detector.pca_components)
        self.register_buffer("words", detector.words)

    def descriptors(self, images: torch.Tensor) -> tuple[torch.Tensor, list[int], list[int]]:
        """PCA descriptors ``[B, n_h, n_w, d]`` of the patches at the window starts (rows, columns)."""
        height, width = int(images.shape[-2]), int(images.shape[-1])
        tops, lefts = patch_starts(height, self.patch, self.stride), patch_starts(width, self.patch, self.stride)
        offsets = torch.arange(self.patch, device=images.device)
        rows = torch.tensor(tops, device=images.device)[:, None].expand(-1, len(lefts)).reshape(-1)
        columns = torch.tensor(lefts, device=images.device)[None, :].expand(len(tops), -1).reshape(-1)
        step = max(1, self.batch // max(1, int(images.shape[0])))
        pooled = []
        for first in range(0, len(rows), step):
            ys = (rows[first : first + step, None] + offsets)[:, :, None]  # [n, p, 1]
            xs = (columns[first : first + step, None] + offsets)[:, None, :]  # [n, 1, p]
            crops = images[:, :, ys, xs]  # [B, 3, n, p, p]
            count = crops.shape[2]
            flat = crops.permute(0, 2, 1, 3, 4).reshape(-1, 3, self.patch, self.patch)
            features = self.pooled(flat)
            pooled.append(features.reshape(-1, count, features.shape[-1]))
        features = torch.cat(pooled, dim=1)
        if self.l1:
            features = l1_normalized(features)
        projected = (features - self.pca_mean) @ self.pca_components
        return projected.reshape(-1, len(tops), len(lefts), projected.shape[-1]), tops, lefts

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores and maps as :meth:`CnnFeatureDictionary.predict`."""
        descriptors, tops, lefts = self.descriptors(images)
        scores = word_score(descriptors, self.words, self.neighbors)
        rows = coverage(int(images.shape[-2]), tops, self.patch, images.device)
        columns = coverage(int(images.shape[-1]), lefts, self.patch, images.device)
        maps = coverage_average(scores, rows, columns)
        return maps.flatten(1).amax(dim=1), maps


class CnnDictionaryFeatures(DetectorFeatures):
    """The CNN feature dictionary's patch descriptors as patch features
    (``--backbone detector:cnn-dictionary``).

    Cut point: each test patch's PCA-reduced descriptor (``[B, d, n_h, n_w]``, one cell per
    window at the stride; ``d`` the axes PCA kept), the space in which the dictionary words live
    and distances are measured. Preprocessing is the detector's."""

    name = "cnn-dictionary-features"

    @property
    def out_channels(self) -> int:
        """The PCA dimension (known once the detector is fitted)."""
        if self.detector.pca_components is None:
            raise VadError("the CNN feature dictionary is not fitted: its feature dimension comes from its PCA")
        return int(self.detector.pca_components.shape[1])

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """PCA descriptors ``[B, d, n_h, n_w]``."""
        detector = self.detector
        scorer = detector.export_module()
        with torch.no_grad():
            descriptors, _, _ = scorer.descriptors(detector.check_batch(images, "features"))
        return descriptors.permute(0, 3, 1, 2).contiguous()


__all__ = ["STATE_VERSION", "CnnDictionaryFeatures", "CnnFeatureDictionary", "DictionaryScorer", "l1_normalized"]
