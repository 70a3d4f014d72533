"""--engine ray: a grid's cells as Ray tasks on a local 2-CPU instance give the local run's
table; a worker killed mid-cell is retried, or leaves a failed row that a rerun completes;
predict scores in chunks on Ray actors with the records of the local path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vad.plugins import reset_registry
from tests.conftest import write_distribution

pytest.importorskip("ray")

PLUGIN = '''
    import os

    from vad import hookimpl
    from vad.testing import FakesPlugin
    from vad_patchcore.detector import PatchCore

    _FAKES = FakesPlugin()


    class CrashOnce(PatchCore):
        """PatchCore whose process dies in its first fit (the marker file says it happened)."""

        name = "crash-once"

        def fit(self, batches):
            try:  # exactly one fit creates the marker, even with two cells running at once
                os.close(os.open(os.environ["VAD_TEST_CRASH_MARKER"], os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return super().fit(batches)
            os._exit(1)


    @hookimpl
    def vad_register_backbones(register):
        _FAKES.vad_register_backbones(register)


    @hookimpl
    def vad_register_datasets(register):
        _FAKES.vad_register_datasets(register)


    @hookimpl
    def vad_register_detectors(register):
        register(CrashOnce)
'''


@pytest.fixture
def workers_see_the_fakes(tmp_path, monkeypatch):
    """An installed distribution with the fakes and crash-once, visible to Ray's workers too."""
    folder = tmp_path / "site"
    folder.mkdir()
    write_distribution(folder, "vad-ray-fakes", "ray_fakes", "vad_ray_fakes", PLUGIN)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv("PYTHONPATH", str(folder))
    monkeypatch.setenv("VAD_TEST_CRASH_MARKER", str(tmp_path / "crashed"))
    reset_registry()
    yield tmp_path
    reset_registry()


def grid(tmp_path: Path, detector: str) -> Path:
    path = tmp_path / f"{detector}.yaml"
    path.write_text(f"dataset: tiny\ndevice: cpu\nthreshold: max\nbackbones: [fake-backbone]\ndetectors: [{detector}]\ncategories: [tiny-a, tiny-b]\n")
    return path


def rows(folder: Path) -> dict[str, dict]:
    return {row["cell"]: row for row in json.loads((folder / "bench.json").read_text())["rows"]}


def test_ray_cells_give_the_local_table(workers_see_the_fakes):
    from vad.bench import run_bench

    tmp_path = workers_see_the_fakes
    run_bench(grid(tmp_path, "patchcore"), tmp_path / "local")
    run_bench(grid(tmp_path, "patchcore"), tmp_path / "ray", engine="ray", num_cpus=2)
    local, distributed = rows(tmp_path / "local"), rows(tmp_path / "ray")
    assert list(local) == list(distributed) and len(local) == 2
    for cell, row in local.items():
        assert distributed[cell]["status"] == "done"
        for metric in ("image_auroc", "pixel_auroc", "au_pro"):
            assert distributed[cell][metric] == pytest.approx(row[metric], abs=1e-6)


def test_a_killed_worker_is_retried_or_a_failed_row_that_a_rerun_completes(workers_see_the_fakes):
    from vad.distributed import run_cells_ray
    from vad.bench import load_grid, run_bench, write_table

    tmp_path = workers_see_the_fakes
    output = tmp_path / "bench"
    base, cells = load_grid(grid(tmp_path, "crash-once"))
    heard = []
    results = run_cells_ray(base, cells, output, heard.append, num_cpus=2, retries=0)
    write_table(output, results)
    statuses = sorted(r.status for r in results)
    assert statuses == ["done", "failed"] and len(heard) == 2  # one cell's worker died, the other ran after it
    failed = next(r for r in results if r.status == "failed")
    assert "worker running this cell died" in failed.error
    assert not (output / "cells" / failed.cell.id / "metrics.json").exists()
    assert rows(output)[failed.cell.id]["status"] == "failed"
    _, again = run_bench(grid(tmp_path, "crash-once"), output)  # the rerun (any engine) redoes the failed cell only
    assert sorted(r.status for r in again) == ["cached", "done"]
    assert all(row["status"] != "failed" for row in rows(output).values())
    (tmp_path / "crashed").unlink()
    retried = run_cells_ray(base, cells, tmp_path / "retried", lambda result: None, num_cpus=2, retries=1)
    assert [r.status for r in retried] == ["done", "done"]  # the dead worker's cell ran again


def test_predict_on_ray_actors_gives_the_local_records(workers_see_the_fakes):
    import numpy as np
    from PIL import Image
    from typer.testing import CliRunner

    from vad.cli import app
    from vad.config import RunConfig
    from vad.pipeline import run

    tmp_path = workers_see_the_fakes
    folder, _ = run(RunConfig(dataset="tiny", backbones=["fake-backbone"], detectors=["patchcore"], threshold="max", device="cpu",
                              categories=["tiny-a"], report=False, output=str(tmp_path / "run")))
    rng = np.random.default_rng(0)
    for index in range(5):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / f"new{index}.png")
    (tmp_path / "new9.png").write_bytes(b"broken")
    records = {}
    for engine in ("local", "ray"):
        result = CliRunner().invoke(app, ["--quiet", "predict", str(tmp_path / "new*.png"), "--model", str(folder / "tiny-a" / "model"), "--engine", engine, "--workers", "2"])
        assert result.exit_code == 3, result.output
        records[engine] = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [r["path"] for r in records["ray"]] == [r["path"] for r in records["local"]]
    for ours, theirs in zip(records["ray"], records["local"]):
        assert (ours["score"] is None) == (theirs["score"] is None) and (ours["error"] is None) == (theirs["error"] is None)
        if theirs["score"] is not None:
            assert ours["score"] == pytest.approx(theirs["score"], rel=1e-6)
