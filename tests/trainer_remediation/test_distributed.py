"""Under torch.distributed (gloo, real processes) every rank applies rank 0's actions at the same step.

Rank 0's actions are broadcast asynchronously over a CPU/gloo channel at each
exchange point and applied one interval later, so a step never waits for
another rank. Every test bounds its time: a hung collective fails, it does not hang CI.
"""

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


def _run_ranks(tmp_path: Path, world: int, scenario: str, *extra: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "instrumentation"), OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(rank), str(world), str(tmp_path), scenario, *extra],
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


def _check_ladder(result: dict, world: int) -> None:
    assert result["problems"] == []  # identical applied lists, params, m, v, step, lrs on every rank
    assert result["issued"] == [["reduce_lr", 5], ["restore_checkpoint", 9]]
    # interval 1: applied exactly one step after rank 0 issued it; rank 0 pinned the restore
    # to step 3 (it alone knew checkpoint 6 was spoiled by the incident at 7)
    assert result["applied"] == [
        ["reduce_lr", {"factor": 0.5}, "applied", 6, None],
        ["restore_checkpoint", {"step": 3}, "applied", 10, 3],
    ]
    assert result["stop"] == [False] * world  # the stop issued on the last rank was not applied
    assert result["dropped"][-1] == 1
    assert result["lost"] == [0] * world
    # restored at 3 (after step 10), then steps 11..18: the optimizer's step count is 11 on every rank
    assert set(result["steps"]) == {11}
    assert result["lrs"][0] == pytest.approx(0.5 * 1e-2 / (1 + 0.05 * 11))


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_lr_cut_and_restore_issued_on_rank0_apply_on_every_rank(tmp_path: Path, world: int) -> None:
    result = _run_ranks(tmp_path, world, "ladder")
    assert result["side_group"] is False  # gloo default: used directly
    _check_ladder(result, world)


@pytest.mark.slow
def test_a_gloo_side_group_carries_the_commands_when_the_default_is_not_gloo(tmp_path: Path) -> None:
    # the worker makes the coordinator see a non-gloo default backend, as under NCCL
    result = _run_ranks(tmp_path, 2, "ladder", "side")
    assert result["side_group"] is True
    _check_ladder(result, 2)


@pytest.mark.slow
def test_action_applies_on_every_rank_exactly_one_interval_after_its_exchange_point(tmp_path: Path) -> None:
    result = _run_ranks(tmp_path, 2, "interval")  # exchange points every 4 steps
    assert result["problems"] == []
    assert result["issued"] == [["reduce_lr", 4], ["restore_checkpoint", 9]]
    # issued at exchange point 4: applied at 8; issued at 9: broadcast at 12, applied at 16
    assert [a[:1] + a[3:4] for a in result["applied"]] == [["reduce_lr", 8], ["restore_checkpoint", 16]]
    assert set(result["steps"]) == {5}  # restored to 3, then steps 17 and 18


@pytest.mark.slow
def test_a_step_never_waits_for_a_rank_less_than_an_interval_behind(tmp_path: Path) -> None:
    # Rank 0 starts only once rank 1 has returned from steps 1..7 (interval 4): with a
    # blocking collective rank 1 would wait for rank 0 at step 4 and both would time out.
    result = _run_ranks(tmp_path, 2, "noblock")
    rank0, rank1 = result["ranks"]
    assert rank0["applied"] == rank1["applied"] == [["reduce_lr", 8]]  # issued at 4, applied one interval later
    assert rank0["exchanges"] == rank1["exchanges"] == 3
    assert rank1["first7_max_s"] < 5  # it did not wait for rank 0 (which had not started)


@pytest.mark.slow
def test_the_monitor_applies_rank0_actions_one_interval_later_on_every_rank(tmp_path: Path) -> None:
    # adamwatch.watch(..., command_interval=2); reduce_lr called on every rank after step 4,
    # restore_checkpoint(step=3) on rank 0 only after step 9
    result = _run_ranks(tmp_path, 2, "monitor")
    assert result["problems"] == []  # params, m, v, step and lrs bit-identical at the end
    rank0, rank1 = result["ranks"]
    assert rank0["trace"] == rank1["trace"]  # same monitor step, lr scale and lr after every iteration
    assert rank0["errors"] == rank1["errors"] == 0
    # rank 1's reduce_lr is refused with an exception naming the fix, never dropped behind an id
    assert rank0["refused"] is False and "only rank 0" in rank1["refused"] and "monitor.rank == 0" in rank1["refused"]
    assert [r["dropped"] for r in result["ranks"]] == [0, 0]
    steps = [t[0] for t in rank0["trace"]]
    scales = [t[1] for t in rank0["trace"]]
    # picked up at 5, broadcast at exchange point 6, applied at 8
    assert scales[:7] == [1.0] * 7 and scales[7:] == [0.5] * 9
    # picked up at 10 (an exchange point), applied at 12: the monitor's step goes back to 3
    assert steps == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 3, 4, 5, 6, 7]


@pytest.mark.slow
def test_close_with_a_broadcast_in_flight_returns_its_actions_and_never_hangs(tmp_path: Path) -> None:
    result = _run_ranks(tmp_path, 2, "close")
    for rank in result["ranks"]:
        assert rank["first"] == []  # the action issued at exchange point 1 applies at 2 ...
        assert rank["lost"] == ["reduce_lr"]  # ... so close() at 1 returns it, on every rank
        assert rank["after_close"] == []
        assert rank["stuck_lost"] == []
    # rank 1's last broadcast could never complete (rank 0 never joined): close gave up after 1 s
    assert 0.9 < result["ranks"][1]["stuck_close_s"] < 10


@pytest.mark.slow
def test_actions_that_do_not_fit_wait_in_order_and_an_oversized_one_is_dropped(tmp_path: Path) -> None:
    result = _run_ranks(tmp_path, 2, "buffer")  # 256-byte buffer: one ~200-byte action per round
    for rank in result["ranks"]:
        assert rank["applied"] == [[0.5, 2], [0.6, 3], [0.7, 4]]
    assert [r["dropped"] for r in result["ranks"]] == [1, 0]


def test_without_a_process_group_local_actions_pass_through() -> None:
    assert not dist.is_initialized()
    coordinator = StepCoordinator(interval=4)
    actions = [Action("reduce_lr", {"factor": 0.5})]
    assert coordinator.exchange(3, actions) == actions  # no lag without torch.distributed
    assert coordinator.exchanges == 0
    assert coordinator.close() == []
    with pytest.raises(ValueError, match="interval"):
        StepCoordinator(interval=0)
    with pytest.raises(ValueError, match="buffer_bytes"):
        StepCoordinator(buffer_bytes=8)
