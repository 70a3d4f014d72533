"""The ``vad`` command line (Typer).

Start-up stays fast: this module imports neither torch nor any method; plugin entry modules
are imported to collect their sub-commands, and what they register is imported only when a
command uses it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from vad import __version__, results_cli
from vad.config import DEFAULTS
from vad.errors import USER_ERROR, VadError
from vad.plugins import KINDS, get_registry
from vad.runfolder import RUN_CONFIG

app = typer.Typer(
    name="vad",
    help="Visual anomaly detection for industrial inspection: plugins composed from the command line.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"vad {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or info lines (warnings and errors still print)."),
    json_log: bool = typer.Option(False, "--json-log", help="Progress and info as JSON lines on stderr, for scripts."),
) -> None:
    """vad: train on good parts, flag defective ones."""
    from vad.heap import keep_freed_memory
    from vad.progress import set_log_mode

    keep_freed_memory()  # about halves a CPU backbone's time; VAD_KEEP_HEAP=0 opts out

    if quiet:
        set_log_mode("quiet")
    elif json_log:
        set_log_mode("json")


@app.command("run")
def run_command(
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file of run options; command-line options override it."),
    detector: Optional[list[str]] = typer.Option(None, "--detector", "-d", help=f"Detector name (default {DEFAULTS['detector']}; see `vad list detectors`); repeat for a score-level ensemble."),
    ensemble: Optional[str] = typer.Option(None, "--ensemble", "-e", help="Ensembler: a feature-level one fuses backbones' features, a score-level one fuses detectors' scores (see `vad list ensemblers`)."),
    backbone: Optional[list[str]] = typer.Option(None, "--backbone", "-b", help="Backbone name or family:model, or detector:NAME for a detector's learned features; repeat for ensembles (see `vad list backbones`)."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help=f"Data set plugin (default {DEFAULTS['dataset']})."),
    root: Optional[str] = typer.Option(None, "--root", help="Data set root folder in its official layout."),
    category: Optional[list[str]] = typer.Option(None, "--category", "-c", help="Category to run; repeat; default all."),
    layers: Optional[list[str]] = typer.Option(None, "--layer", help="Backbone layer (name or index); repeat. Default: the stride-8 and stride-16 stages."),
    aggregation: Optional[int] = typer.Option(None, "--aggregation", help="Local neighbourhood aggregation size (odd; 1 = off). Default 3."),
    target_dim: Optional[int] = typer.Option(None, "--target-dim", help="Project patch features to this many channels."),
    weights: Optional[str] = typer.Option(None, "--weights", help="Local backbone weights file (.safetensors or .pth)."),
    no_pretrained: bool = typer.Option(False, "--no-pretrained", help="Random backbone weights (said loudly in the report)."),
    threshold: Optional[str] = typer.Option(None, "--threshold", help=f"Threshold rule fitted on validation data (default {DEFAULTS['threshold']}; see `vad list thresholds`)."),
    metric: Optional[list[str]] = typer.Option(None, "--metric", help="Metric to compute; repeat; default all installed."),
    validation_fraction: Optional[float] = typer.Option(None, "--validation-fraction", help="Share of normal training images the data set holds out as a validation split (default 0: every image trains)."),
    train_count: Optional[int] = typer.Option(None, "--train-count", help="Few-shot: train on K normal training images, a seeded choice (--seed; a larger K keeps the images of a smaller one). Default: all."),
    calibration: Optional[str] = typer.Option(None, "--calibration", help="How thresholds get unseen normal scores: auto (default), leave-one-out, cross-fit or hold-out."),
    image_size: Optional[str] = typer.Option(None, "--image-size", help="Network input HEIGHT[,WIDTH] of every member, for fit and predict (one number: square); default: the backbone's pretrained size (e.g. 224)."),
    resize: Optional[str] = typer.Option(None, "--resize", help="Resize images to HEIGHT[,WIDTH], then --center-crop them (PatchCore paper: --resize 256 --center-crop 224)."),
    center_crop: Optional[str] = typer.Option(None, "--center-crop", help="Centre crop HEIGHT[,WIDTH] after --resize: the network input size."),
    keep_aspect: bool = typer.Option(False, "--keep-aspect", help="--image-size S is the shorter side; the longer follows the training images' aspect ratio (rounded to a multiple of 32)."),
    tile: Optional[int] = typer.Option(None, "--tile", help="Cut each image (at its own resolution, or at --image-size) into SIZE x SIZE tiles that the detector fits and scores; maps are stitched."),
    tile_stride: Optional[int] = typer.Option(None, "--tile-stride", help="Pixels between tiles (default: --tile, no overlap; smaller: overlapping tiles, blended without seams)."),
    roi: Optional[str] = typer.Option(None, "--roi", help="Region of interest: a mask PNG (non-zero = inspected) of the training images' size, for every category (per category or as polygons: roi in the YAML config)."),
    roi_mode: Optional[str] = typer.Option(None, "--roi-mode", help="before: paint outside the ROI black before the detector; after (default): score the anomaly map inside the ROI only."),
    registration: Optional[str] = typer.Option(None, "--registration", help="Align every image to a reference view before scoring: translation, rigid or affine (failures are listed per image)."),
    registration_reference: Optional[str] = typer.Option(None, "--registration-reference", help="The reference image of --registration (default: the first training image)."),
    track: Optional[str] = typer.Option(None, "--track", help="Log the finished run to an experiment tracker: mlflow (config, metrics, timings, report)."),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", help="MLflow tracking URI (default sqlite:///mlflow.db here, artifacts in ./mlruns; or a server, databricks, ...)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Images per batch (default 8)."),
    sigma: Optional[float] = typer.Option(None, "--sigma", help="Gaussian blur of the anomaly maps, in pixels of the network input (default 4; 0: the detector's own maps)."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda or cuda:N (default auto)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed (default 0)."),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Run folder (default runs/<dataset>-<time>, never shared); a folder holding a run is refused unless --overwrite or --resume."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the run in --output (complete or not); only vad run folders are ever replaced."),
    model: Optional[str] = typer.Option(None, "--model", help="Reuse a saved model folder (or a run folder) instead of fitting; it keeps the input geometry it was fitted with."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Leave out unreadable images, and images whose mask is unreadable or of another size, and list them (checked before the fit), instead of stopping."),
    save_maps: bool = typer.Option(False, "--save-maps", help="Also write raw anomaly maps as float32 TIFF (MVTec evaluation layout)."),
    no_report: bool = typer.Option(False, "--no-report", help="Skip the plots, overlays and report.html."),
    set_option: Optional[list[str]] = typer.Option(None, "--set", help=f"Plugin option NAME.KEY=VALUE, e.g. {DEFAULTS['detector']}.seed=1; repeat (`vad list KIND --details` lists every option)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue an interrupted run in this run folder, with its saved configuration (only --device may change)."),
) -> None:
    """Fit and evaluate detectors on one or more categories; writes a run folder."""
    from vad.config import load_config, parse_set

    if resume is not None:
        given = [name for name, value in locals().items() if name not in ("resume", "device", "load_config", "parse_set") and value not in (None, False, [])]
        if given:
            raise VadError(f"--resume takes the configuration saved in {resume}; do not pass other options ({', '.join('--' + g.replace('_', '-') for g in sorted(given))})")
        saved = resume / RUN_CONFIG
        if not saved.is_file():
            raise VadError(f"--resume {resume}: no config.yaml there; give the folder of an earlier `vad run`")
        _run_and_print(load_config(str(saved), {"device": device, "output": str(resume)}), resume=True)
        return

    overrides = {
        "detectors": detector or None,
        "ensemble": ensemble,
        "backbones": backbone or None,
        "dataset": dataset,
        "root": root,
        "categories": category or None,
        "layers": layers or None,
        "aggregation": aggregation,
        "target_dim": target_dim,
        "weights": weights,
        "pretrained": False if no_pretrained else None,
        "threshold": threshold,
        "metrics": metric or None,
        "validation_fraction": validation_fraction,
        "train_count": train_count,
        "calibration": calibration,
        "image_size": image_size,
        "resize": resize,
        "center_crop": center_crop,
        "keep_aspect": True if keep_aspect else None,
        "tile": tile,
        "tile_stride": tile_stride,
        "roi": roi,
        "roi_mode": roi_mode,
        "registration": registration,
        "registration_reference": registration_reference,
        "track": track,
        "tracking_uri": tracking_uri,
        "batch_size": batch_size,
        "sigma": sigma,
        "device": device,
        "seed": seed,
        "output": output,
        "model": model,
        "skip_bad": True if skip_bad else None,
        "save_maps": True if save_maps else None,
        "report": False if no_report else None,
        "options": parse_set(set_option or []) or None,
    }
    _run_and_print(load_config(str(config) if config else None, overrides), overwrite=overwrite)


def _run_and_print(config, resume: bool = False, overwrite: bool = False) -> None:
    """Run, print the results table; Ctrl-C says what is left and how to resume (exit 130)."""
    from vad.pipeline import RunInterrupted, run
    from vad.results import table_with_mean, to_markdown

    try:
        folder, results = run(config, resume=resume, overwrite=overwrite)
    except RunInterrupted as interrupted:
        typer.secho(str(interrupted), fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(130) from interrupted

    columns, rows = table_with_mean({r.category: r.metrics for r in results})
    typer.echo(to_markdown(columns, rows))
    typer.echo(f"run folder: {folder}")


@app.command("plugins")
def plugins_command(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List installed plugins: distribution, version, what each registers, and load errors."""
    registry = get_registry()
    infos = registry.info()
    if as_json:
        typer.echo(json.dumps([info.to_dict() for info in infos], indent=2))
        return
    if not infos:
        typer.echo("no vad plugins are installed")
        return
    for info in infos:
        header = f"{info.name} ({info.distribution} {info.version or ''})".replace(" )", ")")
        typer.echo(header)
        if info.error:
            typer.echo(f"  FAILED: {info.error}")
        for kind, names in info.registers.items():
            typer.echo(f"  {kind}: {', '.join(names)}")


