"""Options per category (``category_options``, ``{category}`` in string values): merged over
``options`` for each category's model, checked before the run folder exists, kept per cell by
``vad bench``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from vad.config import RunConfig
from vad.errors import VadError
from vad.pipeline import run
from tests.conftest import tiny_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "contrib" / "plugin-template"))
import vad_template  # noqa: E402  (the template's detector, imported from its folder)


@pytest.fixture
def registry(vad_fakes, register_plugin):
    with register_plugin(vad_template, name="template-under-test") as registry:
        yield registry


def test_category_options_merge_over_options_and_fill_the_placeholder():
    config = RunConfig(
        options={"winclip": {"class_name": "{category}", "mode": "zero-shot", "k": 2}},
        category_options={"bottle": {"winclip": {"mode": "few-shot"}, "anomaly-dino": {"masking": True}}},
    )
    bottle, cable = config.for_category("bottle"), config.for_category("cable")
    assert bottle.options == {"winclip": {"class_name": "bottle", "mode": "few-shot", "k": 2}, "anomaly-dino": {"masking": True}}
    assert cable.options == {"winclip": {"class_name": "cable", "mode": "zero-shot", "k": 2}}
    assert config.options["winclip"]["class_name"] == "{category}"  # the run's own config is untouched


def test_set_keeps_the_placeholder_as_a_string():
    from vad.config import parse_set

    assert parse_set(["winclip.class_name={category}", "folder.normal_dir=good-{category}"]) == {
        "winclip": {"class_name": "{category}"}, "folder": {"normal_dir": "good-{category}"},
    }


@pytest.mark.parametrize("value", [["a"], {"tiny-a": 1}, {"tiny-a": {"fake-backbone": 3}}])
def test_category_options_of_the_wrong_shape_are_refused(value):
    with pytest.raises(VadError, match="category_options maps each category"):
        RunConfig(category_options=value)


def seed_of(model_folder: Path) -> int:
    """The fake backbone's seed as the saved model records it."""
    source = json.loads((model_folder / "model.json").read_text())["members"][0]["source"]
    return source["hparams"]["backbone"]["hparams"]["seed"]


def test_each_category_is_built_with_its_options(registry, tmp_path):
    config = tiny_config(tmp_path, categories=[], category_options={"tiny-b": {"fake-backbone": {"seed": 5}}})
    folder, results = run(config, registry)
    assert [r.category for r in results] == ["tiny-a", "tiny-b"]
    assert seed_of(folder / "tiny-a" / "model") == 0 and seed_of(folder / "tiny-b" / "model") == 5
    assert yaml.safe_load((folder / "config.yaml").read_text())["category_options"] == {"tiny-b": {"fake-backbone": {"seed": 5}}}


@pytest.mark.parametrize(
    "category_options, message",
    [
        ({"tiny-z": {"fake-backbone": {"seed": 1}}}, r"category_options names .tiny-z., which the data set .tiny. does not have \(its categories: tiny-a, tiny-b\)"),
        ({"tiny-b": {"fake-backbone": {"size": 8}}}, r"\[tiny-b\] .*size"),
        ({"tiny-b": {"patchcore-typo": {"k": 1}}}, r"\[tiny-b\] .*no installed plugin registers 'patchcore-typo'"),
    ],
)
def test_bad_category_options_stop_the_run_before_its_folder_exists(registry, tmp_path, category_options, message):
    with pytest.raises(VadError, match=message):
        run(tiny_config(tmp_path, categories=[], category_options=category_options), registry)
    assert not (tmp_path / "run").exists()


def test_a_bench_cell_keeps_its_categorys_options_for_the_components_it_uses(registry, tmp_path):
    from vad.bench import Cell, cell_config

    base = dict(dataset="tiny", threshold="max", device="cpu", report=False,
                category_options={"tiny-a": {"fake-backbone": {"seed": 3}, "padim": {"d": 10}}, "tiny-b": {"fake-backbone": {"seed": 4}}})
    cell = Cell(detectors=["feature-distance"], ensemble=None, backbones=["fake-backbone"], category="tiny-a")
    config = cell_config(base, cell, tmp_path / "cell", registry)
    assert config.category_options == {"tiny-a": {"fake-backbone": {"seed": 3}}}
