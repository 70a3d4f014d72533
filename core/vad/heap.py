"""Keep freed memory in the process's heap instead of handing it back to the system (glibc).

glibc serves each allocation above its mmap threshold (128 KiB at start, adapting up to 32 MiB)
with a fresh ``mmap`` and unmaps it on ``free``; the top of the heap is trimmed back likewise.
A network's activation tensors are of that size, so every forward pass maps new pages and takes
a page fault on the first touch of each: that about doubles a CPU backbone's time (see
``VAD_KEEP_HEAP`` in the README; ``benchmarks/patchcore.py`` runs its workers this way for the
same reason).

The price: memory that was freed stays in the process, so its resident size stays near its
peak until it exits. That suits a command-line run, whose peak is what counts; a long-lived
service that embeds vad may prefer not to call :func:`keep_freed_memory`. The ``vad`` command
calls it at start-up unless ``VAD_KEEP_HEAP=0``.
"""

from __future__ import annotations

import ctypes
import os

# mallopt(3) parameters (glibc malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
#: largest value mallopt's ``int`` argument takes: no heap top below 2 GiB is trimmed
NEVER_TRIM = 2**31 - 1


def glibc_version() -> str | None:
    """The running glibc's version (``"2.36"``), or None when the C library is another."""
    try:
        name, _, version = (os.confstr("CS_GNU_LIBC_VERSION") or "").partition(" ")
    except (AttributeError, ValueError, OSError):  # no confstr (Windows) or no such name (macOS, musl)
        return None
    return version if name == "glibc" else None


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse: no per-allocation ``mmap``, no heap trimming.

    Returns whether the setting took effect: False off glibc (macOS, Windows, musl), when
    ``VAD_KEEP_HEAP=0``, or when glibc refused a parameter. Very large requests still get memory
    when the heap cannot grow (glibc then falls back to ``mmap`` on its own). Call it before the
    heavy work starts; it changes nothing already allocated.
    """
    if os.environ.get("VAD_KEEP_HEAP", "1").strip() == "0":
        return False
    if not glibc_version():
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")  # glibc's soname on every Linux architecture
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # M_MMAP_MAX = 0 rather than a huge M_MMAP_THRESHOLD: mallopt(3) documents a 32 MiB upper
    # limit for the threshold on 64-bit systems, and at 32 MiB the largest activations are
    # still mapped per call; M_MMAP_MAX has no limit
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, NEVER_TRIM))
