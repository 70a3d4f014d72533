"""The standard patch-feature source of PatchCore-style heads, over any :class:`Backbone`.

Steps, each configurable (defaults follow the PatchCore paper and official code):

1. take the chosen layers (default: the backbone's stride-8 and stride-16 maps, i.e. two
   consecutive mid-level stages such as ResNet layer2 + layer3);
2. ``aggregation``: local neighbourhood aggregation, a ``k x k`` mean with stride 1 and zero
   padding counted in the mean. This equals the official code's unfold + adaptive average
   pooling of each 3x3 patch when the per-layer dimension is kept; 1 disables it;
3. ``layer_dim``: optional per-layer channel reduction by adaptive average pooling along
   channels (the official "pretrain_embed_dimension"), so layers weigh alike;
4. upsample deeper layers bilinearly to the grid of the first chosen layer, concatenate;
5. ``target_dim``: optional projection of the concatenation to a fixed dimension by adaptive
   average pooling along channels (the official "target_embed_dimension").
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from vad.contracts import Backbone, FeatureInfo, FeatureSource, Preprocessing
from vad.errors import VadError
from vad.options import option


def channel_pool(features: torch.Tensor, dim: int) -> torch.Tensor:
    """Adaptive average pooling along channels: ``[B, C, h, w] -> [B, dim, h, w]``."""
    b, c, h, w = features.shape
    if dim == c:
        return features
    flat = features.permute(0, 2, 3, 1).reshape(-1, 1, c)
    pooled = F.adaptive_avg_pool1d(flat, dim)
    return pooled.reshape(b, h, w, dim).permute(0, 3, 1, 2)


def layers_at_strides(backbone: Backbone, strides: Sequence[int], owner: str, option_name: str = "layers") -> list[FeatureInfo]:
    """The backbone's deepest feature map at each of ``strides`` (the levels methods name by
    stride: STFPM's and Reverse Distillation's 4, 8, 16), or a VadError naming ``owner``, what is
    missing and what the backbone offers."""
    info = backbone.feature_info()
    by_stride = {f.stride: f for f in info}  # later (deeper) maps at a stride win
    missing = [stride for stride in strides if stride not in by_stride]
    if missing:
        offered = ", ".join(f"{f.name} (stride {f.stride}, {f.channels} ch)" for f in info)
        raise VadError(
            f"{owner}: backbone {getattr(backbone, 'spec', None) or backbone.name!r} has no feature map at stride(s) {missing}; "
            f"name the levels with --set {owner}.{option_name}=[...] from: {offered}"
        )
    return [by_stride[stride] for stride in strides]


def chosen_levels(backbone: Backbone, layers: Sequence[str] | None, strides: Sequence[int], owner: str, option_name: str = "layers") -> list[FeatureInfo]:
    """``layers`` (names or positions, resolved; each level once), or the deepest maps at
    ``strides`` when ``layers`` is None: the levels a method reads from a backbone."""
    if layers is None:
        return layers_at_strides(backbone, strides, owner, option_name)
    known = {info.name: info for info in backbone.feature_info()}
    names = [backbone.resolve_layer(layer) for layer in layers]
    if len(set(names)) != len(names):
        raise VadError(f"{owner}: {option_name} {list(layers)} name the same level twice ({names})")
    unknown = [name for name in names if name not in known]
    if unknown:
        raise VadError(f"{owner}: {option_name} {unknown} are not levels of backbone {backbone.name!r}; it offers {list(known)}")
    return [known[name] for name in names]


class MovesFrozenLevels:
    """Mixin (listed before the detector base) of a detector that reads a :class:`FrozenLevels`
    kept in ``self.frozen``: moving the detector moves the backbone with it."""

    frozen: FrozenLevels

    def to(self, device: torch.device | str) -> Any:
        """Move the detector's own networks, then its frozen backbone."""
        super().to(device)  # type: ignore[misc]
        self.frozen.to(self.device)  # type: ignore[attr-defined]
        return self


