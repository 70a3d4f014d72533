"""Fixtures of the integration tests: throw-away distributions with ``vad`` entry points."""

from __future__ import annotations

import contextlib
import importlib
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from vad.config import RunConfig
from vad.plugins import reset_registry


def write_distribution(folder: Path, dist: str, plugin: str, module: str, source: str) -> None:
    """A minimal installed distribution: a module and a dist-info with a ``vad`` entry point."""
    (folder / f"{module}.py").write_text(textwrap.dedent(source))
    info = folder / f"{dist.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[vad]\n{plugin} = {module}\n")


GOOD = '''
    from vad import hookimpl

    @hookimpl
    def vad_register_detectors(register):
        register("good_plugin_impl:Thing", name="good-detector", summary="A good one.")

    @hookimpl
    def vad_register_commands(app):
        @app.command("hello-good")
        def hello():
            """Say hello from a plugin."""
            print("hello from good")
'''
BROKEN = '''
    raise RuntimeError("boom at import")
'''
DUPLICATE = '''
    from vad import hookimpl

    @hookimpl
    def vad_register_detectors(register):
        register("good_plugin_impl:Thing", name="good-detector")
'''


@pytest.fixture
def fake_distributions(tmp_path, monkeypatch):
    """Three installed distributions: vad-good, vad-broken (raises on import), vad-dup (name clash)."""
    write_distribution(tmp_path, "vad-good", "good", "good_plugin", GOOD)
    write_distribution(tmp_path, "vad-broken", "broken", "broken_plugin", BROKEN)
    write_distribution(tmp_path, "vad-dup", "dup", "dup_plugin", DUPLICATE)
    (tmp_path / "good_plugin_impl.py").write_text("class Thing:\n    '''The thing.'''\n    name = 'good-detector'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    reset_registry()
    yield tmp_path
    reset_registry()


def run_vad(*args: str, pythonpath: Path | None = None, env: dict | None = None, timeout: float = 300, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the ``vad`` console script of this environment in a subprocess (in ``cwd``, else in
    a temporary folder removed afterwards, so a default ``runs/`` never lands in the checkout)."""
    environment = {**os.environ, **(env or {})}
    if pythonpath is not None:
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(pythonpath), environment.get("PYTHONPATH", "")]))
    command = [str(Path(sys.executable).with_name("vad")), *args]
    folder = contextlib.nullcontext(cwd) if cwd is not None else tempfile.TemporaryDirectory(prefix="vad-cli-test-")
    with folder as where:
        return subprocess.run(command, capture_output=True, text=True, env=environment, timeout=timeout, cwd=where)


def tiny_config(tmp_path: Path, **changes) -> RunConfig:
    """A run on the fakes' tiny data set: fake backbone, feature-distance detector, no report."""
    base = dict(
        dataset="tiny", backbones=["fake-backbone"], detectors=["feature-distance"], threshold="max",
        output=str(tmp_path / "run"), device="cpu", report=False, categories=["tiny-a"],
    )
    return RunConfig(**{**base, **changes})


@pytest.fixture
def report_registry(vad_fakes, register_plugin):
    """The fakes plus tests/e2e's report plugin: an exportable distance detector, a max
    threshold and the tiny in-memory data set."""
    sys.path.insert(0, str(Path(__file__).resolve().parent / "e2e"))
    from report_plugin import ReportTestPlugin

    with register_plugin(ReportTestPlugin(), name="report-test-plugin") as registry:
        yield registry
