"""benchmarks/client_cpu.py at a tiny scale, so that it cannot rot: both rows print, and an idle
trainer's client thread made no turn in its idle second (a fact, not a timing)."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
BENCHMARK = ROOT / "benchmarks" / "client_cpu.py"


@pytest.mark.slow
def test_both_rows_print_and_the_idle_client_does_not_turn():
    done = subprocess.run([sys.executable, str(BENCHMARK), "--steps", "40", "--repeats", "1"], capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    for label in ("per-step", "deep every 10"):
        line = next((l for l in done.stdout.splitlines() if l.startswith(label)), None)
        assert line is not None, done.stdout
        numbers = re.findall(r"\d+\.\d+|\d+", line[len(label):])
        assert len(numbers) == 6, line  # CPU min / median / max, turns per step, step ms, idle turns
        assert float(numbers[1]) > 0  # the thread's CPU clock was read
        assert numbers[-1] == "0", line  # no turn while the trainer was idle
