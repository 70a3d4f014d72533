"""The CLIP model WinCLIP runs on, through open_clip: its configuration, its weights (offline
first) and the text embeddings of the prompt ensemble.

* ``model`` is an open_clip architecture name (the paper's ``ViT-B-16-plus-240``), a JSON file of
  an open_clip model configuration, or :data:`TEST_MODELS`' tiny random CLIP for tests. WinCLIP
  masks patch tokens, so the image tower must be open_clip's own ViT; the text tower must use
  open_clip's bundled BPE tokenizer (no Hugging Face text model, whose tokenizer would be
  downloaded).
* Weights: a local checkpoint file (``weights``, what open_clip takes as ``pretrained=FILE``), or
  an open_clip pretrained tag (downloaded once into the Hugging Face cache), or none (random
  initialisation from ``seed``, for tests). Without a network, a tag that is not cached fails at
  once with the way to provide the file.
"""

from __future__ import annotations

import copy
import difflib
import functools
import hashlib
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from vad.errors import VadError
from vad_winclip.prompts import prompt_ensemble

#: The paper's CLIP: open_clip's ViT-B/16+ at 240 px trained on LAION-400M.
PAPER_MODEL = "ViT-B-16-plus-240"
#: The LAION-400M checkpoint anomalib 2.7 loads (open_clip also has ``laion400m_e32``).
PAPER_TAG = "laion400m_e31"

#: Architectures for tests only: no weights exist, build them with ``pretrained=false``.
TEST_MODELS: dict[str, dict[str, Any]] = {
    # 48 px, 8 px patches (a 6 x 6 grid), one tiny block per tower; the text tower keeps CLIP's
    # vocabulary, so open_clip's bundled tokenizer applies unchanged, and a context of 24 tokens
    # (the longest prompt is 16 tokens with a one-word object name)
    "vad-tiny-clip": {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 48, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16, "mlp_ratio": 2.0},
        "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1, "mlp_ratio": 2.0},
    },
}


def import_open_clip() -> ModuleType:
    """``import open_clip`` (through vad-timm's torchvision shim), or a VadError saying how to install it."""
    from vad_timm.compat import import_torchvision

    import_torchvision()
    try:
        import open_clip
    except ImportError as error:
        raise VadError(
            f"WinCLIP needs open_clip ({error}); install it with `pip install open_clip_torch -c constraints-cpu.txt`"
        ) from error
    return open_clip


def model_config(model: str) -> dict[str, Any]:
    """The open_clip configuration (``embed_dim``, ``vision_cfg``, ``text_cfg``) of ``model``,
    checked for what WinCLIP needs."""
    if model in TEST_MODELS:
        config = copy.deepcopy(TEST_MODELS[model])
    elif model.endswith(".json"):
        path = Path(model).expanduser()
        try:
            loaded = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise VadError(f"WinCLIP model config {model}: cannot read it as JSON ({error})") from error
        config = loaded.get("model_cfg", loaded) if isinstance(loaded, dict) else None  # open_clip_config.json wraps it
        if not isinstance(config, dict) or not {"embed_dim", "vision_cfg", "text_cfg"} <= set(config):
            raise VadError(f"WinCLIP model config {model} is not an open_clip model configuration (embed_dim, vision_cfg, text_cfg)")
    else:
        open_clip = import_open_clip()
        config = open_clip.get_model_config(model)
        if config is None:
            known = open_clip.list_models()
            close = difflib.get_close_matches(model, known, n=3)
            hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
            raise VadError(
                f"WinCLIP model {model!r} is not an open_clip architecture{hint}; give an open_clip model name "
                f"(the paper: {PAPER_MODEL!r}) or a JSON file of an open_clip model configuration"
            )
    vision, text = config.get("vision_cfg", {}), config.get("text_cfg", {})
    if "timm_model_name" in vision or not isinstance(vision.get("layers", 12), int):
        raise VadError(f"WinCLIP model {model!r}: its image tower is not open_clip's ViT, whose patch tokens WinCLIP masks into windows")
    if "hf_model_name" in text or "hf_tokenizer_name" in text or config.get("custom_text"):
        raise VadError(f"WinCLIP model {model!r}: its text tower is a Hugging Face model; WinCLIP needs open_clip's own text transformer and bundled tokenizer")
    config.pop("custom_text", None)
    return config


def grid_size(config: dict[str, Any]) -> tuple[int, int]:
    """The patch grid of the configuration's image tower (the input size over the patch size)."""
    image, patch = config["vision_cfg"].get("image_size", 224), config["vision_cfg"].get("patch_size", 16)
    image = (image, image) if isinstance(image, int) else tuple(image)
    patch = (patch, patch) if isinstance(patch, int) else tuple(patch)
    return image[0] // patch[0], image[1] // patch[1]


def input_size(config: dict[str, Any]) -> tuple[int, int]:
    """The image size the configuration's positional embeddings fix."""
    image = config["vision_cfg"].get("image_size", 224)
    return (image, image) if isinstance(image, int) else (int(image[0]), int(image[1]))


