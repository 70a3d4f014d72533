"""The plugin manager: discovery, lazy loading, switches, broken and clashing plugins, names."""

from __future__ import annotations

import json
import sys

import pytest

from vad import hookimpl
from vad.errors import PluginConflictError, UnknownNameError, VadError
from vad.plugins import KINDS, Registry
from tests.conftest import run_vad


class Thing:
    """Something registered."""

    name = "thing"


def _registry_with(plugin) -> Registry:
    registry = Registry(load_entry_points=False)
    registry.register_plugin(plugin, "under-test", distribution="vad-under-test")
    return registry


def _one_hook_plugin(hook_name: str):
    def impl(register):
        register(Thing)
        register("tests.test_plugins:Thing", name="lazy-thing", summary="by path")

    impl.__name__ = hook_name
    return type("Plugin", (), {hook_name: staticmethod(hookimpl(impl))})()


@pytest.mark.parametrize("kind", list(KINDS))
def test_register_hooks_fill_their_kind(kind):
    registry = _registry_with(_one_hook_plugin(KINDS[kind]))
    entries = registry.entries(kind)
    assert set(entries) == {"thing", "lazy-thing"}
    assert entries["thing"].summary == "Something registered."
    assert registry.load_class(kind, "lazy-thing") is Thing
    assert registry.info()[0].registers == {kind: ["thing", "lazy-thing"]}


def test_commands_hook_adds_a_sub_command(fake_distributions):
    result = run_vad("hello-good", pythonpath=fake_distributions)
    assert result.returncode == 0, result.stderr
    assert "hello from good" in result.stdout


def test_registration_by_path_is_lazy():
    plugin = type("P", (), {"vad_register_detectors": staticmethod(hookimpl(lambda register: register("not_imported_yet_module:X", name="x")))})()
    registry = _registry_with(plugin)
    assert "x" in registry.entries("detectors")
    assert "not_imported_yet_module" not in sys.modules
    with pytest.raises(VadError, match="could not be loaded"):
        registry.load_class("detectors", "x")


def test_a_path_without_a_name_is_refused_and_reported():
    plugin = type("P", (), {"vad_register_detectors": staticmethod(hookimpl(lambda register: register("m:X")))})()
    registry = _registry_with(plugin)
    assert registry.entries("detectors") == {}
    assert "without a name" in registry.failures[0].error


def test_unknown_name_suggests_the_nearest():
    registry = _registry_with(_one_hook_plugin("vad_register_detectors"))
    with pytest.raises(UnknownNameError) as caught:
        registry.get("detectors", "thnig")
    assert "Did you mean 'thing'?" in str(caught.value)
    assert "Available: lazy-thing, thing" in str(caught.value)


def test_unknown_name_with_nothing_installed_says_so():
    with pytest.raises(UnknownNameError, match="no detector is installed"):
        Registry(load_entry_points=False).get("detectors", "patchcore")


def test_unknown_kind_is_an_error():
    with pytest.raises(UnknownNameError, match="unknown kind"):
        Registry(load_entry_points=False).entries("detector")


def test_entry_points_are_discovered_with_distribution_and_version(fake_distributions):
    registry = Registry().load()
    info = {i.name: i for i in registry.info()}
    assert info["good"].distribution == "vad-good" and info["good"].version == "1.0"
    assert info["good"].registers == {"detectors": ["good-detector"]}


def test_a_plugin_that_raises_on_import_is_reported_and_skipped(fake_distributions):
    registry = Registry().load()
    failure = next(f for f in registry.failures if f.name == "broken")
    assert failure.distribution == "vad-broken"
    assert "RuntimeError: boom at import" in failure.error
    assert "good" in registry.plugins


def test_an_unknown_name_names_the_plugins_that_failed_to_load(fake_distributions, monkeypatch):
    monkeypatch.setenv("VAD_LOAD_PLUGINS", "good,broken")
    registry = Registry().load()
    with pytest.raises(UnknownNameError) as caught:
        registry.get("detectors", "broken-detector")
    message = str(caught.value)
    assert message.startswith("unknown detector 'broken-detector'.") and "Available: good-detector." in message
    assert "plugin 'broken' (distribution vad-broken) failed to load: RuntimeError: boom at import; see `vad plugins`" in message


def test_with_nothing_installed_a_plugin_whose_hook_raised_is_named():
    def broken(register):
        raise ImportError("No module named 'faiss'")

    broken.__name__ = "vad_register_detectors"
    registry = _registry_with(type("P", (), {"vad_register_detectors": staticmethod(hookimpl(broken))})())
    with pytest.raises(UnknownNameError) as caught:
        registry.get("detectors", "patchcore")
    assert "no detector is installed" in str(caught.value)
    assert (
        "plugin 'under-test' (distribution vad-under-test) failed to load: "
        "vad_register_detectors raised ImportError: No module named 'faiss'" in str(caught.value)
    )


def test_duplicate_names_are_an_error_naming_both_distributions(fake_distributions):
    registry = Registry().load()
    with pytest.raises(PluginConflictError) as caught:
        registry.get("detectors", "good-detector")
    assert "vad-good" in str(caught.value) and "vad-dup" in str(caught.value)
    with pytest.raises(PluginConflictError):
        registry.check()


def test_disable_plugins_switch(fake_distributions, monkeypatch):
    monkeypatch.setenv("VAD_DISABLE_PLUGINS", "dup,broken")
    registry = Registry().load()
    assert "dup" not in registry.plugins and not [f for f in registry.failures if f.name == "broken"]
    registry.check()
    assert registry.load_class("detectors", "good-detector").name == "good-detector"


def test_load_plugins_allow_list(fake_distributions, monkeypatch):
    monkeypatch.setenv("VAD_LOAD_PLUGINS", "good")
    assert set(Registry().load().plugins) == {"good"}
    monkeypatch.setenv("VAD_LOAD_PLUGINS", "")
    assert Registry().load().plugins == {}


def test_vad_plugins_lists_good_and_broken_plugins(fake_distributions):
    result = run_vad("plugins", "--json", pythonpath=fake_distributions)
    assert result.returncode == 0, result.stderr
    listed = {p["name"]: p for p in json.loads(result.stdout)}
    assert listed["good"]["registers"] == {"detectors": ["good-detector"]}
    assert "boom at import" in listed["broken"]["error"]


def test_vad_run_with_a_clashing_name_is_a_clear_error(fake_distributions):
    result = run_vad("run", "--detector", "good-detector", pythonpath=fake_distributions)
    assert result.returncode == 2
    assert "vad-good" in result.stderr and "vad-dup" in result.stderr
    assert "Traceback" not in result.stderr


def test_first_party_plugins_import_only_the_stated_plugin_api():
    import re
    from pathlib import Path

    import vad

    root = Path(__file__).resolve().parents[1]
    sources = [p for p in (*root.glob("plugins/*/vad_*/**/*.py"), *root.glob("contrib/*/vad_*/**/*.py")) if "/build/" not in str(p)]
    assert len(sources) > 20
    outside = []
    for path in sources:
        text = path.read_text()
        used = re.findall(r"^\s*(?:from|import) (vad\.\w+)", text, re.MULTILINE)
        used += [f"vad.{name}" for name in re.findall(r"^\s*from vad import (\w+)", text, re.MULTILINE) if name not in vad.__all__]
        outside += [(str(path.relative_to(root)), module) for module in used if module not in vad.PLUGIN_API]
    assert not outside, f"plugins import vad internals: {outside}"
