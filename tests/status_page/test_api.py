"""The JSON API and the page's files on a real sidecar (in-process), fed over a real socket."""

from __future__ import annotations

import json
import math
import urllib.request

import pytest

from adamwatch import wire
from adamwatch_sidecar.config import build_config
from adamwatch_sidecar.http_server import HttpServer
from adamwatch_sidecar.remediation.wiring import attach
from adamwatch_sidecar.server import Sidecar
from adamwatch_sidecar.status_page.page import iter_static_files

from tests.sidecar.sidecar_testlib import TrainerSocket, deep_entry, hello_payload, http_get, step_payload, wait_for

HELLO, STEP, ACK = wire.MessageType.HELLO, wire.MessageType.STEP, wire.MessageType.ACK


@pytest.fixture
def sidecar(socket_dir, tmp_path):
    config = build_config({"listen": f"unix://{socket_dir}/aw.sock", "metrics_address": "127.0.0.1:0",
                           "remediation": {"audit": {"path": str(tmp_path / "audit.jsonl")}}})
    sc = Sidecar(config)
    sc.remediation = attach(sc, config.remediation, environ={})
    sc.start()
    try:
        yield sc
    finally:
        sc.stop()
        sc.remediation.shutdown()


def get_json(sidecar, path: str) -> tuple[int, dict]:
    status, content_type, body = http_get(sidecar.metrics_server.url + path)
    assert content_type == "application/json; charset=utf-8", (path, content_type)
    return status, json.loads(body)


def connect(sidecar, **hello) -> TrainerSocket:
    trainer = TrainerSocket(str(sidecar.ingest.endpoint))
    trainer.send(HELLO, hello_payload(**hello))
    return trainer


def steps_seen(sidecar, job="gpt", rank=0) -> int:
    info = sidecar.status_page.history.info((job, rank))
    return 0 if info is None else info["last_seq"]


def test_series_answers_what_the_trainer_sent(sidecar):
    trainer = connect(sidecar)
    for i in range(1, 21):
        extra = {"deep": [deep_entry(1.0), deep_entry(2.0)]} if i % 10 == 0 else {"loss": 1.0 / i}
        if i == 7:
            extra.update(loss=None, loss_nonfinite=True, grad_nonfinite=True, grad_norm=None, skipped=True,
                         skip_reason="guard")
        trainer.send(STEP, step_payload(i, samples=32, lr=[1e-3 * i, 5e-4], **extra))
    wait_for(lambda: steps_seen(sidecar) == 20, what="20 steps in the history")
    status, body = get_json(sidecar, "/api/v1/series?job=gpt&rank=0")
    assert status == 200
    points = body["points"]
    assert body["param_groups"] == ["decay", "no_decay"] and body["since"] is None
    assert points["seq"] == list(range(1, 21)) and points["step"] == list(range(1, 21))
    assert points["loss"][6] is None and points["nonfinite"][6] == 1 and points["skipped"][6] == 1
    assert points["loss"][3] == pytest.approx(0.25, rel=1e-8) and points["loss"][2] == pytest.approx(1 / 3, rel=1e-8)
    assert points["grad_norm"][6] is None and points["grad_norm"][0] == 1.5
    assert points["lr"]["decay"][4] == pytest.approx(5e-3, rel=1e-8) and points["lr"]["no_decay"] == [5e-4] * 20
    assert points["samples"] == [32] * 20 and points["tokens"] == [None] * 20
    assert points["time"][0] == 1_700_000_001.0 and points["duration_s"][0] == 0.05
    assert sum(points["skipped"]) == sum(points["nonfinite"]) == 1
    deep = body["deep"]
    assert deep["seq"] == [10, 20] and deep["step"] == [10, 20]
    assert deep["groups"]["no_decay"]["effective_lr"]["0.5"] == [6.0, 6.0]
    assert deep["groups"]["decay"]["update_size"]["0.99"] == [0.5, 0.5]
    assert deep["groups"]["decay"]["update_to_weight"] == [0.001, 0.001]
    assert body["limits"]["steps"] == 10_000 and body["downsampled"]["steps"] == []

    # The next poll: only what is new, and no buckets while they did not change.
    trainer.send(STEP, step_payload(21, loss=0.5))
    wait_for(lambda: steps_seen(sidecar) == 21, what="step 21")
    _, newer = get_json(sidecar, f"/api/v1/series?job=gpt&rank=0&since=20&epoch={body['epoch']}"
                                 f"&downsampled={body['downsampled_version']}")
    assert newer["points"]["seq"] == [21] and newer["points"]["loss"] == [0.5] and newer["downsampled"] is None
    # With a single trainer, job and rank may be left out.
    _, default = get_json(sidecar, "/api/v1/series?since=20")
    assert default["points"]["seq"] == [21]
    trainer.close()


