"""pytest plugin for vad and for plugin authors (entry point ``pytest11``: active once vad is installed).

The conformance kit (:mod:`vad.conformance`) checks a component's whole contract in one call::

    from vad.testing import check_detector

    def test_my_detector_keeps_the_contract():
        check_detector(MyDetector)

(also ``check_feature_source``, ``check_backbone``, ``check_metric``, ``check_threshold``,
``check_ensembler``, ``check_dataset``, ``check_augmentation``; vad's own test suite runs the
kit over every installed plugin's registered entries).

Fixtures:

* ``tiny_dataset`` -- a :class:`DataSplits` of 64 px synthetic images: 8 train, 4 validation
  and 12 test images (6 with a bright square defect and its exact mask);
* ``fake_backbone`` -- a deterministic random-convolution :class:`Backbone` with four stages
  (strides 4, 8, 16, 32; no weights to download);
* ``register_plugin`` -- a context manager registering a plugin object for one block::

      def test_my_detector(register_plugin, tiny_dataset, fake_backbone):
          with register_plugin(my_plugin_module):
              ...

* ``random_images`` -- four seeded random 64 px images in [0, 1], for augmentations and heads
  that take images;
* ``one_torch_thread`` -- the test runs on one torch thread (faster for tiny tensors);
* ``vad_fakes`` -- registers the fake backbone as ``fake-backbone`` and the tiny data set as
  ``tiny`` so that ``vad run --dataset tiny --backbone fake-backbone`` runs in a second.

Helpers: ``single_torch_thread()`` (the same, as a context manager, e.g. around a fit in a
module-scoped fixture) and ``tiny_image_batch(detector, split)`` (the tiny data set's images
prepared with an image detector's preprocessing).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from typing import Any

import pytest

from vad.conformance import (  # noqa: F401  (the kit, for plugin authors' tests)
    ConformanceError,
    check_augmentation,
    check_backbone,
    check_dataset,
    check_detector,
    check_ensembler,
    check_entry,
    check_feature_source,
    check_metric,
    check_options,
    check_threshold,
    registered_entries,
)
from vad.hookspecs import hookimpl


def make_tiny_splits(category: str = "tiny", size: int = 64, seed: int = 0, train: int = 8, validation: int = 4, test_good: int = 6, test_bad: int = 6):
    """A small in-memory data set: noisy, roughly aligned striped textures; red square defects with masks."""
    import numpy as np

    from vad.contracts import DataSplits, Sample

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]

    def texture() -> np.ndarray:
        phase = rng.uniform(-0.3, 0.3)  # roughly aligned parts, as on an inspection line
        stripes = 0.5 + 0.25 * np.sin(2 * np.pi * xx / 8 + phase)
        gray = np.clip(stripes + rng.normal(0, 0.05, (size, size)), 0, 1)
        return (np.repeat(gray[..., None], 3, axis=2) * 255).astype(np.uint8)

    def sample(split: str, index: int, defective: bool) -> Sample:
        image = texture()
        mask = np.zeros((size, size), bool)
        if defective:
            side = size // 6
            top, left = rng.integers(2, size - side - 2, size=2)
            mask[top : top + side, left : left + side] = True
            image[mask] = (255, 40, 40)
        defect = "square" if defective else "good"
        return Sample(
            path=f"memory://{category}/{split}/{defect}/{index:03d}.png",
            label=int(defective),
            category=category,
            split=split,  # type: ignore[arg-type]
            defect_type=defect,
            image_loader=lambda image=image: image.copy(),
            mask_loader=(lambda mask=mask: mask.copy()) if defective else None,
        )

    return DataSplits(
        category=category,
        train=[sample("train", i, False) for i in range(train)],
        validation=[sample("validation", i, False) for i in range(validation)],
        test=[sample("test", i, False) for i in range(test_good)] + [sample("test", test_good + i, True) for i in range(test_bad)],
    )


def _fake_backbone_class():
    import torch
    from torch import nn

    from vad.contracts import Backbone, FeatureInfo, Preprocessing
    from vad.options import option

    class RandomConvBackbone(Backbone):
        """Deterministic random-convolution backbone for tests: stages of stride 4, 8, 16, 32."""

        name = "fake-backbone"
        _channels = (8, 16, 32, 64)

        class Options(Backbone.Options):
            seed: int = option(0, "Seed of the random convolution weights.")
            size: int = option(64, "Input side in pixels.", ge=32)

        def __init__(self, model_name: str = "fake-backbone", **options: Any) -> None:
            super().__init__(model_name, **options)
            size = self.options.size
            generator = torch.Generator().manual_seed(self.options.seed)
            stages, in_channels = [], 3
            for index, channels in enumerate(self._channels):
                stride = 4 if index == 0 else 2
                conv = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1)
                with torch.no_grad():
                    conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * (2.0 / (9 * in_channels)) ** 0.5)
                    conv.bias.zero_()
                stages.append(nn.Sequential(conv, nn.ReLU()))
                in_channels = channels
            self.stages = nn.ModuleList(stages).eval().requires_grad_(False)
            self.preprocessing = Preprocessing(size=(size, size))

        def feature_info(self) -> list[FeatureInfo]:
            return [FeatureInfo(f"stage{i + 1}", 4 * 2**i, c) for i, c in enumerate(self._channels)]

        def to(self, device: Any) -> RandomConvBackbone:
            super().to(device)
            self.stages.to(device)
            return self

        def forward_features(self, images: torch.Tensor, layers: Sequence[str]) -> dict[str, torch.Tensor]:
            out, x = {}, images
            with torch.inference_mode():
                for index, stage in enumerate(self.stages):
                    x = stage(x)
                    if f"stage{index + 1}" in layers:
                        out[f"stage{index + 1}"] = x
            return out

    return RandomConvBackbone


def _tiny_dataset_class():
    from vad.contracts import Dataset

    class TinyDataset(Dataset):
        """In-memory 64 px synthetic data set with square defects (two categories)."""

        name = "tiny"

        def categories(self) -> list[str]:
            return ["tiny-a", "tiny-b"]

        def load(self, category: str):
            from vad.errors import UnknownNameError

            if category not in self.categories():
                raise UnknownNameError("category", category, self.categories())
            return make_tiny_splits(category, seed=self.categories().index(category))

    return TinyDataset


class FakesPlugin:
    """Registers ``fake-backbone`` and the ``tiny`` data set."""

    @hookimpl
    def vad_register_backbones(self, register):
        register(_fake_backbone_class())

    @hookimpl
    def vad_register_datasets(self, register):
        register(_tiny_dataset_class())


@pytest.fixture
def tiny_dataset():
    """A tiny in-memory DataSplits (64 px; 8 train, 4 validation, 6 good + 6 defective test)."""
    return make_tiny_splits()


@pytest.fixture
def fake_backbone():
    """A deterministic random-convolution Backbone (strides 4/8/16/32, 64 px input)."""
    return _fake_backbone_class()()


@pytest.fixture
def random_images():
    """Four seeded random 64 px RGB images ``[4, 3, 64, 64]`` in [0.05, 0.95] (so no pixel equals
    white or black by chance)."""
    import torch

    return torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(123)) * 0.9 + 0.05


def striped_images(count: int = 6, size: int = 64, seed: int = 0) -> Any:
    """``count`` seeded ``size`` px images of vertical stripes (period 8 px, a random phase each)
    plus noise, normalised roughly as ImageNet inputs: ``[count, 3, size, size]``, a cheap normal
    class for image detectors' tests."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    columns = torch.arange(size).view(1, 1, 1, size).float()
    stripes = torch.sin(2 * torch.pi * columns / 8 + torch.rand(count, 1, 1, 1, generator=generator) * 6)
    return stripes.expand(count, 3, size, size) + 0.1 * torch.randn(count, 3, size, size, generator=generator)


