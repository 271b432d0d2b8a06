"""Multi-pod jobs: a sidecar acts for a job only while rank 0 of that job is connected to it.

In a Kubeflow PyTorchJob every pod runs a sidecar; a grad-norm spike (the same
on every rank after the all-reduce) is seen by all of them. The sidecars of the
worker pods must detect and audit it, but take no ladder decision: no command,
no failed outcome (that pages ``AdamwatchRemediationFailed``), no ladder budget,
no exhausted gauge.
"""

from __future__ import annotations

import pytest

from adamwatch_sidecar.remediation.service import ActionError

from .helpers import make_rig, noisy


def series(rig, name: str) -> dict[tuple[str, ...], float]:
    """Every series of ``name`` on the rig's RunState, by label values."""
    ((_, samples),) = rig.state.snapshot(only=name)
    return dict(samples)


def remediation_outcomes(rig) -> dict[tuple[str, ...], float]:
    return series(rig, "adamwatch_remediations_total")


def spike_episode(rig, first: int, rank: int, healthy: int = 15) -> int:
    """A loss + grad-norm spike at step ``first``, then ``healthy`` healthy steps; returns the next step."""
    rig.step(first, rank=rank, loss=20.0, grad_norm=50.0)
    for i in range(first + 1, first + 1 + healthy):
        rig.step(i, rank=rank, loss=noisy(i), grad_norm=noisy(i, 1.0))
    return first + 1 + healthy


def test_a_worker_sidecar_detects_and_audits_but_defers_every_decision(tmp_path):
    rig = make_rig(tmp_path)
    rig.hello(rank=1)  # a worker pod: rank 0 reports to another pod's sidecar
    last = rig.warm_up(rank=1)
    nxt = spike_episode(rig, last + 1, rank=1)

    assert rig.value("adamwatch_detections_total", job="gpt", rank="1", detector="loss_spike") == 1
    assert rig.value("adamwatch_detections_total", job="gpt", rank="1", detector="grad_norm_spike") == 1
    assert rig.sent == []  # no COMMAND
    assert remediation_outcomes(rig) == {}  # zero remediations, of any action or outcome
    assert rig.spans.get_finished_spans() == ()

    lines = rig.audit()
    assert [(x["event"], x["detector"]) for x in lines] == [
        ("detection", "loss_spike"), ("deferred", "loss_spike"),
        ("detection", "grad_norm_spike"), ("deferred", "grad_norm_spike")]
    deferred = lines[1]
    assert deferred["detail"] == ("deferred: rank 0 of job 'gpt' reports to another sidecar (ranks here: 1); "
                                  "only the sidecar of rank 0 acts for the job")
    assert deferred["action"] is None and deferred["outcome"] is None and deferred["command_id"] is None
    assert deferred["step"] == last + 1 and deferred["evidence"]["value"] == 20.0

    # Many more incidents, a stall and the ACK timeout: the ladder is never used
    # up and never escalates on this pod (the default ladders escalate after 3).
    for _ in range(5):
        nxt = spike_episode(rig, nxt, rank=1)
    rig.clock.advance(301)  # past the stall timeout and the ACK timeout
    rig.service.on_tick()
    assert rig.value("adamwatch_detections_total", job="gpt", rank="1", detector="loss_spike") == 6
    assert rig.value("adamwatch_detections_total", job="gpt", rank="1", detector="stall") == 1
    assert rig.sent == [] and remediation_outcomes(rig) == {}
    assert rig.value("adamwatch_remediation_ladder_exhausted", job="gpt", rank="1") == 0.0
    assert rig.value("adamwatch_remediation_ladder_exhausted", job="gpt", rank="0") is None  # no invented rank 0
    status = rig.service.status()["jobs"]["gpt"]
    assert status["acting_here"] is False and status["deferred_reason"].startswith("deferred: rank 0")
    assert not status["exhausted"] and status["pending_command"] is None
    for ladder in status["ladders"].values():
        assert not ladder["exhausted"] and ladder["last_rung"] is None
        assert all(rung["uses_in_window"] == 0 for rung in ladder["rungs"])
    events = [x["event"] for x in rig.audit()]
    assert set(events) == {"detection", "deferred"} and events.count("deferred") == 13


