"""Fixtures of the augmentation tests."""

import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Every test here runs on one torch thread (``vad.testing.one_torch_thread``)."""


@pytest.fixture
def images(random_images):
    """``vad.testing.random_images``: four seeded random 64 px images."""
    return random_images
