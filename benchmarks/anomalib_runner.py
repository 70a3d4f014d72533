#!/usr/bin/env python
"""The anomalib side of ``benchmarks/anomalib_compare.py``; runs in anomalib's own virtual
environment (never vad's), prints one JSON line.

    ANOMALIB_PYTHON benchmarks/anomalib_runner.py --model stfpm --root DATA --category brick \\
        --backbone resnet18 --image-size 224 --epochs 10 --batch-size 32
    ANOMALIB_PYTHON benchmarks/anomalib_runner.py --model efficientad --root DATA --category brick \\
        --teacher TEACHER.safetensors --image-size 256 --epochs 1 --batch-size 1
    ANOMALIB_PYTHON benchmarks/anomalib_runner.py --model ganomaly --root DATA --category brick \\
        --image-size 32 --epochs 15 --batch-size 64
    ANOMALIB_PYTHON benchmarks/anomalib_runner.py --model dsr --root DATA --category brick \\
        --vq VQ.safetensors --image-size 256 --epochs 3 --upsampling-epochs 1 --batch-size 8

Weights: ``HF_HOME`` points at a cache that ``anomalib_compare.py`` filled in the layout timm
reads offline, so anomalib's "pretrained" backbone is exactly the state dict vad loads.
Training time per epoch (the mean) is measured by a callback around the training epochs, less
the validation passes that Lightning runs inside them (before ``on_train_epoch_end``).
Metrics: anomalib's own evaluator on the test split, as anomalib reports them (scores and maps
min-max normalised around its adaptive threshold and clamped to [0, 1], which can tie values),
and ``raw_*``: the AUROC of the model's own scores and maps (normalisation off), computed here
over the whole test split at once. (anomalib's evaluator cannot be used for raw values: its
torchmetrics AUROC applies a sigmoid to every *batch* that holds a value outside [0, 1], and
leaves the other batches as they are, which mixes two scales; on gravel, EfficientAD's raw image
scores gave 0.448 that way and 0.717 exactly.) ``--checkpoint FILE`` re-scores a trained
checkpoint (``.../weights/lightning/model.ckpt``) instead of training.

EfficientAD (``--model efficientad``, ``anomalib.models.EfficientAd``), set up like the official
code (github.com/nelson1425/EfficientAD) and vad's detector wherever anomalib lets it be:

* Teacher: ``--teacher FILE`` (a ``vad efficientad distill`` safetensors file or the official
  ``teacher_small.pth``, keys ``0.weight`` ... ``8.bias``) is renamed to anomalib's keys
  (``conv1`` ... ``conv4``) and saved with ``torch.save`` as
  ``$XDG_CACHE_HOME/anomalib/pre_trained/efficientad_pretrained_weights/pretrained_teacher_small.pth``
  (anomalib 2.7 reads its teacher from the platform cache, ``platformdirs``; ``XDG_CACHE_HOME`` is
  pointed into the results folder), so the folder exists and anomalib downloads nothing; after
  training the teacher is checked to equal the file.
* Penalty: anomalib always adds the ImageNet penalty and downloads imagenette (1.5 GB) into
  ``imagenet_dir`` when that folder is missing; it has no switch to turn it off. The official
  script skips it with ``--imagenet_train_path none``, as vad does by default: here
  ``prepare_imagenette_data`` loads nothing and the student loss is anomalib's without the
  penalty term (``EfficientAdNoPenalty``), so nothing is downloaded and both sides train the same loss.
* Learning rate: anomalib's ``StepLR(step_size=int(0.95 * steps))`` is returned to Lightning
  without ``interval``, so Lightning steps it once per *epoch* and the x0.1 drop never comes
  (official: stepped every iteration). ``--anomalib-schedule`` keeps that; by default the
  scheduler is stepped every iteration, as official and vad. The final learning rate is printed.
* Validation: ``val_split_mode=from_train``, 10 % of the training images (official for MVTec AD,
  and vad's ``validation_fraction``), which anomalib uses for the map quantiles (its default,
  ``same_as_test``, would fit them on the test set's good images). Training batch size 1.
* Left as anomalib has it: the map order. anomalib pads the raw maps with zeros, upsamples them
  and then normalises them (quantiles taken over those padded, upsampled maps); the official
  ``predict`` (and vad) normalises the raw maps and pads the normalised map with zeros, whose
  border then sits at the normal pixels' 0.9 quantile instead of below everything. Interiors are
  the same (the normalisation is affine); borders, pixel AUROC and sometimes the maximum differ.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
import types
from pathlib import Path

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


def anomalib_teacher_state(file: str) -> dict:
    """A PDN teacher (official ``nn.Sequential`` keys ``0.weight``, ``3.weight``, ...: a vad
    safetensors file or an official ``.pth``) under anomalib's keys (``conv1.weight``, ...)."""
    import torch

    if file.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(file)
    else:
        state = torch.load(file, map_location="cpu", weights_only=True)
    indices = sorted({int(key.split(".")[0]) for key in state})  # the convolutions, in order
    rename = {index: f"conv{i + 1}" for i, index in enumerate(indices)}
    return {f"{rename[int(key.split('.')[0])]}.{key.split('.', 1)[1]}": value.contiguous() for key, value in state.items()}


