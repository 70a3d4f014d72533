"""Declared options: coercion, errors that name component, option, value and what is allowed,
hparams, listings; `--set` checked before anything is written; fusion decided by type."""

from __future__ import annotations

import json
from typing import Literal

import pytest

from vad.build import backbone_specs, check_options, is_score_ensembler
from vad.config import DEFAULTS, RunConfig
from vad.contracts import Detector, Prediction, ScoreEnsembler
from vad.errors import VadError
from vad.options import REQUIRED, Configurable, OptionError, Options, describe_options, option
from vad.plugins import plugin_registering
from tests.conftest import run_vad


class Widget(Configurable):
    """A component with one option of each kind."""

    name = "widget"
    role = "detector"

    class Options(Options):
        ratio: float = option(0.1, "A fraction.", gt=0, le=1)
        count: int = option(3, "A count.", ge=1)
        size: int | None = option(None, "An optional multiple of 32.", ge=32, multiple_of=32)
        odd: int = option(3, "An odd size.", ge=1, rule=(lambda v: v % 2 == 1, "odd"))
        mode: Literal["auto", "fast"] = option("auto", "A choice.")
        flag: bool = option(False, "A flag.")
        names: list[str] = option(["a"], "Some names.")
        fractions: list[float] = option([0.8, 0.9], "Some fractions.", gt=0, le=1)
        grid: tuple[int, int] | int | None = option(None, "A grid.", ge=1)
        gamma: Literal["scale", "auto"] | float = option("scale", "A word or a number.", gt=0)
        extra: dict[str, dict[str, float]] = option({}, "Options by name.")


class NeedsValue(Configurable):
    name = "needs-value"
    role = "threshold"

    class Options(Options):
        value: float = option(REQUIRED, "The value.")


def test_values_from_yaml_and_the_command_line_are_coerced():
    widget = Widget(ratio="1e-2", count=2.0, size="64", flag="yes", grid=[2, 3], gamma="0.5", fractions=(1, "0.5"))
    options = widget.options
    assert (options.ratio, options.count, options.size, options.flag) == (0.01, 2, 64, True)
    assert options.grid == (2, 3) and options.gamma == 0.5 and options.fractions == (1.0, 0.5)
    assert Widget(grid=4).options.grid == 4 and Widget(gamma="auto").options.gamma == "auto"
    assert isinstance(Widget(count=2).options.count, int)


def test_hparams_are_json_safe_and_rebuild_the_component():
    widget = Widget(names=["x", "y"], extra={"cutout": {"size": 0.2}})
    assert json.loads(json.dumps(widget.hparams)) == widget.hparams
    assert widget.hparams["names"] == ["x", "y"]
    assert Widget(**widget.hparams).options == widget.options


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"ratio": 1.5}, "option ratio=1.5 is not allowed; ratio must be a number, > 0 and <= 1"),
        ({"ratio": True}, "option ratio=True is not allowed"),
        ({"ratio": float("nan")}, "option ratio=nan is not allowed"),
        ({"count": 2.5}, "count must be an integer, >= 1"),
        ({"size": 48}, "size must be an integer or null, >= 32 and a multiple of 32"),
        ({"odd": 4}, "odd must be an integer, >= 1 and odd"),
        ({"mode": "fsat"}, "mode must be one of 'auto', 'fast' (did you mean 'fast'?)"),
        ({"flag": "maybe"}, "flag must be true or false"),
        ({"names": "a"}, "names must be a list of strings"),
        ({"fractions": [0.5, 2]}, "fractions must be a list of numbers, > 0 and <= 1"),
        ({"grid": [1, 2, 3]}, "grid must be a list of 2 integers or an integer or null, >= 1"),
        ({"gamma": -1}, "gamma must be one of 'scale', 'auto' or a number, > 0"),
        ({"extra": {"cutout": 3}}, "extra must be a mapping of names to mappings of names to numbers"),
    ],
)
def test_bad_values_name_the_component_the_option_the_value_and_what_is_allowed(values, message):
    with pytest.raises(OptionError) as caught:
        Widget(**values)
    assert str(caught.value).startswith("detector 'widget': option ")
    assert message in str(caught.value)
    assert caught.value.option == next(iter(values))


