"""vad: plugin-based visual anomaly detection.

Plugin authors need two names from here: :data:`hookimpl` (the marker for hook
implementations) and the contracts in :mod:`vad.contracts`. Importing ``vad`` is cheap: it
does not import torch.
"""

from vad.hookspecs import hookimpl

__version__ = "0.1.0"
__all__ = ["hookimpl", "__version__"]
