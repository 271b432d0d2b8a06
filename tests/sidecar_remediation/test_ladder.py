"""The ladder: cooldowns, limits per window, climbing when an incident persists, escalation."""

from __future__ import annotations

from adamwatch_sidecar.remediation.ladder import Ladder
from adamwatch_sidecar.remediation.policy import Rung, parse_remediation_config


def act(ladder: Ladder, *, new: bool, now: float, steps: int):
    decision = ladder.decide(new=new, now=now, steps=steps)
    ladder.record(decision, now=now, steps=steps)
    return decision


def default_loss_ladder() -> Ladder:
    return Ladder(parse_remediation_config(None).ladders["loss_spike"])


def test_a_new_incident_starts_at_the_bottom_rung():
    assert act(default_loss_ladder(), new=True, now=0.0, steps=100).action == "reduce_lr"


def test_cooldown_in_steps_suppresses_until_enough_steps_passed():
    ladder = Ladder((Rung("reduce_lr", 0.5, cooldown_steps=10, max_per_window=5),))
    act(ladder, new=True, now=0.0, steps=100)
    d = ladder.decide(new=True, now=1000.0, steps=109)
    assert not d.acts and d.reason.startswith("cooldown: 9 of 10 steps")
    assert ladder.decide(new=True, now=1000.0, steps=110).action == "reduce_lr"


def test_cooldown_in_seconds_needs_both_steps_and_seconds():
    ladder = Ladder((Rung("reduce_lr", 0.5, cooldown_steps=2, cooldown_seconds=60, max_per_window=5),))
    act(ladder, new=True, now=0.0, steps=0)
    assert not ladder.decide(new=True, now=59.0, steps=500).acts
    assert not ladder.decide(new=True, now=600.0, steps=1).acts
    assert ladder.decide(new=True, now=60.0, steps=2).acts


def test_a_persisting_incident_climbs_to_the_next_rung_after_the_cooldown():
    ladder = default_loss_ladder()
    assert act(ladder, new=True, now=0.0, steps=100).action == "reduce_lr"
    assert not act(ladder, new=False, now=1.0, steps=105).acts  # cooling down
    assert act(ladder, new=False, now=2.0, steps=110).action == "restore_checkpoint"
    d = act(ladder, new=False, now=3.0, steps=120)
    assert d.action == "escalate" and ladder.exhausted
    d = ladder.decide(new=True, now=4.0, steps=200)
    assert not d.acts and d.reason.startswith("ladder exhausted")


def test_max_per_window_skips_a_used_up_rung_and_the_window_slides():
    ladder = Ladder((Rung("reduce_lr", 0.5, max_per_window=2, window_seconds=100),
                     Rung("restore_checkpoint", max_per_window=1, window_seconds=100), Rung("escalate")))
    assert act(ladder, new=True, now=0.0, steps=0).action == "reduce_lr"
    assert act(ladder, new=True, now=10.0, steps=1).action == "reduce_lr"
    assert act(ladder, new=True, now=20.0, steps=2).action == "restore_checkpoint"  # reduce_lr used up
    assert ladder.uses(0, 20.0) == 2
    assert ladder.uses(0, 100.0) == 1  # the first use left the window
    assert act(ladder, new=True, now=100.0, steps=3).action == "reduce_lr"


def test_running_out_of_rungs_escalates_even_without_an_escalate_rung():
    ladder = Ladder((Rung("reduce_lr", 0.5, max_per_window=1),))
    act(ladder, new=True, now=0.0, steps=0)
    d = act(ladder, new=True, now=1.0, steps=1)
    assert d.action == "escalate" and d.rung is None and ladder.exhausted


def test_reset_clears_uses_cooldown_and_exhaustion():
    ladder = Ladder((Rung("reduce_lr", 0.5, cooldown_steps=100, max_per_window=1),))
    act(ladder, new=True, now=0.0, steps=0)
    act(ladder, new=True, now=1.0, steps=200)
    assert ladder.exhausted
    ladder.reset()
    assert not ladder.exhausted and act(ladder, new=True, now=2.0, steps=201).action == "reduce_lr"


def test_snapshot_reports_uses_and_cooldown():
    ladder = default_loss_ladder()
    act(ladder, new=True, now=0.0, steps=0)
    snap = ladder.snapshot(1.0, 3)
    assert snap["in_cooldown"] and snap["rungs"][0] == {"action": "reduce_lr", "uses_in_window": 1, "max_per_window": 2}
