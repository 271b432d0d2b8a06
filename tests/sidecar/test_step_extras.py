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
