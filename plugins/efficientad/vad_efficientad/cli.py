"""``vad efficientad distill``: distil a PDN teacher from a vad backbone on a folder of images.

Heavy imports stay inside the command so ``vad --help`` stays fast.
"""

from __future__ import annotations

from typing import Optional

import typer

efficientad_app = typer.Typer(help="EfficientAD tools (teacher distillation).", no_args_is_help=True)


@efficientad_app.command("distill")
def distill(
    images: str = typer.Option(..., "--images", help="Folder of images (searched recursively); official: ImageNet train."),
    output: str = typer.Option(..., "--output", "-o", help="Teacher file to write (.safetensors); use it with --set efficientad.teacher_weights=FILE."),
    backbone: str = typer.Option("tf_efficientnet_lite0", "--backbone", help="vad backbone whose stride-8/16 features the teacher regresses (official wide_resnet101_2)."),
    weights: Optional[str] = typer.Option(None, "--weights", help="Local weights file for the backbone."),
    model_size: str = typer.Option("small", "--model-size", help="small or medium PDN."),
    image_size: int = typer.Option(256, "--image-size", help="PDN input side (official 256); the backbone sees twice that."),
    steps: int = typer.Option(60000, "--steps", help="Optimiser steps (official 60,000)."),
    batch_size: int = typer.Option(16, "--batch-size", help="Images per step (official 16)."),
    normalization_images: int = typer.Option(10000, "--normalization-images", help="Images for the target mean/std (official 10,000)."),
    seed: int = typer.Option(0, "--seed", help="All randomness."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
) -> None:
    """Train a PDN teacher to regress a backbone's features and save it as safetensors."""
    from pathlib import Path

    from vad.errors import VadError
    from vad.progress import info, track
    from vad_efficientad.distill import FolderImages, distill_teacher, feature_extractor, save_teacher

    if model_size not in ("small", "medium"):
        raise VadError(f"--model-size must be small or medium, got {model_size!r}")
    if image_size < 64 or image_size % 32:
        raise VadError(f"--image-size must be a multiple of 32 of at least 64, got {image_size}")
    if steps < 1 or batch_size < 1 or normalization_images < 1:
        raise VadError("--steps, --batch-size and --normalization-images must be at least 1")
    folder = FolderImages(images)
    extractor = feature_extractor(backbone, weights, device=device)
    info(f"distilling a PDN-{model_size} teacher from {backbone} on {len(folder)} images ({steps} steps of {batch_size})")
    bar = iter(track(range(steps), "distillation steps", total=steps))

    def progress(step: int, loss: float) -> None:
        next(bar, None)

    network, facts = distill_teacher(
        model_size, folder, extractor, image_size=image_size, steps=steps, batch_size=batch_size,
        normalization_images=normalization_images, seed=seed, device=device, progress=progress,
    )
    next(bar, None)
    save_teacher(Path(output), network, {**facts, "backbone": backbone})
    info(f"teacher written to {output} ({facts['seconds']:.1f} s, loss {facts['first_loss']:.3g} -> {facts['last_loss']:.3g})", path=output, **facts)
