"""Run folders: complete or plainly unfinished, never a mix of runs; refused, locked, cleaned up."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import yaml

from vad import runfolder
from vad.errors import VadError
from vad.pipeline import run
from tests.conftest import tiny_config


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "contrib" / "plugin-template"))
import vad_template  # noqa: E402  (the template's detector, imported from its folder)


@pytest.fixture
def registry(vad_fakes, register_plugin):
    with register_plugin(vad_template, name="template-under-test") as registry:
        yield registry


def test_a_complete_run_is_refused_without_overwrite_and_replaced_whole_with_it(registry, tmp_path):
    folder, _ = run(tiny_config(tmp_path, report=True), registry)
    assert runfolder.is_complete(folder) and (folder / "report.html").is_file()
    with pytest.raises(VadError, match="holds a complete run .*--overwrite"):
        run(tiny_config(tmp_path, report=False, seed=1), registry)
    assert yaml.safe_load((folder / "config.yaml").read_text())["seed"] == 0  # untouched
    run(tiny_config(tmp_path, report=False, seed=1), registry, overwrite=True)
    # the old report would describe the old model: it went with the old run
    assert not (folder / "report.html").exists() and yaml.safe_load((folder / "config.yaml").read_text())["seed"] == 1
    assert runfolder.is_complete(folder)


def test_an_unfinished_run_is_refused_and_can_be_resumed_or_overwritten(registry, tmp_path):
    folder, _ = run(tiny_config(tmp_path), registry)
    state = json.loads((folder / "run.json").read_text())
    (folder / "run.json").write_text(json.dumps({**state, "status": "running"}))  # as a SIGKILL leaves it
    leftover = folder / "tiny-a" / ".model.x1y2.tmp"
    leftover.mkdir()
    with pytest.raises(VadError, match=r"unfinished run .*vad run --resume .*--overwrite"):
        run(tiny_config(tmp_path), registry)
    run(tiny_config(tmp_path), registry, resume=True)
    assert runfolder.is_complete(folder) and not leftover.exists()
    assert json.loads((folder / "run.json").read_text())["run_id"] == state["run_id"]  # the same run, continued
    with pytest.raises(VadError, match="that run completed; nothing to continue"):
        run(tiny_config(tmp_path), registry, resume=True)


def test_a_folder_that_holds_no_run_is_never_written(registry, tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "thesis.tex").write_text("precious")
    for overwrite in (False, True):
        with pytest.raises(VadError, match="is not a vad run folder .*thesis.tex"):
            run(tiny_config(tmp_path), registry, overwrite=overwrite)
    assert sorted(p.name for p in folder.iterdir()) == ["thesis.tex"]


def test_a_run_folder_being_written_is_refused(registry, tmp_path):
    with runfolder.claim(tmp_path / "run", tmp_path / "unused"):
        with pytest.raises(VadError, match="being written by another vad run .*pid"):
            run(tiny_config(tmp_path), registry)
    run(tiny_config(tmp_path), registry, overwrite=True)  # the lock died with its holder


def test_default_names_never_collide(tmp_path):
    default = tmp_path / "runs" / "demo-20261207-101010"
    names = []
    for _ in range(3):
        with runfolder.claim(None, default) as claimed:
            claimed.finish()
            names.append(claimed.path.name)
    assert names == ["demo-20261207-101010", "demo-20261207-101010-2", "demo-20261207-101010-3"]


def test_a_failed_check_writes_nothing(registry, tmp_path):
    for bad in ({"metrics": ["no-such-metric"]}, {"options": {"no-such-plugin": {"x": 1}}}, {"options": {"quantile": {"q": 0.5}}}):
        with pytest.raises(VadError):
            run(tiny_config(tmp_path, **bad), registry)
        assert not (tmp_path / "run").exists(), bad


def test_an_exception_marks_the_run_failed(registry, tmp_path, monkeypatch):
    import vad.pipeline

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(vad.pipeline, "_finish", broken)
    with pytest.raises(RuntimeError):
        run(tiny_config(tmp_path), registry)
    state = json.loads((tmp_path / "run" / "run.json").read_text())
    assert state["status"] == "failed" and state["error"] == "disk on fire"
    with pytest.raises(VadError, match="a run that failed .*disk on fire"):
        run(tiny_config(tmp_path), registry)


# --------------------------------------------------------------------------- SIGKILL at random points

EXPECTED_FILES = {"run.json", "config.yaml", "metrics.json", "results.csv", "results.json", "results.md", "decisions.csv", "decisions.md", "report.html"}


def _check_after_kill(folder: Path) -> str:
    """The folder is complete and wholly one run's, or plainly unfinished; returns its status."""
    state = runfolder.read_state(folder)
    if state is None:  # killed before the run wrote anything
        assert not [p for p in folder.iterdir() if p.name != runfolder.LOCK_FILE] if folder.exists() else True
        return "empty"
    if state["status"] != "complete":
        return state["status"]
    names = {p.name for p in folder.iterdir()} - {runfolder.LOCK_FILE}
    assert names == EXPECTED_FILES | {"part"}, names
    assert not [p for p in folder.rglob("*") if p.name.endswith((".tmp", ".old"))]
    seed = yaml.safe_load((folder / "config.yaml").read_text())["seed"]
    assert json.loads((folder / "part" / "model" / "model.json").read_text())["seed"] == seed
    started = datetime.fromisoformat(state["started"]).timestamp()
    for path in folder.rglob("*"):  # nothing older than the run that completed the folder
        if path.is_file() and path.name != runfolder.LOCK_FILE:
            assert path.stat().st_mtime >= started - 1, path
    return "complete"


