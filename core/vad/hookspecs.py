"""The whole plugin contract of vad, in one file.

Every hook follows the registration-callback style of ``llm`` and ``tox``: vad calls the
hook with a ``register`` function and the plugin calls it once per thing it provides::

    from vad import hookimpl

    @hookimpl
    def vad_register_detectors(register):
        register("vad_mything.model:MyDetector", name="mything", summary="One line for `vad list`.")

``register(target, *, name=None, summary=None)`` accepts a class, or an import path
``"module:attribute"`` that is only imported when the thing is used. Import paths keep
``vad --help`` and ``vad plugins`` fast: a plugin's entry module should not import torch.
When ``target`` is a class, ``name`` and ``summary`` default to its ``name`` attribute and the
first line of its docstring. The classes themselves implement the contracts in
:mod:`vad.contracts`.
"""

from __future__ import annotations

import pluggy

PROJECT = "vad"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def vad_register_backbones(register):
    """Register :class:`vad.contracts.Backbone` classes; ``--backbone NAME`` builds ``cls(NAME)``."""


@hookspec
def vad_register_detectors(register):
    """Register :class:`vad.contracts.Detector` classes (``--detector NAME``)."""


@hookspec
def vad_register_datasets(register):
    """Register :class:`vad.contracts.Dataset` classes (``--dataset NAME``)."""


@hookspec
def vad_register_augmentations(register):
    """Register :class:`vad.contracts.Augmentation` classes: image/feature transforms and anomaly generators."""


@hookspec
def vad_register_ensemblers(register):
    """Register :class:`vad.contracts.FeatureEnsembler` or :class:`vad.contracts.ScoreEnsembler` classes (``--ensemble NAME``)."""


@hookspec
def vad_register_metrics(register):
    """Register :class:`vad.contracts.Metric` classes computed on every evaluated category."""


@hookspec
def vad_register_thresholds(register):
    """Register :class:`vad.contracts.Threshold` classes (``--threshold NAME``) fitted on validation data."""


@hookspec
def vad_register_commands(app):
    """Add sub-commands to the Typer application ``app`` (e.g. ``@app.command()`` or ``app.add_typer``)."""
