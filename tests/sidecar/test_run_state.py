"""Run state: the mapping from trainer messages to series, retention, the generic store, listeners."""

from __future__ import annotations

import math

import pytest

from adamwatch import wire
from adamwatch_sidecar.metric_table import STEP_DURATION_BUCKETS
from adamwatch_sidecar.run_state import RunState, TrainerKey

from .sidecar_testlib import deep_entry, hello_payload, isnan, step_payload

M = wire.MessageType


class Clock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def msg(kind: wire.MessageType, payload: dict) -> wire.Message:
    unknown = wire.validate_payload(kind, payload)
    return wire.Message(kind, payload, unknown)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def state(clock: Clock) -> RunState:
    return RunState(retention_seconds=60, clock=clock)


def value(state: RunState, name: str, **labels) -> float | None:
    return state.value(name, {k: str(v) for k, v in labels.items()})


def T(**extra):  # trainer labels of the default trainer
    return {"job": "gpt", "rank": 0, **extra}


def test_hello_registers_the_trainer_with_optimizer_info(state: RunState) -> None:
    key = state.hello("c1", hello_payload())
    assert key == TrainerKey("gpt", 0) == ("gpt", 0)
    assert value(state, "adamwatch_trainer_connected", **T()) == 1.0
    [(spec, samples)] = state.snapshot(only="adamwatch_optimizer_info")
    assert samples == [(("gpt", "0", "AdamW", "fused", "0.9", "0.95", "1e-08", "0.1", "false", "4", "node-1",
                         "2.13.0", "0.1.0", ""), 1.0)]
    assert value(state, "adamwatch_steps_total", **T()) == 0.0
    assert value(state, "adamwatch_nonfinite_steps_total", **T(source="loss")) == 0.0
    assert value(state, "adamwatch_loss", **T()) is None  # no step yet: no loss series


def test_step_maps_to_every_per_step_metric(state: RunState) -> None:
    key = state.hello("c1", hello_payload())
    state.apply(key, msg(M.STEP, step_payload(7, samples=32, tokens=4096, duration_s=0.03)))
    assert value(state, "adamwatch_loss", **T()) == 2.5
    assert value(state, "adamwatch_grad_norm", **T(param_group="all")) == 1.5
    assert value(state, "adamwatch_grad_norm", **T(param_group="decay")) == 1.2
    assert value(state, "adamwatch_grad_norm", **T(param_group="no_decay")) == 0.9
    assert value(state, "adamwatch_learning_rate", **T(param_group="decay")) == 1e-3
    assert value(state, "adamwatch_learning_rate", **T(param_group="no_decay")) == 5e-4
    assert value(state, "adamwatch_optimizer_step", **T()) == 7
    assert value(state, "adamwatch_steps_total", **T()) == 1
    assert value(state, "adamwatch_last_step_timestamp_seconds", **T()) == 1_700_000_007.0
    assert value(state, "adamwatch_samples_total", **T()) == 32
    assert value(state, "adamwatch_tokens_total", **T()) == 4096
    [(_, [(labels, (cumulative, total, count))])] = state.snapshot(only="adamwatch_step_duration_seconds")
    assert labels == ("gpt", "0") and count == 1 and total == pytest.approx(0.03)
    first_bucket = STEP_DURATION_BUCKETS.index(0.05)  # 0.025 < 0.03 <= 0.05
    assert cumulative[:first_bucket] == [0] * first_bucket
    assert cumulative[first_bucket:] == [1] * (len(cumulative) - first_bucket)


