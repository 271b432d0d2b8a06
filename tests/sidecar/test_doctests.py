"""The examples in the sidecar modules' docstrings run."""

from __future__ import annotations

import doctest
import importlib

import pytest


@pytest.mark.parametrize("module", ["adamwatch_sidecar.run_state", "adamwatch_sidecar.collector",
                                    "adamwatch_sidecar.config"])
def test_docstring_examples(module: str) -> None:
    result = doctest.testmod(importlib.import_module(module))
    assert result.attempted > 0 and result.failed == 0
