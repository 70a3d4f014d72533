"""vad: plugin-based visual anomaly detection.

The plugin API is what plugins may import; the rest of the package (the pipeline, the model
composition, the CLI, the report) is internal and may change without notice:

* :data:`hookimpl`: the marker of hook implementations (:mod:`vad.hookspecs` states the hooks);
* :mod:`vad.contracts`: the classes plugins implement and the data they exchange;
* :mod:`vad.options`: ``option``, ``Options``, ``REQUIRED``, ``OptionError`` (declared options);
* :mod:`vad.training`: ``TrainedDetector`` and ``member_session`` (the shared training loop);
* :mod:`vad.calibration`: conformal ranks and false-alarm estimates for threshold rules;
* :mod:`vad.errors`: ``VadError`` and its kinds, the errors a user can act on;
* :mod:`vad.features`: ``PatchFeatures`` and ``channel_pool``, patch features over any backbone;
* :mod:`vad.distillation`: image folders, samplers and teacher files for teacher distillation;
* :mod:`vad.images` and :mod:`vad.preprocess`: decoding, resizing and batching images;
* :mod:`vad.artifacts`: atomic writes and safetensors files;
* :mod:`vad.progress`: ``info``, ``warn`` and ``track`` (bars, quiet and JSON modes);
* :mod:`vad.plugins`: ``get_registry``, to use another registered component;
* :mod:`vad.testing`: the conformance kit and the pytest fixtures.

Importing ``vad`` is cheap: it does not import torch.
"""

from vad.hookspecs import hookimpl

__version__ = "0.1.0"

#: The modules plugins may import (a test keeps the first-party plugins to them).
PLUGIN_API = (
    "vad.contracts",
    "vad.options",
    "vad.training",
    "vad.calibration",
    "vad.errors",
    "vad.features",
    "vad.distillation",
    "vad.images",
    "vad.preprocess",
    "vad.postprocess",
    "vad.artifacts",
    "vad.progress",
    "vad.plugins",
    "vad.testing",
    "vad.hookspecs",
)

__all__ = ["PLUGIN_API", "__version__", "hookimpl"]
