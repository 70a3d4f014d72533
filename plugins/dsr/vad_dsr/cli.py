"""``vad dsr pretrain-vq``: pretrain DSR's VQ-VAE on a folder of images, once for every category.

The official DSR VQ-VAE is pretrained on ImageNet; the DSR repository ships the weights but not
the script. This follows the authors' VQ pretraining script of 3DSR (github.com/VitjanZ/3DSR,
``train_dada.py``): Adam (2e-4), ``epochs`` (100) of ``steps_per_epoch`` (1000) random batches of
64 images at 256 px, the learning rate x0.1 after 80 % and 90 % of the epochs, convolutions
initialised N(0, 0.02), loss = MSE reconstruction + both commitment losses, EMA codebooks. Images
are read in the networks' BGR order. The file loads with ``--set dsr.vq_weights=FILE`` when the
detector's size options match. Heavy imports stay inside the functions so ``vad --help`` stays fast.
(3DSR's script itself trains a 4-channel depth+RGB model with an L1 reconstruction, the MSE
left as commented-out lines; the EMA quantizer, initialisation and schedule are the same.)

Codebook collapse and the two deviations against it (both off by default, i.e. official): the
official EMA quantizer starts its codes and EMA sums N(0, 1), independently, with zero counts,
while the N(0, 0.02)-initialised encoder's outputs lie near 0 (norm ~0.6 against ~11 for a
code), so the first batch goes to one or a few codes; the first update then divides every other
code's random EMA sum by its Laplace-smoothed count (~1e-5), throwing it ~1e5-1e6 away, and it
only comes back within reach as that sum decays by 0.99 a step (about a thousand steps). A short
run therefore ends with 1-2 codes per codebook (the 200 x 8 images at 256 px run: 1 code in
Q_lo, 2 in Q_hi; the official discrete_model.py quantizer gives the same numbers step for step).
``codebook_init="data"`` starts both codebooks at random encoder outputs of the first batch and
``dead_code_steps`` moves a code that no position used for that many steps to a random encoder
output of the current batch (the usual VQ-VAE remedies: Jukebox, SoundStream). Their measured
effect on a short run is in docs/demo-results.md (DSR section).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, Optional

import typer

from vad.options import option
from vad_dsr.vq_options import VqArchitecture


class PretrainOptions(VqArchitecture):
    """What ``vad dsr pretrain-vq`` takes; its checks and defaults derive from this declaration."""

    image_size: int = option(256, "Image side in pixels (official 256), a multiple of 32.", ge=32, multiple_of=32)
    epochs: int = option(100, "Epochs (authors' 100).", ge=1)
    steps_per_epoch: int = option(1000, "Optimiser steps per epoch (authors' 1000).", ge=1)
    batch_size: int = option(64, "Images per step (authors' 64).", ge=1)
    lr: float = option(2e-4, "Adam learning rate (authors' 0.0002).", gt=0)
    seed: int = option(0, "All randomness (initialisation, image order).")
    codebook_init: Literal["random", "data"] = option(
        "random",
        "random: codes and EMA sums N(0, 1), counts 0 (official; the first EMA update throws every code the first batch left unused out of reach for ~1000 steps, so short runs end on 1-2 codes); "
        "data: both codebooks start at random encoder outputs of the first batch, EMA counts 1 (deviation against collapse).",
    )
    dead_code_steps: int = option(
        0,
        "Restart a code that no position used in this many consecutive steps at a random encoder output of the current batch "
        "(deviation against collapse, e.g. 10 with codebook_init=data); 0: never (official).",
        ge=0,
    )


def pretrain_vq(folder: Any, options: PretrainOptions, device: str = "cpu", progress: Callable[[int, float], None] | None = None) -> tuple[Any, dict[str, Any]]:
    """Train a :class:`vad_dsr.vq.DiscreteLatentModel` on the images of ``folder`` (a
    :class:`vad.distillation.FolderImages` or ``TensorImages``, drawn reshuffled); returns it (eval mode, CPU) and the
    facts of the run. ``progress(step, loss)`` is called after every step."""
    import time

    import torch

    from vad.distillation import Sampler
    from vad_dsr.vq import VQ_GAMMA, VQ_MILESTONES, bgr, init_codebooks_from_data, init_weights, multistep_milestones, vq_pretraining_loss

    o = options
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(o.seed)
        model = o.build_vq()
    generator = torch.Generator().manual_seed(o.seed)
    init_weights(model, generator)
    model.to(device).train()
    quantizers = (model.quantizer_lo, model.quantizer_hi)
    for quantizer in quantizers:
        quantizer.restart_dead_codes(o.dead_code_steps, generator)
    optimizer = torch.optim.Adam(model.parameters(), lr=o.lr)
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, multistep_milestones(VQ_MILESTONES, o.epochs), gamma=VQ_GAMMA)
    sampler = Sampler(len(folder), generator)
    start, losses = time.perf_counter(), []
    for step in range(o.epochs * o.steps_per_epoch):
        images = bgr(folder.load(sampler.take(o.batch_size), o.image_size).to(device))
        if step == 0 and o.codebook_init == "data":
            init_codebooks_from_data(model, images, generator)
        loss, _ = vq_pretraining_loss(model, images)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if (step + 1) % o.steps_per_epoch == 0:
            schedule.step()
        if progress is not None:
            progress(step, losses[-1])
    for quantizer in quantizers:
        quantizer.restart_dead_codes(0, None)
    facts = {**o.to_dict(), "images": len(folder), "seconds": time.perf_counter() - start, "first_loss": losses[0], "last_loss": losses[-1]}
    return model.cpu().eval(), facts



dsr_app = typer.Typer(help="DSR tools (VQ-VAE pretraining).", no_args_is_help=True)


@dsr_app.command("pretrain-vq")
def pretrain(
    images: str = typer.Option(..., "--images", help="Folder of images (searched recursively); official: ImageNet train."),
    output: str = typer.Option(..., "--output", "-o", help="VQ model file to write (.safetensors); use it with --set dsr.vq_weights=FILE."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help=PretrainOptions.help_text("image_size")),
    epochs: Optional[int] = typer.Option(None, "--epochs", help=PretrainOptions.help_text("epochs")),
    steps_per_epoch: Optional[int] = typer.Option(None, "--steps-per-epoch", help=PretrainOptions.help_text("steps_per_epoch")),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help=PretrainOptions.help_text("batch_size")),
    lr: Optional[float] = typer.Option(None, "--lr", help=PretrainOptions.help_text("lr")),
    hidden_channels: Optional[int] = typer.Option(None, "--hidden-channels", help=PretrainOptions.help_text("hidden_channels")),
    residual_channels: Optional[int] = typer.Option(None, "--residual-channels", help=PretrainOptions.help_text("residual_channels")),
    residual_layers: Optional[int] = typer.Option(None, "--residual-layers", help=PretrainOptions.help_text("residual_layers")),
    embedding_dim: Optional[int] = typer.Option(None, "--embedding-dim", help=PretrainOptions.help_text("embedding_dim")),
    codebook_size: Optional[int] = typer.Option(None, "--codebook-size", help=PretrainOptions.help_text("codebook_size")),
    commitment_cost: Optional[float] = typer.Option(None, "--commitment-cost", help=PretrainOptions.help_text("commitment_cost")),
    decay: Optional[float] = typer.Option(None, "--decay", help=PretrainOptions.help_text("decay")),
    seed: Optional[int] = typer.Option(None, "--seed", help=PretrainOptions.help_text("seed")),
    codebook_init: Optional[str] = typer.Option(None, "--codebook-init", help=PretrainOptions.help_text("codebook_init")),
    dead_code_steps: Optional[int] = typer.Option(None, "--dead-code-steps", help=PretrainOptions.help_text("dead_code_steps")),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
) -> None:
    """Pretrain DSR's two-level VQ-VAE on a folder of images and save it as safetensors."""
    from pathlib import Path

    from vad.distillation import FolderImages, TensorImages
    from vad.progress import info, track
    from vad.training import CACHE_BYTES
    from vad_dsr.vq import save_vq

    given = dict(
        image_size=image_size, epochs=epochs, steps_per_epoch=steps_per_epoch, batch_size=batch_size, lr=lr, hidden_channels=hidden_channels,
        residual_channels=residual_channels, residual_layers=residual_layers, embedding_dim=embedding_dim, codebook_size=codebook_size,
        commitment_cost=commitment_cost, decay=decay, seed=seed, codebook_init=codebook_init, dead_code_steps=dead_code_steps,
    )
    chosen = PretrainOptions.parse({k: v for k, v in given.items() if v is not None}, owner="vad dsr pretrain-vq")
    folder = FolderImages(images, "vad dsr pretrain-vq")
    if len(folder) * 3 * chosen.image_size**2 * 4 <= CACHE_BYTES:  # a small folder: decode each image once
        folder = TensorImages(folder.load(range(len(folder)), chosen.image_size))
    steps = chosen.epochs * chosen.steps_per_epoch
    info(f"pretraining DSR's VQ-VAE on {len(folder)} images ({steps} steps of {chosen.batch_size})")
    bar = iter(track(range(steps), "VQ-VAE steps", total=steps))
    model, facts = pretrain_vq(folder, chosen, device, progress=lambda step, loss: next(bar, None))
    next(bar, None)
    save_vq(Path(output), model, facts)
    info(f"VQ model written to {output} ({facts['seconds']:.1f} s, loss {facts['first_loss']:.3g} -> {facts['last_loss']:.3g})", path=output)
