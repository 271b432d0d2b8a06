"""The remediation service on a real RunState: detections → commands → ACKs → counters, audit, spans."""

from __future__ import annotations

import pytest
from opentelemetry.trace import StatusCode

from adamwatch import wire
from adamwatch_sidecar.remediation.audit import AUDIT_FIELDS
from adamwatch_sidecar.remediation.service import ActionError
from adamwatch_sidecar.run_state import TrainerKey

from .helpers import make_rig


@pytest.fixture
def rig(tmp_path):
    return make_rig(tmp_path)


def test_a_loss_spike_cuts_the_lr_at_once_and_the_ack_is_counted(rig):
    rig.hello()
    last = rig.warm_up()
    assert rig.sent == []
    rig.step(last + 1, loss=20.0)
    assert len(rig.sent) == 1
    target, cmd = rig.sent[0]
    assert target == ("gpt", 0)
    assert cmd["action"] == "reduce_lr" and cmd["args"] == {"factor": 0.5} and cmd["step"] == last + 1
    assert rig.value("adamwatch_detections_total", job="gpt", rank="0", detector="loss_spike") == 1
    assert rig.value("adamwatch_learning_rate_scale", job="gpt", rank="0") == 1.0

    rig.ack(cmd, step=last + 2)
    assert rig.value("adamwatch_remediations_total", job="gpt", rank="0", action="reduce_lr", outcome="applied") == 1
    assert rig.value("adamwatch_learning_rate_scale", job="gpt", rank="0") == 0.5

    lines = rig.audit()
    assert [line["event"] for line in lines] == ["detection", "decision", "outcome"]
    assert all(set(line) == set(AUDIT_FIELDS) for line in lines)
    decision, outcome = lines[1], lines[2]
    assert decision["action"] == "reduce_lr" and decision["command_id"] == cmd["id"]
    assert decision["evidence"]["value"] == 20.0 and decision["evidence"]["threshold"] < 20.0
    assert outcome["outcome"] == "applied" and outcome["step"] == last + 2 and outcome["steps_to_effect"] == 1

    (span,) = rig.spans.get_finished_spans()
    assert span.name == "adamwatch.remediation.reduce_lr"
    expected = {"adamwatch.job": "gpt", "adamwatch.rank": 0, "adamwatch.detector": "loss_spike",
                "adamwatch.action": "reduce_lr", "adamwatch.step": last + 1, "adamwatch.outcome": "applied",
                "adamwatch.command_id": cmd["id"], "adamwatch.effective_step": last + 2}
    assert {k: span.attributes.get(k) for k in expected} == expected
    assert span.status.status_code != StatusCode.ERROR


def test_a_persisting_spike_restores_after_the_cooldown_and_the_restore_resets_the_windows(rig):
    rig.hello()
    last = rig.warm_up()
    rig.step(last + 1, loss=20.0)
    rig.ack(rig.sent[-1][1], step=last + 2)
    for i in range(last + 2, last + 11):  # the cooldown: 10 steps
        rig.step(i, loss=20.0)
    assert len(rig.sent) == 1
    rig.step(last + 11, loss=20.0)
    assert len(rig.sent) == 2
    cmd = rig.sent[-1][1]
    assert cmd["action"] == "restore_checkpoint" and cmd["args"] == {"step": None, "before_step": last + 11}
    rig.ack(cmd, step=last + 12)
    assert rig.value("adamwatch_remediations_total", job="gpt", rank="0", action="restore_checkpoint",
                     outcome="applied") == 1
    status = rig.service.status()
    assert status["jobs"]["gpt"]["ranks"]["0"]["loss_window"] == 0  # old level forgotten
    events = [(x["event"], x["action"]) for x in rig.audit()]
    assert ("suppressed", None) not in events[:2]
    assert events[-1] == ("outcome", "restore_checkpoint")


