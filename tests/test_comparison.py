"""Ensembles against their best member: the members found, the paired bootstrap's interval, the
verdict only when the interval excludes 0, and the table vad bench writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from vad.comparison import against_members, auroc, markdown, paired_bootstrap


def test_auroc_and_a_paired_bootstrap_that_only_decides_when_it_is_clear():
    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(40, int), np.ones(40, int)]
    good = labels + 0.3 * rng.normal(size=80)  # separates well
    noise = rng.normal(size=80)  # chance
    assert auroc(labels, labels.astype(float)) == 1.0 and auroc(labels, np.zeros(80)) == 0.5
    difference, low, high = paired_bootstrap(labels, good, noise, resamples=300)
    assert difference == pytest.approx(auroc(labels, good) - auroc(labels, noise)) and 0 < low <= difference <= high
    same = paired_bootstrap(labels, good, good, resamples=50)
    assert same == (0.0, 0.0, 0.0)


def test_auroc_counts_ties_half_and_matches_scikit_learn():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    normal, anomalous = rng.integers(0, 5, 30).astype(float), rng.integers(2, 7, 20).astype(float)  # many ties
    labels, scores = np.r_[np.zeros(30), np.ones(20)], np.r_[normal, anomalous]
    assert auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores))


def write_cell(folder: Path, category: str, labels: np.ndarray, scores: np.ndarray, kinds: list[str] | None = None) -> Path:
    (folder / category).mkdir(parents=True)
    if kinds is None:
        lines = ["path,category,defect_type,label,score,decision"] + [f"img{i}.png,{category},x,{l},{s},0" for i, (l, s) in enumerate(zip(labels, scores))]
    else:
        lines = ["path,category,defect_type,anomaly_kind,label,score,decision"] + [
            f"img{i}.png,{category},x,{k},{l},{s},0" for i, (l, s, k) in enumerate(zip(labels, scores, kinds))
        ]
    (folder / category / "scores.csv").write_text("\n".join(lines) + "\n")
    return folder


def test_each_ensemble_meets_its_best_member_on_the_same_images(tmp_path):
    rng = np.random.default_rng(1)
    labels = np.r_[np.zeros(30, int), np.ones(30, int)]
    scores = {"lite0": labels + 0.5 * rng.normal(size=60), "lite2": rng.normal(size=60), "fused": labels + 0.1 * rng.normal(size=60)}
    rows = []
    for name, backbone, ensemble in (("lite0", "lite0", "none"), ("lite2", "lite2", "none"), ("fused", "lite0+lite2", "pca-global"), ("alone", "lite0", "score-mean")):
        values = scores.get(name, scores["lite0"])
        write_cell(tmp_path / name, "brick", labels, values)
        rows.append({"cell": name, "detector": "patchcore", "ensemble": ensemble, "backbone": backbone, "category": "brick",
                     "status": "done", "image_auroc": auroc(labels, values)})
    records = against_members(rows, lambda row: tmp_path / row["cell"])
    assert len(records) == 1  # "alone" has a single member: nothing to compare
    (record,) = records
    assert record["best_member"] == "patchcore / lite0" and record["verdict"] in ("wins", "no clear difference")
    assert record["difference"] == pytest.approx(auroc(labels, scores["fused"]) - auroc(labels, scores["lite0"]))
    assert record["kind"] == "all" and "| patchcore | pca-global | lite0+lite2 | brick | all |" in markdown(records)


def test_each_anomaly_kind_meets_the_member_best_on_that_kind(tmp_path):
    """LOCO-layout data: one record per kind on the good images and that kind's anomalies, each
    against the member best on that kind (here a different member for each kind)."""
    rng = np.random.default_rng(2)
    labels = np.r_[np.zeros(20, int), np.ones(40, int)]
    kinds = [""] * 20 + ["structural"] * 20 + ["logical"] * 20
    structural, logical = np.r_[np.zeros(20), np.ones(20), np.zeros(20)].astype(bool), np.r_[np.zeros(40), np.ones(20)].astype(bool)
    noise = lambda: 0.3 * rng.normal(size=60)  # noqa: E731
    scores = {
        "local": structural + noise(),  # finds structural anomalies only
        "global": logical + noise(),  # finds logical anomalies only
        "fused": structural + logical + noise(),
    }
    rows = []
    for name, backbone, ensemble in (("local", "local", "none"), ("global", "global", "none"), ("fused", "local+global", "pca-global")):
        write_cell(tmp_path / name, "pushpins", labels, scores[name], kinds)
        rows.append({"cell": name, "detector": "patchcore", "ensemble": ensemble, "backbone": backbone, "category": "pushpins",
                     "status": "done", "image_auroc": auroc(labels, scores[name])})
    records = {r["kind"]: r for r in against_members(rows, lambda row: tmp_path / row["cell"])}
    assert set(records) == {"all", "structural", "logical"}
    assert records["structural"]["best_member"] == "patchcore / local" and records["logical"]["best_member"] == "patchcore / global"
    for kind, chosen, best in (("structural", ~logical, "local"), ("logical", ~structural, "global")):
        assert records[kind]["image_auroc"] == pytest.approx(auroc(labels[chosen], scores["fused"][chosen]))
        assert records[kind]["difference"] == pytest.approx(auroc(labels[chosen], scores["fused"][chosen]) - auroc(labels[chosen], scores[best][chosen]))
    assert records["all"]["verdict"] == "wins"  # each member misses half of the anomalies; the fusion finds both kinds
    assert "| pushpins | logical |" in markdown(list(records.values()))


def test_the_forest_plot_draws_one_row_per_record():
    import io

    from PIL import Image

    from vad.comparison import plot_png

    records = [{"difference": d, "low": d - 0.05, "high": d + 0.05} for d in (-0.2, 0.0, 0.15)]
    image = Image.open(io.BytesIO(plot_png(records)))
    assert image.size == (560, 110 + 16 * 3)
    pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
    assert ((pixels == (214, 39, 40)).all(axis=1)).any() and ((pixels == (44, 160, 44)).all(axis=1)).any()  # a loss and a win drawn


def test_bench_summary_writes_the_comparison_and_one_report_page_whose_links_exist(tmp_path):
    """vad bench's summary: bench_members.{md,json,png} and report.html with the cells, the
    comparison per anomaly kind and the forest plot (every referenced file present)."""
    import re

    from vad.bench import Cell, CellResult, write_summary

    rng = np.random.default_rng(3)
    labels = np.r_[np.zeros(10, int), np.ones(10, int)]
    kinds = [""] * 10 + ["structural"] * 5 + ["logical"] * 5
    results = []
    for ensemble, backbones in ((None, ["a"]), (None, ["b"]), ("score-mean", ["a", "b"])):
        cell = Cell(["patchcore"], ensemble, backbones, "pushpins")
        values = labels + rng.normal(size=20)
        write_cell(tmp_path / "bench" / "cells" / cell.id, "pushpins", labels, values, kinds)
        results.append(CellResult(cell, "done", {"image_auroc": auroc(labels, values), "fit_s": 1.0}))
    write_summary(tmp_path / "bench", results, train_counts=False)
    records = json.loads((tmp_path / "bench" / "bench_members.json").read_text())["records"]
    assert [r["kind"] for r in records] == ["all", "logical", "structural"]
    page = (tmp_path / "bench" / "report.html").read_text()
    assert "Does the ensemble beat its best member?" in page and "<td>logical</td>" in page
    links = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert "bench_members.png" in links
    missing = [link for link in links if link not in ("bench.csv", "bench.json") and not (tmp_path / "bench" / link).is_file()]
    assert not missing


def test_over_several_categories_the_mean_meets_the_member_best_in_the_mean(tmp_path):
    """Per category each member wins one; the "mean" record compares the fusion's mean AUROC with
    the member whose mean is best, each category resampled on its own (the interval of a mean
    of two categories is narrower than either category's)."""
    from vad.comparison import paired_bootstrap_mean

    rng = np.random.default_rng(4)
    labels = np.r_[np.zeros(25, int), np.ones(25, int)]
    scores = {
        ("a", "c1"): labels + 0.2 * rng.normal(size=50), ("a", "c2"): rng.normal(size=50),
        ("b", "c1"): labels + 1.5 * rng.normal(size=50), ("b", "c2"): labels + 0.3 * rng.normal(size=50),
        ("fused", "c1"): labels + 0.3 * rng.normal(size=50), ("fused", "c2"): labels + 0.3 * rng.normal(size=50),
    }
    rows = []
    for (name, category), values in scores.items():
        backbone, ensemble = ("a+b", "pca-global") if name == "fused" else (name, "none")
        write_cell(tmp_path / f"{name}-{category}", category, labels, values)
        rows.append({"cell": f"{name}-{category}", "detector": "patchcore", "ensemble": ensemble, "backbone": backbone, "category": category,
                     "status": "done", "image_auroc": auroc(labels, values)})
    records = {r["category"]: r for r in against_members(rows, lambda row: tmp_path / row["cell"])}
    assert set(records) == {"c1", "c2", "mean"}
    assert records["c1"]["best_member"] == "patchcore / a" and records["c2"]["best_member"] == "patchcore / b"
    mean_of = {name: np.mean([auroc(labels, scores[(name, c)]) for c in ("c1", "c2")]) for name in ("a", "b", "fused")}
    best = max(("a", "b"), key=lambda name: mean_of[name])
    mean = records["mean"]
    assert mean["best_member"] == f"patchcore / {best}" and mean["image_auroc"] == pytest.approx(mean_of["fused"])
    assert mean["difference"] == pytest.approx(mean_of["fused"] - mean_of[best])
    assert mean["verdict"] == "wins" and mean["low"] > 0  # b is weak on c1, a at chance on c2
    order = sorted(range(50), key=lambda i: f"img{i}.png")  # the images in the order the comparison reads them
    sets = [(labels[order], scores[("fused", c)][order], scores[(best, c)][order]) for c in ("c1", "c2")]
    assert paired_bootstrap_mean(sets) == (mean["difference"], mean["low"], mean["high"])
