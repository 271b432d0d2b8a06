"""Hypothesis drives whole frame SEQUENCES (not single frames) against a running sidecar; after every
sequence /metrics answers 200 with an exposition prometheus_client parses (issue 10)."""

from __future__ import annotations

import json
import pathlib
import shutil
import socket
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from adamwatch import wire
from adamwatch_sidecar.config import build_config
from adamwatch_sidecar.server import Sidecar
from .sidecar_testlib import deep_entry, hello_payload, http_get, step_payload

M = wire.MessageType

texts = st.one_of(st.text(max_size=20), st.sampled_from(["\ud800", "a\udfffb", "\n\"\\", "x" * 300, ""]))
numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-(2**63), 2**63 - 1))


def _hello() -> st.SearchStrategy:
    return st.builds(lambda job, rank, world, groups, host, session: (M.HELLO, hello_payload(
        job=job, rank=rank, world_size=world, groups=groups, host=host, session=session)),
        texts, st.integers(-2, 6), st.integers(0, 6),
        st.lists(texts, max_size=4), texts, texts)


def _step() -> st.SearchStrategy:
    return st.builds(lambda step, t, loss, norm, reason, deep: (M.STEP, step_payload(
        step, time=t, loss=loss, grad_norm=norm, skipped=reason is not None, skip_reason=reason,
        deep=[deep_entry(deep)] * 2 if deep is not None else None)),
        st.integers(-5, 2**40), numbers, numbers, numbers, st.none() | texts, st.none() | numbers)


def _other() -> st.SearchStrategy:
    return st.one_of(
        st.builds(lambda n: (M.DROPPED, {"dropped_total": n}), st.integers(-5, 2**62)),
        st.builds(lambda e, s, t: (M.CHECKPOINT, {"event": e, "step": s, "time": t}),
                  st.sampled_from(list(wire.CHECKPOINT_EVENTS)) | texts, st.integers(-5, 100), numbers),
        st.builds(lambda i, o: (M.ACK, {"id": i, "action": "reduce_lr", "outcome": o, "step": 1}), texts, texts),
        st.just((M.GOODBYE, {"reason": "done"})),
    )


def _frame(item) -> bytes:
    # ensure_ascii: a lone surrogate travels as a JSON escape, as a hostile peer would send it
    kind, payload = item
    body = json.dumps(payload, ensure_ascii=True, allow_nan=True).encode()
    return wire.HEADER.pack(wire.MAGIC, wire.PROTOCOL_VERSION, int(kind), len(body)) + body


garbage = st.one_of(st.binary(max_size=64), st.just(wire.HEADER.pack(wire.MAGIC, 1, int(M.STEP), 100)))
connection = st.lists(st.one_of(_hello().map(_frame), _step().map(_frame), _other().map(_frame), garbage),
                      min_size=1, max_size=12)


@pytest.fixture(scope="module")
def sidecar():
    folder = pathlib.Path(tempfile.mkdtemp(prefix="aw-seq-", dir="/tmp"))
    cfg = build_config(overrides={"listen": f"unix://{folder}/s/adamwatch.sock", "metrics_address": "127.0.0.1:0",
                                  "max_frame_bytes": 65536, "retention_seconds": 300})
    car = Sidecar(cfg)
    car.start()
    try:
        yield car
    finally:
        car.stop()
        shutil.rmtree(folder, ignore_errors=True)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(st.lists(connection, min_size=1, max_size=3))
def test_metrics_stay_valid_after_every_frame_sequence(sidecar: Sidecar, connections) -> None:
    socks = []
    for frames in connections:
        s = socket.socket(socket.AF_UNIX)
        s.connect(sidecar.ingest.endpoint.path)
        try:
            s.sendall(b"".join(frames))
        except OSError:
            pass  # closed by the sidecar part-way (a fatal frame): fine
        socks.append(s)
    status, _, body = http_get(sidecar.metrics_server.url + "/metrics", timeout=10)
    assert status == 200, body[:500]
    families = list(text_string_to_metric_families(body.decode("utf-8")))
    assert any(f.name == "adamwatch_sidecar_connections" for f in families)
    for s in socks:
        s.close()
