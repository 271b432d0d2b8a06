"""Shared test fixtures: paths to the repository and the example model."""

from __future__ import annotations

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The example model (examples/tiny_gpt.py) is shared by the demo, the
# benchmarks and the tests; it is not part of the installed package.
if str(ROOT / "examples") not in sys.path:
    sys.path.insert(0, str(ROOT / "examples"))
