"""Declared options: every component states its hyper-parameters once.

A component class nests a frozen declaration, the way ``llm`` nests a model's ``Options``::

    from vad.options import Options, option

    class PatchCore(Detector):
        name = "patchcore"

        class Options(Detector.Options):
            coreset_ratio: float = option(0.1, "Fraction of training patches kept (1 keeps all).", gt=0, le=1)
            knn_backend: Literal["auto", "torch", "pruned"] = option("auto", "Nearest-neighbour search.")

Everything else derives from that declaration:

* validation with an error naming the component, the option, the value given and what is
  allowed (and a did-you-mean for unknown keys): :meth:`Options.parse`;
* coercion of ``--set NAME.KEY=VALUE`` and YAML values (``"1e-4"`` for a float, ``2.0`` for an
  integer, ``"true"`` for a flag);
* the ``hparams`` saved in ``model.json`` (:meth:`Options.to_dict`, JSON-safe) from which
  ``cls(**hparams)`` rebuilds the component;
* ``vad list <kind> --details`` (:func:`describe_options`).

Types come from the annotations: ``bool``, ``int``, ``float``, ``str``, ``Literal[...]``,
``X | None``, unions of these, ``list[X]`` / ``tuple[X, ...]`` (stored as tuples, saved as
lists) and ``dict[str, X]``. Bounds (``ge``, ``gt``, ``le``, ``lt``), ``choices``,
``multiple_of`` and ``rule`` (a predicate with the words for what it allows) apply to the
value, and to each element of a list. Checks that relate several options go in
:meth:`Options.check`. This module imports neither torch nor NumPy.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Literal, Union

from vad.errors import VadError

#: Marks an option without a default: it must be given.
REQUIRED: Any = dataclasses.MISSING


class OptionError(VadError):
    """A value an option does not allow (or an unknown option), with who, what and what is allowed."""

    def __init__(self, owner: str, option: str, value: Any, allowed: str) -> None:
        self.owner, self.option, self.value, self.allowed = owner, option, value, allowed
        super().__init__(f"{owner}: option {option}={value!r} is not allowed; {option} must be {allowed}")


@dataclasses.dataclass(frozen=True)
class Spec:
    """What one declared option allows; built by :func:`option`."""

    description: str
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple[Any, ...] | None = None
    multiple_of: int | None = None
    rule: tuple[Callable[[Any], bool], str] | None = None


def option(
    default: Any = REQUIRED,
    description: str = "",
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: tuple[Any, ...] | list[Any] | None = None,
    multiple_of: int | None = None,
    rule: tuple[Callable[[Any], bool], str] | None = None,
) -> Any:
    """Declare one option: its default (:data:`REQUIRED` if it must be given), a one-line
    description, and what it allows beyond its type."""
    spec = Spec(description, ge, gt, le, lt, None if choices is None else tuple(choices), multiple_of, rule)
    if isinstance(default, (list, dict)):  # mutable defaults: a fresh, frozen copy
        frozen = tuple(default) if isinstance(default, list) else dict(default)
        return dataclasses.field(default_factory=lambda: frozen, metadata={"vad": spec})
    return dataclasses.field(default=default, metadata={"vad": spec})


class Options:
    """Base of every option declaration; subclasses become frozen, keyword-only dataclasses."""

    #: Set by :meth:`parse`: who these options belong to, for messages (``"detector 'patchcore'"``).
    _owner: ClassVar[str] = "component"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        dataclasses.dataclass(frozen=True, kw_only=True)(cls)
        cls._hints_cache = None

    # ------------------------------------------------------------------ declaration

    @classmethod
    def fields(cls) -> dict[str, tuple[Any, Spec, Any]]:
        """``{name: (type, spec, default)}`` in declaration order (default :data:`REQUIRED` when none)."""
        if cls.__dict__.get("_hints_cache") is None:
            hints = typing.get_type_hints(cls)
            table = {}
            for item in dataclasses.fields(cls):
                spec = item.metadata.get("vad")
                if spec is None:
                    raise TypeError(f"{cls.__qualname__}.{item.name} is not declared with vad.options.option()")
                if item.default is not dataclasses.MISSING:
                    default = item.default
                elif item.default_factory is not dataclasses.MISSING:
                    default = item.default_factory()
                else:
                    default = REQUIRED
                table[item.name] = (hints[item.name], spec, default)
            cls._hints_cache = table
        return cls._hints_cache

    # ------------------------------------------------------------------ values

    @classmethod
    def parse(cls, values: Mapping[str, Any] | None = None, owner: str = "component", set_name: str = "NAME") -> Options:
        """Validated, coerced options from user values (unknown keys and bad values raise
        :class:`OptionError` naming ``owner``, the option, the value and what is allowed;
        ``set_name`` is the ``--set`` group a missing required option is given with)."""
        values = dict(values or {})
        table = cls.fields()
        unknown = sorted(set(values) - set(table))
        if unknown:
            name = unknown[0]
            close = difflib.get_close_matches(name, table, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            known = ", ".join(table) or "none"
            raise VadError(f"{owner} has no option {name!r}{hint}; its options are: {known}")
        coerced = {}
        for name, (kind, spec, default) in table.items():
            if name not in values:
                if default is REQUIRED:
                    raise VadError(f"{owner} needs option {name!r} ({spec.description}); give it with --set {set_name}.{name}=VALUE")
                continue
            coerced[name] = _check(values[name], kind, spec, owner, name)
        instance = cls(**coerced)
        object.__setattr__(instance, "_owner", owner)
        instance.check()
        return instance

    @classmethod
    def help_text(cls, name: str) -> str:
        """The command-line help of option ``name``: its description and its default (a list's
        items comma-separated), for plugin commands that take these options as flags."""
        _, spec, default = cls.fields()[name]
        shown = ", ".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        return f"{spec.description} Default {shown}."

    def check(self) -> None:
        """Checks that relate several options; raise :meth:`invalid` for a bad combination."""

    def invalid(self, name: str, allowed: str) -> OptionError:
        """The error for option ``name`` (with its current value) not being ``allowed``."""
        return OptionError(self._owner, name, getattr(self, name), allowed)

    def replace(self, **changes: Any) -> Options:
        """A copy with some options changed (validated like user values)."""
        return type(self).parse({**self.to_dict(), **changes}, self._owner)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe values of every option (tuples as lists): the saved ``hparams``."""
        return {name: _json_safe(getattr(self, name)) for name in self.fields()}


