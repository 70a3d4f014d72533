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

from vad.errors import DamagedModelError, VadError

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


def _process_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


#: The permissions ``open()`` would give (temporary files are created private, 0600 / 0700; what
#: vad writes should be readable like any file the user creates, e.g. by a colleague).
FILE_MODE, FOLDER_MODE = 0o666 & ~_process_umask(), 0o777 & ~_process_umask()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(temporary, FILE_MODE)
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
        os.chmod(staging, FOLDER_MODE)
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
    """Read ``model.json`` (see :func:`read_model_document`) and its tensors; a missing or
    unreadable tensors file is a :class:`DamagedModelError` naming it."""
    from safetensors import SafetensorError

    folder = Path(folder)
    document = read_model_document(folder)
    tensors_path = folder / TENSORS_FILE
    if not tensors_path.is_file():
        raise DamagedModelError(folder, TENSORS_FILE, "is missing")
    try:
        tensors = load_tensors(tensors_path)
    except (SafetensorError, OSError) as error:
        raise DamagedModelError(folder, TENSORS_FILE, f"cannot be read, it is cut short or not a safetensors file ({error})") from error
    return document, tensors


def read_model_document(folder: str | os.PathLike) -> dict[str, Any]:
    """``model.json`` of a model folder, checked before a model is rebuilt from it: its format
    and version, and that every entry loading reads has the form vad writes
    (:data:`MODEL_DOCUMENT_SHAPE`), so that a damaged file is a clear error, not a traceback."""
    folder = Path(folder)
    json_path = folder / MODEL_JSON
    if not json_path.is_file():
        raise VadError(f"{folder} is not a vad model folder: {MODEL_JSON} is missing")
    try:
        document = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:  # ValueError: not UTF-8, or not JSON
        raise DamagedModelError(folder, MODEL_JSON, f"is not valid JSON ({error})") from error
    if not isinstance(document, dict):
        raise DamagedModelError(folder, MODEL_JSON, f"holds {_json_name(document)}, not the object vad writes")
    if document.get("format") != MODEL_FORMAT:
        raise DamagedModelError(folder, MODEL_JSON, f"is not a vad model (its format is {document.get('format')!r}, not {MODEL_FORMAT!r})")
    version = document.get("format_version")
    if version not in READABLE_FORMAT_VERSIONS:
        raise VadError(
            f"{folder} was saved in model format version {version}; this vad reads versions "
            f"{', '.join(map(str, READABLE_FORMAT_VERSIONS))}. Re-fit the model with this version of vad, or install the vad that saved it."
        )
    problem = _shape_problem(document, MODEL_DOCUMENT_SHAPE)
    if problem:
        raise DamagedModelError(folder, MODEL_JSON, problem)
    return document


# --------------------------------------------------------------------------- model.json's shape


def _source_shape(source: Any) -> Any:
    """A saved feature source (its ``config()``, see :mod:`vad.build`): the entries depend on its kind."""
    from vad.contracts import DetectorFeatures
    from vad.features import PatchFeatures

    kind = source.get("kind") if isinstance(source, dict) else None
    if kind == PatchFeatures.name:
        return {"kind": str, "hparams": {"backbone": {"spec": str, "hparams": dict}}, "meta?": dict}
    if kind == DetectorFeatures.kind:
        return {"kind": str, "detector": str, "hparams": {"detector": dict}, "meta?": dict}
    return {"kind": str, "hparams": {"members": [_source_shape]}, "meta?": dict}  # a feature ensemble


_SIZE = (None, [int])
_NUMBER_OR_NULL = (float, None)

#: The entries of ``model.json`` that loading reads, in the form :func:`vad.build.model_document`
#: writes them. A shape is a JSON type (``dict``, ``list``, ``str``, ``int``, ``float`` which
#: takes integers too, ``bool``, ``None``), a tuple of alternatives, a dict (an object with
#: these entries; a key ending in ``?`` may be left out; other entries are allowed), a
#: one-item list (a non-empty list of such items) or a function of the value giving its shape.
MODEL_DOCUMENT_SHAPE: dict[str, Any] = {
    "format": str,
    "format_version": int,
    "members": [
        {
            "detector": {"name": str, "hparams": dict, "meta?": dict},
            "source?": _source_shape,
        }
    ],
    "ensembler?": (None, {"name": str, "options": dict, "meta?": dict}),
    "threshold?": {"name?": (str, None), "options?": dict, "image?": _NUMBER_OR_NULL, "pixel?": _NUMBER_OR_NULL},
    "postprocess?": {"sigma?": float},
    "geometry?": (
        None,
        {
            "image_size?": _SIZE, "resize?": _SIZE, "center_crop?": _SIZE, "fit_size?": _SIZE,
            "keep_aspect?": bool, "tile?": (int, None), "tile_stride?": (int, None),
        },
    ),
    "calibration?": {
        "method?": str,
        "scores?": int,
        "folds?": int,
        "image_false_alarm?": {
            "scores?": int, "expected?": _NUMBER_OR_NULL, "low?": _NUMBER_OR_NULL, "high?": _NUMBER_OR_NULL, "confidence": float,
        },
    },
    "seed?": int,
    "batch_size?": int,
}

_JSON_NAMES = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number", bool: "true or false", type(None): "null"}


def _json_name(value: Any) -> str:
    """How a JSON value's type is called in messages ("an object", "a list", ...)."""
    return _JSON_NAMES.get(type(value), type(value).__name__)


def _shape_name(shape: Any) -> str:
    """How the JSON type a shape stands for is called in messages."""
    if shape is None or isinstance(shape, type):
        return _JSON_NAMES[shape if shape is not None else type(None)]
    return "an object" if isinstance(shape, dict) else "a list"


def _has_type(value: Any, shape: Any) -> bool:
    """True when ``value`` is of the JSON type ``shape`` stands for (true/false is no number)."""
    if shape is None:
        return value is None
    if isinstance(shape, (dict, list)):
        return isinstance(value, type(shape))
    if isinstance(value, bool):
        return shape is bool
    return isinstance(value, (int, float) if shape is float else shape)


def _shape_problem(value: Any, shape: Any, where: str = "") -> str | None:
    """Why the entry ``where`` (``value``) does not have ``shape`` (as :data:`MODEL_DOCUMENT_SHAPE`
    spells it); None when it has. The document itself is an object, checked before."""
    if callable(shape) and not isinstance(shape, type):
        shape = shape(value)
    alternatives = shape if isinstance(shape, tuple) else (shape,)
    matching = [option for option in alternatives if _has_type(value, option)]
    if not matching:
        return f"has {_json_name(value)} as {where!r}, where vad writes {' or '.join(map(_shape_name, alternatives))}"
    shape = matching[0]
    if isinstance(shape, dict):
        for key, entry_shape in shape.items():
            name = key.removesuffix("?")
            path = f"{where}.{name}" if where else name
            if name not in value:
                if key.endswith("?"):
                    continue
                return f"has no entry {path!r}"
            problem = _shape_problem(value[name], entry_shape, path)
            if problem:
                return problem
    if isinstance(shape, list):
        if not value:
            return f"has an empty list as {where!r}"
        for index, item in enumerate(value):
            problem = _shape_problem(item, shape[0], f"{where}[{index}]")
            if problem:
                return problem
    return None


def prefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{prefix/name: tensor}``: how components share one safetensors file."""
    return {f"{prefix}/{name}": tensor for name, tensor in tensors.items()}


def unprefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors stored under ``prefix/`` with the prefix removed."""
    start = f"{prefix}/"
    return {name[len(start):]: tensor for name, tensor in tensors.items() if name.startswith(start)}
