"""vad.heap: glibc keeps freed memory (no per-allocation mmap), opt-out and other C libraries."""

from __future__ import annotations

import ctypes

import pytest

from tests.conftest import run_vad
from vad import heap

needs_glibc = pytest.mark.skipif(heap.glibc_version() is None, reason="needs glibc")


@needs_glibc
def test_large_allocations_come_from_the_heap_once_kept():
    libc = ctypes.CDLL("libc.so.6")
    if not hasattr(libc, "mallinfo2"):
        pytest.skip("mallinfo2 needs glibc >= 2.33")

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc.mallinfo2.restype = MallInfo2
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    assert heap.keep_freed_memory() is True
    mapped_before = libc.mallinfo2().hblkhd
    block = libc.malloc(64 * 2**20)  # far above glibc's default mmap threshold
    try:
        assert block
        # served by the heap, not by a mapping of its own that free() would unmap
        assert libc.mallinfo2().hblkhd - mapped_before < 64 * 2**20
    finally:
        libc.free(block)


def test_opt_out_leaves_malloc_alone(monkeypatch):
    monkeypatch.setenv("VAD_KEEP_HEAP", "0")
    monkeypatch.setattr(ctypes, "CDLL", lambda *a, **k: pytest.fail("libc must not be touched"))
    assert heap.keep_freed_memory() is False


def test_other_c_libraries_are_left_alone(monkeypatch):
    monkeypatch.delenv("VAD_KEEP_HEAP", raising=False)
    monkeypatch.setattr(heap.os, "confstr", lambda name: "musl 1.2.4", raising=False)
    monkeypatch.setattr(ctypes, "CDLL", lambda *a, **k: pytest.fail("libc must not be touched"))
    assert heap.glibc_version() is None
    assert heap.keep_freed_memory() is False


@needs_glibc
def test_doctor_says_whether_freed_memory_is_kept():
    assert "freed memory kept in the heap (faster CPU forwards): yes" in run_vad("doctor").stdout
    opted_out = run_vad("doctor", env={"VAD_KEEP_HEAP": "0"})
    assert opted_out.returncode == 0, opted_out.stderr
    assert "freed memory kept in the heap (faster CPU forwards): no" in opted_out.stdout
