"""Through a real sidecar: every rank exports the framework's global norms and where a NaN began.

2-3 gloo rank processes train a small model under DDP, FSDP1 or FSDP2 with
``adamwatch.watch()`` (which registers the cross-rank reduction first) and
stream to one real sidecar; /metrics is compared with the norms the
framework itself computed (``clip_grad_norm_``, ``full_tensor()``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.integration.conftest import SidecarProcess

from .rank_processes import run_ranks

WORKER = Path(__file__).with_name("_rank_worker.py")
NAN_STEP = 3
STEPS = 6


@pytest.fixture
def sidecar(tmp_path):
    proc = SidecarProcess(str(tmp_path))
    proc.start()
    yield proc
    proc.stop()


def _series(samples: dict, name: str, **labels: str) -> dict[tuple, float]:
    """Samples of ``name`` whose labels include ``labels``."""
    return {
        key: value for key, value in samples.items()
        if key[0] == name and set(labels.items()) <= set(key[1])
    }


def _by_group(samples: dict, name: str, job: str, rank: int) -> list[float]:
    series = _series(samples, name, job=job, rank=str(rank))
    groups = sorted((dict(k[1])["param_group"], v) for k, v in series.items() if dict(k[1])["param_group"] != "all")
    return [v for _, v in groups]


@pytest.mark.slow
@pytest.mark.parametrize(
    "layout,impl,world",
    [("ddp", "fused", 2), ("fsdp1", "fused", 2), ("fsdp2", "loop", 2), ("fsdp2", "foreach", 2), ("fsdp2", "fused", 3),
     ("fsdp1orig", "fused", 3)],
)
def test_every_rank_exports_the_frameworks_norms_and_names_the_rank_where_the_nan_began(
    tmp_path, sidecar, layout, impl, world
):
    results = run_ranks(tmp_path, world, WORKER, "monitor", layout, impl, "input", sidecar.endpoint)
    job = f"dist-{layout}-{impl}"
    samples = sidecar.samples()
    for rank, result in enumerate(results):
        assert result["errors"] == 0
        last = result["records"][-1]
        grad_all = _series(samples, "adamwatch_grad_norm", job=job, rank=str(rank), param_group="all")
        assert list(grad_all.values()) == [pytest.approx(last["ref_total"], rel=2e-6)]
        assert _by_group(samples, "adamwatch_grad_norm", job, rank) == pytest.approx(last["ref_groups"], rel=2e-6)
        # Adam's m and v: global norms (deep statistics at step 6)
        assert _by_group(samples, "adamwatch_adam_exp_avg_norm", job, rank) == pytest.approx(last["ref_m_norms"], rel=2e-6)
        assert _by_group(samples, "adamwatch_adam_exp_avg_sq_norm", job, rank) == pytest.approx(
            last["ref_v_norms"], rel=2e-6)
        # rank 1's NaN: its own loss and gradients were the origin, first (and only) at step 3
        origin = {
            source: sidecar.value("adamwatch_nonfinite_origin_steps_total", job=job, rank=str(rank), source=source)
            for source in ("loss", "grad")
        }
        assert origin == {"loss": float(rank == 1), "grad": float(rank == 1)}
        began = sidecar.value("adamwatch_nonfinite_origin_step", job=job, rank=str(rank), source="grad")
        assert began == (float(NAN_STEP) if rank == 1 else None)
        assert sidecar.value("adamwatch_nonfinite_first_rank", job=job, rank=str(rank)) == 1.0
        # one decision: every rank counted the step as non-finite
        assert sidecar.value("adamwatch_nonfinite_steps_total", job=job, rank=str(rank), source="grad") == 1.0
    # the guard (fused: found_inf; for-loop/foreach: guard="sync") skipped the NaN step on every rank:
    # the same Adam step count for every parameter (shard) of every rank
    assert {s for r in results for s in r["adam_steps"]} == {float(STEPS - 1)}
    assert all(math.isfinite(x) for r in results for p in r["params"] for x in p)
    for rank in range(world):
        assert sidecar.value("adamwatch_skipped_steps_total", job=job, rank=str(rank), reason="guard") == 1.0
    if layout == "ddp":  # replicas stay identical
        assert all(r["params"] == results[0]["params"] for r in results)


@pytest.fixture
def sidecar_with_audit(tmp_path):
    audit = tmp_path / "audit.jsonl"
    config = tmp_path / "sidecar.yaml"
    config.write_text(json.dumps({"remediation": {"audit": {"path": str(audit)}}}))
    proc = SidecarProcess(str(tmp_path), "--config", str(config))
    proc.audit_path = audit
    proc.start()
    yield proc
    proc.stop()


@pytest.mark.slow
def test_the_audit_line_of_the_detection_names_the_rank_and_step_where_the_nan_began(tmp_path, sidecar_with_audit):
    sidecar = sidecar_with_audit
    # rank 1's input is NaN at steps 3, 4, 5: three non-finite steps in a row on every rank
    run_ranks(tmp_path, 2, WORKER, "monitor", "ddp", "fused", "input-streak", sidecar.endpoint)
    job = "dist-ddp-fused"
    sidecar.wait_value("adamwatch_nonfinite_steps_total", lambda v: v == 3, job=job, rank="0", source="grad")
    lines = [json.loads(line) for line in sidecar.audit_path.read_text().splitlines()]
    detections = [x for x in lines if isinstance(x.get("evidence"), dict) and "sources" in x["evidence"]]
    assert detections, lines
    assert all(x["evidence"]["origin"] == {"rank": 1, "step": NAN_STEP} for x in detections), detections
    assert sidecar.value("adamwatch_nonfinite_origin_steps_total", job=job, rank="1", source="loss") == 3.0
    assert sidecar.value("adamwatch_nonfinite_origin_step", job=job, rank="1", source="loss") == float(NAN_STEP)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["ddp", "fsdp2"])
def test_a_skip_a_later_extension_asks_on_one_rank_is_every_ranks(tmp_path, sidecar, layout):
    results = run_ranks(tmp_path, 2, WORKER, "monitor", layout, "fused", "skip-ext", sidecar.endpoint)
    job = f"dist-{layout}-fused"
    assert {s for r in results for s in r["adam_steps"]} == {float(STEPS - 1)}
    for rank in range(2):
        skipped = _series(sidecar.samples(), "adamwatch_skipped_steps_total", job=job, rank=str(rank))
        assert sum(skipped.values()) == 1.0, skipped
    if layout == "ddp":
        assert results[0]["params"] == results[1]["params"]
