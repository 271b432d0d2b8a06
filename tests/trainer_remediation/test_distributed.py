"""Under torch.distributed (gloo, real processes) every rank applies rank 0's actions at the same step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from adamwatch.distributed import StepCoordinator
from adamwatch.remediation import Action

WORKER = Path(__file__).with_name("_dist_worker.py")
ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 120


def _run_ranks(tmp_path: Path, world: int, scenario: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "instrumentation"), OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(rank), str(world), str(tmp_path), scenario],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        )
        for rank in range(world)
    ]
    outputs = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=TIMEOUT_S)
            outputs.append(out)
    finally:
        for proc in procs:  # a hung collective fails the test instead of hanging CI
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    for rank, (proc, out) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"rank {rank} exited {proc.returncode}:\n{out[-3000:]}"
    return json.loads((tmp_path / "result.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_lr_cut_and_restore_issued_on_rank0_apply_on_every_rank(tmp_path: Path, world: int) -> None:
    result = _run_ranks(tmp_path, world, "ladder")
    assert result["problems"] == []
    # rank 0 pinned the restore to step 3 (it alone knew checkpoint 6 was spoiled by the incident at 7)
    assert result["applied"] == [
        ["reduce_lr", {"factor": 0.5}, "applied", 5, None],
        ["restore_checkpoint", {"step": 3}, "applied", 9, 3],
    ]
    assert result["stop"] == [False] * world  # the stop issued on the last rank was not applied
    assert result["dropped"][-1] == 1
    # restored at 3 then 9 more steps: the optimizer's step count is 12 on every rank
    assert set(result["steps"]) == {12}
    assert result["lrs"][0] == pytest.approx(0.5 * 1e-2 / (1 + 0.05 * 12))


@pytest.mark.slow
def test_interval_applies_at_the_next_multiple_on_every_rank(tmp_path: Path) -> None:
    result = _run_ranks(tmp_path, 2, "interval")
    assert result["problems"] == []
    assert [a[3] for a in result["applied"]] == [8, 12]  # issued at 5 and 9, exchanged every 4 steps
    assert [a[0] for a in result["applied"]] == ["reduce_lr", "restore_checkpoint"]


def test_without_a_process_group_local_actions_pass_through() -> None:
    assert not dist.is_initialized()
    coordinator = StepCoordinator(interval=4)
    actions = [Action("reduce_lr", {"factor": 0.5})]
    assert coordinator.exchange(3, actions) == actions
    assert coordinator.exchanges == 0
    with pytest.raises(ValueError, match="interval"):
        StepCoordinator(interval=0)
