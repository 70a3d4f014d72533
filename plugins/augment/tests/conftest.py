"""Fixtures of the augmentation tests."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Small tensors run faster on one thread; on a shared 2-core machine two threads spin-wait."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def images():
    """Four random 64 px images in [0, 1] (no pixel equals white or any texture by chance)."""
    return torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(123)) * 0.9 + 0.05
