"""The event log: audit records and trainer messages become numbered, bounded, filterable events."""

from __future__ import annotations

import json

import pytest

from adamwatch import wire
from adamwatch_sidecar.remediation.audit import AuditLog
from adamwatch_sidecar.status_page.events import EVENT_FIELDS, EventLog

from tests.sidecar.sidecar_testlib import hello_payload


def parsed(log: EventLog, **kw) -> list[dict]:
    texts, _ = log.read(**kw)
    return [json.loads(t) for t in texts]


def test_audit_records_reach_the_log_through_the_audit_listener(tmp_path):
    log = EventLog(clock=lambda: 50.0)
    audit = AuditLog(str(tmp_path / "audit.jsonl"), clock=lambda: 100.0)
    audit.add_listener(log.on_audit)
    audit.write("detection", job="gpt", rank=1, detector="loss_spike", ladder="loss_spike", step=812,
                evidence={"value": 9.1, "threshold": float("inf")}, source="detector")
    audit.write("decision", job="gpt", rank=1, detector="loss_spike", action="reduce_lr", args={"factor": 0.5},
                command_id="aw-1", step=812)
    audit.write("outcome", job="gpt", rank=0, action="reduce_lr", command_id="aw-1", outcome="applied", step=814,
                latency_seconds=0.02, steps_to_effect=2)
    events = parsed(log)
    assert [(e["kind"], e["seq"], e["time"]) for e in events] == [("detection", 1, 100.0), ("decision", 2, 100.0),
                                                                   ("outcome", 3, 100.0)]
    assert set(events[0]) == set(EVENT_FIELDS)
    assert events[0]["evidence"] == {"value": 9.1, "threshold": "inf"}  # strict JSON
    assert events[1]["args"] == {"factor": 0.5} and events[2]["steps_to_effect"] == 2
    # Remediation acts for the whole job: every rank's page shows it.
    assert [e["kind"] for e in parsed(log, job="gpt", rank=3)] == ["detection", "decision", "outcome"]


def test_a_failing_listener_never_stops_the_audit_log(tmp_path):
    audit = AuditLog(str(tmp_path / "audit.jsonl"))

    def broken(record):
        raise RuntimeError("boom")

    audit.add_listener(broken)
    audit.write("decision", job="gpt", action="reset")
    assert len((tmp_path / "audit.jsonl").read_text().splitlines()) == 1


def test_trainer_messages_become_connection_checkpoint_and_drop_events():
    now = [1000.0]
    log = EventLog(clock=lambda: now[0])
    key = ("gpt", 2)
    log.on_message(key, wire.Message(wire.MessageType.HELLO, hello_payload(rank=2, session="s1")))
    log.on_message(key, wire.Message(wire.MessageType.STEP, {"step": 1}))  # steps are the history's
    log.on_message(key, wire.Message(wire.MessageType.CHECKPOINT, {"event": "restored", "step": 140, "time": 999.0,
                                                                  "detail": "restored checkpoint of step 140"}))
    log.on_message(key, wire.Message(wire.MessageType.DROPPED, {"dropped_total": 5}))
    log.on_message(key, wire.Message(wire.MessageType.DROPPED, {"dropped_total": 9}))  # within 10 s: folded
    now[0] += 11
    log.on_message(key, wire.Message(wire.MessageType.DROPPED, {"dropped_total": 12}))
    log.on_message(key, wire.Message(wire.MessageType.GOODBYE, {"reason": "done", "step": 300}))
    log.on_message(key, None)
    events = parsed(log)
    assert [e["kind"] for e in events] == ["connected", "checkpoint", "dropped", "dropped", "finished", "disconnected"]
    assert "session s1" in events[0]["detail"]
    assert events[1]["checkpoint"] == "restored" and events[1]["step"] == 140 and events[1]["time"] == 999.0
    assert [e["dropped_total"] for e in events[2:4]] == [5, 12]
    assert "7 summaries" in events[3]["detail"]
    # A new session counts drops from zero again.
    log.on_message(key, wire.Message(wire.MessageType.HELLO, hello_payload(rank=2, session="s2", dropped_total=3)))
    assert parsed(log)[-1]["kind"] == "dropped" and parsed(log)[-1]["dropped_total"] == 3


def test_cursor_job_and_rank_filters():
    log = EventLog(clock=lambda: 1.0)
    log.add("connected", "a", 0)
    log.add("connected", "a", 1)
    log.add("connected", "b", 0)
    log.add("decision", "a", 1, job_wide=True)
    assert [e["seq"] for e in parsed(log, job="a")] == [1, 2, 4]
    assert [e["seq"] for e in parsed(log, job="a", rank=0)] == [1, 4]
    assert [e["seq"] for e in parsed(log, since=2)] == [3, 4]
    assert [e["seq"] for e in parsed(log, limit=1)] == [4]
    assert log.read(since=4) == ([], 4)


def test_the_log_is_bounded_in_count_and_bytes_and_cuts_one_huge_event():
    log = EventLog(clock=lambda: 1.0, max_events=5, max_bytes=10_000, max_event_bytes=600)
    for i in range(20):
        log.add("connected", "a", 0, detail=f"event {i}")
    assert [e["detail"] for e in parsed(log)] == [f"event {i}" for i in range(15, 20)]
    seq = log.add("detection", "a", 0, evidence={"blob": "x" * 5000}, detail="y" * 5000)
    last = parsed(log)[-1]
    assert last["seq"] == seq and last["evidence"] == {"truncated": True} and last["detail"] is None
    small = EventLog(clock=lambda: 1.0, max_bytes=1000)
    for i in range(50):
        small.add("connected", "a", 0)
    assert small.nbytes() <= 1000 and len(parsed(small)) < 50


@pytest.mark.parametrize("field", ["max_events", "max_bytes", "max_event_bytes"])
def test_bounds_name_the_bad_field(field):
    with pytest.raises(ValueError, match=field):
        EventLog(**{field: 0})