def test_unknown_and_missing_options():
    with pytest.raises(VadError, match=r"detector 'widget' has no option 'ration' \(did you mean 'ratio'\?\); its options are: ratio, count"):
        Widget(ration=0.2)
    with pytest.raises(VadError, match=r"threshold 'needs-value' needs option 'value' \(The value.\); give it with --set needs-value.value=VALUE"):
        NeedsValue()


def test_options_are_frozen_and_replace_validates():
    widget = Widget()
    with pytest.raises(AttributeError):
        widget.options.ratio = 0.5
    assert widget.options.replace(count=5).count == 5
    with pytest.raises(OptionError, match="count=0"):
        widget.options.replace(count=0)


def test_describe_options_lists_type_default_bounds_choices_and_description():
    records = {r["name"]: r for r in describe_options(Widget.Options)}
    assert records["ratio"] == {"name": "ratio", "type": "a number", "default": 0.1, "required": False, "allowed": "a number, > 0 and <= 1", "description": "A fraction.", "gt": 0, "le": 1}
    assert records["mode"]["choices"] == ["auto", "fast"]
    assert records["names"]["default"] == ["a"]
    assert describe_options(NeedsValue.Options)[0]["default"] == "required"


# --------------------------------------------------------------------------- CLI and core


def test_vad_list_details_json_gives_every_option_of_every_detector():
    result = run_vad("list", "detectors", "--details", "--json")
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert {"patchcore", "padim", "simplenet", "draem"} <= set(rows)
    for name, row in rows.items():
        assert row["options"], name
        for record in row["options"]:
            assert {"name", "type", "default", "allowed", "description"} <= set(record), (name, record)
            assert record["description"], (name, record["name"])
    coreset = next(r for r in rows["patchcore"]["options"] if r["name"] == "coreset_ratio")
    assert coreset["default"] == 0.1 and coreset["gt"] == 0 and coreset["le"] == 1
    plain = run_vad("list", "detectors", "--details")
    assert "--set patchcore.coreset_ratio=…  default 0.1; a number, > 0 and <= 1" in plain.stdout


@pytest.mark.parametrize(
    ("assignment", "message"),
    [
        ("patchcore.coreset_ratio=1.5", "detector 'patchcore': option coreset_ratio=1.5 is not allowed; coreset_ratio must be a number, > 0 and <= 1"),
        ("patchcore.coreset_ration=0.1", "detector 'patchcore' has no option 'coreset_ration' (did you mean 'coreset_ratio'?)"),
        ("patchcor.coreset_ratio=0.1", "no installed plugin registers 'patchcor' (did you mean 'patchcore'?)"),
        ("simplenet.epochs=zero", "detector 'simplenet': option epochs='zero' is not allowed"),  # not even used by this run
        ("report.max_overlays=-1", "report: option max_overlays=-1 is not allowed"),
    ],
)
def test_a_wrong_set_value_fails_before_anything_is_written(tmp_path, assignment, message):
    result = run_vad("run", "--detector", "patchcore", "--set", assignment, "--output", str(tmp_path / "run"), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not any(tmp_path.iterdir())


class Median(ScoreEnsembler):
    """A third-party score ensembler whose name has no score-like prefix."""

    name = "median"

    def calibrate(self, member_predictions):
        pass

    def combine(self, member_predictions):
        import torch

        return Prediction(torch.stack([p.scores for p in member_predictions]).median(0).values)


def test_a_score_ensembler_named_median_is_treated_as_a_score_ensembler(register_plugin):
    with register_plugin(plugin_registering("ensemblers", Median), name="median-plugin") as registry:
        assert is_score_ensembler("median", registry)
        # a score-level ensemble needs no feature fusion: the single default backbone, not two
        assert backbone_specs(RunConfig(ensemble="median", detectors=["patchcore", "padim"]), registry) == [DEFAULTS["backbone"]]
        assert backbone_specs(RunConfig(ensemble="pca-global"), registry) == list(DEFAULTS["ensemble_backbones"])
        check_options(RunConfig(ensemble="median", options={"median": {}}), registry)


def test_help_text_is_the_description_and_the_default_with_list_items_comma_separated():
    class Declared(Options):
        steps: int = option(60000, "Optimiser steps.")
        sizes: list[int] = option([17, 33], "Patch sizes.")

    assert Declared.help_text("steps") == "Optimiser steps. Default 60000."
    assert Declared.help_text("sizes") == "Patch sizes. Default 17, 33."
