"""Any timm network as a frozen vad :class:`~vad.contracts.Backbone` (``features_only``).

``TimmBackbone("wide_resnet50_2")`` builds timm's feature extractor for the network, loads
pretrained weights (see :mod:`vad_timm.weights` for where they come from, in order) and
returns named feature maps. A pretrained tag may be part of the name, as in timm:
``wide_resnet50_2.tv_in1k`` gives torchvision's ImageNet weights, which the official
PatchCore code uses; a bare name gives timm's default tag.

Layers are named by timm's module names (``layer2``, ``blocks.3``; see :meth:`feature_info`)
or by their position among the feature maps as a string (``"1"``, ``"2"``).

Vision transformers (DINOv2, DINOv3, CLIP and other timm ViTs, :mod:`vad_timm.vit`) offer every
block, named ``blocks.i`` and at position ``i`` (so ``"11"`` is block 11), as the grid of its
patch tokens ``[B, C, H/p, W/p]`` (class and register tokens dropped) at any input size that is a
multiple of the patch size ``p``; ``final_norm`` and ``position_interpolation`` apply to them only.

Preprocessing comes from the network's pretrained config (input size, mean, std,
interpolation). Deviation from ImageNet evaluation: the image is resized to the input size
*without* the centre crop (``crop_pct`` is reported by :meth:`describe` but not applied),
because vad maps anomaly maps back onto the whole image and a crop would hide its borders.
"""

from __future__ import annotations

import contextlib
import difflib
import os
from collections.abc import Sequence
from typing import Any, Literal

import torch

from vad.contracts import Backbone, FeatureInfo, Preprocessing
from vad.errors import VadError
from vad.options import option
from vad_timm import weights as weights_lib
from vad_timm.compat import import_timm, use_offline_hub_if_unreachable
from vad_timm.vit import TokenGrid, default_position_interpolation, is_vision_transformer

#: Options that only vision transformers take (left out of a CNN's ``hparams``).
TRANSFORMER_OPTIONS = ("final_norm", "position_interpolation")


def _holds_meta_tensors(model: torch.nn.Module) -> bool:
    """Whether any parameter, buffer or plain tensor attribute was left on the meta device."""
    for module in model.modules():
        tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        tensors += [v for v in vars(module).values() if isinstance(v, torch.Tensor)]
        if any(t.is_meta for t in tensors):
            return True
    return False


