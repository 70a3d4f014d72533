"""Ray as vad's distributed engine: ``vad bench --engine ray`` and ``vad predict --engine ray``.

``vad bench``: every grid cell is one Ray task running the same :func:`vad.bench.run_cell` as
the local engine (so the same numbers), declaring what it needs: 1 CPU, and 1 GPU when the grid's
``device`` names CUDA. Results come back as cells finish and the sweep's table is rewritten
after each one (atomically), so it always holds every finished cell. A cell's run folder is
marked complete only after its last file (:mod:`vad.runfolder`): a worker killed mid-cell
leaves an unfinished folder that Ray retries (``retries`` times) and a rerun of the command
redoes; a cell whose retries are spent is a failed row, never half a result.

``vad predict``: the images are cut into chunks scored by ``workers`` Ray actors, each loading
the model once; records come back in the order of the inputs.

Without ``address`` a local Ray instance is started for the call (``num_cpus`` CPUs, default
all) and stopped after it; with ``address`` (``auto``, ``ray://host:10001``, ...) vad joins that
cluster and leaves it running. Workers import vad and its plugins from their own Python
environment, which must match the driver's (same packages; a cluster's runtime environment).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from vad.errors import VadError

ENGINES = ("local", "ray")
#: Ray's own retries of a cell or chunk whose worker process died.
RETRIES = 1


def require_ray() -> Any:
    """Import ``ray`` or say how to install it."""
    try:
        import ray
    except ImportError as error:
        raise VadError("--engine ray needs Ray: pip install 'vad-core[ray]'") from error
    return ray


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[Any]:
    """Ray, connected to ``address`` or to a local instance started (and stopped) here."""
    import os

    ray = require_ray()
    if ray.is_initialized():
        yield ray
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local instance for this call only: no tokens to manage
    ray.init(
        address=address, num_cpus=None if address else num_cpus, include_dashboard=False, log_to_driver=False,
        configure_logging=False, runtime_env={"env_vars": {"VAD_LOG": "quiet"}},
    )
    try:
        yield ray
    finally:
        ray.shutdown()


def _cell_task(base: dict[str, Any], cell: Any, folder: str) -> Any:
    from vad.bench import run_cell

    return run_cell(base, cell, Path(folder))


def run_cells_ray(
    base: dict[str, Any], cells: Sequence[Any], output: Path, on_result: Callable[[Any], None],
    address: str | None = None, num_cpus: int | None = None, retries: int = RETRIES,
) -> list[Any]:
    """Run ``cells`` as Ray tasks; ``on_result`` hears each result as it arrives; returns them
    in grid order (see the module docstring)."""
    from vad.bench import CellResult

    device = str(base.get("device") or "")
    gpus = 1 if device.startswith("cuda") else 0
    with ray_session(address, num_cpus) as ray:
        task = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=retries)(_cell_task)
        pending = {task.remote(base, cell, str(output / "cells" / cell.id)): cell for cell in cells}
        results: dict[str, Any] = {}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for reference in done:
                cell = pending.pop(reference)
                try:
                    result = ray.get(reference)
                except ray.exceptions.RayError as error:  # the worker died, retries spent
                    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                    result = CellResult(cell, "failed", error=f"the Ray worker running this cell died ({type(error).__name__}: {message}); rerun to redo it")
                results[cell.id] = result
                on_result(result)
    return [results[cell.id] for cell in cells]


class _Scorer:
    """A Ray actor holding one loaded model."""

    def __init__(self, folder: str) -> None:
        from vad.model import AnomalyModel

        self.model = AnomalyModel.load(folder, "cpu")

    def score(self, paths: list[str]) -> list[dict[str, Any]]:
        from vad.predict import failure_record, predict_images

        try:
            return predict_images(self.model, paths).records
        except VadError as error:  # no image of this chunk could be scored: each says why
            return [failure_record(path, str(error), self.model) for path in paths]


def predict_ray(folder: Path, paths: Sequence[str], workers: int, chunk: int = 64, address: str | None = None) -> list[dict[str, Any]]:
    """Records of ``paths`` scored by ``workers`` actors (one model load each), in input order."""
    if workers < 1 or chunk < 1:
        raise VadError(f"--workers and the chunk size must be at least 1, got {workers} and {chunk}")
    chunks = [list(paths[start : start + chunk]) for start in range(0, len(paths), chunk)]
    with ray_session(address, workers if address is None else None) as ray:
        actor = ray.remote(num_cpus=1, max_restarts=RETRIES, max_task_retries=RETRIES)(_Scorer)
        pool = [actor.remote(str(folder)) for _ in range(min(workers, len(chunks)))]
        futures = [pool[index % len(pool)].score.remote(part) for index, part in enumerate(chunks)]
        return [record for part in ray.get(futures) for record in part]
