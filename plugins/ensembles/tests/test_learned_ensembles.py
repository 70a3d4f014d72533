"""Score ensembles that learn their weights from synthetic anomalies: the weights, the
non-negative logistic stacker, the forest saved as arrays, state, errors (a whole model:
test_model_integration.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vad.contracts import Prediction, State
from vad.errors import VadError
from vad.options import OptionError
from vad_ensembles.learned import LearnedWeights, Stacker, forest_arrays, forest_probability


def member_scores(normal: torch.Tensor, anomalous: torch.Tensor) -> tuple[Prediction, Prediction]:
    return Prediction(normal, normal[:, None, None].expand(-1, 4, 4).clone()), Prediction(anomalous, anomalous[:, None, None].expand(-1, 4, 4).clone())


def three_members(seed: int = 0):
    """Member 0 separates the anomalies, member 1 is noise, member 2 scores anomalies *lower*."""
    g = torch.Generator().manual_seed(seed)
    normal = [torch.randn(40, generator=g) for _ in range(3)]
    anomalous = [torch.randn(40, generator=g) + shift for shift in (3.0, 0.0, -1.5)]
    pairs = [member_scores(n, a) for n, a in zip(normal, anomalous)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def fitted(ensemble, seed: int = 0):
    normal, anomalous = three_members(seed)
    ensemble.calibrate(normal)
    ensemble.learn(normal, anomalous)
    return ensemble


def test_learned_weights_go_to_the_member_that_separates_and_none_to_the_one_that_inverts():
    weights = fitted(LearnedWeights()).weights
    assert weights.sum() == pytest.approx(1.0)
    assert weights[0] > 0.7
    assert weights[2] == 0


def test_logistic_stacker_drops_a_member_with_negative_weight_and_scores_the_logit():
    from sklearn.linear_model import LogisticRegression

    stacker = fitted(Stacker())
    assert stacker.weights[2] == 0 and stacker.weights[0] > 0
    assert bool((stacker.linear[:-1] >= 0).all())
    # The logit of the model refitted on the kept members, on z-scores.
    normal, anomalous = three_members()
    features, labels = stacker.examples(normal, anomalous)
    kept = [m for m in range(3) if stacker.linear[m] > 0]
    reference = LogisticRegression().fit(features[:, kept].numpy(), labels.numpy())
    batch = [Prediction(p.scores[:5], p.maps[:5]) for p in anomalous]
    logits = reference.decision_function(features[40:45, kept].numpy())
    np.testing.assert_allclose(stacker.combine(batch).scores.numpy(), logits, rtol=1e-5, atol=1e-5)


def test_forest_arrays_reproduce_scikit_learns_probabilities():
    from sklearn.ensemble import RandomForestClassifier

    g = np.random.default_rng(0)
    x = g.normal(size=(200, 3))
    y = (x[:, 0] + 0.5 * x[:, 1] + 0.3 * g.normal(size=200) > 0.5).astype(int)
    forest = RandomForestClassifier(n_estimators=15, max_depth=4, random_state=0).fit(x, y)
    rows = g.normal(size=(50, 3))
    ours = forest_probability(torch.as_tensor(rows), forest_arrays(forest))
    np.testing.assert_allclose(ours.numpy(), forest.predict_proba(rows)[:, 1], atol=1e-12)


def test_forest_stacker_is_monotone_and_survives_state_round_trip():
    stacker = fitted(Stacker(model="forest", trees=20))
    normal, anomalous = three_members(1)
    batch = [Prediction(p.scores[:8], p.maps[:8]) for p in anomalous]
    before = stacker.combine(batch)
    higher = [Prediction(batch[0].scores + 2.0, batch[0].maps), *batch[1:]]
    assert bool((stacker.combine(higher).scores >= before.scores).all())
    rebuilt = Stacker(**stacker.hparams)
    rebuilt.load_state(stacker.state())
    torch.testing.assert_close(rebuilt.combine(batch).scores, before.scores)
    torch.testing.assert_close(rebuilt.combine(batch).maps, before.maps)


def test_clear_errors_and_nothing_learned_from_bad_input():
    with pytest.raises(OptionError, match="anomalies"):
        LearnedWeights(anomalies=[])
    with pytest.raises(OptionError, match="anomaly_options"):
        Stacker(anomaly_options={"perlin": {}}, anomalies=["cutout"])
    with pytest.raises(OptionError, match="model"):
        Stacker(model="svm")
    normal, anomalous = three_members()
    calibrated = LearnedWeights()
    calibrated.calibrate(normal)
    with pytest.raises(VadError, match="has not learned"):
        calibrated.combine(anomalous)
    with pytest.raises(VadError, match="has not learned"):
        calibrated.state()
    with pytest.raises(VadError, match="calibrated on 3 members but learn got 2"):
        calibrated.learn(normal[:2], anomalous[:2])
    with pytest.raises(VadError, match="non-finite"):
        calibrated.learn(normal, [Prediction(torch.full((3,), float("nan"))), *anomalous[1:]])
    assert calibrated.weights is None
    state = fitted(Stacker()).state()
    del state.tensors["learned.linear"]
    with pytest.raises(VadError, match="lacks its fitted model"):
        Stacker().load_state(state)
    with pytest.raises(VadError, match="lacks its learned weights"):
        LearnedWeights().load_state(State(meta=state.meta, tensors={k: v for k, v in state.tensors.items() if not k.startswith("learned.")}))


def test_synthesize_makes_an_anomaly_or_says_none_and_refuses_a_plain_transform():
    image = torch.rand(1, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    ensemble = LearnedWeights(anomalies=["cutout"])
    anomaly = ensemble.synthesize(image, torch.Generator().manual_seed(1))
    assert anomaly.shape == image.shape and not torch.equal(anomaly, image)
    with pytest.raises(VadError, match="not an anomaly generator"):
        LearnedWeights(anomalies=["rotate"]).synthesize(image, torch.Generator().manual_seed(1))
