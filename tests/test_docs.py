"""The reference docs stay true: every hook, contract class, method, property and attribute is
documented with its current parameters, and the README's CLI tour uses commands and flags that
`vad --help` knows."""

from __future__ import annotations

import inspect
import re
import shlex
from pathlib import Path

import pytest

from vad import contracts, hookspecs, options, training

ROOT = Path(__file__).resolve().parents[1]
HOOKS_DOC = (ROOT / "docs" / "plugin-hooks.md").read_text()
CONTRACTS_DOC = (ROOT / "docs" / "contracts.md").read_text()
README = (ROOT / "README.md").read_text()


def call_text(name: str, function) -> str:
    """``name(a, b, **options)``: the parameter names a reader needs (self/cls left out)."""
    parts = []
    for parameter in inspect.signature(function).parameters.values():
        if parameter.name in ("self", "cls"):
            continue
        prefix = {parameter.VAR_POSITIONAL: "*", parameter.VAR_KEYWORD: "**"}.get(parameter.kind, "")
        parts.append(prefix + parameter.name)
    return f"{name}({', '.join(parts)})"


def section(document: str, heading: str) -> str:
    """The text under ``heading`` up to the next heading of the same or a higher level."""
    level = heading.split(" ")[0]
    start = document.index(heading)
    following = re.search(rf"^#{{1,{len(level)}}} ", document[start + len(heading) :], re.MULTILINE)
    return document[start : start + len(heading) + (following.start() if following else len(document))]


HOOKS = [name for name, _ in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("vad_")]


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_documented_with_its_signature_an_example_and_a_first_party_plugin(hook):
    heading = f"## `{call_text(hook, getattr(hookspecs, hook))}`"
    assert heading in HOOKS_DOC, f"docs/plugin-hooks.md has no (current) heading {heading}"
    text = section(HOOKS_DOC, heading)
    assert f"def {hook}(" in text, "no minimal example"
    assert "first-party:" in text
    from vad.plugins import KINDS, get_registry

    kind = next((k for k, h in KINDS.items() if h == hook), None)
    if kind is not None:
        assert "registers:" in text and "vad.contracts." in text, "no contract class named"
        registered = get_registry().entries(kind)
        named = set(re.findall(r"`([^`]+)`", text))
        assert named & set(registered), f"names no registered {kind} of a first-party plugin"


DOCUMENTED_CLASSES = [
    *(cls for name, cls in inspect.getmembers(contracts, inspect.isclass) if cls.__module__ == contracts.__name__),
    training.TrainedDetector,
    training.Session,
    options.Configurable,
    options.Options,
]


def members(cls: type) -> list[str]:
    """How docs/contracts.md must mention each public member defined on ``cls``."""
    found = []
    dataclass_init = "__dataclass_fields__" in cls.__dict__
    for name, value in cls.__dict__.items():
        if isinstance(value, (staticmethod, classmethod)):
            value = value.__func__
        if name == "__init__" and inspect.isfunction(value):
            found.append(call_text(cls.__name__, value))
        elif name == "__call__":
            found.append(call_text(name, value))
        elif name.startswith("__"):
            continue
        elif inspect.isfunction(value):
            found.append(call_text(name, value))
        elif isinstance(value, property) or inspect.isclass(value):
            found.append(name)
    found += [name for name in cls.__dict__.get("__annotations__", {}) if not (dataclass_init and name in found)]
    return found


@pytest.mark.parametrize("cls", DOCUMENTED_CLASSES, ids=lambda cls: cls.__name__)
def test_every_contract_member_is_documented_with_its_parameters(cls):
    heading = next((line for line in CONTRACTS_DOC.splitlines() if line.startswith(f"### `{cls.__name__}`")), None)
    assert heading, f"docs/contracts.md has no section for {cls.__name__}"
    text = re.sub(r"\s+", " ", section(CONTRACTS_DOC, heading))  # wrapped lines read as one
    missing = [member for member in members(cls) if f"`{member}`" not in text]
    assert not missing, f"{cls.__name__}: undocumented or stale in docs/contracts.md: {missing}"


def tour_commands() -> list[list[str]]:
    block = re.search(r"## A tour of the CLI\n\n```bash\n(.*?)```", README, re.DOTALL).group(1)
    lines = [line.split("#")[0].strip() for line in block.replace("\\\n", " ").splitlines()]
    return [shlex.split(line)[1:] for line in lines if line.startswith("vad ")]


def test_the_readme_cli_tour_uses_commands_and_flags_vad_knows():
    from typer.testing import CliRunner

    from vad.cli import _register_plugin_commands, app

    _register_plugin_commands()
    runner = CliRunner()
    commands = tour_commands()
    assert len(commands) > 10
    for words in commands:
        path = [w for w in words if not w.startswith("-")][:2]
        result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "250"})
        if result.exit_code != 0 or "Usage:" not in result.output:  # the second word is an argument
            path = path[:1]
            result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "250"})
        assert result.exit_code == 0 and "Usage:" in result.output, (words, result.output)
        for flag in (w.split("=")[0] for w in words if w.startswith("--")):
            assert flag in result.output, f"README tour: `vad {' '.join(words)}` uses {flag}, which `vad {' '.join(path)} --help` does not list"