@pytest.mark.parametrize("query, status, names", [
    ("job=gpt&rank=x", 400, "rank: must be an integer"),
    ("job=gpt&rank=-1", 400, "rank: must be >= 0"),
    ("job=gpt&rank=0&since=abc", 400, "since: must be an integer"),
    ("job=gpt&rank=0&rank=1", 400, "rank: give it once"),
    ("job=gpt", 400, "rank: required"),
    ("job=other&rank=0", 404, "no history for job='other' rank=0"),
])
def test_bad_series_requests_get_an_error_naming_the_parameter(sidecar, query, status, names):
    trainer = connect(sidecar)
    trainer.send(STEP, step_payload(1))
    wait_for(lambda: steps_seen(sidecar) == 1, what="a step")
    got, body = get_json(sidecar, "/api/v1/series?" + query)
    assert got == status and names in body["error"]
    trainer.close()


def test_two_trainers_need_a_job_and_rank(sidecar):
    a, b = connect(sidecar, rank=0), connect(sidecar, rank=1)
    for t in (a, b):
        t.send(STEP, step_payload(1))
    wait_for(lambda: steps_seen(sidecar, rank=1) == 1 and steps_seen(sidecar) == 1, what="both steps")
    status, body = get_json(sidecar, "/api/v1/series")
    assert status == 400 and "knows 2 trainers" in body["error"]
    a.close(), b.close()


def test_an_incident_reaches_events_and_the_ladder_shows_it(sidecar):
    trainer = connect(sidecar, groups=["all_params"])
    for i in range(1, 41):
        trainer.send(STEP, step_payload(i, loss=2.0 + 0.01 * (i % 5), grad_norm=1.0 + 0.01 * (i % 3),
                                        group_grad_norms=[1.0], lr=[1e-3]))
    trainer.send(STEP, step_payload(41, loss=50.0, grad_norm=1.0, group_grad_norms=[1.0], lr=[1e-3]))
    command = trainer.read_message()
    assert command.type is wire.MessageType.COMMAND and command.payload["action"] == "reduce_lr"
    trainer.send(ACK, {"id": command.payload["id"], "action": "reduce_lr", "outcome": "applied", "step": 42,
                       "lr_scale": 0.5})
    wait_for(lambda: sidecar.status_page.events.last_seq >= 4, what="the outcome event")
    _, body = get_json(sidecar, "/api/v1/events?job=gpt&rank=0")
    kinds = [(e["kind"], e["detector"], e["action"]) for e in body["events"]]
    assert kinds == [("connected", None, None), ("detection", "loss_spike", None),
                     ("decision", "loss_spike", "reduce_lr"), ("outcome", "loss_spike", "reduce_lr")]
    detection, decision, outcome = body["events"][1:]
    assert detection["step"] == 41 and detection["evidence"]["value"] == 50.0
    assert decision["command_id"] == outcome["command_id"] == command.payload["id"]
    assert outcome["outcome"] == "applied" and outcome["steps_to_effect"] == 1
    _, later = get_json(sidecar, f"/api/v1/events?job=gpt&since={body['last_seq']}&epoch={body['epoch']}")
    assert later["events"] == []
    _, restarted = get_json(sidecar, f"/api/v1/events?since={body['last_seq']}&epoch=gone")
    assert len(restarted["events"]) == 4  # another sidecar's cursor: everything again

    _, status = get_json(sidecar, "/api/v1/trainers")
    job = status["jobs"]["gpt"]
    assert job["learning_rate_scale"] == 0.5 and job["acting_here"] is True
    assert job["cooldown"] == {"after": "reduce_lr", "steps_left": 10, "seconds_left": 0.0}
    assert job["ladders"]["loss_spike"]["last_rung"] == 0
    loss_detector = job["ranks"]["0"]["detectors"]["loss_spike"]
    assert loss_detector["armed"] is True and loss_detector["samples"] == 40
    assert loss_detector["threshold"] > loss_detector["mean"] > 2.0
    trainer.close()


