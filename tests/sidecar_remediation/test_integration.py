"""A real sidecar (real sockets, real HTTP) with remediation attached, and a plain-socket trainer.

The trainer here speaks the wire protocol by hand (``wire.encode_frame``), so
these tests pin the sidecar side of the contract: STEP in, COMMAND out, ACK in,
counters in /metrics, audit lines on disk, spans in the SDK's in-memory exporter.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from adamwatch import wire
from adamwatch_sidecar.config import build_config
from adamwatch_sidecar.remediation.wiring import attach
from adamwatch_sidecar.server import Sidecar

from .helpers import hello, noisy, step

TOKEN = "integration-token"


class PlainTrainer:
    """A trainer that is nothing but a socket and the wire module."""

    def __init__(self, endpoint: wire.Endpoint, job: str = "gpt", rank: int = 0):
        self.sock = socket.create_connection((endpoint.host, endpoint.port), timeout=5)
        self.decoder = wire.FrameDecoder()
        self.job, self.rank = job, rank
        self.send(wire.MessageType.HELLO, hello(job, rank))

    def send(self, mtype: wire.MessageType, payload: dict) -> None:
        self.sock.sendall(wire.encode_frame(mtype, payload, validate=True))

    def commands(self, timeout: float) -> list[dict]:
        """COMMAND payloads that arrive within ``timeout`` seconds (returns at the first batch)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return []
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                return []
            assert data, "sidecar closed the connection"
            found = []
            for item in self.decoder.feed(data):
                assert isinstance(item, wire.Message), item
                assert item.type == wire.MessageType.COMMAND
                found.append(item.payload)
            if found:
                return found

    def ack(self, command: dict, step: int, outcome: str = "applied") -> None:
        self.send(wire.MessageType.ACK, {"id": command["id"], "action": command["action"], "outcome": outcome,
                                         "step": step, "detail": None})

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def sidecar(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    config = build_config({
        "listen": "tcp://127.0.0.1:0",
        "metrics_address": "127.0.0.1:0",
        "control_address": "127.0.0.1:0",
        "control_token_file": str(token_file),
        "remediation": {"audit": {"path": str(tmp_path / "audit.jsonl")}},
    })
    sc = Sidecar(config)
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    service = attach(sc, config.remediation, tracer=provider.get_tracer("test"), environ={})
    sc.start()
    sc.spans, sc.remediation, sc.token_file = spans, service, token_file
    sc.audit_path = tmp_path / "audit.jsonl"
    try:
        yield sc
    finally:
        sc.stop()
        service.shutdown()


def scrape(sc) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(sc.metrics_server.url + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric(sc, name: str, timeout: float = 5.0, want: float | None = None, **labels) -> float | None:
    """Poll /metrics until the series exists (or has the value ``want``): ACKs travel through the ingest loop."""
    key = (name, tuple(sorted((k, str(v)) for k, v in labels.items())))
    deadline = time.monotonic() + timeout
    while True:
        value = scrape(sc).get(key)
        if (value is not None if want is None else value == want) or time.monotonic() > deadline:
            return value
        time.sleep(0.02)


def audit_lines(sc) -> list[dict]:
    return [json.loads(line) for line in sc.audit_path.read_text().splitlines()]


def http(url: str, method: str, body=None, token: str | None = TOKEN) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(), method=method,
                                 headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_consecutive_nan_steps_bring_a_restore_command_and_the_ack_is_counted(sidecar):
    trainer = PlainTrainer(sidecar.ingest.endpoint)
    try:
        for i in range(1, 6):
            trainer.send(wire.MessageType.STEP, step(i, loss=noisy(i)))
        for i in range(6, 9):
            trainer.send(wire.MessageType.STEP, step(i, loss=float("nan"), grad_norm=None, loss_nonfinite=True,
                                                    grad_nonfinite=True, skipped=True, skip_reason="guard"))
        (command,) = trainer.commands(timeout=5)
        assert command["action"] == "restore_checkpoint" and command["args"] == {"step": None, "before_step": 8}
        trainer.ack(command, step=9)
        assert metric(sidecar, "adamwatch_remediations_total", job="gpt", rank=0, action="restore_checkpoint",
                      outcome="applied") == 1
        assert metric(sidecar, "adamwatch_detections_total", job="gpt", rank=0, detector="non_finite") == 1
        events = [(x["event"], x["action"], x["outcome"]) for x in audit_lines(sidecar)]
        assert events == [("detection", None, None), ("decision", "restore_checkpoint", None),
                          ("outcome", "restore_checkpoint", "applied")]
        assert [s.attributes["adamwatch.outcome"] for s in sidecar.spans.get_finished_spans()] == ["applied"]
    finally:
        trainer.close()


def test_a_loss_spike_brings_reduce_lr_within_two_steps(sidecar):
    trainer = PlainTrainer(sidecar.ingest.endpoint)
    try:
        for i in range(1, 41):
            trainer.send(wire.MessageType.STEP, step(i, loss=noisy(i)))
        spike_step = 41
        sent_at = time.perf_counter()
        trainer.send(wire.MessageType.STEP, step(spike_step, loss=25.0))
        # Keep training at ~200 steps/s; a real trainer applies the command at its next step boundary.
        current, command = spike_step, None
        while command is None and current < spike_step + 50:
            got = trainer.commands(timeout=0.005)
            if got:
                command = got[0]
                received_ms = (time.perf_counter() - sent_at) * 1000
                break
            current += 1
            trainer.send(wire.MessageType.STEP, step(current, loss=noisy(current)))
        assert command is not None and command["action"] == "reduce_lr" and command["step"] == spike_step
        effective_step = current + 1
        trainer.ack(command, step=effective_step)
        assert effective_step - spike_step <= 2
        assert metric(sidecar, "adamwatch_remediations_total", job="gpt", rank=0, action="reduce_lr",
                      outcome="applied") == 1
        assert metric(sidecar, "adamwatch_learning_rate_scale", want=0.5, job="gpt", rank=0) == 0.5
        outcome = [x for x in audit_lines(sidecar) if x["event"] == "outcome"][-1]
        assert outcome["command_id"] == command["id"] and outcome["steps_to_effect"] == effective_step - spike_step
        print(f"\nsidecar path: spike STEP sent -> COMMAND received in {received_ms:.2f} ms; "
              f"effective {effective_step - spike_step} step(s) after the spike")
    finally:
        trainer.close()


def test_the_webhook_needs_the_token_and_maps_alerts_to_the_ladder(sidecar):
    trainer = PlainTrainer(sidecar.ingest.endpoint)
    url = sidecar.remediation.control_server.url + "/api/v1/alertmanager"
    body = {"version": "4", "status": "firing", "receiver": "adamwatch", "groupLabels": {}, "commonLabels": {},
            "commonAnnotations": {}, "externalURL": "", "groupKey": "k", "truncatedAlerts": 0,
            "alerts": [{"status": "firing", "labels": {"alertname": "AdamwatchLossSpike", "job": "gpt", "rank": "0"},
                        "annotations": {}, "startsAt": "2026-11-21T05:00:00Z", "fingerprint": "abc"}]}
    try:
        trainer.send(wire.MessageType.STEP, step(1))
        status, answer = http(url, "POST", body, token=None)
        assert status == 401 and answer["reason"] == "missing_token"
        assert trainer.commands(timeout=0.2) == []
        status, answer = http(url, "POST", body, token="not-the-token")
        assert status == 401
        assert metric(sidecar, "adamwatch_control_requests_rejected_total", endpoint="alertmanager",
                      reason="missing_token") == 1
        assert metric(sidecar, "adamwatch_control_requests_rejected_total", endpoint="alertmanager",
                      reason="bad_token") == 1
        status, answer = http(url, "POST", body)
        assert status == 200 and answer["results"][0]["result"] == "action reduce_lr"
        (command,) = trainer.commands(timeout=5)
        assert command["action"] == "reduce_lr" and command["id"] == answer["results"][0]["command_id"]
    finally:
        trainer.close()


def run_ctl(sidecar, *args: str, token_file: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("ADAMWATCH_CONTROL_TOKEN", None)
    return subprocess.run(
        [sys.executable, "-m", "adamwatch_sidecar.cli", "ctl", *args,
         "--address", sidecar.remediation.control_server.url.removeprefix("http://"),
         "--token-file", token_file or str(sidecar.token_file)],
        capture_output=True, text=True, timeout=30, env=env)


@pytest.mark.slow
def test_ctl_as_a_real_process(sidecar, tmp_path):
    trainer = PlainTrainer(sidecar.ingest.endpoint)
    try:
        trainer.send(wire.MessageType.STEP, step(1))
        assert metric(sidecar, "adamwatch_learning_rate_scale", job="gpt", rank=0) == 1.0
        done = run_ctl(sidecar, "reduce-lr", "0.5")
        assert done.returncode == 0, done.stderr
        answer = json.loads(done.stdout)
        assert answer["outcome"] == "sent" and answer["job"] == "gpt"
        (command,) = trainer.commands(timeout=5)
        assert command["id"] == answer["command_id"] and command["args"] == {"factor": 0.5}
        trainer.ack(command, step=2)
        assert metric(sidecar, "adamwatch_remediations_total", job="gpt", rank=0, action="reduce_lr",
                      outcome="applied") == 1

        done = run_ctl(sidecar, "restore", "12")
        assert done.returncode == 0, done.stderr
        (command,) = trainer.commands(timeout=5)
        assert command["action"] == "restore_checkpoint" and command["args"]["step"] == 12

        done = run_ctl(sidecar, "status")
        assert done.returncode == 0 and json.loads(done.stdout)["jobs"]["gpt"]["learning_rate_scale"] == 0.5

        wrong = tmp_path / "wrong"
        wrong.write_text("nope")
        done = run_ctl(sidecar, "reduce-lr", "0.5", token_file=str(wrong))
        assert done.returncode == 1 and "answered 401" in done.stderr and "token does not match" in done.stderr
        done = run_ctl(sidecar, "reduce-lr", "1.5")
        assert done.returncode == 2 and "FACTOR must be between 0 and 1" in done.stderr
        done = run_ctl(sidecar, "stop", "--job", "other")
        assert done.returncode == 1 and "answered 404" in done.stderr
    finally:
        trainer.close()


def test_ctl_reports_an_unreachable_sidecar(tmp_path):
    token = tmp_path / "t"
    token.write_text("x")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = subprocess.run([sys.executable, "-m", "adamwatch_sidecar.remediation.ctl", "status",
                           "--address", f"127.0.0.1:{port}", "--token-file", str(token)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 1 and "cannot reach the sidecar's control endpoint" in done.stderr