def test_consecutive_nan_steps_restore_a_checkpoint(rig):
    rig.hello()
    rig.warm_up(5)
    rig.step(6, loss=float("nan"), loss_nonfinite=True, skipped=True, skip_reason="guard")
    rig.step(7, loss=float("nan"), loss_nonfinite=True, skipped=True, skip_reason="guard")
    assert rig.sent == []
    rig.step(8, loss=float("nan"), loss_nonfinite=True, skipped=True, skip_reason="guard")
    (target, cmd), = rig.sent
    assert cmd["action"] == "restore_checkpoint" and cmd["args"]["before_step"] == 8
    detection = rig.audit()[0]
    assert detection["event"] == "detection" and detection["evidence"]["loss"] == "nan"
    assert rig.value("adamwatch_detections_total", job="gpt", rank="0", detector="non_finite") == 1


def test_a_loss_and_a_grad_spike_at_the_same_step_send_one_command(rig):
    rig.hello()
    last = rig.warm_up()
    rig.step(last + 1, loss=20.0, grad_norm=50.0)
    assert [c["action"] for _, c in rig.sent] == ["reduce_lr"]
    suppressed = [x for x in rig.audit() if x["event"] == "suppressed"]
    assert suppressed and suppressed[0]["detector"] == "grad_norm_spike" and "waiting for its ACK" in suppressed[0]["detail"]


def test_no_ack_counts_a_timeout_and_marks_the_span_as_error(rig):
    rig.hello()
    rig.step(1)
    last = rig.warm_up()
    rig.step(last + 1, loss=20.0)
    rig.clock.advance(119)
    rig.service.on_tick()
    assert rig.value("adamwatch_remediations_total", job="gpt", rank="0", action="reduce_lr", outcome="timeout") is None
    rig.clock.advance(1)
    rig.service.on_tick()
    assert rig.value("adamwatch_remediations_total", job="gpt", rank="0", action="reduce_lr", outcome="timeout") == 1
    (span,) = rig.spans.get_finished_spans()
    assert span.attributes["adamwatch.outcome"] == "timeout" and span.status.status_code == StatusCode.ERROR
    # a late ACK is audited but not counted twice
    rig.ack(rig.sent[0][1], step=last + 30)
    assert rig.value("adamwatch_remediations_total", job="gpt", rank="0", action="reduce_lr", outcome="applied") is None
    assert rig.audit()[-1]["outcome"] == "applied" and rig.audit()[-1]["source"] == "trainer"


def test_failed_and_rejected_acks_are_counted_by_outcome(rig):
    rig.hello()
    last = rig.warm_up()
    rig.step(last + 1, loss=20.0)
    rig.ack(rig.sent[0][1], outcome="rejected", step=None, detail="no scheduler")
    assert rig.value("adamwatch_remediations_total", job="gpt", rank="0", action="reduce_lr", outcome="rejected") == 1
    assert rig.value("adamwatch_learning_rate_scale", job="gpt", rank="0") == 1.0
    assert rig.audit()[-1]["detail"] == "no scheduler"


def test_dry_run_decides_audits_and_counts_but_sends_nothing(tmp_path):
    rig = make_rig(tmp_path, {"dry_run": True, "ladders": {"loss_spike": [{"action": "reduce_lr"}]}})
    rig.hello()
    last = rig.warm_up()
    rig.step(last + 1, loss=20.0)
    assert rig.sent == []
    assert rig.value("adamwatch_remediations_total", job="gpt", rank="0", action="reduce_lr", outcome="dry_run") == 1
    rig.step(last + 2, loss=2.0)
    rig.step(last + 3, loss=20.0)  # a new incident: reduce_lr used up -> escalate (dry)
    assert rig.value("adamwatch_remediations_total", job="gpt", rank="0", action="escalate", outcome="dry_run") == 1
    assert rig.value("adamwatch_remediation_ladder_exhausted", job="gpt", rank="0") == 0.0
    assert {x["dry_run"] for x in rig.audit() if x["event"] in ("decision", "outcome")} == {True}
    assert [s.attributes["adamwatch.outcome"] for s in rig.spans.get_finished_spans()] == ["dry_run", "dry_run"]


