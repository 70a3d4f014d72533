"""SimpleNet inside a whole vad model on the tiny data set: fit, save, load, same scores.

No accuracy is asserted here: with 8 training images and a 48-channel random backbone the
official noise level (0.015, tuned for 1536-d WideResNet embeddings) is hard to separate in a
few epochs; learning itself is checked on a toy shift in test_simplenet.py.
"""

from __future__ import annotations

import numpy as np

from vad.features import PatchFeatures
from vad.model import AnomalyModel, Member, create_backbone


def test_simplenet_model_round_trip(vad_fakes, tiny_dataset, tmp_path):
    registry = vad_fakes
    source = PatchFeatures(create_backbone("fake-backbone", registry))
    detector = registry.load_class("detectors", "simplenet")(epochs=8, hidden=128, seed=0)
    model = AnomalyModel([Member("simplenet", detector, source)], batch_size=4)
    model.fit(tiny_dataset.train, tiny_dataset.validation)
    scores = [o.score for o in model.predict(tiny_dataset.test)]
    model.save(tmp_path / "model", registry=registry)
    loaded = AnomalyModel.load(tmp_path / "model", registry=registry)
    np.testing.assert_allclose([o.score for o in loaded.predict(tiny_dataset.test)], scores, rtol=1e-5, atol=1e-6)
