"""The tests import the independent reference implementations from this folder
(the repository runs pytest with --import-mode=importlib, which does not add it to sys.path)."""

import sys
from pathlib import Path

HERE = str(Path(__file__).parent)
if HERE not in sys.path:
    sys.path.insert(0, HERE)