def test_counters_accumulate_and_nonfinite_and_skips_are_counted(state: RunState) -> None:
    key = state.hello("c1", hello_payload())
    state.apply(key, msg(M.STEP, step_payload(1, samples=10)))
    state.apply(key, msg(M.STEP, step_payload(2, loss=float("nan"), loss_nonfinite=True, grad_nonfinite=True,
                                              grad_norm=float("inf"), skipped=True, skip_reason="grad_scaler",
                                              samples=10)))
    state.apply(key, msg(M.STEP, step_payload(3, skipped=True, skip_reason=None, duration_s=None)))
    state.apply(key, msg(M.STEP, step_payload(4, grad_nonfinite=True, grad_norm=float("nan"))))
    assert value(state, "adamwatch_steps_total", **T()) == 4
    assert value(state, "adamwatch_nonfinite_steps_total", **T(source="loss")) == 1
    # The GradScaler overflow of step 2 is a skip, not a non-finite step; step 4's NaN is one.
    assert value(state, "adamwatch_nonfinite_steps_total", **T(source="grad")) == 1
    assert value(state, "adamwatch_skipped_steps_total", **T(reason="grad_scaler")) == 1
    assert value(state, "adamwatch_skipped_steps_total", **T(reason="unknown")) == 1
    assert value(state, "adamwatch_samples_total", **T()) == 20
    assert value(state, "adamwatch_tokens_total", **T()) is None  # never reported
    [(_, [(_, (_, _, count))])] = state.snapshot(only="adamwatch_step_duration_seconds")
    assert count == 3  # the step without a duration is not observed
    assert value(state, "adamwatch_loss", **T()) == 2.5  # steps 3 and 4 carried 2.5 again


def test_a_step_without_loss_keeps_the_previous_loss_and_nan_is_kept(state: RunState) -> None:
    key = state.hello("c1", hello_payload())
    state.apply(key, msg(M.STEP, step_payload(1, loss=3.0)))
    no_loss = step_payload(2)
    del no_loss["loss"], no_loss["loss_nonfinite"]
    state.apply(key, msg(M.STEP, no_loss))
    assert value(state, "adamwatch_loss", **T()) == 3.0
    state.apply(key, msg(M.STEP, step_payload(3, loss=float("nan"), loss_nonfinite=True)))
    assert isnan(value(state, "adamwatch_loss", **T()))


def test_deep_statistics_per_group_and_quantile(state: RunState) -> None:
    key = state.hello("c1", hello_payload())
    state.apply(key, msg(M.STEP, step_payload(10, deep=[deep_entry(1.0), deep_entry(2.0)])))
    for group, scale in (("decay", 1.0), ("no_decay", 2.0)):
        for q, base in zip(wire.QUANTILES, (1.0, 2.0, 3.0, 4.0, 5.0)):
            assert value(state, "adamwatch_effective_learning_rate", **T(param_group=group, quantile=str(q))) == base * scale
        assert value(state, "adamwatch_update_size", **T(param_group=group, quantile="0.99")) == pytest.approx(0.5 * scale)
        assert value(state, "adamwatch_update_to_weight_ratio", **T(param_group=group)) == pytest.approx(0.001 * scale)
        assert value(state, "adamwatch_adam_exp_avg_norm", **T(param_group=group)) == 0.5 * scale
        assert value(state, "adamwatch_adam_exp_avg_sq_norm", **T(param_group=group)) == 0.25 * scale
        assert value(state, "adamwatch_eps_dominated_ratio", **T(param_group=group)) == 0.125
    assert value(state, "adamwatch_deep_stats_step", **T()) == 10
    state.apply(key, msg(M.STEP, step_payload(11)))  # no deep: the last deep values stay
    assert value(state, "adamwatch_deep_stats_step", **T()) == 10


def test_malformed_deep_statistics_are_a_schema_error_and_change_nothing(state: RunState) -> None:
    key = state.hello("c1", hello_payload())
    bad = step_payload(5, deep=[{"effective_lr": [1.0, 2.0]}])  # wrong number of quantiles
    with pytest.raises(wire.SchemaError, match=r"deep\[0\]\.effective_lr"):
        state.apply(key, msg(M.STEP, bad))
    with pytest.raises(wire.SchemaError, match=r"deep\[0\]\.update_to_weight"):
        state.apply(key, msg(M.STEP, step_payload(5, deep=[{"update_to_weight": "x"}])))
    assert value(state, "adamwatch_steps_total", **T()) == 0


