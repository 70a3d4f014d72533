"""``vad predict``, ``vad export``, ``vad bench`` and ``vad serve``: using and comparing fitted models.

``add_commands(app)`` attaches the four commands to the ``vad`` Typer app. Heavy imports
(torch, onnx) happen inside the commands, so ``vad --help`` stays fast. ``vad predict`` exits
with :data:`SOME_FAILED` (3) when some inputs could not be scored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from vad.errors import SOME_FAILED, VadError


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
    runtime: str = typer.Option("torch", "--runtime", help="torch (the model itself), onnx or openvino (its exported graph, see vad export)."),
    graph: Optional[Path] = typer.Option(None, "--graph", help="The exported graph for --runtime onnx|openvino (default: model.onnx / model.xml in the model folder)."),
    engine: str = typer.Option("local", "--engine", help="local, or ray: chunks of images scored by --workers Ray actors, one model load each."),
    workers: int = typer.Option(2, "--workers", help="Ray actors for --engine ray."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster to join (default: a local instance for this call)."),
) -> None:
    """Score new images with a saved model: score, decision at the stored threshold, overlays.

    An input that cannot be scored (unreadable image, no match) gets a row with an 'error' and
    empty score. Exit codes: 0 all scored; 3 some inputs failed (their rows say why); 2 error
    (no image could be scored, bad model or options).
    """
    from vad import artifacts
    from vad.model import AnomalyModel, resolve_device
    from vad.predict import FORMATS, format_records, predict_images, resolve_model_folder, threshold_warnings
    from vad.progress import info, warn

    if fmt not in FORMATS:
        raise VadError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
    runtime = runtime.lower()
    if runtime not in ("torch", "onnx", "openvino"):
        raise VadError(f"--runtime {runtime!r}: use torch, onnx or openvino")
    if engine not in ("local", "ray"):
        raise VadError(f"--engine {engine!r}: use local or ray")
    if engine == "ray" and (runtime != "torch" or overlays is not None):
        raise VadError("--engine ray scores with the torch model and writes no overlays; drop --runtime/--overlays or use --engine local")
    if graph is not None and runtime == "torch":
        raise VadError("--graph names an exported graph: use it with --runtime onnx or openvino")
    folder = resolve_model_folder(model)
    session = None
    if runtime != "torch":
        from vad.export import GraphSession

        session = GraphSession(graph or folder / ("model.onnx" if runtime == "onnx" else "model.xml"))
    loaded = AnomalyModel.load(folder, resolve_device(device) if session is None else "cpu")
    for message in threshold_warnings(loaded, folder, overlays is not None):
        warn(message)
    if engine == "ray":
        from vad.distributed import predict_ray
        from vad.predict import PredictResult, collect_images, failure_record

        paths, unmatched = collect_images(inputs)
        if not paths:
            raise VadError("no image found for " + ", ".join(repr(i) for i in inputs))
        records = predict_ray(folder, paths, workers, address=address)
        records += [failure_record(item, f"{item}: no image found there", loaded) for item in unmatched]
        result = PredictResult(records)
    else:
        result = predict_images(loaded, inputs, overlays, session)
    text = format_records(result.records, fmt)
    scored = len(result.records) - len(result.failed)
    if output:
        artifacts.atomic_write_text(output, text)
        info(f"{scored} image(s) scored; records in {output}")
    else:
        typer.echo(text, nl=False)
    if overlays:
        info(f"overlays in {overlays}")
    if result.failed:
        warn(f"{len(result.failed)} input(s) could not be scored (rows with an error): " + "; ".join(r["error"] for r in result.failed))
        raise typer.Exit(SOME_FAILED)


def export_command(
    model: Path = typer.Option(..., "--model", "-m", help="Model folder (runs/<run>/<category>/model), or a run folder with one model."),
    fmt: str = typer.Option("onnx", "--format", "-f", help="onnx, or openvino (OpenVINO IR converted from the ONNX graph)."),
    precision: str = typer.Option("fp32", "--precision", help="OpenVINO: fp32; fp16 (weights half the size, computed in float32 on CPU); int8 (the feature source's convolutions quantised, calibrated on normal images)."),
    calibration: Optional[list[str]] = typer.Option(None, "--calibration", help="Normal images to calibrate --precision int8 (files, folders or globs; at most 300 used). Default: the training images of the run the model comes from."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Output file (default: <model folder>/model.onnx, or model.xml for openvino)."),
    input_size: Optional[str] = typer.Option(None, "--input-size", help="Pin the graph's input to HEIGHT,WIDTH (static shapes, for runtimes that need them); default: images of any size, resized inside the graph as vad does."),
    check: bool = typer.Option(True, "--check/--no-check", help="Compare onnxruntime with torch on random images of several sizes (scores within 1e-4)."),
    opset: int = typer.Option(17, "--opset", help="ONNX opset version."),
) -> None:
    """Export a saved model to ONNX: resize + normalisation + feature source + head (+ upsample, blur).

    The graph takes float32 RGB images in [0, 1] (decoded image / 255), channels first, of any
    size; the exact preprocessing and what is left to the caller are in <file>.json and the ONNX metadata.
    """
    fmt = fmt.lower()
    if fmt not in ("onnx", "openvino"):
        raise VadError(f"--format {fmt!r} is not supported: use onnx or openvino")
    from vad.export import PARITY_TOLERANCE, check_parity, export_onnx, export_openvino, parity_images, require_onnx, require_openvino
    from vad.progress import info

    require_onnx()
    if fmt == "openvino":
        require_openvino()
    elif precision != "fp32":
        raise VadError("--precision applies to --format openvino only (the ONNX graph is float32)")
    if calibration and precision != "int8":
        raise VadError("--calibration calibrates --precision int8 only")
    from vad.model import AnomalyModel
    from vad.predict import resolve_model_folder

    folder = resolve_model_folder(model)
    loaded = AnomalyModel.load(folder, "cpu")
    target = output or folder / ("model.onnx" if fmt == "onnx" else "model.xml")
    pinned = _parse_size(input_size)
    if fmt == "onnx":
        description = export_onnx(loaded, target, pinned, opset=opset)
    else:
        images = _calibration_images(folder, calibration or []) if precision == "int8" else None
        description = export_openvino(loaded, target, precision, pinned, opset=opset, calibration=images)
    info(f"{'ONNX graph' if fmt == 'onnx' else f'OpenVINO model ({precision})'} written to {target} (description in {target}.json)")
    graph_input = description["input"]
    info(f"input {graph_input['name']!r}: {graph_input['dtype']} {graph_input['shape']}, {graph_input['range']}; {graph_input['sizes']}")
    if "aspect_ratio" in graph_input:
        info(f"aspect ratio: {graph_input['aspect_ratio']}")
    info("inside the graph: " + "; ".join(description["inside_graph"]))
    if "int8" in description:
        info(f"int8: {description['int8']}")
    info("left to the caller: " + "; ".join(description["outside_graph"]))
    if check:
        difference = check_parity(loaded, target, parity_images(loaded, pinned))
        if precision != "fp32":  # fp16 weights and int8 cannot meet the float32 tolerance: say what they give
            info(f"{precision}: largest score difference to torch {difference:.2e} (float32 graphs stay within {PARITY_TOLERANCE})")
        elif difference > PARITY_TOLERANCE:
            raise VadError(f"the exported graph differs from the torch model: largest score difference {difference:.3g} > {PARITY_TOLERANCE}")
        else:
            info(f"parity with torch: largest score difference {difference:.2e} (tolerance {PARITY_TOLERANCE})")
    typer.echo(str(target))


def _calibration_images(model_folder: Path, inputs: list[str]) -> list:
    """RGB images for INT8 calibration: the files, folders or globs given, or else the training
    images of the run the model comes from (the category's training split, as the run folder's
    ``config.yaml`` describes it)."""
    from vad.export import INT8_CALIBRATION_LIMIT
    from vad.images import read_rgb
    from vad.predict import collect_images

    if inputs:
        paths, unmatched = collect_images(inputs)
        if unmatched:
            raise VadError(f"--calibration {unmatched[0]!r} matched no image")
        return [read_rgb(path) for path in paths[:INT8_CALIBRATION_LIMIT]]
    from vad.build import create_dataset
    from vad.config import load_config
    from vad.plugins import get_registry
    from vad.runfolder import RUN_CONFIG

    config_file = model_folder.parent.parent / RUN_CONFIG
    if not config_file.is_file():
        raise VadError(f"--precision int8 needs normal images to calibrate on: {model_folder} is not inside a run folder (no {config_file}); pass --calibration with its training images")
    config = load_config(str(config_file), {})
    train = create_dataset(config, get_registry()).load(model_folder.parent.name).train
    if not train:
        raise VadError(f"the run's data set has no training images for {model_folder.parent.name!r} any more; pass --calibration")
    return [sample.load_image() for sample in train[:INT8_CALIBRATION_LIMIT]]


def bench_command(
    grid: Path = typer.Option(..., "--grid", "-g", help="YAML grid: detectors, ensembles, backbones, categories + shared run options."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Sweep folder (default runs/bench-<grid name>); rerun to resume."),
    engine: str = typer.Option("local", "--engine", help="local (cells one after another) or ray (cells as Ray tasks, in parallel)."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster to join (auto, ray://host:10001); default: a local instance for this sweep."),
    num_cpus: Optional[int] = typer.Option(None, "--num-cpus", help="CPUs of the local Ray instance (default: all); each cell takes one."),
) -> None:
    """Sweep a grid of runs (resumable); print one table with accuracy and timings per cell."""
    from vad.bench import run_bench

    folder = output or Path("runs") / f"bench-{grid.stem}"
    folder, results = run_bench(grid, folder, engine=engine, address=address, num_cpus=num_cpus)
    typer.echo((folder / "bench.md").read_text(encoding="utf-8"), nl=False)
    failed = [r for r in results if r.status == "failed"]
    typer.echo(f"bench folder: {folder} ({len(results) - len(failed)} cells finished, {len(failed)} failed)")
    if results and len(failed) == len(results):
        raise VadError("every cell of the sweep failed; see the error column and <cell>/error.txt")
    if failed:
        typer.secho(f"{len(failed)} cell(s) failed (see the error column and <cell>/error.txt); rerun the command to retry them", fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(SOME_FAILED)


def serve_command(
    model: Path = typer.Option(..., "--model", "-m", help="Model folder (runs/<run>/<category>/model), or a run folder with one model."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, "--port", help="TCP port."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    max_batch: int = typer.Option(8, "--max-batch", help="Images of concurrent requests scored together, at most."),
    max_wait_ms: float = typer.Option(5.0, "--max-wait-ms", help="How long the first waiting image waits for others to batch with."),
    max_bytes: int = typer.Option(20_000_000, "--max-bytes", help="Largest file accepted (413 above)."),
    max_pixels: int = typer.Option(50_000_000, "--max-pixels", help="Largest image accepted in pixels (413 above)."),
) -> None:
    """Serve a saved model over HTTP: POST /predict (multipart 'images'; ?maps=true), GET /health, GET /model."""
    from vad.serve import serve

    serve(str(model), host, port, device, max_batch=max_batch, max_wait_ms=max_wait_ms, max_bytes=max_bytes, max_pixels=max_pixels)


def add_commands(app: typer.Typer) -> None:
    """Attach ``predict``, ``export``, ``bench`` and ``serve`` to ``app``."""
    app.command("predict")(predict_command)
    app.command("export")(export_command)
    app.command("bench")(bench_command)
    app.command("serve")(serve_command)
