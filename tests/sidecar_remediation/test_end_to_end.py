"""A real training process (torch, fused AdamW, Checkpointer) against a real sidecar with remediation.

Slow: each test trains a tiny model for 300 steps in a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from adamwatch_sidecar.config import build_config
from adamwatch_sidecar.remediation.wiring import attach
from adamwatch_sidecar.server import Sidecar

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture
def sidecar(tmp_path):
    config = build_config({
        "listen": f"unix://{tmp_path}/aw.sock",
        "metrics_address": "127.0.0.1:0",
        "remediation": {"audit": {"path": str(tmp_path / "audit.jsonl")}},
    })
    sc = Sidecar(config)
    sc.remediation = attach(sc, config.remediation, environ={})
    sc.start()
    sc.audit_path = tmp_path / "audit.jsonl"
    try:
        yield sc
    finally:
        sc.stop()
        sc.remediation.shutdown()


def train(sidecar, tmp_path, scenario: str) -> dict:
    out = tmp_path / "out.json"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    done = subprocess.run([sys.executable, os.path.join(HERE, "_e2e_trainer.py"), str(sidecar.ingest.endpoint),
                           str(tmp_path / "ckpt"), str(out), scenario],
                          capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    time.sleep(0.2)
    return json.loads(out.read_text())


def audit(sidecar) -> list[dict]:
    return [json.loads(line) for line in sidecar.audit_path.read_text().splitlines()]


def value(sidecar, name: str, **labels) -> float | None:
    return sidecar.state.value(name, labels)


@pytest.mark.slow
def test_nan_steps_are_skipped_by_the_guard_and_the_sidecar_restores(sidecar, tmp_path):
    run = train(sidecar, tmp_path, "nan")
    by_it = {r["it"]: r for r in run["records"]}
    # The fused guard skips the very first bad step: 0 steps late, params untouched and finite.
    # The sidecar decides on the third NaN summary; when its restore command comes back
    # within that step, the restore is applied at the end of it (its post-step hook).
    assert by_it[120]["unchanged"] and by_it[121]["unchanged"]
    assert by_it[122]["unchanged"] or by_it[122]["restored"]
    assert all(r["finite"] for r in run["records"])
    lines = audit(sidecar)
    decisions = [x for x in lines if x["event"] == "decision"]
    outcomes = [x for x in lines if x["event"] == "outcome"]
    assert [(d["detector"], d["action"]) for d in decisions] == [("non_finite", "restore_checkpoint")]
    assert [(o["action"], o["outcome"]) for o in outcomes] == [("restore_checkpoint", "applied")]
    assert run["restores"] and run["restores"][0] <= 120
    assert value(sidecar, "adamwatch_remediations_total", job="e2e", rank="0", action="restore_checkpoint",
                 outcome="applied") == 1
    assert value(sidecar, "adamwatch_detections_total", job="e2e", rank="0", detector="non_finite") == 1


@pytest.mark.slow
def test_a_persisting_loss_spike_cuts_the_lr_then_restores(sidecar, tmp_path):
    run = train(sidecar, tmp_path, "spike")
    lines = audit(sidecar)
    decisions = [x for x in lines if x["event"] == "decision"]
    outcomes = [x for x in lines if x["event"] == "outcome"]
    assert [d["action"] for d in decisions][:2] == ["reduce_lr", "restore_checkpoint"], decisions
    first = decisions[0]
    assert first["detector"] == "loss_spike"
    cut = outcomes[0]
    assert cut["action"] == "reduce_lr" and cut["outcome"] == "applied"
    assert cut["steps_to_effect"] <= 2, cut
    assert outcomes[1]["action"] == "restore_checkpoint" and outcomes[1]["outcome"] == "applied"
    assert run["restores"] and run["restores"][0] < first["step"]
    assert run["records"][-1]["lr_scale"] == 0.5
    assert value(sidecar, "adamwatch_learning_rate_scale", job="e2e", rank="0") == 0.5
    for action in ("reduce_lr", "restore_checkpoint"):
        assert value(sidecar, "adamwatch_remediations_total", job="e2e", rank="0", action=action,
                     outcome="applied") == sum(1 for o in outcomes if o["action"] == action and o["outcome"] == "applied")
    print(f"\nloss spike at step {first['step']}: reduce_lr effective {cut['steps_to_effect']} step(s) later, "
          f"{cut['latency_seconds'] * 1000:.1f} ms from decision to ACK")