def install_teacher(file: str, model_size: str) -> tuple[Path, dict]:
    """Save ``file`` where anomalib's EfficientAd loads its pretrained teacher (no download then)."""
    import torch

    from anomalib.utils.path import get_pretrained_weights_dir

    folder = get_pretrained_weights_dir() / "efficientad_pretrained_weights"
    folder.mkdir(parents=True, exist_ok=True)
    state = anomalib_teacher_state(file)
    target = folder / f"pretrained_teacher_{model_size}.pth"
    torch.save(state, target)
    return target, state


def install_dsr_vq(file: str) -> dict:
    """Save a ``vad dsr pretrain-vq`` file where anomalib's Dsr loads its pretrained VQ-VAE (no
    download then). The file has the official state-dict keys, which anomalib shares, and the
    official networks' BGR channel order (``cv2.imread``), while anomalib feeds RGB: the first
    encoder convolution's input channels and the general decoder's output channels are reversed,
    so that both sides compute the same function of an image."""
    import torch
    from safetensors.torch import load_file

    from anomalib.utils.path import get_pretrained_weights_dir

    state = load_file(file)
    state["_encoder_b._conv_1.weight"] = state["_encoder_b._conv_1.weight"].flip(1).contiguous()
    state["_decoder_b._conv_trans_2.weight"] = state["_decoder_b._conv_trans_2.weight"].flip(1).contiguous()  # [in, out, k, k]
    state["_decoder_b._conv_trans_2.bias"] = state["_decoder_b._conv_trans_2.bias"].flip(0).contiguous()
    folder = get_pretrained_weights_dir() / "dsr"
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / "vq_model_pretrained_128_4096.pckl")
    return state


def dsr_model(args: argparse.Namespace):
    """anomalib's Dsr with the official latent anomaly strength, ``--epochs`` in all of which the
    last ``--upsampling-epochs`` train the up-sampling module (anomalib's ``upsampling_train_ratio``
    sets the epoch where that starts), and the official input: a resize to ``--image-size``, [0, 1]."""
    from anomalib.models import Dsr

    main_epochs = args.epochs - args.upsampling_epochs
    ratio = (main_epochs + 0.5) / args.epochs  # int(epochs * ratio) = main_epochs exactly
    return Dsr(latent_anomaly_strength=0.2, upsampling_train_ratio=ratio, visualizer=False, pre_processor=resize_to(args))


