"""Tiny deterministic random-conv backbones so the ensemble tests run in seconds, offline."""

from __future__ import annotations

import pytest

import torch

from vad.contracts import Backbone, FeatureInfo, Preprocessing
from vad.features import PatchFeatures
from vad.options import option


class TinyBackbone(Backbone):
    """Two random conv stages with strides 8 and 16; weights fixed by ``seed``."""

    name = "tiny"

    class Options(Backbone.Options):
        size: int = option(64, "Input side in pixels.", ge=16)
        widths: tuple[int, int] = option((6, 10), "Channels of the two stages.", ge=1)
        mean: tuple[float, float, float] = option((0.485, 0.456, 0.406), "Normalisation mean.")
        std: tuple[float, float, float] = option((0.229, 0.224, 0.225), "Normalisation standard deviation.", gt=0)
        seed: int = option(0, "Seed of the random weights.")

    def __init__(self, model_name: str = "tiny", **options):
        super().__init__(model_name, **options)
        generator = torch.Generator().manual_seed(self.options.seed)
        widths = self.options.widths
        self.stage1 = torch.randn(widths[0], 3, 8, 8, generator=generator) / 8
        self.stage2 = torch.randn(widths[1], widths[0], 2, 2, generator=generator) / 2
        size = self.options.size
        self.preprocessing = Preprocessing(size=(size, size), mean=self.options.mean, std=self.options.std)

    def feature_info(self):
        return [FeatureInfo("s8", 8, self.options.widths[0]), FeatureInfo("s16", 16, self.options.widths[1])]

    def forward_features(self, images, layers):
        first = torch.relu(torch.nn.functional.conv2d(images, self.stage1.to(images), stride=8))
        second = torch.relu(torch.nn.functional.conv2d(first, self.stage2.to(images), stride=2))
        maps = {"s8": first, "s16": second}
        return {layer: maps[layer] for layer in layers}


def make_member(size: int = 64, widths=(6, 10), seed: int = 0, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> PatchFeatures:
    """PatchFeatures over a TinyBackbone."""
    return PatchFeatures(TinyBackbone(size=size, widths=widths, seed=seed, mean=mean, std=std))


def image_batches(count: int, size: int, batch: int = 4, seed: int = 0) -> list[torch.Tensor]:
    """Smooth random [0, 1] images in batches (the ensembles' input convention)."""
    generator = torch.Generator().manual_seed(seed)
    low = torch.rand(count, 3, size // 8, size // 8, generator=generator)
    images = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    images = (images + 0.05 * torch.rand(images.shape, generator=generator)).clamp(0, 1)
    return list(images.split(batch))


@pytest.fixture(name="make_member")
def make_member_fixture():
    """Factory of PatchFeatures members over tiny backbones."""
    return make_member


@pytest.fixture(name="image_batches")
def image_batches_fixture():
    """Factory of [0, 1] image batches."""
    return image_batches


@pytest.fixture
def members():
    """Two heterogeneous members: 64 px / ImageNet stats and 96 px / mean-std 0.5 (like lite0 vs lite2)."""
    return [make_member(64, (6, 10), seed=1), make_member(96, (8, 12), seed=2, mean=(0.5,) * 3, std=(0.5,) * 3)]


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Every test here runs on one torch thread (``vad.testing.one_torch_thread``)."""
