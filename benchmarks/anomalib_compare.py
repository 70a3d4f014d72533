#!/usr/bin/env python
"""vad's teacher-student, flow and reconstruction detectors side by side with anomalib 2.7's, same data, weights, size, epochs.

    python benchmarks/anomalib_compare.py --anomalib-python /work/anomalib-venv/bin/python \\
        [--categories brick gear gravel] [--epochs 10] [--image-size 224] \\
        [--methods stfpm reverse-distillation efficientad fastflow] [--efficientad-epochs 1] [--teacher-steps 30]

anomalib lives in its own virtual environment (never a dependency of vad): create it with the
CPU torch pinned, e.g. ``python -m venv A && A/bin/pip install -c constraints-cpu.txt
"anomalib==2.7.*" torch torchvision``; ``benchmarks/anomalib_runner.py`` is its side.

Data: ``benchmarks/larger_data.py`` (built into ``runs/larger-data`` when missing: 60 training
images of 224 px per category, 20 good and 30 defective test images). Both sides train on every
training image (vad with ``--threshold manual``: no calibration hold-out), with the method's
official batch size, and are scored on the test split by their own AUROC code.

Rows, and what each checks:

* ``stfpm`` on ``tf_efficientnet_lite0`` with its packaged ImageNet weights on both sides
  (anomalib gets them through a Hugging Face cache in the layout timm reads offline): the
  method with a pretrained teacher, levels at strides 4, 8, 16 (lite0 ``blocks.1/2/4``).
* ``stfpm`` and ``reverse-distillation`` on ``resnet18`` with one randomly initialised state dict
  (seed 0, saved once) on both sides: anomalib's Reverse Distillation decoder exists for ResNets
  only, and no ResNet ImageNet weights can be downloaded here. These rows check the
  implementations against each other, not the papers' accuracy.
* ``fastflow`` on ``resnet18`` with the shared random state dict (anomalib's FastFlow accepts
  ResNets and CaiT/DeiT only): 8 flow steps, hidden ratio 1.0, levels ``layer1-3``, Adam 1e-3 /
  1e-5, batch 32, both sides. vad's default follows the reference code (gathierry/FastFlow: 3x3
  subnets only for ResNet-18); the ``anomalib`` variant alternates 3x3 and 1x1 as anomalib does.
* ``cflow`` on ``tf_efficientnet_lite0`` (packaged ImageNet weights on both) at strides 8, 16, 32
  (``blocks.2/4/6``; official WideResNet-50 ``layer2-4``). vad's epoch is one official sub-epoch,
  run with ``sub_epochs=1``; the ``anomalib`` variant takes anomalib's departures from the
  official code (lr 1e-4 instead of 2e-4, hard permutations, 64-fiber batches instead of 256, no
  rotation augmentation, no warm-up; anomalib also has no cosine schedule). anomalib's default
  pre-processor normalises every backbone's input with ImageNet's mean and std, also the Lite0's,
  which was trained on [-1, 1] inputs (mean = std = 0.5, what vad feeds it);
  ``--anomalib-input backbone`` gives the flows' anomalib side the backbone's own statistics, so
  both sides see the same inputs. anomalib also normalises each level's likelihoods by their
  maximum over each prediction batch (test statistics; vad: the training images').
* ``uflow`` on ``resnet18`` with the shared random state dict (anomalib's U-Flow accepts MS-CaiT
  and ResNets only): 4 flow steps, clamp 2, batch 8, Adam 1e-4 (anomalib 1e-3) / 1e-5, maps not
  blurred on vad's side. anomalib's U-Flow pre-processor resizes to 448 px whatever size it is
  given, so the runner gives it the resize to ``--image-size``. anomalib's loss sums the latents'
  squares over the batch as well (the official code: per image), which weighs that term by the
  batch size; vad follows the official code.
* ``efficientad`` (EfficientAD-S) against ``anomalib.models.EfficientAd`` (model_size small) with
  one PDN-S teacher on both sides, distilled once by ``vad efficientad distill`` from
  ``tf_efficientnet_lite0`` (packaged ImageNet weights) on every training image of every
  larger-data category (``--teacher-steps`` steps of ``--teacher-batch-size``; or ``--teacher
  FILE``, e.g. the official ``teacher_small.pth``). vad gets it as
  ``efficientad.teacher_weights``, anomalib in its pretrained-teacher cache (the runner's
  docstring). 256 px (EfficientAD's size), batch 1, ``--efficientad-epochs`` passes over the 54
  training images left after holding out 10 % for the map quantiles (both sides: vad's
  ``validation_fraction=0.1``, anomalib's ``val_split_mode=from_train``), Adam 1e-4, x0.1 after
  95 % of the steps, no ImageNet penalty (official ``--imagenet_train_path none``, vad's default;
  anomalib's loss without it). vad's maps are not blurred (``sigma: 0``, official); anomalib's
  scores are its raw ones (its post-processor's min-max normalisation off: it clamps values fitted
  on six normal images).

* ``ganomaly``: no backbone, both sides train the official networks from scratch with the
  official hyper-parameters (32 px, batch 64, 15 epochs, Adam 2e-4, loss weights 1 / 50 / 1)
  and the official input (mean = std = 0.5); image AUROC only (GANomaly has no maps). anomalib's
  departures from the official code stay on its side (adversarial loss on the discriminator's
  outputs instead of feature matching, smooth-L1 latent loss, no discriminator re-initialisation,
  first-layer padding 4); its score is read raw, before its running min-max normalisation.
* ``dfm``, ``dfkde``, ``fre`` on ``tf_efficientnet_lite0`` (packaged ImageNet weights on both; the
  reference ResNet-50 / ResNet-18 cannot be downloaded here), one level each (DFM and FRE
  ``blocks.4``, stride 16, as ResNet-50 ``layer3``; DFKDE ``blocks.6``, the deepest, as ResNet-18
  ``layer4``), 256 px, no neighbourhood aggregation; anomalib's defaults otherwise. FRE runs
  anomalib's latent 220 and 220 epochs of batch 32 on both sides (vad's defaults are the official
  code's: latent from the PCA, 250 epochs of 64). Compared by the whole fit's time.
* ``cfa`` on ``resnet18`` with the shared random state dict (anomalib's CFA takes torchvision's
  ResNet-18, WideResNet-50 or VGG-19 only; it finds the file in torchvision's cache), levels
  ``layer1-3``, 224 px, batch 4, 30 epochs (``--epochs``), the official losses and settings on both
  sides; the ``anomalib`` variant keeps the radius fixed as anomalib does (its radius tensor is not
  a parameter the optimiser sees).
* ``dsr``: one VQ-VAE on both sides, pretrained once by ``vad dsr pretrain-vq`` on the training
  images of every larger-data category (``--dsr-vq-steps`` steps of 8; the official ImageNet
  checkpoint cannot be downloaded here; or ``--dsr-vq FILE``), given to anomalib in its
  pretrained-weights cache with the BGR/RGB channel order converted (the runner's
  ``install_dsr_vq``). ``--dsr-epochs`` main epochs, then ``--dsr-upsampling-epochs`` of the
  up-sampling module, an epoch being one pass over the images (anomalib's; official: 1000 random
  batches), batch 8, 256 px, Adam 2e-4 with x0.1 after 80 % of the main epochs. vad's maps are not
  blurred (``--sigma 0``); anomalib's scores and maps are read raw.

Epoch time: the mean over the training epochs only (vad: its training loop's JSON-log record;
anomalib: a callback around Lightning's training epochs, less the validation passes that
Lightning runs inside them), same machine, same thread count, one job at a time.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

ROWS = (
    ("stfpm", "tf_efficientnet_lite0", "ImageNet (packaged) on both"),
    ("stfpm", "resnet18", "random ResNet-18, same weights: implementation check"),
    ("reverse-distillation", "resnet18", "random ResNet-18, same weights: implementation check"),
    ("efficientad", "pdn_small", "one distilled PDN-S teacher on both"),
    ("fastflow", "resnet18", "random ResNet-18, same weights: implementation check"),
    ("cflow", "tf_efficientnet_lite0", "ImageNet (packaged) on both"),
    ("uflow", "resnet18", "random ResNet-18, same weights: implementation check"),
    ("ganomaly", "none", "trained from scratch on both"),
    ("dsr", "none", "one VQ-VAE (vad dsr pretrain-vq) on both"),
    ("dfm", "tf_efficientnet_lite0", "ImageNet (packaged) on both"),
    ("dfkde", "tf_efficientnet_lite0", "ImageNet (packaged) on both"),
    ("fre", "tf_efficientnet_lite0", "ImageNet (packaged) on both"),
    ("cfa", "resnet18", "random ResNet-18, same weights: implementation check"),
)
#: Methods whose rows have no backbone choice (their own networks, or EfficientAD's shared teacher).
NO_BACKBONE_CHOICE = {"efficientad", "ganomaly", "dsr"}
#: Methods whose anomalib side is read from its raw scores and maps (normalisation off), because
#: anomalib's post-processing changes them: EfficientAD's clamping min-max normalisation, and
#: GANomaly's running min-max over the test batches (a different scale per batch), DSR's min-max.
ANOMALIB_RAW = {"efficientad", "ganomaly", "dsr", "uflow"}
#: vad's settings per method: its defaults (the official code's), and where anomalib departs from
#: the official code, anomalib's choice, so that the implementations can be compared as well.
VARIANTS = {
    "stfpm": (
        ("official", "defaults (official)", []),
        ("anomalib", "anomalib's loss sum and weight decay 1e-3", ["--set", "stfpm.loss_reduction=anomalib", "--set", "stfpm.weight_decay=0.001"]),
    ),
    "reverse-distillation": (
        ("official", "defaults (official)", []),
        ("anomalib", "anomalib's Adam betas (0.5, 0.99)", ["--set", "reverse-distillation.betas=[0.5, 0.99]"]),
    ),
    # the official maps (no blur, as anomalib's); anomalib's departures are undone on its side
    "efficientad": (("official", "defaults (official), maps not blurred", []),),
    "fastflow": (
        ("official", "defaults (reference: 3x3 subnets only for ResNet-18)", []),
        ("anomalib", "anomalib's alternating 3x3 / 1x1 subnets", ["--set", "fastflow.conv3x3_only=false"]),
    ),
    # one vad epoch is one official sub-epoch; sub_epochs=1 keeps the official schedule's shape over short runs
    "cflow": (
        ("official", "defaults (official), sub_epochs 1, maps not blurred", ["--sigma", "0", "--set", "cflow.sub_epochs=1"]),
        ("anomalib", "anomalib's lr 1e-4, hard permutations, 64 fibers, no rotation, no warm-up, maps not blurred", [
            "--sigma", "0", "--set", "cflow.sub_epochs=1", "--set", "cflow.lr=0.0001", "--set", "cflow.permute_soft=false", "--set", "cflow.fiber_batch_size=64",
            "--set", "cflow.rotation=0", "--set", "cflow.warmup_meta_epochs=0",
        ]),
    ),
    "uflow": (
        ("official", "defaults (official), maps not blurred", ["--sigma", "0"]),
        ("anomalib", "anomalib's lr 1e-3, maps not blurred", ["--sigma", "0", "--set", "uflow.lr=0.001"]),
    ),
    "ganomaly": (("official", "defaults (official)", []),),
    # anomalib's epoch is one pass over the images (official: 1000 random batches): both sides so
    "dsr": (("official", "defaults (official), one pass per epoch, maps not blurred", []),),
    "dfm": (("official", "defaults, maps not blurred", ["--sigma", "0"]),),
    "dfkde": (("official", "defaults", []),),
    # anomalib's latent 220 and 220 epochs of batch 32 (official: latent from the PCA, 250 epochs of 64)
    "cfa": (
        ("official", "defaults (official: learned radius)", []),
        ("anomalib", "anomalib's fixed radius", ["--set", "cfa.learn_radius=false"]),
    ),
    "fre": (("anomalib", "anomalib's latent 220, 220 epochs of batch 32, maps not blurred", ["--sigma", "0", "--set", "fre.latent_dim=220", "--set", "fre.epochs=220", "--set", "fre.batch_size=32"]),),
}
#: Detectors fitted on a frozen backbone's level: timed by their whole fit, not per epoch.
FIT_TIMED = {"dfm": "blocks.4", "dfkde": "blocks.6", "fre": "blocks.4"}
LITE0_LAYERS = ["blocks.1", "blocks.2", "blocks.4"]
BATCH = {"stfpm": 32, "reverse-distillation": 16, "efficientad": 1, "fastflow": 32, "cflow": 32, "uflow": 8, "ganomaly": 64, "dsr": 8, "dfm": 32, "dfkde": 32, "fre": 32, "cfa": 4}
#: The methods whose anomalib inputs ``--anomalib-input`` chooses (the flows and feature models).
INPUT_CHOICE = ("fastflow", "cflow", "uflow", "cfa", "dfm", "dfkde", "fre")
#: The vad option naming each method's backbone.
BACKBONE_OPTION = {"cfa": "backbone", "stfpm": "backbone", "reverse-distillation": "encoder", "fastflow": "backbone", "cflow": "encoder", "uflow": "backbone"}
#: anomalib's levels where they are not those at strides 4, 8, 16 (CFLOW: strides 8, 16, 32, as
#: vad's ``layers=null``).
ANOMALIB_LAYERS = {("cflow", "tf_efficientnet_lite0"): ["blocks.2", "blocks.4", "blocks.6"], ("cflow", "resnet18"): ["layer2", "layer3", "layer4"]}
#: Share of the training images EfficientAD holds out for its map quantiles (official, both sides).
EFFICIENTAD_VALIDATION = 0.1


def _hub_cache(root: Path, repo: str, state: dict) -> None:
    """``state`` as ``timm/<repo>`` in a Hugging Face cache under ``root`` (what timm reads offline)."""
    from safetensors.torch import save_file

    base = root / "hub" / f"models--timm--{repo}"
    commit = "0" * 40
    (base / "refs").mkdir(parents=True, exist_ok=True)
    (base / "refs" / "main").write_text(commit)
    snapshot = base / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, snapshot / "model.safetensors")


def prepare_weights(folder: Path) -> dict[str, Path]:
    """The shared weights: ``{backbone: file vad loads}``; anomalib's copies go to ``folder/hf``."""
    import torch
    from vad_timm.compat import import_timm
    from vad_timm.weights import packaged_state_dict
    from safetensors.torch import save_file

    timm = import_timm()
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    random_resnet = timm.create_model("resnet18", pretrained=False).state_dict()
    resnet_file = folder / "resnet18-random.safetensors"
    save_file({k: v.contiguous() for k, v in random_resnet.items()}, resnet_file)
    _hub_cache(folder / "hf", "resnet18.a1_in1k", random_resnet)
    checkpoints = folder / "torch" / "hub" / "checkpoints"  # torchvision's cache, for anomalib's CFA (the same keys)
    checkpoints.mkdir(parents=True, exist_ok=True)
    torch.save(random_resnet, checkpoints / "resnet18-f37072fd.pth")
    lite0 = packaged_state_dict("tf_efficientnet_lite0")
    lite0_file = folder / "lite0-imagenet.safetensors"
    save_file({k: v.contiguous() for k, v in lite0.items()}, lite0_file)
    _hub_cache(folder / "hf", "tf_efficientnet_lite0.in1k", lite0)
    return {"resnet18": resnet_file, "tf_efficientnet_lite0": lite0_file}


