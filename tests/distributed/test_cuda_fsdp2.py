"""On CUDA: FSDP2 (DTensor params) with the cross-rank reduction never synchronises with the host.

World size 1 over NCCL is enough to run the DTensor path, the reduce-scatter
wrapper and the all-reduce (``cross_rank="on"``); two devices, when present,
run it for real. Every synchronising CUDA call raises under
``set_sync_debug_mode("error")``; the monitor counts what raises inside it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from .rank_processes import run_ranks

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

WORKER = Path(__file__).with_name("_rank_worker.py")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("world", [1, 2])
def test_fsdp2_watched_steps_make_no_host_sync(tmp_path, world):
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} CUDA devices")
    results = run_ranks(tmp_path, world, WORKER, "cuda", "fsdp2", "fused", "none")
    for result in results:
        assert result["errors"] == 0, result["errors_by_where"]
        assert result["reductions"] == 33 + 3  # one per step, plus the deep ones (steps 10, 20, 30)
