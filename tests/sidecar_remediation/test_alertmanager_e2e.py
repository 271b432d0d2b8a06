"""A real Alertmanager delivers an alert to the sidecar's webhook with its bearer token.

Alertmanager 0.25 (Debian package ``prometheus-alertmanager``) routes a posted
alert through a webhook receiver whose ``http_config.authorization`` reads the
token from a file, exactly as in ``alerts/alertmanager.yaml``; the sidecar maps
it through ``alert_actions`` and sends the trainer a COMMAND.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request

import pytest
import yaml

from adamwatch import wire
from adamwatch_sidecar.config import build_config
from adamwatch_sidecar.remediation.wiring import attach
from adamwatch_sidecar.server import Sidecar

from .helpers import step
from .test_integration import TOKEN, PlainTrainer

ALERTMANAGER = shutil.which("prometheus-alertmanager") or "/usr/bin/prometheus-alertmanager"
pytestmark = [pytest.mark.e2e, pytest.mark.slow,
              pytest.mark.skipif(not os.path.exists(ALERTMANAGER), reason="prometheus-alertmanager is not installed")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def sidecar(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    config = build_config({"listen": "tcp://127.0.0.1:0", "metrics_address": "127.0.0.1:0",
                           "control_address": "127.0.0.1:0", "control_token_file": str(token_file)})
    sc = Sidecar(config)
    service = attach(sc, config.remediation, environ={})
    sc.start()
    sc.token_file = token_file
    try:
        yield sc
    finally:
        sc.stop()
        service.shutdown()


@pytest.fixture
def alertmanager(tmp_path, sidecar):
    port = free_port()
    config = {
        "route": {"receiver": "adamwatch-sidecar", "group_by": ["alertname", "job"], "group_wait": "0s",
                  "group_interval": "1s", "repeat_interval": "1h"},
        "receivers": [{"name": "adamwatch-sidecar", "webhook_configs": [{
            "url": sidecar.remediation.control_server.url + "/api/v1/alertmanager",
            "send_resolved": False,
            "http_config": {"authorization": {"type": "Bearer", "credentials_file": str(sidecar.token_file)}},
        }]}],
    }
    path = tmp_path / "alertmanager.yml"
    path.write_text(yaml.safe_dump(config))
    log = open(tmp_path / "alertmanager.log", "wb")
    proc = subprocess.Popen([ALERTMANAGER, f"--config.file={path}", f"--storage.path={tmp_path / 'am-data'}",
                             f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address="],
                            stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        assert proc.poll() is None, (tmp_path / "alertmanager.log").read_text()[-2000:]
        try:
            with urllib.request.urlopen(url + "/-/ready", timeout=1):
                break
        except OSError:
            assert time.monotonic() < deadline, "alertmanager not ready"
            time.sleep(0.1)
    yield url
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
    log.close()


def post_alert(url: str, labels: dict) -> None:
    now = datetime.datetime.now(datetime.timezone.utc)
    body = [{"labels": labels, "annotations": {"summary": "The training loss is far above its recent baseline."},
             "startsAt": now.isoformat(), "endsAt": (now + datetime.timedelta(minutes=10)).isoformat()}]
    req = urllib.request.Request(url + "/api/v2/alerts", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        assert resp.status == 200


def test_an_alert_routed_by_alertmanager_reaches_the_trainer_as_a_command(sidecar, alertmanager):
    trainer = PlainTrainer(sidecar.ingest.endpoint)
    try:
        trainer.send(wire.MessageType.STEP, step(1))
        time.sleep(0.2)  # the HELLO and STEP go through the ingest loop first
        post_alert(alertmanager, {"alertname": "AdamwatchLossSpike", "job": "gpt", "rank": "0",
                                  "severity": "warning", "adamwatch_remediate": "true"})
        commands = trainer.commands(timeout=15)
        assert [c["action"] for c in commands] == ["reduce_lr"]
        assert commands[0]["reason"].startswith("alert:AdamwatchLossSpike")
        decisions = [r for r in sidecar.remediation.audit.recent() if r["event"] == "decision"]
        assert [(d["source"], d["command_id"]) for d in decisions] == [("alertmanager", commands[0]["id"])]
        assert decisions[0]["evidence"]["labels"]["adamwatch_remediate"] == "true"
        assert sidecar.state.value("adamwatch_control_requests_rejected_total",
                                   {"endpoint": "alertmanager", "reason": "bad_token"}) is None
    finally:
        trainer.close()