def prepare_teacher(data: Path, folder: Path, args: argparse.Namespace) -> Path:
    """EfficientAD's shared teacher: ``--teacher``, or one distilled once (and reused) by
    ``vad efficientad distill`` on every training image of every category of ``data``."""
    if args.teacher:
        return Path(args.teacher)
    file = folder / f"efficientad-teacher-small-{args.teacher_steps}x{args.teacher_batch_size}.safetensors"
    if file.is_file():
        return file
    images = folder / "efficientad-teacher-images"  # links to the training images only
    for category in json.loads((data / "larger_data.json").read_text())["categories"]:
        (images / category).mkdir(parents=True, exist_ok=True)
        for path in sorted((data / category / "train" / "good").iterdir()):
            link = images / category / path.name
            if not link.exists():
                link.symlink_to(path.resolve())
    command = [
        str(Path(sys.executable).with_name("vad")), "--json-log", "efficientad", "distill", "--images", str(images), "--output", str(file),
        "--backbone", "tf_efficientnet_lite0", "--steps", str(args.teacher_steps), "--batch-size", str(args.teacher_batch_size),
        "--normalization-images", str(args.teacher_normalization_images), "--seed", "0", "--device", "cpu",
    ]
    finished = subprocess.run(command, capture_output=True, text=True)
    if finished.returncode != 0:
        raise SystemExit(f"vad failed: {' '.join(command)}\n{finished.stderr[-3000:]}")
    return file


