"""The remediation ladder across two real processes: a torch trainer and an adamwatch-sidecar.

The trainer script (tests/sidecar_remediation/_e2e_trainer.py) trains a small
model with fused AdamW and a Checkpointer; the sidecar is the real console
script with the default policy and an audit log. Measured and printed (run
with -s): steps and milliseconds from the first bad step to the action taking
effect.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .conftest import SidecarProcess

TRAINER = os.path.join(os.path.dirname(__file__), "..", "sidecar_remediation", "_e2e_trainer.py")


@pytest.fixture
def sidecar_with_policy(workdir):
    audit = os.path.join(workdir, "audit.jsonl")
    config = os.path.join(workdir, "sidecar.yaml")
    with open(config, "w") as f:
        json.dump({"remediation": {"audit": {"path": audit}}}, f)
    proc = SidecarProcess(workdir, "--config", config)
    proc.audit_path = audit
    proc.start()
    yield proc
    proc.stop()


def run_trainer(sidecar: SidecarProcess, workdir: str, scenario: str) -> dict:
    out = os.path.join(workdir, f"{scenario}.json")
    done = subprocess.run(
        [sys.executable, TRAINER, sidecar.endpoint, os.path.join(workdir, "ckpt"), out, scenario],
        capture_output=True, text=True, timeout=240, env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    with open(out) as f:
        return json.load(f)


def audit_lines(sidecar: SidecarProcess) -> list[dict]:
    with open(sidecar.audit_path) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_nan_is_skipped_on_the_device_then_the_sidecar_restores(sidecar_with_policy, workdir):
    sidecar = sidecar_with_policy
    run = run_trainer(sidecar, workdir, "nan")
    by_it = {r["it"]: r for r in run["records"]}
    # The fused guard skips the very first bad step: 0 steps late, params untouched and finite.
    # The sidecar decides on the third NaN summary; when its restore command comes back
    # within that step, the restore is applied at the end of it (its post-step hook).
    assert by_it[120]["unchanged"] and by_it[121]["unchanged"]
    assert by_it[122]["unchanged"] or by_it[122]["restored"]
    assert all(r["finite"] for r in run["records"])
    labels = {"job": "e2e", "rank": "0"}
    sidecar.wait_value("adamwatch_skipped_steps_total", lambda v: v == 3, reason="guard", **labels)
    assert sidecar.value("adamwatch_nonfinite_steps_total", source="loss", **labels) == 3
    # Three non-finite steps in a row: the sidecar restores the newest known-good checkpoint.
    outcomes = [x for x in audit_lines(sidecar) if x["event"] == "outcome"]
    assert [(o["action"], o["outcome"]) for o in outcomes] == [("restore_checkpoint", "applied")]
    assert run["restores"] and run["restores"][0] < 120
    assert sidecar.value("adamwatch_remediations_total", action="restore_checkpoint", outcome="applied", **labels) == 1
    print(f"\nNaN at step {by_it[120]['step']}: skipped by the fused guard at that very step (0 steps late); "
          f"restore to step {run['restores'][0]} after {outcomes[0]['step'] - by_it[120]['step']} steps")


@pytest.mark.slow
def test_a_persisting_spike_cuts_the_lr_then_restores_and_counters_match_the_audit(sidecar_with_policy, workdir):
    sidecar = sidecar_with_policy
    run = run_trainer(sidecar, workdir, "spike")
    lines = audit_lines(sidecar)
    decisions = [x for x in lines if x["event"] == "decision"]
    outcomes = [x for x in lines if x["event"] == "outcome"]
    assert [d["action"] for d in decisions][:2] == ["reduce_lr", "restore_checkpoint"], decisions
    assert decisions[0]["detector"] == "loss_spike"
    cut, restore = outcomes[0], outcomes[1]
    assert (cut["action"], cut["outcome"]) == ("reduce_lr", "applied")
    assert (restore["action"], restore["outcome"]) == ("restore_checkpoint", "applied")

    first_bad = next(r for r in run["records"] if r["it"] == 150)
    steps_late = cut["step"] - first_bad["step"]
    ms_late = (cut["time"] - first_bad["t"]) * 1000
    assert steps_late <= 2, (cut, first_bad)
    assert run["restores"] and run["restores"][0] < first_bad["step"]
    labels = {"job": "e2e", "rank": "0"}
    for action in ("reduce_lr", "restore_checkpoint"):
        audited = sum(1 for o in outcomes if o["action"] == action and o["outcome"] == "applied")
        assert sidecar.value("adamwatch_remediations_total", action=action, outcome="applied", **labels) == audited
    assert sidecar.value("adamwatch_learning_rate_scale", **labels) == run["records"][-1]["lr_scale"] == 0.5
    assert sidecar.value("adamwatch_detections_total", detector="loss_spike", **labels) >= 1
    print(f"\nloss spike from step {first_bad['step']}: LR cut in effect at step {cut['step']} "
          f"({steps_late} steps, {ms_late:.0f} ms after the first bad step finished); "
          f"restored to step {run['restores'][0]} at step {restore['step']}")