def normalisation(model: str, pretrained_tag: str | None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std the pretrained tag was trained with (OpenAI CLIP's unless it says otherwise)."""
    open_clip = import_open_clip()
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    if pretrained_tag is None or model in TEST_MODELS or model.endswith(".json"):
        return tuple(OPENAI_DATASET_MEAN), tuple(OPENAI_DATASET_STD)
    settings = open_clip.get_pretrained_cfg(model, pretrained_tag)
    return tuple(settings.get("mean", OPENAI_DATASET_MEAN)), tuple(settings.get("std", OPENAI_DATASET_STD))


def checkpoint_file(model: str, pretrained: bool, pretrained_tag: str, weights: str | None) -> str | None:
    """The checkpoint to load: ``weights`` when given, else the pretrained tag's file from the
    Hugging Face cache (downloaded when there is a network), None for random weights. Fails at
    once, with how to provide the file, when the tag is unknown or cannot be downloaded."""
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise VadError(f"WinCLIP weights file {weights} does not exist (give the open_clip checkpoint of {model!r}: --set winclip.weights=FILE)")
        return str(path)
    if not pretrained:
        return None
    if model in TEST_MODELS or model.endswith(".json"):
        raise VadError(
            f"WinCLIP model {model!r} has no pretrained tag to download: give its checkpoint (--set winclip.weights=FILE) "
            "or random weights (--set winclip.pretrained=false)"
        )
    open_clip = import_open_clip()
    settings = open_clip.get_pretrained_cfg(model, pretrained_tag)
    if not settings:
        tags = open_clip.list_pretrained_tags_by_model(model)
        raise VadError(
            f"open_clip has no pretrained tag {pretrained_tag!r} for {model!r}; "
            f"its tags: {', '.join(tags) if tags else 'none (give a checkpoint file: --set winclip.weights=FILE)'}"
        )
    from vad_timm.compat import use_offline_hub_if_unreachable

    offline = use_offline_hub_if_unreachable()
    try:
        return str(open_clip.download_pretrained(settings))
    except Exception as error:  # open_clip and huggingface_hub raise many types for a missing file
        where = settings.get("url") or settings.get("hf_hub", "")
        reason = "no network and not in the Hugging Face cache" if offline else f"{type(error).__name__}: {error}"
        raise VadError(
            f"WinCLIP's CLIP weights (open_clip {model!r}, pretrained={pretrained_tag!r}) cannot be loaded ({reason}). "
            f"Download the checkpoint where there is a network ({where}; or run "
            f"`python -c \"import open_clip; open_clip.create_model('{model}', pretrained='{pretrained_tag}')\"` there and copy "
            "the Hugging Face cache), then pass the file, the path open_clip takes as pretrained=: "
            "--set winclip.weights=FILE (or --weights FILE). --set winclip.pretrained=false runs a random CLIP (tests only)."
        ) from error


def build_clip(config: dict[str, Any], checkpoint: str | None, seed: int) -> torch.nn.Module:
    """The open_clip ``CLIP`` of ``config`` in eval mode, frozen: the checkpoint's weights, or a
    random initialisation from ``seed`` (the global random state is left as it was)."""
    open_clip = import_open_clip()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.CLIP(**copy.deepcopy(config))
    if checkpoint is not None:
        try:
            open_clip.load_checkpoint(model, checkpoint, strict=True)
        except Exception as error:  # torch.load and load_state_dict raise many types
            raise VadError(f"WinCLIP cannot load the CLIP checkpoint {checkpoint} into this architecture: {type(error).__name__}: {error}") from error
    return model.eval().requires_grad_(False)


def fingerprint(visual: torch.nn.Module) -> str:
    """A short hash of the image tower's patch embedding and positional embeddings: a saved
    reference memory is only valid with the weights that computed it."""
    digest = hashlib.sha256()
    for tensor in (visual.conv1.weight, visual.positional_embedding):
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


@functools.lru_cache(maxsize=8)
def prompt_tokens(class_name: str, context_length: int) -> tuple[torch.Tensor, int]:
    """The prompt ensemble tokenised by open_clip's bundled BPE tokenizer (normal prompts first)
    and the number of normal prompts; cached, the tokenizer is pure Python."""
    import_open_clip()
    from open_clip.tokenizer import tokenize

    normal, anomalous = prompt_ensemble(class_name)
    return tokenize(normal + anomalous, context_length=context_length), len(normal)


def text_embeddings(clip: torch.nn.Module, class_name: str) -> torch.Tensor:
    """``[2, D]``: the mean text embedding of the normal and of the anomalous prompts (each
    prompt's projected embedding, averaged without normalising, as anomalib and the public
    reimplementations do)."""
    tokens, normal = prompt_tokens(class_name, clip.context_length)
    with torch.no_grad():
        embeddings = clip.encode_text(tokens.to(next(clip.parameters()).device))
    return torch.stack([embeddings[:normal].mean(dim=0), embeddings[normal:].mean(dim=0)])


__all__ = [
    "PAPER_MODEL",
    "PAPER_TAG",
    "TEST_MODELS",
    "build_clip",
    "checkpoint_file",
    "fingerprint",
    "grid_size",
    "import_open_clip",
    "input_size",
    "model_config",
    "normalisation",
    "prompt_tokens",
    "text_embeddings",
]
