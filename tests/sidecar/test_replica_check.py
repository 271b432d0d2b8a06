"""The sidecar's replica check: fingerprints of a job's ranks compared at equal steps."""

from __future__ import annotations

import pytest

from adamwatch import wire
from adamwatch_sidecar.remediation.audit import AuditLog
from adamwatch_sidecar.replica_check import ReplicaCheck
from adamwatch_sidecar.run_state import RunState, TrainerKey


def _hello(state: RunState, job: str, rank: int) -> TrainerKey:
    return state.hello(f"{job}-{rank}", {"job": job, "rank": rank, "world_size": 3, "host": "h", "pid": rank,
                                         "session": f"s{rank}", "adamwatch_version": "0",
                                         "optimizer": {"param_groups": ["g"]}})


def _send(state: RunState, key: TrainerKey, step: int, value: int) -> None:
    state.apply(key, wire.Message(wire.MessageType.FINGERPRINT, {"step": step, "fingerprint": value}))


@pytest.fixture
def setup():
    state = RunState(retention_seconds=60, clock=lambda: 1000.0)
    audit = AuditLog(None, clock=lambda: 1000.0)
    check = ReplicaCheck(state, audit=audit)
    state.add_listener(check.on_message)
    return state, audit, check


def _divergence(state: RunState, job: str, rank: int) -> float | None:
    return state.value("adamwatch_replica_divergence", {"job": job, "rank": rank})


def test_the_minority_rank_is_flagged_once_and_audited(setup):
    state, audit, check = setup
    keys = [_hello(state, "gpt", r) for r in range(3)]
    other = _hello(state, "bert", 0)
    for key in keys:
        _send(state, key, 100, 2**52 - 1)
    _send(state, other, 100, 5)  # another job: never compared with gpt
    assert [_divergence(state, "gpt", r) for r in range(3)] == [0, 0, 0]
    assert check.divergent("gpt") is None
    # step 200: rank 0 first (alone at 200, nothing to compare), then the others
    _send(state, keys[0], 200, 7)
    _send(state, keys[1], 200, 8)  # a tie 1:1, rank 0's value is the reference
    _send(state, keys[2], 200, 8)  # now 8 is the majority: rank 0 is the odd one out
    assert [_divergence(state, "gpt", r) for r in range(3)] == [1, 0, 0]
    assert check.divergent("gpt") == (200, [0])
    assert state.value("adamwatch_parameter_fingerprint", {"job": "gpt", "rank": 0}) == 7
    assert state.value("adamwatch_parameter_fingerprint_step", {"job": "gpt", "rank": 0}) == 200
    lines = [r for r in audit.recent() if r["detector"] == "replica_divergence"]
    assert len(lines) == 1  # one detection per job and step
    assert lines[0]["step"] == 200 and lines[0]["rank"] == 1  # first seen: rank 1 against rank 0's value
    assert lines[0]["evidence"]["divergent_ranks"] == [1]


def test_out_of_range_fingerprints_are_refused_by_name(setup):
    state, _audit, _check = setup
    key = _hello(state, "gpt", 0)
    for bad in (-1, 2**53):
        with pytest.raises(wire.SchemaError, match="FINGERPRINT.fingerprint"):
            _send(state, key, 100, bad)
    with pytest.raises(wire.SchemaError, match="FINGERPRINT.fingerprint"):
        wire.validate_payload(wire.MessageType.FINGERPRINT, {"step": 1, "fingerprint": 1.5})
    assert state.value("adamwatch_parameter_fingerprint", {"job": "gpt", "rank": 0}) is None


def test_memory_stays_bounded_in_jobs():
    state = RunState(retention_seconds=60, clock=lambda: 1000.0)
    check = ReplicaCheck(state, max_jobs=3)
    state.add_listener(check.on_message)
    for j in range(5):
        key = _hello(state, f"job{j}", 0)
        _send(state, key, 100, j)
    assert list(check._jobs) == ["job2", "job3", "job4"]
