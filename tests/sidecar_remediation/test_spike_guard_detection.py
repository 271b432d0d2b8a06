"""Guarded steps in the sidecar's detectors: neutral for the spike detectors, a streak climbs its ladder."""

from __future__ import annotations

import pytest

from .helpers import make_rig


@pytest.fixture
def rig(tmp_path):
    return make_rig(tmp_path)


def clipped(active: bool) -> dict:
    return {"extras": {"spike_guard_clip": 1.0 if active else 0.0, "spike_guard_threshold_grad_norm": 1.2,
                       "spike_guard_zscore_grad_norm": 9.0 if active else 0.1}}


def test_a_clipped_spike_is_not_a_grad_norm_or_loss_spike(rig):
    rig.hello()
    last = rig.warm_up()
    rig.step(last + 1, grad_norm=50.0, loss=20.0, **clipped(True))
    assert rig.sent == []
    assert rig.value("adamwatch_detections_total", job="gpt", rank="0", detector="grad_norm_spike") is None
    assert rig.value("adamwatch_detections_total", job="gpt", rank="0", detector="loss_spike") is None
    # ...and it did not enter the windows: the same spike unguarded is still a spike.
    rig.step(last + 2, grad_norm=50.0, **clipped(False))
    assert [cmd["action"] for _, cmd in rig.sent] == ["reduce_lr"]
    assert rig.value("adamwatch_detections_total", job="gpt", rank="0", detector="grad_norm_spike") == 1


def test_the_same_spike_without_a_guard_is_detected(rig):
    rig.hello()
    last = rig.warm_up()
    rig.step(last + 1, grad_norm=50.0)
    assert rig.value("adamwatch_detections_total", job="gpt", rank="0", detector="grad_norm_spike") == 1


def test_a_streak_of_activations_climbs_the_spike_guard_ladder(rig):
    rig.hello()
    last = rig.warm_up()
    step = last
    for _ in range(9):  # one short of the default streak of 10
        step += 1
        rig.step(step, grad_norm=5.0, **clipped(True))
    assert rig.sent == []
    step += 1
    rig.step(step, grad_norm=5.0, **clipped(True))
    assert [cmd["action"] for _, cmd in rig.sent] == ["reduce_lr"]
    assert rig.sent[0][1]["args"] == {"factor": 0.5}
    assert rig.value("adamwatch_detections_total", job="gpt", rank="0", detector="spike_guard") == 1
    rig.ack(rig.sent[0][1], step=step + 1)
    # It persists through the rung's cooldown (20 steps): the next rung restores.
    for _ in range(20):
        step += 1
        rig.step(step, grad_norm=5.0, **clipped(True))
    assert [cmd["action"] for _, cmd in rig.sent] == ["reduce_lr", "restore_checkpoint"]


def test_a_quiet_step_breaks_the_streak_and_steps_without_extras_do_not(rig):
    rig.hello()
    last = rig.warm_up()
    step = last
    for active in [True] * 9 + [False] + [True] * 9:
        step += 1
        rig.step(step, **clipped(active))
    assert rig.sent == []
    for _ in range(3):  # guard off (no extras): neutral
        step += 1
        rig.step(step)
    step += 1
    rig.step(step, **clipped(True))
    assert [cmd["action"] for _, cmd in rig.sent] == ["reduce_lr"]


def test_the_streak_length_is_configurable(tmp_path):
    rig = make_rig(tmp_path, {"detectors": {"spike_guard": {"consecutive_steps": 2}}})
    rig.hello()
    rig.step(1, **clipped(True))
    assert rig.sent == []
    rig.step(2, **clipped(True))
    assert [cmd["action"] for _, cmd in rig.sent] == ["reduce_lr"]
