"""Ingest over real sockets (in-process sidecar): ordering rules, rejections by reason, commands, fuzzing."""

from __future__ import annotations

import pathlib
import shutil
import socket
import struct
import tempfile
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adamwatch import wire
from adamwatch_sidecar.config import build_config
from adamwatch_sidecar.run_state import TrainerKey
from adamwatch_sidecar.server import Sidecar
from .sidecar_testlib import TrainerSocket, hello_payload, http_get, step_payload, wait_for

M = wire.MessageType
MAX_FRAME = 4096


@pytest.fixture(scope="module")
def sidecar():
    folder = pathlib.Path(tempfile.mkdtemp(prefix="aw-ingest-", dir="/tmp"))
    cfg = build_config(overrides={"listen": f"unix://{folder}/sock/adamwatch.sock", "metrics_address": "127.0.0.1:0",
                                  "max_frame_bytes": MAX_FRAME, "retention_seconds": 300})
    car = Sidecar(cfg)
    car.start()
    try:
        yield car
    finally:
        car.stop()
        shutil.rmtree(folder, ignore_errors=True)


def rejected(car: Sidecar) -> dict[str, float]:
    return {r: car.state.value("adamwatch_frames_rejected_total", {"reason": r}) for r in wire.REJECT_REASONS}


def connections(car: Sidecar) -> float:
    return car.state.value("adamwatch_sidecar_connections", {})


def connect(car: Sidecar) -> TrainerSocket:
    return TrainerSocket(str(car.ingest.endpoint))


def settle(car: Sidecar, baseline: float) -> None:
    """Wait until every test connection the sidecar saw has been closed and processed."""
    wait_for(lambda: connections(car) == baseline, timeout=5, what="connections to close")


def delta(before: dict, after: dict) -> dict:
    return {k: after[k] - before[k] for k in before if after[k] != before[k]}


def test_step_before_hello_is_unexpected_and_the_connection_lives_on(sidecar: Sidecar) -> None:
    base = connections(sidecar)
    before = rejected(sidecar)
    t = connect(sidecar)
    t.send(M.STEP, step_payload(1))
    t.send(M.HELLO, hello_payload(job="order", rank=0))
    t.send(M.HELLO, hello_payload(job="order", rank=0))  # a second HELLO on one connection
    t.send(M.STEP, step_payload(2))
    key = TrainerKey("order", 0)
    wait_for(lambda: sidecar.state.value("adamwatch_steps_total", {"job": "order", "rank": "0"}) == 1, what="step")
    assert delta(before, rejected(sidecar)) == {"unexpected": 2}
    assert sidecar.state.is_connected(key)
    t.close()
    settle(sidecar, base)
    assert not sidecar.state.is_connected(key)


def test_unknown_fields_are_tolerated_and_counted(sidecar: Sidecar) -> None:
    before = sidecar.state.value("adamwatch_frame_unknown_fields_total", {})
    t = connect(sidecar)
    t.send(M.HELLO, hello_payload(job="newer", future_field=1))
    t.send(M.STEP, step_payload(1, another_new_field="x"))
    wait_for(lambda: sidecar.state.value("adamwatch_steps_total", {"job": "newer", "rank": "0"}) == 1, what="step")
    assert sidecar.state.value("adamwatch_frame_unknown_fields_total", {}) == before + 2
    t.close()


def test_fatal_rejections_close_only_that_connection(sidecar: Sidecar) -> None:
    good = connect(sidecar)
    good.send(M.HELLO, hello_payload(job="bystander"))
    before = rejected(sidecar)
    bad = connect(sidecar)
    bad.send(M.HELLO, hello_payload(job="oversize"))
    bad.send_raw(wire.HEADER.pack(wire.MAGIC, wire.PROTOCOL_VERSION, int(M.STEP), MAX_FRAME + 1))
    assert bad.sock.recv(10) == b""  # the sidecar closed it
    good.send(M.STEP, step_payload(1))
    wait_for(lambda: sidecar.state.value("adamwatch_steps_total", {"job": "bystander", "rank": "0"}) == 1, what="step")
    assert delta(before, rejected(sidecar)) == {"oversized": 1}
    good.close()
    bad.close()


