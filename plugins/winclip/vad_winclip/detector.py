"""WinCLIP and WinCLIP+ (Jeong et al., "WinCLIP: Zero-/Few-Shot Anomaly Classification and
Segmentation", CVPR 2023) as a vad image detector.

The authors released no code; the facts here are the paper's, checked against anomalib 2.7's
``models/image/winclip`` (the implementation most people run) and the public reimplementations
it credits. The formulas are in :mod:`vad_winclip.scoring`, the prompts in
:mod:`vad_winclip.prompts`, the CLIP model in :mod:`vad_winclip.clip`.

* CLIP: open_clip's ViT-B/16+ at 240 x 240 px with LAION-400M weights (``laion400m_e31``, as
  anomalib), images resized bicubically and normalised with CLIP's mean and std.
* Text: the compositional prompt ensemble (7 normal and 5 anomalous state words x 22 templates),
  each class's prompt embeddings averaged into one text embedding.
* Zero-shot (WinCLIP, ``mode=zero-shot``): the anomalous-class softmax probability over the two
  text embeddings with CLIP's logit scale, for the image embedding (the image score) and for
  window embeddings of 2 x 2 and 3 x 3 patches (stride one patch); window scores are harmonically
  averaged per patch, and the map is the harmonic mean of the window scales and the image scale.
* Few-shot (WinCLIP+, ``mode=few-shot``, the default): ``fit`` stores a memory of the reference
  images' patch tokens and window embeddings; a test patch or window scores its cosine distance
  ``(1 - cos) / 2`` to the nearest memory entry of its kind; the window scales are harmonically
  averaged per patch and the three maps (patch, 2 x 2, 3 x 3) averaged; map
  ``(M_0 + M_W) / 2``, image score ``(score_0 + max M_W) / 2``. The references are every image
  ``fit`` gets: ``vad run --train-count K`` gives the paper's K-shot protocol.

``fit`` also computes the text embeddings (they depend on ``class_name``, the object's name in the
prompts) and keeps them, the logit scale and the memory in the saved state; the CLIP image tower
is rebuilt from its weights when a model folder is loaded (a fingerprint of the weights, saved
with the memory, catches a different checkpoint).

Deviations, and where anomalib 2.7 deviates from the paper:

* **Weights**: the LAION-400M checkpoint is downloaded by open_clip; where there is no network
  the detector fails at once and says how to pass the file (``weights=FILE``, the path open_clip
  takes as ``pretrained=``). ``pretrained=false`` builds a random CLIP (tests, offline demos:
  its zero-shot half is noise).
* **Object name**: the paper uses the category's name in the prompts. ``class_name`` defaults
  to ``"object"`` (anomalib's fallback, and what a detector built outside a run gets);
  ``--set winclip.class_name={category}`` puts each category's name in (a run replaces the
  placeholder per category), ``category_options`` in a config file any other name.
* **Prompts**: anomalib drops the state word "broken" and has 21 templates (one duplicated, two
  missing); here the paper's lists (:mod:`vad_winclip.prompts`).
* **Temperature**: ``temperature=null`` uses the checkpoint's learned logit scale (100 for the
  LAION ViT-B/16+), i.e. CLIP's own zero-shot classifier; anomalib divides by the fixed 0.07
  (CLIP's initial temperature): ``temperature=0.07`` reproduces it.
* **Window embeddings**: anomalib 2.7 transposes the masked tokens to sequence-first before
  open_clip's transformer, right for open_clip up to 2.24; from 2.26.0 (inside anomalib's pin
  ``>=2.23,<2.26.1``, and what pip picks) the transformer takes batch-first tokens, so attention
  runs across the windows at each token position. The class-token slot then only ever sees the
  identical class tokens of all windows: every window embedding comes out the same vector, the
  zero-shot window maps are constant (the map carries the image score only) and the few-shot
  window distances are zero. Here each window is one sequence, as the paper describes;
  anomalib with open-clip-torch 2.24 computes the same as this code.
* **Maps**: the grid maps (15 x 15 at 240 px) are upsampled and smoothed by vad
  (``--sigma``, default 4); anomalib only upsamples: ``--sigma 0`` gives the plain maps.
* **Leave-one-out**: vad calibrates thresholds on training images scored as if each had been left
  out of ``fit``; here by leaving that image's entries out of the memory (exact). The zero-shot
  scores do not depend on the training images at all.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from vad.contracts import Detector, DetectorFeatures, Prediction, Preprocessing, State
from vad.errors import VadError
from vad.options import option
from vad.progress import warn
from vad_winclip import clip as clip_model
from vad_winclip.scoring import WinClipHead, WindowEncoder

#: Version of the saved state; bump when the meaning of the saved tensors changes.
WINCLIP_STATE_VERSION = 1


class WinClip(Detector):
    """WinCLIP (zero-shot) and WinCLIP+ (few-shot) on an open_clip CLIP model."""

    name = "winclip"
    input = "images"
    produces_maps = True
    leave_one_out = True
    training_passes = 1

    class Options(Detector.Options):
        mode: Literal["few-shot", "zero-shot"] = option("few-shot", "few-shot: WinCLIP+, every training image a reference (--train-count K: K-shot); zero-shot: WinCLIP, prompts only.")
        class_name: str = option("object", "Object name in the prompts (paper: the category, e.g. bottle: {category} gives each category's name; anomalib's fallback 'object').")
        scales: list[int] = option([2, 3], "Window sides in patches, stride one patch (paper: 2 and 3, small and mid windows).", ge=1)
        temperature: float | None = option(None, "Softmax temperature of the zero-shot score; null: 1 / the checkpoint's learned logit scale (CLIP's own classifier); anomalib: 0.07.", gt=0)
        model: str = option(clip_model.PAPER_MODEL, "open_clip architecture (paper: ViT-B-16-plus-240), or an open_clip model-config JSON file.")
        pretrained_tag: str = option(clip_model.PAPER_TAG, "open_clip pretrained tag to download (paper: LAION-400M; anomalib laion400m_e31).")
        pretrained: bool = option(True, "Load pretrained CLIP weights (weights file or tag); false: random weights from seed (tests only).")
        weights: str | None = option(None, "Local open_clip checkpoint of the model (what open_clip takes as pretrained=FILE); offline, the way to the paper's weights.")
        seed: int = option(0, "Seed of the random weights when pretrained is false.")
        image_size: int | None = option(None, "Network input side; null: the CLIP model's (240 for ViT-B-16-plus-240), the only one its positional embeddings allow.", ge=1)

        def check(self) -> None:
            if not self.scales or len(set(self.scales)) != len(self.scales):
                raise self.invalid("scales", "a non-empty list of distinct window sides")

    tiny_options: ClassVar[dict[str, Any]] = {"model": "vad-tiny-clip", "pretrained": False}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.config = clip_model.model_config(self.options.model)
        self.grid = clip_model.grid_size(self.config)
        too_large = [s for s in self.options.scales if s > min(self.grid)]
        if too_large:
            raise self.options.invalid("scales", f"window sides up to the {self.grid[0]}x{self.grid[1]} patch grid of {self.options.model!r} (got {too_large})")
        size = clip_model.input_size(self.config)
        if self.options.image_size is not None and (self.options.image_size, self.options.image_size) != size:
            raise self.options.invalid("image_size", f"null or {size[0]}, the input side the positional embeddings of {self.options.model!r} fix (tiles: --tile {size[0]})")
        self.checkpoint = clip_model.checkpoint_file(self.options.model, self.options.pretrained, self.options.pretrained_tag, self.options.weights)
        tag = self.options.pretrained_tag if self.options.pretrained and self.options.weights is None else None
        mean, std = clip_model.normalisation(self.options.model, tag)
        self.preprocessing = Preprocessing(size=size, mean=mean, std=std, interpolation="bicubic")
        self._encoder: WindowEncoder | None = None  # the image tower, built when first needed
        self.head: WinClipHead | None = None
        self.reference_images = 0

    # ------------------------------------------------------------------ network

    def _clip(self) -> nn.Module:
        """The whole CLIP (image and text towers) on the detector's device."""
        if self.checkpoint is None:
            warn(f"WinCLIP runs on a randomly initialised CLIP ({self.options.model}, pretrained=false): its zero-shot scores mean nothing")
        return clip_model.build_clip(self.config, self.checkpoint, self.options.seed).to(self.device)

    def _image_encoder(self, clip: nn.Module | None = None) -> WindowEncoder:
        """The window encoder over the CLIP image tower (built once, from ``clip`` if given)."""
        if self._encoder is None:
            visual = (clip if clip is not None else self._clip()).visual
            self._encoder = WindowEncoder(visual, tuple(self.options.scales)).to(self.device)
        return self._encoder

    @property
    def fitted(self) -> bool:
        """True once ``fit`` or ``load_state`` gave the detector its text embeddings (and memory)."""
        return self.head is not None

    def to(self, device: Any) -> WinClip:
        """Move the CLIP image tower, the text embeddings and the memory to ``device``."""
        super().to(device)
        for module in (self._encoder, self.head):
            if module is not None:
                module.to(self.device)
        return self

    def check_batch(self, images: Any, where: str) -> torch.Tensor:
        """``[B, 3, H, W]`` at the CLIP input size, on the detector's device."""
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise VadError(f"WinCLIP.{where} expects preprocessed RGB images [B, 3, H, W], got {shape}")
        size = tuple(self.preprocessing.size)
        if tuple(images.shape[2:]) != size:
            raise VadError(
                f"WinCLIP.{where} got {images.shape[2]}x{images.shape[3]} images, but the positional embeddings of "
                f"{self.options.model!r} fix its input at {size[0]}x{size[1]}: run without --image-size (or use --tile {size[0]})"
            )
        return images.to(self.device, torch.float32)

    # ------------------------------------------------------------------ fit

    def fit(self, batches: Iterable[torch.Tensor]) -> None:
        """Compute the text embeddings; in few-shot mode, store the reference memory of every
        training image (in order). A failed fit leaves the detector as it was."""
        clip = self._clip()  # the text tower is needed once, for the text embeddings
        encoder = self._image_encoder(clip)
        few_shot = self.options.mode == "few-shot"
        parts: dict[str, list[torch.Tensor]] = {"patches": [], **{f"window_{s}": [] for s in self.options.scales}}
        count = 0
        with torch.no_grad():
            for batch in batches:
                images = self.check_batch(batch, "fit")
                count += images.shape[0]
                if few_shot:
                    _, windows, patches = encoder(images)
                    parts["patches"].append(patches)
                    for scale, embeddings in zip(self.options.scales, windows):
                        parts[f"window_{scale}"].append(embeddings)
            if count == 0:
                raise VadError("WinCLIP got an empty training set: fit needs the normal training images (the references in few-shot mode)")
            text = clip_model.text_embeddings(clip, self.options.class_name)
        memory = {name: torch.cat(chunks) for name, chunks in parts.items()} if few_shot else None
        logit_scale = 1.0 / self.options.temperature if self.options.temperature is not None else float(clip.logit_scale.exp())
        self.head = WinClipHead(encoder, text, logit_scale, memory).to(self.device)
        self.reference_images = count if few_shot else 0

    # ------------------------------------------------------------------ predict

    def _require_fitted(self) -> WinClipHead:
        if self.head is None:
            raise VadError("WinCLIP is not fitted: call fit() (or load a saved model) before predict()")
        return self.head

    def predict(self, batch: torch.Tensor) -> Prediction:
        """Image scores ``[B]`` and maps ``[B, h, w]`` on the patch grid."""
        head = self._require_fitted()
        images = self.check_batch(batch, "predict")
        with torch.no_grad():
            scores, maps = head(images)
        return Prediction(scores=scores, maps=maps)

    def predict_left_out(self, batch: torch.Tensor, indices: torch.Tensor) -> Prediction:
        """Training images scored without their own entries in the memory (``indices``: their
        positions in fit order); zero-shot scores ignore the training images anyway."""
        head = self._require_fitted()
        if not head.few_shot:
            return self.predict(batch)
        if self.reference_images < 2:
            raise VadError("WinCLIP+ with one reference image cannot score it as left out: the memory would be empty (use two or more)")
        images = self.check_batch(batch, "predict_left_out")
        with torch.no_grad():
            scores, maps = head.score(head.encoder(images), exclude=indices.to(self.device))
        return Prediction(scores=scores, maps=maps)

    def export_module(self) -> nn.Module:
        """The whole scoring graph ``images -> (scores, maps)``: the CLIP image tower, the window
        encoder and the head with the text embeddings and memory as constants."""
        return self._require_fitted().eval()

    # ------------------------------------------------------------------ state

    def state(self) -> State:
        """Text embeddings and, in few-shot mode, the memory ``[K, N, C]`` per kind, float32."""
        head = self._require_fitted()
        tensors = {"text_embeddings": head.text.detach().cpu().contiguous()}
        if head.few_shot:
            for name in ("patches", *(f"window_{s}" for s in head.scales)):
                flat = getattr(head, f"memory_{name}")
                tensors[f"memory_{name}"] = flat.reshape(self.reference_images, -1, flat.shape[1]).detach().cpu().contiguous()
        return State(
            meta={
                "winclip_state_version": WINCLIP_STATE_VERSION,
                "mode": self.options.mode,
                "grid": list(head.grid),
                "scales": list(head.scales),
                "logit_scale": head.logit_scale,
                "reference_images": self.reference_images,
                "vision_fingerprint": clip_model.fingerprint(head.encoder.visual),
            },
            tensors=tensors,
        )

    def load_state(self, state: State) -> None:
        """Restore a saved WinCLIP; checks version, options, shapes and the CLIP weights'
        fingerprint before changing anything."""
        meta, tensors = state.meta, state.tensors
        version = meta.get("winclip_state_version")
        if version != WINCLIP_STATE_VERSION:
            raise VadError(
                f"this saved WinCLIP model has winclip_state_version {version!r}, but the installed vad-winclip reads version "
                f"{WINCLIP_STATE_VERSION}: the saved state does not fit; refit the model"
            )
        if meta.get("mode") != self.options.mode or list(meta.get("scales", [])) != list(self.options.scales):
            raise VadError(
                f"the saved WinCLIP state (mode {meta.get('mode')!r}, scales {meta.get('scales')}) does not fit its options "
                f"(mode {self.options.mode!r}, scales {list(self.options.scales)})"
            )
        few_shot = self.options.mode == "few-shot"
        names = ["text_embeddings", *(["memory_patches", *(f"memory_window_{s}" for s in self.options.scales)] if few_shot else [])]
        missing = [name for name in names if name not in tensors]
        if missing or list(meta.get("grid", [])) != list(self.grid):
            raise VadError(f"the saved WinCLIP state does not fit: {'no ' + repr(missing[0]) + ' tensor' if missing else 'another patch grid'}; the model folder is damaged, refit it")
        references = int(meta.get("reference_images", 0))
        memory = {name[len("memory_") :]: tensors[name].to(self.device, torch.float32) for name in names[1:]}
        if any(t.ndim != 3 or t.shape[0] != references for t in memory.values()):
            raise VadError(f"the saved WinCLIP memory does not fit its {references} reference images; the model folder is damaged, refit it")
        encoder = self._image_encoder()
        if meta.get("vision_fingerprint") != clip_model.fingerprint(encoder.visual):
            raise VadError(
                "the saved WinCLIP memory was computed with other CLIP weights than the ones loaded now "
                f"({self.options.model}, {self.checkpoint or 'random weights'}): give the same weights, or refit"
            )
        text = tensors["text_embeddings"].to(self.device, torch.float32)
        self.head = WinClipHead(encoder, text, float(meta["logit_scale"]), memory if few_shot else None).to(self.device)
        self.reference_images = references

    # ------------------------------------------------------------------ features

    def feature_source(self, **options: Any) -> WinClipFeatures:
        """The CLIP image tower's output patch tokens as a FeatureSource."""
        return WinClipFeatures(self, **options)


class WinClipFeatures(DetectorFeatures):
    """WinCLIP's CLIP patch tokens as patch features (``--backbone detector:winclip``).

    Cut point: the image tower's output tokens after its final layer norm, not projected
    (``width`` channels on the patch grid), the patch-level features of WinCLIP+'s memory.
    Preprocessing is the detector's.
    """

    name = "winclip-features"

    @property
    def out_channels(self) -> int:
        """The image tower's width."""
        return int(self.detector.config["vision_cfg"]["width"])

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Patch tokens ``[B, width, h, w]``."""
        detector = self.detector
        detector._require_fitted()
        images = detector.check_batch(images, "features")
        with torch.no_grad():
            patches = detector._image_encoder().patch_tokens(images)
        return patches.transpose(1, 2).reshape(images.shape[0], -1, *detector.grid)


__all__ = ["WINCLIP_STATE_VERSION", "WinClip", "WinClipFeatures"]
