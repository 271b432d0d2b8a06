"""The real ``adamwatch-sidecar serve`` process with a remediation policy in its config file.

These tests check the wiring in the sidecar's command line (config validation of
``remediation:`` and ``attach()``), so they exercise exactly what a user runs.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from adamwatch import wire

from .helpers import noisy, step
from .test_integration import TOKEN, PlainTrainer, http

SIDECAR = os.path.join(os.path.dirname(sys.executable), "adamwatch-sidecar")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(tmp_path, remediation: dict) -> str:
    path = tmp_path / "sidecar.yaml"
    path.write_text(yaml.safe_dump({"remediation": remediation}))
    return str(path)


def test_a_bad_policy_field_stops_the_sidecar_naming_the_field(tmp_path):
    config = write_config(tmp_path, {"ladders": {"loss_spike": [{"action": "reduce_lr"},
                                                                 {"action": "restore_checkpoint",
                                                                  "cooldown_seconds": -5}]}})
    done = subprocess.run([SIDECAR, "serve", "--config", config, "--listen", f"unix://{tmp_path}/s.sock",
                           "--metrics-address", f"127.0.0.1:{free_port()}"],
                          capture_output=True, text=True, timeout=15)
    assert done.returncode == 2
    assert "remediation.ladders.loss_spike[1].cooldown_seconds: must be >= 0" in done.stderr


@pytest.fixture
def sidecar_process(tmp_path):
    token = tmp_path / "token"
    token.write_text(TOKEN)
    audit = tmp_path / "audit.jsonl"
    config = write_config(tmp_path, {"audit": {"path": str(audit)}})
    ingest_port, metrics_port, control_port = free_port(), free_port(), free_port()
    log = open(tmp_path / "sidecar.log", "wb")
    proc = subprocess.Popen([SIDECAR, "serve", "--config", config, "--listen", f"tcp://127.0.0.1:{ingest_port}",
                             "--metrics-address", f"127.0.0.1:{metrics_port}",
                             "--control-address", f"127.0.0.1:{control_port}",
                             "--control-token-file", str(token)], stdout=log, stderr=log)
    metrics_url = f"http://127.0.0.1:{metrics_port}"
    deadline = time.monotonic() + 20
    while True:
        assert proc.poll() is None, (tmp_path / "sidecar.log").read_text()[-2000:]
        try:
            with urllib.request.urlopen(metrics_url + "/readyz", timeout=1):
                break
        except OSError:
            assert time.monotonic() < deadline, "sidecar not ready"
            time.sleep(0.05)
    yield {"proc": proc, "endpoint": wire.parse_endpoint(f"tcp://127.0.0.1:{ingest_port}"),
           "metrics": metrics_url, "control": f"127.0.0.1:{control_port}", "audit": audit, "token": token,
           "log": tmp_path / "sidecar.log"}
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
    log.close()


def sample(url: str, name: str, **labels: str) -> float | None:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return s.value
    return None


@pytest.mark.slow
def test_the_sidecar_process_detects_commands_audits_and_guards_its_control_api(sidecar_process):
    sp = sidecar_process
    trainer = PlainTrainer(sp["endpoint"])
    try:
        for i in range(1, 41):
            trainer.send(wire.MessageType.STEP, step(i, loss=noisy(i)))
        trainer.send(wire.MessageType.STEP, step(41, loss=30.0))
        (command,) = trainer.commands(timeout=5)
        assert command["action"] == "reduce_lr" and command["step"] == 41
        trainer.ack(command, step=42)
        labels = {"job": "gpt", "rank": "0", "action": "reduce_lr", "outcome": "applied"}
        deadline = time.monotonic() + 5
        while sample(sp["metrics"], "adamwatch_remediations_total", **labels) != 1.0:
            assert time.monotonic() < deadline, "reduce_lr applied was never counted"
            time.sleep(0.05)
        lines = [json.loads(line) for line in sp["audit"].read_text().splitlines()]
        assert [(x["event"], x["action"]) for x in lines if x["event"] != "suppressed"][-2:] == [
            ("decision", "reduce_lr"), ("outcome", "reduce_lr")]

        status, answer = http(f"http://{sp['control']}/api/v1/status", "GET", token=None)
        assert status == 401
        assert sample(sp["metrics"], "adamwatch_control_requests_rejected_total", endpoint="status",
                      reason="missing_token") == 1.0

        done = subprocess.run([SIDECAR, "ctl", "restore", "--address", sp["control"], "--token-file",
                               str(sp["token"])], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        (command,) = trainer.commands(timeout=5)
        assert command["action"] == "restore_checkpoint" and command["args"]["step"] is None
    finally:
        trainer.close()