class TimmBackbone(Backbone):
    """Any timm network as a frozen feature extractor (timm's features_only), offline-first weights."""

    name = "timm"
    tiny_model = "resnet18"

    class Options(Backbone.Options):
        channels_last: bool | None = option(None, "Channels-last layout for inputs and weights; null: the device default (off, the float32 reference).")
        autocast: bool | None = option(None, "bfloat16 autocast of the forward pass; null: the device default (off, the float32 reference).")
        final_norm: bool = option(False, "Vision transformers: pass each returned block through the network's final norm (DINOv2's get_intermediate_layers(norm=True)); CNNs: must stay false.")
        position_interpolation: Literal["timm", "dinov2"] | None = option(None, "Vision transformers: how the pretrained position embedding is resized to another grid: timm (bicubic, antialiased) or dinov2 (the official DINOv2 code: no antialias, scale (n + 0.1)/N); null: dinov2 for DINOv2 without registers, else timm. CNNs: must stay null.")

    def __init__(self, model_name: str, **options: Any) -> None:
        """Build timm's ``model_name`` as a feature extractor.

        ``weights``: a local ``.safetensors`` / ``.pth`` state dict (takes precedence).
        ``pretrained=False``: random initialisation (``--no-pretrained``); ``weights`` is then
        ignored. ``channels_last`` / ``autocast`` (bfloat16): None means the device default,
        which is off (float32, contiguous): it is the reference, and the speed-up on CUDA was
        not measured when this was written (``benchmarks/backbones.py`` measures it).
        """
        timm = import_timm()
        if not isinstance(model_name, str) or not model_name:
            raise VadError(f"a timm model name is needed (e.g. resnet18), got {model_name!r}")
        super().__init__(model_name, **options)
        pretrained_cfg = self._pretrained_cfg(timm, model_name)
        architecture = weights_lib.split_model_name(model_name)[0]
        self.is_vision_transformer = is_vision_transformer(timm, architecture)
        self._resolve_transformer_options(architecture)
        self.model, self.weights = self._build(timm, model_name, pretrained_cfg)
        self.model.eval().requires_grad_(False)
        self.pretrained_cfg = {k: v for k, v in dict(self.model.pretrained_cfg).items() if k != "state_dict"}
        self.tokens: TokenGrid | None = None
        if self.is_vision_transformer:
            self.tokens = TokenGrid(self.model, self.options.position_interpolation)
            info = [(entry["module"], entry["reduction"], entry["num_chs"]) for entry in self.model.feature_info]
        else:
            listed = self.model.feature_info
            info = list(zip(listed.module_name(), listed.reduction(), listed.channels()))
        self._features = [FeatureInfo(name=name, stride=int(stride), channels=int(channels)) for name, stride, channels in info]
        self._position = {f.name: i for i, f in enumerate(self._features)}
        self.preprocessing = self._preprocessing(self.pretrained_cfg)
        self._feature_dict_net = isinstance(self.model, timm.models.FeatureDictNet)

    # ------------------------------------------------------------------ construction

    def _resolve_transformer_options(self, architecture: str) -> None:
        """Refuse the transformer-only options for other networks; resolve the default
        position interpolation (saved resolved, so a reload resizes alike)."""
        options = self.options
        if not self.is_vision_transformer:
            if options.final_norm or options.position_interpolation is not None:
                raise VadError(
                    f"{self.describe_owner()}: final_norm and position_interpolation apply to vision transformers; "
                    f"{self.model_name!r} is not one"
                )
            return
        if options.position_interpolation is None:
            self.options = options.replace(position_interpolation=default_position_interpolation(architecture))

    @property
    def hparams(self) -> dict[str, Any]:
        """The options; a CNN's leave out the transformer-only ones."""
        values = self.options.to_dict()
        if not self.is_vision_transformer:
            for name in TRANSFORMER_OPTIONS:
                values.pop(name)
        return values

    @staticmethod
    def _pretrained_cfg(timm: Any, model_name: str) -> dict[str, Any]:
        architecture, _ = weights_lib.split_model_name(model_name)
        if not timm.is_model(architecture):
            close = difflib.get_close_matches(architecture, timm.list_models(), n=3, cutoff=0.6)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise VadError(f"timm has no model {architecture!r}.{hint} See `timm.list_models()` for names.")
        try:
            cfg = timm.models.get_pretrained_cfg(model_name)
        except RuntimeError as error:  # unknown pretrained tag
            tags = timm.list_pretrained(f"{architecture}.*")
            raise VadError(f"{error} Known: {', '.join(tags) or 'none'}") from error
        return cfg.to_dict() if cfg is not None else {}

    def _create(self, timm: Any, model_name: str, **kwargs: Any) -> torch.nn.Module:
        """timm's feature extractor; for a vision transformer the whole network with dynamic input size."""
        how = {"dynamic_img_size": True} if self.is_vision_transformer else {"features_only": True}
        try:
            return timm.create_model(model_name, **how, **kwargs)
        except (RuntimeError, AssertionError, TypeError, KeyError) as error:
            what = "with dynamic input size" if self.is_vision_transformer else "as a feature extractor (features_only)"
            raise VadError(f"timm cannot build {model_name!r} {what}: {error}") from error

    def _build(self, timm: Any, model_name: str, cfg: dict[str, Any]) -> tuple[torch.nn.Module, str]:
        """The feature network and a one-line description of where its weights came from."""
        if not self.options.pretrained:
            return self._create(timm, model_name, pretrained=False), "RANDOM (--no-pretrained)"
        state, origin = None, None
        if self.options.weights is not None:
            path = os.path.abspath(os.path.expanduser(self.options.weights))
            state, origin = weights_lib.read_weights_file(path), f"local file: {path}"
            label = f"weights file {path!r}"
        else:
            packaged = weights_lib.packaged_weights_file(model_name)
            if packaged is not None:
                distribution = weights_lib.PACKAGED_WEIGHTS[weights_lib.split_model_name(model_name)[0]][0]
                origin, label = f"packaged: {distribution}", f"packaged checkpoint {packaged}"
                state = weights_lib.packaged_state_dict(model_name)
        if state is not None:
            if self.is_vision_transformer:
                state = weights_lib.converted_checkpoint(state, model_name)
            reference = weights_lib.reference_state_dict(model_name)
            ready = weights_lib.check_state_dict(
                state, reference, head_prefixes=weights_lib.classifier_prefixes(cfg),
                model_name=model_name, origin=label,
            )
            return self._load_checked(timm, model_name, ready), origin
        return self._from_hub(timm, model_name, cfg), f"hub/cache: {cfg.get('hf_hub_id') or cfg.get('url')}"

    def _load_checked(self, timm: Any, model_name: str, state: dict[str, torch.Tensor]) -> torch.nn.Module:
        """The feature network holding ``state`` (already checked against the full network).

        Built on the ``meta`` device and filled by assignment, so that no time goes into a random
        initialisation that would be overwritten; networks with non-persistent buffers (which a
        state dict does not carry) are built for real instead.
        """
        with torch.device("meta"):
            skeleton = self._create(timm, model_name, pretrained=False)
        mapping = weights_lib.features_key_map(list(skeleton.state_dict()), set(state))
        features_state = {key: state[full_key] for key, full_key in mapping.items()}
        persistent = set(skeleton.state_dict())
        if all(name in persistent for name, _ in skeleton.named_buffers()):
            skeleton.load_state_dict(features_state, strict=True, assign=True)
            if not _holds_meta_tensors(skeleton):
                return skeleton
        model = self._create(timm, model_name, pretrained=False)
        model.load_state_dict(features_state, strict=True)
        return model

    def _from_hub(self, timm: Any, model_name: str, cfg: dict[str, Any]) -> torch.nn.Module:
        if not weights_lib.has_hub_source(cfg):
            raise weights_lib.WeightsError(
                f"timm has no pretrained weights for {model_name!r}. " + weights_lib.how_to_provide_weights(model_name)
            )
        offline = use_offline_hub_if_unreachable()
        if offline and weights_lib.hub_cached_file(cfg) is None:
            # fail before building anything: offline, a cache miss can only end in an error
            raise weights_lib.WeightsError(
                f"no weights for {model_name!r}: the Hugging Face hub is unreachable (offline) and its "
                "local cache holds none. " + weights_lib.how_to_provide_weights(model_name)
            )
        try:
            return self._create(timm, model_name, pretrained=True)
        except Exception as error:  # network errors come in many types
            raise weights_lib.WeightsError(
                f"could not get weights for {model_name!r} from the Hugging Face hub: "
                f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}. "
                + weights_lib.how_to_provide_weights(model_name)
            ) from error

    @staticmethod
    def _preprocessing(cfg: dict[str, Any]) -> Preprocessing:
        _, height, width = cfg.get("input_size", (3, 224, 224))
        interpolation = cfg.get("interpolation") or "bilinear"
        return Preprocessing(
            size=(int(height), int(width)),
            mean=tuple(float(v) for v in cfg.get("mean", (0.485, 0.456, 0.406))),
            std=tuple(float(v) for v in cfg.get("std", (0.229, 0.224, 0.225))),
            interpolation=interpolation if interpolation in ("bilinear", "bicubic", "nearest", "area") else "bilinear",
            resize=None,
            crop=False,  # whole image, see the module docstring
        )

    # ------------------------------------------------------------------ contract

    @classmethod
    def weights_source(cls, model_name: str) -> str | None:
        """Packaged or locally cached weights for ``model_name`` (never downloads or builds)."""
        packaged = weights_lib.packaged_weights_file(model_name)
        if packaged is not None:
            distribution = weights_lib.PACKAGED_WEIGHTS[weights_lib.split_model_name(model_name)[0]][0]
            return f"packaged: {distribution} ({packaged})"
        if model_name == cls.name:  # the family entry: any timm model
            return None
        timm = import_timm()
        try:
            cfg = timm.models.get_pretrained_cfg(model_name)
        except RuntimeError:
            return None
        cached = weights_lib.hub_cached_file(cfg.to_dict()) if cfg is not None else None
        return f"hub/cache: {cached}" if cached else None

    def feature_info(self) -> list[FeatureInfo]:
        """Every feature map, shallow to deep; ``name`` is timm's module name (``layer2``)."""
        return list(self._features)

    def resolve_layer(self, layer: str | int) -> str:
        """timm's module name for ``layer`` (a module name, or a position such as ``"2"``)."""
        key = str(layer)
        if key in self._position:
            return key
        if key.lstrip("-").isdigit() and -len(self._features) <= int(key) < len(self._features):
            return self._features[int(key)].name
        offered = ", ".join(f"{i}: {f.name} (stride {f.stride}, {f.channels} ch)" for i, f in enumerate(self._features))
        raise VadError(f"timm model {self.model_name!r} has no layer {layer!r}; it offers {offered}")

    def to(self, device: torch.device | str) -> TimmBackbone:
        """Move the network to ``device`` (channels-last there when enabled)."""
        super().to(device)
        self.model.to(self.device)
        if self.tokens is not None:
            self.tokens.to(self.device)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        return self

    @property
    def channels_last(self) -> bool:
        """Whether inputs and weights use the channels-last layout (off unless asked for)."""
        return bool(self.options.channels_last)

    @property
    def autocast(self) -> bool:
        """Whether the forward pass runs under bfloat16 autocast (off unless asked for)."""
        return bool(self.options.autocast)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if not self.autocast:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def _run(self, images: torch.Tensor, wanted: set[int]) -> dict[int, torch.Tensor]:
        """Feature maps at the ``wanted`` positions, stopping after the deepest one when timm's
        wrapper allows it (FeatureDictNet runs its modules in a plain sequence); a vision
        transformer's blocks as token grids, up to the deepest one."""
        if self.tokens is not None:
            return self.tokens.run(images, sorted(wanted), self.options.final_norm)
        if not self._feature_dict_net:
            outputs = self.model(images)
            outputs = list(outputs.values()) if isinstance(outputs, dict) else list(outputs)
            return {i: outputs[i] for i in wanted}
        out, x, position = {}, images, 0
        for name, module in self.model.items():
            x = module(x)
            if name in self.model.return_layers:
                if position in wanted:
                    out[position] = (torch.cat(x, 1) if self.model.concat else x[0]) if isinstance(x, (tuple, list)) else x
                    if len(out) == len(wanted):
                        break
                position += 1
        return out

    def check_input_size(self, height: int, width: int) -> None:
        """Vision transformers read inputs whose sides are multiples of their patch."""
        if self.tokens is not None:
            self.tokens.check_size(height, width)

    def forward_features(self, images: torch.Tensor, layers: Sequence[str]) -> dict[str, torch.Tensor]:
        """``{layer: [B, C, H/stride, W/stride]}`` (float32) for the requested layers only."""
        if isinstance(layers, str):
            layers = [layers]
        if not layers:
            raise VadError("forward_features needs at least one layer; see feature_info()")
        positions = {layer: self._position[self.resolve_layer(layer)] for layer in layers}
        if images.ndim != 4 or images.shape[1] != 3:
            raise VadError(f"expected an image batch [B, 3, H, W], got shape {tuple(images.shape)}")
        with torch.inference_mode(), self._autocast():
            x = images.to(self.device, torch.float32)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            maps = self._run(x, set(positions.values()))
        return {layer: maps[p].float() for layer, p in positions.items()}

    def describe(self) -> dict[str, Any]:
        """Model, weights source, preprocessing (with the pretrained config's crop_pct) and layers."""
        cfg = self.pretrained_cfg
        facts = {
            "model": self.model_name,
            "weights": self.weights,
            "pretrained_config": {
                key: cfg.get(key)
                for key in ("architecture", "tag", "input_size", "interpolation", "crop_pct", "mean", "std", "hf_hub_id")
            },
            "preprocessing_note": "resized to the input size without the centre crop (crop_pct not applied), "
            "so anomaly maps cover the whole image",
            "channels_last": self.channels_last,
            "autocast_bf16": self.autocast,
        }
        if self.tokens is not None:
            facts["vision_transformer"] = self.tokens.facts(self.options.final_norm)
        facts.update(super().describe())
        facts["layers_by_index"] = {str(i): f.name for i, f in enumerate(self._features)}
        return facts
