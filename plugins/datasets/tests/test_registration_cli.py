"""Plugin registration, lazy imports and ``vad datasets info``."""

from __future__ import annotations

import subprocess
import sys

import typer
from typer.testing import CliRunner

import vad_datasets
from vad.contracts import Dataset
from vad.plugins import get_registry


def test_every_dataset_is_registered_and_a_dataset():
    registry = get_registry()  # the plugin is installed: found through its entry point
    entries = registry.entries("datasets")
    names = {"mvtec", "mvtec-loco", "visa", "btad", "mpdd", "mvtec-3d", "folder", "multi-view", "demo"}
    assert names <= set(entries)
    for name in names:
        cls = registry.load_class("datasets", name)
        assert issubclass(cls, Dataset) and cls.name == name and cls.__doc__


def test_entry_module_imports_nothing_heavy():
    code = "import sys, vad_datasets, vad_datasets.cli; bad = [m for m in ('torch', 'numpy', 'PIL', 'skimage') if m in sys.modules]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _app():
    app = typer.Typer()

    @app.callback()
    def main() -> None:
        """Test root."""

    vad_datasets.vad_register_commands(app)
    return app


def test_datasets_info_prints_counts(tmp_path, trees):
    trees.mvtec(tmp_path, "bottle", train=10, good=2, defects={"broken": 2, "crack": 1})
    result = CliRunner().invoke(_app(), ["datasets", "info", "mvtec", "--root", str(tmp_path), "--category", "bottle"], terminal_width=120)
    assert result.exit_code == 0, result.output
    lines = [" ".join(line.replace("│", " ").split()) for line in result.output.splitlines()]
    assert "train good 9 0 0" in lines and "validation good 1 0 0" in lines
    assert "test broken 2 2 0" in lines and "test good 2 0 0" in lines and "all 15" in lines


def test_datasets_info_folder_options(tmp_path, trees):
    for i in range(4):
        trees.write_image(tmp_path / "good" / f"{i}.png")
    trees.write_image(tmp_path / "dent" / "0.png")
    result = CliRunner().invoke(_app(), ["datasets", "info", "folder", "--root", str(tmp_path), "-o", "abnormal_dirs=[dent]"], terminal_width=120)
    assert result.exit_code == 0, result.output
    assert "no pixel masks" in result.output and "dent" in result.output


def test_datasets_info_validates_options_through_the_declaration(tmp_path, trees):
    trees.mvtec(tmp_path, "bottle", train=10, good=2, defects={"broken": 2, "crack": 1})
    args = ["datasets", "info", "mvtec", "--root", str(tmp_path), "--category", "bottle"]
    result = CliRunner().invoke(_app(), [*args, "-o", "validation_fraction=0.3"], terminal_width=120)
    assert result.exit_code == 0, result.output  # an --option value overrides the command's 0.1
    lines = [" ".join(line.replace("│", " ").split()) for line in result.output.splitlines()]
    assert "train good 7 0 0" in lines and "validation good 3 0 0" in lines
    result = CliRunner().invoke(_app(), [*args, "--validation-fraction", "1.5"], terminal_width=120)
    assert "option validation_fraction=1.5 is not allowed; validation_fraction must be a number, >= 0 and < 1" in str(result.exception)
    result = CliRunner().invoke(_app(), [*args, "-o", "colour=red"], terminal_width=120)
    assert "data set 'mvtec' has no option 'colour'" in str(result.exception)
    result = CliRunner().invoke(_app(), ["datasets", "info", "folder", "--root", str(tmp_path), "-o", "test_fraction=2"], terminal_width=120)
    assert "option test_fraction=2 is not allowed; test_fraction must be a number, >= 0 and < 1" in str(result.exception)
