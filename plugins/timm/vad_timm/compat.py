"""Import timm safely: the torchvision shim and the offline switch for the Hugging Face hub.

Why this module exists
----------------------
1. **torchvision built for another torch.** The package registry here serves torchvision
   0.28.0 as a CUDA build; next to the CPU torch its compiled ``_C`` extension does not load,
   so the operators ``torchvision::nms`` and ``torchvision::qnms`` are never defined. Yet
   ``torchvision/_meta_registrations.py`` registers fake (meta) kernels for exactly those two
   at import time, and ``torch.library.register_fake`` refuses an operator that does not
   exist: ``import torchvision`` dies with ``RuntimeError: operator torchvision::nms does not
   exist``. timm imports torchvision, so timm dies too.

   The fix is to define the two operator *schemas* (signatures only, no kernels) in a
   ``torch.library.Library("torchvision", "DEF")`` and import again. Nothing in vad calls
   NMS; should anything call it, torch raises "no kernel registered", which is honest. The
   library object must stay referenced (``_TORCHVISION_LIBRARY``): dropping it would remove
   the definitions. Where torchvision imports cleanly (a build that matches torch), none of
   this runs and nothing changes.

2. **No network.** Asked for hub weights without a network, huggingface_hub retries for
   ~50 s before giving up. :func:`use_offline_hub_if_unreachable` probes the hub's host once
   (a TCP connect, bounded to half a second) and, when unreachable, switches
   huggingface_hub to offline mode (``HF_HUB_OFFLINE=1``), where a cache miss fails at once.

Every import of timm in this plugin goes through :func:`import_timm`.
"""

from __future__ import annotations

import importlib
import os
import socket
import sys
import threading
from types import ModuleType
from urllib.parse import urlparse

from vad.errors import VadError

#: The two operators whose fake kernels torchvision registers unconditionally at import.
_MISSING_OPERATOR_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)

#: Keeps the schema definitions alive (None while the shim was not needed).
_TORCHVISION_LIBRARY = None


def _is_missing_operator_error(error: BaseException) -> bool:
    message = str(error)
    return "torchvision::" in message and "does not exist" in message


def _forget_partial_import(package: str) -> None:
    """Drop a half-imported package from ``sys.modules`` so that the next import starts over."""
    for module in [m for m in sys.modules if m == package or m.startswith(package + ".")]:
        del sys.modules[module]


def torchvision_shim_installed() -> bool:
    """True when this process needed (and installed) the torchvision operator schemas."""
    return _TORCHVISION_LIBRARY is not None


def import_torchvision() -> ModuleType | None:
    """Import torchvision, defining its missing operator schemas first if (and only if) needed.

    Returns None when torchvision is not installed (timm then reports that itself).
    """
    global _TORCHVISION_LIBRARY
    try:
        return importlib.import_module("torchvision")
    except ModuleNotFoundError:
        return None
    except RuntimeError as error:
        if not _is_missing_operator_error(error) or _TORCHVISION_LIBRARY is not None:
            raise
    import torch

    _forget_partial_import("torchvision")
    library = torch.library.Library("torchvision", "DEF")
    for schema in _MISSING_OPERATOR_SCHEMAS:
        library.define(schema)
    _TORCHVISION_LIBRARY = library
    return importlib.import_module("torchvision")


def import_timm() -> ModuleType:
    """``import timm``, through the torchvision shim; a VadError if timm is not installed."""
    if "timm" not in sys.modules:
        import_torchvision()
    try:
        return importlib.import_module("timm")
    except ImportError as error:
        raise VadError(
            f"timm cannot be imported ({error}); install it with "
            "`pip install timm -c constraints-cpu.txt` (torch and torchvision in one resolution)"
        ) from error


# ------------------------------------------------------------------ Hugging Face hub


def hub_endpoint() -> str:
    """The hub URL huggingface_hub would use (``HF_ENDPOINT`` or huggingface.co)."""
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def hub_reachable(timeout: float = 0.5) -> bool:
    """Whether a TCP connection to the hub's host opens within ``timeout`` seconds.

    Name resolution cannot be given a timeout, so the probe runs in a daemon thread that is
    simply abandoned when it takes too long.
    """
    url = urlparse(hub_endpoint())
    host = url.hostname or "huggingface.co"
    port = url.port or (80 if url.scheme == "http" else 443)
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def hub_offline() -> bool:
    """Whether huggingface_hub is (or will be, when imported) in offline mode."""
    hub_constants = sys.modules.get("huggingface_hub.constants")
    if hub_constants is not None:
        return bool(getattr(hub_constants, "HF_HUB_OFFLINE", False))
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def set_hub_offline() -> None:
    """Put huggingface_hub in offline mode, whether or not it has been imported yet.

    ``HF_HUB_OFFLINE`` is read once, when ``huggingface_hub.constants`` is imported, and
    every later check reads the module attribute; so set both.
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    hub_constants = sys.modules.get("huggingface_hub.constants")
    if hub_constants is not None:
        hub_constants.HF_HUB_OFFLINE = True


def use_offline_hub_if_unreachable(timeout: float = 0.5) -> bool:
    """Switch huggingface_hub to offline mode when the hub cannot be reached; True if offline.

    An explicit ``HF_HUB_OFFLINE`` setting is respected and no probe is made.
    """
    if hub_offline():
        return True
    if "HF_HUB_OFFLINE" in os.environ:  # explicitly set to a false value: the user wants online
        return False
    if hub_reachable(timeout):
        return False
    set_hub_offline()
    return True
