"""STEP_PACKED: the binary STEP decodes into the very payload a JSON STEP gives, and bad ones are rejected.

Round trip over hypothesis-generated STEP payloads (NaN, ±inf, nulls, tails),
then malformed packed frames: at the decoder (a clear reason, never an
exception) and through a real sidecar (counted like every other rejection).
"""

from __future__ import annotations

import math
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adamwatch import wire

from .sidecar_testlib import hello_payload, http_get, step_payload, wait_for
from .test_ingest import FUZZ, MAX_FRAME, _check_counts, _sent_and_closed, connect, sidecar  # noqa: F401

M = wire.MessageType
HEAD = 86  # bytes of the packed head (wire.py "Packed STEP")


def same(a, b) -> bool:
    """Equality where NaN equals NaN, and types match (1 is not 1.0, True is not 1)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


floats = st.floats(allow_nan=True, allow_infinity=True)
ints = st.integers(-(2**63), 2**63 - 1)
float_or_int = st.one_of(floats, ints)  # "float" fields accept JSON integers too
deep_entry = st.fixed_dictionaries({
    "effective_lr": st.lists(floats, min_size=5, max_size=5),
    "update_size": st.lists(floats, min_size=5, max_size=5),
    "update_to_weight": floats, "exp_avg_norm": floats, "exp_avg_sq_norm": floats, "eps_dominated_ratio": floats,
})
text = st.text(max_size=20)


@st.composite
def step_payloads(draw) -> dict:
    groups = draw(st.integers(0, 12))
    payload = {
        "step": draw(ints), "time": draw(float_or_int), "duration_s": draw(st.none() | float_or_int),
        "grad_norm": draw(st.none() | floats),
        "group_grad_norms": draw(st.lists(st.none() | floats, min_size=groups, max_size=groups)),
        "grad_nonfinite": draw(st.booleans()),
        "lr": draw(st.lists(float_or_int, min_size=groups, max_size=groups)),
    }
    optional = {
        "loss": st.none() | float_or_int, "loss_nonfinite": st.booleans(), "skipped": st.booleans(),
        "skip_reason": st.none() | text, "samples": st.none() | ints, "tokens": st.none() | ints,
        "deep": st.none() | st.lists(deep_entry, max_size=3),
        "extras": st.none() | st.dictionaries(text, st.none() | floats, max_size=4),
        "clip_max_norm": st.none() | floats, "clip_coefficient": st.none() | floats,
        "a_newer_field": st.integers() | text,
    }
    for name, strategy in optional.items():
        if draw(st.booleans()):
            payload[name] = draw(strategy)
    return payload


def decode_one(frame: bytes) -> wire.Message | wire.FrameError:
    items = list(wire.FrameDecoder(max_frame_bytes=1 << 22).feed(frame))
    assert len(items) == 1
    return items[0]


@settings(max_examples=400, deadline=None)
@given(payload=step_payloads())
def test_packed_round_trip_gives_the_json_payload(payload: dict) -> None:
    packed = decode_one(wire.encode_step_packed(payload))
    as_json = decode_one(wire.encode_frame(M.STEP, payload))
    assert isinstance(packed, wire.Message), packed
    assert packed.type is M.STEP
    assert same(packed.payload, payload)
    assert same(packed.payload, as_json.payload)
    assert packed.unknown_fields == as_json.unknown_fields


def test_typical_step_is_all_binary_and_smaller_than_json() -> None:
    payload = step_payload(7, samples=32, tokens=4096)  # skip_reason None: a presence code, no tail
    frame = wire.encode_step_packed(payload)
    assert len(frame) == wire.HEADER.size + HEAD + 2 * 8 + 1 + 2 * 8  # no JSON tail at all
    assert len(frame) < len(wire.encode_frame(M.STEP, payload))
    with_reason = wire.encode_step_packed(step_payload(7, skipped=True, skip_reason="nonfinite_grad"))
    assert decode_one(with_reason).payload["skip_reason"] == "nonfinite_grad"


def _plain(step: int = 3, **extra) -> dict:
    """A STEP payload that packs without a JSON tail."""
    return step_payload(step, **extra)


def _body(payload: dict | None = None) -> bytearray:
    return bytearray(wire.encode_step_packed(payload or _plain())[wire.HEADER.size:])


def _frame(body: bytes | bytearray) -> bytes:
    return wire.HEADER.pack(wire.MAGIC, wire.PROTOCOL_VERSION, int(M.STEP_PACKED), len(body)) + bytes(body)


def _with(body: bytearray, offset: int, fmt: str, value) -> bytearray:
    struct.pack_into(fmt, body, offset, value)
    return body


BAD = {
    "empty": (b"", "malformed", "shorter than"),
    "short head": (bytes(_body()[:40]), "malformed", "shorter than"),
    "layout version 2": (_with(_body(), 0, "<B", 2), "unsupported_version", "layout version 2"),
    "reserved byte": (_with(_body(), 1, "<B", 1), "malformed", "reserved"),
    "more group norms than sent": (_with(_body(), 2, "<H", 3), "malformed", "declares 3 group norms"),
    "fewer lr than sent": (_with(_body(), 4, "<H", 1), "malformed", "1 lr values"),
    "tail longer than body": (_with(_body(), 10, "<I", 50), "malformed", "50-byte tail"),
    "extra byte": (_body() + b"\0", "malformed", "but the body has"),
    "presence beyond the slots": (_with(_body(), 6, "<I", 0xC0000000), "malformed", "reserved bits"),
    "skip_reason with a value code": (_with(_body(), 6, "<I", (struct.unpack_from("<I", _body(), 6)[0] & ~(3 << 28)) | (2 << 28)),
                                      "malformed", "skip_reason may only be marked null"),
    "code 3 for a float": (_with(_body(), 6, "<I", struct.unpack_from("<I", _body(), 6)[0] | (3 << 2)),
                          "malformed", "non-bool field time"),
    "null step": (_with(_body(), 6, "<I", (struct.unpack_from("<I", _body(), 6)[0] & ~3) | 1),
                  "schema", "STEP.step must not be null"),
    "no step": (_with(_body(), 6, "<I", struct.unpack_from("<I", _body(), 6)[0] & ~3), "schema", "STEP.step is required"),
    "tail not JSON": (_body(_plain(deep="x"))[:-3] + b"}}}", "malformed", "not valid UTF-8 JSON"),
    "tail not an object": (None, "malformed", "must be a JSON object"),
    "tail repeats a packed field": (None, "malformed", "repeats packed field 'step'"),
    "tail breaks the schema": (_body(_plain(deep="x")), "schema", "STEP.deep must be list[dict]"),
}


def _tail_body(tail: bytes) -> bytearray:
    body = _body()
    struct.pack_into("<I", body, 10, len(tail))
    return body + tail


BAD["tail not an object"] = (_tail_body(b"[1,2]"), *BAD["tail not an object"][1:])
BAD["tail repeats a packed field"] = (_tail_body(b'{"step":4}'), *BAD["tail repeats a packed field"][1:])


@pytest.mark.parametrize("case", sorted(BAD))
def test_malformed_packed_frames_are_rejected_with_a_reason(case: str) -> None:
    body, reason, words = BAD[case]
    item = decode_one(_frame(body))
    assert isinstance(item, wire.FrameError), item
    assert item.reason == reason and not item.fatal
    assert words in str(item)


@settings(max_examples=300, deadline=None)
@given(payload=step_payloads(), cut=st.integers(0, 10_000), edits=st.lists(
    st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=6))
def test_fuzz_packed_bodies_never_raise(payload: dict, cut: int, edits) -> None:
    body = _body(payload)
    body = body[: cut % (len(body) + 1)] if cut % 3 == 0 else body
    for position, byte in edits:
        if body:
            body[position % len(body)] = byte
    item = decode_one(_frame(body))
    assert isinstance(item, (wire.Message, wire.FrameError))
    if isinstance(item, wire.FrameError):
        assert item.reason in wire.REJECT_REASONS and not item.fatal


@pytest.mark.parametrize("case", sorted(BAD))
def test_the_sidecar_counts_malformed_packed_frames(sidecar, case: str) -> None:  # noqa: F811
    body, reason, _ = BAD[case]
    data = wire.encode_frame(M.HELLO, hello_payload(job="packed-bad")) + _frame(body)
    got = _sent_and_closed(sidecar, data)
    assert got == {reason: 1}


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=8))
def test_fuzz_packed_stream_through_the_sidecar(sidecar, edits) -> None:  # noqa: F811
    data = bytearray(wire.encode_frame(M.HELLO, hello_payload(job="packed-fuzz"))
                     + wire.encode_step_packed(step_payload(1, deep=None, extras={"x": 1.0})))
    for position, byte in edits:
        data[position % len(data)] = byte
    _check_counts(_sent_and_closed(sidecar, bytes(data)), bytes(data))


def test_a_packed_step_sets_the_same_metrics_as_json(sidecar) -> None:  # noqa: F811
    for job, encode in (("as-json", lambda p: wire.encode_frame(M.STEP, p)), ("as-packed", wire.encode_step_packed)):
        t = connect(sidecar)
        t.send(M.HELLO, hello_payload(job=job))
        t.send_raw(encode(step_payload(4, loss=float("nan"), loss_nonfinite=True, group_grad_norms=[None, 0.5])))
        wait_for(lambda job=job: sidecar.state.value("adamwatch_steps_total", {"job": job, "rank": "0"}) == 1,
                 what=f"{job} step")
        t.close()
        # The sidecar sees the close on its own loop; scrape only once it has, or
        # adamwatch_trainer_connected differs between the two jobs by timing alone.
        wait_for(lambda job=job: sidecar.state.value("adamwatch_trainer_connected", {"job": job, "rank": "0"}) == 0,
                 what=f"{job} disconnect")
    body = http_get(sidecar.metrics_server.url + "/metrics")[2].decode()

    def series(job: str) -> dict[str, str]:
        lines = [line.replace(f'job="{job}"', 'job="J"') for line in body.splitlines() if f'job="{job}"' in line]
        return dict(line.rsplit(" ", 1) for line in lines if "seen" not in line and "timestamp" not in line)

    as_json, as_packed = series("as-json"), series("as-packed")
    assert len(as_json) > 10
    assert as_packed == as_json
    assert any(k.startswith("adamwatch_nonfinite_steps_total") and v == "1.0" for k, v in as_packed.items())