def efficientad_model(args: argparse.Namespace):
    """anomalib's EfficientAd without the ImageNet penalty (official ``--imagenet_train_path none``)
    and, unless ``--anomalib-schedule``, with its StepLR stepped every iteration (official)."""
    import torch
    from anomalib.models import EfficientAd
    from anomalib.models.image.efficient_ad.torch_model import reduce_tensor_elems

    def losses_without_penalty(self, batch, batch_imagenet, distance_st):
        """anomalib 2.7's ``EfficientAdModel.compute_losses`` less the penalty term."""
        del batch_imagenet
        distance_st = reduce_tensor_elems(distance_st)
        d_hard = torch.quantile(distance_st, 0.999)
        loss_st = torch.mean(distance_st[distance_st >= d_hard])
        aug_img = self.choose_random_aug_image(batch)
        ae_output_aug = self.ae(aug_img, batch.shape[-2:])
        with torch.no_grad():
            teacher_output_aug = self.teacher(aug_img)
            if self.is_set(self.mean_std):
                teacher_output_aug = (teacher_output_aug - self.mean_std["mean"]) / self.mean_std["std"]
        student_output_ae_aug = self.student(aug_img)[:, self.teacher_out_channels :, :, :]
        loss_ae = torch.mean((teacher_output_aug - ae_output_aug) ** 2)
        loss_stae = torch.mean((ae_output_aug - student_output_ae_aug) ** 2)
        return loss_st, loss_ae, loss_stae

    class EfficientAdNoPenalty(EfficientAd):
        def prepare_imagenette_data(self, image_size) -> None:
            """No penalty images: nothing to load or download."""

        def training_step(self, batch, *args, **kwargs):
            del args, kwargs
            loss_st, loss_ae, loss_stae = self.model(batch=batch.image, batch_imagenet=None)
            loss = loss_st + loss_ae + loss_stae
            self.log("train_loss", loss.item(), on_epoch=True, prog_bar=False, logger=True)
            return {"loss": loss}

        def configure_optimizers(self):
            configured = super().configure_optimizers()
            if args.anomalib_schedule:
                return configured
            return {"optimizer": configured["optimizer"], "lr_scheduler": {"scheduler": configured["lr_scheduler"], "interval": "step"}}

    size = (args.image_size, args.image_size)
    model = EfficientAdNoPenalty(
        imagenet_dir=Path(os.environ.get("ANOMALIB_RESULTS", "results")) / "no-imagenette", model_size=args.model_size,
        pre_processor=EfficientAd.configure_pre_processor(image_size=size), visualizer=False,
    )
    model.model.compute_losses = types.MethodType(losses_without_penalty, model.model)
    return model


#: The flow detectors compared (CS-Flow is not: anomalib's is fixed to torchvision's EfficientNet-B5
#: with downloaded ImageNet weights, which no vad backbone can share).
FLOW_MODELS = ("fastflow", "cflow", "uflow")


def flow_model(args: argparse.Namespace):
    """anomalib's FastFlow, CFLOW or U-Flow with its defaults, on ``--backbone`` (FastFlow and
    U-Flow accept ResNets and their transformers only; CFLOW any timm network, at ``--layers``)."""
    from anomalib.models import Cflow, Fastflow, Uflow

    cls = {"fastflow": Fastflow, "cflow": Cflow, "uflow": Uflow}[args.model]
    if args.model == "cflow":
        return Cflow(backbone=args.backbone, layers=args.layers, pre_processor=model_pre_processor(cls, args), visualizer=False)
    return cls(backbone=args.backbone, pre_processor=model_pre_processor(cls, args), visualizer=False)


def resize_to(args: argparse.Namespace, mean: list[float] | None = None, std: list[float] | None = None):
    """A pre-processor resizing to ``--image-size`` (anti-aliased), then normalising with
    ``mean`` and ``std`` when given (inputs stay in [0, 1] otherwise)."""
    from torchvision.transforms.v2 import Compose, Normalize, Resize

    from anomalib.pre_processing import PreProcessor

    steps = [Resize((args.image_size, args.image_size), antialias=True)]
    if mean is not None and std is not None:
        steps.append(Normalize(mean=mean, std=std))
    return PreProcessor(transform=Compose(steps))


