"""Issue 10 leftover: a trainer's step counter going backwards within one session (a restart of
its loop, a restore) never shows up as a decreasing counter on a real sidecar's /metrics."""

from __future__ import annotations

import pytest

from adamwatch import wire
from .sidecar_testlib import hello_payload, parse_metrics, step_payload, wait_for

M = wire.MessageType


@pytest.fixture
def car(start_sidecar):
    return start_sidecar()  # a real sidecar process (killed by the fixture)


def _counters(text_values: dict) -> dict:
    return {key: value for key, value in text_values.items() if key[0].endswith("_total")}


def test_steps_going_backwards_never_decrease_a_counter(car) -> None:
    t = car.trainer()
    t.send(M.HELLO, hello_payload(job="back", rank=0))
    for step in range(1, 11):
        t.send(M.STEP, step_payload(step))
    wait_for(lambda: car.metrics().get(("adamwatch_steps_total", frozenset({("job", "back"), ("rank", "0")}))) == 10,
             what="ten steps")
    first = _counters(car.metrics())
    for step in range(1, 6):  # the loop restarted its counter: steps 1..5 again, same session
        t.send(M.STEP, step_payload(step))
    wait_for(lambda: car.metrics().get(("adamwatch_steps_total", frozenset({("job", "back"), ("rank", "0")}))) == 15,
             what="five more steps counted")
    second = _counters(car.metrics())
    decreased = {key: (first[key], second.get(key)) for key in first
                 if second.get(key) is not None and second[key] < first[key]}
    assert not decreased, decreased
    labels = frozenset({("job", "back"), ("rank", "0")})
    # The rewind is counted (the step gauge went from 10 back to 5 once, not on each later step).
    assert second[("adamwatch_step_rewinds_total", labels)] == 1
    assert car.metrics()[("adamwatch_optimizer_step", labels)] == 5
    t.close()
    # A new session (the script restarted) starts its own count: step 1 after step 5 is no rewind.
    t2 = car.trainer()
    t2.send(M.HELLO, hello_payload(job="back", rank=0, session="second-run"))
    t2.send(M.STEP, step_payload(1))
    wait_for(lambda: car.metrics().get(("adamwatch_steps_total", labels)) == 16, what="the new session's step")
    assert car.metrics()[("adamwatch_step_rewinds_total", labels)] == 1
    t2.close()
