"""Under torch.distributed every rank restores the same step, or every rank refuses (issue 9 item 3)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("_restore_worker.py")
ROOT = Path(__file__).resolve().parents[2]


def run_ranks(tmp_path: Path, scenario: str, world: int = 2) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "instrumentation"), OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(r), str(world), str(tmp_path), scenario],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for r in range(world)]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=120)[0])
    finally:
        for proc in procs:  # a hung collective fails the test instead of hanging it
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    for rank, (proc, out) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"rank {rank} exited {proc.returncode}:\n{out[-3000:]}"
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.mark.slow
def test_a_corrupt_newest_checkpoint_on_rank1_makes_both_ranks_restore_the_older_step(tmp_path):
    r0, r1 = run_ranks(tmp_path, "corrupt_newest_on_rank1")
    assert r0["restored"] == r1["restored"] == 20
    assert r0["adam_steps"] == r1["adam_steps"] == [20.0, 20.0]
    assert r0["params"] == r1["params"]
    assert (r0["corrupt"], r1["corrupt"]) == (0, 1)  # only rank 1's copy was bad, and it was reported there


@pytest.mark.slow
def test_when_no_step_is_usable_on_every_rank_every_rank_refuses(tmp_path):
    r0, r1 = run_ranks(tmp_path, "none_common")
    for result in (r0, r1):
        assert result["error_type"] == "NoUsableCheckpointError"
        assert "no checkpoint is usable on every rank (usable steps per rank: rank 0: [10], rank 1: [20])" \
            in result["error"]
        assert result["adam_steps"] == [35.0, 35.0]  # left as it was
    assert r0["params"] == r1["params"]


@pytest.mark.slow
def test_a_restore_issued_through_the_monitor_agrees_across_ranks(tmp_path):
    r0, r1 = run_ranks(tmp_path, "monitor")
    assert r0["restored"] == r1["restored"]
    assert r0["adam_steps"] == r1["adam_steps"]
    assert r0["params"] == r1["params"]
    # restored at 20 (30 is corrupt on rank 1), then the steps after the restore
    assert 20.0 < r0["adam_steps"][0] < 30.0


@pytest.mark.slow
def test_under_fsdp2_each_rank_restores_its_shards_of_the_same_step(tmp_path):
    r0, r1 = run_ranks(tmp_path, "fsdp2")
    assert r0["sharded"] == "DTensor"
    assert r0["restored"] == r1["restored"] == 20
    assert r0["adam_steps"] == r1["adam_steps"] == [20.0] * 4
    assert r0["params"] == r1["params"] == r0["params_at_20"]  # the full parameters of step 20
    assert (r0["corrupt"], r1["corrupt"]) == (0, 1)
