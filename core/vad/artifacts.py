"""Atomic writes and the model folder format: ``model.json`` + ``tensors.safetensors``, no pickle.

Every file is written to a temporary name in the same folder and renamed into place, so a
crash never leaves a half-written file. A model folder is first written whole next to its
destination and then swapped in, so an existing model survives a failed save.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vad.errors import VadError

if TYPE_CHECKING:
    import torch

MODEL_FORMAT = "vad-model"
#: Bumped when model.json changes so that an older vad would misread it (version 2: the
#: ``geometry`` and ``calibration`` entries); loading an unknown version is a clear error.
MODEL_FORMAT_VERSION = 2
#: Versions this vad reads (version 1 folders have neither entry: the defaults apply).
READABLE_FORMAT_VERSIONS = (1, 2)
MODEL_JSON = "model.json"
TENSORS_FILE = "tensors.safetensors"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 ``text`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as indented JSON atomically (NaN is refused: it is not JSON)."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, allow_nan=False) + "\n")


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write tensors as safetensors atomically (tensors are moved to CPU and made contiguous)."""
    from safetensors.torch import save

    data = {name: tensor.detach().to("cpu").contiguous() for name, tensor in tensors.items()}
    atomic_write_bytes(path, save(data, metadata=metadata))


def load_tensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read a safetensors file."""
    from safetensors.torch import load_file

    return load_file(str(path), device=str(device))


def write_model_folder(folder: str | os.PathLike, model_json: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    """Write a complete model folder, replacing ``folder`` only once the new one is whole."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    document = {"format": MODEL_FORMAT, "format_version": MODEL_FORMAT_VERSION, **model_json}
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        save_tensors(staging / TENSORS_FILE, tensors)
        atomic_write_json(staging / MODEL_JSON, document)
        if folder.exists():
            backup = folder.with_name(f".{folder.name}.old")
            shutil.rmtree(backup, ignore_errors=True)
            os.replace(folder, backup)
            os.replace(staging, folder)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def read_model_folder(folder: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read ``model.json`` and its tensors, checking the format and its version."""
    folder = Path(folder)
    json_path = folder / MODEL_JSON
    if not json_path.is_file():
        raise VadError(f"{folder} is not a vad model folder: {MODEL_JSON} is missing")
    try:
        document = json.loads(json_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise VadError(f"{json_path} is not valid JSON: {error}") from error
    if document.get("format") != MODEL_FORMAT:
        raise VadError(f"{json_path} is not a vad model (format {document.get('format')!r})")
    version = document.get("format_version")
    if version not in READABLE_FORMAT_VERSIONS:
        raise VadError(
            f"{folder} was saved in model format version {version}; this vad reads versions "
            f"{', '.join(map(str, READABLE_FORMAT_VERSIONS))}. Re-fit the model with this version of vad, or install the vad that saved it."
        )
    tensors_path = folder / TENSORS_FILE
    tensors = load_tensors(tensors_path) if tensors_path.is_file() else {}
    return document, tensors


def prefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{prefix/name: tensor}``: how components share one safetensors file."""
    return {f"{prefix}/{name}": tensor for name, tensor in tensors.items()}


def unprefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors stored under ``prefix/`` with the prefix removed."""
    start = f"{prefix}/"
    return {name[len(start):]: tensor for name, tensor in tensors.items() if name.startswith(start)}
