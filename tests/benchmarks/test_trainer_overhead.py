"""benchmarks/trainer_overhead.py at a tiny scale, so that it cannot rot: every arm runs,
the sidecar receives every step, and bad options are refused by name (no timing asserted)."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
BENCHMARK = ROOT / "benchmarks" / "trainer_overhead.py"
ARMS = ("bare", "bare, second copy", "naive logger", "clipping", "adamwatch", "adamwatch + clipping",
        "adamwatch, deep every 2", "adamwatch + fingerprint every 3")


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCHMARK), *args], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


@pytest.mark.slow
def test_every_arm_runs_and_the_sidecar_receives_every_step():
    done = run("--block", "2", "--rounds", "7", "--repeats", "2", "--warmup-rounds", "0", "--fingerprint-every", "3")
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    for arm in ARMS:
        line = next((l for l in out.splitlines() if re.match(re.escape(arm) + r"\s{2,}\d", l)), None)
        assert line is not None, f"no row for {arm!r}:\n{out}"
        assert len(re.findall(r"\d+\.\d{4} / \d+\.\d{4} / \d+\.\d{4}", line)) == 2  # wall and thread-CPU ratios
    # 2 steps x 7 rounds x 2 repeats per arm, every one of them in the sidecar's adamwatch_steps_total
    assert "sidecar received every step of every watched arm (28 each): yes" in out
    # the run states its own resolution: the second bare copy's distance from 1
    twin = next(l for l in out.splitlines() if l.startswith("bare, second copy "))
    median = float(re.findall(r"\d+\.\d{4} / (\d+\.\d{4}) / \d+\.\d{4}", twin)[0])
    assert f"bare's second copy reads {median:.4f} (median)" in out
    assert f"smaller than {abs(median - 1):.4f} are not resolved" in out


def test_more_groups_than_parameter_tensors_is_refused_by_name():
    done = run("--groups", "64", "--rounds", "1", "--repeats", "1")
    assert done.returncode != 0
    assert "--groups 64: the model has only 28 parameter tensors" in done.stderr
