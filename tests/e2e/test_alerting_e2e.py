"""End to end with real components: training runs → sidecars → Prometheus (our rules) → Alertmanager (our routing).

Two CPU training runs of the same length, each with its own sidecar process (two
"pods"), scraped every second by a real Prometheus that evaluates
alerts/adamwatch-rules.yaml every second and sends to a real Alertmanager with
alerts/alertmanager.yaml (only endpoints, secrets and timers made local; 1 s
group_wait). PagerDuty is a local Events v2 stub, the ticket system a local
receiver; the sidecar webhook goes to the real sidecar's control API.

- the run that turns non-finite reaches the PagerDuty stub with the routing
  key, its job and the alert's summary; the latency from the first non-finite
  step to the event is printed;
- a third run that dies of torch.OutOfMemoryError pages (AdamwatchTrainerOutOfMemory),
  and, as the only run ended so far, burns the run-success SLO's budget: the slow-burn
  ticket (AdamwatchErrorBudgetSlowBurn) reaches the ticket receiver (issue 11 item 9);
- the healthy run raises no critical alert;
- every dashboard query returns data during the healthy run, except panels
  documented as event-only or needing a long history.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import time
import urllib.parse

import pytest
import yaml

from tests.alerts.assets_under_test import EVENT_ONLY, NEEDS_HISTORY, RULES_FILE, dashboard_queries, substitute
from tests.alerts.stack import (
    ALERTMANAGER,
    Recorder,
    api,
    free_port,
    local_alertmanager_config,
    start,
    start_alertmanager,
    stop,
    wait_http,
)

HERE = pathlib.Path(__file__).resolve().parent
PROMETHEUS = shutil.which("prometheus")
HEALTHY, BROKEN, OOM = "e2e-healthy", "e2e-nonfinite", "e2e-oom"
OOM_STEPS = 60  # 4 s of training, then torch.OutOfMemoryError
STEPS, STEPS_PER_SECOND, NAN_FROM = 540, 15, 180  # 36 s runs; non-finite from 12 s in
ROUTING_KEY, CONTROL_TOKEN = "e2e-routing-key", "e2e-control-token"
# Grafana's $__rate_interval for a 1 s scrape interval (4 x scrape, rounded up generously).
RATE_INTERVAL = "10s"

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.skipif(PROMETHEUS is None or not os.path.exists(ALERTMANAGER),
                       reason="prometheus and prometheus-alertmanager are not installed (scripts/setup.sh installs them)"),
]


def _sidecar(tmp: pathlib.Path, name: str, processes: list) -> dict:
    """Start one sidecar process; returns its endpoint, metrics and control addresses."""
    folder = tmp / name
    folder.mkdir()
    (folder / "token").write_text(CONTROL_TOKEN + "\n")
    metrics, control = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    config = {
        "listen": f"unix://{folder}/adamwatch.sock",
        "metrics_address": metrics,
        "control_address": control,
        "control_token_file": str(folder / "token"),
        "log_level": "WARNING",
        "remediation": {"audit": {"path": str(folder / "audit.jsonl")}},
    }
    (folder / "sidecar.yaml").write_text(yaml.safe_dump(config))
    log = folder / "sidecar.log"
    sidecar_cli = str(pathlib.Path(sys.executable).with_name("adamwatch-sidecar"))
    process = start([sidecar_cli, "serve", "--config", str(folder / "sidecar.yaml")], log)
    processes.append(process)
    wait_http(f"http://{metrics}/healthz", process, 30, log)
    return {"endpoint": config["listen"], "metrics": metrics, "control": control, "folder": folder}


def _prometheus(tmp: pathlib.Path, targets: list[str], alertmanager: str, processes: list) -> str:
    port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES_FILE)],
        "alerting": {"alertmanagers": [{"static_configs": [{"targets": [alertmanager]}]}]},
        "scrape_configs": [{
            # The sidecar's `up` series carries this name (AdamwatchSidecarDown);
            # honor_labels keeps the trainer's own `job` label on every series.
            "job_name": "adamwatch-sidecar",
            "honor_labels": True,
            "static_configs": [{"targets": targets}],
        }],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = tmp / "prometheus.log"
    process = start([PROMETHEUS, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'prom-data'}",
                     f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"], log)
    processes.append(process)
    wait_http(f"http://127.0.0.1:{port}/-/ready", process, 60, log)
    return f"http://127.0.0.1:{port}"


def _query(prometheus: str, expr: str) -> list:
    reply = api(f"{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    assert reply["status"] == "success", reply
    return reply["data"]["result"]


def _wait(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(interval)


def _train(tmp: pathlib.Path, sidecar: dict, job: str, nan_from: int, processes: list) -> tuple[subprocess.Popen, pathlib.Path]:
    out = tmp / f"{job}.json"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    process = start([sys.executable, str(HERE / "_trainer.py"), sidecar["endpoint"], job, str(STEPS),
                     str(STEPS_PER_SECOND), str(nan_from), str(tmp / f"{job}-ckpt"), str(out)],
                    tmp / f"{job}.log", env=env)
    processes.append(process)
    return process, out


def test_non_finite_training_pages_pagerduty_and_a_healthy_run_stays_quiet(tmp_path):
    processes: list[subprocess.Popen] = []
    receivers = {"pagerduty": Recorder(), "ticket": Recorder()}
    try:
        healthy_sidecar = _sidecar(tmp_path, "sidecar-healthy", processes)
        broken_sidecar = _sidecar(tmp_path, "sidecar-broken", processes)
        am_config = local_alertmanager_config(
            tmp_path, pagerduty=receivers["pagerduty"].url("/v2/enqueue"), ticket=receivers["ticket"].url("/ticket"),
            sidecar=f"http://{broken_sidecar['control']}/api/v1/alertmanager",
            control_token=CONTROL_TOKEN, routing_key=ROUTING_KEY, group_wait="1s")
        am_process, am_api = start_alertmanager(tmp_path, am_config)
        processes.append(am_process)
        prometheus = _prometheus(tmp_path, [healthy_sidecar["metrics"], broken_sidecar["metrics"]],
                                 am_api.split("//")[1].split("/")[0], processes)
        _wait(lambda: len(_query(prometheus, 'up{job="adamwatch-sidecar"} == 1')) == 2, 30, "both sidecars scraped")

        started = time.time()
        healthy, healthy_out = _train(tmp_path, healthy_sidecar, HEALTHY, 0, processes)
        broken, broken_out = _train(tmp_path, broken_sidecar, BROKEN, NAN_FROM, processes)
        # Shares the broken run's sidecar (a second trainer in that pod).
        oom = start([sys.executable, str(HERE / "_oom_trainer.py"), broken_sidecar["endpoint"], OOM, str(OOM_STEPS),
                     str(STEPS_PER_SECOND)], tmp_path / f"{OOM}.log", env=dict(os.environ, PYTHONUNBUFFERED="1"))
        processes.append(oom)

        # --- the non-finite run pages ------------------------------------------------
        nan_marker = pathlib.Path(str(broken_out) + ".nan")
        _wait(lambda: nan_marker.exists() and nan_marker.read_text(), 90, "the first non-finite step")
        first_nan = float(nan_marker.read_text())
        page = receivers["pagerduty"].wait_for(
            lambda r: (r["json"] or {}).get("payload", {}).get("custom_details", {}).get("job") == BROKEN, timeout=45)
        assert page, f"no PagerDuty event for {BROKEN}; alertmanager log: {(tmp_path / 'alertmanager.log').read_text()[-2000:]}"
        latency = page["time"] - first_nan
        print(f"\nnon-finite step -> PagerDuty event: {latency:.2f} s "
              f"(1 s scrape and evaluation, 1 s group_wait)")
        event = page["json"]
        assert page["path"] == "/v2/enqueue"
        assert event["routing_key"] == ROUTING_KEY
        assert event["event_action"] == "trigger"
        summary = "A training step produced a non-finite loss or gradient."
        # Alone in its group the summary is the title; with company (the sidecar's
        # ladder may be exhausted by then) the title counts them and names one.
        assert event["payload"]["summary"] == f"[FIRING] {BROKEN}: {summary}" or \
            event["payload"]["summary"].startswith(f"[FIRING] {BROKEN}: "), event["payload"]["summary"]
        assert event["payload"]["severity"] == "critical"
        details = event["payload"]["custom_details"]
        assert f"AdamwatchNonFiniteStep rank=0: {summary} " in details["firing"], details
        assert "/alerts/runbooks/AdamwatchNonFiniteStep.md" in details["firing"]
        print(f"PagerDuty title: {event['payload']['summary']!r}; firing: {details['firing'].strip()!r}")
        assert 0 < latency < 15, f"non-finite -> PagerDuty took {latency:.1f} s"

        # --- the OOM run pages, and its failed run burns the SLO: a ticket --------------
        assert oom.wait(timeout=60) == 1
        assert "torch.OutOfMemoryError" in (tmp_path / f"{OOM}.log").read_text()  # the traceback still printed
        oom_page = receivers["pagerduty"].wait_for(
            lambda r: (r["json"] or {}).get("payload", {}).get("custom_details", {}).get("job") == OOM, timeout=45)
        assert oom_page, f"no PagerDuty event for {OOM}"
        oom_details = oom_page["json"]["payload"]["custom_details"]
        assert "AdamwatchTrainerOutOfMemory rank=0: A trainer died because its device ran out of memory." \
            in oom_details["firing"], oom_details
        ticket = receivers["ticket"].wait_for(
            lambda r: any(a["labels"].get("alertname") == "AdamwatchErrorBudgetSlowBurn"
                          for a in (r["json"] or {}).get("alerts", [])), timeout=45)
        assert ticket, "no ticket for the run-success SLO's burn"
        burn = next(a for a in ticket["json"]["alerts"] if a["labels"]["alertname"] == "AdamwatchErrorBudgetSlowBurn")
        assert burn["labels"]["slo"] == "run_success" and burn["labels"]["severity"] == "warning"
        print(f"OOM -> PagerDuty {oom_page['time'] - started:.1f} s after start; SLO slow-burn ticket: "
              f"{burn['annotations']['description']!r}")

        # --- every dashboard query has data while the healthy run trains --------------
        assert healthy.poll() is None, "the healthy run ended before the dashboard check"
        checked, empty = 0, []
        for uid, panel, expr in dashboard_queries():
            if panel.get("description", "").startswith((EVENT_ONLY, NEEDS_HISTORY)):
                continue
            job = HEALTHY if uid == "adamwatch-optimizer-debug" else ".*"
            rank = "0" if uid == "adamwatch-optimizer-debug" else ".*"
            query = substitute(expr, job=job, rank=rank, rate_interval=RATE_INTERVAL)
            checked += 1
            if not _query(prometheus, query):
                empty.append(f"{uid} / {panel['title']}: {query}")
        assert checked > 30
        assert not empty, "dashboard queries without data:\n" + "\n".join(empty)

        # --- both runs finish; the healthy one never raised a critical alert -----------
        for process in (healthy, broken):
            assert process.wait(timeout=120) == 0, (tmp_path / f"{HEALTHY}.log").read_text()[-3000:]
        window = f"{int(time.time() - started) + 5}s"
        assert not _query(prometheus, f'max_over_time(ALERTS{{job="{HEALTHY}", severity="critical"}}[{window}])')
        # Not even a warning (pending included) while it trained.
        assert not _query(prometheus, f'max_over_time(ALERTS{{job="{HEALTHY}"}}[{window}])')
        assert _query(prometheus, f'max_over_time(ALERTS{{job="{BROKEN}", alertname="AdamwatchNonFiniteStep", '
                                  f'alertstate="firing"}}[{window}])')
        assert not receivers["pagerduty"].matching(
            lambda r: (r["json"] or {}).get("payload", {}).get("custom_details", {}).get("job") == HEALTHY)
        assert not receivers["pagerduty"].matching(lambda r: HEALTHY in json.dumps(r["json"]))
    finally:
        for process in reversed(processes):
            stop(process)
        for recorder in receivers.values():
            recorder.close()
