"""The variation model (Steger, Ulrich and Wiedemann, *Machine Vision Algorithms and
Applications*, 2nd ed. 2018, Ch. 3.4.1.4; HALCON's ``create/train/prepare/compare_variation_model``)
as the MVTec AD paper uses it (Bergmann et al., IJCV 2021; Bergmann's thesis, Eqs. 2.21-2.23 and
Ch. 4.6.1).

Fit: the per-pixel mean ``mu`` and standard deviation ``sigma`` (population, divided by N) of
the gray values (0-255) of all training images, optionally after a Gaussian smoothing
(``smoothing``, sigma in pixels, scipy's ``gaussian_filter`` with mode 'reflect'). Score: the
anomaly map ``|x - mu| / max(a_abs, b_rel * sigma)``, i.e. the distance to the mean in units of
HALCON's tolerance band (``prepare_variation_model(AbsThreshold=a_abs, VarThreshold=b_rel)``,
HALCON's defaults 10 and 2): a value above 1 is exactly a pixel ``compare_variation_model``
flags, and with ``a_abs`` small it is the paper's "distance to the mean divided by a multiple of
the standard deviation" (Eq. 2.23 with the clipping ``max(sigma, a)``). We chose this ratio over
the exceedance ``|x - mu| - band`` because it keeps the paper's sigma units and HALCON's
decision at 1. Colour images: one model per channel and the pixelwise **maximum** over channels
(``color="max"``, the MVTec AD benchmark; ``"mean"`` as on MVTec LOCO AD; ``"gray"``: one model
of the BT.601 luma, HALCON's single-channel use). Image score: the map's maximum.

Alignment (``align``): the model needs aligned parts. ``"translation"`` registers each image by
phase correlation (integer pixels, of the luma with its mean removed and a Hann window): during fit to the first training image, then the aligned
images are accumulated (each pixel with its own count); at predict to the trained mean image.
Instead of moving the image, the model (mean, band) is moved by the found shift, so the map is
in the image's own frame; pixels the model does not cover score 0, the minimum, as in the paper.
The paper aligned six categories with shape-based matching, NCC template matching or rigid
transforms of segmented regions (HALCON); translation is the part of that available here, and
the line-clearance issue adds a full registration step.

Deviations, and why:

* resolution: the paper fits at each category's original resolution; vad prepares images at
  one fixed size, 256 x 256 by default: pass the images' resolution with ``--image-size H,W``
  (e.g. ``--image-size 900`` for MVTec AD bottle) to follow the paper;
* vad's map post-processing blurs with sigma 4 by default; the paper's maps are not blurred:
  ``vad run --sigma 0`` keeps them (image scores are the unblurred maximum either way);
* registration is translation only, not HALCON's shape-based matching;
* with ``--tile`` every tile position would share one model of per-pixel statistics: the
  variation model needs whole images (no tiles).

No feature source: the model has no learned representation between the pixels and its scores.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from vad.contracts import Detector, Prediction, Preprocessing, State
from vad.errors import VadError
from vad.options import option
from vad.postprocess import blur_matrix
from vad_variation_model.alignment import DFT2, estimate_shifts, phase_correlation_peak, tapered, translate
from vad_variation_model.statistics import PixelMoments, deviation_maps, left_out_moments, to_gray, tolerance

#: Version of the saved state; bump when the meaning of the saved tensors changes.
STATE_VERSION = 1
#: Default square input side (the paper: each category's original resolution, see the docstring).
DEFAULT_SIZE = 256


class Preparation(nn.Module):
    """``[B, 3, H, W]`` images in [0, 1] to the model's gray values: x 255, the Gaussian
    smoothing as two products with scipy-'reflect' blur matrices, luma for ``color="gray"``."""

    def __init__(self, size: tuple[int, int], smoothing: float, gray: bool) -> None:
        super().__init__()
        self.smooth, self.gray = smoothing > 0, gray
        if self.smooth:
            self.register_buffer("rows", torch.tensor(blur_matrix(size[0], smoothing), dtype=torch.float32))
            self.register_buffer("cols", torch.tensor(blur_matrix(size[1], smoothing), dtype=torch.float32))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The prepared ``[B, C, H, W]`` batch (``C`` = 1 for gray, else 3)."""
        x = images.float() * 255.0
        if self.smooth:
            x = torch.matmul(torch.matmul(self.rows, x), self.cols.T)
        return to_gray(x) if self.gray else x