@pytest.mark.parametrize(
    "change, match",
    [
        ({"job": ""}, "HELLO.job"),
        ({"rank": -1}, "HELLO.rank"),
        ({"optimizer": {"param_groups": ["a", "a"]}}, "unique"),
        ({"optimizer": {"param_groups": ["all"]}}, "'all'"),
        ({"optimizer": {"param_groups": [1, 2]}}, "param_groups"),
    ],
)
def test_hello_rules_beyond_the_wire_schema(state: RunState, change: dict, match: str) -> None:
    with pytest.raises(wire.SchemaError, match=match):
        state.hello("c1", hello_payload(**change))
    assert state.keys() == []


def test_unnamed_extra_groups_are_labelled_by_index(state: RunState) -> None:
    key = state.hello("c1", hello_payload(groups=["only"]))
    state.apply(key, msg(M.STEP, step_payload(1, group_grad_norms=[1.0, None, 3.0], lr=[0.1, 0.2, 0.3])))
    assert value(state, "adamwatch_grad_norm", **T(param_group="only")) == 1.0
    assert value(state, "adamwatch_grad_norm", **T(param_group="1")) is None  # null norm: no series
    assert value(state, "adamwatch_grad_norm", **T(param_group="2")) == 3.0
    assert value(state, "adamwatch_learning_rate", **T(param_group="1")) == 0.2


def test_checkpoint_events(state: RunState) -> None:
    key = state.hello("c1", hello_payload())
    state.apply(key, msg(M.CHECKPOINT, {"event": "saved", "step": 100, "time": 1_700_000_100.0}))
    state.apply(key, msg(M.CHECKPOINT, {"event": "known_good", "step": 90, "time": 1_700_000_150.0}))
    state.apply(key, msg(M.CHECKPOINT, {"event": "restored", "step": 90, "time": 1_700_000_160.0}))
    assert value(state, "adamwatch_last_checkpoint_timestamp_seconds", **T()) == 1_700_000_100.0
    assert value(state, "adamwatch_last_known_good_checkpoint_timestamp_seconds", **T()) == 1_700_000_150.0
    assert value(state, "adamwatch_last_known_good_checkpoint_step", **T()) == 90


def test_dropped_summaries_stay_monotonic_across_reconnects_and_restarts(state: RunState) -> None:
    key = state.hello("c1", hello_payload(session="A", dropped_total=0))
    state.apply(key, msg(M.DROPPED, {"dropped_total": 5}))
    assert value(state, "adamwatch_dropped_summaries_total", **T()) == 5
    state.disconnect(key, "c1")
    # reconnect of the same session: its cumulative count carries on
    state.hello("c2", hello_payload(session="A", dropped_total=12))
    assert value(state, "adamwatch_dropped_summaries_total", **T()) == 12
    state.apply(key, msg(M.DROPPED, {"dropped_total": 7}))  # stale/out-of-order: never backwards
    assert value(state, "adamwatch_dropped_summaries_total", **T()) == 12
    # the trainer restarted: a new session counts from 0 again; the export keeps growing
    state.disconnect(key, "c2")
    state.hello("c3", hello_payload(session="B", dropped_total=3))
    assert value(state, "adamwatch_dropped_summaries_total", **T()) == 15
    state.apply(key, msg(M.DROPPED, {"dropped_total": 4}))
    assert value(state, "adamwatch_dropped_summaries_total", **T()) == 16


