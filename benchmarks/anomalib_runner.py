#!/usr/bin/env python
"""The anomalib side of ``benchmarks/anomalib_compare.py``; runs in anomalib's own virtual
environment (never vad's), prints one JSON line.

    ANOMALIB_PYTHON benchmarks/anomalib_runner.py --model stfpm --root DATA --category brick \\
        --backbone resnet18 --image-size 224 --epochs 10 --batch-size 32

Weights: ``HF_HOME`` points at a cache that ``anomalib_compare.py`` filled in the layout timm
reads offline, so anomalib's "pretrained" backbone is exactly the state dict vad loads.
Training time per epoch (the mean) is measured by a callback around the training epochs only (Lightning's
validation passes are not counted). Metrics: anomalib's own evaluator on the test split.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _torchvision_shim() -> None:
    """The registry's torchvision is a CUDA build; with the CPU torch its two operator schemas
    are missing (the same fix as vad_timm.compat, repeated here: this venv has no vad)."""
    import torch

    try:
        import torchvision  # noqa: F401
    except RuntimeError:
        import sys

        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        global _LIBRARY
        _LIBRARY = torch.library.Library("torchvision", "DEF")
        for schema in ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor", "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"):
            _LIBRARY.define(schema)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, choices=["stfpm", "reverse-distillation"])
    parser.add_argument("--root", required=True)
    parser.add_argument("--category", required=True)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--layers", nargs="+", default=["layer1", "layer2", "layer3"])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    _torchvision_shim()
    from lightning.pytorch import Callback, seed_everything

    from anomalib.data import MVTecAD
    from anomalib.engine import Engine
    from anomalib.models import ReverseDistillation, Stfpm

    seed_everything(args.seed)
    cls = Stfpm if args.model == "stfpm" else ReverseDistillation
    model = cls(backbone=args.backbone, layers=args.layers, pre_processor=cls.configure_pre_processor(image_size=(args.image_size, args.image_size)), visualizer=False)

    class EpochTimer(Callback):
        def __init__(self) -> None:
            self.seconds: list[float] = []

        def on_train_epoch_start(self, trainer, module) -> None:
            self.start = time.perf_counter()

        def on_train_epoch_end(self, trainer, module) -> None:
            self.seconds.append(time.perf_counter() - self.start)

    timer = EpochTimer()
    data = MVTecAD(root=args.root, category=args.category, train_batch_size=args.batch_size, eval_batch_size=8, num_workers=0)
    engine = Engine(max_epochs=args.epochs, accelerator="cpu", devices=1, callbacks=[timer], logger=False, enable_progress_bar=False, default_root_dir=os.environ.get("ANOMALIB_RESULTS", "results"))
    engine.fit(model=model, datamodule=data)
    tested = engine.test(model=model, datamodule=data, verbose=False)[0]
    seconds = timer.seconds
    print(json.dumps({
        "image_auroc": float(tested.get("image_AUROC", float("nan"))),
        "pixel_auroc": float(tested.get("pixel_AUROC", float("nan"))),
        "epoch_s": sum(seconds) / len(seconds) if seconds else None,
        "epochs": len(seconds),
    }))


if __name__ == "__main__":
    main()
