"""Run folders that are complete or plainly incomplete, never a mix of two runs.

A run folder holds one run. Its state is the file ``run.json``: written with ``"status":
"running"`` before anything else of the run, and with ``"complete"`` after everything else, so
a folder whose ``run.json`` does not say ``complete`` is unfinished, whatever it holds. A run
holds an exclusive lock on the folder (``.vad-run.lock``, an OS lock that dies with its
process) from before it looks inside until it ends, so two runs never write one folder.

What a new run does with the folder it is given:

* missing or empty: it is used;
* a complete run: refused unless ``overwrite`` (then the old run is removed once the new one
  has marked the folder as running: a kill in between leaves a plainly unfinished folder);
* an unfinished run (interrupted, killed, or failed): refused unless ``overwrite`` or
  ``resume`` (``vad run --resume`` continues it);
* anything else (files that no vad run wrote): always refused; vad deletes only runs.

Default names (``runs/<dataset>-<UTC time>``) get a ``-2``, ``-3``... suffix when taken, so runs
started in the same second never share a folder. Leftovers of writes that a kill cut short
(hidden ``.*.tmp`` and ``.*.old`` entries) are removed, and said, when a run takes the folder.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

import vad
from vad import artifacts
from vad.errors import VadError
from vad.progress import info

RUN_STATE = "run.json"
LOCK_FILE = ".vad-run.lock"
RUNNING, INTERRUPTED, FAILED, COMPLETE = "running", "interrupted", "failed", "complete"
#: The run's resolved configuration (``vad run --resume`` and INT8 calibration read it back).
RUN_CONFIG = "config.yaml"
#: What a run folder written by a vad before ``run.json`` existed holds.
LEGACY_MARKER = RUN_CONFIG


class RunFolderError(VadError):
    """A run folder that cannot be used as asked."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_state(folder: Path) -> dict[str, Any] | None:
    """The folder's ``run.json`` (None when it has none; an unreadable one counts as unfinished)."""
    path = folder / RUN_STATE
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"status": "unreadable"}
    return state if isinstance(state, dict) else {"status": "unreadable"}


def is_complete(folder: str | os.PathLike) -> bool:
    """True when ``folder`` holds a run that finished."""
    state = read_state(Path(folder))
    return state is not None and state.get("status") == COMPLETE


def _lock(handle: IO[str]) -> bool:
    """Take an exclusive, non-blocking OS lock on an open file; False when another process has it."""
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def _contents(folder: Path) -> list[Path]:
    return [entry for entry in folder.iterdir() if entry.name != LOCK_FILE]


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry)
    else:
        entry.unlink(missing_ok=True)


def remove_leftovers(folder: Path) -> list[Path]:
    """Remove the hidden ``.*.tmp`` / ``.*.old`` files and folders that an atomic write leaves
    when it is killed (never the run's own files); returns what was removed."""
    found = [p for p in folder.rglob(".*") if p.name != LOCK_FILE and (p.name.endswith(".tmp") or p.name.endswith(".old"))]
    removed = []
    for entry in sorted(found, key=lambda p: len(p.parts)):
        if entry.exists() or entry.is_symlink():
            _remove(entry)
            removed.append(entry)
    return removed


class RunFolder:
    """A run folder this process holds the lock of; :meth:`finish` marks it complete."""

    def __init__(self, path: Path, handle: IO[str], state: dict[str, Any]) -> None:
        self.path, self._handle, self.state = path, handle, state

    def _write_state(self, status: str, **extra: Any) -> None:
        self.state = {**self.state, "status": status, **extra}
        artifacts.atomic_write_json(self.path / RUN_STATE, self.state)

    def finish(self) -> None:
        """Mark the run complete: the last write of a run."""
        self._write_state(COMPLETE, finished=_now())

    def release(self) -> None:
        """Give the lock up (the lock file stays: removing it would let two runs lock two files)."""
        if not self._handle.closed:
            self._handle.close()


def _describe(state: dict[str, Any] | None) -> str:
    if state is None:
        return "written by an older vad, with no record of whether it finished"
    started = f" started {state['started']}" if state.get("started") else ""
    status = state.get("status")
    if status == INTERRUPTED:
        return f"an interrupted run ({started.strip()})"
    if status == FAILED:
        return f"a run that failed ({started.strip()}): {state.get('error', 'see its log')}"
    return f"an unfinished run{started}, stopped before it completed (killed, or its machine stopped)"