def test_an_exhausted_ladder_sets_the_gauge_and_stops_training_when_configured(tmp_path):
    rig = make_rig(tmp_path, {"escalate": {"stop_training": True},
                              "ladders": {"loss_spike": [{"action": "escalate"}]}})
    rig.hello()
    last = rig.warm_up()
    rig.step(last + 1, loss=20.0)
    assert rig.value("adamwatch_remediation_ladder_exhausted", job="gpt", rank="0") == 1.0
    assert rig.value("adamwatch_remediations_total", job="gpt", rank="0", action="escalate", outcome="applied") == 1
    assert [c["action"] for _, c in rig.sent] == ["stop"]
    rig.ack(rig.sent[0][1], step=last + 2)
    assert rig.value("adamwatch_remediations_total", job="gpt", rank="0", action="stop", outcome="applied") == 1
    # a restarted run (new rank-0 session) starts with a fresh ladder
    rig.hello(session="s2")
    assert rig.value("adamwatch_remediation_ladder_exhausted", job="gpt", rank="0") == 0.0


def test_stall_escalates_from_the_ticker(rig):
    rig.hello()
    rig.step(1)
    rig.clock.advance(299)
    rig.service.on_tick()
    assert rig.value("adamwatch_remediation_ladder_exhausted", job="gpt", rank="0") == 0.0
    rig.clock.advance(1)
    rig.service.on_tick()
    assert rig.value("adamwatch_detections_total", job="gpt", rank="0", detector="stall") == 1
    assert rig.value("adamwatch_remediation_ladder_exhausted", job="gpt", rank="0") == 1.0


def test_a_disconnected_trainer_does_not_stall(rig):
    key = rig.hello()
    rig.step(1)
    rig.state.disconnect(key, "conn-gpt-0")
    rig.clock.advance(1000)
    rig.service.on_tick()
    assert rig.value("adamwatch_detections_total", job="gpt", rank="0", detector="stall") is None


def test_an_incident_on_a_rank_without_rank_0_here_is_deferred_not_failed(rig):
    # A worker pod of a multi-pod job: rank 0 reports to another sidecar, which acts.
    rig.hello(rank=1)
    last = rig.warm_up(rank=1)
    rig.step(last + 1, rank=1, loss=20.0)
    assert rig.sent == []
    assert rig.value("adamwatch_detections_total", job="gpt", rank="1", detector="loss_spike") == 1
    assert rig.value("adamwatch_remediations_total", job="gpt", rank="1", action="reduce_lr", outcome="failed") is None
    # gauges hang on the local rank: a (gpt, 0) series here would invent a disconnected rank 0
    assert rig.value("adamwatch_trainer_connected", job="gpt", rank="0") is None
    assert rig.value("adamwatch_learning_rate_scale", job="gpt", rank="0") is None
    assert rig.value("adamwatch_learning_rate_scale", job="gpt", rank="1") == 1.0
    assert rig.audit()[-1]["event"] == "deferred"
    assert "rank 0 of job 'gpt' reports to another sidecar" in rig.audit()[-1]["detail"]


def test_spike_on_another_rank_sends_the_command_to_rank_0(rig):
    rig.hello(rank=0)
    rig.hello(rank=1)
    last = rig.warm_up(rank=1)
    rig.step(last + 1, rank=1, loss=20.0)
    assert [t for t, _ in rig.sent] == [("gpt", 0)]
    assert rig.value("adamwatch_detections_total", job="gpt", rank="1", detector="loss_spike") == 1


def test_a_restored_checkpoint_event_resets_the_windows(rig):
    rig.hello()
    rig.warm_up()
    rig.state.apply(TrainerKey("gpt", 0), wire.Message(wire.MessageType.CHECKPOINT,
                                                      {"event": "restored", "step": 10, "time": 1.0}))
    assert rig.service.status()["jobs"]["gpt"]["ranks"]["0"]["loss_window"] == 0


def test_disabled_remediation_still_detects_but_never_acts(tmp_path):
    rig = make_rig(tmp_path, {"enabled": False})
    rig.hello()
    last = rig.warm_up()
    rig.step(last + 1, loss=20.0)
    assert rig.sent == [] and [x["event"] for x in rig.audit()] == ["detection"]
    assert rig.value("adamwatch_detections_total", job="gpt", rank="0", detector="loss_spike") == 1


