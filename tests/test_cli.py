"""The command line: fast start without torch, listings, doctor, and clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from tests.conftest import run_vad

REPO = Path(__file__).resolve().parents[1]


def first_party_plugins() -> dict[str, str]:
    """``{entry-point name: distribution}`` declared by the plugins/ and contrib/ folders (the
    template excluded; a library such as vad-flows registers nothing)."""
    names = {}
    for project in [*REPO.glob("plugins/*/pyproject.toml"), *REPO.glob("contrib/*/pyproject.toml")]:
        if project.parent.name == "plugin-template":
            continue
        data = tomllib.loads(project.read_text())
        names.update(dict.fromkeys(data["project"].get("entry-points", {}).get("vad", {}), data["project"]["name"]))
    return names


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("argv", [["--help"], ["plugins"], ["plugins", "--json"], ["list", "detectors"]])
def test_listing_commands_do_not_import_torch(argv):
    code = (
        "import sys\nfrom vad.cli import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "heavy = [m for m in ('torch', 'numpy', 'timm', 'faiss') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    result = _python(code)
    assert result.returncode == 0, result.stderr + result.stdout


def test_help_is_fast():
    vad = Path(sys.executable).with_name("vad")
    subprocess.run([str(vad), "--help"], capture_output=True, timeout=60)  # warm the file cache
    times = []
    for _ in range(3):
        start = time.perf_counter()
        subprocess.run([str(vad), "--help"], capture_output=True, check=True, timeout=60)
        times.append(time.perf_counter() - start)
    assert min(times) < 1.0, times


def test_plugins_json_lists_every_first_party_plugin():
    result = run_vad("plugins", "--json")
    assert result.returncode == 0, result.stderr
    listed = {p["name"]: p for p in json.loads(result.stdout)}
    expected = first_party_plugins()
    assert expected and set(expected) <= set(listed), set(expected) - set(listed)
    for name, distribution in expected.items():
        assert listed[name]["error"] is None, listed[name]
        assert listed[name]["distribution"] == distribution and listed[name]["registers"], listed[name]


def test_every_first_party_component_loads_from_its_distribution():
    from vad.plugins import get_registry

    registry = get_registry()
    distributions = set(first_party_plugins().values())
    for kind in ("detectors", "backbones", "datasets", "augmentations", "ensemblers", "metrics", "thresholds"):
        for name, entry in registry.entries(kind).items():
            if entry.plugin.distribution in distributions:  # imports, and is a class of that kind
                cls = registry.load_class(kind, name)
                assert isinstance(cls, type), (kind, name, cls)


def test_plugins_plain_output_shows_what_each_registers():
    result = run_vad("plugins")
    assert result.returncode == 0
    assert "detectors:" in result.stdout


def test_doctor_reports_torch_faiss_and_offline_weights():
    result = run_vad("doctor")
    assert result.returncode == 0, result.stderr
    assert "torch 2." in result.stdout and "CUDA available" in result.stdout
    assert "faiss" in result.stdout
    assert "tf_efficientnet_lite0" in result.stdout


def test_list_unknown_kind_suggests():
    result = run_vad("list", "detector")
    assert result.returncode == 2
    assert "Did you mean 'detectors'?" in result.stderr
    assert "Traceback" not in result.stderr


def test_run_unknown_detector_suggests_nearest(tmp_path):
    result = run_vad("run", "--detector", "patchcor", cwd=tmp_path)
    assert result.returncode == 2
    assert "unknown detector 'patchcor'" in result.stderr and "Did you mean 'patchcore'?" in result.stderr
    assert not any(tmp_path.iterdir())  # no half-made runs/ folder


def test_run_bad_set_option(tmp_path):
    result = run_vad("run", "--set", "coreset_ratio=0.1", "--output", str(tmp_path / "r"))
    assert result.returncode == 2 and "NAME.KEY=VALUE" in result.stderr
    assert not (tmp_path / "r").exists()


def test_run_bad_config_files(tmp_path):
    missing = run_vad("run", "--config", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    typo = tmp_path / "run.yaml"
    typo.write_text("detectorz: [patchcore]\n")
    result = run_vad("run", "--config", str(typo))
    assert result.returncode == 2 and "did you mean 'detectors'" in result.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text("detectors: [patchcore\n")
    assert "not valid YAML" in run_vad("run", "--config", str(broken)).stderr


def test_run_bad_device(tmp_path):
    result = run_vad("run", "--device", "tpu", "--category", "brick", "--output", str(tmp_path / "r"))
    assert result.returncode == 2 and "device" in result.stderr
    assert not (tmp_path / "r").exists()  # refused before anything was written


def test_run_sigma_is_checked_before_anything_is_written(tmp_path):
    result = run_vad("run", "--sigma", "-1", "--category", "brick", "--output", str(tmp_path / "r"))
    assert result.returncode == 2 and "sigma must be >= 0" in result.stderr
    assert not (tmp_path / "r").exists()


def test_messages_are_text_not_markup(capsys, monkeypatch):
    from vad.progress import info, warn

    monkeypatch.setenv("VAD_LOG", "rich")
    info("[brick] 24 train")
    warn("[grass] skipped [bold]x[/bold]")
    err = capsys.readouterr().err
    assert "[brick] 24 train" in err and "[grass] skipped [bold]x[/bold]" in err