def test_reconnect_keeps_counters_and_a_stale_connection_cannot_disconnect(state: RunState) -> None:
    key = state.hello("c1", hello_payload())
    state.apply(key, msg(M.STEP, step_payload(1)))
    state.hello("c2", hello_payload())  # new connection before the old one noticed it was dead
    assert state.disconnect(key, "c1") is False
    assert value(state, "adamwatch_trainer_connected", **T()) == 1
    state.apply(key, msg(M.STEP, step_payload(2)))
    assert value(state, "adamwatch_steps_total", **T()) == 2
    assert state.disconnect(key, "c2") is True
    assert value(state, "adamwatch_trainer_connected", **T()) == 0


def test_series_stay_for_the_retention_time_then_go(state: RunState, clock: Clock) -> None:
    key = state.hello("c1", hello_payload())
    other = state.hello("c9", hello_payload(rank=1))
    state.apply(key, msg(M.STEP, step_payload(1)))
    clock.now = 2000.0
    state.disconnect(key, "c1")
    assert state.expire(2000.0 + 59.9) == []
    assert value(state, "adamwatch_loss", **T()) == 2.5
    assert value(state, "adamwatch_trainer_connected", **T()) == 0
    assert state.expire(2000.0 + 60.0) == [key]
    assert value(state, "adamwatch_loss", **T()) is None
    assert value(state, "adamwatch_trainer_connected", **T()) is None
    assert state.keys() == [other]  # connected trainers never expire
    clock.now = 10_000.0
    assert state.expire() == []


def test_generic_store_validates_against_the_metric_table(state: RunState) -> None:
    key = state.hello("c1", hello_payload())
    state.inc(key, "adamwatch_remediations_total", {"action": "reduce_lr", "outcome": "applied"})
    state.inc(key, "adamwatch_remediations_total", {"action": "reduce_lr", "outcome": "applied"}, 2)
    state.set_gauge(key, "adamwatch_learning_rate_scale", {}, 0.5)
    state.inc_global("adamwatch_control_requests_rejected_total", {"endpoint": "actions", "reason": "auth"})
    assert value(state, "adamwatch_remediations_total", **T(action="reduce_lr", outcome="applied")) == 3
    assert value(state, "adamwatch_learning_rate_scale", **T()) == 0.5
    assert value(state, "adamwatch_control_requests_rejected_total", endpoint="actions", reason="auth") == 1
    with pytest.raises(KeyError, match="adamwatch_nope_total"):
        state.inc(key, "adamwatch_nope_total", {})
    with pytest.raises(ValueError, match=r"adamwatch_remediations_total: labels must be \['action', 'outcome'\]"):
        state.inc(key, "adamwatch_remediations_total", {"action": "x"})
    with pytest.raises(ValueError, match="adamwatch_learning_rate_scale: is a gauge"):
        state.inc(key, "adamwatch_learning_rate_scale", {})
    with pytest.raises(ValueError, match="adamwatch_loss: is maintained from trainer messages"):
        state.set_gauge(key, "adamwatch_loss", {}, 1.0)
    with pytest.raises(ValueError, match="adamwatch_detections_total: is per-trainer"):
        state.inc_global("adamwatch_detections_total", {"detector": "x"})
    with pytest.raises(ValueError, match="must be a number >= 0"):
        state.inc(key, "adamwatch_detections_total", {"detector": "x"}, -1)


def test_generic_store_for_an_unknown_trainer_expires_with_retention(state: RunState, clock: Clock) -> None:
    ghost = TrainerKey("old-job", 3)
    state.inc(ghost, "adamwatch_detections_total", {"detector": "stall"})
    assert value(state, "adamwatch_detections_total", job="old-job", rank=3, detector="stall") == 1
    assert value(state, "adamwatch_trainer_connected", job="old-job", rank=3) is None
    assert state.expire(clock.now + 60) == [ghost]


