"""Checkpoint health (issue 11 item 4): the series the sidecar derives from CHECKPOINT events."""

from __future__ import annotations

import pytest

from adamwatch import wire
from adamwatch_sidecar.run_state import CHECKPOINT_OUTCOMES, RunState

from .sidecar_testlib import hello_payload

M = wire.MessageType
T = {"job": "gpt", "rank": "0"}


def _event(state: RunState, key, event: str, step: int, time: float = 1.7e9, **extra) -> None:
    payload = {"event": event, "step": step, "time": time, **extra}
    state.apply(key, wire.Message(M.CHECKPOINT, payload, wire.validate_payload(M.CHECKPOINT, payload)))


def _value(state: RunState, name: str, **labels: str) -> float | None:
    return state.value(name, {**T, **labels})


@pytest.fixture
def state_and_key():
    state = RunState(retention_seconds=60, clock=lambda: 1000.0)
    return state, state.hello("c1", hello_payload())


def test_no_series_before_the_first_checkpoint_event(state_and_key) -> None:
    state, _ = state_and_key
    for name in ("adamwatch_checkpoint_saves_total", "adamwatch_checkpoint_restores_total"):
        assert _value(state, name, outcome="success") is None
    assert _value(state, "adamwatch_corrupt_checkpoints_total") is None


def test_the_first_event_creates_both_outcomes_at_zero(state_and_key) -> None:
    """So that increase() sees the first failure (a series born at 1 is invisible to it)."""
    state, key = state_and_key
    _event(state, key, "known_good", 10)
    assert CHECKPOINT_OUTCOMES == ("success", "failed")
    for name in ("adamwatch_checkpoint_saves_total", "adamwatch_checkpoint_restores_total"):
        for outcome in CHECKPOINT_OUTCOMES:
            assert _value(state, name, outcome=outcome) == 0
    assert _value(state, "adamwatch_corrupt_checkpoints_total") == 0
    assert _value(state, "adamwatch_checkpoint_save_duration_seconds") is None


def test_saves_restores_and_corruption_are_counted_with_durations_and_size(state_and_key) -> None:
    state, key = state_and_key
    _event(state, key, "saved", 10, duration_s=1.25, size_bytes=4096)
    _event(state, key, "saved", 20, time=1.7e9 + 60, duration_s=2.5, size_bytes=8192)
    _event(state, key, "save_failed", 30, time=1.7e9 + 120, duration_s=0.1, detail="No space left on device")
    _event(state, key, "corrupt", 20, detail="sha256 mismatch")
    _event(state, key, "restored", 10, duration_s=0.75, size_bytes=4096)
    _event(state, key, "restore_failed", 25, duration_s=0.5, detail="no usable checkpoint")
    assert _value(state, "adamwatch_checkpoint_saves_total", outcome="success") == 2
    assert _value(state, "adamwatch_checkpoint_saves_total", outcome="failed") == 1
    assert _value(state, "adamwatch_checkpoint_save_duration_seconds") == 2.5  # the latest successful save
    assert _value(state, "adamwatch_checkpoint_size_bytes") == 8192
    assert _value(state, "adamwatch_last_checkpoint_timestamp_seconds") == 1.7e9 + 60
    assert _value(state, "adamwatch_last_checkpoint_save_failure_timestamp_seconds") == 1.7e9 + 120
    assert _value(state, "adamwatch_checkpoint_restores_total", outcome="success") == 1
    assert _value(state, "adamwatch_checkpoint_restores_total", outcome="failed") == 1
    assert _value(state, "adamwatch_checkpoint_restore_duration_seconds") == 0.5  # the latest attempt
    assert _value(state, "adamwatch_corrupt_checkpoints_total") == 1


def test_bad_numbers_are_not_exported_and_unknown_kinds_are_ignored(state_and_key) -> None:
    state, key = state_and_key
    _event(state, key, "saved", 10, duration_s=1.0, size_bytes=100)
    _event(state, key, "saved", 11, duration_s=float("nan"), size_bytes=-5)
    _event(state, key, "restored", 11, duration_s=-1.0)
    _event(state, key, "save_failed", 12, time=float("inf"))
    _event(state, key, "compacted", 13)  # a newer trainer's event kind
    assert _value(state, "adamwatch_checkpoint_saves_total", outcome="success") == 2
    assert _value(state, "adamwatch_checkpoint_save_duration_seconds") == 1.0
    assert _value(state, "adamwatch_checkpoint_size_bytes") == 100
    assert _value(state, "adamwatch_checkpoint_restore_duration_seconds") is None
    assert _value(state, "adamwatch_last_checkpoint_save_failure_timestamp_seconds") is None
    assert _value(state, "adamwatch_checkpoint_saves_total", outcome="failed") == 1
    assert sum(v for _, v in state.snapshot(only="adamwatch_checkpoint_restores_total")[0][1]) == 1
