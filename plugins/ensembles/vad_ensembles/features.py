"""Feature-level ensembles: one patch-feature grid fused from several member FeatureSources.

This is the heterogeneous feature-level ensemble of seed 000 (after Heller et al.'s
transformation blocks): instead of averaging the *scores* of separately fitted detectors, the
inner representations of several networks are brought to one grid and fused, and a single head
(PatchCore, SimpleNet's discriminator, ...) is fitted on the fused features.

* ``concat``: resize every member's grid to one grid (bilinear), concatenate channels.
* ``pca-global`` (global transformation block): ``concat``, then PCA along the channel
  dimension fitted on training normals only.
* ``pca-individual`` (individual transformation block): PCA per member on its own grid, then
  resize and concatenate.

**One input for all members.** The ensemble states its own :class:`Preprocessing`: the one of
the member with the largest input (its size, resize and crop), with ``mean=(0, 0, 0)`` and
``std=(1, 1, 1)``, i.e. images in [0, 1]. Inside ``__call__`` that image is resized
(bilinear, anti-aliased when shrinking, as vad's preprocessing does) to each member's own input
size and normalised with the member's own mean/std. So every member sees the same field of
view (the largest member's resize/crop), at its own resolution. Members whose inputs have a
different aspect ratio are refused: resizing would distort the image for one of them.

**Member scaling** (``scaling``): members' features can differ in scale by orders of magnitude,
and the PCA fusions (and a distance-based head on ``concat``) then follow the loudest member. With
``scaling="member"`` each member's features are centred and divided by the root of their total
variance on the training images, so every member contributes the same variance (one unit per
patch); ``"channel"`` standardises every channel (the PCA then works on correlations);
``"none"`` fuses the raw features (seed 000). The statistics are fitted on the training images
after the members, on each member's own grid, before any PCA, and saved with the ensemble.
``"channel"`` is the default, a declared deviation from seed 000: with PatchCore on lite0 +
lite2 it beat the raw fusion on the demo data (pca-global image AUROC 0.965 against 0.920) and on
the larger generated set (0.976 against 0.970); the SimpleNet discriminator on the fused
features prefers the raw fusion (0.938 against 0.892 on the demo). Tables in docs/demo-results.md.

**The fused grid** is ``grid=(h, w)`` (or one side ``grid=n`` for ``(n, n)``) when given, else the
finest member grid (the one with the most positions); each member map is resized to it
bilinearly (``align_corners=False``).

**Options** are declared (:mod:`vad.options`): the constructor is ``cls(members, **options)``
and ``hparams`` holds the members' configs plus the options, from which vad rebuilds the
ensemble. ``n_components`` is checked against the members' channels when they are known (at
construction), since no declaration can know them.

PCA is fitted by :meth:`fit` on training batches only (see :mod:`vad_ensembles.pca` for how
memory stays bounded); ``__call__`` only projects, it never refits.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F

from vad import artifacts
from vad.contracts import FeatureEnsembler, FeatureSource, Preprocessing, State
from vad.errors import VadError
from vad.options import Options, option
from vad.preprocess import resize_batch
from vad.training import member_session

from vad_ensembles.pca import PCA, PCAFitter, grid_to_patches

#: Relative aspect-ratio difference above which members are refused (resizing would distort).
ASPECT_TOLERANCE = 0.02
#: Scaled member input sizes are rounded to a multiple of this (the deepest stride of the
#: shipped backbones' stages).
SIZE_MULTIPLE = 32


def _check_members(members: Any, name: str) -> list[FeatureSource]:
    if isinstance(members, FeatureSource) or not isinstance(members, (list, tuple)):
        raise VadError(f"ensemble {name!r} takes a list of member feature sources, got {type(members).__name__}")
    members = list(members)
    if len(members) < 2:
        raise VadError(
            f"ensemble {name!r} needs at least two members, got {len(members)}; "
            "give several backbones (--backbone A --backbone B) or drop --ensemble"
        )
    for index, member in enumerate(members):
        if not isinstance(member, FeatureSource):
            raise VadError(
                f"member {index} of ensemble {name!r} is a {type(member).__name__}, not a FeatureSource "
                "(e.g. vad.features.PatchFeatures over a backbone)"
            )
    return members


def _input_preprocessing(members: Sequence[FeatureSource], name: str) -> Preprocessing:
    """The largest member's preprocessing with identity normalisation; refuses distorting aspect ratios."""
    reference = max(members, key=lambda m: m.preprocessing.size[0] * m.preprocessing.size[1])
    ref_h, ref_w = reference.preprocessing.size
    for index, member in enumerate(members):
        height, width = member.preprocessing.size
        if abs((height / width) / (ref_h / ref_w) - 1.0) > ASPECT_TOLERANCE:
            raise VadError(
                f"member {index} of ensemble {name!r} expects {height}x{width} inputs but the largest member "
                f"expects {ref_h}x{ref_w}: the ensemble resizes one shared image to each member's size, which "
                "would distort one of them; choose members with the same aspect ratio"
            )
    return dataclasses.replace(reference.preprocessing, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


#: What ``n_components`` allows: a count of components or a variance fraction.
_COMPONENTS_RULE = (
    lambda v: v >= 1 if isinstance(v, int) else 0.0 < v < 1.0,
    "a number of components >= 1 (integer) or a variance fraction in (0, 1)",
)


def _check_width(options: Options, value: int | float, channels: int, what: str) -> None:
    """Refuse an ``n_components`` count above the channels of ``what`` (known only from the members)."""
    if isinstance(value, int) and value > channels:
        raise options.invalid("n_components", f"at most {channels}, the channels of {what} (or a variance fraction such as 0.95)")


class FeatureEnsemble(FeatureEnsembler):
    """Shared machinery: members' inputs from the shared image, grid alignment, state, device."""

    name = ""

    class Options(FeatureEnsembler.Options):
        grid: tuple[int, int] | int | None = option(None, "Fused grid (height, width), or one side for a square grid; default: the finest member grid.", ge=1)
        scaling: Literal["none", "member", "channel"] = option(
            "channel",
            "Members' features before fusion, statistics from the training images: channel (default; deviation from seed 000): every "
            "channel standardised; member: centred, each member divided by the root of its total variance; none: raw (seed 000). "
            "Measured in docs/demo-results.md.",
        )

    def __init__(self, members: Sequence[FeatureSource], **options: Any) -> None:
        super().__init__(_check_members(members, self.name), **options)
        if isinstance(self.options.grid, int):  # saved as (height, width)
            self.options = self.options.replace(grid=(self.options.grid, self.options.grid))
        self.preprocessing = _input_preprocessing(self.members, self.name)
        #: Per member ``(mean [C], scale [C])`` of ``scaling``, fitted on the training images.
        self.scales: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    @property
    def hparams(self) -> dict[str, Any]:
        """The members' configs and the options: ``cls(members, **options)`` rebuilds the ensemble."""
        return {"members": [member.config() for member in self.members], **self.options.to_dict()}

    # ------------------------------------------------------------------ fit / state

    #: True when the fusion itself learns from training images (PCA).
    learns: ClassVar[bool] = False

    @property
    def scaled(self) -> bool:
        """True when members' features are rescaled before fusion (``scaling`` is not none)."""
        return self.options.scaling != "none"

    @property
    def requires_fit(self) -> bool:  # type: ignore[override]
        """True when the fusion learns (PCA, member scaling) or a member still has to (a
        detector's features, e.g. DRAEM)."""
        return self.learns or self.scaled or any(member.requires_fit for member in self.members)

    def fit(self, images: Iterable[torch.Tensor]) -> None:
        """Fit the members that learn (each on its own inputs, one pass per member), then the
        member scaling (one pass); subclasses then fit their fusion on the scaled features."""
        for index, member in enumerate(self.members):
            if member.requires_fit:
                with member_session(f"member{index}"):  # a trained member keeps its own checkpoints
                    member.fit(_MemberInputs(self, index, images))
        if self.scaled:
            self.scales = self._fit_scales(images)

    def _fit_scales(self, images: Iterable[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``scaling``'s per-member mean and scale from the training images (float64 sums)."""
        counts = [0] * len(self.members)  # positions per member (members' grids differ)
        sums: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per member: sum, sum of squares
        with torch.inference_mode():
            for batch in images:
                rows = [grid_to_patches(g).double() for g in self._raw_member_grids(batch)]
                counts = [count + r.shape[0] for count, r in zip(counts, rows)]
                parts = [(r.sum(dim=0), (r * r).sum(dim=0)) for r in rows]
                sums = parts if sums is None else [(a + c, b + d) for (a, b), (c, d) in zip(sums, parts)]
        if sums is None:
            raise VadError(f"ensemble {self.name!r} got no training images to fit its member scaling on")
        scales = []
        for count, (total, squares) in zip(counts, sums):
            mean = total / count
            variance = (squares / count - mean * mean).clamp_min(0)
            if self.options.scaling == "member":
                scale = torch.full_like(variance, float(variance.sum().sqrt()))
            else:
                scale = variance.sqrt()
            scales.append((mean.float().to(self.device), scale.clamp_min(1e-6).float().to(self.device)))
        return scales

    def state(self) -> State:
        """The members' fitted states (those that have one), under ``member<i>/``."""
        meta: dict[str, Any] = {}
        tensors: dict[str, torch.Tensor] = {}
        for index, member in enumerate(self.members):
            member_state = member.state()
            if member_state.meta or member_state.tensors:
                meta[f"member{index}"] = member_state.meta
                tensors.update(artifacts.prefixed(f"member{index}", member_state.tensors))
        if self.scaled:
            self._require_fitted(self.scales is not None)
            assert self.scales is not None
            for index, (mean, scale) in enumerate(self.scales):
                tensors[f"scaling{index}/mean"], tensors[f"scaling{index}/scale"] = mean, scale
        return State(meta={"members": meta} if meta else {}, tensors=tensors)

    def load_state(self, state: State) -> None:
        """Restore the members' states saved by :meth:`state`."""
        saved = state.meta.get("members", {})
        for index, member in enumerate(self.members):
            key = f"member{index}"
            if key in saved:
                member.load_state(State(saved[key], artifacts.unprefixed(key, state.tensors)))
        if self.scaled:
            names = [(f"scaling{index}/mean", f"scaling{index}/scale") for index in range(len(self.members))]
            missing = [name for pair in names for name in pair if name not in state.tensors]
            if missing:
                raise VadError(f"ensemble {self.name!r} was saved without its member scaling ({', '.join(missing)} missing); save it again")
            self.scales = [(state.tensors[mean].to(self.device), state.tensors[scale].to(self.device)) for mean, scale in names]

    # ------------------------------------------------------------------ device

    @property
    def device(self) -> torch.device:
        return self.members[0].device

    def to(self, device: torch.device | str) -> FeatureEnsemble:
        for member in self.members:
            member.to(device)
        self._device = torch.device(device)
        if self.scales is not None:
            self.scales = [(mean.to(self._device), scale.to(self._device)) for mean, scale in self.scales]
        self._move_fitted(self._device)
        return self

    def _move_fitted(self, device: torch.device) -> None:
        """Move fitted tensors (PCA) to ``device``; nothing to move by default."""

    # ------------------------------------------------------------------ features

    def member_size(self, index: int, shared: tuple[int, int]) -> tuple[int, int]:
        """Member ``index``'s input size for a shared input of ``shared`` px: its own size,
        scaled as the shared input is scaled from the ensemble's own size (``vad run
        --image-size``/``--tile``), rounded to a multiple of :data:`SIZE_MULTIPLE`."""
        own, reference = self.members[index].preprocessing.size, self.preprocessing.size
        if tuple(shared) == tuple(reference):
            return tuple(own)
        return tuple(max(SIZE_MULTIPLE, round(o * s / r / SIZE_MULTIPLE) * SIZE_MULTIPLE) for o, s, r in zip(own, shared, reference))

    def member_input(self, images: torch.Tensor, index: int) -> torch.Tensor:
        """Member ``index``'s input from the shared [0, 1] batch: resized to its size (scaled with
        the shared input's), normalised its way."""
        prep = self.members[index].preprocessing
        x = resize_batch(images, self.member_size(index, tuple(images.shape[-2:])), prep.interpolation)
        mean = torch.tensor(prep.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(prep.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return (x - mean) / std

    def member_inputs(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Every member's input from the shared [0, 1] batch."""
        return [self.member_input(images, index) for index in range(len(self.members))]

    def member_grids(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Every member's feature grid on its own resolution, scaled as ``scaling`` says."""
        grids = self._raw_member_grids(images)
        if not self.scaled:
            return grids
        self._require_fitted(self.scales is not None)
        assert self.scales is not None
        return [(g - mean.view(1, -1, 1, 1)) / scale.view(1, -1, 1, 1) for g, (mean, scale) in zip(grids, self.scales)]

    def _raw_member_grids(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Every member's own features on its own resolution."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise VadError(f"expected an image batch [B, 3, H, W], got shape {tuple(images.shape)}")
        return [member(x) for member, x in zip(self.members, self.member_inputs(images))]

    def fused_grid(self, grids: Sequence[torch.Tensor]) -> tuple[int, int]:
        """The configured grid, or the finest member grid."""
        if self.options.grid is not None:
            return self.options.grid
        finest = max(grids, key=lambda g: g.shape[-2] * g.shape[-1])
        return (int(finest.shape[-2]), int(finest.shape[-1]))

    @staticmethod
    def resize(features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Bilinear resize of a grid ``[B, C, h, w]`` to ``grid`` (a no-op when equal)."""
        if tuple(features.shape[-2:]) == tuple(grid):
            return features
        return F.interpolate(features, size=grid, mode="bilinear", align_corners=False)

    def concatenated(self, images: torch.Tensor) -> torch.Tensor:
        """Members' grids resized to the fused grid and concatenated along channels."""
        grids = self.member_grids(images)
        grid = self.fused_grid(grids)
        return torch.cat([self.resize(g, grid) for g in grids], dim=1)

    def _require_fitted(self, fitted: bool) -> None:
        if not fitted:
            raise VadError(f"feature ensemble {self.name!r} must be fitted on training images before it is used")


class ConcatEnsemble(FeatureEnsemble):
    """Resize every member's features to one grid and concatenate channels (no PCA; the baseline)."""

    name = "concat"

    @property
    def out_channels(self) -> int:
        return sum(member.out_channels for member in self.members)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.concatenated(images)


class PCAEnsemble(FeatureEnsemble):
    """Shared options of the PCA fusions: how many training patches the PCA is fitted on."""

    learns = True

    class Options(FeatureEnsemble.Options):
        max_fit_patches: int | None = option(None, "Training patches the PCA is fitted on: null fits the exact covariance of every patch (memory O(C^2)); N a seeded uniform sample of N.", ge=2)
        seed: int = option(0, "Seed of the sample of training patches (with max_fit_patches).")


class PCAGlobalEnsemble(PCAEnsemble):
    """Global transformation block: resize members to one grid, concatenate, PCA along channels.

    ``n_components``: an int (components kept), a float in (0, 1) (the smallest number of
    components explaining more than that variance fraction), or None: as many components as the
    widest member has channels, so the fused features are as wide as one member's (seed 000:
    "maintaining an equal amount of maps as if it were composed of a single classifier"); the
    resolved count is what ``hparams`` saves.
    ``max_fit_patches``: None fits on the exact covariance of every training patch (memory
    O(C^2)); an int fits on a uniform sample of that many patches drawn with ``seed``.
    """

    name = "pca-global"

    class Options(PCAEnsemble.Options):
        n_components: int | float | None = option(None, "Components kept (int) or variance fraction kept (float in (0, 1)); null: the widest member's channels (seed 000).", rule=_COMPONENTS_RULE)

    tiny_options = {"n_components": 8}

    def __init__(self, members: Sequence[FeatureSource], **options: Any) -> None:
        super().__init__(members, **options)
        if self.options.n_components is None:
            self.options = self.options.replace(n_components=max(member.out_channels for member in self.members))
        channels = sum(member.out_channels for member in self.members)
        _check_width(self.options, self.options.n_components, channels, "the concatenated members")
        self.pca: PCA | None = None

    @property
    def out_channels(self) -> int:
        if self.pca is not None:
            return self.pca.n_components
        if isinstance(self.options.n_components, float):
            raise VadError("pca-global keeps a variance fraction: its width is known only after fit")
        return int(self.options.n_components)

    def fit(self, images: Iterable[torch.Tensor]) -> None:
        """Fit the members that learn, then the PCA on the concatenated member features of the
        training batches."""
        super().fit(images)
        fitter = PCAFitter(self.options.max_fit_patches, self.options.seed)
        with torch.inference_mode():
            for batch in images:
                fitter.update(self.concatenated(batch))
        if fitter.count == 0:
            raise VadError("pca-global got no training images to fit on")
        self.pca = fitter.fit(self.options.n_components).to(self.device)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self._require_fitted(self.pca is not None)
        assert self.pca is not None
        return self.pca.transform(self.concatenated(images))

    def state(self) -> State:
        self._require_fitted(self.pca is not None)
        assert self.pca is not None
        members = super().state()
        return State(
            meta={
                **members.meta,
                "n_components_kept": self.pca.n_components,
                "explained_variance_kept": float(self.pca.explained_variance_ratio.sum()),
            },
            tensors={**members.tensors, **self.pca.tensors("pca")},
        )

    def load_state(self, state: State) -> None:
        super().load_state(state)
        self.pca = PCA.from_tensors(state.tensors, "pca").to(self.device)

    def _move_fitted(self, device: torch.device) -> None:
        if self.pca is not None:
            self.pca = self.pca.to(device)


class PCAIndividualEnsemble(PCAEnsemble):
    """Individual transformation block: PCA per member on its own grid, then resize and concatenate.

    ``n_components``: one value for every member or a list with one per member; each an int or
    a variance fraction in (0, 1). None: every member keeps ``widest member channels // members``
    components, so the fused width matches one member's (like ``pca-global``'s default).
    """

    name = "pca-individual"

    class Options(PCAEnsemble.Options):
        n_components: int | float | list[int | float] | None = option(None, "Components (int) or variance fraction (float in (0, 1)) kept per member, one for all or a list with one per member; null: widest member's channels // members.", rule=_COMPONENTS_RULE)

    tiny_options = {"n_components": 4}

    def __init__(self, members: Sequence[FeatureSource], **options: Any) -> None:
        super().__init__(members, **options)
        value = self.options.n_components
        if value is None:
            share = max(1, max(member.out_channels for member in self.members) // len(self.members))
            per_member: list[int | float] = [min(share, member.out_channels) for member in self.members]
        elif isinstance(value, tuple):
            if len(value) != len(self.members):
                raise self.options.invalid("n_components", f"one value for all members or a list of {len(self.members)}, one per member")
            per_member = list(value)
        else:
            per_member = [value] * len(self.members)
        for index, (count, member) in enumerate(zip(per_member, self.members)):
            _check_width(self.options, count, member.out_channels, f"member {index}")
        #: Components kept per member (``n_components`` resolved against the members).
        self.member_components = per_member
        self.pcas: list[PCA] | None = None

    @property
    def out_channels(self) -> int:
        if self.pcas is not None:
            return sum(pca.n_components for pca in self.pcas)
        if any(isinstance(value, float) for value in self.member_components):
            raise VadError("pca-individual keeps a variance fraction: its width is known only after fit")
        return sum(int(value) for value in self.member_components)

    def fit(self, images: Iterable[torch.Tensor]) -> None:
        """Fit the members that learn, then one PCA per member on its own training feature grid."""
        super().fit(images)
        # Different seeds per member so their patch samples are independent.
        fitters = [PCAFitter(self.options.max_fit_patches, self.options.seed + index) for index in range(len(self.members))]
        with torch.inference_mode():
            for batch in images:
                for fitter, grid in zip(fitters, self.member_grids(batch)):
                    fitter.update(grid)
        if fitters[0].count == 0:
            raise VadError("pca-individual got no training images to fit on")
        self.pcas = [fitter.fit(value).to(self.device) for fitter, value in zip(fitters, self.member_components)]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self._require_fitted(self.pcas is not None)
        assert self.pcas is not None
        grids = self.member_grids(images)
        grid = self.fused_grid(grids)
        return torch.cat([self.resize(pca.transform(g), grid) for pca, g in zip(self.pcas, grids)], dim=1)

    def state(self) -> State:
        self._require_fitted(self.pcas is not None)
        assert self.pcas is not None
        members = super().state()
        tensors = dict(members.tensors)
        for index, pca in enumerate(self.pcas):
            tensors.update(pca.tensors(f"pca{index}"))
        return State(meta={**members.meta, "n_components_kept": [pca.n_components for pca in self.pcas]}, tensors=tensors)

    def load_state(self, state: State) -> None:
        super().load_state(state)
        self.pcas = [PCA.from_tensors(state.tensors, f"pca{index}").to(self.device) for index in range(len(self.members))]

    def _move_fitted(self, device: torch.device) -> None:
        if self.pcas is not None:
            self.pcas = [pca.to(device) for pca in self.pcas]


class _MemberInputs:
    """Re-iterable: member ``index``'s inputs for each shared training batch (one fresh pass per ``iter``)."""

    def __init__(self, ensemble: FeatureEnsemble, index: int, images: Iterable[torch.Tensor]) -> None:
        self.ensemble, self.index, self.images = ensemble, index, images

    def __iter__(self):
        for batch in self.images:
            yield self.ensemble.member_input(batch, self.index)
