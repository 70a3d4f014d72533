"""Fixtures of the CFA tests."""

import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Every test here runs on one torch thread (``vad.testing.one_torch_thread``)."""
