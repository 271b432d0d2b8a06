"""Replica consistency end to end: two DDP ranks (gloo, real processes), one real sidecar.

One rank's weight moves by one ulp between two fingerprints: the next
fingerprints differ, the sidecar marks that rank divergent and audits it, and
every exported fingerprint equals the one the rank computed itself.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.distributed.rank_processes import run_ranks

from .conftest import SidecarProcess

WORKER = Path(__file__).with_name("_fingerprint_worker.py")


@pytest.fixture
def sidecar_with_audit(workdir):
    audit = os.path.join(workdir, "audit.jsonl")
    config = os.path.join(workdir, "sidecar.yaml")
    with open(config, "w") as f:
        json.dump({"remediation": {"audit": {"path": audit}}}, f)
    proc = SidecarProcess(workdir, "--config", config)
    proc.audit_path = audit
    proc.start()
    yield proc
    proc.stop()


def run_fingerprint_ranks(workdir: str, endpoint: str, perturb_rank: int, world: int = 2) -> list[dict]:
    results = run_ranks(Path(workdir), world, WORKER, endpoint, str(perturb_rank), timeout=120)
    return [{(int(k) if k.isdigit() else k): v for k, v in r.items()} for r in results]


@pytest.mark.slow
def test_one_ulp_on_one_replica_is_detected_through_a_real_sidecar(sidecar_with_audit, workdir):
    sidecar = sidecar_with_audit
    truth = run_fingerprint_ranks(workdir, sidecar.endpoint, perturb_rank=1)
    # Identical replicas, identical fingerprints; one ulp later, different ones.
    assert truth[0]["weights_equal"] is False
    assert truth[0][5] == truth[1][5]
    assert truth[0][10] != truth[1][10]
    for rank in (0, 1):
        labels = {"job": "ddp-replicas", "rank": str(rank)}
        sidecar.wait_value("adamwatch_parameter_fingerprint_step", lambda v: v == 10, **labels)
        # exported exactly: the integer below 2^52 survives the float64 exposition
        assert sidecar.value("adamwatch_parameter_fingerprint", **labels) == truth[rank][10] < 2**52
    assert sidecar.value("adamwatch_replica_divergence", job="ddp-replicas", rank="1") == 1
    assert sidecar.value("adamwatch_replica_divergence", job="ddp-replicas", rank="0") == 0
    with open(sidecar.audit_path) as f:
        detections = [json.loads(line) for line in f if '"replica_divergence"' in line]
    assert len(detections) == 1
    d = detections[0]
    assert (d["event"], d["job"], d["rank"], d["step"]) == ("detection", "ddp-replicas", 1, 10)
    assert d["evidence"] == {"fingerprints": {"0": truth[0][10], "1": truth[1][10]}, "divergent_ranks": [1]}


@pytest.mark.slow
def test_replicas_that_agree_are_never_flagged(sidecar, workdir):
    truth = run_fingerprint_ranks(workdir, sidecar.endpoint, perturb_rank=-1)
    assert truth[0] == truth[1]
    assert truth[0]["weights_equal"] is True
    for rank in (0, 1):
        labels = {"job": "ddp-replicas", "rank": str(rank)}
        sidecar.wait_value("adamwatch_parameter_fingerprint_step", lambda v: v == 10, **labels)
        assert sidecar.value("adamwatch_parameter_fingerprint", **labels) == truth[rank][10]
        assert sidecar.value("adamwatch_replica_divergence", **labels) == 0