def test_manual_actions_bypass_the_ladder_and_are_validated(tmp_path):
    rig = make_rig(tmp_path, {"dry_run": True})
    rig.hello()
    rig.step(1)
    out = rig.service.manual_action({"action": "reduce_lr", "factor": 0.25})
    assert out["outcome"] == "sent" and out["job"] == "gpt"
    (_, cmd), = rig.sent  # sent even in dry-run mode: a human asked
    assert cmd["args"] == {"factor": 0.25} and cmd["id"] == out["command_id"]
    rig.ack(cmd, step=2)
    assert rig.value("adamwatch_learning_rate_scale", job="gpt", rank="0") == 0.25
    out = rig.service.manual_action({"action": "restore_checkpoint", "step": 100, "job": "gpt"})
    assert rig.sent[-1][1]["args"] == {"step": 100, "before_step": None}
    with pytest.raises(ActionError, match="factor: must be a number with 0 < factor < 1"):
        rig.service.manual_action({"action": "reduce_lr", "factor": 2})
    with pytest.raises(ActionError, match="action: must be one of") as info:
        rig.service.manual_action({"action": "explode"})
    assert info.value.reason == "unknown_action"
    with pytest.raises(ActionError, match="job: 'nope' is unknown") as info:
        rig.service.manual_action({"action": "stop", "job": "nope"})
    assert info.value.status == 404
    assert [x["source"] for x in rig.audit() if x["event"] == "decision"] == ["manual", "manual"]


def test_reset_clears_an_exhausted_ladder(tmp_path):
    rig = make_rig(tmp_path, {"ladders": {"loss_spike": [{"action": "escalate"}]}})
    rig.hello()
    last = rig.warm_up()
    rig.step(last + 1, loss=20.0)
    assert rig.value("adamwatch_remediation_ladder_exhausted", job="gpt", rank="0") == 1.0
    assert rig.service.manual_action({"action": "reset"})["outcome"] == "reset"
    assert rig.value("adamwatch_remediation_ladder_exhausted", job="gpt", rank="0") == 0.0
    assert not rig.service.status()["jobs"]["gpt"]["ladders"]["loss_spike"]["exhausted"]


def test_the_cooldown_is_job_wide_so_correlated_detectors_do_not_stack_actions(rig):
    rig.hello()
    last = rig.warm_up()
    rig.step(last + 1, loss=20.0, grad_norm=50.0)
    rig.ack(rig.sent[0][1], step=last + 2)
    for i in range(last + 2, last + 11):  # both spikes persist through the cooldown
        rig.step(i, loss=20.0, grad_norm=50.0)
    assert [c["action"] for _, c in rig.sent] == ["reduce_lr"]
    rig.step(last + 11, loss=20.0, grad_norm=50.0)
    assert [c["action"] for _, c in rig.sent] == ["reduce_lr", "restore_checkpoint"]


def test_a_trainer_gone_for_an_hour_is_forgotten(rig):
    key = rig.hello()
    rig.step(1)
    rig.state.disconnect(key, "conn-gpt-0")
    rig.clock.advance(3599)
    rig.service.on_tick()
    assert "gpt" in rig.service.status()["jobs"]
    rig.clock.advance(1)
    rig.service.on_tick()
    assert rig.service.status()["jobs"] == {}


def test_job_gauges_hold_for_every_local_rank(tmp_path):
    rig = make_rig(tmp_path, {"ladders": {"loss_spike": [{"action": "reduce_lr", "factor": 0.5}, {"action": "escalate"}]}})
    rig.hello(rank=1)
    rig.hello(rank=0)
    last = rig.warm_up(rank=1)
    rig.step(last + 1, rank=1, loss=20.0)
    rig.ack(rig.sent[0][1], step=last + 2)
    for rank in ("0", "1"):
        assert rig.value("adamwatch_learning_rate_scale", job="gpt", rank=rank) == 0.5
    rig.step(last + 2, rank=1, loss=2.0)
    rig.step(last + 3, rank=1, loss=20.0)
    for rank in ("0", "1"):
        assert rig.value("adamwatch_remediation_ladder_exhausted", job="gpt", rank=rank) == 1.0
