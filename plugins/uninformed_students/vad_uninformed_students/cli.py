"""``vad uninformed-students distill``: distil patch teachers from a vad backbone on a folder of images.

Heavy imports stay inside the command so ``vad --help`` stays fast.
"""

from __future__ import annotations

from typing import Optional

import typer

from vad.options import Options, option

#: Table 5.1's patch sizes (kept here so the command's declaration does not import torch).
PATCH_SIZES = (17, 33, 65)


class DistillOptions(Options):
    """What ``vad uninformed-students distill`` takes; its checks and defaults derive from this declaration."""

    patch_sizes: list[int] = option(list(PATCH_SIZES), "Receptive fields to distil a teacher for, one file for all (thesis 17, 33, 65).", choices=PATCH_SIZES)
    steps: int = option(50000, "Optimiser steps per teacher (thesis 50,000).", ge=1)
    batch_size: int = option(64, "Patches per step (thesis 64).", ge=2)
    image_size: int = option(256, "Side the images are loaded at before patches are cut at zooms of 4p-16p px (thesis: ImageNet images as they are).", ge=32)
    backbone_input: int = option(64, "Side each patch is resized to for the backbone (thesis: unstated).", ge=32)
    seed: int = option(0, "All randomness.")

    def check(self) -> None:
        if not self.patch_sizes:
            raise self.invalid("patch_sizes", f"at least one of {list(PATCH_SIZES)}")
        if len(set(self.patch_sizes)) != len(self.patch_sizes):
            raise self.invalid("patch_sizes", "a list without repeats")



uninformed_students_app = typer.Typer(help="Uninformed Students tools (patch-teacher distillation).", no_args_is_help=True)


@uninformed_students_app.command("distill")
def distill(
    images: str = typer.Option(..., "--images", help="Folder of images (searched recursively); thesis: ImageNet."),
    output: str = typer.Option(..., "--output", "-o", help="Teacher file to write (.safetensors); use it with --set uninformed-students.teacher_weights=FILE."),
    patch_size: Optional[list[int]] = typer.Option(None, "--patch-size", "-p", help=DistillOptions.help_text("patch_sizes") + " Repeat for several."),
    backbone: str = typer.Option("tf_efficientnet_lite0", "--backbone", help="vad backbone whose global-average-pooled deepest features the teachers regress (thesis resnet18)."),
    weights: Optional[str] = typer.Option(None, "--weights", help="Local weights file for the backbone."),
    steps: Optional[int] = typer.Option(None, "--steps", help=DistillOptions.help_text("steps")),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help=DistillOptions.help_text("batch_size")),
    image_size: Optional[int] = typer.Option(None, "--image-size", help=DistillOptions.help_text("image_size")),
    backbone_input: Optional[int] = typer.Option(None, "--backbone-input", help=DistillOptions.help_text("backbone_input")),
    seed: Optional[int] = typer.Option(None, "--seed", help=DistillOptions.help_text("seed")),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
) -> None:
    """Distil one patch teacher per patch size (knowledge distillation + compactness) and save them in one safetensors file."""
    from pathlib import Path

    from vad.distillation import FolderImages
    from vad.progress import info, track
    from vad_uninformed_students.teacher import distill_teacher, pooled_feature_extractor, save_teachers

    given = dict(patch_sizes=patch_size or None, steps=steps, batch_size=batch_size, image_size=image_size, backbone_input=backbone_input, seed=seed)
    chosen = DistillOptions.parse({k: v for k, v in given.items() if v is not None}, owner="vad uninformed-students distill")
    folder = FolderImages(images, "vad uninformed-students distill")
    target = pooled_feature_extractor(backbone, weights, device=device)
    sizes = list(chosen.patch_sizes)
    info(f"distilling patch teachers p={sizes} from {backbone} on {len(folder)} images ({chosen.steps} steps of {chosen.batch_size} patches each)")
    total = chosen.steps * len(sizes)
    bar = iter(track(range(total), "distillation steps", total=total))
    teachers, facts = {}, {}
    for p in sizes:
        teachers[p], facts[p] = distill_teacher(
            p, folder, target, steps=chosen.steps, batch_size=chosen.batch_size, image_size=chosen.image_size,
            backbone_input=chosen.backbone_input, seed=chosen.seed, device=device, progress=lambda step, loss: next(bar, None),
        )
    next(bar, None)
    save_teachers(Path(output), teachers, facts, {"backbone": backbone})
    seconds = sum(f["seconds"] for f in facts.values())
    losses = ", ".join(f"p={p} {facts[p]['first_loss']:.3g} -> {facts[p]['last_loss']:.3g}" for p in sizes)
    info(f"teachers written to {output} ({seconds:.1f} s; loss {losses})", path=output, seconds=seconds)