def test_a_hello_for_a_live_rank_is_refused_and_a_restart_after_it_closed_keeps_counters(sidecar: Sidecar) -> None:
    old = connect(sidecar)
    old.send(M.HELLO, hello_payload(job="phoenix", session="a"))
    old.send(M.STEP, step_payload(1))
    labels = {"job": "phoenix", "rank": "0"}
    wait_for(lambda: sidecar.state.value("adamwatch_steps_total", labels) == 1, what="first step")
    refused = {"reason": "rank_in_use"}
    before = sidecar.state.value("adamwatch_sidecar_connections_refused_total", refused)
    impostor = connect(sidecar)
    impostor.send(M.HELLO, hello_payload(job="phoenix", session="b"))
    assert impostor.sock.recv(10) == b""  # the impostor is closed, the holder is not
    assert sidecar.state.value("adamwatch_sidecar_connections_refused_total", refused) == before + 1
    old.send(M.STEP, step_payload(2))
    wait_for(lambda: sidecar.state.value("adamwatch_steps_total", labels) == 2, what="the holder's step")
    assert sidecar.state.describe(("phoenix", 0))["session"] == "a"
    old.close()
    wait_for(lambda: not sidecar.state.is_connected(("phoenix", 0)), what="the holder's close")
    new = connect(sidecar)  # the restarted trainer: admitted, counters kept
    new.send(M.HELLO, hello_payload(job="phoenix", session="c"))
    new.send(M.STEP, step_payload(3))
    wait_for(lambda: sidecar.state.value("adamwatch_steps_total", labels) == 3, what="the restart's step")
    assert sidecar.state.value("adamwatch_trainer_connected", labels) == 1
    new.close()
    impostor.close()


def test_send_command_from_another_thread(sidecar: Sidecar) -> None:
    t = connect(sidecar)
    t.send(M.HELLO, hello_payload(job="commanded", rank=2))
    key = TrainerKey("commanded", 2)
    wait_for(lambda: sidecar.state.is_connected(key), what="hello")
    result = []
    command = {"id": "c-1", "action": "reduce_lr", "args": {"factor": 0.5}, "reason": "test", "step": 3}
    worker = threading.Thread(target=lambda: result.append(sidecar.ingest.send_command(("commanded", 2), command)))
    worker.start()
    worker.join(5)
    assert result == [True]
    message = t.read_message()
    assert message.type is M.COMMAND and message.payload == command
    assert sidecar.ingest.send_command(("commanded", "2"), {**command, "id": "c-3"}) is True  # rank as text
    assert t.read_message().payload["id"] == "c-3"
    assert sidecar.ingest.send_command(TrainerKey("nobody", 0), command) is False
    with pytest.raises(ValueError, match="COMMAND.action"):
        sidecar.ingest.send_command(key, {"id": "c-2"})
    t.close()
    wait_for(lambda: not sidecar.state.is_connected(key), what="disconnect")
    assert sidecar.ingest.send_command(key, command) is False


def test_metrics_and_probes_over_http(sidecar: Sidecar) -> None:
    status, ctype, body = http_get(sidecar.metrics_server.url + "/metrics")
    assert status == 200 and ctype.startswith("text/plain; version=0.0.4")
    assert b"# TYPE adamwatch_frames_rejected_total counter" in body
    assert http_get(sidecar.metrics_server.url + "/healthz")[0] == 200
    assert http_get(sidecar.metrics_server.url + "/readyz")[0] == 200


def _sent_and_closed(car: Sidecar, data: bytes) -> dict[str, float]:
    base = connections(car)
    before = rejected(car)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(car.ingest.endpoint.path)
    # wait until the sidecar has accepted it, so that "back to baseline" below
    # means "closed and fully processed", not "not accepted yet"
    wait_for(lambda: connections(car) == base + 1, timeout=5, what="the connection to be accepted")
    try:
        sock.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the sidecar may close first after a fatal frame
    sock.close()
    settle(car, base)
    return delta(before, rejected(car))


def _expected_decoder_rejections(data: bytes) -> dict[str, int]:
    decoder = wire.FrameDecoder(MAX_FRAME)
    counts: dict[str, int] = {}
    for item in decoder.feed(data):
        if isinstance(item, wire.FrameError):
            counts[item.reason] = counts.get(item.reason, 0) + 1
    error = decoder.finish()
    if error is not None:
        counts[error.reason] = counts.get(error.reason, 0) + 1
    return counts


def _check_counts(got: dict[str, float], data: bytes) -> None:
    expected = _expected_decoder_rejections(data)
    # frame-level reasons are exactly the decoder's; schema/unexpected may add
    # rules above the wire schema (HELLO first, deep-statistics structure).
    for reason in ("bad_magic", "oversized", "truncated", "unsupported_version", "unknown_type", "malformed"):
        assert got.get(reason, 0) == expected.get(reason, 0), (reason, got, expected)
    assert got.get("schema", 0) >= expected.get("schema", 0)


def _valid_stream() -> bytes:
    return (wire.encode_frame(M.HELLO, hello_payload(job="fuzz"))
            + wire.encode_frame(M.STEP, step_payload(1))
            + wire.encode_frame(M.DROPPED, {"dropped_total": 1}))


FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(data=st.binary(max_size=3000))
def test_fuzz_arbitrary_bytes(sidecar: Sidecar, data: bytes) -> None:
    _check_counts(_sent_and_closed(sidecar, data), data)


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=8))
def test_fuzz_valid_frames_with_mutated_bytes(sidecar: Sidecar, edits) -> None:
    data = bytearray(_valid_stream())
    for position, byte in edits:
        data[position % len(data)] = byte
    _check_counts(_sent_and_closed(sidecar, bytes(data)), bytes(data))