def _json_safe(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    return value


# --------------------------------------------------------------------------- coercion


class _Mismatch(Exception):
    """The value does not fit a type (internal: becomes an OptionError)."""


def _check(value: Any, kind: Any, spec: Spec, owner: str, name: str) -> Any:
    try:
        return _coerce(value, kind, spec)
    except _Mismatch:
        allowed = allowed_text(kind, spec)
        words = [str(c) for c in _choices(kind, spec) if isinstance(c, str)]
        close = difflib.get_close_matches(value, words, n=1, cutoff=0.6) if isinstance(value, str) else []
        raise OptionError(owner, name, value, allowed + (f" (did you mean {close[0]!r}?)" if close else "")) from None


def _choices(kind: Any, spec: Spec) -> list[Any]:
    """Every named choice of an option: ``choices`` and the ``Literal`` values in its type."""
    found = list(spec.choices or ())
    stack = [kind]
    while stack:
        current = stack.pop()
        if typing.get_origin(current) is Literal:
            found.extend(typing.get_args(current))
        elif typing.get_origin(current) in (Union, types.UnionType):
            stack.extend(typing.get_args(current))
    return found


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _coerce(value: Any, kind: Any, spec: Spec) -> Any:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise _Mismatch
        members = [a for a in args if a is not type(None)]
        # the member whose type the value already has wins (1 stays an int in int | float)
        exact = [a for a in members if _same_type(value, a)]
        for member in exact + [a for a in members if a not in exact]:
            try:
                return _coerce(value, member, spec)
            except _Mismatch:
                continue
        raise _Mismatch
    if value is None:
        raise _Mismatch
    if origin is Literal:
        for choice in args:
            if value == choice and type(value) is type(choice):
                return choice
        raise _Mismatch
    if origin in (list, tuple) or kind in (list, tuple):
        if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, (list, tuple)):
            raise _Mismatch
        if origin is tuple and args and args[-1] is not Ellipsis:  # fixed length: tuple[int, int]
            if len(value) != len(args):
                raise _Mismatch
            return tuple(_coerce(v, a, spec) for v, a in zip(value, args))
        element = args[0] if args else Any
        return tuple(_coerce(v, element, spec) for v in value)
    if origin in (dict, Mapping) or kind is dict:
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise _Mismatch
        element = args[1] if len(args) == 2 else Any
        return {k: _coerce(v, element, Spec("")) for k, v in value.items()}
    return _limits(_scalar(value, kind), spec)


_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}


def _scalar(value: Any, kind: Any) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise _Mismatch
    if kind is int:
        if isinstance(value, str):
            try:
                value = float(value.strip()) if any(c in value for c in ".eE") else int(value.strip())
            except ValueError:
                raise _Mismatch from None
        if not _is_number(value) or not math.isfinite(value) or float(value) != int(value):
            raise _Mismatch
        return int(value)
    if kind is float:
        if isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                raise _Mismatch from None
        if not _is_number(value) or not math.isfinite(value):
            raise _Mismatch
        return float(value)
    if kind is str:
        if isinstance(value, os.PathLike):  # a path given from Python
            return os.fspath(value)
        if not isinstance(value, str):
            raise _Mismatch
        return value
    raise TypeError(f"vad options cannot hold {kind!r}")