def prepare_dsr_vq(data: Path, folder: Path, args: argparse.Namespace) -> Path:
    """The VQ-VAE both DSR sides use: ``--dsr-vq``, else ``vad dsr pretrain-vq`` on the training
    images of every larger-data category (reused when the file exists)."""
    if args.dsr_vq:
        return Path(args.dsr_vq)
    file = folder / f"dsr-vq-{args.dsr_vq_steps}x8-{args.dsr_image_size}px.safetensors"
    if not file.is_file():
        images = folder / "dsr-vq-images"
        images.mkdir(parents=True, exist_ok=True)
        for image in sorted(data.glob("*/train/good/*.png")):
            link = images / f"{image.parts[-4]}-{image.name}"
            if not link.exists():
                link.symlink_to(image.resolve())
        command = [
            str(Path(sys.executable).with_name("vad")), "dsr", "pretrain-vq", "--images", str(images), "--output", str(file),
            "--image-size", str(args.dsr_image_size), "--epochs", "1", "--steps-per-epoch", str(args.dsr_vq_steps), "--batch-size", "8",
        ]
        finished = subprocess.run(command, capture_output=True, text=True)
        if finished.returncode != 0:
            raise SystemExit(f"VQ pretraining failed: {' '.join(command)}\n{finished.stderr[-3000:]}")
    return file


