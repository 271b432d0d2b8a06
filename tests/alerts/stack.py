"""Real Alertmanager/Prometheus processes and local HTTP receivers, for the alerting tests.

Everything binds 127.0.0.1, lives in a temporary folder and is stopped by the
caller's ``finally`` (or fixture finaliser) through :func:`stop`.
"""

from __future__ import annotations

import copy
import json
import pathlib
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

import yaml

from .assets_under_test import ALERTMANAGER_FILE

ALERTMANAGER = "/usr/bin/prometheus-alertmanager"
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Recorder:
    """An HTTP server on 127.0.0.1 that records every POST (time, path, headers, JSON body).

    Answers 202 with a PagerDuty Events v2 style body, so it stands in for
    PagerDuty, a ticket system or the sidecar's webhook alike.
    """

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                received = time.time()
                try:
                    payload = json.loads(body)
                except ValueError:
                    payload = None
                with recorder._lock:
                    recorder.requests.append({"time": received, "path": self.path, "headers": dict(self.headers),
                                              "json": payload})
                reply = json.dumps({"status": "success", "message": "Event processed", "dedup_key": "x"}).encode()
                self.send_response(202)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}{path}"

    def matching(self, predicate: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
        with self._lock:
            return [r for r in self.requests if predicate(r)]

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any] | None:
        """The first recorded request matching ``predicate``, waiting up to ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.matching(predicate)
            if found or time.monotonic() > deadline:
                return found[0] if found else None
            time.sleep(0.05)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def local_alertmanager_config(tmp: pathlib.Path, *, pagerduty: str, ticket: str, sidecar: str,
                              control_token: str, routing_key: str, group_wait: str | None = "1s") -> pathlib.Path:
    """The shipped alerts/alertmanager.yaml with only endpoints, secrets and timers made local.

    The routing tree, grouping, matchers and inhibition stay exactly as shipped;
    ``group_wait=None`` keeps the shipped timers too (group_wait, group_interval).

    Returns:
        the path of the written config.
    """
    config = copy.deepcopy(yaml.safe_load(ALERTMANAGER_FILE.read_text()))
    (tmp / "routing-key").write_text(routing_key + "\n")
    (tmp / "control-token").write_text(control_token + "\n")
    config["global"]["pagerduty_url"] = pagerduty
    receivers = {r["name"]: r for r in config["receivers"]}
    receivers["pagerduty"]["pagerduty_configs"][0]["routing_key_file"] = str(tmp / "routing-key")
    receivers["ticket"]["webhook_configs"][0]["url"] = ticket
    webhook = receivers["adamwatch-sidecar"]["webhook_configs"][0]
    webhook["url"] = sidecar
    webhook["http_config"]["authorization"]["credentials_file"] = str(tmp / "control-token")

    def fast(route: dict) -> None:
        if "group_wait" in route or route is config["route"]:
            route["group_wait"] = group_wait
        route["group_interval"] = "1s"
        for child in route.get("routes", []):
            fast(child)

    if group_wait is not None:
        fast(config["route"])
    path = tmp / "alertmanager.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def wait_http(url: str, process: subprocess.Popen, timeout: float, log: pathlib.Path | None = None) -> None:
    """Wait until ``url`` answers 200, failing early (with the log) if ``process`` exits."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited {process.returncode}: "
                               + (log.read_text()[-3000:] if log and log.exists() else ""))
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer within {timeout}s")
        time.sleep(0.1)


def start(args: list[str], log: pathlib.Path, **kwargs: Any) -> subprocess.Popen:
    """Start a process with stdout and stderr into ``log``."""
    with open(log, "wb") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, **kwargs)


def stop(process: subprocess.Popen | None, timeout: float = 10) -> None:
    """Terminate (then kill) a process we started; safe on None and on exited processes."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def api(url: str, payload: Any = None) -> Any:
    """GET (or POST ``payload`` as JSON) and return the decoded JSON reply."""
    data = json.dumps(payload).encode() if payload is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as response:
        body = response.read()
    return json.loads(body) if body else None


def start_ready(args: list[str], log: pathlib.Path, port: int, timeout: float) -> subprocess.Popen:
    """Start a Prometheus-style server and wait until its ``/-/ready`` on ``port`` answers; stop it if it never does."""
    process = start(args, log)
    try:
        wait_http(f"http://127.0.0.1:{port}/-/ready", process, timeout, log)
    except Exception:
        stop(process)
        raise
    return process


def start_prometheus(tmp: pathlib.Path, config: dict, *extra_args: str,
                     port: int | None = None) -> tuple[subprocess.Popen, str]:
    """A real Prometheus with ``config`` on ``port`` (a free one by default), data in ``tmp``; returns (process, base URL)."""
    port = port or free_port()
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    process = start_ready([PROMETHEUS, f"--config.file={tmp / 'prometheus.yml'}",
                           f"--storage.tsdb.path={tmp / 'prom-data'}", f"--web.listen-address=127.0.0.1:{port}",
                           "--log.level=warn", *extra_args], tmp / "prometheus.log", port, 60)
    return process, f"http://127.0.0.1:{port}"


def start_alertmanager(tmp: pathlib.Path, config: pathlib.Path) -> tuple[subprocess.Popen, str]:
    """A real Alertmanager on a free port; returns (process, base URL of its v2 API)."""
    port = free_port()
    process = start_ready([ALERTMANAGER, f"--config.file={config}", f"--storage.path={tmp / 'am-data'}",
                           f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address=",
                           "--log.level=info"], tmp / "alertmanager.log", port, 30)
    return process, f"http://127.0.0.1:{port}/api/v2"
