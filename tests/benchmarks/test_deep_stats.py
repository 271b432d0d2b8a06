"""benchmarks/deep_stats.py at a tiny scale, so that it cannot rot: every row prints both timings,
and the default way matches the shape (selection for the demo's wide rows, sort for 64 narrow ones)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
BENCHMARK = ROOT / "benchmarks" / "deep_stats.py"


@pytest.mark.slow
def test_rows_print_and_the_default_way_follows_the_shape():
    pytest.importorskip("numpy")
    done = subprocess.run([sys.executable, str(BENCHMARK), "--rounds", "1", "--calls", "1",
                           "--models", "demo", "64-groups"], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {line.split()[0]: line.split() for line in done.stdout.splitlines()[2:]}
    assert rows["demo"][1] == "4x4096" and rows["demo"][-1] == "select", done.stdout
    assert rows["64-groups"][-1] == "sort", done.stdout
    for row in rows.values():
        assert float(row[3]) > 0 and float(row[4]) > 0  # both ways were timed