@FUZZ
@given(version=st.integers(0, 255).filter(lambda v: v != wire.PROTOCOL_VERSION), type_code=st.integers(0, 255))
def test_fuzz_wrong_versions_are_skipped(sidecar: Sidecar, version: int, type_code: int) -> None:
    body = b'{"dropped_total": 1}'
    data = (wire.encode_frame(M.HELLO, hello_payload(job="fuzz"))
            + struct.pack(">2sBBI", wire.MAGIC, version, type_code, len(body)) + body)
    got = _sent_and_closed(sidecar, data)
    assert got == {"unsupported_version": 1}


@FUZZ
@given(cut=st.integers(1, 10_000))
def test_fuzz_truncated(sidecar: Sidecar, cut: int) -> None:
    stream = _valid_stream()
    data = stream[: cut % len(stream)] or stream[:1]
    got = _sent_and_closed(sidecar, data)
    hello = len(wire.encode_frame(M.HELLO, hello_payload(job="fuzz")))
    # a cut between whole frames truncates nothing (after the HELLO, or after the STEP)
    boundaries = {hello, hello + len(wire.encode_frame(M.STEP, step_payload(1)))}
    expected = {} if len(data) in boundaries else {"truncated": 1}
    assert got == expected


@FUZZ
@given(length=st.integers(MAX_FRAME + 1, 2**32 - 1), prefix=st.booleans())
def test_fuzz_oversized(sidecar: Sidecar, length: int, prefix: bool) -> None:
    data = (_valid_stream() if prefix else b"") + wire.HEADER.pack(wire.MAGIC, 1, int(M.STEP), length) + b"x" * 100
    assert _sent_and_closed(sidecar, data) == {"oversized": 1}


def test_the_sidecar_still_works_after_the_fuzzing(sidecar: Sidecar) -> None:
    t = connect(sidecar)
    t.send(M.HELLO, hello_payload(job="after-fuzz"))
    t.send(M.STEP, step_payload(5, loss=1.25))
    wait_for(lambda: sidecar.state.value("adamwatch_loss", {"job": "after-fuzz", "rank": "0"}) == 1.25, what="loss")
    assert http_get(sidecar.metrics_server.url + "/metrics")[0] == 200
    t.close()


def test_a_listener_can_command_a_trainer_as_soon_as_it_says_hello(sidecar: Sidecar) -> None:
    sent = []

    def greet(key, message):
        if message is not None and message.type is M.HELLO and key.job == "greeted":
            sent.append(sidecar.ingest.send_command(key, {"id": "g-1", "action": "set_guard", "args": {"on": True}}))

    sidecar.state.add_listener(greet)
    t = connect(sidecar)
    t.send(M.HELLO, hello_payload(job="greeted"))
    assert t.read_message().payload["id"] == "g-1"
    wait_for(lambda: sent == [True], what="send_command's result")  # appended after the write
    t.close()


def test_a_connection_without_hello_is_closed_after_the_hello_timeout(sidecar: Sidecar) -> None:
    import time

    sidecar.ingest.hello_timeout = 0.3
    silent = connect(sidecar)
    try:
        opened = time.monotonic()
        silent.sock.settimeout(5)
        assert silent.sock.recv(10) == b""  # closed by the sidecar, not by us
        assert time.monotonic() - opened >= 0.2
    finally:
        sidecar.ingest.hello_timeout = 60.0
        silent.close()


def test_huge_integers_are_rejected_and_cannot_break_metrics() -> None:
    """A 400-digit step or dropped count passes JSON but would break float() at scrape time."""
    from adamwatch import wire
    from adamwatch_sidecar.collector import RunStateCollector
    from adamwatch_sidecar.run_state import RunState

    state = RunState(retention_seconds=60, clock=lambda: 1000.0)
    key = state.hello("c1", hello_payload())
    for payload in (
        step_payload(step=1) | {"step": 10**400},
        step_payload(step=2) | {"lr": [10**400, 1e-3]},
        step_payload(step=3) | {"deep": [{"update_to_weight": 10**400}]},
    ):
        frame = wire.encode_frame(wire.MessageType.STEP, payload)
        (item,) = wire.FrameDecoder().feed(frame)
        if isinstance(item, wire.FrameError):
            assert item.reason == "schema"
            continue
        with pytest.raises(wire.SchemaError):
            state.apply(key, item)
    dropped = wire.encode_frame(wire.MessageType.DROPPED, {"dropped_total": 10**400})
    (item,) = wire.FrameDecoder().feed(dropped)
    assert isinstance(item, wire.FrameError) and item.reason == "schema"
    text = RunStateCollector(state).render_text().decode()
    assert 'adamwatch_trainer_connected{job="gpt",rank="0"} 1' in text
