"""Helpers for the sidecar tests: message payloads, a plain-socket trainer, a real sidecar process."""

from __future__ import annotations

import math
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Callable

from prometheus_client.parser import text_string_to_metric_families

from adamwatch import wire

ROOT = pathlib.Path(__file__).resolve().parents[2]
GROUPS = ["decay", "no_decay"]


def hello_payload(job: str = "gpt", rank: int = 0, session: str = "s1", groups: list[str] | None = None,
                  **extra: Any) -> dict[str, Any]:
    """A valid HELLO payload."""
    payload = {
        "job": job,
        "rank": rank,
        "world_size": 4,
        "host": "node-1",
        "pid": 1234,
        "session": session,
        "adamwatch_version": "0.1.0",
        "torch_version": "2.13.0",
        "optimizer": {
            "kind": "AdamW",
            "implementation": "fused",
            "betas": [0.9, 0.95],
            "eps": 1e-8,
            "weight_decay": 0.1,
            "amsgrad": False,
            "param_groups": list(GROUPS if groups is None else groups),
            "device": "cpu",
        },
        "deep_stats_every": 10,
    }
    payload.update(extra)
    return payload


def step_payload(step: int = 1, **extra: Any) -> dict[str, Any]:
    """A valid STEP payload for two param groups."""
    payload = {
        "step": step,
        "time": 1_700_000_000.0 + step,
        "duration_s": 0.05,
        "loss": 2.5,
        "loss_nonfinite": False,
        "grad_norm": 1.5,
        "group_grad_norms": [1.2, 0.9],
        "grad_nonfinite": False,
        "lr": [1e-3, 5e-4],
        "skipped": False,
        "skip_reason": None,
    }
    payload.update(extra)
    return payload


def deep_entry(scale: float = 1.0) -> dict[str, Any]:
    return {
        "effective_lr": [scale * q for q in (1.0, 2.0, 3.0, 4.0, 5.0)],
        "update_size": [scale * q for q in (0.1, 0.2, 0.3, 0.4, 0.5)],
        "update_to_weight": 0.001 * scale,
        "exp_avg_norm": 0.5 * scale,
        "exp_avg_sq_norm": 0.25 * scale,
        "eps_dominated_ratio": 0.125,
    }


def frame(kind: wire.MessageType, payload: dict[str, Any]) -> bytes:
    return wire.encode_frame(kind, payload)


class TrainerSocket:
    """A plain-socket trainer: writes frames with wire.encode_frame, reads COMMAND frames."""

    def __init__(self, endpoint: str, timeout: float = 5.0):
        ep = wire.parse_endpoint(endpoint)
        if ep.scheme == "unix":
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            # connect blocking: with a timeout set, a Unix connect fails at once
            # with EAGAIN while the listen queue is full instead of waiting
            self.sock.connect(ep.path)
            self.sock.settimeout(timeout)
        else:
            self.sock = socket.create_connection((ep.host, ep.port), timeout=timeout)
        self.decoder = wire.FrameDecoder()

    def send(self, kind: wire.MessageType, payload: dict[str, Any]) -> None:
        self.sock.sendall(frame(kind, payload))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_message(self, timeout: float = 5.0) -> wire.Message:
        deadline = time.monotonic() + timeout
        pending: list = []
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("sidecar closed the connection")
            pending.extend(self.decoder.feed(data))
            if pending:
                item = pending[0]
                assert isinstance(item, wire.Message), item
                return item
        raise TimeoutError("no message from the sidecar")

    def close(self) -> None:
        self.sock.close()


def parse_metrics(text: str) -> dict[tuple[str, frozenset], float]:
    """Exposition text -> {(sample name, frozenset(labels)): value}."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def series(values: dict, name: str, **labels: Any) -> float | None:
    return values.get((name, frozenset((k, str(v)) for k, v in labels.items())))


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read()


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


def isnan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


class SidecarProcess:
    """A real `python -m adamwatch_sidecar.cli serve` process; stderr is collected line by line."""

    def __init__(self, args: list[str], socket_path: pathlib.Path | None, env: dict[str, str] | None = None):
        self.socket_path = socket_path
        self.lines: list[str] = []
        self.ready = threading.Event()
        self.metrics_url = ""
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "adamwatch_sidecar.cli", *args],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT,
            env={**os.environ, **(env or {})},
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            match = re.search(r"adamwatch-sidecar ready: ingest=(\S+) metrics=(\S+)", line)
            if match:
                self.endpoint = match.group(1)
                self.metrics_url = match.group(2)
                self.ready.set()

    def wait_ready(self, timeout: float = 15.0) -> "SidecarProcess":
        if not self.ready.wait(timeout):
            self.kill()
            raise AssertionError("sidecar did not become ready:\n" + "".join(self.lines))
        return self

    @property
    def stderr(self) -> str:
        return "".join(self.lines)

    def metrics(self) -> dict:
        status, _, body = http_get(self.metrics_url + "/metrics")
        assert status == 200
        return parse_metrics(body.decode())

    def trainer(self) -> TrainerSocket:
        return TrainerSocket(self.endpoint)

    def terminate(self, timeout: float = 10.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout)
        self._reader.join(timeout=2)
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