@contextmanager
def single_torch_thread():
    """One torch thread inside the block, the count restored after: tiny tensors compute faster
    that way, and on a shared 2-core machine two threads spin-wait on each other (for
    module-scoped fixtures that fit a detector once)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def one_torch_thread():
    """Run the test on one torch thread (:func:`single_torch_thread`)."""
    with single_torch_thread():
        yield


def tiny_image_batch(detector: Any, split: str = "train") -> Any:
    """The images of :func:`make_tiny_splits`'s ``split`` prepared with an image detector's
    ``preprocessing``: a ``[B, 3, H, W]`` batch for its ``fit`` or ``predict``."""
    from vad.preprocess import to_batch

    return to_batch([sample.load_image() for sample in getattr(make_tiny_splits(), split)], detector.preprocessing)


def check_state_refused(fitted: Any, other: Any, images: Any, other_match: str = "do not fit its options", empty_match: str = "do not fit") -> None:
    """Saved states that do not fit are clear errors that change nothing: ``other`` (the same
    detector with other options) refuses ``fitted``'s state and stays unfitted; ``fitted`` refuses
    an empty state and predicts ``images`` exactly as before."""
    import torch

    from vad.contracts import State
    from vad.errors import VadError

    with pytest.raises(VadError, match=other_match):
        other.load_state(fitted.state())
    assert not other.fitted
    before = fitted.predict(images).scores
    with pytest.raises(VadError, match=empty_match):
        fitted.load_state(State({}, {}))
    torch.testing.assert_close(fitted.predict(images).scores, before, rtol=0, atol=0)


@pytest.fixture
def register_plugin():
    """Context manager: ``with register_plugin(obj, name="x"):`` registers a plugin for the block."""
    from vad.plugins import registered

    @contextmanager
    def register(plugin: Any, name: str = "test-plugin"):
        with registered(plugin, name) as registry:
            yield registry

    return register


@pytest.fixture
def vad_fakes(register_plugin):
    """The fake backbone (``fake-backbone``) and tiny data set (``tiny``) registered for one test."""
    with register_plugin(FakesPlugin(), name="vad-testing-fakes") as registry:
        yield registry