def test_listeners_see_every_accepted_message_and_the_disconnect(state: RunState) -> None:
    seen = []
    state.add_listener(lambda key, message: seen.append((key, message and message.type)))
    state.add_listener(lambda key, message: 1 / 0)  # a failing listener must not break the others
    key = state.hello("c1", hello_payload())
    state.apply(key, msg(M.STEP, step_payload(1)))
    state.apply(key, msg(M.ACK, {"id": "a1", "action": "reduce_lr", "outcome": "applied", "step": 1}))
    state.apply(key, msg(M.GOODBYE, {"reason": "done", "step": 1}))
    state.disconnect(key, "c1")
    assert seen == [(key, M.HELLO), (key, M.STEP), (key, M.ACK), (key, M.GOODBYE), (key, None)]
    assert state.describe(key)["goodbye"] == {"reason": "done", "step": 1}


def test_a_trainer_may_not_send_commands(state: RunState) -> None:
    key = state.hello("c1", hello_payload())
    with pytest.raises(wire.FrameError) as info:
        state.apply(key, msg(M.COMMAND, {"id": "x", "action": "stop"}))
    assert info.value.reason == "unexpected"


def test_retention_must_be_a_non_negative_number() -> None:
    with pytest.raises(ValueError, match="retention_seconds"):
        RunState(retention_seconds=-1)
    assert math.isfinite(RunState(retention_seconds=0).retention_seconds)


def test_label_values_from_trainers_are_bounded_and_counters_never_go_down(state: RunState) -> None:
    from adamwatch_sidecar.run_state import MAX_SKIP_REASONS

    key = state.hello("c1", hello_payload())
    for i in range(MAX_SKIP_REASONS + 5):
        state.apply(key, msg(M.STEP, step_payload(i, skipped=True, skip_reason=f"r{i}")))
    [(_, samples)] = state.snapshot(only="adamwatch_skipped_steps_total")
    assert len(samples) == MAX_SKIP_REASONS + 1
    assert value(state, "adamwatch_skipped_steps_total", **T(reason="other")) == 5
    with pytest.raises(wire.SchemaError, match="STEP.samples must be >= 0"):
        state.apply(key, msg(M.STEP, step_payload(99, samples=-5)))
    state.apply(key, msg(M.STEP, step_payload(100, duration_s=-1.0)))  # clock went backwards: not observed
    [(_, [(_, (_, total, count))])] = state.snapshot(only="adamwatch_step_duration_seconds")
    assert total >= 0 and count == MAX_SKIP_REASONS + 5


def test_negative_steps_and_non_finite_timestamps_are_refused_and_never_exported(state: RunState) -> None:
    from adamwatch import wire as _wire

    key = state.hello("c", hello_payload(job="bad-steps"))
    for payload in (step_payload(-3), step_payload(1, time=float("nan")), step_payload(1, time=float("inf"))):
        with pytest.raises(_wire.SchemaError):
            state.apply(key, _wire.Message(_wire.MessageType.STEP, payload))
    labels = {"job": "bad-steps", "rank": "0"}
    assert state.value("adamwatch_optimizer_step", labels) is None
    assert state.value("adamwatch_last_step_timestamp_seconds", labels) is None
    assert state.value("adamwatch_steps_total", labels) == 0


def test_a_listener_for_some_message_types_gets_only_those_and_the_disconnect(state: RunState) -> None:
    everything, footprints_only = [], []
    state.add_listener(lambda key, message: everything.append(message and message.type))
    state.add_listener(lambda key, message: footprints_only.append(message and message.type),
                       types=(M.FOOTPRINT, M.GOODBYE))
    key = state.hello("c1", hello_payload())
    state.apply(key, msg(M.STEP, step_payload(1)))
    state.apply(key, msg(M.FOOTPRINT, {"time": 1.0, "param_bytes": {"float32": 4}, "optimizer_state_bytes": {}}))
    state.apply(key, msg(M.GOODBYE, {"reason": "done", "step": 1}))
    state.disconnect(key, "c1")
    assert everything == [M.HELLO, M.STEP, M.FOOTPRINT, M.GOODBYE, None]
    assert footprints_only == [M.FOOTPRINT, M.GOODBYE, None]
