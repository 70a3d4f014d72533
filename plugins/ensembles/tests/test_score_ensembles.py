"""Score-level ensembles: calibration on validation normals only, fusion, state, errors."""

from __future__ import annotations

import pytest
import torch

from vad.contracts import Prediction, State
from vad.errors import VadError
from vad.options import OptionError
from vad.plugins import get_registry
from vad_ensembles.scores import RankMean, ScoreMax, ScoreMean, WeightedScores


def validation_predictions(seed: int = 0) -> list[Prediction]:
    """Two members on unrelated scales with maps on different grids (like PatchCore vs SimpleNet)."""
    g = torch.Generator().manual_seed(seed)
    return [
        Prediction(10 + 2 * torch.randn(20, generator=g), 10 + 2 * torch.randn(20, 8, 8, generator=g)),
        Prediction(-3 + 0.1 * torch.randn(20, generator=g), -3 + 0.1 * torch.randn(20, 4, 4, generator=g)),
    ]


def held_out_batch(seed: int, count: int = 5) -> list[Prediction]:
    g = torch.Generator().manual_seed(seed)
    return [
        Prediction(10 + 4 * torch.randn(count, generator=g), 10 + 4 * torch.randn(count, 8, 8, generator=g)),
        Prediction(-3 + 0.3 * torch.randn(count, generator=g), -3 + 0.3 * torch.randn(count, 4, 4, generator=g)),
    ]


ALL = [ScoreMean, ScoreMax, RankMean, lambda: WeightedScores(weights=[2, 1])]


def test_registered_under_their_names():
    entries = get_registry().entries("ensemblers")
    for name in ("score-mean", "score-max", "rank-mean", "weighted"):
        assert name in entries


@pytest.mark.parametrize("make", ALL)
def test_fused_values_of_an_image_do_not_depend_on_other_test_images(make):
    ensemble = make()
    ensemble.calibrate(validation_predictions())
    alone = ensemble.combine(held_out_batch(1))
    others = held_out_batch(2, count=7)
    mixed = ensemble.combine([Prediction(torch.cat([a.scores, b.scores]), torch.cat([a.maps, b.maps])) for a, b in zip(held_out_batch(1), others)])
    torch.testing.assert_close(mixed.scores[:5], alone.scores)
    torch.testing.assert_close(mixed.maps[:5], alone.maps)
    assert alone.maps.shape == (5, 8, 8)  # fused on the largest member grid


@pytest.mark.parametrize("make", ALL)
def test_calibration_uses_only_validation_statistics_and_survives_save_and_load(make):
    ensemble = make()
    ensemble.calibrate(validation_predictions())
    saved = ensemble.state()
    before = ensemble.combine(held_out_batch(3))
    ensemble.combine(held_out_batch(4, count=50))  # combining test data never updates statistics
    torch.testing.assert_close(ensemble.combine(held_out_batch(3)).scores, before.scores)
    again = make()
    again.load_state(State(dict(saved.meta), dict(saved.tensors)))
    after = again.combine(held_out_batch(3))
    torch.testing.assert_close(after.scores, before.scores)
    torch.testing.assert_close(after.maps, before.maps)


def test_score_mean_is_the_mean_of_validation_z_scores():
    validation = validation_predictions()
    ensemble = ScoreMean()
    ensemble.calibrate(validation)
    batch = held_out_batch(5)
    expected = sum((b.scores.double() - v.scores.double().mean()) / v.scores.double().std() for b, v in zip(batch, validation)) / 2
    torch.testing.assert_close(ensemble.combine(batch).scores, expected.float())
    maximum = ScoreMax()
    maximum.calibrate(validation)
    assert torch.all(maximum.combine(batch).scores >= ensemble.combine(batch).scores - 1e-6)


def test_options_are_declared_and_saved_in_hparams():
    assert ScoreMean().hparams == {}
    assert RankMean().hparams == {"map_quantiles": 1001}
    assert RankMean(map_quantiles="51").options.map_quantiles == 51  # --set values arrive as text
    assert WeightedScores(weights=[2, 1]).hparams == {"weights": [2.0, 1.0]}
    again = WeightedScores(**WeightedScores(weights=[2, 1]).hparams)
    assert again.options.weights == (2.0, 1.0)


