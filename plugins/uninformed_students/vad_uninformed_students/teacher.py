"""Uninformed Students' patch teachers (Bergmann et al., CVPR 2020; thesis §5.3.1, Table 5.1),
shared with GCAD, whose local teacher is the same network.

A patch network ``T̂`` maps a ``p x p`` patch to a 128-d descriptor with convolutions, LeakyReLUs
and 2 x 2 max-pools only. Table 5.1 as printed has three sizes that contradict its own output
sizes; the kernels here are the ones the output sizes imply (the thesis notes list them):

* p = 17: conv 6x6 (not 5x5) -> 12, conv 5x5 -> 8, conv 5x5 -> 4, conv 4x4 -> 1 (128 channels);
* p = 33: conv 5x5 (not 3x3) -> 29, pool -> 14, conv 5x5 -> 10, pool -> 5, conv 2x2 -> 4, conv 4x4 -> 1;
* p = 65: conv 5x5 -> 61, pool -> 30, conv 5x5 -> 26, pool (stride 2, not 1) -> 13, conv 5x5 -> 9,
  pool -> 4, conv 4x4 -> 1 (256), conv 1x1 -> 1 (128).

The 2 x 2 pools of stride 2 drop an odd last row, so the p = 33 and p = 65 networks read 32 and
60 of their input's pixels (:attr:`PatchNetwork.receptive_field`); the descriptor is the same
for the full patch. LeakyReLU slope 5e-3 (the §5.4 text; the table caption says 0.05), after
every layer but the descriptor layer.

**Dense extraction.** The thesis makes ``T̂`` dense with fast dense feature extraction (Bailer
et al. 2017: multi-pooling and unwarping). The same result comes from running the layers with
stride 1 and doubling the dilation after each pool (à trous): :meth:`PatchNetwork.forward`
gives, for every pixel, exactly ``T̂`` of the patch around it (tested against
:meth:`PatchNetwork.describe_patches`). The image is zero-padded by the receptive field (the
thesis does not say how borders are handled); the padded pixels are the normalised mean colour.

**Pretraining** (:func:`distill_teacher`): ``T̂`` followed by a 1 x 1 "decode" layer regresses
the global-average-pooled deepest features of a pretrained backbone on the same patch
(knowledge distillation, Eq. 5.1), plus the descriptor compactness loss (Eq. 5.5), with the
thesis' MVTec AD weights λk = λc = 1 and λm = 0 (the triplet loss is not used there, and is not
implemented). Patches are cut from images zoomed to a side drawn from {4p, ..., 16p}; all of a
batch's patches go grey with probability 0.1. Adam, lr 2e-4, weight decay 1e-5, batches of 64
(thesis: 5 x 10^4 iterations on ImageNet). Deviations: the backbone is any vad backbone (default
``tf_efficientnet_lite0``, whose deepest map is 320-d; thesis: ResNet-18's 512-d pooled features, not
downloadable here), the images any folder (thesis: ImageNet), and the backbone sees each patch
resized to ``backbone_input`` px (default 64; the thesis does not say how a 17 px patch meets
ResNet-18).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vad.distillation import FolderImages, Sampler, TensorImages, denormalize, normalize, random_grayscale, read_teacher_file, resize, save_teacher_file
from vad.errors import VadError

PATCH_SIZES = (17, 33, 65)
DESCRIPTOR_DIM = 128
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TEACHER_FORMAT = "vad-patch-teachers"
#: Side each patch is resized to for the distillation backbone (the thesis does not say).
BACKBONE_INPUT = 64
HOW_TO_MAKE = "make one with `vad uninformed-students distill --images DIR --output FILE`"

#: Table 5.1 (corrected as the module docstring says): ("conv", out_channels, kernel) or ("pool",).
ARCHITECTURES: dict[int, tuple[tuple, ...]] = {
    17: (("conv", 128, 6), ("conv", 256, 5), ("conv", 256, 5), ("conv", DESCRIPTOR_DIM, 4)),
    33: (("conv", 128, 5), ("pool",), ("conv", 256, 5), ("pool",), ("conv", 256, 2), ("conv", DESCRIPTOR_DIM, 4)),
    65: (("conv", 128, 5), ("pool",), ("conv", 128, 5), ("pool",), ("conv", 128, 5), ("pool",), ("conv", 256, 4), ("conv", DESCRIPTOR_DIM, 1)),
}


def check_patch_size(patch_size: int, owner: str) -> int:
    """``patch_size`` if Table 5.1 defines it, else a VadError naming ``owner``."""
    if patch_size not in ARCHITECTURES:
        raise VadError(f"{owner}: patch size {patch_size} has no architecture; Table 5.1 defines {list(PATCH_SIZES)}")
    return patch_size


class PatchNetwork(nn.Module):
    """A Table 5.1 network: dense descriptors for every pixel, or one per patch (same weights).

    Teachers and students share it (the students are randomly initialised copies of the
    architecture). ``out_channels`` other than 128 serves GCAD's regressors of other depths.
    """

    def __init__(self, patch_size: int, slope: float = 5e-3, out_channels: int = DESCRIPTOR_DIM) -> None:
        super().__init__()
        self.patch_size = check_patch_size(patch_size, "patch network")
        self.slope = slope
        self.plan: list[str] = []
        self.convs = nn.ModuleList()
        channels = 3
        layers = ARCHITECTURES[patch_size]
        for index, layer in enumerate(layers):
            if layer[0] == "pool":
                self.plan.append("pool")
                continue
            out = out_channels if index == len(layers) - 1 else layer[1]
            self.convs.append(nn.Conv2d(channels, out, kernel_size=layer[2]))
            self.plan.append("conv")
            channels = out
        self.out_channels = channels
        self.receptive_field = self._receptive_field()

    def _receptive_field(self) -> int:
        """Pixels per side one output reads (17, 32 and 60 for p = 17, 33, 65)."""
        field, dilation, convs = 1, 1, iter(self.convs)
        for step in self.plan:
            if step == "pool":
                field += dilation
                dilation *= 2
            else:
                field += (next(convs).kernel_size[0] - 1) * dilation
        return field

    def _layers(self, x: torch.Tensor, dense: bool) -> torch.Tensor:
        dilation, convs, last = 1, iter(self.convs), len(self.convs) - 1
        conv_index = 0
        for step in self.plan:
            if step == "pool":
                if dense:
                    x = F.max_pool2d(x, 2, stride=1, dilation=dilation)
                    dilation *= 2
                else:
                    x = F.max_pool2d(x, 2, stride=2)
                continue
            conv = next(convs)
            x = F.conv2d(x, conv.weight, conv.bias, dilation=dilation if dense else 1)
            if conv_index < last:
                x = F.leaky_relu(x, self.slope)
            conv_index += 1
        return x

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Descriptors ``[B, C, H, W]`` for every pixel of ``[B, 3, H, W]`` normalised images:
        the patch around each pixel (zero padding outside the image)."""
        before = (self.receptive_field - 1) // 2
        after = self.receptive_field - 1 - before
        return self._layers(F.pad(images, (before, after, before, after)), dense=True)

    def describe_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """``T̂``: one descriptor ``[B, C]`` per ``[B, 3, p, p]`` patch (``p`` or the receptive field)."""
        if patches.shape[-1] < self.receptive_field or patches.shape[-2] < self.receptive_field:
            raise VadError(f"patch network p={self.patch_size} takes patches of at least {self.receptive_field} px, got {tuple(patches.shape[-2:])}")
        out = self._layers(patches[..., : self.receptive_field, : self.receptive_field], dense=False)
        return out.flatten(1)


