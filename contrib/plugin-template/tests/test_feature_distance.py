"""The template detector keeps vad's whole contract (vad.testing's conformance kit)."""

from vad.testing import check_detector
from vad_template.detector import FeatureDistance


def test_feature_distance_keeps_the_detector_contract():
    check_detector(FeatureDistance)
