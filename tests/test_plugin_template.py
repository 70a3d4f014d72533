"""Third parties: the plugin template installs from its folder, is listed, tests green, runs end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import run_vad

TEMPLATE = Path(__file__).resolve().parents[1] / "contrib" / "plugin-template"


@pytest.fixture(scope="module")
def installed_template(tmp_path_factory):
    """The template installed (not editable, no network) into a folder put on PYTHONPATH."""
    target = tmp_path_factory.mktemp("site")
    build = tmp_path_factory.mktemp("build")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(target), str(TEMPLATE)],
        check=True, capture_output=True, text=True, timeout=300, cwd=build,
    )
    return target


def test_vad_plugins_lists_the_installed_template(installed_template):
    result = run_vad("plugins", "--json", pythonpath=installed_template)
    assert result.returncode == 0, result.stderr
    template = next(p for p in json.loads(result.stdout) if p["name"] == "template")
    assert template["distribution"] == "vad-plugin-template" and template["version"] == "0.1.0"
    assert template["registers"] == {"detectors": ["feature-distance"]}


def test_the_template_tests_pass_against_the_installed_template(installed_template):
    env = {"PYTHONPATH": str(installed_template)}
    import os

    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", ".", "--confcutdir", ".", "tests"],
        cwd=TEMPLATE, capture_output=True, text=True, timeout=300, env={**os.environ, **env},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout


def test_vad_run_with_the_template_detector_end_to_end(installed_template, tmp_path):
    output = tmp_path / "run"
    result = run_vad(
        "--quiet", "run", "--detector", "feature-distance", "--category", "brick", "--no-report",
        "--output", str(output), pythonpath=installed_template,
    )
    assert result.returncode == 0, result.stderr
    metrics = json.loads((output / "metrics.json").read_text())
    assert 0.0 <= metrics["categories"]["brick"]["image_auroc"] <= 1.0
    assert (output / "brick" / "model" / "model.json").is_file()
    assert (output / "results.md").read_text().count("|") > 4