def registration_gray(x: torch.Tensor) -> torch.Tensor:
    """The one-channel image registration compares: the luma of colour models, else the image."""
    return to_gray(x) if x.shape[1] == 3 else x


class VariationHead(nn.Module):
    """The fitted scoring ``images [B, 3, H, W] in [0, 1] -> (scores [B], maps [B, H, W])``; with
    ``exportable`` the registration's DFT is matrix products (ONNX), else torch's FFT."""

    def __init__(self, detector: VariationModel, exportable: bool = False) -> None:
        super().__init__()
        assert detector.mean is not None and detector.std is not None and detector.count is not None
        options = detector.options
        self.prepare = detector.preparation()
        self.reduce = "max" if options.color == "gray" else options.color
        self.align = options.align == "translation"
        self.register_buffer("mean", detector.mean[None])
        self.register_buffer("band", tolerance(detector.std, options.a_abs, options.b_rel)[None])
        self.register_buffer("covered", (detector.count > 0)[None])
        self.register_buffer("reference", registration_gray(detector.mean[None]))
        height, width = (int(v) for v in detector.mean.shape[-2:])
        self.size = (height, width)
        self.dft = DFT2(height, width) if exportable and self.align else None

    def shifts(self, moving: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """Phase-correlation shifts ``[B, 2]`` of the one-channel images against the reference."""
        if self.dft is None:
            return estimate_shifts(moving, reference)
        return phase_correlation_peak(self.dft(tapered(moving)), self.dft(tapered(reference)), self.dft.inverse_real, self.size)

    def maps_for(self, x: torch.Tensor, mean: torch.Tensor, band: torch.Tensor, covered: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """Maps ``[B, H, W]`` of prepared images against a model ``[1 or B, C, H, W]`` (moved onto
        each image by its registration shift when aligning)."""
        if self.align:
            shifts = self.shifts(registration_gray(x), reference)
            mean, inside = translate(mean, shifts)
            band = torch.where(inside, translate(band, shifts)[0], torch.ones_like(band))
            covered = inside & (translate(covered.float(), shifts)[0] > 0.5)
        return deviation_maps(x, mean, band, covered, self.reduce)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image scores (map maxima) and maps at the input resolution."""
        maps = self.maps_for(self.prepare(images), self.mean, self.band, self.covered, self.reference)
        return maps.flatten(1).amax(1), maps


class VariationModel(Detector):
    """Per-pixel mean and standard deviation of aligned good images; the anomaly map is the
    distance to the mean in units of the tolerance ``max(a_abs, b_rel * std)``."""

    name = "variation-model"
    input = "images"
    produces_maps = True
    leave_one_out = True
    training_passes = 1

    class Options(Detector.Options):
        a_abs: float = option(10.0, "Smallest tolerance in gray levels 0-255 (HALCON AbsThreshold, default 10; the thesis' clipping a of the std).", gt=0)
        b_rel: float = option(2.0, "Tolerance in multiples of the per-pixel std (HALCON VarThreshold, default 2); the band is max(a_abs, b_rel * std).", ge=0)
        color: Literal["max", "mean", "gray"] = option("max", "Colour images: a model per channel, pixelwise max (MVTec AD paper) or mean (LOCO paper); gray: one model of the luma.")
        smoothing: float = option(0.0, "Gaussian sigma in pixels applied to training and test images before the statistics (0: none, as the paper).", ge=0)
        align: Literal["none", "translation"] = option("none", "Registration: none (aligned parts) or translation by phase correlation to the first training image (fit) and the mean image (predict).")

    tiny_options: ClassVar[dict[str, Any]] = {}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.preprocessing = self._preprocessing((DEFAULT_SIZE, DEFAULT_SIZE))
        self.mean: torch.Tensor | None = None  # [C, H, W]
        self.std: torch.Tensor | None = None  # [C, H, W]
        self.count: torch.Tensor | None = None  # [1, H, W]
        self.reference: torch.Tensor | None = None  # [1, H, W], the first training image (align)
        self.train_images = 0
        self._head: VariationHead | None = None

    @staticmethod
    def _preprocessing(size: tuple[int, int]) -> Preprocessing:
        """Images in [0, 1] (mean 0, std 1) at ``size``, resized bilinearly."""
        return Preprocessing(size=size, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), interpolation="bilinear")

    # ------------------------------------------------------------------ device / state

    @property
    def fitted(self) -> bool:
        """True once ``fit`` or ``load_state`` gave the detector its statistics."""
        return self.mean is not None

    @property
    def channels(self) -> int:
        """Channels of the model: 1 for ``color="gray"``, else 3."""
        return 1 if self.options.color == "gray" else 3

    def _tensors(self) -> dict[str, torch.Tensor | None]:
        return {"mean": self.mean, "std": self.std, "count": self.count, "reference": self.reference}

    def to(self, device: Any) -> VariationModel:
        """Move the statistics to ``device``."""
        super().to(device)
        for name, value in self._tensors().items():
            if value is not None:
                setattr(self, name, value.to(self.device))
        self._head = None
        return self

    def _fitted_choices(self) -> dict[str, Any]:
        return {"color": self.options.color, "smoothing": self.options.smoothing, "align": self.options.align}

    def state(self) -> State:
        """Mean, standard deviation, per-pixel count (and the registration reference), float32."""
        if not self.fitted:
            raise VadError("the variation model is not fitted: call fit() before saving it")
        tensors = {name: value.detach().cpu().contiguous() for name, value in self._tensors().items() if value is not None}
        assert self.mean is not None
        meta = {"variation_model_state_version": STATE_VERSION, "size": list(self.mean.shape[-2:]), "train_images": self.train_images, **self._fitted_choices()}
        return State(meta=meta, tensors=tensors)

    def load_state(self, state: State) -> None:
        """Restore a saved model; checks version, options and shapes before changing anything."""
        meta, tensors = state.meta, state.tensors
        version = meta.get("variation_model_state_version")
        if version != STATE_VERSION:
            raise VadError(
                f"the saved state (variation_model_state_version {version!r}) and the installed vad-variation-model "
                f"(version {STATE_VERSION}) do not fit: refit the model or install the version that saved it"
            )
        saved = {key: meta.get(key) for key in self._fitted_choices()}
        if saved != self._fitted_choices():
            raise VadError(f"the saved variation model was fitted with {saved}, which do not fit its options {self._fitted_choices()}")
        names = ["mean", "std", "count"] + (["reference"] if self.options.align == "translation" else [])
        try:
            height, width = (int(v) for v in meta["size"])
            loaded = {name: tensors[name] for name in names}
        except (KeyError, TypeError, ValueError) as error:
            raise VadError(f"the saved variation model's state does not fit: it lacks {error}; the model folder is damaged, refit") from error
        shapes = {"mean": (self.channels, height, width), "std": (self.channels, height, width), "count": (1, height, width), "reference": (1, height, width)}
        for name, value in loaded.items():
            if tuple(value.shape) != shapes[name]:
                raise VadError(f"the saved tensor {name!r} is {tuple(value.shape)}, which does not fit the expected {shapes[name]}; the model folder is damaged")
        for name, value in loaded.items():
            setattr(self, name, value.to(self.device, torch.float32))
        self.preprocessing = self._preprocessing((height, width))
        if self.options.align == "none":
            self.reference = None
        self.train_images = int(meta.get("train_images", 0))
        self._head = None

    # ------------------------------------------------------------------ fit / predict

    def preparation(self) -> Preparation:
        """The image preparation at the fitted size (on the detector's device)."""
        assert self.mean is not None
        return self._preparation(tuple(int(v) for v in self.mean.shape[-2:]))  # type: ignore[arg-type]

    def _preparation(self, size: tuple[int, int]) -> Preparation:
        return Preparation(size, self.options.smoothing, self.options.color == "gray").to(self.device)

    def _check(self, batch: Any, where: str) -> torch.Tensor:
        if not isinstance(batch, torch.Tensor) or batch.ndim != 4 or batch.shape[1] != 3:
            shape = tuple(batch.shape) if isinstance(batch, torch.Tensor) else type(batch).__name__
            raise VadError(f"variation-model {where} expects RGB image batches [B, 3, H, W] in [0, 1], got {shape}")
        return batch.detach().to(self.device, torch.float32)

    def _check_size(self, images: torch.Tensor, where: str) -> None:
        assert self.mean is not None
        fitted, got = tuple(self.mean.shape[-2:]), tuple(images.shape[-2:])
        if fitted != got:
            raise VadError(
                f"the variation model was fitted on {fitted[0]}x{fitted[1]} images but {where} got {got[0]}x{got[1]}: "
                "it compares pixel by pixel, so prepare images as for fit (the same preprocessing / --image-size)"
            )

    def fit(self, batches: Iterable[torch.Tensor]) -> None:
        """Accumulate the per-pixel moments of the (registered) training images, streaming."""
        moments = PixelMoments()
        size: tuple[int, int] | None = None
        prepare: Preparation | None = None
        reference: torch.Tensor | None = None
        images_seen = 0
        for batch in batches:
            images = self._check(batch, "fit")
            shape = (int(images.shape[-2]), int(images.shape[-1]))
            if size is None:
                size, prepare = shape, self._preparation(shape)
            elif shape != size:
                raise VadError(f"training images changed from {size[0]}x{size[1]} to {shape[0]}x{shape[1]} between batches: the variation model needs one size")
            assert prepare is not None
            with torch.no_grad():
                x = prepare(images)
                valid = torch.ones_like(x[:, :1], dtype=torch.bool)
                if self.options.align == "translation":
                    if reference is None:
                        reference = registration_gray(x[:1])
                    x, valid = translate(x, -estimate_shifts(registration_gray(x), reference))
                moments.update(x, valid)
            images_seen += int(images.shape[0])
        if size is None:
            raise VadError("the variation model got an empty training set: it needs normal training images")
        mean, std, count = moments.finish()
        # assign only now, so a failed fit leaves the detector as it was
        self.mean, self.std, self.count = mean, std, count
        self.reference = None if reference is None else reference[0].float()
        self.train_images, self._head = images_seen, None
        self.preprocessing = self._preprocessing(size)  # a fitted model takes the images it was fitted on

    def head(self) -> VariationHead:
        """The scoring module ``predict`` runs (built once per fit, load or move)."""
        if self._head is None:
            self._head = VariationHead(self).eval()
        return self._head

    def _require_fitted(self, what: str) -> None:
        if not self.fitted:
            raise VadError(f"the variation model is not fitted: call fit() (or load a saved model) before {what}")

    def predict(self, batch: torch.Tensor) -> Prediction:
        """Scores ``[B]`` (map maxima) and maps ``[B, H, W]`` at the input resolution."""
        self._require_fitted("predict()")
        images = self._check(batch, "predict")
        self._check_size(images, "predict")
        with torch.no_grad():
            scores, maps = self.head()(images)
        return Prediction(scores=scores, maps=maps)

    def predict_left_out(self, batch: torch.Tensor, indices: torch.Tensor) -> Prediction:
        """Training images scored by the model without each of them (closed-form removal of the
        image from the per-pixel moments, registered as in fit; see :func:`left_out_moments`)."""
        self._require_fitted("predict_left_out()")
        if self.train_images < 2:
            raise VadError("scoring a training image as left out needs at least 2 training images; the variation model was fitted on 1")
        images = self._check(batch, "predict_left_out")
        self._check_size(images, "predict_left_out")
        head = self.head()
        assert self.mean is not None and self.std is not None and self.count is not None
        with torch.no_grad():
            x = head.prepare(images)
            aligned, valid = x, torch.ones_like(x[:, :1], dtype=torch.bool)
            if self.reference is not None:
                aligned, valid = translate(x, -estimate_shifts(registration_gray(x), self.reference[None]))
            mean, std, count = left_out_moments(aligned, valid, self.mean, self.std, self.count)
            band = tolerance(std, self.options.a_abs, self.options.b_rel)
            maps = head.maps_for(x, mean, band, count > 0, registration_gray(mean))
        return Prediction(scores=maps.flatten(1).amax(1), maps=maps)

    def export_module(self) -> nn.Module:
        """The scoring as a traceable module (registration by DFT matrix products)."""
        self._require_fitted("export")
        return VariationHead(self, exportable=True).eval()


__all__ = ["STATE_VERSION", "VariationHead", "VariationModel"]
