"""The cross-rank reduction and the pre-reduction check add no host reads to an iteration (gloo ranks).

Counted like tests/trainer/test_no_host_sync.py, over forward, backward (where
the communication hook runs) and the step (where the all-reduce runs), with
deep statistics (and their all-reduce) on every step.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .rank_processes import run_ranks

WORKER = Path(__file__).with_name("_rank_worker.py")


@pytest.mark.slow
@pytest.mark.parametrize("layout,impl", [("ddp", "fused"), ("fsdp1", "foreach"), ("fsdp2", "fused")])
def test_a_watched_iteration_makes_as_many_host_reads_as_a_bare_one(tmp_path, layout, impl):
    results = run_ranks(tmp_path, 2, WORKER, "nosync", layout, impl, "none")
    for result in results:
        assert result["errors"] == 0
        for bare, watched in result["counts"]:
            assert watched == bare
        # the reduction really ran: per step, plus the deep one when sharded
        assert result["reductions"] == 4 * (1 if layout == "ddp" else 2)
