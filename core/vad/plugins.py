"""The plugin manager: finds plugins through the ``vad`` entry-point group and keeps the registry.

Loading is lazy twice over: entry modules are imported the first time a command asks for the
registry, and a registered class given as an import path is imported only when it is used.

Environment switches:

* ``VAD_LOAD_PLUGINS=a,b`` loads only these entry points (set but empty: none);
* ``VAD_DISABLE_PLUGINS=a,b`` skips these.

A plugin that fails to import or to register is recorded in :attr:`Registry.failures` (name,
distribution, error) and skipped. Two plugins registering one name for one kind is an error
naming both, raised when that name is used and by :meth:`Registry.check`.
"""

from __future__ import annotations

import importlib
import importlib.metadata as metadata
import inspect
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pluggy

from vad import hookspecs
from vad.errors import PluginConflictError, UnknownNameError, VadError

ENTRY_POINT_GROUP = "vad"

#: kind (as used by `vad list KIND`) -> registration hook
KINDS: dict[str, str] = {
    "backbones": "vad_register_backbones",
    "detectors": "vad_register_detectors",
    "datasets": "vad_register_datasets",
    "augmentations": "vad_register_augmentations",
    "ensemblers": "vad_register_ensemblers",
    "metrics": "vad_register_metrics",
    "thresholds": "vad_register_thresholds",
}

_SINGULAR = {kind: kind[:-1] for kind in KINDS}


