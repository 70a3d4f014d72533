"""DRAEM's discriminative features fused with backbone features (seed 000's heterogeneous ensemble)."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from vad.config import RunConfig
from vad.errors import VadError
from vad.model import AnomalyModel
from vad.build import build_model
from vad.pipeline import run
from vad.testing import make_tiny_splits

pytest.importorskip("vad_ensembles")
pytest.importorskip("vad_patchcore")

SMALL_DRAEM = {"image_size": 64, "base_channels": 8, "epochs": 1, "batch_size": 4}


def config(tmp_path, **changes) -> RunConfig:
    base = dict(
        dataset="tiny", backbones=["fake-backbone", "detector:draem"], detectors=["patchcore"],
        ensemble="pca-global", threshold="max", output=str(tmp_path / "run"), device="cpu",
        report=False, categories=["tiny-a"], options={"draem": SMALL_DRAEM, "pca-global": {"n_components": 8}},
    )
    return RunConfig(**{**base, **changes})


def test_draem_member_is_trained_fused_saved_and_reloaded(vad_fakes, tmp_path):
    folder, results = run(config(tmp_path))
    assert 0.0 <= results[0].metrics["image_auroc"] <= 1.0
    loaded = AnomalyModel.load(folder / "tiny-a" / "model")
    draem = loaded.members[0].source.members[1].detector
    assert draem.fitted  # restored from the saved ensemble state, not retrained
    with open(folder / "tiny-a" / "scores.csv") as handle:
        saved = {row["path"]: float(row["score"]) for row in csv.DictReader(handle)}
    test = make_tiny_splits("tiny-a", seed=0).test
    again = {output.sample.path: output.score for output in loaded.predict(test)}
    assert again.keys() == saved.keys()
    np.testing.assert_allclose([again[p] for p in saved], list(saved.values()), rtol=1e-5, atol=1e-6)


def test_a_detector_without_features_is_a_clear_error(vad_fakes, tmp_path):
    with pytest.raises(VadError, match="offers no feature source"):
        build_model(config(tmp_path, backbones=["fake-backbone", "detector:patchcore"], options={}))
