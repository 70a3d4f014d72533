"""--engine ray: a grid's cells as Ray tasks on a local 2-CPU instance give the local run's
table; a worker killed mid-cell leaves a failed row that a rerun completes; predict scores in
chunks on Ray actors with the records of the local path. (Ray's own retry of a dead worker's
task, ``max_retries``, is Ray's; vad passes it.)"""

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


def predict_records(folder: Path, pattern: str, engine: str) -> list[dict]:
    from typer.testing import CliRunner

    from vad.cli import app

    result = CliRunner().invoke(app, ["--quiet", "predict", pattern, "--model", str(folder), "--engine", engine, "--workers", "2"])
    assert result.exit_code == 3, result.output  # the broken file is reported, the others scored
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def test_the_ray_engine_gives_the_local_results_and_survives_a_dead_worker(workers_see_the_fakes):
    """One local Ray instance (2 CPUs) for every step: starting one costs seconds."""
    import numpy as np
    from PIL import Image

    from vad.bench import load_grid, run_bench, write_table
    from vad.distributed import ray_session, run_cells_ray

    tmp_path = workers_see_the_fakes
    run_bench(grid(tmp_path, "patchcore"), tmp_path / "local")
    base, cells = load_grid(grid(tmp_path, "crash-once"))
    rng = np.random.default_rng(0)
    for index in range(3):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / f"new{index}.png")
    (tmp_path / "new9.png").write_bytes(b"broken")
    model = tmp_path / "local" / "cells" / "patchcore__none__fake-backbone__tiny-a" / "tiny-a" / "model"
    with ray_session(num_cpus=2):
        # the same table as the local engine
        run_bench(grid(tmp_path, "patchcore"), tmp_path / "ray", engine="ray")
        local, distributed = rows(tmp_path / "local"), rows(tmp_path / "ray")
        assert list(local) == list(distributed) and len(local) == 2
        for cell, row in local.items():
            assert distributed[cell]["status"] == "done"
            for metric in ("image_auroc", "pixel_auroc", "au_pro"):
                assert distributed[cell][metric] == pytest.approx(row[metric], abs=1e-6)
        # a worker killed mid-cell, no retry: a failed row, no half-written cell
        output = tmp_path / "bench"
        heard = []
        results = run_cells_ray(base, cells, output, heard.append, retries=0)
        write_table(output, results)
        assert sorted(r.status for r in results) == ["done", "failed"] and len(heard) == 2
        failed = next(r for r in results if r.status == "failed")
        assert "worker running this cell died" in failed.error
        assert not (output / "cells" / failed.cell.id / "metrics.json").exists()
        assert rows(output)[failed.cell.id]["status"] == "failed"
        # predict: chunks on actors, the local path's records
        ray_records = predict_records(model, str(tmp_path / "new*.png"), "ray")
    _, again = run_bench(grid(tmp_path, "crash-once"), output)  # the rerun redoes the failed cell only
    assert sorted(r.status for r in again) == ["cached", "done"]
    assert all(row["status"] != "failed" for row in rows(output).values())
    local_records = predict_records(model, str(tmp_path / "new*.png"), "local")
    assert [r["path"] for r in ray_records] == [r["path"] for r in local_records]
    for ours, theirs in zip(ray_records, local_records):
        assert (ours["score"] is None) == (theirs["score"] is None) and (ours["error"] is None) == (theirs["error"] is None)
        if theirs["score"] is not None:
            assert ours["score"] == pytest.approx(theirs["score"], rel=1e-6)
