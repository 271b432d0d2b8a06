"""The real sidecar, started with the chart's command line and config file.

Paths and ports are moved into a temporary directory and onto loopback; the
rest (flags, config keys, probe paths, the webhook path) is as rendered. This
is what the kubelet would run: the startup probe must pass before any trainer
connects, since the kubelet starts the trainer only after it passes.
"""

from __future__ import annotations

import base64
import json
import pathlib
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import yaml

from .chart_render import of_kind, pod_templates, render_case

SIDECAR = pathlib.Path(sys.executable).with_name("adamwatch-sidecar")
# Loopback only: never through an http_proxy from the environment.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def http(method: str, url: str, token: str | None = None, body: bytes | None = None) -> int:
    request = urllib.request.Request(url, data=body, method=method)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    if body is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with OPENER.open(request, timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


@pytest.fixture
def chart_sidecar(tmp_path):
    """Run adamwatch-sidecar as the chart's container spec says; yield its addresses."""
    if not SIDECAR.exists():
        pytest.skip(f"{SIDECAR} is not installed")
    manifests = render_case("example-job-values.yaml")
    _, pod = pod_templates(manifests)[0]
    container = pod["spec"]["initContainers"][0]
    config_map = next(m for m in of_kind(manifests, "ConfigMap") if m["metadata"]["name"].endswith("-config"))
    secret = next(m for m in of_kind(manifests, "Secret") if m["metadata"]["name"].endswith("-control-token"))
    token = base64.b64decode(secret["data"]["token"]).decode()

    (tmp_path / "config.yaml").write_text(config_map["data"]["config.yaml"])
    (tmp_path / "token").write_text(token)
    metrics_port, control_port = free_port(), free_port()
    moved = {
        "unix:///var/run/adamwatch/adamwatch.sock": f"unix://{tmp_path}/adamwatch.sock",
        "0.0.0.0:9400": f"127.0.0.1:{metrics_port}",
        "0.0.0.0:9401": f"127.0.0.1:{control_port}",
        "/etc/adamwatch/control/token": str(tmp_path / "token"),
        "/etc/adamwatch/config.yaml": str(tmp_path / "config.yaml"),
    }
    args = [moved.get(arg, arg) for arg in container["args"]]
    assert set(moved.values()) <= set(args), "the chart's command line changed: update this test"
    log = (tmp_path / "sidecar.log").open("wb")
    process = subprocess.Popen([str(SIDECAR), *args], stdout=log, stderr=subprocess.STDOUT)
    try:
        yield {
            "container": container,
            "metrics": f"http://127.0.0.1:{metrics_port}",
            "control": f"http://127.0.0.1:{control_port}",
            "socket": tmp_path / "adamwatch.sock",
            "token": token,
            "process": process,
            "log": tmp_path / "sidecar.log",
        }
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
        log.close()


def http_refused(base_url: str) -> bool:
    host, port = base_url.removeprefix("http://").split(":")
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
    except OSError:
        return True
    return False


def wait_ready(sidecar: dict, path: str, deadline_s: float) -> int:
    """Poll like the kubelet's startup probe; return the last status (0: no answer)."""
    status, deadline = 0, time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if sidecar["process"].poll() is not None:
            output = sidecar["log"].read_text(errors="replace")
            pytest.fail(f"sidecar exited with {sidecar['process'].returncode}: {output[-2000:]}")
        try:
            status = http("GET", sidecar["metrics"] + path)
        except (OSError, urllib.error.URLError):
            status = 0
        if status == 200:
            return status
        time.sleep(0.1)
    return status


def test_sidecar_should_accept_the_chart_config_and_pass_the_startup_probe_without_a_trainer(chart_sidecar):
    probe = chart_sidecar["container"]["startupProbe"]
    budget = probe["periodSeconds"] * probe["failureThreshold"]

    assert wait_ready(chart_sidecar, probe["httpGet"]["path"], min(budget, 20)) == 200
    assert http("GET", chart_sidecar["metrics"] + chart_sidecar["container"]["livenessProbe"]["httpGet"]["path"]) == 200
    assert chart_sidecar["socket"].is_socket()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as trainer:
        trainer.settimeout(2)
        trainer.connect(str(chart_sidecar["socket"]))  # where ADAMWATCH_ENDPOINT points


def test_sidecar_should_serve_metrics_where_the_pod_monitor_scrapes(chart_sidecar):
    assert wait_ready(chart_sidecar, "/readyz", 20) == 200

    with OPENER.open(chart_sidecar["metrics"] + "/metrics", timeout=2) as response:
        text = response.read().decode()
    assert "adamwatch_" in text


def test_webhook_should_require_the_chart_token(chart_sidecar):
    assert wait_ready(chart_sidecar, "/readyz", 20) == 200
    body = json.dumps({"version": "4", "status": "firing", "alerts": []}).encode()

    if http_refused(chart_sidecar["control"]):
        pytest.fail(f"nothing listens on the control address: {chart_sidecar['log'].read_text()[-1500:]}")
    unauthenticated = http("POST", chart_sidecar["control"] + "/api/v1/alertmanager", body=body)
    authenticated = http("POST", chart_sidecar["control"] + "/api/v1/alertmanager", chart_sidecar["token"], body)

    assert unauthenticated == 401
    assert authenticated != 401


def test_rendered_config_file_should_be_valid_for_the_sidecar():
    config_module = pytest.importorskip("adamwatch_sidecar.config")
    for case in ["default", "secrets-values.yaml"]:
        config_map = next(m for m in of_kind(render_case(case), "ConfigMap") if m["metadata"]["name"].endswith("-config"))
        raw = yaml.safe_load(config_map["data"]["config.yaml"])
        config = config_module.build_config(raw)
        assert config.retention_seconds == raw["retention_seconds"]
