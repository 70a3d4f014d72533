"""The contract file is complete: every hookspec is documented and has a test."""

import inspect
from pathlib import Path

from vad import hookspecs

HOOKS = [name for name, _ in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("vad_")]
TEST_SOURCES = "\n".join(p.read_text() for p in Path(__file__).parent.glob("test_*.py"))


def test_the_contract_names_every_kind():
    assert set(HOOKS) == {
        "vad_register_backbones",
        "vad_register_detectors",
        "vad_register_datasets",
        "vad_register_augmentations",
        "vad_register_ensemblers",
        "vad_register_metrics",
        "vad_register_thresholds",
        "vad_register_commands",
    }


def test_every_hookspec_is_documented():
    for name in HOOKS:
        doc = inspect.getdoc(getattr(hookspecs, name))
        assert doc and len(doc) > 20, f"{name} has no docstring"


def test_every_hookspec_has_a_test():
    for name in HOOKS:
        assert f"def test_hook_{name}" in TEST_SOURCES, f"no test_hook_{name} in tests/"


def test_hookimpl_is_the_public_marker():
    import vad

    assert vad.hookimpl is hookspecs.hookimpl
