"""STEP extras -> spike guard and GradScaler metrics, rendered through the real collector."""

from __future__ import annotations

import math

from adamwatch import wire
from adamwatch_sidecar.collector import RunStateCollector
from adamwatch_sidecar.run_state import RunState
from adamwatch_sidecar.extras_export import StepExtrasExporter

from .sidecar_testlib import hello_payload, parse_metrics, series, step_payload


def make() -> tuple[RunState, object]:
    state = RunState()
    exporter = StepExtrasExporter(state)
    state.add_listener(exporter.on_message)
    key = state.hello("c1", hello_payload(groups=["decay", "no_decay"]))
    return state, key


def send(state, key, step, extras):
    state.apply(key, wire.Message(wire.MessageType.STEP, step_payload(step, extras=extras)))


def metrics(state) -> dict:
    return parse_metrics(RunStateCollector(state).render_text().decode())


def test_activations_thresholds_and_zscores():
    state, key = make()
    truth = {"clip": 0}
    for step, active in enumerate([0, 1, 0, 1, 1], start=1):
        truth["clip"] += active
        send(state, key, step, {"spike_guard_clip": float(active), "spike_guard_threshold_grad_norm": 1.0 + step,
                                "spike_guard_zscore_grad_norm": 0.5 * step})
    m = metrics(state)
    labels = dict(job="gpt", rank="0")
    assert series(m, "adamwatch_spike_guard_activations_total", mode="clip", **labels) == truth["clip"] == 3
    assert series(m, "adamwatch_spike_guard_activations_total", mode="skip", **labels) is None
    assert series(m, "adamwatch_spike_guard_threshold", signal="grad_norm", **labels) == 6.0
    assert series(m, "adamwatch_spike_guard_zscore", signal="grad_norm", **labels) == 2.5


def test_the_counter_appears_at_zero_and_nan_bounds_keep_the_last_value():
    state, key = make()
    send(state, key, 1, {"spike_guard_skip": 0.0, "spike_guard_threshold_loss": math.nan})
    m = metrics(state)
    assert series(m, "adamwatch_spike_guard_activations_total", job="gpt", rank="0", mode="skip") == 0
    assert series(m, "adamwatch_spike_guard_threshold", job="gpt", rank="0", signal="loss") is None
    send(state, key, 2, {"spike_guard_skip": 1.0, "spike_guard_threshold_loss": 3.0})
    send(state, key, 3, {"spike_guard_skip": 0.0, "spike_guard_threshold_loss": math.nan})
    m = metrics(state)
    assert series(m, "adamwatch_spike_guard_activations_total", job="gpt", rank="0", mode="skip") == 1
    assert series(m, "adamwatch_spike_guard_threshold", job="gpt", rank="0", signal="loss") == 3.0


def test_grad_scaler_scale_and_zero_ratio_by_group_name():
    state, key = make()
    send(state, key, 1, {"grad_scaler_scale": 65536.0, "grad_zero_ratio.0": 0.25, "grad_zero_ratio.1": 0.5,
                         "grad_zero_ratio.7": 0.9, "grad_zero_ratio.x": 0.9, "something_newer": 1.0})
    m = metrics(state)
    assert series(m, "adamwatch_grad_scaler_scale", job="gpt", rank="0") == 65536.0
    assert series(m, "adamwatch_grad_zero_ratio", job="gpt", rank="0", param_group="decay") == 0.25
    assert series(m, "adamwatch_grad_zero_ratio", job="gpt", rank="0", param_group="no_decay") == 0.5
    # an unannounced group index adds no series
    assert [k for k in m if k[0] == "adamwatch_grad_zero_ratio"].__len__() == 2


def test_a_step_without_extras_exports_nothing():
    state, key = make()
    state.apply(key, wire.Message(wire.MessageType.STEP, step_payload(1)))
    m = metrics(state)
    assert not [k for k in m if k[0].startswith(("adamwatch_spike_guard", "adamwatch_grad_scaler", "adamwatch_grad_zero"))]


def test_cross_rank_failures_are_counted_from_zero():
    state, key = make()
    truth = 0
    for step, failed in enumerate([0.0, 0.0, 1.0, 0.0, 2.0], start=1):
        truth += failed > 0
        send(state, key, step, {"cross_rank_failed_ranks": failed})
        if step == 1:  # the series exists before the first failure
            assert series(metrics(state), "adamwatch_cross_rank_failed_steps_total", job="gpt", rank="0") == 0
    assert series(metrics(state), "adamwatch_cross_rank_failed_steps_total", job="gpt", rank="0") == truth == 2