def teacher_facts(file: Path) -> str:
    """What a vad teacher file says about its distillation (steps, batch, images, seconds, loss)."""
    if file.suffix != ".safetensors":
        return file.name
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as handle:
        meta = {key: json.loads(value) for key, value in (handle.metadata() or {}).items() if key != "format"}
    return (
        f"PDN-S teacher {file.name}: distilled from {meta.get('backbone')} on {meta.get('images')} images, "
        f"{meta.get('steps')} steps of {meta.get('batch_size')}, {meta.get('seconds')} s, "
        f"loss {meta.get('first_loss', 0):.3g} -> {meta.get('last_loss', 0):.3g}"
    )


def run_vad(method: str, backbone: str, weights: Path, data: Path, category: str, args: argparse.Namespace, out: Path, extra: list[str]) -> dict:
    if method == "efficientad":
        out.mkdir(parents=True, exist_ok=True)
        official_maps = out.parent / "vad-sigma0.yaml"  # vad's post-processing without its blur
        official_maps.write_text("sigma: 0\n")
        settings = [
            "--config", str(official_maps), "--set", f"efficientad.teacher_weights={weights}", "--set", "efficientad.model_size=small",
            "--set", f"efficientad.epochs={args.efficientad_epochs}", "--set", "efficientad.max_steps=null",
            "--set", f"efficientad.image_size={args.efficientad_image_size}", "--set", f"efficientad.validation_fraction={EFFICIENTAD_VALIDATION}",
        ]
    elif method == "ganomaly":
        settings = ["--set", f"ganomaly.epochs={args.ganomaly_epochs}", "--set", f"ganomaly.image_size={args.ganomaly_image_size}"]
    elif method in FIT_TIMED:
        settings = ["--backbone", backbone, "--image-size", str(args.feature_image_size)]
        settings += ["--layer", FIT_TIMED[method], "--aggregation", "1"] if method != "fre" else ["--set", f"fre.layer={FIT_TIMED[method]}"]
    elif method == "dsr":
        settings = [
            "--set", f"dsr.vq_weights={weights}", "--set", "dsr.steps_per_epoch=null", "--set", f"dsr.epochs={args.dsr_epochs}",
            "--set", f"dsr.upsampling_epochs={args.dsr_upsampling_epochs}", "--set", f"dsr.image_size={args.dsr_image_size}", "--sigma", "0",
        ]
    else:
        key = BACKBONE_OPTION[method]
        spec = backbone if backbone.startswith("tf_efficientnet") else f"timm:{backbone}"
        settings = [
            "--set", f"{method}.{key}={spec}", "--set", f"{method}.weights={weights}",
            "--set", f"{method}.epochs={args.epochs}", "--set", f"{method}.image_size={args.image_size}",
        ]
    command = [
        str(Path(sys.executable).with_name("vad")), "--json-log", "run", "--dataset", "mvtec", "--root", str(data), "--category", category,
        "--detector", method, *settings,
        "--threshold", "manual", "--set", "manual.value=0", "--metric", "image_auroc", "--metric", "pixel_auroc",
        "--no-report", "--device", "cpu", "--seed", str(args.seed), "--output", str(out), "--overwrite", *extra,
    ]
    finished = subprocess.run(command, capture_output=True, text=True)
    if finished.returncode != 0:
        raise SystemExit(f"vad failed: {' '.join(command)}\n{finished.stderr[-3000:]}")
    records = [json.loads(line) for line in finished.stderr.splitlines() if line.startswith("{")]
    epochs = [r for r in records if r.get("event") == "done" and r.get("task") == f"{method} epochs"]  # the training loop
    metrics = json.loads((out / "metrics.json").read_text())["categories"][category]
    timings = json.loads((out / "metrics.json").read_text())["timings"][category]
    epoch_s = epochs[-1]["seconds"] / max(1, epochs[-1]["items"]) if epochs else float("nan")
    return {"image_auroc": metrics["image_auroc"], "pixel_auroc": metrics.get("pixel_auroc", float("nan")), "epoch_s": epoch_s, "fit_s": timings["fit_s"]}


