"""benchmarks/fleet_scale.py and its fake trainers: right frames, and a tiny fleet that pages once.

The slow tests run the benchmark itself at a tiny scale (16 ranks, 4 sidecars,
1 s scrape and evaluation) so that it cannot rot, and interrupt one run to see
that nothing it started survives.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import threading

import pytest
from prometheus_client.parser import text_string_to_metric_families

from adamwatch import wire
from adamwatch_sidecar.config import build_config
from adamwatch_sidecar.optimizer_policy_service import attach_policy
from adamwatch_sidecar.remediation.wiring import attach
from adamwatch_sidecar.run_tracking import attach_run_tracking
from adamwatch_sidecar.server import Sidecar

ROOT = pathlib.Path(__file__).resolve().parents[2]
BENCHMARK = ROOT / "benchmarks" / "fleet_scale.py"
sys.path.insert(0, str(BENCHMARK.parent))

import fleet_trainers  # noqa: E402

needs_stack = pytest.mark.skipif(
    shutil.which("prometheus") is None or not os.path.exists("/usr/bin/prometheus-alertmanager"),
    reason="prometheus and prometheus-alertmanager are not installed (scripts/setup.sh installs them)")
TINY = ["--ranks", "16", "--ranks-per-sidecar", "4", "--scrape-interval", "1", "--steps-per-second", "5"]


def _decode(frame: bytes) -> wire.Message:
    (message,) = wire.FrameDecoder().feed(frame)
    assert isinstance(message, wire.Message), message
    return message


def test_a_spliced_frame_is_a_valid_step_with_the_rank_s_own_loss():
    frames = fleet_trainers.FleetFrames(fleet_trainers.step_payload(20, 1.7e9, 1.0, deep=True, nonfinite=False))
    first, second = _decode(frames.for_rank(2.5)), _decode(frames.for_rank(0.125))
    assert first.type is wire.MessageType.STEP and first.unknown_fields == ()
    assert (first.payload["loss"], second.payload["loss"]) == (2.5, 0.125)
    assert {k: v for k, v in first.payload.items() if k != "loss"} == {k: v for k, v in second.payload.items()
                                                                       if k != "loss"}
    assert first.payload["step"] == 20 and len(first.payload["deep"]) == len(fleet_trainers.GROUPS)
    assert len(first.payload["group_grad_norms"]) == len(first.payload["lr"]) == len(fleet_trainers.GROUPS)


def test_a_non_finite_step_is_what_the_fused_guard_reports():
    payload = _decode(fleet_trainers.FleetFrames(
        fleet_trainers.step_payload(21, 1.7e9, 1.0, deep=True, nonfinite=True)).for_rank(2.5)).payload
    assert math.isnan(payload["loss"]) and payload["loss_nonfinite"] and payload["grad_nonfinite"]
    assert payload["skipped"] and payload["skip_reason"] == "guard" and payload["deep"] is None


def test_every_field_of_the_wire_schema_is_sent():
    # A field added to the schema is sent with a neutral value until the fake
    # trainers learn a realistic one: listed here so that someone notices.
    assert fleet_trainers.schema_fields_filled() == {"HELLO": [], "STEP": []}
    spec = fleet_trainers.RankSpec("unix:///x", "fleet-0", 3, 8, "fleet-0-pod-0")
    hello = fleet_trainers.hello_payload(spec, 10)
    assert wire.validate_payload(wire.MessageType.HELLO, hello) == ()
    assert (hello["job"], hello["rank"], hello["world_size"], hello["host"]) == ("fleet-0", 3, 8, "fleet-0-pod-0")


def _series_per_healthy_rank(tmp_path) -> int:
    """What one healthy rank exports: the benchmark's sidecar (remediation in dry run) built here, not started,
    fed the fake trainer's frames and rendered."""
    sidecar = Sidecar(build_config({"listen": f"unix://{tmp_path}/unused.sock"}))
    remediation = attach(sidecar, {"dry_run": True})
    attach_run_tracking(sidecar)  # as adamwatch-sidecar serve does (issue 11: exits, device time, ...)
    attach_policy(sidecar, {})  # and so does this (issue 12: configuration changes, policy verdicts)
    try:
        # rank 1: the minimum over ranks (rank 0 also exports its job's run outcomes)
        spec = fleet_trainers.RankSpec("unix:///x", "fleet-0", 1, 4, "fleet-0-pod-0")
        key = sidecar.state.hello(1, fleet_trainers.hello_payload(spec, 10))
        for step in (9, 10):
            frame = fleet_trainers.FleetFrames(fleet_trainers.step_payload(step, 1.7e9, 0.2, step == 10, False))
            sidecar.state.apply(key, _decode(frame.for_rank(2.0)))
        text = sidecar.collector.render_text().decode()
    finally:
        remediation.shutdown()
    return sum(1 for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.labels.get("rank") == "1")


@needs_stack
@pytest.mark.slow
@pytest.mark.e2e
def test_a_tiny_fleet_pages_pagerduty_once_and_reports_every_figure(tmp_path):
    out = tmp_path / "fleet.json"
    result = subprocess.run([sys.executable, str(BENCHMARK), *TINY, "--duration", "3", "--json", str(out)],
                            capture_output=True, text=True, timeout=150, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    print(result.stdout)
    report = json.loads(out.read_text())
    incident = report["incident"]
    # NaN on all 8 ranks of fleet-0: 16 alerts (loss and gradients), one page, fleet-1 quiet.
    assert incident["notifications"] == 1 and incident["other_jobs_notified"] == 0, incident
    assert incident["alerts_in_first"] == incident["alerts_expected"] == 16, incident
    assert incident["alertmanager_groups"] == [{"labels": {"job": "fleet-0"}, "alerts": 16}]
    assert incident["summary"] == "[FIRING] fleet-0: A training step produced a non-finite loss or gradient."
    figures = report["figures"]
    assert figures["series per rank, from the sidecar"]["min"] == _series_per_healthy_rank(tmp_path)
    for label in ("scrape size per sidecar", "scrape duration per sidecar", "Prometheus RSS", "sidecar RSS",
                  "rule group adamwatch: evaluation time", "rule group adamwatch-job: evaluation time"):
        assert figures[label]["min"] > 0, (label, figures[label])
    assert report["settings"]["sidecars"] == 4 and report["settings"]["trainers"]["dropped"] == 0


@needs_stack
@pytest.mark.slow
@pytest.mark.e2e
def test_an_interrupted_run_leaves_no_process_behind():
    process = subprocess.Popen([sys.executable, str(BENCHMARK), *TINY, "--duration", "60"], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    watchdog = threading.Timer(120, process.kill)
    watchdog.start()
    try:
        assert process.stdout is not None
        line = ""
        while not line.startswith("processes:"):
            line = process.stdout.readline()
            assert line, "the benchmark ended before it started its processes"
        pids = [int(pid) for pid in line.split()[1:]]
        assert len(pids) == 4 + 3  # 4 sidecars, Alertmanager, Prometheus, the fake trainers
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 130, process.stdout.read()[-3000:]
    finally:
        watchdog.cancel()
        if process.poll() is None:
            process.kill()
    alive = [pid for pid in pids if pathlib.Path(f"/proc/{pid}").exists()
             and "Z" not in pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]]
    assert not alive, f"still running after the interrupt: {alive}"
