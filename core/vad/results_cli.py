"""``vad predict``, ``vad export`` and ``vad bench``: using and comparing fitted models.

``add_commands(app)`` attaches the three commands to the ``vad`` Typer app. Heavy imports
(torch, onnx) happen inside the commands, so ``vad --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from vad.errors import VadError


def _parse_size(text: Optional[str]) -> Optional[tuple[int, int]]:
    if not text:
        return None
    from vad.geometry import parse_size  # imports torch: only when the command runs

    return parse_size(text, "--input-size")


def predict_command(
    inputs: list[str] = typer.Argument(..., help="Image files, folders (searched recursively) or glob patterns (quote them)."),
    model: Path = typer.Option(..., "--model", "-m", help="Model folder (runs/<run>/<category>/model), or a run folder with one model."),
    fmt: str = typer.Option("jsonl", "--format", "-f", help="jsonl (one JSON object per image) or csv."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write the records to this file instead of stdout."),
    overlays: Optional[Path] = typer.Option(None, "--overlays", help="Folder for heat-map overlay PNGs (image | anomaly map | mask at the threshold)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
) -> None:
    """Score new images with a saved model: score, decision at the stored threshold, overlays."""
    from vad import artifacts
    from vad.model import AnomalyModel, resolve_device
    from vad.predict import FORMATS, format_records, predict_images, resolve_model_folder
    from vad.progress import info, warn

    if fmt not in FORMATS:
        raise VadError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
    loaded = AnomalyModel.load(resolve_model_folder(model), resolve_device(device))
    result = predict_images(loaded, inputs, overlays)
    for item in result.unmatched:
        warn(f"{item}: no image found there (skipped)")
    if result.skipped:
        warn(f"{len(result.skipped)} unreadable image(s) skipped: " + "; ".join(f"{p} ({r})" for p, r in result.skipped))
    if not result.records:
        raise VadError("no image could be scored: every input was unreadable (see the warnings above)")
    text = format_records(result.records, fmt)
    if output:
        artifacts.atomic_write_text(output, text)
        info(f"{len(result.records)} image(s) scored; records in {output}")
    else:
        typer.echo(text, nl=False)
    if overlays:
        info(f"overlays in {overlays}")


def export_command(
    model: Path = typer.Option(..., "--model", "-m", help="Model folder (runs/<run>/<category>/model), or a run folder with one model."),
    fmt: str = typer.Option("onnx", "--format", "-f", help="Export format (onnx)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Output file (default: <model folder>/model.onnx)."),
    input_size: Optional[str] = typer.Option(None, "--input-size", help="Fixed input HEIGHT,WIDTH of the graph (default: the model's working size: the network's input size, or --image-size / --center-crop / the training images' size with --tile)."),
    check: bool = typer.Option(True, "--check/--no-check", help="Compare onnxruntime with torch on random images (scores within 1e-4)."),
    opset: int = typer.Option(17, "--opset", help="ONNX opset version."),
) -> None:
    """Export a saved model to ONNX: preprocessing + feature source + head (+ upsample, blur)."""
    if fmt.lower() != "onnx":
        raise VadError(f"--format {fmt!r} is not supported: use onnx")
    from vad.export import PARITY_TOLERANCE, check_parity, export_onnx, require_onnx
    from vad.progress import info

    require_onnx()
    import numpy as np

    from vad.model import AnomalyModel
    from vad.predict import resolve_model_folder

    folder = resolve_model_folder(model)
    loaded = AnomalyModel.load(folder, "cpu")
    target = output or folder / "model.onnx"
    description = export_onnx(loaded, target, _parse_size(input_size), opset=opset)
    info(f"ONNX graph written to {target} (description in {target}.json)")
    if check:
        size = description["input"]["shape"][2:]
        rng = np.random.default_rng(0)
        images = [rng.integers(0, 256, (size[0], size[1], 3), dtype=np.uint8) for _ in range(2)]
        difference = check_parity(loaded, target, images, tuple(size))
        if difference > PARITY_TOLERANCE:
            raise VadError(f"the ONNX graph differs from the torch model: largest score difference {difference:.3g} > {PARITY_TOLERANCE}")
        info(f"parity with torch: largest score difference {difference:.2e} (tolerance {PARITY_TOLERANCE})")
    typer.echo(str(target))


def bench_command(
    grid: Path = typer.Option(..., "--grid", "-g", help="YAML grid: detectors, ensembles, backbones, categories + shared run options."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Sweep folder (default runs/bench-<grid name>); rerun to resume."),
) -> None:
    """Sweep a grid of runs (resumable); print one table with accuracy and timings per cell."""
    from vad.bench import run_bench

    folder = output or Path("runs") / f"bench-{grid.stem}"
    folder, results = run_bench(grid, folder)
    typer.echo((folder / "bench.md").read_text(encoding="utf-8"), nl=False)
    failed = [r for r in results if r.status == "failed"]
    typer.echo(f"bench folder: {folder} ({len(results) - len(failed)} cells finished, {len(failed)} failed)")
    if results and len(failed) == len(results):
        raise VadError("every cell of the sweep failed; see the error column and <cell>/error.txt")


def add_commands(app: typer.Typer) -> None:
    """Attach ``predict``, ``export`` and ``bench`` to ``app``."""
    app.command("predict")(predict_command)
    app.command("export")(export_command)
    app.command("bench")(bench_command)
