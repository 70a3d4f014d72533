"""Progress bars for people, silence for scripts, JSON lines for log collectors.

``VAD_LOG=quiet`` (or ``--quiet``) hides bars and info lines; ``VAD_LOG=json`` prints each
info line and each finished loop as one JSON object on stderr; the default shows rich bars.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

_MODES = ("rich", "quiet", "json")


def log_mode() -> str:
    """The current mode: ``rich`` (default), ``quiet`` or ``json``."""
    mode = os.environ.get("VAD_LOG", "rich").lower()
    return mode if mode in _MODES else "rich"


def set_log_mode(mode: str) -> None:
    """Set the mode for this process and its children."""
    if mode not in _MODES:
        raise ValueError(f"log mode must be one of {_MODES}, got {mode!r}")
    os.environ["VAD_LOG"] = mode


def info(message: str, **fields: Any) -> None:
    """One line of information (to stderr, so stdout stays machine-readable)."""
    mode = log_mode()
    if mode == "quiet":
        return
    if mode == "json":
        print(json.dumps({"event": "info", "message": message, **fields}, default=str), file=sys.stderr, flush=True)
        return
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True, highlight=False).print(escape(message))  # "[brick] ..." is text, not markup


#: Lists that collect warnings instead of printing them (innermost last; see :func:`collected_warnings`).
_COLLECTORS: list[list[str]] = []


@contextlib.contextmanager
def collected_warnings() -> Iterator[list[str]]:
    """Inside the block, :func:`warn` appends to the yielded list instead of printing: for work
    whose warnings belong in a table next to its result (a comparison), not in the log."""
    collected: list[str] = []
    _COLLECTORS.append(collected)
    try:
        yield collected
    finally:
        _COLLECTORS.remove(collected)


def warn(message: str) -> None:
    """A warning users must see, even in quiet mode (or collected, see :func:`collected_warnings`)."""
    if _COLLECTORS:
        _COLLECTORS[-1].append(message)
        return
    if log_mode() == "json":
        print(json.dumps({"event": "warning", "message": message}), file=sys.stderr, flush=True)
        return
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True, highlight=False).print(f"[bold yellow]warning:[/] {escape(message)}")


def track(iterable: Iterable[T], description: str, total: int | None = None, status: Callable[[], str] | None = None) -> Iterator[T]:
    """Iterate with a progress bar (rich), nothing (quiet) or JSON records (json).

    ``status`` returns a short text shown after each item (e.g. the epoch's loss); in JSON mode
    it is written with each item as a ``step`` record.
    """
    mode = log_mode()
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    if mode == "quiet":
        yield from iterable
        return
    if mode == "json":
        start, count = time.perf_counter(), 0
        for item in iterable:
            count += 1
            yield item
            if status is not None:
                print(json.dumps({"event": "step", "task": description, "item": count, "status": status()}), file=sys.stderr, flush=True)
        print(
            json.dumps({"event": "done", "task": description, "items": count, "seconds": round(time.perf_counter() - start, 3)}),
            file=sys.stderr,
            flush=True,
        )
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from rich.console import Console

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[status]}"))
    with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
        task = bar.add_task(description, total=total, status="")
        for item in iterable:
            yield item
            bar.update(task, advance=1, status=status() if status is not None else "")