def model_pre_processor(cls, args: argparse.Namespace):
    """What a flow or feature model of anomalib class ``cls`` reads: with ``--input backbone`` a
    resize to ``--image-size`` and the backbone's own mean and std from timm's pretrained
    configuration, as vad feeds it (anomalib's default pre-processor uses ImageNet's statistics
    for every backbone, also for the EfficientNet-Lites, which were trained on [-1, 1] inputs);
    else anomalib's own. ``Uflow.configure_pre_processor`` ignores ``image_size`` (always 448 px)
    and anomalib sizes the model from it, so U-Flow always gets the backbone's resize (ImageNet
    statistics for its ResNets, as its own)."""
    if args.input == "backbone" or args.model == "uflow":
        import timm

        config = timm.get_pretrained_cfg(args.backbone)
        return resize_to(args, list(config.mean), list(config.std))
    return cls.configure_pre_processor(image_size=(args.image_size, args.image_size))


def ganomaly_model(args: argparse.Namespace):
    """anomalib's GANomaly with the official hyper-parameters (vad's defaults) and the official
    input: a resize to ``--image-size`` and mean = std = 0.5 (images in [-1, 1]); anomalib's
    default pre-processor would resize to 256 px with ImageNet statistics."""
    from anomalib.models import Ganomaly

    return Ganomaly(
        batch_size=args.batch_size, n_features=64, latent_vec_size=100, extra_layers=0, add_final_conv_layer=True,
        wadv=1, wcon=50, wenc=1, lr=0.0002, beta1=0.5, beta2=0.999, visualizer=False, pre_processor=resize_to(args, [0.5] * 3, [0.5] * 3),
    )


#: Detectors fitted on frozen backbone features (no trained backbone).
FEATURE_MODELS = ("dfm", "dfkde", "fre", "cfa")


def feature_model(args: argparse.Namespace):
    """anomalib's CFA (official settings), DFM, DFKDE or FRE on ``--backbone`` (at ``--layers[0]``) and ``--image-size``:
    DFM with its defaults (pooling 4, level 0.97, fre score), DFKDE with its defaults (16
    components, scale, 40,000 points), FRE with its defaults (pooling 2, latent 220) and the input
    size of the pooled level, ``--input-dim``."""
    from anomalib.models import Cfa, Dfkde, Dfm, Fre

    pre_processor = model_pre_processor({"cfa": Cfa, "dfm": Dfm, "dfkde": Dfkde, "fre": Fre}[args.model], args)
    if args.model == "cfa":  # the official hyper-parameters; the backbone from torchvision's cache (TORCH_HOME)
        return Cfa(backbone=args.backbone, gamma_c=1, gamma_d=1, num_nearest_neighbors=3, num_hard_negative_features=3, radius=1e-5, pre_processor=pre_processor, visualizer=False)
    if args.model == "dfm":
        return Dfm(backbone=args.backbone, layer=args.layers[0], pooling_kernel_size=4, pca_level=0.97, score_type="fre", pre_processor=pre_processor, visualizer=False)
    if args.model == "dfkde":
        return Dfkde(backbone=args.backbone, layers=(args.layers[0],), n_pca_components=16, max_training_points=40000, pre_processor=pre_processor, visualizer=False)
    return Fre(backbone=args.backbone, layer=args.layers[0], pooling_kernel_size=2, input_dim=args.input_dim, latent_dim=220, pre_processor=pre_processor, visualizer=False)


