"""benchmarks/deep_stats.py at a tiny scale, so that it cannot rot: every row prints both timings,
and on CPU the default way is numpy's sort, for the demo's wide rows and 64 narrow ones alike."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
BENCHMARK = ROOT / "benchmarks" / "deep_stats.py"


@pytest.mark.slow
def test_rows_print_both_timings_and_the_cpu_default_is_numpy():
    pytest.importorskip("numpy")
    done = subprocess.run([sys.executable, str(BENCHMARK), "--rounds", "1", "--calls", "1",
                           "--models", "demo", "64-groups"], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {line.split()[0]: line.split() for line in done.stdout.splitlines()[2:]}
    assert rows["demo"][1] == "4x4096" and rows["64-groups"][1] == "128x256", done.stdout
    for row in rows.values():
        assert row[-1] == "numpy", done.stdout
        assert float(row[2]) > 0 and float(row[3]) > 0  # both ways were timed
