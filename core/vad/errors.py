"""Errors a user can act on. The CLI prints them as one clear message, without a traceback."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class VadError(Exception):
    """Bad input, a missing plugin, a wrong layout: something the user can fix."""


class UnknownNameError(VadError, KeyError):
    """A name that no installed plugin registered."""

    def __init__(self, kind: str, name: str, available: Iterable[str]) -> None:
        available = sorted(available)
        self.kind, self.name, self.available = kind, name, available
        if not available:
            message = (
                f"no {kind} is installed, so {name!r} cannot be used; install a plugin that "
                f"provides {kind} (see `vad plugins`)"
            )
        else:
            close = difflib.get_close_matches(name, available, n=1, cutoff=0.5)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            message = f"unknown {kind} {name!r}.{hint} Available: {', '.join(available)}"
        super().__init__(message)

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


class PluginConflictError(VadError):
    """Two plugins registered the same name for the same kind."""