def run_anomalib(method: str, backbone: str, data: Path, category: str, args: argparse.Namespace, cache: Path, out: Path, teacher: Path | None = None) -> dict:
    """anomalib's result for one cell; reused from ``out/result.json`` when it was run with the same settings."""
    if method == "efficientad":
        assert teacher is not None
        digest = hashlib.sha256(teacher.read_bytes()).hexdigest()[:16]
        settings = {"epochs": args.efficientad_epochs, "image_size": args.efficientad_image_size, "teacher": digest, "validation": EFFICIENTAD_VALIDATION}
        model_options = ["--teacher", str(teacher), "--model-size", "small", "--validation-fraction", str(EFFICIENTAD_VALIDATION)]
    elif method == "ganomaly":
        settings = {"epochs": args.ganomaly_epochs, "image_size": args.ganomaly_image_size}
        model_options = []
    elif method in FIT_TIMED:
        settings = {"image_size": args.feature_image_size, "epochs": 220 if method == "fre" else 1}
        pooled = (args.feature_image_size // 16 // 2) ** 2 * 112  # fre: lite0 blocks.4 (112 channels, stride 16), pooled 2x2
        model_options = ["--backbone", backbone, "--layers", FIT_TIMED[method], *(["--input-dim", str(pooled)] if method == "fre" else [])]
    elif method == "dsr":
        assert teacher is not None  # the VQ-VAE file
        digest = hashlib.sha256(teacher.read_bytes()).hexdigest()[:16]
        settings = {"epochs": args.dsr_epochs + args.dsr_upsampling_epochs, "image_size": args.dsr_image_size, "vq": digest, "upsampling": args.dsr_upsampling_epochs}
        model_options = ["--vq", str(teacher), "--upsampling-epochs", str(args.dsr_upsampling_epochs)]
    else:
        settings = {"epochs": args.epochs, "image_size": args.image_size}
        layers = ANOMALIB_LAYERS.get((method, backbone), LITE0_LAYERS if backbone.startswith("tf_efficientnet") else ["layer1", "layer2", "layer3"])
        model_options = ["--backbone", backbone, "--layers", *layers]
    if args.seed:  # seed 0's cells keep their earlier cache key
        settings["seed"] = args.seed
    if args.anomalib_input != "anomalib" and method in INPUT_CHOICE:  # as the seed: default cells keep their key
        settings["input"] = args.anomalib_input
    if method == "uflow":  # earlier cells ran anomalib's U-Flow at its fixed 448 px (see the runner)
        settings["input_size"] = args.image_size
    saved = out / "result.json"
    if saved.is_file():
        result = json.loads(saved.read_text())
        if result.get("settings") == settings:
            return result
    command = [
        args.anomalib_python, str(HERE / "anomalib_runner.py"), "--model", method, "--root", str(data), "--category", category,
        *model_options, "--image-size", str(settings["image_size"]), "--epochs", str(settings["epochs"]),
        "--batch-size", str(BATCH[method]), "--seed", str(args.seed), *(["--input", args.anomalib_input] if method in INPUT_CHOICE else []),
    ]
    environment = {**os.environ, "HF_HOME": str(cache), "TORCH_HOME": str(cache.parent / "torch"), "HF_HUB_OFFLINE": "1", "ANOMALIB_RESULTS": str(out)}
    finished = subprocess.run(command, capture_output=True, text=True, env=environment)
    lines = [line for line in finished.stdout.splitlines() if line.startswith("{")]
    if finished.returncode != 0 or not lines:
        raise SystemExit(f"anomalib failed: {' '.join(command)}\n{finished.stderr[-3000:]}")
    result = {**json.loads(lines[-1]), "settings": settings}
    out.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(result))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--anomalib-python", required=True, help="python of the virtual environment that has anomalib 2.7")
    parser.add_argument("--data", default="runs/larger-data")
    parser.add_argument("--categories", nargs="+", default=["brick", "gear", "gravel"])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--methods", nargs="+", default=["stfpm", "reverse-distillation", "efficientad", "fastflow", "cflow", "uflow", "ganomaly"])
    parser.add_argument("--backbones", nargs="+", default=["tf_efficientnet_lite0", "resnet18"], help="backbones of the rows that have a choice")
    parser.add_argument("--efficientad-epochs", type=int, default=1, help="EfficientAD passes over its 54 training images (batch 1: 54 steps each), both sides")
    parser.add_argument("--efficientad-image-size", type=int, default=256)
    parser.add_argument("--teacher", help="EfficientAD teacher file for both sides (default: distil one, see --teacher-steps)")
    parser.add_argument("--teacher-steps", type=int, default=30, help="distillation steps of the shared EfficientAD teacher (official 60,000)")
    parser.add_argument("--teacher-batch-size", type=int, default=8, help="images per distillation step (official 16)")
    parser.add_argument("--teacher-normalization-images", type=int, default=64, help="images for the distillation targets' mean and std (official 10,000); the teacher file, named by steps and batch size, is reused when present")
    parser.add_argument("--ganomaly-epochs", type=int, default=15, help="GANomaly epochs, both sides (official 15)")
    parser.add_argument("--ganomaly-image-size", type=int, default=32, help="GANomaly input side, both sides (official 32)")
    parser.add_argument("--feature-image-size", type=int, default=256, help="DFM, DFKDE and FRE input side, both sides (anomalib's 256)")
    parser.add_argument("--dsr-epochs", type=int, default=2, help="DSR main-training epochs (one pass over the images each), both sides (official 100 of 1000 steps)")
    parser.add_argument("--dsr-upsampling-epochs", type=int, default=1, help="DSR up-sampling epochs after them, both sides (official 50)")
    parser.add_argument("--dsr-image-size", type=int, default=256, help="DSR input side, both sides (official 256)")
    parser.add_argument("--dsr-vq", help="DSR VQ-VAE file for both sides (default: pretrain one, see --dsr-vq-steps)")
    parser.add_argument("--dsr-vq-steps", type=int, default=200, help="steps of 8 images of the shared VQ-VAE pretraining (authors' 100,000 of 64 ImageNet images)")
    parser.add_argument("--seed", type=int, default=0, help="the runs' seed on both sides (vad --seed, anomalib seed_everything); use another --output per seed")
    parser.add_argument("--variants", nargs="+", default=["official", "anomalib"], help="vad settings to run: official, anomalib (anomalib's departures)")
    parser.add_argument(
        "--anomalib-input", default="anomalib", choices=["anomalib", "backbone"],
        help="anomalib's inputs for the flows and feature models: its own pre-processor (ImageNet mean and std for every backbone) or the backbone's mean and std, as vad's",
    )
    parser.add_argument("--output", default="runs/anomalib-compare")
    args = parser.parse_args()

    data, output = Path(args.data), Path(args.output)
    if not (data / "larger_data.json").is_file():
        from larger_data import build

        build(data)
    weights = prepare_weights(output)
    teacher = None
    lines = []
    trained = sorted(set(args.methods) - NO_BACKBONE_CHOICE - set(FIT_TIMED))
    inputs = "the backbone's mean and std on both sides" if args.anomalib_input == "backbone" else "anomalib's own pre-processor for anomalib"
    if trained:
        batches = ", ".join(f"{method} {BATCH[method]}" for method in trained)
        lines.append(f"{', '.join(trained)}: {args.epochs} epochs, {args.image_size} px, official batch sizes ({batches}), every training image, CPU; {inputs}")
    if "ganomaly" in args.methods:
        lines.append(f"GANomaly: {args.ganomaly_epochs} epochs, {args.ganomaly_image_size} px, batch {BATCH['ganomaly']}, official hyper-parameters on both sides, image AUROC only (no maps)")
    if "efficientad" in args.methods:
        teacher = weights["pdn_small"] = prepare_teacher(data, output, args)
        train = json.loads((data / "larger_data.json").read_text())["train"]
        steps = max(1, int((1 - EFFICIENTAD_VALIDATION) * train))  # batch 1: one step per kept image
        lines.append(
            f"EfficientAD-S: {args.efficientad_epochs} epochs of {steps} steps (batch 1, {train - steps} of {train} images held out for the quantiles), "
            f"{args.efficientad_image_size} px; {teacher_facts(teacher)}"
        )
    fitted = [method for method in args.methods if method in FIT_TIMED]
    if fitted:
        lines.append(f"{', '.join(fitted)}: lite0 ({', '.join(f'{m} {FIT_TIMED[m]}' for m in fitted)}), {args.feature_image_size} px, no aggregation; fit time = the whole fit (features, PCA / KDE / training), less anomalib's validation passes; {inputs}")
    if "dsr" in args.methods:
        weights["none"] = prepare_dsr_vq(data, output, args)
        lines.append(
            f"DSR: {args.dsr_epochs} + {args.dsr_upsampling_epochs} up-sampling epochs of one pass (batch 8), {args.dsr_image_size} px, "
            f"one VQ-VAE on both ({weights['none'].name}), maps not blurred on vad's side, raw anomalib scores"
        )
    lines += [
        "",
        "| method | backbone (weights) | vad settings | category | vad img / px AUROC | anomalib img / px AUROC | vad s / epoch | anomalib s / epoch | vad fit s | anomalib fit s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method, backbone, what in ROWS:
        if method not in args.methods or (method not in NO_BACKBONE_CHOICE and backbone not in args.backbones):
            continue
        for category in args.categories:
            cell = output / f"{method}-{backbone}-{category}"
            shared = {"efficientad": teacher, "dsr": weights.get("none")}.get(method)
            theirs = run_anomalib(method, backbone, data, category, args, output / "hf", cell / "anomalib", shared)
            if method in ANOMALIB_RAW:
                theirs = {**theirs, "image_auroc": theirs["raw_image_auroc"], "pixel_auroc": theirs["raw_pixel_auroc"]}
            for key, settings, extra in VARIANTS[method]:
                if key not in args.variants:
                    continue
                ours = run_vad(method, backbone, weights.get(backbone), data, category, args, cell / f"vad-{key}", extra)
                lines.append(
                    f"| {method} | {backbone} ({what}) | {settings} | {category} | {ours['image_auroc']:.3f} / {ours['pixel_auroc']:.3f} | "
                    f"{theirs['image_auroc']:.3f} / {theirs['pixel_auroc']:.3f} | {ours['epoch_s']:.2f} | {theirs.get('epoch_s') or float('nan'):.2f} | "
                    f"{ours['fit_s']:.1f} | {theirs.get('fit_s', float('nan')):.1f} |"
                )
                print(lines[-1], flush=True)
    table = "\n".join(lines)
    (output / "table.md").write_text(table + "\n")
    print("\n" + table)


if __name__ == "__main__":
    main()
