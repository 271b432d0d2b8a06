"""CrossRankReduction on real ranks (gloo, 2-3 processes): global norms equal the framework's, one decision.

Driven directly (no sidecar): the worker computes the local summary with
StepStats, runs the reduction and compares with ``clip_grad_norm_``'s total
norm (``full_tensor()`` under FSDP2, ``FSDP.clip_grad_norm_`` under FSDP1).
The end-to-end tests through a real sidecar are in test_cross_rank_sidecar.py.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from .rank_processes import run_ranks

WORKER = Path(__file__).with_name("_rank_worker.py")
NAN_STEP = 3
STEPS = 6


def _close(a: float, b: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return a == pytest.approx(b, rel=2e-6, abs=1e-9)


def _check_exact(results: list[dict], sharded: bool) -> None:
    for rank, result in enumerate(results):
        for rec in result["records"]:
            if rec["step"] == NAN_STEP:
                continue
            assert _close(rec["total"], rec["ref_total"]), (rank, rec)
            assert len(rec["groups"]) == len(rec["ref_groups"])
            assert all(_close(a, b) for a, b in zip(rec["groups"], rec["ref_groups"])), (rank, rec)
            if "m_norms" in rec:
                assert len(rec["m_norms"]) == len(rec["ref_m_norms"])
                assert all(_close(a, b) for a, b in zip(rec["m_norms"], rec["ref_m_norms"])), (rank, rec)
                assert all(_close(a, b) for a, b in zip(rec["v_norms"], rec["ref_v_norms"])), (rank, rec)
            assert rec["nonfinite"] is False
        # one reduction per step, plus one per deep step when sharded (counted before the last one)
        assert result["records"][-1]["reductions"] == STEPS + (STEPS // 2 - 1 if sharded else 0)


def _check_one_decision(results: list[dict], world: int) -> None:
    # every rank saw the NaN step as non-finite and skipped it: equal Adam step counts
    for result in results:
        assert [r["nonfinite"] for r in result["records"]] == [s == NAN_STEP for s in range(1, STEPS + 1)]
        assert set(result["adam_steps"]) == {float(STEPS - 1)}
        assert all(math.isfinite(x) for p in result["params"] for x in p)


@pytest.mark.slow
@pytest.mark.parametrize(
    "layout,impl,world",
    [("ddp", "fused", 2), ("fsdp1", "fused", 2), ("fsdp2", "loop", 2), ("fsdp2", "foreach", 2), ("fsdp2", "fused", 2),
     # use_orig_params with 3 ranks: rank 0 holds no element of the bias group, yet reports its global norms
     ("fsdp1orig", "fused", 3)],
)
def test_norms_equal_the_frameworks_and_a_nan_on_one_rank_is_every_ranks_decision(tmp_path, layout, impl, world):
    results = run_ranks(tmp_path, world, WORKER, "pieces", layout, impl, "input")
    _check_exact(results, layout != "ddp")
    _check_one_decision(results, world)
    # rank 1's loss and its gradients before the reduction were the origin; every rank knows it
    for rank, result in enumerate(results):
        origin = result["records"][NAN_STEP - 1]["extras"]
        assert origin == {
            "nonfinite_origin_loss": float(rank == 1),
            "nonfinite_origin_grad": float(rank == 1),
            "nonfinite_origin_first_rank": 1.0,
            "cross_rank_failed_ranks": 0.0,  # no rank's monitor failed (issue 9)
        }
        quiet = [r["extras"]["nonfinite_origin_first_rank"] for r in result["records"] if r["step"] != NAN_STEP]
        assert quiet == [-1.0] * (STEPS - 1)
        assert result["grad_origin_watch"] == layout.replace("orig", "")


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["fsdp1", "fsdp2"])
def test_a_nan_in_one_ranks_shard_makes_every_rank_skip(tmp_path, layout):
    # the FSDP1 case: before, the poisoned rank skipped alone (step counts 4 and 5)
    world = 3
    results = run_ranks(tmp_path, world, WORKER, "pieces", layout, "fused", "shard")
    _check_exact(results, layout != "ddp")
    _check_one_decision(results, world)
    for result in results:
        origin = result["records"][NAN_STEP - 1]["extras"]
        # written after the reduce-scatter: no rank produced it in its own backward
        assert origin["nonfinite_origin_grad"] == 0.0 and origin["nonfinite_origin_first_rank"] == -1.0


@pytest.mark.slow
def test_without_the_communication_check_only_the_loss_names_the_origin(tmp_path):
    # DDP's all-reduced gradients are NaN on every rank: they must not make rank 0 look like the origin
    results = run_ranks(tmp_path, 2, WORKER, "pieces", "ddp", "fused", "input-unwatched")
    _check_one_decision(results, 2)
    for rank, result in enumerate(results):
        assert result["records"][NAN_STEP - 1]["extras"] == {
            "nonfinite_origin_loss": float(rank == 1),
            "nonfinite_origin_first_rank": 1.0,
            "cross_rank_failed_ranks": 0.0,  # no rank's monitor failed (issue 9)
        }


@pytest.mark.slow
def test_one_rank_fsdp2_runs_the_dtensor_path_exactly(tmp_path):
    # world size 1: DTensor params and grads all the same; what a CUDA check of the path runs
    [result] = run_ranks(tmp_path, 1, WORKER, "pieces", "fsdp2", "fused", "none")
    _check_exact([result], True)
    assert set(result["adam_steps"]) == {float(STEPS)}


@pytest.mark.slow
def test_replicated_tensors_inside_a_sharded_layout_count_once(tmp_path):
    results = run_ranks(tmp_path, 3, WORKER, "pieces", "ddp", "fused", "replicated-in-sharded")
    _check_exact(results, True)  # would be sqrt(3) times too large if each rank's copy were summed
