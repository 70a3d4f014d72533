"""Calibration: every training image trains the detector, thresholds still see unseen normal
scores (leave-one-out, cross-fit, hold-out), conformal thresholds keep their stated
false-alarm rate, and the reported interval holds on held-out normals."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import beta

from vad.build import build_model
from vad.calibration import conformal_rank, false_alarm_estimate, false_alarms_on, fold_of, split_hold_out
from vad.config import RunConfig
from vad.errors import VadError
from vad.features import PatchFeatures
from vad.model import AnomalyModel
from vad.pipeline import run
from vad.preprocess import to_batch
from vad.testing import make_tiny_splits

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "contrib" / "plugin-template"))
import vad_template  # noqa: E402
from vad_template.detector import FeatureDistance  # noqa: E402

pytest.importorskip("vad_metrics")


def test_false_alarm_estimate_is_the_conformal_beta():
    scores = list(range(19))
    estimate = false_alarm_estimate(scores, threshold=100)  # above all 19: k = 19
    assert estimate["scores"] == 19 and estimate["expected"] == pytest.approx(1 / 20)
    assert estimate["low"] == pytest.approx(beta.ppf(0.025, 1, 19)) and estimate["high"] == pytest.approx(beta.ppf(0.975, 1, 19))
    assert false_alarm_estimate(scores, threshold=10)["expected"] == pytest.approx(10 / 20)  # 10 below
    assert false_alarm_estimate(scores, threshold=-1)["expected"] == 1.0
    on_test = false_alarms_on(100, estimate)
    assert on_test["normals"] == 100 and 0 <= on_test["low"] <= 0.05 <= on_test["high"] <= 0.2


def test_conformal_threshold_keeps_its_false_alarm_rate_on_exchangeable_normals():
    from vad_metrics.thresholds import conformal_threshold

    assert conformal_rank(19, 0.1) == 18 and conformal_rank(20, 0.1) == 19 and conformal_rank(99, 0.01) == 99
    rng = np.random.default_rng(0)
    trials, n, alpha = 4000, 20, 0.1
    calibration = rng.normal(size=(trials, n))
    new = rng.normal(size=trials)
    thresholds = np.array([conformal_threshold(row, np.zeros(n, int), alpha) for row in calibration])
    rate = float(np.mean(new >= thresholds))
    expected = 1 - conformal_rank(n, alpha) / (n + 1)  # 2/21
    assert rate <= alpha + 0.015 and abs(rate - expected) < 0.015


def test_too_few_scores_for_alpha_warns_and_says_what_is_certified(capsys):
    from vad_metrics.thresholds import ConformalThreshold

    scores = np.arange(10.0)
    threshold = ConformalThreshold(alpha=0.01).fit(scores, np.zeros(10, int))
    assert threshold > 9.0 and threshold == pytest.approx(9.0)
    err = " ".join(capsys.readouterr().err.split())  # the console wraps long lines
    assert "10 normal calibration scores cannot certify a false-alarm rate of 0.01" in err and "certifies 0.0909" in err


def test_hold_out_and_fold_assignment_are_seeded_and_balanced():
    kept, held = split_hold_out(list(range(20)), 0.2, seed=3)
    assert len(held) == 4 and sorted(kept + held) == list(range(20)) and split_hold_out(list(range(20)), 0.2, seed=3)[1] == held
    folds = fold_of(23, 5, seed=1)
    assert sorted(np.bincount(folds).tolist()) == [4, 4, 5, 5, 5]
    with pytest.raises(VadError, match="at least 5 training images"):
        fold_of(4, 5, seed=1)


# --------------------------------------------------------------------------- the model


@pytest.fixture
def registry(vad_fakes, register_plugin):
    with register_plugin(vad_template, name="template-under-test") as registry:
        yield registry


def model(registry, detector=None, **changes) -> AnomalyModel:
    config = RunConfig(dataset="tiny", backbones=["fake-backbone"], detectors=["feature-distance"], device="cpu", threshold="conformal", **changes)
    built = build_model(config, registry)
    if detector is not None:
        built.members[0].detector = detector
    return built


def test_auto_calibration_picks_by_what_the_members_offer(registry, tmp_path):
    class Plain(FeatureDistance):
        leave_one_out = False

    class Trained(FeatureDistance):
        leave_one_out = False
        training_passes = 5

    assert model(registry).resolve_calibration(False) == "leave-one-out"
    assert model(registry).resolve_calibration(True) == "hold-out"  # the data set's validation split
    assert model(registry, Plain()).resolve_calibration(False) == "cross-fit"
    assert model(registry, Trained()).resolve_calibration(False) == "hold-out"
    one_epoch = Plain()
    one_epoch.cheap_to_refit = False  # a trained detector run for one epoch (training_passes 1)
    assert model(registry, one_epoch).resolve_calibration(False) == "hold-out"
    with pytest.raises(VadError, match="cannot score training images as left out; use cross-fit or hold-out"):
        model(registry, Plain(), calibration="leave-one-out").resolve_calibration(False)


def test_a_head_on_a_trained_detectors_features_is_not_calibrated_by_leave_one_out(registry):
    """A network trained on the training images remembers them: its features of a training
    image look more normal than a new normal image's, so leaving the image out of the head's
    bank is not enough (the thresholds would flag good parts). auto holds images out instead,
    and an explicit leave-one-out is refused, also through a feature ensemble."""
    from vad.contracts import DetectorFeatures, FeatureEnsembler

    class TrainedFeatures(DetectorFeatures):
        name = "trained-features"

        def __call__(self, images):
            raise AssertionError("not called")

        @property
        def out_channels(self):
            return 4

    class Fused(FeatureEnsembler):
        name = "fused"

        def __call__(self, images):
            raise AssertionError("not called")

        @property
        def out_channels(self):
            return 8

        @property
        def requires_fit(self):
            return any(member.requires_fit for member in self.members)

    built = model(registry)
    frozen = built.members[0].source
    assert frozen.leave_one_out and built.resolve_calibration(False) == "leave-one-out"
    trained = TrainedFeatures(FeatureDistance())
    for source in (trained, Fused([frozen, trained])):
        built.members[0].source = source
        assert not source.leave_one_out and built.resolve_calibration(False) == "hold-out"
        built.calibration_method = "leave-one-out"
        with pytest.raises(VadError, match=r"feature-distance \(on a trained detector's features\) cannot score training images as left out"):
            built.resolve_calibration(False)
        built.calibration_method = "auto"
    assert Fused([frozen, frozen]).leave_one_out


def test_leave_one_out_trains_on_every_image_and_scores_each_as_left_out(registry):
    train = make_tiny_splits().train
    fitted = model(registry)
    fitted.fit(train)
    assert fitted.calibration["method"] == "leave-one-out" and fitted.calibration["scores"] == len(train)
    assert fitted.members[0].detector.count == len(train)  # every image trained the detector
    estimate = fitted.calibration["image_false_alarm"]
    assert estimate["scores"] == len(train) and 0 < estimate["low"] <= estimate["expected"] <= estimate["high"] <= 1


def test_cross_fit_scores_each_image_with_a_model_that_never_saw_it(registry):
    train = make_tiny_splits().train
    fitted = model(registry, calibration="cross-fit", folds=4)
    scored = fitted._cross_fit_predictions(train)
    source = PatchFeatures(fitted.members[0].source.backbone)
    grids = source(to_batch([s.load_image() for s in train], source.preprocessing)).float()
    folds = fold_of(len(train), 4, seed=0)
    expected = []
    for index in range(len(train)):
        others = torch.stack([grids[j] for j in range(len(train)) if folds[j] != folds[index]]).mean(0)
        expected.append(float((grids[index] - others).norm(dim=0).max()))
    order = [train.index(s) for s in scored.samples]
    torch.testing.assert_close(scored.predictions[0].scores, torch.tensor([expected[i] for i in order]), rtol=1e-5, atol=1e-5)
    fitted.fit(train)
    assert fitted.calibration == {**fitted.calibration, "method": "cross-fit", "folds": 4, "scores": len(train)}


def test_hold_out_keeps_a_share_away_from_the_detector(registry):
    train = make_tiny_splits().train
    fitted = model(registry, calibration="hold-out", holdout_fraction=0.25)
    fitted.fit(train)
    assert fitted.calibration["method"] == "hold-out" and fitted.calibration["scores"] == 2
    assert fitted.members[0].detector.count == len(train) - 2


def test_the_observed_false_alarm_rate_on_held_out_normals_is_in_the_reported_range(vad_fakes, tmp_path):
    """A folder of normal images only (the first day on a line): 72 train, 108 held-out normals."""
    pytest.importorskip("vad_padim")
    pytest.importorskip("vad_datasets")
    rng = np.random.default_rng(7)
    folder = tmp_path / "line" / "good"
    folder.mkdir(parents=True)
    columns = np.arange(64)
    for index in range(180):
        stripes = 0.5 + 0.25 * np.sin(2 * np.pi * columns / 8 + rng.uniform(-0.3, 0.3))
        gray = np.clip(stripes[None, :] + rng.normal(0, 0.05, (64, 64)), 0, 1)
        Image.fromarray((np.repeat(gray[..., None], 3, axis=2) * 255).astype(np.uint8)).save(folder / f"{index:03d}.png")
    config = RunConfig(
        dataset="folder", root=str(tmp_path / "line"), backbones=["fake-backbone"], detectors=["padim"], threshold="conformal",
        device="cpu", report=False, output=str(tmp_path / "run"), options={"folder": {"test_fraction": 0.6}, "conformal": {"alpha": 0.1}, "padim": {"dim": 16}},
    )
    run_folder, results = run(config)
    calibration = json.loads((run_folder / "metrics.json").read_text())["calibration"]["line"]
    assert calibration["method"] == "leave-one-out" and calibration["scores"] == 72
    assert calibration["image_false_alarm"]["expected"] <= 0.1
    on_test = calibration["test_false_alarm_range"]
    assert on_test["normals"] == 108
    assert on_test["low"] <= calibration["test_false_alarm_observed"] <= on_test["high"]
    assert results[0].metrics["image_false_alarm_rate"] == pytest.approx(calibration["test_false_alarm_observed"])


def test_a_false_alarm_rate_outside_the_predicted_range_is_a_warning():
    from vad.calibration import false_alarm_warning

    estimate = false_alarm_estimate(list(range(24)), threshold=100)
    calibration = {"test_false_alarm_range": false_alarms_on(8, estimate), "test_false_alarm_observed": 0.875}
    assert "flagged more often (87.5 %)" in false_alarm_warning(calibration) and "differ from the training images" in false_alarm_warning(calibration)
    assert false_alarm_warning({**calibration, "test_false_alarm_observed": 0.0}) is None