def auroc(scores, labels) -> float:
    """Exact ROC AUC (Mann-Whitney, ties counted half) of ``scores`` against binary ``labels``."""
    import torch

    scores, labels = scores.flatten().double(), labels.flatten().bool()
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if positives == 0 or negatives == 0:
        return float("nan")
    values, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)
    below = torch.cumsum(counts, 0) - counts  # values strictly smaller than each distinct value
    ranks = (below + (counts + 1) / 2.0)[inverse]  # average 1-based rank
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, choices=["stfpm", "reverse-distillation", "efficientad", "ganomaly", "dsr", *FLOW_MODELS, *FEATURE_MODELS])
    parser.add_argument("--root", required=True)
    parser.add_argument("--category", required=True)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--layers", nargs="+", default=["layer1", "layer2", "layer3"])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--teacher", help="efficientad: the teacher file (vad safetensors or official .pth) both sides use")
    parser.add_argument("--model-size", default="small", choices=["small", "medium"], help="efficientad: PDN size")
    parser.add_argument("--validation-fraction", type=float, default=0.1, help="efficientad: share of the training images held out for the map quantiles (official 0.1)")
    parser.add_argument("--anomalib-schedule", action="store_true", help="efficientad: keep anomalib's StepLR stepped per epoch (no lr drop)")
    parser.add_argument("--input-dim", type=int, default=7168, help="fre: values per image after pooling (channels x pooled grid)")
    parser.add_argument("--vq", help="dsr: the VQ-VAE file (vad dsr pretrain-vq safetensors) both sides use")
    parser.add_argument("--upsampling-epochs", type=int, default=1, help="dsr: the last epochs, which train the up-sampling module")
    parser.add_argument("--input", default="anomalib", choices=["anomalib", "backbone"], help="flows and feature models: anomalib's pre-processor (ImageNet statistics) or the backbone's own mean and std, as vad")
    parser.add_argument("--max-steps", type=int, default=-1, help="stop after this many optimiser steps (smoke tests)")
    parser.add_argument("--checkpoint", help="score this trained checkpoint (Lightning model.ckpt of the same settings) instead of training")
    args = parser.parse_args()

    results = Path(os.environ.get("ANOMALIB_RESULTS", "results")).resolve()
    if args.model in ("efficientad", "dsr"):  # anomalib's weight cache (platformdirs) inside the results folder
        os.environ["XDG_CACHE_HOME"] = str(results / "cache")
    _torchvision_shim()
    from lightning.pytorch import Callback, seed_everything

    from anomalib.data import MVTecAD
    from anomalib.engine import Engine
    from anomalib.models import ReverseDistillation, Stfpm

    seed_everything(args.seed)
    facts: dict = {}
    if args.model == "efficientad":
        if not args.teacher:
            raise SystemExit("--model efficientad needs --teacher FILE (the teacher vad uses)")
        if args.batch_size != 1:
            raise SystemExit("EfficientAD trains with batch size 1 (official; anomalib refuses others)")
        teacher_file, teacher_state = install_teacher(args.teacher, args.model_size)
        facts["teacher_sha256"] = hashlib.sha256(Path(args.teacher).read_bytes()).hexdigest()[:16]
        model = efficientad_model(args)
        data = MVTecAD(
            root=args.root, category=args.category, train_batch_size=1, eval_batch_size=8, num_workers=0,
            val_split_mode="from_train", val_split_ratio=args.validation_fraction, seed=args.seed,
        )
    elif args.model == "dsr":
        if not args.vq or not 0 <= args.upsampling_epochs < args.epochs:
            raise SystemExit("--model dsr needs --vq FILE (the VQ-VAE vad uses) and 0 <= --upsampling-epochs < --epochs")
        install_dsr_vq(args.vq)
        facts["vq_sha256"] = hashlib.sha256(Path(args.vq).read_bytes()).hexdigest()[:16]
        model = dsr_model(args)
        data = MVTecAD(root=args.root, category=args.category, train_batch_size=args.batch_size, eval_batch_size=8, num_workers=0)
    elif args.model in FEATURE_MODELS:
        model = feature_model(args)
        data = MVTecAD(root=args.root, category=args.category, train_batch_size=args.batch_size, eval_batch_size=4 if args.model == "cfa" else 8, num_workers=0)
    elif args.model in FLOW_MODELS or args.model == "ganomaly":
        model = flow_model(args) if args.model in FLOW_MODELS else ganomaly_model(args)
        data = MVTecAD(root=args.root, category=args.category, train_batch_size=args.batch_size, eval_batch_size=8, num_workers=0)
    else:
        cls = Stfpm if args.model == "stfpm" else ReverseDistillation
        model = cls(backbone=args.backbone, layers=args.layers, pre_processor=cls.configure_pre_processor(image_size=(args.image_size, args.image_size)), visualizer=False)
        data = MVTecAD(root=args.root, category=args.category, train_batch_size=args.batch_size, eval_batch_size=8, num_workers=0)

    class EpochTimer(Callback):
        """Seconds of each training epoch, less the validation Lightning runs inside it."""

        def __init__(self) -> None:
            self.seconds: list[float] = []
            self.validation: list[float] = []
            self.start = self.started_validation = None

        def on_train_epoch_start(self, trainer, module) -> None:
            self.start, self.in_validation = time.perf_counter(), 0.0

        def on_validation_start(self, trainer, module) -> None:
            self.started_validation = time.perf_counter()

        def on_validation_end(self, trainer, module) -> None:
            if self.start is not None and self.started_validation is not None:
                self.in_validation += time.perf_counter() - self.started_validation

        def on_train_epoch_end(self, trainer, module) -> None:
            self.seconds.append(time.perf_counter() - self.start - self.in_validation)
            self.validation.append(self.in_validation)

    timer = EpochTimer()
    # FRE validates on the test split after each of its 220 epochs: once, after the last, is what
    # its post-processor needs, and the epochs it times do not change.
    validate_every = args.epochs if args.model == "fre" else 1
    engine = Engine(
        max_epochs=args.epochs, max_steps=args.max_steps, accelerator="cpu", devices=1, callbacks=[timer], logger=False, enable_progress_bar=False,
        default_root_dir=str(results), check_val_every_n_epoch=validate_every,
    )
    import torch

    if args.checkpoint:  # re-score: the checkpoint holds the networks, statistics, quantiles, post-processor
        model.load_state_dict(torch.load(args.checkpoint, map_location="cpu", weights_only=False)["state_dict"])
    else:
        started = time.perf_counter()
        engine.fit(model=model, datamodule=data)
        facts["fit_s"] = time.perf_counter() - started - sum(timer.validation)  # training and fitting, not Lightning's validation
        facts["steps"] = engine.trainer.global_step
        if engine.trainer.optimizers and engine.trainer.optimizers[0].param_groups:  # DFM and DFKDE fit without one
            facts["final_lr"] = engine.trainer.optimizers[0].param_groups[0]["lr"]
    tested = engine.test(model=model, datamodule=data, verbose=False)[0]

    class Collect(Callback):
        """The test split's raw scores, maps, labels and masks (normalisation is off in this pass)."""

        def __init__(self) -> None:
            self.parts: dict[str, list] = {"score": [], "label": [], "map": [], "mask": []}

        def on_test_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
            for key, value in (("score", outputs.pred_score), ("label", outputs.gt_label), ("map", outputs.anomaly_map), ("mask", outputs.gt_mask)):
                if value is not None:
                    self.parts[key].append(value.detach().cpu().reshape(len(outputs.gt_label), -1))

    model.post_processor.enable_normalization = False  # the model's own scores and maps
    collect = Collect()
    engine.trainer.callbacks.append(collect)
    engine.test(model=model, datamodule=data, verbose=False)
    raw = {key: torch.cat(parts) if parts else None for key, parts in collect.parts.items()}
    if args.model == "efficientad":
        trained = model.model.teacher.state_dict()
        facts["teacher_file"] = str(teacher_file)
        facts["teacher_loaded"] = all(torch.equal(trained[key].cpu(), value) for key, value in teacher_state.items())
        facts["train_images"], facts["validation_images"] = len(data.train_data), len(data.val_data)
        facts["quantiles"] = {key: float(value.detach()) for key, value in model.model.quantiles.items()}
    seconds = timer.seconds
    print(json.dumps({
        "image_auroc": float(tested.get("image_AUROC", float("nan"))),
        "pixel_auroc": float(tested.get("pixel_AUROC", float("nan"))),
        "raw_image_auroc": auroc(raw["score"], raw["label"]),
        "raw_pixel_auroc": auroc(raw["map"], raw["mask"]) if raw["map"] is not None and raw["mask"] is not None else float("nan"),
        "test_images": len(raw["label"]),
        "epoch_s": sum(seconds) / len(seconds) if seconds else None,
        "validation_s": sum(timer.validation) / len(timer.validation) if timer.validation else None,
        "epochs": len(seconds),
        **facts,
    }))


if __name__ == "__main__":
    main()