# --------------------------------------------------------------------------- losses


def distillation_loss(decoded: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Eq. 5.1: ``mean_i ||U(T̂(P_i)) - F(P_i)||²`` (squared norm over features, mean over the batch)."""
    return ((decoded - target) ** 2).sum(dim=1).mean()


def compactness_loss(descriptors: torch.Tensor) -> torch.Tensor:
    """Eq. 5.5: the sum of squared off-diagonal entries of the descriptors' correlation matrix
    over the minibatch ``[B, d]``."""
    centred = descriptors - descriptors.mean(dim=0, keepdim=True)
    scale = centred.norm(dim=0).clamp_min(1e-8)
    correlation = (centred.T @ centred) / (scale[:, None] * scale[None, :])
    off_diagonal = correlation - torch.diag(torch.diagonal(correlation))
    return (off_diagonal**2).sum()


# --------------------------------------------------------------------------- pretraining


def pooled_feature_extractor(backbone: str, weights: str | None = None, pretrained: bool = True, device: torch.device | str = "cpu") -> Callable[[torch.Tensor], torch.Tensor]:
    """The distillation target ``F``: the backbone's deepest map, global-average-pooled
    (ResNet-18's is the 512-d input of its fully connected layer, as the thesis uses).
    Takes ImageNet-normalised images; its ``out_channels`` says the feature depth."""
    from vad.plugins import create_backbone

    options: dict[str, Any] = {"pretrained": pretrained}
    if weights is not None:
        options["weights"] = weights
    network = create_backbone(backbone, **options)
    deepest = network.feature_info()[-1]
    network.to(device)
    if isinstance(getattr(network, "model", None), nn.Module):
        network.model.eval()
    preprocessing = network.preprocessing

    def features(images01: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            maps = network.forward_features(normalize(images01, preprocessing.mean, preprocessing.std).to(device), [deepest.name])
            return maps[deepest.name].float().mean(dim=(2, 3))

    features.out_channels = deepest.channels  # type: ignore[attr-defined]
    features.name = getattr(network, "spec", None) or backbone  # type: ignore[attr-defined]
    return features


def sample_patches(images01: torch.Tensor, patch_size: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` patches ``[count, 3, p, p]``: each from a random image, zoomed to a side drawn
    from {4p, ..., 16p}, cropped at a random place (cut from the unzoomed image and resized)."""
    n, _, height, width = images01.shape
    patches = []
    for _ in range(count):
        image = images01[int(torch.randint(n, (1,), generator=generator))]
        zoom = int(torch.randint(4 * patch_size, 16 * patch_size + 1, (1,), generator=generator))
        side_y = max(1, round(height * patch_size / zoom))
        side_x = max(1, round(width * patch_size / zoom))
        top = int(torch.randint(height - side_y + 1, (1,), generator=generator))
        left = int(torch.randint(width - side_x + 1, (1,), generator=generator))
        region = image[None, :, top : top + side_y, left : left + side_x]
        patches.append(F.interpolate(region, size=(patch_size, patch_size), mode="bilinear", align_corners=False, antialias=side_y > patch_size))
    return torch.cat(patches)


class DistillationHead(nn.Module):
    """``U``: the 1 x 1 "decode" layer from the 128-d descriptor to the target's depth."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_channels, out_channels)

    def forward(self, descriptors: torch.Tensor) -> torch.Tensor:
        return self.linear(descriptors)


def distill_teacher(
    patch_size: int,
    images: TensorImages | FolderImages,
    target: Callable[[torch.Tensor], torch.Tensor],
    steps: int = 50000,
    batch_size: int = 64,
    image_size: int = 256,
    backbone_input: int = BACKBONE_INPUT,
    lr: float = 2e-4,
    weight_decay: float = 1e-5,
    distillation_weight: float = 1.0,
    compactness_weight: float = 1.0,
    grayscale: float = 0.1,
    slope: float = 5e-3,
    images_per_step: int = 8,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: Callable[[int, float], None] | None = None,
) -> tuple[PatchNetwork, dict[str, Any]]:
    """Pretrain a patch teacher ``T̂`` (see the module docstring): ``steps`` batches of
    ``batch_size`` patches cut from ``images_per_step`` images loaded at ``image_size``.
    Returns the network (eval mode, on the CPU) and facts about the run."""
    if len(images) == 0:
        raise VadError("patch teacher distillation needs at least one image")
    check_patch_size(patch_size, "patch teacher distillation")
    device = torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = PatchNetwork(patch_size, slope).to(device).train()
        head = DistillationHead(network.out_channels, target.out_channels).to(device).train()  # type: ignore[attr-defined]
    optimizer = torch.optim.Adam([*network.parameters(), *head.parameters()], lr=lr, weight_decay=weight_decay)
    sampler = Sampler(len(images), generator)
    started, losses = time.perf_counter(), []
    for step in range(steps):
        source = images.load(sampler.take(min(images_per_step, len(images))), image_size)
        patches01 = sample_patches(source, patch_size, batch_size, generator)
        if float(torch.rand(1, generator=generator)) < grayscale:
            patches01 = random_grayscale(patches01, 1.0, generator)
        wanted = target(resize(patches01, backbone_input)).to(device)
        descriptors = network.describe_patches(normalize(patches01, IMAGENET_MEAN, IMAGENET_STD).to(device))
        loss = distillation_weight * distillation_loss(head(descriptors), wanted) + compactness_weight * compactness_loss(descriptors)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if progress is not None:
            progress(step, losses[-1])
    network.eval().cpu()
    facts = {
        "patch_size": patch_size,
        "steps": steps,
        "batch_size": batch_size,
        "images": len(images),
        "backbone_input": backbone_input,
        "slope": slope,
        "first_loss": losses[0] if losses else None,
        "last_loss": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
        "seconds": round(time.perf_counter() - started, 2),
    }
    return network, facts


def distill_teachers(
    owner: str,
    images01: torch.Tensor,
    slopes: dict[int, float],
    backbone: str,
    weights: str | None,
    steps: int,
    batch_size: int,
    image_size: int,
    backbone_input: int,
    seed: int,
    device: torch.device | str,
) -> tuple[dict[int, PatchNetwork], dict[str, Any]]:
    """A detector's in-fit pretraining: one teacher per patch size of ``slopes`` (with its
    LeakyReLU slope) distilled on patches of its training images ``[N, 3, H, W]`` in [0, 1],
    with progress; returns the networks and the facts a model keeps (``teacher_facts``)."""
    from vad.progress import info, track

    extractor = pooled_feature_extractor(backbone, weights, device=device)
    images = TensorImages(images01.cpu())
    sizes = list(slopes)
    info(f"{owner}: distilling teachers p={sizes} from {backbone} on patches of {len(images)} training images ({steps} steps of {batch_size} each)")
    total = steps * len(sizes)
    bar = iter(track(range(total), "teacher distillation steps", total=total))
    networks, teachers = {}, {}
    for p in sizes:
        networks[p], facts = distill_teacher(
            p, images, extractor, steps=steps, batch_size=batch_size, image_size=image_size, backbone_input=backbone_input,
            slope=slopes[p], seed=seed, device=device, progress=lambda step, loss: next(bar, None),
        )
        teachers[str(p)] = facts
        info(f"{owner}: teacher p={p} distilled in {facts['seconds']:.1f} s (loss {facts['first_loss']:.3g} -> {facts['last_loss']:.3g})", patch_size=p, **{k: v for k, v in facts.items() if k != "patch_size"})
    next(bar, None)
    return networks, {"source": "distilled", "backbone": backbone, "teachers": teachers}


def give_teachers(
    owner: str,
    options: Any,
    teachers: dict[int, PatchNetwork],
    train_pool: torch.Tensor,
    backbone_input: int,
    device: torch.device | str,
    resuming: bool,
    file_slope: Callable[[int, float | None], None],
) -> dict[str, Any]:
    """The weights of a detector's patch ``teachers`` (by patch size) for its fit, from the first
    source that applies: a resumed fit's checkpoint (nothing to do), ``options.teacher_weights``
    (a :func:`save_teachers` file; ``file_slope(p, slope)`` is told each teacher's recorded
    LeakyReLU slope, or None, before its weights load), distillation on ``train_pool``
    (ImageNet-normalised training images) when ``options.distill_steps > 0``, else random with a
    warning. Returns the facts the model keeps (``teacher_facts``)."""
    from vad.progress import warn

    if resuming:  # the teachers come with the checkpoint's weights and buffers
        return {"source": "checkpoint (the resumed fit's teachers)"}
    if options.teacher_weights is not None:
        states, facts = load_teachers(options.teacher_weights, list(teachers), f"{owner} teacher_weights")
        for p, state in states.items():
            file_slope(p, (facts.get("teachers") or {}).get(str(p), {}).get("slope"))
            teachers[p].load_state_dict(state)
        return {"source": "file", "file": str(options.teacher_weights), "backbone": facts.get("backbone")}
    if options.distill_steps > 0:
        networks, facts = distill_teachers(
            owner, denormalize(train_pool, IMAGENET_MEAN, IMAGENET_STD), {p: teacher.slope for p, teacher in teachers.items()},
            options.distill_backbone, options.distill_weights, options.distill_steps, options.distill_batch_size, options.image_size,
            backbone_input, options.seed, device,
        )
        for p, network in networks.items():
            teachers[p].load_state_dict(network.state_dict())
        return facts
    warn(f"{owner}: the teachers are RANDOMLY INITIALISED (distill_steps=0, no teacher_weights): scores are not meaningful")
    return {"source": "random"}


# --------------------------------------------------------------------------- teacher files


def save_teachers(path: Any, teachers: dict[int, PatchNetwork], facts: dict[int, dict[str, Any]], common: dict[str, Any]) -> None:
    """One safetensors file for several patch teachers (keys ``p17.convs.0.weight``, ...), with
    each teacher's facts and ``common`` (e.g. the backbone) as metadata."""
    tensors = {f"p{p}.{key}": value for p, network in teachers.items() for key, value in network.state_dict().items()}
    save_teacher_file(path, tensors, TEACHER_FORMAT, {**common, "patch_sizes": sorted(teachers), "teachers": {str(p): facts[p] for p in teachers}})


def load_teachers(path: Any, patch_sizes: Sequence[int], owner: str) -> tuple[dict[int, dict[str, torch.Tensor]], dict[str, Any]]:
    """The state dicts of the teachers for ``patch_sizes`` in a :func:`save_teachers` file, each
    checked to fit its Table 5.1 network, and the file's facts."""
    tensors, facts = read_teacher_file(path, owner, HOW_TO_MAKE)
    if facts.get("format") != TEACHER_FORMAT:
        raise VadError(f"{owner}: {str(path)!r} is not a patch-teacher file (format {facts.get('format')!r}, expected {TEACHER_FORMAT!r}); {HOW_TO_MAKE}")
    states = {}
    for p in patch_sizes:
        prefix = f"p{p}."
        state = {key[len(prefix) :]: value for key, value in tensors.items() if key.startswith(prefix)}
        if not state:
            raise VadError(f"{owner}: {str(path)!r} has no teacher for patch size {p} (it holds {facts.get('patch_sizes')}); distil one with --patch-size {p}")
        try:
            PatchNetwork(p).load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise VadError(f"{owner}: the p={p} teacher in {str(path)!r} does not fit Table 5.1's network ({str(error).splitlines()[0]})") from error
        states[p] = state
    return states, facts


@torch.no_grad()
def descriptor_statistics(teacher: nn.Module, images: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std ``[1, C, 1, 1]`` of a dense teacher's descriptors over every
    pixel of the image batches (thesis §5.3.2; GCAD folds them into the teacher)."""
    total = square = None
    count = 0
    for batch in images:
        out = teacher(batch).double()
        sums, squares = out.sum(dim=(0, 2, 3)), (out**2).sum(dim=(0, 2, 3))
        total = sums if total is None else total + sums
        square = squares if square is None else square + squares
        count += out.shape[0] * out.shape[2] * out.shape[3]
    if total is None or count == 0:
        raise VadError("teacher statistics need at least one image")
    mean = total / count
    std = (square / count - mean**2).clamp_min(0).sqrt()
    return mean.float().view(1, -1, 1, 1), std.float().clamp_min(1e-6).view(1, -1, 1, 1)