def test_trainers_lists_what_the_panels_show(sidecar):
    trainer = connect(sidecar, rank=3)
    trainer.send(STEP, step_payload(5, loss=1.25))
    wait_for(lambda: steps_seen(sidecar, rank=3) == 1, what="a step")
    status, body = get_json(sidecar, "/api/v1/trainers")
    assert status == 200
    (t,) = body["trainers"]
    assert (t["job"], t["rank"], t["connected"], t["step"], t["loss"]) == ("gpt", 3, True, 5, 1.25)
    assert t["optimizer"]["implementation"] == "fused" and t["world_size"] == 4 and t["torch_version"] == "2.13.0"
    assert t["deep_stats_every"] == 10 and t["host"] == "node-1" and t["finished"] is False
    assert t["history"]["steps"] == 1 and t["history"]["limit_steps"] == 10_000
    assert body["remediation"] == {"enabled": True, "dry_run": False}
    assert 0 < body["memory"]["history_bytes"] <= body["memory"]["history_limits"]["total_bytes"]
    # The page asks about its trainer: the others are listed by key only.
    other = connect(sidecar, job="other", rank=0)
    wait_for(lambda: len(sidecar.state.keys()) == 2, what="the second trainer")
    _, one = get_json(sidecar, "/api/v1/trainers?job=gpt&rank=3")
    assert [t["job"] for t in one["trainers"]] == ["gpt", "other"]
    assert one["trainers"][0]["optimizer"]["kind"] == "AdamW"
    assert one["trainers"][1] == {"job": "other", "rank": 0, "connected": True, "finished": False}
    assert list(one["jobs"]) == ["gpt"]
    trainer.close(), other.close()


def test_the_page_and_every_static_file_are_served_read_only(sidecar):
    url = sidecar.metrics_server.url
    status, content_type, page = http_get(url + "/")
    assert status == 200 and content_type == "text/html; charset=utf-8"
    assert b"Content-Security-Policy" in page and b"connect-src 'self'" in page
    types = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
    files = dict(iter_static_files())
    for path, content in files.items():
        status, content_type, body = http_get(f"{url}/static/{path}")
        assert status == 200 and body == content, path
        suffix = path[path.rfind("."):]
        if suffix in types:
            assert content_type == types[suffix], path
    # Every file the page references is one the sidecar serves.
    for ref in ("/static/app.js", "/static/style.css", "/static/vendor/uplot/uPlot.iife.min.js",
                "/static/vendor/uplot/uPlot.min.css", "/static/favicon.svg"):
        assert ref.encode() in page and ref[len("/static/"):] in files
    assert http_get(url + "/static/../server.py")[0] == 404
    request = urllib.request.Request(url + "/api/v1/series", data=b"{}", method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=5)
    assert refused.value.code == 405


def test_a_handler_that_takes_the_query_gets_it_and_others_do_not():
    seen = []

    def with_query(headers, body, query):
        seen.append(query)
        return 200, "text/plain", b"ok"

    with_query.takes_query = True
    server = HttpServer("127.0.0.1:0", {("GET", "/q"): with_query,
                                        ("GET", "/plain"): lambda headers, body: (200, "text/plain", b"plain")})
    server.start()
    try:
        assert http_get(server.url + "/q?job=a%20b&rank=1")[2] == b"ok"
        assert http_get(server.url + "/q")[2] == b"ok"
        assert http_get(server.url + "/plain?x=1")[2] == b"plain"
    finally:
        server.stop()
    assert seen == ["job=a%20b&rank=1", ""]


def test_a_ten_thousand_step_answer_is_complete_and_strict_json(sidecar):
    key = sidecar.state.hello("test-conn", hello_payload(job="big"))  # as ingest applies messages, minus the socket
    for i in range(1, 10_001):
        payload = step_payload(i, loss=math.inf if i == 5000 else 2.0 + 1 / i,
                               deep=[deep_entry(), deep_entry()] if i % 10 == 0 else None)
        sidecar.state.apply(key, wire.Message(STEP, payload))
    status, _, body = http_get(sidecar.metrics_server.url + "/api/v1/series?job=big&rank=0")
    assert status == 200
    parsed = json.loads(body, parse_constant=lambda name: pytest.fail(f"non-JSON constant {name}"))
    assert len(parsed["points"]["seq"]) == 10_000 and parsed["points"]["loss"][4999] is None
    assert len(parsed["deep"]["seq"]) == 1000
