"""Small data set trees in each official layout, generated per test (no network, no real data).

The builders live in :mod:`vad_datasets.examples` (``tiny_layout`` uses them too); the ``trees``
fixture hands them to the tests.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from vad_datasets import examples


@pytest.fixture
def trees():
    """Builders: ``trees.mvtec(root, ...)``, ``trees.multi_view``, ``trees.loco``, ``trees.visa``,
    ``trees.mvtec3d``, ``trees.folder``, ``trees.write_image``, ``trees.write_mask``; ``trees.SIZE``."""
    return SimpleNamespace(
        mvtec=examples.mvtec,
        multi_view=examples.multi_view,
        loco=examples.loco,
        visa=examples.visa,
        mvtec3d=examples.mvtec3d,
        folder=examples.folder,
        write_image=examples.write_image,
        write_mask=examples.write_mask,
        SIZE=examples.SIZE,
    )
