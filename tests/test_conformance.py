"""Every registered entry of every kind keeps its contract (vad.conformance), and the kit catches
components that do not."""

from __future__ import annotations

import pytest
import torch

from tests.e2e.report_plugin import _classes
from vad.conformance import ConformanceError, check_detector, check_entry, registered_entries
from vad.contracts import Detector, Prediction
from vad.options import option
from vad.plugins import get_registry, plugin_registering

ENTRIES = registered_entries()


def test_every_kind_has_registered_entries():
    kinds = {kind for kind, _ in ENTRIES}
    assert kinds == {"backbones", "detectors", "datasets", "augmentations", "ensemblers", "metrics", "thresholds"}


@pytest.mark.parametrize(("kind", "name"), ENTRIES, ids=[f"{kind}:{name}" for kind, name in ENTRIES])
def test_registered_entry_keeps_its_contract(kind, name, one_torch_thread):
    """The one run of the kit per entry (plugins test only other options): a detector that offers
    an ONNX head must export with parity (onnx is a test dependency, so it is never skipped)."""
    run = check_entry(kind, name)
    if kind == "detectors":
        assert run.onnx.startswith("parity") or run.onnx == "not offered", run.onnx


#: A conformant detector registered only in tests (the template's method with an ONNX head).
MeanDistance = _classes()[0]


class ForgetsItsState(MeanDistance):
    """Loses its fitted state on reload: the kit must notice."""

    name = "forgets-its-state"

    def load_state(self, state):
        self.mean = torch.zeros_like(state.tensors["mean"])


def test_a_detector_registered_in_a_test_is_checked_without_test_code_of_its_own(register_plugin):
    with register_plugin(plugin_registering("detectors", MeanDistance), name="under-test") as registry:
        assert ("detectors", MeanDistance.name) in registered_entries(registry)
        for kind, name in registered_entries(registry):
            if registry.entries(kind)[name].plugin.name == "under-test":
                check_entry(kind, name, registry)


def test_the_kit_catches_a_detector_that_loses_its_state():
    with pytest.raises(ConformanceError, match="forgets-its-state.*after cls\\(\\*\\*hparams\\) \\+ load_state"):
        check_detector(ForgetsItsState)


def test_the_kit_catches_an_undocumented_or_untyped_option():
    class Undocumented(MeanDistance):
        name = "undocumented"

        class Options(Detector.Options):
            exportable: bool = option(False, "")

    with pytest.raises(ConformanceError, match="option 'exportable' needs a one-line description"):
        check_detector(Undocumented)


def test_the_kit_catches_a_false_accuracy_claim():
    class Overclaims(MeanDistance):
        name = "overclaims"
        tiny_image_auroc = 0.9

        def predict(self, batch):
            prediction = super().predict(batch)
            return Prediction(-prediction.scores, prediction.maps)

    with pytest.raises(ConformanceError, match="claims image AUROC >= 0.9"):
        check_detector(Overclaims)


def test_registry_fixture_is_left_clean():
    assert MeanDistance.name not in get_registry().entries("detectors")
