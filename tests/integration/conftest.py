"""A real adamwatch-sidecar process for integration tests."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

SIDECAR = [os.path.join(os.path.dirname(sys.executable), "adamwatch-sidecar")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SidecarProcess:
    """Starts, kills and restarts a real sidecar on a Unix socket; reads its /metrics."""

    def __init__(self, workdir: str, *extra: str):
        self.socket_path = os.path.join(workdir, "aw.sock")
        self.endpoint = f"unix://{self.socket_path}"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.extra = list(extra)
        self.proc: subprocess.Popen | None = None
        self.log_path = os.path.join(workdir, "sidecar.log")

    def start(self, timeout: float = 20.0) -> None:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            SIDECAR + ["serve", "--listen", self.endpoint, "--metrics-address", f"127.0.0.1:{self.port}", *self.extra],
            stdout=log, stderr=log,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"sidecar exited {self.proc.returncode}: {open(self.log_path).read()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.05)
        raise AssertionError("sidecar not ready in time")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def samples(self) -> dict[tuple[str, tuple], float]:
        with urllib.request.urlopen(self.url + "/metrics", timeout=5) as r:
            text = r.read().decode()
        out = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    def value(self, name: str, **labels: str) -> float | None:
        return self.samples().get((name, tuple(sorted(labels.items()))))

    def wait_value(self, name: str, predicate, timeout: float = 10.0, **labels: str) -> float:
        deadline = time.monotonic() + timeout
        value = None
        while time.monotonic() < deadline:
            value = self.value(name, **labels)
            if value is not None and predicate(value):
                return value
            time.sleep(0.02)
        raise AssertionError(f"{name}{labels} = {value} after {timeout}s")


@pytest.fixture
def workdir():
    path = tempfile.mkdtemp(prefix="aw-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def sidecar(workdir):
    proc = SidecarProcess(workdir)
    proc.start()
    yield proc
    proc.stop()
