"""benchmarks/config_check.py, clip_overhead.py, step_sections.py, sidecar_render.py: tiny runs, so they cannot rot.

The first three import their model and optimizer from benchmarks/trainer_overhead.py; its
rewrite once left them failing at import while the README still quoted their figures.
The trainer ones run against their real sidecar; each must print every row (facts, not timings).
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"


def run(name: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(BENCHMARKS / name), *args], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_config_check_prints_both_ratios():
    out = run("config_check.py", "--pairs", "4", "--warmup", "1")
    assert "watched with check / watched without   median ratio" in out, out
    assert "check alone / watched step" in out, out


@pytest.mark.slow
def test_clip_overhead_prints_every_arm():
    out = run("clip_overhead.py", "--iterations", "4", "--warmup", "1", "--threads", "1")
    for arm in ("clip", "adamwatch", "adamwatch+clip"):
        assert any(line.split()[:1] == [arm] and "median ratio to bare" in line for line in out.splitlines()), out
    assert "adamwatch on top of clipping:" in out, out


@pytest.mark.slow
def test_step_sections_prints_every_arm_and_both_comparisons():
    out = run("step_sections.py", "--iterations", "6", "--repeats", "2", "--warmup", "1", "--threads", "1")
    lines = out.splitlines()
    for arm in ("bare", "bare, second copy", "naive logger", "clipping", "adamwatch", "adamwatch + clipping"):
        assert any(line.startswith(arm + " ") and line.split()[-1].startswith(("+", "-")) for line in lines), out
    assert any(line.startswith("resolution of this run: bare's second copy reads ") for line in lines), out
    assert any(line.startswith("adamwatch - naive logger: ") for line in lines), out
    assert any(line.startswith("adamwatch + clipping - clipping: ") for line in lines), out


def test_sidecar_render_prints_every_case():
    out = run("sidecar_render.py", "--ranks", "4", "16", "--scrapes", "2", "--ingest-seconds", "0.3",
              "--repeats", "1")
    for case in ("idle", "all stepped", "all new"):
        for ranks in ("4", "16"):
            assert any(line.split()[:len(case.split()) + 1] == [*case.split(), ranks] for line in out.splitlines()), out
    assert "ingest with scrapes / without:" in out, out
