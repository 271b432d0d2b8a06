"""Single-process checks of the distributed pieces: flags, validation, the sidecar's origin tracker."""

from __future__ import annotations

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from adamwatch import wire
from adamwatch.comm_watch import LocalGradFlag, watch_local_grads
from adamwatch.cross_rank import CrossRankReduction
from adamwatch.monitor import MonitorConfig
from adamwatch.shards import is_sharded_param, local_tensor, params_are_sharded
from adamwatch_sidecar.collector import RunStateCollector
from adamwatch_sidecar.nan_origin import NanOriginTracker
from adamwatch_sidecar.run_state import RunState
from tests.sidecar.sidecar_testlib import hello_payload, step_payload

M = wire.MessageType


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_the_local_flag_sees_nan_and_both_infinities_once(bad):
    flag = LocalGradFlag()
    grad = torch.ones(5)
    flag.observe(grad)
    assert not flag.take()
    grad[3] = bad
    flag.observe(torch.ones(2))
    flag.observe(grad)
    assert flag.take()
    assert not flag.take()  # cleared for the next step
    assert flag.observed == 3


def test_opposite_infinities_do_not_cancel():
    flag = LocalGradFlag()
    flag.observe(torch.tensor([float("inf"), float("-inf")]))
    assert flag.take()


def test_plain_tensors_are_their_own_shard():
    p = torch.nn.Parameter(torch.ones(3))
    assert local_tensor(p) is p
    assert not is_sharded_param(p) and not params_are_sharded([p])


def test_a_model_without_distributed_wrapping_is_refused_by_name():
    with pytest.raises(TypeError, match="Linear"):
        watch_local_grads(torch.nn.Linear(2, 2))


def test_the_reduction_needs_torch_distributed():
    opt = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters())
    with pytest.raises(RuntimeError, match="torch.distributed"):
        CrossRankReduction(opt)
    with pytest.raises(ValueError, match="layout"):
        CrossRankReduction(opt, layout="diagonal")


def test_config_names_bad_cross_rank_settings():
    with pytest.raises(ValueError, match="cross_rank"):
        MonitorConfig(cross_rank="always").validate()
    with pytest.raises(TypeError, match="local_grads"):
        MonitorConfig(local_grads=object()).validate()


def _metrics(state: RunState) -> dict:
    out = {}
    for family in text_string_to_metric_families(RunStateCollector(state).render_text().decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_the_origin_tracker_counts_own_steps_and_keeps_where_each_streak_began():
    state = RunState(retention_seconds=60, clock=lambda: 1000.0)
    tracker = NanOriginTracker(state)
    state.add_listener(tracker.on_message)
    keys = [state.hello(f"c{r}", hello_payload(job="j", rank=r)) for r in range(2)]
    # rank 1's own gradients go bad at steps 3-4 and again at 7; rank 0 only receives the NaN
    for step in range(1, 9):
        for rank, key in enumerate(keys):
            own = rank == 1 and step in (3, 4, 7)
            extras = {"nonfinite_origin_loss": 0.0, "nonfinite_origin_grad": float(own),
                      "nonfinite_origin_first_rank": 1.0 if step in (3, 4, 7) else -1.0}
            state.apply(key, wire.Message(M.STEP, step_payload(step, extras=extras)))
    got = _metrics(state)

    def value(name, rank, **labels):
        return got.get((name, tuple(sorted({"job": "j", "rank": str(rank), **labels}.items()))))

    assert value("adamwatch_nonfinite_origin_steps_total", 1, source="grad") == 3.0
    assert value("adamwatch_nonfinite_origin_steps_total", 1, source="loss") == 0.0
    assert value("adamwatch_nonfinite_origin_steps_total", 0, source="grad") == 0.0  # born at 0
    assert value("adamwatch_nonfinite_origin_step", 1, source="grad") == 7.0  # the latest streak began at 7
    assert value("adamwatch_nonfinite_origin_step", 0, source="grad") is None
    assert value("adamwatch_nonfinite_first_rank", 0) == 1.0 and value("adamwatch_nonfinite_first_rank", 1) == 1.0
    assert tracker.streaks == 2


def test_steps_without_origin_extras_export_nothing():
    state = RunState(retention_seconds=60, clock=lambda: 1000.0)
    state.add_listener(NanOriginTracker(state).on_message)
    key = state.hello("c0", hello_payload(job="j", rank=0))
    state.apply(key, wire.Message(M.STEP, step_payload(1)))
    assert not [k for k in _metrics(state) if "origin" in k[0] or "first_rank" in k[0]]


def test_the_non_finite_detection_names_the_rank_and_step_where_the_streak_began():
    from adamwatch_sidecar.remediation.detectors import NonFiniteDetector
    from adamwatch_sidecar.remediation.policy import NonFiniteParams

    detector = NonFiniteDetector(NonFiniteParams(consecutive_steps=2))
    healthy = step_payload(9, extras={"nonfinite_origin_first_rank": -1.0})
    assert detector.observe(healthy) is None
    first = step_payload(10, grad_norm=float("nan"), grad_nonfinite=True, extras={"nonfinite_origin_first_rank": 2.0})
    assert detector.observe(first) is None  # streak of 1 < 2
    # by the next step the NaN is everywhere and no rank produced a new one: the streak's origin stays
    second = step_payload(11, grad_norm=float("nan"), grad_nonfinite=True, extras={"nonfinite_origin_first_rank": -1.0})
    assert detector.observe(second)["origin"] == {"rank": 2, "step": 10}
    # single process (no extras): no origin in the evidence
    alone = NonFiniteDetector(NonFiniteParams(consecutive_steps=1))
    assert "origin" not in alone.observe(step_payload(3, grad_norm=float("nan"), grad_nonfinite=True))
