"""Issue 9: a monitor failure on one rank never hangs the others in the cross-rank all-reduce.

Two gloo processes under DDP; on rank 1 the monitor fails at step 5 (inside the
cross-rank extension before its collective, or in the summary before the
extensions run). Today's code (before the fix) left rank 0 waiting forever in
the all-reduce; the test bounds the run and checks both ranks finish every step,
the failure is counted on the failing rank, and every rank sees it in the step's
``cross_rank_failed_ranks`` extra.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("_cross_rank_failure_worker.py")
STEPS, FAIL_AT = 12, 5


def _run(tmp_path, mode) -> list[dict]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(rank), "2", str(tmp_path), mode],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for rank in range(2)]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=90)[0])
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        pytest.fail(f"ranks hung after rank 1's monitor failed ({mode})")
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 0, out
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


def test_deep_statistics_failing_on_one_sharded_rank_give_nan_everywhere_and_no_hang(tmp_path):
    """FSDP2: the deep norms are all-reduced; rank 1's deep statistics raise at one deep step."""
    ranks = _run(tmp_path, "deep")
    for result in ranks:
        assert result["finished"] == STEPS
        assert result["groups_released"]
        # deep steps 2, 4, ..., 12: the one where rank 1 failed (its 6th step) is NaN on both ranks, only it
        assert [step for step, _ in result["deep_norms"]] == [2, 4, 6, 8, 10, 12]
        assert [finite for _, finite in result["deep_norms"]] == [True, True, False, True, True, True]
    assert ranks[1]["errors"] == {"deep_stats": 1} and ranks[0]["errors"] == {}


@pytest.mark.parametrize("mode", ["extension", "summary"])
def test_one_rank_failing_does_not_hang_the_others(tmp_path, mode):
    ranks = _run(tmp_path, mode)
    for r, result in enumerate(ranks):
        assert result["finished"] == STEPS
    assert ranks[1]["failed_steps"] == 1
    assert ranks[0]["failed_steps"] == 0
    where = "extension" if mode == "extension" else "pre_step_summary"
    assert ranks[1]["errors"].get(where) == 1, ranks[1]["errors"]
    if mode == "extension":
        # Rank 0 saw rank 1's failure at that step, and only then.
        assert ranks[0]["failed_extra"][FAIL_AT] == 1.0
        assert [f for i, f in enumerate(ranks[0]["failed_extra"]) if i != FAIL_AT] == [0.0] * (STEPS - 1)


def test_a_failed_rank_leaves_sharded_norms_unknown_never_non_finite(tmp_path):
    """FSDP2: the norms are sums over the ranks' shards, so rank 1's failure leaves them NaN.
    The STEP must say "no norm" (None), not a non-finite gradient: the sidecar would count it,
    page on it and repair it (skip, restore) for what was a monitor failure."""
    ranks = _run(tmp_path, "sharded")
    failed_step = FAIL_AT + 1  # the monitor counts steps from 1
    for r, result in enumerate(ranks):
        steps = {p["step"]: p for p in result["payloads"]}
        for step, p in steps.items():
            assert p["grad_nonfinite"] is False, (r, p)
            if step == failed_step:
                assert p["grad_norm"] is None and p["group_grad_norms"] == [None], (r, p)
                assert p["failed"] == 1.0
            else:
                assert p["grad_norm"] is not None and p["grad_norm"] > 0, (r, p)
                assert p["failed"] == 0.0
        # rank 1's own summary of that step failed (no STEP); rank 0 reports it, unknown
        assert failed_step in steps or r == 1
        assert len(steps) >= STEPS - 1
    assert ranks[1]["errors"].get("extension") == 1, ranks[1]["errors"]
