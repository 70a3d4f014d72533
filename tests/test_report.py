"""The report's drawing parts (overlay choice, colours, strips, plots, TIFF, HTML) and the
curves it draws: whatever the run's metrics offer, without knowing any metric."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from vad import hookimpl
from vad.config import RunConfig
from vad.contracts import Curve, Metric, Sample
from vad.model import Output
from vad.report import (
    CURVE_SIZE,
    HISTOGRAM_SIZE,
    choose_overlays,
    color_range,
    curves_png,
    histogram_png,
    overlay_strip,
    png_bytes,
    render_html,
    tiff_bytes,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "contrib" / "plugin-template"))
import vad_template  # noqa: E402  (the template's detector, imported from its folder)


def decode(png: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)))


def _output(label: int, score: float) -> Output:
    sample = Sample(path=f"x/{label}-{score}.png", label=label, category="c", split="test", defect_type="d" if label else "good")
    return Output(sample, score, None, None)


def test_choose_overlays_keeps_defective_first_and_the_worst_good_ones():
    outputs = [_output(0, s) for s in (0.1, 0.9, 0.5, 0.2)] + [_output(1, s) for s in (0.7, 0.3)]
    assert choose_overlays(outputs, 0) == [4, 5, 1, 2, 3, 0]
    chosen = choose_overlays(outputs, 4)
    assert chosen[:2] == [4, 5] and chosen[2:] == [1, 2]
    many_defective = [_output(1, float(s)) for s in range(20)] + [_output(0, 5.0)]
    chosen = choose_overlays(many_defective, 8)
    assert len(chosen) == 8 and 20 in chosen  # good images keep a share


def test_color_range_puts_the_threshold_in_the_middle():
    low, high = color_range(1.0, 10.0, 3.0)
    assert (low + high) / 2 == pytest.approx(3.0)
    assert color_range(1.0, 10.0, None) == (1.0, 10.0)
    assert color_range(5.0, 10.0, 3.0) == (5.0, 10.0)  # threshold below every value: span the maps


def test_heat_map_colours_are_matplotlibs_jet():
    from vad.report import _colormap

    colormaps = pytest.importorskip("matplotlib").colormaps

    values = np.random.default_rng(0).normal(1.0, 1.5, (64, 64)).astype(np.float32)
    values.flat[:4] = [-0.5, 2.5, 1.0, 2.4999998]  # both ends, the middle, just below the top
    expected = (colormaps["jet"](np.clip((values + 0.5) / 3.0, 0.0, 1.0))[..., :3] * 255).astype(np.uint8)
    assert np.array_equal(_colormap(values, -0.5, 2.5), expected)


def test_overlay_strip_has_four_panels_and_encodes_as_png():
    image = np.full((50, 80, 3), 120, np.uint8)
    anomaly_map = np.zeros((50, 80), np.float32)
    anomaly_map[10:20, 10:20] = 5.0
    truth = anomaly_map > 0
    strip = overlay_strip(image, anomaly_map, truth, 2.0, (0.0, 4.0), caption="c", height=64)
    assert strip.dtype == np.uint8 and strip.shape[0] == 64 + 18 + 18
    assert strip.shape[1] == 4 * round(80 * 64 / 50) + 3 * 4
    assert np.array_equal(decode(png_bytes(strip)), strip)
    without_truth = overlay_strip(image, anomaly_map, None, None, (0.0, 4.0), show_truth=False, height=64)
    assert without_truth.shape[1] == 3 * round(80 * 64 / 50) + 2 * 4


def test_tiff_keeps_float32_values():
    import tifffile

    anomaly_map = np.random.default_rng(0).random((33, 47)).astype(np.float32)
    back = tifffile.imread(io.BytesIO(tiff_bytes(anomaly_map)))
    assert back.dtype == np.float32 and np.array_equal(back, anomaly_map)


def test_html_lists_warnings_and_escapes_names(tmp_path: Path):
    (tmp_path / "metrics.json").write_text(
        json.dumps({"skipped_metrics": {"c<1>": {"au_spro": "no LOCO regions"}}, "thresholds": {"c<1>": {"image": None}}, "skipped_files": {"c<1>": [["bad.png", "truncated"]]}})
    )
    (tmp_path / "results.json").write_text(json.dumps({"columns": ["image_auroc"], "rows": {"c<1>": {"image_auroc": 0.5}, "mean": {"image_auroc": 0.5}}}))
    page = render_html(tmp_path, RunConfig(pretrained=False, backbones=["b"]))
    assert "RANDOMLY INITIALISED" in page and "au_spro skipped: no LOCO regions" in page
    assert "bad.png" in page and "no image threshold" in page
    assert "c&lt;1&gt;" in page and "c<1>" not in page


def test_plots_have_their_size_and_survive_degenerate_data():
    roc = Curve("roc", np.array([0.0, 0.0, 0.5, 1.0]), np.array([0.0, 0.5, 1.0, 1.0]), "FPR", "TPR", "AUROC 0.8750")
    limited = Curve("pro", np.r_[0.0, np.sort(np.random.default_rng(0).random(10_000)) * 0.31], np.linspace(0, 1, 10_001), "FPR", "PRO", "a", x_limit=0.3)
    one_point = Curve("dot", np.array([0.5]), np.array([0.5]), "x", "y")
    with_nan = Curve("nan", np.array([0.0, np.nan, 1.0]), np.array([1.0, 2.0, np.inf]), "x", "y", "label")
    for curves in ([roc], [limited, roc], [one_point], [with_nan]):
        image = decode(curves_png(curves, "c: title"))
        assert image.shape == (CURVE_SIZE[1], CURVE_SIZE[0], 3) and image.std() > 10
    scores = np.array([1.0, 1.0, 2.0, 5.0])
    assert decode(histogram_png(scores, np.array([0, 0, 1, 1]), 1.5, "c: scores")).shape == (HISTOGRAM_SIZE[1], HISTOGRAM_SIZE[0], 3)
    assert decode(histogram_png(np.ones(3), np.zeros(3), None, "c: one value")).shape[0] == HISTOGRAM_SIZE[1]


def _curve_metric_class():
    class CurveMetric(Metric):
        """Offers two curves of one name (one plot) and a third with a name unfit for a file."""

        name = "curve-offering-metric"

        def compute(self, data):
            return 0.5

        def curves(self, data):
            x = np.linspace(0.0, 1.0, 11)
            return [
                Curve("wiggle", x, x**2, "x", "y", "squares", x_limit=0.5),
                Curve("other/curve 1", x, 1 - x, "x", "y", "falling"),
                Curve("wiggle", x, np.sqrt(x), "x", "y", "roots"),
            ]

    return CurveMetric


class CurvePlugin:
    """Registers the metric above."""

    @hookimpl
    def vad_register_metrics(self, register):
        register(_curve_metric_class())


def test_report_draws_the_curves_a_custom_metric_offers(vad_fakes, register_plugin, tmp_path):
    from vad.pipeline import run

    with register_plugin(vad_template, name="template-under-test"), register_plugin(CurvePlugin(), name="curve-plugin") as registry:
        config = RunConfig(
            dataset="tiny", backbones=["fake-backbone"], detectors=["feature-distance"], threshold="max", device="cpu",
            categories=["tiny-a"], metrics=["curve-offering-metric"], output=str(tmp_path / "run"),
        )
        folder, results = run(config, registry)
    assert results[0].timings["report_s"] > 0
    index = json.loads((folder / "tiny-a" / "report" / "index.json").read_text())
    assert index["plots"] == {"wiggle": "report/wiggle.png", "other/curve 1": "report/other_curve_1.png", "histogram": "report/histogram.png"}
    for file in index["plots"].values():
        assert decode((folder / "tiny-a" / file).read_bytes()).shape[0] == CURVE_SIZE[1]
    page = (folder / "report.html").read_text()
    assert page.index('src="tiny-a/report/wiggle.png"') < page.index('src="tiny-a/report/other_curve_1.png"') < page.index('src="tiny-a/report/histogram.png"')


def test_report_knows_no_metric(vad_fakes, register_plugin):
    import vad.report

    source = Path(vad.report.__file__).read_text()
    with register_plugin(CurvePlugin(), name="curve-plugin") as registry:
        names = set(registry.entries("metrics"))
    assert "curve-offering-metric" in names
    assert not [name for name in names if name in source]


def test_histogram_of_equal_scores_with_a_threshold_just_above_them():
    import numpy as np

    from vad.report import histogram_png

    scores = np.full(6, 0.25)
    png = histogram_png(scores, np.array([0, 0, 0, 1, 1, 1]), float(np.nextafter(0.25, 1.0)), "constant scores")
    assert png.startswith(b"\x89PNG")
    assert histogram_png(np.array([]), np.array([]), None, "no scores").startswith(b"\x89PNG")