@app.command("list")
def list_command(
    kind: str = typer.Argument(..., help=f"One of: {', '.join(KINDS)}."),
    details: bool = typer.Option(False, "--details", help="Every option (type, default, what it allows, description) and more facts (backbones: preprocessing, layers, weights)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """List what the installed plugins register of one kind."""
    registry = get_registry()
    if kind not in KINDS:
        from vad.errors import UnknownNameError

        raise UnknownNameError("kind", kind, KINDS)
    entries = registry.entries(kind)
    rows = []
    for name, entry in sorted(entries.items()):
        row = {"name": name, "summary": entry.summary, "plugin": entry.plugin.name}
        if details:
            row.update(_details(kind, name, entry))
        rows.append(row)
    if as_json:
        typer.echo(json.dumps(rows, indent=2, default=str))
        return
    if not rows:
        typer.echo(f"no {kind} installed")
    for row in rows:
        typer.echo(f"{row['name']:<28} {row['summary']}  [{row['plugin']}]")
        for option in row.get("options", []):
            typer.echo(f"    --set {row['name']}.{option['name']}=…  default {json.dumps(option['default'])}; {option['allowed']}")
            typer.echo(f"        {option['description']}")
        for key, value in row.items():
            if key not in ("name", "summary", "plugin", "options"):
                typer.echo(f"    {key}: {json.dumps(value, default=str)}")


def _details(kind: str, name: str, entry) -> dict:
    from vad.options import describe_options

    cls = entry.load()
    facts: dict = {"options": describe_options(cls.Options)}
    if kind == "detectors":
        facts.update(input=cls.input, produces_maps=cls.produces_maps)
    if kind == "ensemblers":
        from vad.contracts import ScoreEnsembler

        facts["level"] = "score" if issubclass(cls, ScoreEnsembler) else "feature"
    if kind != "backbones":
        return facts
    from vad.build import create_backbone

    facts["weights_offline"] = cls.weights_source(name)
    try:
        # built without weights only to read its layers and preprocessing: its "weights" fact
        # would describe that throw-away instance, so it is left out
        described = create_backbone(name, pretrained=False).describe()
        described.pop("weights", None)
        facts.update(described)
    except (VadError, TypeError, ValueError, RuntimeError) as error:  # a family entry needs a model name
        facts["note"] = str(error)
    return facts


@app.command("doctor")
def doctor_command() -> None:
    """Check the installation: Python, torch, devices, faiss, plugins, offline backbone weights."""
    import platform

    typer.echo(f"vad {__version__} on Python {platform.python_version()} ({sys.executable})")
    try:
        import torch

        typer.echo(f"torch {torch.__version__}; CUDA available: {torch.cuda.is_available()}")
        for index in range(torch.cuda.device_count()):
            typer.echo(f"  cuda:{index} {torch.cuda.get_device_name(index)}")
        threads = torch.get_num_threads()
        typer.echo(f"  CPU threads: {threads}")
    except ImportError as error:
        typer.echo(f"torch: NOT importable ({error})")
    from vad.heap import keep_freed_memory

    kept = "yes" if keep_freed_memory() else "no (VAD_KEEP_HEAP=0, or not glibc)"
    typer.echo(f"freed memory kept in the heap (faster CPU forwards): {kept}")
    try:
        import faiss

        typer.echo(f"faiss {faiss.__version__} (GPUs: {faiss.get_num_gpus() if hasattr(faiss, 'get_num_gpus') else 0})")
    except ImportError:
        typer.echo("faiss: not installed (PatchCore falls back to exact torch search)")
    registry = get_registry()
    infos = registry.info()
    typer.echo(f"plugins: {len([i for i in infos if not i.error])} loaded, {len(registry.failures)} failed")
    for failure in registry.failures:
        typer.echo(f"  FAILED {failure.name} ({failure.distribution}): {failure.error}")
    try:
        registry.check()
    except VadError as error:
        typer.echo(f"  CONFLICT: {error}")
    backbones = registry.entries("backbones")
    if backbones:
        typer.echo("backbone weights available offline:")
    for name, entry in sorted(backbones.items()):
        try:
            source = entry.load().weights_source(name)
        except VadError as error:
            source = f"plugin failed to load: {error}"
        typer.echo(f"  {name:<26} {source or 'none offline (pass --weights FILE, or the hub when online)'}")


results_cli.add_commands(app)


def _register_plugin_commands() -> None:
    registry = get_registry()
    for impl in registry.pm.hook.vad_register_commands.get_hookimpls():
        try:
            impl.function(app=app)
        except Exception as error:  # a broken plugin must not break the CLI
            from vad.progress import warn

            warn(f"plugin {impl.plugin_name!r} failed to add its commands: {error}")


_commands_registered = False
#: Click's UsageError (vendored by newer typer, imported by older): the base of the BadParameter typer exports.
UsageError = typer.BadParameter.__base__


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: plugin commands, then clear errors instead of tracebacks."""
    global _commands_registered
    if not _commands_registered:
        _register_plugin_commands()
        _commands_registered = True
    try:
        code = app(args=argv, prog_name="vad", standalone_mode=False)
    except UsageError as error:  # a malformed command line: one line and the help to read
        hint = f" (see `{error.ctx.command_path} --help`)" if error.ctx is not None else ""
        typer.secho(f"error: {error.format_message()}{hint}", fg=typer.colors.RED, err=True)
        sys.exit(USER_ERROR)
    except typer.Abort:  # Ctrl-C outside a run
        typer.secho("interrupted", fg=typer.colors.YELLOW, err=True)
        sys.exit(130)
    except VadError as error:
        typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
        sys.exit(USER_ERROR)
    except OSError as error:  # the file system said no: permissions, a full disk, a path that vanished
        where = f": {error.filename}" if error.filename else ""
        typer.secho(f"error: {error.strerror or error}{where}", fg=typer.colors.RED, err=True)
        sys.exit(USER_ERROR)
    sys.exit(code if isinstance(code, int) else 0)

if __name__ == "__main__":
    main()
