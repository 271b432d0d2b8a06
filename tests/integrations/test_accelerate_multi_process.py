"""Accelerate across 2 CPU processes (gloo), accumulation and clipping: /metrics equals the framework's numbers.

Accelerate 1.x runs FSDP only on accelerators (its FSDP distributed type is
chosen for GPU-family devices; on CPU an FSDP plugin yields MULTI_CPU, i.e.
DDP), so on CPU the multi-process case people run is this one. Each rank's
exported pre-clip global norm must equal what ``accelerator.clip_grad_norm_``
returned, its loss the mean of its own micro-batch losses.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

pytest.importorskip("accelerate")

from tests.distributed.rank_processes import run_ranks  # noqa: E402

WORKER = Path(__file__).with_name("_accelerate_rank_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_accelerate_processes_export_the_frameworks_norm_and_their_own_loss(tmp_path, sidecar):
    results = run_ranks(tmp_path, 2, WORKER, str(_free_port()), sidecar.endpoint, timeout=150)
    for rank, result in enumerate(results):
        assert result["errors"] == 0 and result["steps"] == 6 and len(result["records"]) == 6
        labels = {"job": "accel-multi-cpu", "rank": str(rank)}
        sidecar.wait_value("adamwatch_optimizer_step", lambda v: v == 6, **labels)
        last = result["records"][-1]
        assert last["norm"] > 0.05  # clipped: the exported norm must be the one before clipping
        assert sidecar.value("adamwatch_grad_norm", param_group="all", **labels) == pytest.approx(last["norm"], rel=2e-6)
        assert sidecar.value("adamwatch_loss", **labels) == pytest.approx(last["loss"], rel=1e-6)
        assert sidecar.value("adamwatch_learning_rate", param_group="0", **labels) == pytest.approx(last["lr"])
        assert sidecar.value("adamwatch_steps_total", **labels) == 6
    # DDP averaged the gradients: both ranks' frameworks (and adamwatch) saw one global norm.
    assert results[0]["records"][-1]["norm"] == pytest.approx(results[1]["records"][-1]["norm"], rel=1e-6)
    assert results[0]["records"][-1]["loss"] != pytest.approx(results[1]["records"][-1]["loss"])