@contextmanager
def claim(path: Path | None, default: Path, *, overwrite: bool = False, resume: bool = False) -> Iterator[RunFolder]:
    """Lock and prepare the run folder ``path`` (or a fresh one named after ``default``) for a
    run; on leaving, the state says ``interrupted`` (Ctrl-C) or ``failed`` unless
    :meth:`RunFolder.finish` was called, and the lock is released."""
    folder = _fresh(default) if path is None else Path(path)
    if folder.exists() and not folder.is_dir():
        raise RunFolderError(f"--output {folder} is a file, not a folder; choose another --output")
    if folder.is_dir():
        _refuse_foreign(folder)  # before the lock file: a folder that is not a run is left untouched
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / LOCK_FILE, "a+", encoding="utf-8")
    if not _lock(handle):
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise RunFolderError(f"{folder} is being written by another vad run ({holder}); wait for it, or choose another --output")
    try:
        state = _prepare(folder, overwrite=overwrite, resume=resume)
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}, since {_now()}\n")
        handle.flush()
    except BaseException:
        handle.close()
        raise
    run_folder = RunFolder(folder, handle, state)
    try:
        yield run_folder
    except KeyboardInterrupt:
        run_folder._write_state(INTERRUPTED, stopped=_now())
        raise
    except BaseException as error:
        run_folder._write_state(FAILED, stopped=_now(), error=str(error).splitlines()[0] if str(error) else type(error).__name__)
        raise
    finally:
        run_folder.release()


def _fresh(default: Path) -> Path:
    """``default``, or ``default-2``, ``-3``... : the first name no other run has taken (mkdir is
    atomic, so two runs started in the same second get different folders)."""
    default.parent.mkdir(parents=True, exist_ok=True)
    for number in range(1, 10_000):
        candidate = default if number == 1 else default.with_name(f"{default.name}-{number}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate
    raise RunFolderError(f"no free run folder name next to {default}; pass --output")


def _refuse_foreign(folder: Path) -> None:
    """Refuse a non-empty folder that holds no vad run: vad deletes and overwrites only runs."""
    contents = _contents(folder)
    if contents and read_state(folder) is None and not (folder / LEGACY_MARKER).is_file():
        names = ", ".join(sorted(p.name for p in contents)[:5])
        raise RunFolderError(
            f"{folder} exists and is not a vad run folder (it holds {names}{', …' if len(contents) > 5 else ''}); "
            "vad writes runs only into new, empty or run folders: choose another --output"
        )


def _prepare(folder: Path, *, overwrite: bool, resume: bool) -> dict[str, Any]:
    """Check what ``folder`` holds against what was asked, clean it up, and write its
    ``running`` state; returns that state."""
    _refuse_foreign(folder)
    state = read_state(folder)
    contents = _contents(folder)
    is_run = bool(contents)
    complete = state is not None and state.get("status") == COMPLETE
    if resume:
        if not is_run:
            raise RunFolderError(f"--resume {folder}: there is no run in that folder to continue")
        if complete:
            raise RunFolderError(f"--resume {folder}: that run completed; nothing to continue (run again with --overwrite to redo it)")
    elif contents and not overwrite:
        if complete:
            raise RunFolderError(
                f"{folder} holds a complete run (finished {state.get('finished', '?')}); pass --overwrite to replace it, "
                "or choose another --output"
            )
        raise RunFolderError(
            f"{folder} holds {_describe(state)}; continue it with `vad run --resume {folder}`, or pass --overwrite "
            "to start it over"
        )
    previous = dict(state or {})
    new_state = {
        "status": RUNNING,
        "run_id": previous.get("run_id") if resume and previous.get("run_id") else uuid.uuid4().hex,
        "started": previous.get("started", _now()) if resume else _now(),
        "vad_version": vad.__version__,
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }
    if resume:
        new_state["resumed"] = _now()
    artifacts.atomic_write_json(folder / RUN_STATE, new_state)  # from here on the folder is plainly unfinished
    if contents and not resume:
        for entry in _contents(folder):
            if entry.name != RUN_STATE:
                _remove(entry)
        info(f"--overwrite: removed the previous run from {folder}")
    removed = remove_leftovers(folder)
    if removed:
        info(f"removed {len(removed)} leftover(s) of writes an earlier run did not finish: " + ", ".join(str(p.relative_to(folder)) for p in removed))
    return new_state