@dataclass
class PluginInfo:
    """One plugin: its entry-point name, distribution and version, and what it registered."""

    name: str
    distribution: str | None = None
    version: str | None = None
    error: str | None = None
    registers: dict[str, list[str]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form for ``vad plugins --json``."""
        return {
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "registers": self.registers,
            "error": self.error,
        }

    def failure(self) -> str:
        """One line saying that this plugin failed to load and why."""
        return f"plugin {self.name!r} (distribution {self.distribution}) failed to load: {self.error}"


@dataclass
class Entry:
    """One registered thing: a class or a lazy ``"module:attribute"`` path."""

    kind: str
    name: str
    target: Any
    summary: str
    plugin: PluginInfo

    def load(self) -> Any:
        """The registered class (importing its module the first time)."""
        if isinstance(self.target, str):
            module_name, _, attribute = self.target.partition(":")
            try:
                module = importlib.import_module(module_name)
                self.target = getattr(module, attribute)
            except (ImportError, AttributeError) as error:
                raise VadError(
                    f"{_SINGULAR[self.kind]} {self.name!r} from plugin {self.plugin.name!r} "
                    f"({self.plugin.distribution}) could not be loaded: {error}"
                ) from error
        return self.target


class Registry:
    """Everything the installed plugins register, by kind and name."""

    def __init__(self, *, load_entry_points: bool = True) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.plugins: dict[str, PluginInfo] = {}
        self.failures: list[PluginInfo] = []
        self._load_entry_points = load_entry_points
        self._entries: dict[str, dict[str, Entry]] | None = None
        self._conflicts: dict[tuple[str, str], list[Entry]] = {}
        self._loaded = False

    # ------------------------------------------------------------------ discovery

    def load(self) -> Registry:
        """Import the entry-point plugins once (idempotent)."""
        if self._loaded:
            return self
        self._loaded = True
        if not self._load_entry_points:
            return self
        allowed = _env_list("VAD_LOAD_PLUGINS")
        disabled = set(_env_list("VAD_DISABLE_PLUGINS") or [])
        for entry_point in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            if (allowed is not None and entry_point.name not in allowed) or entry_point.name in disabled:
                continue
            if entry_point.name in self.plugins:
                continue
            dist = entry_point.dist
            info = PluginInfo(
                entry_point.name,
                dist.metadata["Name"] if dist is not None else None,
                dist.version if dist is not None else None,
            )
            try:
                module = entry_point.load()
                self.pm.register(module, name=entry_point.name)
                self.pm.check_pending()
            except Exception as error:  # a broken plugin must not break the others
                info.error = f"{type(error).__name__}: {error}"
                self.failures.append(info)
                if self.pm.get_plugin(entry_point.name) is not None:
                    self.pm.unregister(name=entry_point.name)
                continue
            self.plugins[entry_point.name] = info
        return self

    def register_plugin(self, plugin: Any, name: str, distribution: str | None = None) -> None:
        """Register a plugin object (module or instance with hookimpls) directly, e.g. in tests."""
        self.load()
        self.pm.register(plugin, name=name)
        self.pm.check_pending()
        self.plugins[name] = PluginInfo(name, distribution or name, None)
        self._entries = None

    def unregister_plugin(self, name: str) -> None:
        """Remove a plugin registered with :meth:`register_plugin`."""
        self.pm.unregister(name=name)
        self.plugins.pop(name, None)
        self._entries = None

    # ------------------------------------------------------------------ the registry

    def _collect(self) -> dict[str, dict[str, Entry]]:
        if self._entries is not None:
            return self._entries
        self.load()
        entries: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}
        self._conflicts = {}
        for info in self.plugins.values():
            info.registers = {}
        for kind, hook_name in KINDS.items():
            for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
                info = self.plugins.get(impl.plugin_name) or PluginInfo(impl.plugin_name)
                try:
                    impl.function(register=self._register_into(kind, info, entries[kind]))
                except Exception as error:  # a plugin whose hook raises is reported and skipped
                    info.error = f"{hook_name} raised {type(error).__name__}: {error}"
                    if info not in self.failures:
                        self.failures.append(info)
        self._entries = entries
        return entries

    def _register_into(self, kind: str, info: PluginInfo, table: dict[str, Entry]) -> Callable[..., None]:
        def register(target: Any, *, name: str | None = None, summary: str | None = None) -> None:
            if name is None:
                name = getattr(target, "name", None)
                if not name or isinstance(target, str):
                    raise VadError(f"plugin {info.name!r} registered a {_SINGULAR[kind]} without a name")
            if summary is None:
                doc = inspect.getdoc(target) if not isinstance(target, str) else ""
                summary = (doc or "").strip().splitlines()[0] if doc else ""
            entry = Entry(kind, name, target, summary, info)
            if name in table:
                self._conflicts.setdefault((kind, name), [table[name]]).append(entry)
            else:
                table[name] = entry
            info.registers.setdefault(kind, []).append(name)

        return register

    def check(self) -> None:
        """Raise if two plugins registered one name."""
        self._collect()
        for (kind, name), entries in self._conflicts.items():
            raise _conflict_error(kind, name, entries)

    def entries(self, kind: str) -> dict[str, Entry]:
        """Registered entries of ``kind`` by name."""
        if kind not in KINDS:
            raise UnknownNameError("kind", kind, KINDS)
        return dict(self._collect()[kind])

    def get(self, kind: str, name: str) -> Entry:
        """The entry ``name`` of ``kind``; unknown names list what exists and suggest the nearest."""
        table = self.entries(kind)
        if (kind, name) in self._conflicts:
            raise _conflict_error(kind, name, self._conflicts[(kind, name)])
        if name not in table:
            raise UnknownNameError(_SINGULAR[kind], name, table, failed_plugins=[info.failure() for info in self.failures])
        return table[name]

    def load_class(self, kind: str, name: str) -> Any:
        """The class registered as ``name``."""
        return self.get(kind, name).load()

    def info(self) -> list[PluginInfo]:
        """Every plugin found, the failed ones included, sorted by name."""
        self._collect()
        everything = {info.name: info for info in self.plugins.values()}
        for info in self.failures:
            everything[info.name] = info
        return sorted(everything.values(), key=lambda info: info.name)


def _conflict_error(kind: str, name: str, entries: list[Entry]) -> PluginConflictError:
    owners = " and ".join(f"{e.plugin.name!r} ({e.plugin.distribution})" for e in entries)
    return PluginConflictError(
        f"{_SINGULAR[kind]} {name!r} is registered by {owners}; uninstall one of them or "
        f"disable one with VAD_DISABLE_PLUGINS"
    )


def _env_list(variable: str) -> list[str] | None:
    value = os.environ.get(variable)
    if value is None:
        return None
    return [part.strip() for part in value.split(",") if part.strip()]


_registry: Registry | None = None


def backbone_entry(spec: str, registry: Registry) -> tuple[str, str]:
    """The registered backbone entry a ``--backbone`` spec uses and the model name it passes:
    a registered name (``(spec, spec)``) or ``family:model`` (``("family", "model")``)."""
    if spec in registry.entries("backbones") or ":" not in spec:
        return spec, spec
    family, _, model_name = spec.partition(":")
    return family, model_name


def create_backbone(spec: str, registry: Registry | None = None, **options: Any) -> Any:
    """The backbone a ``--backbone`` spec names, built with ``options`` (its ``spec`` set):
    ``cls(SPEC)`` for a registered name, ``cls(model)`` for ``family:model``."""
    registry = registry or get_registry()
    name, model_name = backbone_entry(spec, registry)
    backbone = registry.load_class("backbones", name)(model_name, **options)
    backbone.spec = spec
    return backbone


def get_registry() -> Registry:
    """The process-wide registry (created and loaded on first use)."""
    global _registry
    if _registry is None:
        _registry = Registry()
    return _registry.load()


def reset_registry() -> None:
    """Forget the process-wide registry, so that the next use re-reads the environment."""
    global _registry
    _registry = None


def plugin_registering(kind: str, *targets: Any) -> Any:
    """A plugin object whose registration hook of ``kind`` registers ``targets`` (classes or
    import paths): how tests and scripts register a component without writing a plugin module."""
    if kind not in KINDS:
        raise UnknownNameError("kind", kind, KINDS)

    def register_all(register: Callable[..., None]) -> None:
        for target in targets:
            register(target)

    register_all.__name__ = KINDS[kind]
    return type("RegisteringPlugin", (), {KINDS[kind]: staticmethod(hookspecs.hookimpl(register_all))})()


@contextmanager
def registered(plugin: Any, name: str = "test-plugin") -> Iterator[Registry]:
    """Register ``plugin`` in the process-wide registry for the duration of the block.

    A plugin that is already registered (e.g. installed and found through its entry point)
    stays as it is: the block uses it, and it is not removed afterwards.
    """
    registry = get_registry()
    if registry.pm.is_registered(plugin):
        yield registry
        return
    registry.register_plugin(plugin, name)
    try:
        yield registry
    finally:
        registry.unregister_plugin(name)