def test_a_persisting_spike_on_a_worker_writes_one_deferred_line_per_streak(tmp_path):
    rig = make_rig(tmp_path)
    rig.hello(rank=3)
    last = rig.warm_up(rank=3)
    for i in range(last + 1, last + 30):  # the loss stays high: one incident that persists
        rig.step(i, rank=3, loss=20.0)
    rig.step(last + 30, rank=3, loss=2.0)
    rig.step(last + 31, rank=3, loss=20.0)  # a new incident
    deferred = [x for x in rig.audit() if x["event"] == "deferred"]
    assert len(deferred) == 2
    assert deferred[1]["detail"].endswith("(28 more deferred since the last line)")
    assert rig.sent == [] and remediation_outcomes(rig) == {}


def test_the_sidecar_of_rank_0_still_acts_as_before(tmp_path):
    rig = make_rig(tmp_path)
    rig.hello(rank=0)
    rig.hello(rank=1)
    last = rig.warm_up(rank=1)
    rig.step(last + 1, rank=1, loss=20.0, grad_norm=50.0)

    assert rig.value("adamwatch_detections_total", job="gpt", rank="1", detector="loss_spike") == 1
    assert rig.value("adamwatch_detections_total", job="gpt", rank="1", detector="grad_norm_spike") == 1
    ((target, cmd),) = rig.sent  # one command for the pair, to rank 0
    assert target == ("gpt", 0) and cmd["action"] == "reduce_lr"
    rig.ack(cmd, step=last + 2)
    assert remediation_outcomes(rig) == {("gpt", "0", "reduce_lr", "applied"): 1.0}
    assert rig.service.status()["jobs"]["gpt"]["acting_here"] is True
    events = [(x["event"], x["detector"]) for x in rig.audit()]
    assert ("deferred", "loss_spike") not in events and ("deferred", "grad_norm_spike") not in events
    assert ("decision", "loss_spike") in events and ("suppressed", "grad_norm_spike") in events

    # and it still walks the ladder to the end: reduce_lr again, restore, then escalate
    nxt = last + 2
    for expected in ("reduce_lr", "restore_checkpoint", None):
        # past the job-wide cooldown, and re-arms the detectors a restore emptied
        for i in range(nxt, nxt + 40):
            rig.step(i, rank=1, loss=noisy(i), grad_norm=noisy(i, 1.0))
        nxt += 40
        sent_before = len(rig.sent)
        rig.step(nxt, rank=1, loss=20.0)
        if expected is None:  # escalate sends no command
            assert len(rig.sent) == sent_before
        else:
            assert rig.sent[-1][1]["action"] == expected
            rig.ack(rig.sent[-1][1], step=nxt + 1)
        nxt += 1
    assert rig.value("adamwatch_remediation_ladder_exhausted", job="gpt", rank="0") == 1.0
    assert rig.value("adamwatch_remediation_ladder_exhausted", job="gpt", rank="1") == 1.0
    assert rig.value("adamwatch_remediations_total", job="gpt", rank="0", action="escalate", outcome="applied") == 1


