"""alerts/alertmanager.yaml: valid, routes as documented, secrets from files, inhibition works."""

from __future__ import annotations

import shutil
import subprocess
import time

import pytest
import yaml

from .assets_under_test import ALERTMANAGER_FILE
from .stack import ALERTMANAGER, Recorder, api, local_alertmanager_config, start_alertmanager, stop

AMTOOL = shutil.which("amtool")
needs_amtool = pytest.mark.skipif(AMTOOL is None, reason="amtool not installed (scripts/setup.sh installs it)")


@needs_amtool
def test_amtool_check_config_is_clean():
    result = subprocess.run([AMTOOL, "check-config", str(ALERTMANAGER_FILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


ROUTES = [
    # (labels, receivers in order)
    (["alertname=AdamwatchNonFiniteStep", "severity=critical", "job=gpt"], "pagerduty"),
    (["alertname=FutureCritical", "severity=critical", "adamwatch_remediate=true", "job=gpt"],
     "adamwatch-sidecar,pagerduty"),
    (["alertname=AdamwatchRemediationLadderExhausted", "severity=critical", "job=gpt"], "pagerduty"),
    (["alertname=AdamwatchLossSpike", "severity=warning", "adamwatch_remediate=true", "job=gpt"],
     "adamwatch-sidecar,ticket"),
    (["alertname=AdamwatchThroughputDrop", "severity=warning", "job=gpt"], "ticket"),
    (["alertname=SomethingElse", "severity=info"], "blackhole"),
    (["alertname=NoSeverity"], "ticket"),
]


@needs_amtool
@pytest.mark.parametrize("labels,receivers", ROUTES, ids=[r[0][0] for r in ROUTES])
def test_amtool_routes(labels, receivers):
    result = subprocess.run(
        [AMTOOL, "config", "routes", "test", f"--config.file={ALERTMANAGER_FILE}", f"--verify.receivers={receivers}", *labels],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == receivers


def test_secrets_are_files_never_inline():
    config = yaml.safe_load(ALERTMANAGER_FILE.read_text())
    receivers = {r["name"]: r for r in config["receivers"]}
    pagerduty = receivers["pagerduty"]["pagerduty_configs"][0]
    assert "routing_key_file" in pagerduty and "routing_key" not in pagerduty and "service_key" not in pagerduty
    sidecar = receivers["adamwatch-sidecar"]["webhook_configs"][0]
    assert sidecar["url"].endswith(":9401/api/v1/alertmanager")
    assert sidecar["http_config"]["authorization"] == {
        "type": "Bearer", "credentials_file": "/etc/alertmanager/secrets/adamwatch-control-token"}
    assert config["route"]["group_by"] == ["job"]


@pytest.fixture
def alertmanager(tmp_path):
    """The shipped routing in a real Alertmanager, with local PagerDuty, ticket and sidecar receivers."""
    receivers = {"pagerduty": Recorder(), "ticket": Recorder(), "sidecar": Recorder()}
    process = None
    try:
        config = local_alertmanager_config(
            tmp_path, pagerduty=receivers["pagerduty"].url("/v2/enqueue"), ticket=receivers["ticket"].url("/ticket"),
            sidecar=receivers["sidecar"].url("/api/v1/alertmanager"), control_token="t0ken", routing_key="rk-123")
        process, base = start_alertmanager(tmp_path, config)
        yield base, receivers
    finally:
        stop(process)
        for recorder in receivers.values():
            recorder.close()


def _job_of(request, job):
    return request["json"] and request["json"].get("groupLabels", {}).get("job") == job


@pytest.mark.skipif(not shutil.which(ALERTMANAGER), reason="prometheus-alertmanager not installed")
@pytest.mark.slow
def test_real_alertmanager_routes_inhibits_and_authenticates(alertmanager):
    base, receivers = alertmanager
    gpt = {"job": "gpt", "rank": "0"}
    api(f"{base}/alerts", [
        {"labels": {"alertname": "AdamwatchNonFiniteStep", "severity": "critical", "source": "loss", **gpt},
         "annotations": {"summary": "A training step produced a non-finite loss or gradient."}},
        # Same job: silenced by the non-finite alert.
        {"labels": {"alertname": "AdamwatchLossSpike", "severity": "warning", "adamwatch_remediate": "true", **gpt}},
        {"labels": {"alertname": "AdamwatchGradNormExplosion", "severity": "warning", "adamwatch_remediate": "true",
                    "param_group": "all", "job": "gpt", "rank": "1"}},
        # Another job's spike is not silenced: ticket and sidecar webhook.
        {"labels": {"alertname": "AdamwatchLossSpike", "severity": "warning", "adamwatch_remediate": "true",
                    "job": "other", "rank": "0"}},
    ])
    page = receivers["pagerduty"].wait_for(lambda r: r["path"] == "/v2/enqueue", timeout=15)
    assert page, "no PagerDuty event"
    assert page["json"]["routing_key"] == "rk-123" and page["json"]["event_action"] == "trigger"
    assert page["json"]["payload"]["summary"] == "[FIRING] gpt: A training step produced a non-finite loss or gradient."
    assert page["json"]["payload"]["custom_details"]["job"] == "gpt"
    hook = receivers["sidecar"].wait_for(lambda r: _job_of(r, "other"), timeout=15)
    assert hook, "the sidecar webhook got nothing"
    assert hook["headers"]["Authorization"] == "Bearer t0ken"
    assert [a["labels"]["alertname"] for a in hook["json"]["alerts"]] == ["AdamwatchLossSpike"]
    assert receivers["ticket"].wait_for(lambda r: _job_of(r, "other"), timeout=15)
    states = {(a["labels"]["alertname"], a["labels"]["job"]): a["status"]["state"] for a in api(f"{base}/alerts")}
    assert states == {
        ("AdamwatchNonFiniteStep", "gpt"): "active",
        ("AdamwatchLossSpike", "gpt"): "suppressed",
        ("AdamwatchGradNormExplosion", "gpt"): "suppressed",
        ("AdamwatchLossSpike", "other"): "active",
    }
    time.sleep(2)  # a group_interval more: inhibited alerts must not have leaked out meanwhile
    assert not receivers["sidecar"].matching(lambda r: _job_of(r, "gpt"))
    assert not receivers["ticket"].matching(lambda r: _job_of(r, "gpt"))
    assert len(receivers["pagerduty"].requests) == 1


@pytest.mark.skipif(not shutil.which(ALERTMANAGER), reason="prometheus-alertmanager not installed")
@pytest.mark.slow
def test_a_nan_on_every_rank_of_a_large_job_is_one_page_that_lists_twenty(alertmanager):
    # 300 alerts of one job (150 ranks, loss and gradients): the full list would
    # grow with the job until PagerDuty's 512 KB limit made Alertmanager drop
    # every detail (benchmarks/fleet_scale.py shows it at 1,024 ranks).
    base, receivers = alertmanager
    summary = "A training step produced a non-finite loss or gradient."
    api(f"{base}/alerts", [
        {"labels": {"alertname": "AdamwatchNonFiniteStep", "severity": "critical", "source": source, "job": "big",
                    "rank": str(rank)},
         "annotations": {"summary": summary, "description": f"Job big rank {rank} reported NaN/Inf in its {source}.",
                         "runbook_url": "https://example.invalid/AdamwatchNonFiniteStep.md"}}
        for rank in range(150) for source in ("loss", "grad")])
    page = receivers["pagerduty"].wait_for(lambda r: r["path"] == "/v2/enqueue", timeout=15)
    assert page, "no PagerDuty event"
    time.sleep(2)  # two group_intervals: a group split by rank or source would have sent more by now
    assert len(receivers["pagerduty"].requests) == 1
    assert page["json"]["payload"]["summary"] == f"[FIRING] big: {summary}"
    details = page["json"]["payload"]["custom_details"]
    assert details["job"] == "big" and details["num_firing"] == "300"
    assert details["firing"].count("AdamwatchNonFiniteStep rank=") == 20
    assert details["firing"].rstrip().endswith("... the first 20 of 300: all are in Alertmanager.")
    assert details["description"].count("Job big rank ") == 20
