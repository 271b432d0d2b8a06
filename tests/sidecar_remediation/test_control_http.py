"""Control API over real HTTP: token auth, the Alertmanager webhook, manual actions, status."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from adamwatch_sidecar.http_server import HttpServer
from adamwatch_sidecar.remediation.control_http import ControlRoutes, TokenSource

from .helpers import make_rig

TOKEN = "s3cret-token-for-tests"


@pytest.fixture
def control(tmp_path):
    rig = make_rig(tmp_path)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    routes = ControlRoutes(rig.service, TokenSource(str(token_file), environ={}), rig.state)
    server = HttpServer("127.0.0.1:0", routes.routes(), name="control")
    server.start()
    rig.url = server.url
    rig.token_file = token_file
    yield rig
    server.stop()


def call(url: str, method: str, path: str, body=None, token: str | None = TOKEN, raw: bytes | None = None):
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def webhook(*alerts: dict) -> dict:
    """An Alertmanager webhook body (version 4)."""
    return {"version": "4", "groupKey": "{}:{}", "truncatedAlerts": 0, "status": "firing", "receiver": "adamwatch",
            "groupLabels": {}, "commonLabels": {}, "commonAnnotations": {}, "externalURL": "http://am:9093",
            "alerts": list(alerts)}


def alert(name: str, job: str = "gpt", rank: str = "0", status: str = "firing", fingerprint: str = "f1") -> dict:
    return {"status": status, "labels": {"alertname": name, "job": job, "rank": rank, "severity": "warning"},
            "annotations": {"summary": "x."}, "startsAt": "2026-11-21T05:00:00Z", "endsAt": "0001-01-01T00:00:00Z",
            "generatorURL": "http://prom/graph", "fingerprint": fingerprint}


def rejected(rig, endpoint: str, reason: str) -> float | None:
    return rig.state.value("adamwatch_control_requests_rejected_total", {"endpoint": endpoint, "reason": reason})


@pytest.mark.parametrize("path, method, body", [
    ("/api/v1/alertmanager", "POST", webhook()),
    ("/api/v1/actions", "POST", {"action": "status"}),
    ("/api/v1/status", "GET", None),
])
def test_requests_without_or_with_a_wrong_token_are_rejected_and_counted(control, path, method, body, caplog):
    endpoint = path.rsplit("/", 1)[1]
    caplog.set_level("WARNING", logger="adamwatch_sidecar.remediation.control_http")
    status, answer = call(control.url, method, path, body, token=None)
    assert status == 401 and answer["reason"] == "missing_token"
    status, answer = call(control.url, method, path, body, token="wrong")
    assert status == 401 and answer["reason"] == "bad_token"
    assert rejected(control, endpoint, "missing_token") == 1
    assert rejected(control, endpoint, "bad_token") == 1
    logged = [r.getMessage() for r in caplog.records]
    assert f"control request to {endpoint} rejected (missing_token): missing 'Authorization: Bearer <token>' header" \
        in logged
    assert TOKEN not in " ".join(logged) and "wrong" not in " ".join(logged)  # tokens are never logged
    status, _ = call(control.url, method, path, body)
    assert status == 200


def test_without_a_configured_token_every_request_is_rejected(tmp_path):
    rig = make_rig(tmp_path)
    routes = ControlRoutes(rig.service, TokenSource(None, environ={}), rig.state)
    server = HttpServer("127.0.0.1:0", routes.routes(), name="control")
    server.start()
    try:
        status, answer = call(server.url, "GET", "/api/v1/status", token="")
        assert status == 401 and answer["reason"] == "no_token_configured"
        status, answer = call(server.url, "GET", "/api/v1/status", token="anything")
        assert status == 401
        assert rejected(rig, "status", "no_token_configured") == 2
    finally:
        server.stop()


def test_the_token_comes_from_the_environment_when_no_file_is_given():
    assert TokenSource(None, environ={"ADAMWATCH_CONTROL_TOKEN": " abc \n"}).current() == "abc"
    assert TokenSource(None, environ={"ADAMWATCH_CONTROL_TOKEN": ""}).current() is None


def test_a_rotated_token_file_takes_effect_without_a_restart(control):
    assert call(control.url, "GET", "/api/v1/status")[0] == 200
    control.token_file.write_text("rotated-token-with-another-length")
    assert call(control.url, "GET", "/api/v1/status")[0] == 401
    assert call(control.url, "GET", "/api/v1/status", token="rotated-token-with-another-length")[0] == 200


@pytest.mark.parametrize("raw, reason", [
    (b"{not json", "malformed"),
    (b"[1, 2]", "malformed"),
    (json.dumps({"version": "3", "alerts": []}).encode(), "malformed"),
    (json.dumps({"version": "4", "alerts": "nope"}).encode(), "malformed"),
    (json.dumps({"version": "4", "alerts": [{"labels": {"alertname": 5}}]}).encode(), "malformed"),
])
def test_malformed_webhooks_get_400_and_are_counted(control, raw, reason):
    status, answer = call(control.url, "POST", "/api/v1/alertmanager", raw=raw)
    assert status == 400 and answer["reason"] == reason
    assert rejected(control, "alertmanager", reason) == 1


def test_a_firing_mapped_alert_walks_the_same_ladder(control):
    control.hello()
    control.warm_up()
    status, answer = call(control.url, "POST", "/api/v1/alertmanager",
                          webhook(alert("AdamwatchLossSpike"), alert("AdamwatchTrainerDisconnected", fingerprint="f2"),
                                  alert("AdamwatchGradNormExplosion", job="", fingerprint="f3"),
                                  alert("AdamwatchGradNormExplosion", job="elsewhere", fingerprint="f4")))
    assert status == 200
    first, unmapped, nojob, elsewhere = answer["results"]
    assert elsewhere["result"] == "ignored: no trainer of this job reports to this sidecar"
    assert first["result"] == "action reduce_lr" and first["job"] == "gpt"
    assert unmapped["result"].startswith("ignored: no alert_actions entry")
    assert nojob["result"] == "ignored: the alert has no job label"
    (_, cmd), = control.sent
    assert cmd["action"] == "reduce_lr" and cmd["id"] == first["command_id"]
    assert cmd["reason"].startswith("alert:AdamwatchLossSpike")
    control.ack(cmd, step=42)
    assert control.state.value("adamwatch_remediations_total",
                               {"job": "gpt", "rank": "0", "action": "reduce_lr", "outcome": "applied"}) == 1
    # Alertmanager re-sends the still-firing alert after the cooldown: it persists -> next rung.
    for i in range(41, 52):
        control.step(i, loss=2.0)
    status, answer = call(control.url, "POST", "/api/v1/alertmanager", webhook(alert("AdamwatchLossSpike")))
    assert answer["results"][0]["result"] == "action restore_checkpoint"
    decision = [x for x in control.audit() if x["event"] == "decision"][-1]
    assert decision["source"] == "alertmanager" and decision["detector"] == "alert:AdamwatchLossSpike"
    assert decision["evidence"]["labels"]["alertname"] == "AdamwatchLossSpike"
    # alerts do not count as step-latency detections
    assert control.state.value("adamwatch_detections_total",
                               {"job": "gpt", "rank": "0", "detector": "alert:AdamwatchLossSpike"}) is None


def test_a_resolved_alert_takes_no_action_and_ends_the_streak(control):
    control.hello()
    control.step(1)
    _, answer = call(control.url, "POST", "/api/v1/alertmanager",
                     webhook(alert("AdamwatchLossSpike", status="resolved")))
    assert answer["results"][0]["result"] == "resolved" and control.sent == []


def test_exported_job_is_used_when_prometheus_renamed_the_job_label(control):
    control.hello(job="llm")
    control.step(1, job="llm")
    a = alert("AdamwatchLossSpike", job="kubernetes-pods")
    a["labels"]["exported_job"] = "llm"
    _, answer = call(control.url, "POST", "/api/v1/alertmanager", webhook(a))
    assert answer["results"][0]["job"] == "llm" and control.sent[0][0] == ("llm", 0)


def test_manual_actions_over_http(control):
    control.hello()
    control.step(1)
    status, answer = call(control.url, "POST", "/api/v1/actions", {"action": "reduce_lr", "factor": 0.5})
    assert status == 202 and answer["outcome"] == "sent" and answer["job"] == "gpt"
    assert control.sent[-1][1]["id"] == answer["command_id"]
    status, answer = call(control.url, "POST", "/api/v1/actions", {"action": "reduce_lr", "factor": "half"})
    assert status == 400 and answer["reason"] == "malformed" and answer["error"].startswith("factor:")
    status, answer = call(control.url, "POST", "/api/v1/actions", {"action": "explode"})
    assert status == 400 and answer["reason"] == "unknown_action"
    status, answer = call(control.url, "POST", "/api/v1/actions", {"action": "stop", "job": "other"})
    assert status == 404 and answer["reason"] == "unknown_job"
    assert rejected(control, "actions", "malformed") == 1
    assert rejected(control, "actions", "unknown_action") == 1
    status, answer = call(control.url, "POST", "/api/v1/actions", {"action": "status", "job": "gpt"})
    assert status == 200 and list(answer["jobs"]) == ["gpt"]
    assert answer["pending"][0]["action"] == "reduce_lr"


def test_status_lists_jobs_ladders_and_recent_actions(control):
    control.hello()
    control.warm_up()
    control.step(41, loss=20.0)
    status, answer = call(control.url, "GET", "/api/v1/status")
    assert status == 200
    job = answer["jobs"]["gpt"]
    assert job["ranks"]["0"]["connected"] and job["pending_command"] == control.sent[0][1]["id"]
    assert job["ladders"]["loss_spike"]["rungs"][0]["uses_in_window"] == 1
    assert answer["recent"] == [] and answer["dry_run"] is False


def test_a_worker_pods_sidecar_refuses_alerts_and_actions_as_rejected_requests_not_failures(control):
    # rank 0 of "gpt" reports to another pod's sidecar; rank 1 reports here
    control.hello(rank=1)
    control.warm_up(rank=1)
    status, answer = call(control.url, "POST", "/api/v1/alertmanager",
                          webhook(alert("AdamwatchLossSpike", rank="1"), alert("AdamwatchLossSpike", status="resolved",
                                                                              fingerprint="f2")))
    assert status == 200  # a non-2xx would make Alertmanager re-send the batch
    refused, resolved = answer["results"]
    assert refused["result"].startswith("refused: deferred: rank 0 of job 'gpt' reports to another sidecar")
    assert refused["reason"] == "no_trainer" and "command_id" not in refused
    assert resolved["result"] == "resolved"
    assert rejected(control, "alertmanager", "no_trainer") == 1

    status, answer = call(control.url, "POST", "/api/v1/actions", {"action": "reduce_lr", "factor": 0.5})
    assert status == 409 and answer["reason"] == "no_trainer"
    assert "rank 0 of job 'gpt' reports to another sidecar" in answer["error"]
    assert rejected(control, "actions", "no_trainer") == 1

    assert control.sent == []
    ((_, samples),) = control.state.snapshot(only="adamwatch_remediations_total")
    assert samples == []  # refused requests are not failed remediations
    status, answer = call(control.url, "GET", "/api/v1/status")
    assert answer["jobs"]["gpt"]["acting_here"] is False and answer["recent"] == []
