"""Tests of the template detector, written with the fixtures of vad.testing (no set-up needed)."""

import pytest
import torch

from vad.errors import VadError
from vad.features import PatchFeatures
from vad.preprocess import to_batch
from vad_template.detector import FeatureDistance


def test_defects_score_higher_than_good_images(tiny_dataset, fake_backbone):
    source = PatchFeatures(fake_backbone)
    batch = lambda samples: source(to_batch([s.load_image() for s in samples], source.preprocessing))
    detector = FeatureDistance()
    detector.fit([batch(tiny_dataset.train)])
    prediction = detector.predict(batch(tiny_dataset.test))
    labels = torch.tensor([s.label for s in tiny_dataset.test])
    assert prediction.scores[labels == 1].min() > prediction.scores[labels == 0].max()
    assert prediction.maps.shape[1:] == (8, 8)


def test_state_round_trip_gives_the_same_scores(tiny_dataset, fake_backbone):
    source = PatchFeatures(fake_backbone)
    features = source(to_batch([s.load_image() for s in tiny_dataset.train], source.preprocessing))
    detector = FeatureDistance(normalize=True)
    detector.fit([features])
    restored = FeatureDistance(**detector.hparams)
    restored.load_state(detector.state())
    assert torch.equal(restored.predict(features).scores, detector.predict(features).scores)


def test_empty_training_set_is_a_clear_error():
    with pytest.raises(VadError, match="at least one training image"):
        FeatureDistance().fit([])