def test_rank_0_disconnecting_mid_incident_defers_new_incidents_until_it_is_back(tmp_path):
    rig = make_rig(tmp_path)
    key0 = rig.hello(rank=0)
    rig.hello(rank=1)
    last = rig.warm_up(rank=1)
    rig.step(last + 1, rank=1, loss=20.0, grad_norm=50.0)
    ((_, first),) = rig.sent
    rig.ack(first, step=last + 2)

    # rank 0 goes away (its container restarts) while the job's other ranks keep reporting
    rig.state.disconnect(key0, "conn-gpt-0")
    rig.connected.discard(("gpt", 0))
    nxt = last + 2
    for i in range(nxt, nxt + 11):  # past the cooldown of the rung that acted
        rig.step(i, rank=1, loss=noisy(i), grad_norm=noisy(i, 1.0))
    nxt += 11
    nxt = spike_episode(rig, nxt, rank=1)
    nxt = spike_episode(rig, nxt, rank=1)
    rig.clock.advance(200)  # past the ACK timeout: nothing was pending
    rig.service.on_tick()

    assert rig.value("adamwatch_detections_total", job="gpt", rank="1", detector="loss_spike") == 3
    assert len(rig.sent) == 1
    assert remediation_outcomes(rig) == {("gpt", "0", "reduce_lr", "applied"): 1.0}  # no failed, no timeout
    assert rig.value("adamwatch_remediation_ladder_exhausted", job="gpt", rank="1") == 0.0
    deferred = [x for x in rig.audit() if x["event"] == "deferred"]
    assert len(deferred) == 4  # two episodes x (loss, grad norm)
    assert deferred[0]["detail"] == ("deferred: rank 0 of job 'gpt' is disconnected from this sidecar; "
                                     "this sidecar acts for the job again when it reconnects")
    loss_ladder = rig.service.status()["jobs"]["gpt"]["ladders"]["loss_spike"]
    assert [r["uses_in_window"] for r in loss_ladder["rungs"]] == [1, 0, 0]  # budget untouched while away

    # rank 0 is back (same run): the next incident acts again, on the next rung budget
    rig.hello(rank=0)
    rig.step(nxt, rank=1, loss=20.0)
    assert len(rig.sent) == 2 and rig.sent[-1][0] == ("gpt", 0)
    assert rig.sent[-1][1]["action"] == "reduce_lr"
    rig.ack(rig.sent[-1][1], step=nxt + 1)
    assert rig.value("adamwatch_remediations_total", job="gpt", rank="0", action="reduce_lr", outcome="applied") == 2


def test_a_command_in_flight_when_rank_0_drops_still_times_out_but_new_incidents_are_deferred(tmp_path):
    rig = make_rig(tmp_path)
    key0 = rig.hello(rank=0)
    rig.hello(rank=1)
    last = rig.warm_up(rank=1)
    rig.step(last + 1, rank=1, loss=20.0)
    assert len(rig.sent) == 1  # sent, not acknowledged
    rig.state.disconnect(key0, "conn-gpt-0")
    rig.connected.discard(("gpt", 0))
    rig.step(last + 2, rank=1, loss=noisy(1))
    rig.step(last + 3, rank=1, grad_norm=50.0)  # a new incident: deferred, not "waiting for its ACK"
    assert [x["event"] for x in rig.audit()][-1] == "deferred"
    rig.clock.advance(120)
    rig.service.on_tick()
    # The command that was really sent and never answered is a genuine timeout;
    # the incident after the disconnect adds nothing.
    assert remediation_outcomes(rig) == {("gpt", "0", "reduce_lr", "timeout"): 1.0}


def test_manual_actions_for_a_job_without_rank_0_here_are_refused_not_failed(tmp_path):
    rig = make_rig(tmp_path)
    rig.hello(rank=1)
    rig.step(1, rank=1)
    with pytest.raises(ActionError, match="job: cannot reduce_lr 'gpt' from this sidecar: rank 0 of job 'gpt' "
                                          "reports to another sidecar") as info:
        rig.service.manual_action({"action": "reduce_lr", "factor": 0.5})
    assert info.value.status == 409 and info.value.reason == "no_trainer"
    with pytest.raises(ActionError) as info:
        rig.service.manual_action({"action": "stop", "job": "gpt"})
    assert info.value.reason == "no_trainer"
    assert rig.sent == [] and remediation_outcomes(rig) == {}
    assert [x["event"] for x in rig.audit()] == []
    # reset only clears local state: allowed
    assert rig.service.manual_action({"action": "reset"})["outcome"] == "reset"
