"""STEP.extras (step extensions' numbers) and gradient clipping in the run state."""

from __future__ import annotations

import pytest

from adamwatch import wire
from adamwatch_sidecar.run_state import MAX_EXTRAS, RunState

from .sidecar_testlib import hello_payload, step_payload

M = wire.MessageType
T = {"job": "gpt", "rank": "0"}


def msg(kind: wire.MessageType, payload: dict) -> wire.Message:
    return wire.Message(kind, payload, wire.validate_payload(kind, payload))


@pytest.fixture
def state() -> RunState:
    return RunState(retention_seconds=60)


def test_the_latest_extras_of_each_trainer_are_kept(state: RunState) -> None:
    key = state.hello("c1", hello_payload())
    other = state.hello("c2", hello_payload(rank=1))
    state.apply(key, msg(M.STEP, step_payload(1, extras={"spike_z": 1.5, "global_norm": 3.0})))
    state.apply(key, msg(M.STEP, step_payload(2, extras={"spike_z": 4.0})))  # every N steps: kept
    state.apply(other, msg(M.STEP, step_payload(1, extras={"spike_z": None})))
    assert state.describe(key)["extras"] == {"spike_z": 4.0, "global_norm": 3.0}
    assert state.describe(other)["extras"] == {"spike_z": None}
    state.apply(key, msg(M.STEP, step_payload(3)))  # a step without extras changes nothing
    assert state.describe(key)["extras"] == {"spike_z": 4.0, "global_norm": 3.0}


@pytest.mark.parametrize(
    "extras, match",
    [
        ({"x": "high"}, "extras\\['x'\\] must be a number"),
        ({"": 1.0}, "names must be"),
        ({"n" * 65: 1.0}, "names must be"),
        ({f"e{i}": 1.0 for i in range(MAX_EXTRAS + 1)}, "limit"),
    ],
)
def test_bad_extras_are_a_schema_error_and_change_nothing(state: RunState, extras: dict, match: str) -> None:
    key = state.hello("c1", hello_payload())
    with pytest.raises(wire.SchemaError, match=match):
        state.apply(key, msg(M.STEP, step_payload(1, extras=extras)))
    assert state.describe(key)["extras"] == {} and state.describe(key)["step"] is None


def test_extras_kept_per_trainer_stay_bounded_when_names_change(state: RunState) -> None:
    key = state.hello("c1", hello_payload())
    for step in range(1, 5):
        names = {f"s{step}_{i}": float(i) for i in range(MAX_EXTRAS)}
        state.apply(key, msg(M.STEP, step_payload(step, extras=names)))
    assert state.describe(key)["extras"] == names


def test_clipping_is_exported_beside_the_pre_clip_norm(state: RunState) -> None:
    key = state.hello("c1", hello_payload())
    state.apply(key, msg(M.STEP, step_payload(1)))
    assert state.value("adamwatch_clipped_steps_total", T) is None  # never clipped: no series
    state.apply(key, msg(M.STEP, step_payload(2, grad_norm=4.0, clip_max_norm=1.0, clip_coefficient=0.25)))
    state.apply(key, msg(M.STEP, step_payload(3, grad_norm=0.5, clip_max_norm=1.0, clip_coefficient=1.0)))
    state.apply(key, msg(M.STEP, step_payload(4, grad_norm=2.0, clip_max_norm=1.0, clip_coefficient=0.5)))
    assert state.value("adamwatch_clipped_steps_total", T) == 2
    assert state.value("adamwatch_grad_clip_coefficient", T) == 0.5
    assert state.value("adamwatch_grad_clip_max_norm", T) == 1.0
    assert state.value("adamwatch_grad_norm", {**T, "param_group": "all"}) == 2.0


class Clock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_monitor_errors_are_counted_by_where_across_sessions_and_never_go_down() -> None:
    state = RunState(retention_seconds=60)
    key = state.hello("c1", hello_payload(session="s1"))
    assert state.value("adamwatch_monitor_errors_total", {**T, "where": "extension"}) is None
    state.apply(key, msg(M.MONITOR_ERRORS, {"errors": {"extension": 2}}))
    state.apply(key, msg(M.MONITOR_ERRORS, {"errors": {"extension": 5, "summary_reader": 1}}))
    state.apply(key, msg(M.MONITOR_ERRORS, {"errors": {"extension": 4}}))  # stale, out of order: ignored
    assert state.value("adamwatch_monitor_errors_total", {**T, "where": "extension"}) == 5
    assert state.value("adamwatch_monitor_errors_total", {**T, "where": "summary_reader"}) == 1
    # the trainer restarted: a new session counts from 0 again, the export keeps adding
    key = state.hello("c2", hello_payload(session="s2", monitor_errors={"extension": 1}))
    assert state.value("adamwatch_monitor_errors_total", {**T, "where": "extension"}) == 6
    with pytest.raises(wire.SchemaError, match="counts"):
        state.apply(key, msg(M.MONITOR_ERRORS, {"errors": {"extension": -1}}))
    for i in range(40):  # free-text names from a trainer are bounded
        state.apply(key, msg(M.MONITOR_ERRORS, {"errors": {f"place{i}": 1}}))
    wheres = [labels[2] for _, samples in state.snapshot(only="adamwatch_monitor_errors_total")
              for labels, _ in samples]
    assert len(wheres) <= 33 and "other" in wheres


def test_the_hello_timestamp_is_the_sidecars_clock_at_each_hello() -> None:
    clock = Clock(1000.0)
    state = RunState(retention_seconds=60, clock=clock)
    state.hello("c1", hello_payload())
    assert state.value("adamwatch_trainer_hello_timestamp_seconds", T) == 1000.0
    clock.now = 1060.0
    state.hello("c2", hello_payload())  # a reconnect
    assert state.value("adamwatch_trainer_hello_timestamp_seconds", T) == 1060.0
