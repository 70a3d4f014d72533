"""``vad efficientad distill``: distil a PDN teacher from a vad backbone on a folder of images.

Heavy imports stay inside the command so ``vad --help`` stays fast.
"""

from __future__ import annotations

from typing import Literal, Optional

import typer

from vad.options import Options, option


class DistillOptions(Options):
    """What ``vad efficientad distill`` takes; its checks and defaults derive from this declaration."""

    model_size: Literal["small", "medium"] = option("small", "small or medium PDN.")
    image_size: int = option(256, "PDN input side (official 256); the backbone sees twice that.", ge=64, multiple_of=32)
    steps: int = option(60000, "Optimiser steps (official 60,000).", ge=1)
    batch_size: int = option(16, "Images per step (official 16).", ge=1)
    normalization_images: int = option(10000, "Images for the target mean/std (official 10,000).", ge=1)
    seed: int = option(0, "All randomness.")



efficientad_app = typer.Typer(help="EfficientAD tools (teacher distillation).", no_args_is_help=True)


@efficientad_app.command("distill")
def distill(
    images: str = typer.Option(..., "--images", help="Folder of images (searched recursively); official: ImageNet train."),
    output: str = typer.Option(..., "--output", "-o", help="Teacher file to write (.safetensors); use it with --set efficientad.teacher_weights=FILE."),
    backbone: str = typer.Option("tf_efficientnet_lite0", "--backbone", help="vad backbone whose stride-8/16 features the teacher regresses (official wide_resnet101_2)."),
    weights: Optional[str] = typer.Option(None, "--weights", help="Local weights file for the backbone."),
    model_size: Optional[str] = typer.Option(None, "--model-size", help=DistillOptions.help_text("model_size")),
    image_size: Optional[int] = typer.Option(None, "--image-size", help=DistillOptions.help_text("image_size")),
    steps: Optional[int] = typer.Option(None, "--steps", help=DistillOptions.help_text("steps")),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help=DistillOptions.help_text("batch_size")),
    normalization_images: Optional[int] = typer.Option(None, "--normalization-images", help=DistillOptions.help_text("normalization_images")),
    seed: Optional[int] = typer.Option(None, "--seed", help=DistillOptions.help_text("seed")),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
) -> None:
    """Train a PDN teacher to regress a backbone's features and save it as safetensors."""
    from pathlib import Path

    from vad.progress import info, track
    from vad_efficientad.distill import FolderImages, distill_teacher, feature_extractor, save_teacher

    given = dict(model_size=model_size, image_size=image_size, steps=steps, batch_size=batch_size, normalization_images=normalization_images, seed=seed)
    chosen = DistillOptions.parse({k: v for k, v in given.items() if v is not None}, owner="vad efficientad distill")
    model_size, image_size, steps, batch_size = chosen.model_size, chosen.image_size, chosen.steps, chosen.batch_size
    folder = FolderImages(images, "vad efficientad distill")
    extractor = feature_extractor(backbone, weights, device=device)
    info(f"distilling a PDN-{model_size} teacher from {backbone} on {len(folder)} images ({steps} steps of {batch_size})")
    bar = iter(track(range(steps), "distillation steps", total=steps))

    def progress(step: int, loss: float) -> None:
        next(bar, None)

    network, facts = distill_teacher(
        model_size, folder, extractor, image_size=image_size, steps=steps, batch_size=batch_size,
        normalization_images=chosen.normalization_images, seed=chosen.seed, device=device, progress=progress,
    )
    next(bar, None)
    save_teacher(Path(output), network, {**facts, "backbone": backbone})
    info(f"teacher written to {output} ({facts['seconds']:.1f} s, loss {facts['first_loss']:.3g} -> {facts['last_loss']:.3g})", path=output, **facts)