#: A warm process that forks one ``vad`` command per request, so that each of many killed runs
#: does not pay Python's and torch's start-up (it imports but never computes before forking).
FORK_SERVER = """
import json, os, sys
import torch, vad.cli
from vad.plugins import get_registry
registry = get_registry()
for kind, name in (("detectors", "patchcore"), ("datasets", "folder"), ("backbones", "tf_efficientnet_lite0"), ("thresholds", "conformal")):
    registry.load_class(kind, name)
print("ready", flush=True)
for line in sys.stdin:
    request = json.loads(line)
    if request[0] == "wait":
        print(os.waitpid(request[1], 0)[1], flush=True)
        continue
    pid = os.fork()
    if pid == 0:
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # the table: not into the answers
        code = 0
        try:
            vad.cli.main(request[1])
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else 1
        os._exit(code)
    print(pid, flush=True)
"""


def test_sigkill_at_random_points_never_leaves_a_folder_that_looks_complete_but_mixes_runs(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for sub, count in (("good", 10), ("bad", 3)):
        (tmp_path / "part" / sub).mkdir(parents=True)
        for i in range(count):
            Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).save(tmp_path / "part" / sub / f"{i}.png")
    folder = tmp_path / "run"

    def arguments(seed: int, overwrite: bool = True) -> list[str]:
        return ["-q", "run", "--dataset", "folder", "--root", str(tmp_path / "part"), "--set", "folder.abnormal_dirs=bad",
                "--image-size", "32", "--device", "cpu", "--seed", str(seed), "--output", str(folder), *(["--overwrite"] if overwrite else [])]

    server = subprocess.Popen([sys.executable, "-c", FORK_SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=tmp_path)

    def ask(request: list) -> int:
        server.stdin.write(json.dumps(request) + "\n")
        server.stdin.flush()
        return int(server.stdout.readline())

    def start(seed: int, overwrite: bool = True) -> tuple[int, float]:
        """Fork a run; returns its pid and the seconds until it claimed the folder."""
        before, began = runfolder.read_state(folder), time.perf_counter()
        pid = ask(["run", arguments(seed, overwrite)])
        while runfolder.read_state(folder) == before and time.perf_counter() - began < 60:
            time.sleep(0.005)
        return pid, time.perf_counter() - began

    try:
        assert server.stdout.readline().strip() == "ready"
        pid, _ = start(100)
        claimed = time.perf_counter()
        assert ask(["wait", pid]) == 0
        duration = time.perf_counter() - claimed  # from the claim to the end: fit, threshold, save, report
        assert _check_after_kill(folder) == "complete"
        chooser = random.Random(0)
        seen = []
        window = duration
        for kill in range(25):  # until 10 kills landed in a run; later runs are often faster than the first
            pid, _ = start(kill)
            time.sleep(chooser.uniform(0, window))
            os.kill(pid, signal.SIGKILL)
            ask(["wait", pid])
            seen.append(_check_after_kill(folder))
            if seen[-1] == "complete":
                window *= 0.8  # the run ended before the kill: aim earlier
            if seen.count("running") >= 10:
                break
        assert seen.count("running") >= 10, seen  # kills land in the run itself, not after it
        pid, _ = start(0, overwrite=False)
        assert ask(["wait", pid]) != 0  # an unfinished run is refused without --overwrite
        pid, _ = start(0)
        assert ask(["wait", pid]) == 0  # --overwrite cleans it up
        assert _check_after_kill(folder) == "complete"
    finally:
        server.kill()
        server.wait()