def test_weighted_with_all_weight_on_one_member_is_that_members_z_score():
    validation = validation_predictions()
    ensemble = WeightedScores(weights=[0, 3])
    ensemble.calibrate(validation)
    batch = held_out_batch(6)
    expected = (batch[1].scores.double() - validation[1].scores.double().mean()) / validation[1].scores.double().std()
    torch.testing.assert_close(ensemble.combine(batch).scores, expected.float())


def test_rank_is_the_validation_ecdf_and_keeps_ordering_beyond_the_largest_normal():
    validation = [Prediction(torch.arange(1.0, 11.0)), Prediction(torch.arange(1.0, 11.0) * 100)]
    ensemble = RankMean()
    ensemble.calibrate(validation)
    fused = ensemble.combine([Prediction(torch.tensor([1.0, 5.5, 10.0, 12.0, 20.0])), Prediction(torch.tensor([100.0, 550, 1000, 1200, 2000]))])
    torch.testing.assert_close(fused.scores[:3], torch.tensor([0.05, 0.5, 0.95]))
    assert fused.scores[2] < fused.scores[3] < fused.scores[4]  # anomalies above every normal stay ordered
    assert fused.maps is None  # no member has maps


def test_members_without_maps_are_left_out_of_the_map_fusion():
    validation = validation_predictions()
    validation[1] = Prediction(validation[1].scores)
    ensemble = ScoreMean()
    ensemble.calibrate(validation)
    batch = held_out_batch(7)
    fused = ensemble.combine([batch[0], Prediction(batch[1].scores)])
    expected = (batch[0].maps.double() - validation[0].maps.double().mean()) / validation[0].maps.double().std()
    torch.testing.assert_close(fused.maps, expected.float())


def test_clear_errors():
    with pytest.raises(VadError, match="calibrated on validation normals before"):
        ScoreMean().combine(held_out_batch(1))
    with pytest.raises(VadError, match="at least two members"):
        ScoreMean().calibrate(validation_predictions()[:1])
    ensemble = ScoreMean()
    ensemble.calibrate(validation_predictions())
    with pytest.raises(VadError, match="calibrated on 2 members"):
        ensemble.combine(held_out_batch(1) + held_out_batch(2)[:1])
    with pytest.raises(VadError, match="different numbers of images"):
        ensemble.combine([held_out_batch(1)[0], held_out_batch(1, count=3)[1]])
    with pytest.raises(VadError, match="ensembler 'weighted' needs option 'weights'"):
        WeightedScores()
    with pytest.raises(OptionError, match=r"ensembler 'weighted': option weights=\[1, -1\] is not allowed; weights must be a list of numbers, >= 0"):
        WeightedScores(weights=[1, -1])
    with pytest.raises(OptionError, match=r"option weights=\(0.0, 0.0\) is not allowed; weights must be non-negative numbers with a positive sum"):
        WeightedScores(weights=[0, 0])
    with pytest.raises(OptionError, match=r"option weights='2,1' is not allowed; weights must be a list of numbers"):
        WeightedScores(weights="2,1")
    with pytest.raises(OptionError, match=r"option weights=\(1.0, 1.0, 1.0\) is not allowed; weights must be one number per member: 3 weights for 2 members"):
        WeightedScores(weights=[1, 1, 1]).calibrate(validation_predictions())
    with pytest.raises(VadError, match=r"ensembler 'score-mean' has no option 'weights'; its options are: none"):
        ScoreMean(weights=[1, 2])
    with pytest.raises(OptionError, match=r"ensembler 'rank-mean': option map_quantiles=1 is not allowed; map_quantiles must be an integer, >= 2"):
        RankMean(map_quantiles=1)
    saved = ensemble.state().tensors
    with pytest.raises(VadError, match="non-finite"):  # a failed recalibration keeps the previous one
        ensemble.calibrate([Prediction(torch.tensor([1.0, 2.0])), Prediction(torch.tensor([1.0, float("nan")]))])
    for name, value in ensemble.state().tensors.items():
        torch.testing.assert_close(value, saved[name])
    with pytest.raises(VadError, match="not been calibrated"):
        RankMean().state()
    with pytest.raises(VadError, match="calibration metadata"):
        ScoreMean().load_state(State())


@pytest.mark.parametrize("cls", [ScoreMean, ScoreMax, RankMean, WeightedScores])
def test_tiny_options_calibrate_and_combine_two_members(cls):
    ensemble = cls(**cls.tiny_options)
    ensemble.calibrate(validation_predictions())
    assert ensemble.combine(held_out_batch(1)).scores.shape == (5,)