class FrozenLevels:
    """A frozen backbone whose levels a trained detector reads (flows, distillation heads).

    Built on first use from the backbone spec (``pretrained``, or a local ``weights`` file; random
    weights are drawn from ``seed`` without touching the global random state); its levels are
    ``layers`` or the deepest maps at ``strides`` (:func:`chosen_levels`). The detector owns the
    trainable parts; this object holds no gradient and is not saved (it is rebuilt from the
    options).
    """

    def __init__(
        self, spec: str, *, pretrained: bool, weights: str | None, layers: Sequence[str] | None, strides: Sequence[int], seed: int,
        owner: str, option_name: str = "layers",
    ) -> None:
        self.spec, self.pretrained, self.weights, self.seed = spec, pretrained, weights, seed
        self.requested, self.strides, self.owner, self.option_name = layers, tuple(strides), owner, option_name
        self.device = torch.device("cpu")
        self._backbone: Backbone | None = None
        self._levels: list[FeatureInfo] = []

    @property
    def backbone(self) -> Backbone:
        """The backbone, built on first use."""
        if self._backbone is None:
            from vad.plugins import create_backbone

            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                backbone = create_backbone(self.spec, pretrained=self.pretrained, weights=self.weights)
            self._levels = chosen_levels(backbone, self.requested, self.strides, self.owner, self.option_name)
            self._backbone = backbone.to(self.device)
        return self._backbone

    @property
    def levels(self) -> list[FeatureInfo]:
        """The chosen levels (name, stride, channels), shallow to deep."""
        self.backbone
        return list(self._levels)

    @property
    def names(self) -> list[str]:
        """The chosen levels' names (what a detector saves as its resolved ``layers``)."""
        return [level.name for level in self.levels]

    def encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The chosen levels' maps for ``images``, without gradient (the backbone is frozen),
        cloned out of inference mode so that a head can train (or be traced) on them."""
        names = self.names
        maps = self.backbone.forward_features(images, names)
        return [maps[name].clone() for name in names]

    def to(self, device: torch.device | str) -> FrozenLevels:
        """Move the backbone (now or when it is built)."""
        self.device = torch.device(device)
        if self._backbone is not None:
            self._backbone.to(self.device)
        return self

    def preprocessing(self, size: int) -> Preprocessing:
        """Square ``size`` inputs, bilinear resize, the backbone's own mean and std."""
        own = self.backbone.preprocessing
        return Preprocessing(size=(size, size), mean=own.mean, std=own.std, interpolation="bilinear")


def network_backbone(spec: str, *, pretrained: bool, weights: str | None, owner: str, purpose: str, examples: str) -> Backbone:
    """The backbone ``spec`` (a registered name or ``family:model``, as ``--backbone``) built as a
    vad Backbone, with ``weights`` only when ``pretrained``, for methods that train or copy its
    torch network: one without a ``model`` module is a clear error saying what it is needed for
    (``purpose``) and which backbones work (``examples``)."""
    from torch import nn

    from vad.plugins import create_backbone

    options: dict[str, Any] = {"pretrained": pretrained}
    if pretrained and weights is not None:
        options["weights"] = weights
    backbone = create_backbone(spec, **options)
    if not isinstance(getattr(backbone, "model", None), nn.Module):
        raise VadError(f"{owner}: backbone {spec!r} does not expose its network (a 'model' torch module), so {purpose}; use a timm backbone such as {examples}")
    return backbone


