"""Distil a PDN teacher from any vad backbone (EfficientAD's pretraining step), and teacher files.

The paper's teacher is a PDN trained to regress the features of an ImageNet WideResNet-101 on
ImageNet images; the official ``pretraining.py`` does it as follows, and so does
:func:`distill_teacher`, with any vad backbone and any images:

* targets: the backbone's stride-8 and stride-16 maps (WRN-101 ``layer2`` and ``layer3``) of the
  image at twice the PDN's size (512 px for 256), aggregated as PatchCore's preprocessing does
  (3 x 3 local mean, each layer pooled to 1024 channels, the concatenation pooled to 384 channels:
  :class:`vad.features.PatchFeatures` with ``aggregation=3, layer_dim=1024, target_dim=384``),
  on the stride-8 grid (64 x 64 for 256 px); normalised per channel with the mean and std over
  the first ``normalization_images`` images (official 10,000);
* the PDN is built with padding (its output is then ``image_size / 4``, the targets' grid) and
  sees the image at ``image_size``, ImageNet-normalised;
* the same random grayscale (p = 0.1) is applied to both inputs;
* loss ``mean((target - PDN(image))^2)``; Adam lr 1e-4, weight decay 1e-5, 60,000 steps of 16
  images (official). The weights then serve unpadded (the detector's layout), as official.

Deviations: vad backbones instead of WRN-101 (default ``tf_efficientnet_lite0``, whose ImageNet
weights ship offline); images are resized with vad's anti-aliased bilinear resize; batches are
drawn by reshuffling the images every pass (the official infinite DataLoader does the same).

Teacher files are safetensors with the PDN's state dict under the official keys and metadata
``format=vad-efficientad-teacher``, ``model_size``, ``backbone``, ``image_size``, ``steps``; the
official ``teacher_small.pth`` / ``teacher_medium.pth`` (torch state dicts) load as well, read
with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vad.distillation import FolderImages, Sampler, TensorImages, normalize, random_grayscale, read_teacher_file, resize, save_teacher_file
from vad.errors import VadError
from vad_efficientad.network import OUT_CHANNELS, ModelSize, pdn

TEACHER_FORMAT = "vad-efficientad-teacher"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------- distillation


def feature_extractor(backbone: str, weights: str | None = None, pretrained: bool = True, device: torch.device | str = "cpu") -> Any:
    """The distillation target: :class:`vad.features.PatchFeatures` over ``backbone``'s stride-8 and
    stride-16 maps with the official aggregation (3 x 3, 1024 per layer, 384 in all)."""
    from vad.features import PatchFeatures, layers_at_strides
    from vad.plugins import create_backbone

    options: dict[str, Any] = {"pretrained": pretrained}
    if weights is not None:
        options["weights"] = weights
    network = create_backbone(backbone, **options)
    layers = [info.name for info in layers_at_strides(network, (8, 16), "efficientad distillation", "distill_backbone")]
    source = PatchFeatures(network, layers=layers, aggregation=3, layer_dim=1024, target_dim=OUT_CHANNELS)
    network.to(device)
    if isinstance(getattr(network, "model", None), nn.Module):
        network.model.eval()
    return source


def distill_teacher(
    size: ModelSize,
    images: TensorImages | FolderImages,
    extractor: Any,
    image_size: int = 256,
    steps: int = 60000,
    batch_size: int = 16,
    lr: float = 1e-4,
    weight_decay: float = 1e-5,
    normalization_images: int = 10000,
    grayscale: float = 0.1,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: Callable[[int, float], None] | None = None,
) -> tuple[nn.Sequential, dict[str, Any]]:
    """Train a PDN (``size``) to regress ``extractor``'s normalised features (see the module
    docstring); returns the PDN (padded layout, eval mode, on the CPU) and facts about the run."""
    if len(images) == 0:
        raise VadError("efficientad distillation needs at least one image")
    device = torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    preprocessing = extractor.preprocessing
    extractor_size = 2 * image_size

    def targets_of(batch01: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return extractor(normalize(batch01, preprocessing.mean, preprocessing.std).to(device)).float()

    # channel mean / std of the targets (official feature_normalization: batch means, then batch variances)
    started = time.perf_counter()
    count = min(len(images), normalization_images)
    chunks = [list(range(i, min(i + batch_size, count))) for i in range(0, count, batch_size)]
    means = [targets_of(images.load(chunk, extractor_size)).mean(dim=(0, 2, 3)) for chunk in chunks]
    mean = torch.stack(means).mean(dim=0)[None, :, None, None]
    variances = [((targets_of(images.load(chunk, extractor_size)) - mean) ** 2).mean(dim=(0, 2, 3)) for chunk in chunks]
    std = torch.stack(variances).mean(dim=0).sqrt()[None, :, None, None].clamp_min(1e-6)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = pdn(size, OUT_CHANNELS, padding=True).to(device).train()
    optimizer = torch.optim.Adam(network.parameters(), lr=lr, weight_decay=weight_decay)
    sampler = Sampler(len(images), generator)
    losses = []
    for step in range(steps):
        batch01 = random_grayscale(images.load(sampler.take(batch_size), extractor_size), grayscale, generator)
        target = (targets_of(batch01) - mean) / std
        prediction = network(normalize(resize(batch01, image_size), IMAGENET_MEAN, IMAGENET_STD).to(device))
        if prediction.shape[-2:] != target.shape[-2:]:
            target = F.interpolate(target, size=prediction.shape[-2:], mode="bilinear", align_corners=False)
        loss = torch.mean((target - prediction) ** 2)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if progress is not None:
            progress(step, losses[-1])
    network.eval().cpu()
    facts = {
        "model_size": size,
        "image_size": image_size,
        "steps": steps,
        "batch_size": batch_size,
        "images": len(images),
        "first_loss": losses[0] if losses else None,
        "last_loss": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
        "seconds": round(time.perf_counter() - started, 2),
    }
    return network, facts


# --------------------------------------------------------------------------- teacher files


def save_teacher(path: str | Path, network: nn.Module, facts: dict[str, Any]) -> None:
    """Write a teacher as safetensors (official state-dict keys) with its facts as metadata."""
    save_teacher_file(path, network.state_dict(), TEACHER_FORMAT, facts)


def load_teacher(path: str | Path, size: ModelSize) -> dict[str, torch.Tensor]:
    """A PDN teacher's state dict from a vad teacher file (.safetensors) or an official
    ``teacher_*.pth``, checked to fit a PDN of ``size``."""
    file = Path(path).expanduser()
    how_to_make = f"make one with `vad efficientad distill` or pass the official teacher_{size}.pth"
    if file.suffix == ".safetensors":
        state, facts = read_teacher_file(file, "efficientad", how_to_make)
        saved_size = facts.get("model_size")
        if saved_size is not None and saved_size != size:
            raise VadError(f"efficientad: {str(file)!r} holds a {saved_size} teacher, but model_size is {size!r}")
    else:
        if not file.is_file():
            raise VadError(f"efficientad: teacher file {str(file)!r} does not exist; {how_to_make}")
        try:
            state = torch.load(str(file), map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - any unreadable file is the user's to fix
            raise VadError(f"efficientad: cannot read teacher file {str(file)!r} ({error}); give a .safetensors teacher or an official teacher_{size}.pth state dict") from error
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise VadError(f"efficientad: {str(file)!r} is not a state dict of tensors")
    try:
        pdn(size).load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise VadError(f"efficientad: {str(file)!r} is not a PDN-{size[0].upper()} teacher ({str(error).splitlines()[0]}); check model_size") from error
    return state
