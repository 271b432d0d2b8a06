"""A Checkpointer on rank 0 only: restores are refused with a reason on every rank, never a hang.

Before, rank 0 entered the restore's cross-rank agreement (a collective) while
the other ranks, which have no Checkpointer, rejected the restore locally:
rank 0 waited forever. Real gloo processes, bounded in time.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ..distributed.rank_processes import run_ranks

WORKER = Path(__file__).with_name("_rank0_checkpoint_worker.py")


@pytest.mark.slow
def test_a_restore_with_a_checkpointer_on_rank0_only_is_refused_and_the_run_goes_on(tmp_path: Path) -> None:
    rank0, rank1 = run_ranks(tmp_path, 2, WORKER, timeout=120)
    restores = [r for r in rank0["results"] if r[0] == "restore_checkpoint"]
    assert len(restores) == 1 and restores[0][1] == "rejected"
    assert "same checkpointing on every rank" in restores[0][2] and "rank 1: no Checkpointer" in restores[0][2]
    # Both ranks trained every step (no restore moved the step back) and the replicas still agree.
    assert rank0["steps"] == rank1["steps"] == 12
    assert rank0["sums"][0] == rank0["sums"][1]
    assert len(rank0["warnings"]) == 1 and rank1["warnings"] == []
