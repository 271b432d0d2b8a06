"""benchmarks/spike_guard.py at a tiny scale, so that it cannot rot: every arm trains, the table is complete,
and the guards caught every injected bad batch."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
BENCHMARK = ROOT / "benchmarks" / "spike_guard.py"


@pytest.mark.slow
def test_the_benchmark_runs_and_the_guards_catch_the_bad_batches():
    result = subprocess.run([sys.executable, str(BENCHMARK), "--steps", "150", "--seeds", "0", "--pairs", "5"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in result.stdout.splitlines() if re.match(r"\| (none|fixed_clip|clip|skip) \|", line)}
    assert set(rows) == {"none", "fixed_clip", "clip", "skip"}
    injected = int(re.search(r"Injected bad batches: (\d+)", result.stdout).group(1))
    assert injected > 0
    activations = {arm: int(cols[4].split()[0]) for arm, cols in rows.items()}
    assert activations["none"] == activations["fixed_clip"] == 0
    # every bad batch (a x20 garbage loss) is caught by both guards
    assert activations["clip"] >= injected and activations["skip"] >= injected
    # what the guards handled is not counted as a spike by the sidecar
    spikes = {arm: int(cols[0].split()[0]) for arm, cols in rows.items()}
    assert spikes["clip"] < spikes["none"] and spikes["skip"] < spikes["none"]