def default_layers(backbone: Backbone) -> list[str]:
    """The stride-8 and stride-16 maps (PatchCore's mid-level pair); for a plain vision transformer
    (every block at one stride) the blocks at half and three quarters of its depth, the mid-level
    pair there; else the two shallowest past stride 4."""
    info = backbone.feature_info()
    by_stride = {f.stride: f.name for f in info}
    if 8 in by_stride and 16 in by_stride:
        return [by_stride[8], by_stride[16]]
    if len(by_stride) == 1 and len(info) >= 4:
        return [info[len(info) // 2 - 1].name, info[3 * len(info) // 4 - 1].name]
    deeper = [f.name for f in info if f.stride >= 8]
    if len(deeper) < 2:
        raise VadError(
            f"backbone {backbone.name!r} is too shallow for PatchCore's default layers: it offers "
            f"{[(f.name, f.stride) for f in info]}; choose layers explicitly"
        )
    return deeper[:2]


class PatchFeatures(FeatureSource):
    """A backbone's chosen layers, locally aggregated, aligned on one grid and concatenated."""

    name = "patch-features"
    requires_fit = False

    class Options(FeatureSource.Options):
        layers: list[str] | None = option(None, "Backbone layers (names or positions); default: the stride-8 and stride-16 stages.")
        aggregation: int = option(3, "Local neighbourhood aggregation size k x k (1: off; PatchCore: 3).", ge=1, rule=(lambda v: v % 2 == 1, "odd"))
        layer_dim: int | None = option(None, "Per-layer channel reduction by adaptive average pooling (official pretrain_embed_dimension).", ge=1)
        target_dim: int | None = option(None, "Projection of the concatenation by adaptive average pooling (official target_embed_dimension).", ge=1)

    def __init__(self, backbone: Backbone, **options: Any) -> None:
        super().__init__(**options)
        self.backbone = backbone
        requested = self.options.layers
        layers = [backbone.resolve_layer(layer) for layer in requested] if requested else default_layers(backbone)
        known = {f.name: f for f in backbone.feature_info()}
        missing = [layer for layer in layers if layer not in known]
        if missing:
            raise VadError(
                f"backbone {backbone.name!r} has no layer {missing[0]!r}; it offers "
                f"{', '.join(f'{n} (stride {f.stride})' for n, f in known.items())}"
            )
        self.options = self.options.replace(layers=layers)  # saved resolved: the same maps after reload
        self.stride = known[layers[0]].stride
        self._deepest_stride = max(known[layer].stride for layer in layers)
        channels = sum(self.options.layer_dim or known[layer].channels for layer in layers)
        self._out_channels = self.options.target_dim or channels
        self.preprocessing = backbone.preprocessing

    @property
    def hparams(self) -> dict[str, Any]:
        """The options and the backbone (its spec and options) they apply to."""
        backbone = {"spec": self.backbone.spec or self.backbone.name, "hparams": self.backbone.hparams}
        return {"backbone": backbone, **self.options.to_dict()}

    @property
    def out_channels(self) -> int:
        return self._out_channels

    @property
    def device(self) -> torch.device:
        return self.backbone.device

    def to(self, device: Any) -> PatchFeatures:
        self.backbone.to(device)
        return self

    def grid_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """The feature grid for an input of ``image_size``."""
        return (-(-image_size[0] // self.stride), -(-image_size[1] // self.stride))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if min(images.shape[-2:]) < self._deepest_stride:
            raise VadError(
                f"images of {tuple(images.shape[-2:])} px are smaller than the stride "
                f"{self._deepest_stride} of layer set {self.options.layers}; use images of at least "
                f"{self._deepest_stride} px (or shallower layers)"
            )
        maps = self.backbone.forward_features(images, self.options.layers)
        grid = maps[self.options.layers[0]].shape[-2:]
        aligned = []
        for layer in self.options.layers:
            # channels-last: the CPU pooling and interpolation kernels are much faster on it (same
            # numbers), and the fused grid is then already [B, h, w, C] in memory, as detectors
            # flatten it to patch rows
            features = maps[layer].contiguous(memory_format=torch.channels_last)
            aggregation = self.options.aggregation
            if aggregation > 1:
                features = F.avg_pool2d(features, aggregation, stride=1, padding=aggregation // 2)
            if self.options.layer_dim:
                features = channel_pool(features, self.options.layer_dim)
            if features.shape[-2:] != grid:
                features = F.interpolate(features, size=grid, mode="bilinear", align_corners=False)
            aligned.append(features)
        fused = torch.cat(aligned, dim=1)
        return channel_pool(fused, self.options.target_dim) if self.options.target_dim else fused


class SourceBatches:
    """Re-iterable feature grids of image batches (one backbone pass per iteration)."""

    def __init__(self, images: Iterable[torch.Tensor], source: FeatureSource) -> None:
        self.images, self.source = images, source

    def __len__(self) -> int:
        return len(self.images)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[torch.Tensor]:
        for batch in self.images:
            with torch.inference_mode():
                features = self.source(batch)
            yield features.clone()  # usable outside inference mode (training heads)
