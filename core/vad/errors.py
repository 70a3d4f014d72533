"""Errors a user can act on. The CLI prints them as one clear message, without a traceback."""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable

#: Exit code of a command stopped by a :class:`VadError` (printed as one ``error:`` line).
USER_ERROR = 2
#: Exit code of a command that finished but some of its inputs or cells failed (listed in its output).
SOME_FAILED = 3


class VadError(Exception):
    """Bad input, a missing plugin, a wrong layout: something the user can fix."""


class UnknownNameError(VadError, KeyError):
    """A name that no installed plugin registered."""

    def __init__(self, kind: str, name: str, available: Iterable[str], failed_plugins: Iterable[str] = ()) -> None:
        """``failed_plugins``: one line per installed plugin that failed to load (it may be the
        one that registers ``name``), added to the message."""
        available = sorted(available)
        failed_plugins = list(failed_plugins)
        self.kind, self.name, self.available, self.failed_plugins = kind, name, available, failed_plugins
        if not available:
            message = (
                f"no {kind} is installed, so {name!r} cannot be used; install a plugin that "
                f"provides {kind} (see `vad plugins`)"
            )
        else:
            close = difflib.get_close_matches(name, available, n=1, cutoff=0.5)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            message = f"unknown {kind} {name!r}.{hint} Available: {', '.join(available)}"
        if failed_plugins:
            message += f". It may come from a plugin that failed to load: {'; '.join(failed_plugins)}; see `vad plugins`"
        super().__init__(message)

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


class PluginConflictError(VadError):
    """Two plugins registered the same name for the same kind."""


class DamagedModelError(VadError):
    """A saved model folder with a file missing, cut short or not in the form vad wrote."""

    def __init__(self, folder: str | os.PathLike, file: str, problem: str) -> None:
        self.folder, self.file = folder, file
        super().__init__(
            f"the model folder {folder} is damaged: {file} {problem}. Re-fit the model (vad run), "
            "or restore the folder from a backup"
        )