def _same_type(value: Any, kind: Any) -> bool:
    origin = typing.get_origin(kind)
    if origin is Literal:
        return any(value == c and type(value) is type(c) for c in typing.get_args(kind))
    if origin in (list, tuple):
        return isinstance(value, (list, tuple))
    if origin in (dict, Mapping):
        return isinstance(value, Mapping)
    if kind is float:
        return isinstance(value, float)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind) if isinstance(kind, type) else False


def _limits(value: Any, spec: Spec) -> Any:
    if spec.choices is not None and value not in spec.choices:
        raise _Mismatch
    if _is_number(value):
        if spec.ge is not None and not value >= spec.ge:
            raise _Mismatch
        if spec.gt is not None and not value > spec.gt:
            raise _Mismatch
        if spec.le is not None and not value <= spec.le:
            raise _Mismatch
        if spec.lt is not None and not value < spec.lt:
            raise _Mismatch
        if spec.multiple_of is not None and value % spec.multiple_of:
            raise _Mismatch
    if spec.rule is not None and not spec.rule[0](value):
        raise _Mismatch
    return value


# --------------------------------------------------------------------------- description


def type_text(kind: Any) -> str:
    """The type in words: ``"an integer"``, ``"a list of strings"``, ``"one of 'a', 'b'"``."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (Union, types.UnionType):
        parts = [type_text(a) for a in args if a is not type(None)]
        if type(None) in args:
            parts.append("null")
        return " or ".join(parts)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is tuple and args and args[-1] is not Ellipsis:
        return f"a list of {len(args)} {_plural(type_text(args[0]))}"
    if origin in (list, tuple) or kind in (list, tuple):
        element = type_text(args[0]) if args else "values"
        return f"a list of {_plural(element)}"
    if origin in (dict, Mapping) or kind is dict:
        return "a mapping of names to " + (_plural(type_text(args[1])) if len(args) == 2 else "values")
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string", Any: "any value"}.get(kind, str(kind))


def _plural(text: str) -> str:
    for singular, plural in (("an integer", "integers"), ("a number", "numbers"), ("a string", "strings"), ("true or false", "flags"), ("a list of", "lists of"), ("a mapping of", "mappings of")):
        if text.startswith(singular):
            return plural + text[len(singular) :]
    return text


def limits_text(spec: Spec) -> str:
    """Bounds, choices and rules in words (empty when there are none)."""
    parts = []
    if spec.choices is not None:
        parts.append("one of " + ", ".join(repr(c) for c in spec.choices))
    for symbol, bound in ((">=", spec.ge), (">", spec.gt), ("<=", spec.le), ("<", spec.lt)):
        if bound is not None:
            parts.append(f"{symbol} {bound:g}")
    if spec.multiple_of is not None:
        parts.append(f"a multiple of {spec.multiple_of}")
    if spec.rule is not None:
        parts.append(spec.rule[1])
    return " and ".join(parts)


def allowed_text(kind: Any, spec: Spec) -> str:
    """What an option allows, in words (used in errors and listings)."""
    limits = limits_text(spec)
    return f"{type_text(kind)}, {limits}" if limits else type_text(kind)


def describe_options(declaration: type[Options] | None) -> list[dict[str, Any]]:
    """One JSON-safe record per option: name, type, default, bounds/choices, allowed, description."""
    if declaration is None:
        return []
    records = []
    for name, (kind, spec, default) in declaration.fields().items():
        record: dict[str, Any] = {
            "name": name,
            "type": type_text(kind),
            "default": "required" if default is REQUIRED else _json_safe(default),
            "required": default is REQUIRED,
            "allowed": allowed_text(kind, spec),
            "description": spec.description,
        }
        choices = _choices(kind, spec)
        if choices:
            record["choices"] = list(choices)
        for bound in ("ge", "gt", "le", "lt", "multiple_of"):
            if getattr(spec, bound) is not None:
                record[bound] = getattr(spec, bound)
        records.append(record)
    return records


class Configurable:
    """Base of every registered class: ``name``, the nested ``Options`` declaration, and a
    constructor taking exactly those options as keyword arguments (kept in ``self.options``)."""

    name: ClassVar[str] = ""
    #: What kind of thing this is, for messages (``"detector"``, ``"metric"``...).
    role: ClassVar[str] = "component"
    #: Options :mod:`vad.testing`'s conformance kit uses on its tiny data set (few epochs,
    #: small widths; values for required options).
    tiny_options: ClassVar[dict[str, Any]] = {}

    class Options(Options):
        """No options."""

    def __init__(self, **options: Any) -> None:
        self.options = type(self).Options.parse(options, owner=self.describe_owner(), set_name=self.name or "NAME")

    @classmethod
    def describe_owner(cls) -> str:
        """``"detector 'patchcore'"``: how messages name this component."""
        return f"{cls.role} {cls.name!r}" if cls.name else cls.role

    @property
    def hparams(self) -> dict[str, Any]:
        """JSON-safe options: ``type(self)(**self.hparams)`` rebuilds this object unfitted."""
        return self.options.to_dict()


__all__ = ["Configurable", "OptionError", "Options", "REQUIRED", "Spec", "describe_options", "option", "allowed_text"]
