"""Run ends, evaluation, convergence and footprint in the sidecar (issue 11 items 1, 2, 3, 6), with an injected clock."""

from __future__ import annotations

import math

import pytest

from adamwatch import wire
from adamwatch_sidecar.convergence import ConvergenceTracker, fit_slope, parse_convergence_config
from adamwatch_sidecar.evaluation import EvaluationExporter
from adamwatch_sidecar.footprint import FootprintExporter
from adamwatch_sidecar.overfitting import OverfittingStreak
from adamwatch_sidecar.run_end import RunEndTracker, outcome_of
from adamwatch_sidecar.run_state import RunState
from adamwatch_sidecar.run_tracking import parse_runs_config

from .sidecar_testlib import hello_payload, step_payload

M = wire.MessageType
T = {"job": "gpt", "rank": "0"}


class Clock:
    def __init__(self, now: float = 1_700_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def _msg(state: RunState, key, mtype: M, payload: dict) -> None:
    state.apply(key, wire.Message(mtype, payload, wire.validate_payload(mtype, payload)))


@pytest.fixture
def world():
    clock = Clock()
    state = RunState(retention_seconds=60, clock=clock)
    convergence = ConvergenceTracker(state, parse_convergence_config({"sample_interval_seconds": 0,
                                                                      "window_seconds": 100,
                                                                      "plateau_window_seconds": 100}))
    run_end = RunEndTracker(state, clock, vanish_grace_seconds=5, target_outcome=convergence.target_outcome,
                            has_target=convergence.has_target)
    evaluation = EvaluationExporter(state)
    footprint = FootprintExporter(state)
    for listener in (evaluation, convergence, run_end, footprint):
        state.add_listener(listener.on_message)
    return state, clock, run_end


def _v(state: RunState, name: str, **labels):
    return state.value(name, {**T, **labels})


def test_outcomes_of_exit_reasons() -> None:
    assert [outcome_of(r, False) for r in wire.EXIT_REASONS] == [
        "success", "crashed", "oom", "preempted", "crashed", "crashed"]
    assert outcome_of("clean", True) == "nonfinite"


def test_hello_creates_every_reason_at_zero_and_goodbye_counts_one(world) -> None:
    state, clock, _ = world
    key = state.hello("c1", hello_payload())
    assert {r: _v(state, "adamwatch_trainer_exits_total", reason=r) for r in wire.EXIT_REASONS} == dict.fromkeys(
        wire.EXIT_REASONS, 0.0)
    _msg(state, key, M.GOODBYE, {"reason": "closed", "step": 3, "exit_reason": "oom", "exception": "OutOfMemoryError"})
    assert _v(state, "adamwatch_trainer_exits_total", reason="oom") == 1
    assert _v(state, "adamwatch_runs_ended_total", outcome="oom") == 1
    assert _v(state, "adamwatch_trainer_exception_exits_total", exception="OutOfMemoryError") == 1
    state.disconnect(key, "c1")
    clock.now += 60
    assert _v(state, "adamwatch_trainer_exits_total", reason="vanished") == 0  # it said goodbye


def test_an_older_trainers_goodbye_is_clean_and_a_nan_run_is_not_a_success(world) -> None:
    state, _, _ = world
    key = state.hello("c1", hello_payload())
    _msg(state, key, M.STEP, step_payload(1, loss=None, loss_nonfinite=True))
    _msg(state, key, M.GOODBYE, {"reason": "closed", "step": 1})
    assert _v(state, "adamwatch_trainer_exits_total", reason="clean") == 1
    assert _v(state, "adamwatch_runs_ended_total", outcome="nonfinite") == 1
    assert _v(state, "adamwatch_runs_ended_total", outcome="success") == 0


def test_a_silent_disconnect_vanishes_after_the_grace_unless_the_session_reconnects(world) -> None:
    state, clock, run_end = world
    key = state.hello("c1", hello_payload(session="a"))
    state.disconnect(key, "c1")
    clock.now += 3
    run_end.on_tick(clock.now)
    state.hello("c2", hello_payload(session="a"))  # the same process reconnected in time
    clock.now += 10
    run_end.on_tick(clock.now)
    assert _v(state, "adamwatch_trainer_exits_total", reason="vanished") == 0
    state.disconnect(key, "c2")
    clock.now += 4.9
    run_end.on_tick(clock.now)
    assert _v(state, "adamwatch_trainer_exits_total", reason="vanished") == 0
    clock.now += 0.2
    run_end.on_tick(clock.now)
    assert _v(state, "adamwatch_trainer_exits_total", reason="vanished") == 1
    assert _v(state, "adamwatch_runs_ended_total", outcome="crashed") == 1
    # a restart before the grace runs out counts the old session at once
    state.hello("c3", hello_payload(session="b"))
    state.disconnect(key, "c3")
    state.hello("c4", hello_payload(session="c"))
    assert _v(state, "adamwatch_trainer_exits_total", reason="vanished") == 2
    assert _v(state, "adamwatch_trainer_starts_total") == 3


def test_runs_are_counted_by_rank_0_only(world) -> None:
    state, _, _ = world
    key = state.hello("c1", hello_payload(rank=3, target={"loss": 1.0}))
    _msg(state, key, M.GOODBYE, {"exit_reason": "oom"})
    labels = {"job": "gpt", "rank": "3"}
    assert state.value("adamwatch_trainer_exits_total", {**labels, "reason": "oom"}) == 1
    assert state.value("adamwatch_runs_ended_total", {**labels, "outcome": "oom"}) is None
    assert state.value("adamwatch_runs_target_total", {**labels, "outcome": "missed"}) is None


def test_device_seconds_count_connected_time_only(world) -> None:
    state, clock, run_end = world
    key = state.hello("c1", hello_payload())
    clock.now += 2.5
    run_end.on_tick(clock.now)
    clock.now += 1.0
    state.disconnect(key, "c1")
    clock.now += 100
    run_end.on_tick(clock.now)
    assert _v(state, "adamwatch_trainer_device_seconds_total", device="cpu") == pytest.approx(3.5)


def test_model_family_label_follows_the_latest_hello(world) -> None:
    state, _, _ = world
    state.hello("c1", hello_payload(model_family="gpt-small"))
    assert _v(state, "adamwatch_run_info", model_family="gpt-small") == 1
    state.hello("c2", hello_payload(session="s2", model_family="gpt-large"))
    assert _v(state, "adamwatch_run_info", model_family="gpt-small") is None
    assert _v(state, "adamwatch_run_info", model_family="gpt-large") == 1


def test_evaluation_names_per_trainer_are_bounded(world) -> None:
    state, _, _ = world
    key = state.hello("c1", hello_payload())
    for i in range(3):
        names = {f"m{i}_{j}": float(j) for j in range(wire.MAX_EVAL_METRICS)}
        _msg(state, key, M.EVAL, {"step": i, "time": 1.0, "metrics": names})
    exported = [labels for _, samples in state.snapshot(only="adamwatch_eval_metric") for labels, _ in samples]
    assert len(exported) == wire.MAX_EVAL_METRICS
    assert _v(state, "adamwatch_evaluations_total") == 3


def test_evaluations_are_exported_with_their_step_and_overfitting_counts_up(world) -> None:
    state, clock, _ = world
    key = state.hello("c1", hello_payload())
    assert _v(state, "adamwatch_evaluations_total") == 0
    step = 0
    # training loss keeps falling; validation loss falls, then rises three times
    for val in (2.0, 1.8, 1.9, 2.0, 2.1):
        for _ in range(3):
            step += 1
            _msg(state, key, M.STEP, step_payload(step, loss=3.0 - 0.05 * step))
        _msg(state, key, M.EVAL, {"step": step, "time": clock.now + step, "metrics": {"loss": val, "bleu": None}})
    assert _v(state, "adamwatch_eval_metric", metric="loss") == 2.1
    assert math.isnan(_v(state, "adamwatch_eval_metric", metric="bleu"))
    assert _v(state, "adamwatch_eval_step") == 15
    assert _v(state, "adamwatch_evaluations_total") == 5
    assert _v(state, "adamwatch_eval_overfitting_streak") == 3


def test_overfitting_needs_the_training_loss_to_fall() -> None:
    streak = OverfittingStreak()
    for train, val in [(2.0, 1.0), (2.0, 1.1), (2.1, 1.2), (2.2, 1.3)]:
        streak.add_train_loss(train)
        assert streak.add_eval_loss(val) == 0  # both rise: not overfitting (diverging, or a bad LR)


@pytest.mark.parametrize("bad, field", [
    ({"metrics": {}}, "EVAL.metrics"),
    ({"metrics": {"bad name": 1.0}}, "EVAL.metrics"),
    ({"metrics": {"loss": "x"}}, "EVAL.metrics.loss"),
    ({"step": -1}, "EVAL.step"),
])
def test_bad_eval_payloads_are_schema_errors_naming_the_field(world, bad, field) -> None:
    state, _, _ = world
    key = state.hello("c1", hello_payload())
    payload = {"step": 1, "time": 1.0, "metrics": {"loss": 1.0}, **bad}
    with pytest.raises(wire.SchemaError, match=field.replace(".", r"\.")):
        _msg(state, key, M.EVAL, payload)


def test_footprint_by_dtype_and_a_vanishing_dtype_is_removed(world) -> None:
    state, _, _ = world
    key = state.hello("c1", hello_payload())
    _msg(state, key, M.FOOTPRINT, {"time": 1.0, "param_bytes": {"float32": 400, "bfloat16": 20},
                                   "optimizer_state_bytes": {"float32": 808}, "device": "cuda",
                                   "device_memory_peak_bytes": 1 << 30, "device_memory_reserved_bytes": 2 << 30})
    assert _v(state, "adamwatch_param_bytes", dtype="bfloat16") == 20
    assert _v(state, "adamwatch_device_memory_reserved_bytes") == 2 << 30
    _msg(state, key, M.FOOTPRINT, {"time": 2.0, "param_bytes": {"bfloat16": 220}, "optimizer_state_bytes": {}})
    assert _v(state, "adamwatch_param_bytes", dtype="float32") is None
    assert _v(state, "adamwatch_optimizer_state_bytes", dtype="float32") is None
    assert _v(state, "adamwatch_device_memory_peak_bytes") is None
    with pytest.raises(wire.SchemaError, match="FOOTPRINT.param_bytes"):
        _msg(state, key, M.FOOTPRINT, {"time": 2.0, "param_bytes": {"float32": -1}, "optimizer_state_bytes": {}})


def test_eta_from_a_linear_trend_then_reached(world) -> None:
    state, clock, run_end = world
    key = state.hello("c1", hello_payload(target={"loss": 1.0}))
    assert _v(state, "adamwatch_convergence_target", metric="loss") == 1.0
    t0 = clock.now
    # loss falls 0.01 per step, one step per 2 s, from 2.0: reaches 1.0 at step 100 (200 s)
    for step in range(0, 11):
        _msg(state, key, M.STEP, step_payload(step + 1, time=t0 + 2 * step, loss=2.0 - 0.01 * step))
    assert _v(state, "adamwatch_convergence_eta_steps", metric="loss") == pytest.approx(90)
    assert _v(state, "adamwatch_convergence_eta_seconds", metric="loss") == pytest.approx(180)
    assert _v(state, "adamwatch_convergence_reached_seconds", metric="loss") is None
    _msg(state, key, M.STEP, step_payload(101, time=t0 + 200, loss=0.99))
    assert _v(state, "adamwatch_convergence_reached_seconds", metric="loss") == 200
    assert _v(state, "adamwatch_convergence_reached_step", metric="loss") == 101
    assert _v(state, "adamwatch_convergence_eta_seconds", metric="loss") == 0
    _msg(state, key, M.GOODBYE, {"exit_reason": "clean"})
    assert _v(state, "adamwatch_runs_target_total", outcome="reached") == 1


def test_a_rising_trend_has_no_eta_and_a_flat_one_is_a_plateau(world) -> None:
    state, clock, _ = world
    key = state.hello("c1", hello_payload(target={"eval_loss": 1.0}))
    t0 = clock.now
    _msg(state, key, M.STEP, step_payload(1, time=t0))  # learning rate 1e-3: not negligible
    for i in range(5):
        _msg(state, key, M.EVAL, {"step": i, "time": t0 + 10 * i, "metrics": {"loss": 2.0 + 0.1 * i}})
    assert _v(state, "adamwatch_convergence_eta_seconds", metric="eval_loss") is None
    for i in range(5, 20):
        # flat, with noise: no trend over the 100 s plateau window
        _msg(state, key, M.EVAL, {"step": i, "time": t0 + 10 * i, "metrics": {"loss": 2.4 + (0.01 if i % 2 else -0.01)}})
    assert _v(state, "adamwatch_convergence_plateau", metric="eval_loss") == 1
    _msg(state, key, M.GOODBYE, {"exit_reason": "clean"})
    assert _v(state, "adamwatch_runs_target_total", outcome="missed") == 1


def test_no_plateau_when_the_learning_rate_is_negligible(world) -> None:
    state, clock, _ = world
    key = state.hello("c1", hello_payload(target={"loss": 1.0}))
    for i in range(30):
        _msg(state, key, M.STEP, step_payload(i + 1, time=clock.now + 10 * i, loss=2.0, lr=[1e-10, 1e-10]))
    assert _v(state, "adamwatch_convergence_plateau", metric="loss") == 0


def test_config_target_overrides_the_trainers_and_counts_for_the_slo() -> None:
    clock = Clock()
    state = RunState(clock=clock)
    tracker = ConvergenceTracker(state, parse_convergence_config({"targets": {"gpt": {"eval_accuracy": 0.9}}}))
    run_end = RunEndTracker(state, clock, target_outcome=tracker.target_outcome, has_target=tracker.has_target)
    state.add_listener(tracker.on_message)
    state.add_listener(run_end.on_message)
    key = state.hello("c1", hello_payload(target={"loss": 1.0}))
    assert _v(state, "adamwatch_convergence_target", metric="eval_accuracy") == 0.9
    assert _v(state, "adamwatch_convergence_target", metric="loss") is None
    # the trainer announced nothing the sidecar uses, yet the SLO series start at 0
    assert _v(state, "adamwatch_runs_target_total", outcome="missed") == 0
    _msg(state, key, M.GOODBYE, {"exit_reason": "clean"})
    assert _v(state, "adamwatch_runs_target_total", outcome="missed") == 1


def test_a_run_without_target_has_no_target_series(world) -> None:
    state, _, _ = world
    key = state.hello("c1", hello_payload())
    _msg(state, key, M.GOODBYE, {"exit_reason": "clean"})
    assert _v(state, "adamwatch_runs_target_total", outcome="missed") is None


@pytest.mark.parametrize("raw, message", [
    ({"targets": {"gpt": {"accuracy": 1}}}, "convergence.targets.gpt.accuracy"),
    ({"targets": {"gpt": {"eval_loss": "low"}}}, "convergence.targets.gpt.eval_loss"),
    ({"window_seconds": 0}, "convergence.window_seconds"),
    ({"windo": 1}, "convergence.windo: unknown key"),
])
def test_bad_convergence_config_names_the_field(raw, message) -> None:
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        parse_convergence_config(raw)


def test_bad_runs_config_names_the_field() -> None:
    with pytest.raises(ValueError, match="runs.vanish_grace_seconds"):
        parse_runs_config({"vanish_grace_seconds": -1})


def test_fit_slope() -> None:
    assert fit_slope([(0, 1.0), (1, 3.0), (2, 5.0)]) == 2.0
    assert fit_slope([(1, 1.0), (1, 2.0)]) is None


@pytest.mark.parametrize("exit_reason, finished", [
    (None, 1.0), ("clean", 1.0), ("preemption", 1.0), ("exception", 0.0), ("oom", 0.0), ("signal", 0.0)])
def test_only_an_intended_end_counts_as_finished(world, exit_reason, finished) -> None:
    """AdamwatchTrainerDisconnected skips finished trainers: a crash that said goodbye must still show."""
    state, _, _ = world
    key = state.hello("c1", hello_payload())
    goodbye = {"reason": "closed"} if exit_reason is None else {"reason": "closed", "exit_reason": exit_reason}
    _msg(state, key, M.GOODBYE, goodbye)
    assert _v(state, "adamwatch_trainer_finished") == finished


@pytest.mark.parametrize("module", ["adamwatch_sidecar.convergence", "adamwatch_sidecar.overfitting",
                                    "adamwatch_sidecar.run_end", "adamwatch_sidecar.sre_messages"])
def test_docstring_examples(module: str) -> None:
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module))
    assert result.attempted > 0 and result.failed == 0
