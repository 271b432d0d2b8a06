"""The wire contract between a trainer and its sidecar: frames and message schemas.

This module is the single source of truth for what travels over the socket. Both
sides import it; it depends on the standard library only, so the sidecar can use
it without torch.

A frame is a fixed 8-byte header followed by a JSON payload::

    offset  size  field
    0       2     magic b"AW"          (lets the reader detect a desynchronised stream)
    2       1     protocol version     (PROTOCOL_VERSION)
    3       1     message type         (MessageType)
    4       4     payload length, big-endian unsigned

The payload is a UTF-8 JSON object whose fields are declared in SCHEMAS. NaN and
±Infinity travel as the JSON extensions ``NaN``/``Infinity`` because a non-finite
loss is exactly what we must be able to report.

    >>> frame = encode_frame(MessageType.DROPPED, {"dropped_total": 3})
    >>> decoder = FrameDecoder()
    >>> [(m.type.name, m.payload) for m in decoder.feed(frame)]
    [('DROPPED', {'dropped_total': 3})]
"""

from __future__ import annotations

import enum
import json
import struct
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Optional

__all__ = [
    "PROTOCOL_VERSION",
    "MAGIC",
    "HEADER",
    "DEFAULT_MAX_FRAME_BYTES",
    "QUANTILES",
    "MessageType",
    "Field",
    "SCHEMAS",
    "Message",
    "FrameError",
    "SchemaError",
    "FrameDecoder",
    "encode_frame",
    "validate_payload",
    "Endpoint",
    "parse_endpoint",
    "ENDPOINT_ENV",
    "REJECT_REASONS",
    "CHECKPOINT_EVENTS",
    "EXIT_REASONS",
    "MAX_EVAL_METRICS",
    "SECRET_FILE_ENV",
    "valid_text",
    "STEP_PACKED_VERSION",
    "STEP_ENCODINGS",
    "encode_step_packed",
    "decode_step_packed",
]

PROTOCOL_VERSION = 1
MAGIC = b"AW"
HEADER = struct.Struct(">2sBBI")
DEFAULT_MAX_FRAME_BYTES = 1 << 20
ENDPOINT_ENV = "ADAMWATCH_ENDPOINT"
# File holding the shared secret a HELLO carries when the sidecar requires one.
SECRET_FILE_ENV = "ADAMWATCH_SECRET_FILE"

# Quantiles reported for the sampled per-coordinate distributions (effective
# learning rate, update size). Fixed here so both sides agree on their order.
QUANTILES: tuple[float, ...] = (0.01, 0.1, 0.5, 0.9, 0.99)

# Every reason a frame can be rejected for; the sidecar counts rejections by
# these exact strings (adamwatch_frames_rejected_total{reason}).
REJECT_REASONS: tuple[str, ...] = (
    "bad_magic",  # header does not start with MAGIC: stream lost, connection closed
    "oversized",  # declared length above the limit: connection closed
    "truncated",  # peer closed the connection mid-frame
    "unsupported_version",  # header version we do not speak: frame skipped
    "unknown_type",  # message type code we do not know: frame skipped
    "malformed",  # payload is not a UTF-8 JSON object: frame skipped
    "schema",  # payload violates the message schema: frame skipped
    "unexpected",  # valid message that is not allowed now (e.g. STEP before HELLO)
)


# Every CHECKPOINT.event a trainer sends (adamwatch.checkpoint emits exactly
# these). A sidecar ignores kinds it does not know: a newer trainer may add some.
CHECKPOINT_EVENTS: tuple[str, ...] = (
    "saved",  # a checkpoint was written (duration_s, size_bytes)
    "save_failed",  # save() raised CheckpointSaveError; nothing of it was kept (duration_s)
    "known_good",  # a checkpoint was proven good by the healthy steps around it
    "restored",  # a restore put a checkpoint's state back (duration_s, size_bytes)
    "restore_failed",  # restore() found nothing usable; the live state is unchanged (duration_s)
    "corrupt",  # a checkpoint was found corrupt or invalid and skipped (detail says why)
)


# Every GOODBYE.exit_reason a trainer sends (adamwatch.exits classifies), plus
# "vanished", which only the sidecar assigns: the connection closed without a GOODBYE.
EXIT_REASONS: tuple[str, ...] = (
    "clean",  # the run closed its Monitor normally (or left its ``with`` block)
    "exception",  # an uncaught exception ended the run (GOODBYE.exception names its type)
    "oom",  # torch.OutOfMemoryError (device out of memory)
    "preemption",  # SIGTERM: the scheduler took the node back
    "signal",  # another fatal signal (SIGINT, SIGHUP, ...; GOODBYE.signal names it)
    "vanished",  # sidecar-side only: the trainer disappeared without a word (SIGKILL, segfault)
)

# An EVAL message carries at most this many named values (label cardinality).
MAX_EVAL_METRICS = 32


class MessageType(enum.IntEnum):
    """Message type codes carried in the frame header."""

    HELLO = 1  # trainer → sidecar, first frame of every connection
    STEP = 2  # trainer → sidecar, one per optimizer step
    DROPPED = 3  # trainer → sidecar, cumulative count of summaries it had to drop
    CHECKPOINT = 4  # trainer → sidecar, a checkpoint was saved/marked good/restored
    ACK = 5  # trainer → sidecar, a command took effect (or failed) at a step
    GOODBYE = 6  # trainer → sidecar, clean shutdown: the run ended, not crashed
    COMMAND = 7  # sidecar → trainer, a remediation action to apply at a step boundary
    EVAL = 8  # trainer → sidecar, evaluation results (validation loss, scores) at a step
    FOOTPRINT = 9  # trainer → sidecar, bytes of parameters and optimizer state, device memory
    CONFIG = 10  # trainer → sidecar, the optimizer's configuration changed mid-run (not by adamwatch)
    FINGERPRINT = 11  # trainer → sidecar, replica fingerprint of params and Adam state at a step
    MONITOR_ERRORS = 12  # trainer → sidecar, cumulative failures inside the monitor, by where
    STEP_PACKED = 13  # trainer → sidecar, a STEP in the compact binary layout (see "Packed STEP" below)


@dataclass(frozen=True)
class Field:
    """One field of a message schema.

    Args:
        kind: one of "int", "float", "str", "bool", "list[float]", "list[str]",
            "list[float|null]", "dict", "list[dict]", "any".
        required: the field must be present.
        nullable: ``None`` is accepted.
    """

    kind: str
    required: bool = True
    nullable: bool = False


def _f(kind: str, required: bool = True, nullable: bool = False) -> Field:
    return Field(kind, required, nullable)


# Message schemas. Unknown fields are tolerated (a newer trainer may add
# optional fields within a protocol version) and reported to the caller;
# missing required fields and wrong types are schema errors.
SCHEMAS: dict[MessageType, dict[str, Field]] = {
    MessageType.HELLO: {
        "job": _f("str"),
        "rank": _f("int"),
        "world_size": _f("int"),
        "host": _f("str"),
        "pid": _f("int"),
        "session": _f("str"),  # random per Monitor: tells a reconnect from a restart
        "adamwatch_version": _f("str"),
        "torch_version": _f("str", required=False),
        # {"kind": "Adam"|"AdamW"|the class name of any other torch optimizer ("SGD", ...),
        #  "implementation": "for-loop"|"foreach"|"fused",
        #  "betas": [b1, b2], "eps": f, "amsgrad": bool (each only where the optimizer has it),
        #  "weight_decay": f,
        #  "param_groups": [names], "device": "cpu"|"cuda"|...}
        "optimizer": _f("dict"),
        "deep_stats_every": _f("int", required=False),
        "dropped_total": _f("int", required=False),
        # The full optimizer configuration (adamwatch.optimizer_config.capture_config),
        # its fingerprint, the features policy can require ({"checkpointer": bool,
        # "guard": bool, "deep_stats": bool}) and adamwatch's learning-rate scale.
        "config": _f("dict", required=False),
        "config_hash": _f("str", required=False),
        "features": _f("dict", required=False),
        "lr_scale": _f("float", required=False, nullable=True),
        # seconds the trainer waits for the sidecar's policy verdict (0: it does not wait)
        "policy_wait_s": _f("float", required=False),
        # the model family this run belongs to (executive dashboard), free text
        "model_family": _f("str", required=False, nullable=True),
        # convergence targets: {"eval_loss": 1.6} (eval metric "loss") or {"loss": 1.2} (training loss)
        "target": _f("dict", required=False, nullable=True),
        # the sidecar's shared secret (secret_file), when it requires one; never stored
        "secret": _f("str", required=False),
        # failures inside the monitor so far this session, {where: count} (as MONITOR_ERRORS)
        "monitor_errors": _f("dict", required=False),
        # how this trainer sends its STEPs: one of STEP_ENCODINGS (absent from older trainers: "json")
        "step_encoding": _f("str", required=False),
    },
    MessageType.STEP: {
        "step": _f("int"),  # optimizer step index as the trainer counts it (1-based)
        "time": _f("float"),  # unix seconds when the step finished
        "duration_s": _f("float", nullable=True),  # since the previous step finished
        "loss": _f("float", required=False, nullable=True),
        "loss_nonfinite": _f("bool", required=False),
        "grad_norm": _f("float", nullable=True),  # global L2 norm (unscaled, before clipping)
        "group_grad_norms": _f("list[float|null]"),
        "grad_nonfinite": _f("bool"),
        "lr": _f("list[float]"),  # scheduled lr per param group
        "skipped": _f("bool", required=False),  # the update was not applied
        "skip_reason": _f("str", required=False, nullable=True),
        "samples": _f("int", required=False, nullable=True),
        "tokens": _f("int", required=False, nullable=True),
        # Deep statistics, every N steps. One entry per param group:
        # {"effective_lr": [per QUANTILES], "update_size": [per QUANTILES],
        #  "update_to_weight": f, "exp_avg_norm": f, "exp_avg_sq_norm": f,
        #  "eps_dominated_ratio": f}
        "deep": _f("list[dict]", required=False, nullable=True),
        # Step extensions' numbers (adamwatch.step_extensions.StepContext.add_extra):
        # {name: float|null}, at most 64 names of at most 64 characters.
        "extras": _f("dict", required=False, nullable=True),
        # Gradient clipping seen this step (adamwatch.grad_clip): the max_norm it
        # clipped to and the factor min(1, max_norm/(pre-clip norm + 1e-6)) it
        # applied; absent when the step was not clipped. grad_norm is pre-clip.
        "clip_max_norm": _f("float", required=False, nullable=True),
        "clip_coefficient": _f("float", required=False, nullable=True),
    },
    MessageType.DROPPED: {
        "dropped_total": _f("int"),
    },
    MessageType.CHECKPOINT: {
        "event": _f("str"),  # one of CHECKPOINT_EVENTS
        "step": _f("int"),  # the checkpoint's step (restore_failed: the step asked for, see Checkpointer)
        "time": _f("float"),  # unix seconds of the event
        "path": _f("str", required=False, nullable=True),
        "detail": _f("str", required=False, nullable=True),
        # seconds the save or restore took (saved, save_failed, restored, restore_failed)
        "duration_s": _f("float", required=False, nullable=True),
        # bytes of the checkpoint's data files (saved, restored)
        "size_bytes": _f("int", required=False, nullable=True),
        # restored: adamwatch's learning-rate scale in force after the restore
        "lr_scale": _f("float", required=False, nullable=True),
    },
    MessageType.ACK: {
        "id": _f("str"),
        "action": _f("str"),
        "outcome": _f("str"),  # "applied" | "failed" | "rejected"
        "step": _f("int", nullable=True),  # the step boundary at which it took effect
        "detail": _f("str", required=False, nullable=True),
        # cumulative learning-rate factor in force after the action (1 = untouched)
        "lr_scale": _f("float", required=False, nullable=True),
        # who asked: "sidecar" (a COMMAND), "local" (monitor.reduce_lr() etc. in the
        # training script), "recovery" (the trainer's LR recovery)
        "source": _f("str", required=False, nullable=True),
    },
    MessageType.CONFIG: {
        # the step at whose end the change was seen: with the default check every
        # step, the first step that ran with the new configuration
        "step": _f("int"),
        "time": _f("float"),
        "config": _f("dict"),  # the new configuration (adamwatch.optimizer_config.capture_config)
        "config_hash": _f("str"),
        "previous_hash": _f("str", nullable=True),
        "changed": _f("list[str]"),  # one line per differing field, "path: old -> new"
    },
    MessageType.GOODBYE: {
        "reason": _f("str", required=False, nullable=True),
        "step": _f("int", required=False, nullable=True),
        # how the run ended: one of EXIT_REASONS (absent from older trainers: "clean")
        "exit_reason": _f("str", required=False, nullable=True),
        "exception": _f("str", required=False, nullable=True),  # exception type name
        "signal": _f("str", required=False, nullable=True),  # signal name, e.g. "SIGTERM"
    },
    MessageType.FINGERPRINT: {
        "step": _f("int"),  # the step after which it was computed (the STEP with the same number)
        # integer in [0, 2^52) from the bit patterns of params, m, v, step (adamwatch.fingerprint):
        # data-parallel replicas at the same step must send the same value
        "fingerprint": _f("int"),
    },
    MessageType.MONITOR_ERRORS: {
        # {where: count}: failures inside the trainer's monitor (a summary that
        # could not be computed, the reader thread, an extension...), cumulative
        # per session (HELLO.session); sent when they change. At most 32 names.
        "errors": _f("dict"),
    },
    MessageType.COMMAND: {
        "id": _f("str"),
        # "reduce_lr" | "restore_checkpoint" | "stop" (adamwatch.remediation.ACTION_KINDS)
        "action": _f("str"),
        "args": _f("dict", required=False),
        "reason": _f("str", required=False, nullable=True),
        "step": _f("int", required=False, nullable=True),  # the step that triggered it
    },
    MessageType.EVAL: {
        "step": _f("int"),  # the optimizer step the evaluation belongs to
        "time": _f("float"),  # unix seconds when it was observed
        # name -> value (null: not a number); at most MAX_EVAL_METRICS entries
        "metrics": _f("dict"),
    },
    MessageType.FOOTPRINT: {
        "time": _f("float"),
        # dtype name ("float32", "bfloat16", ...) -> bytes on this rank
        "param_bytes": _f("dict"),
        "optimizer_state_bytes": _f("dict"),
        "device": _f("str", required=False, nullable=True),  # "cpu", "cuda", ...
        # CUDA caching allocator's statistics (host-side counters, no sync); absent on CPU
        "device_memory_peak_bytes": _f("int", required=False, nullable=True),
        "device_memory_reserved_bytes": _f("int", required=False, nullable=True),
    },
}


# A STEP_PACKED frame decodes into exactly the payload of a STEP: same schema.
SCHEMAS[MessageType.STEP_PACKED] = SCHEMAS[MessageType.STEP]


class FrameError(ValueError):
    """A frame could not be decoded. ``reason`` is one of REJECT_REASONS.

    ``fatal`` means the byte stream cannot be resynchronised and the connection
    must be closed.
    """

    def __init__(self, reason: str, message: str, *, fatal: bool = False):
        super().__init__(message)
        self.reason = reason
        self.fatal = fatal


class SchemaError(FrameError):
    """A well-formed payload that violates its message schema."""

    def __init__(self, message: str):
        super().__init__("schema", message, fatal=False)


@dataclass
class Message:
    """A decoded, validated message."""

    type: MessageType
    payload: dict[str, Any]
    unknown_fields: tuple[str, ...] = field(default=())


# JSON integers are unbounded in Python; a 400-digit "step" would later fail
# float() at scrape time. Integers must fit in 64 bits.
_INT_MIN, _INT_MAX = -(2**63), 2**63 - 1


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and _INT_MIN <= value <= _INT_MAX


def _check(kind: str, value: Any) -> bool:
    if kind == "int":
        return _is_int(value)
    if kind == "float":
        return isinstance(value, float) or _is_int(value)
    if kind == "str":
        return isinstance(value, str)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "dict":
        return isinstance(value, dict)
    if kind == "list[float]":
        return isinstance(value, list) and all(isinstance(v, float) or _is_int(v) for v in value)
    if kind == "list[float|null]":
        return isinstance(value, list) and all(v is None or isinstance(v, float) or _is_int(v) for v in value)
    if kind == "list[str]":
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if kind == "list[dict]":
        return isinstance(value, list) and all(isinstance(v, dict) for v in value)
    if kind == "any":
        return True
    raise AssertionError(f"unknown field kind {kind!r}")


def validate_payload(msg_type: MessageType, payload: Any) -> tuple[str, ...]:
    """Check ``payload`` against the schema of ``msg_type``.

    Args:
        msg_type: the message type the payload claims to be.
        payload: the decoded JSON value.

    Returns:
        The names of fields the schema does not know (tolerated).

    Raises:
        SchemaError: naming the first field that is missing or of the wrong type.
    """
    if not isinstance(payload, dict):
        raise SchemaError(f"{msg_type.name} payload must be a JSON object, got {type(payload).__name__}")
    schema = SCHEMAS[msg_type]
    for name, spec in schema.items():
        if name not in payload:
            if spec.required:
                raise SchemaError(f"{msg_type.name}.{name} is required")
            continue
        value = payload[name]
        if value is None:
            if not spec.nullable:
                raise SchemaError(f"{msg_type.name}.{name} must not be null")
            continue
        if not _check(spec.kind, value):
            raise SchemaError(
                f"{msg_type.name}.{name} must be {spec.kind}, got {type(value).__name__}"
            )
    if len(payload) > len(schema) or any(k not in schema for k in payload):
        return tuple(k for k in payload if k not in schema)
    return ()


_dumps = json.JSONEncoder(allow_nan=True, separators=(",", ":"), ensure_ascii=False).encode


def encode_frame(msg_type: MessageType, payload: Mapping[str, Any], *, validate: bool = False) -> bytes:
    """Serialise one message into a frame.

    Args:
        msg_type: the message type.
        payload: a JSON-serialisable mapping following SCHEMAS[msg_type].
        validate: check the payload against the schema first (tests, commands).

    Returns:
        The frame bytes, header included.
    """
    if validate:
        validate_payload(msg_type, dict(payload))
    body = _dumps(payload).encode("utf-8")
    return HEADER.pack(MAGIC, PROTOCOL_VERSION, int(msg_type), len(body)) + body


_loads = json.JSONDecoder().decode
_TYPES = {int(t): t for t in MessageType}


class FrameDecoder:
    """Incremental decoder: feed it bytes as they arrive, get messages out.

    Rejected frames do not stop the decoder unless they are fatal: ``feed``
    yields a FrameError in place of the message and carries on with the next
    frame. After a fatal error the decoder refuses further input.

    Args:
        max_frame_bytes: largest payload accepted; larger ones are fatal because
            skipping them would let a peer make us buffer without bound.
    """

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES):
        self.max_frame_bytes = max_frame_bytes
        self._buf = bytearray()
        self._pos = 0
        self.failed: FrameError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet consumed (a partial frame)."""
        return len(self._buf) - self._pos

    def feed(self, data: bytes) -> Iterator[Message | FrameError]:
        """Add bytes and yield every complete message (or rejection) they finish."""
        if self.failed is not None:
            return
        self._buf += data
        buf = self._buf
        header_size = HEADER.size
        while True:
            pos = self._pos
            if len(buf) - pos < header_size:
                break
            magic, version, type_code, length = HEADER.unpack_from(buf, pos)
            if magic != MAGIC:
                self.failed = FrameError(
                    "bad_magic", f"frame header starts with {bytes(magic)!r}, expected {MAGIC!r}", fatal=True
                )
                yield self.failed
                return
            if length > self.max_frame_bytes:
                self.failed = FrameError(
                    "oversized", f"frame of {length} bytes exceeds the {self.max_frame_bytes}-byte limit", fatal=True
                )
                yield self.failed
                return
            end = pos + header_size + length
            if len(buf) < end:
                break
            body = bytes(buf[pos + header_size : end])
            self._pos = end
            yield self._decode(version, type_code, body)
        # Compact once the consumed prefix dominates, not on every frame.
        if self._pos and self._pos * 2 >= len(buf):
            del buf[: self._pos]
            self._pos = 0

    def finish(self) -> FrameError | None:
        """Call at end of stream: reports a frame cut off by the peer."""
        if self.failed is None and self.buffered:
            self.failed = FrameError(
                "truncated", f"connection closed with {self.buffered} bytes of an incomplete frame", fatal=True
            )
            return self.failed
        return None

    @staticmethod
    def _decode(version: int, type_code: int, body: bytes) -> Message | FrameError:
        if version != PROTOCOL_VERSION:
            return FrameError("unsupported_version", f"protocol version {version} is not supported (speak {PROTOCOL_VERSION})")
        msg_type = _TYPES.get(type_code)
        if msg_type is None:
            return FrameError("unknown_type", f"unknown message type code {type_code}")
        if msg_type is MessageType.STEP_PACKED:
            return decode_step_packed(body)
        try:
            payload = _loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            return FrameError("malformed", f"{msg_type.name} payload is not valid UTF-8 JSON: {exc}")
        if b"\\ud" in body or b"\\uD" in body:
            # JSON may escape a lone UTF-16 surrogate, which no UTF-8 text can
            # hold: it would make every later /metrics render fail.
            payload = valid_text(payload)
        try:
            unknown = validate_payload(msg_type, payload)
        except SchemaError as exc:
            return exc
        return Message(msg_type, payload, unknown)


def valid_text(value: Any) -> Any:
    """``value`` with every lone surrogate in its strings (keys too) replaced by U+FFFD.

    >>> valid_text({"job": "a\\ud800b"})
    {'job': 'a\ufffdb'}
    """
    if isinstance(value, str):
        try:
            value.encode("utf-8")
            return value
        except UnicodeEncodeError:
            return "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in value)
    if isinstance(value, list):
        return [valid_text(v) for v in value]
    if isinstance(value, dict):
        return {valid_text(k): valid_text(v) for k, v in value.items()}
    return value


# ---------------------------------------------------------------- packed STEP
#
# STEP_PACKED (type 13) carries the payload of a STEP in a compact binary
# layout: the trainer encodes one per optimizer step and the sidecar ingests
# tens of thousands per second, so neither should pay for JSON text. It
# decodes into exactly the dict a JSON STEP would have given (a
# ``Message`` of type STEP), so nothing past the decoder knows the difference.
# The body (all little-endian) is::
#
#     offset  size  field
#     0       1     packed layout version (STEP_PACKED_VERSION); others are rejected
#     1       1     reserved, 0
#     2       2     G: number of group_grad_norms values (uint16)
#     4       2     L: number of lr values (uint16)
#     6       4     presence word: 2 bits per slot of _PACKED_SLOTS, slot i at bits 2i..2i+1:
#                   0 absent (or carried in the tail), 1 null, 2 a value (False for a bool),
#                   3 True (bools only). Slots 0..14: step, time, duration_s, loss,
#                   loss_nonfinite, grad_norm, group_grad_norms, grad_nonfinite, lr, skipped,
#                   samples, tokens, clip_max_norm, clip_coefficient, skip_reason (null
#                   only: a reason's text travels in the tail)
#     10      4     T: bytes of the JSON tail (uint32)
#     14      8     step (int64)
#     22      8     time (float64)
#     30      8     duration_s (float64)
#     38      8     loss (float64)
#     46      8     grad_norm (float64)
#     54      8     samples (int64)
#     62      8     tokens (int64)
#     70      8     clip_max_norm (float64)
#     78      8     clip_coefficient (float64)
#     86      8*G   group_grad_norms (float64; 0.0 where null)
#     ...     ⌈G/8⌉ null bitmap of group_grad_norms (bit i of byte i//8: value i is null)
#     ...     8*L   lr (float64)
#     ...     T     JSON tail: a UTF-8 JSON object with every other field (deep, extras,
#                   skip_reason, unknown fields) and any slot value the layout cannot hold
#                   exactly (an int where a float is expected, ...); absent when T = 0
#
# A scalar slot whose presence code is not 2 holds 0 and is ignored. The body
# length must be exactly what the counts declare. Every violation is a rejected
# frame: "unsupported_version" for another layout version, "malformed" for a
# bad length, code or tail, "schema" for a required field missing or null.
# NaN and ±inf travel as float64 bits; a null inside group_grad_norms as its bitmap bit.

STEP_PACKED_VERSION = 1
# Which encoding a trainer sends its STEPs in (HELLO.step_encoding, MonitorConfig.step_encoding).
STEP_ENCODINGS: tuple[str, ...] = ("packed", "json")

_PACKED_HEAD = struct.Struct("<BBHHII qddddqqdd".replace(" ", ""))
# slot name, kind: "int" (int64 in the head), "float" (float64 in the head),
# "bool" (the presence code itself), "list" (array after the head)
_PACKED_SLOTS: tuple[tuple[str, str], ...] = (
    ("step", "int"), ("time", "float"), ("duration_s", "float"), ("loss", "float"),
    ("loss_nonfinite", "bool"), ("grad_norm", "float"), ("group_grad_norms", "list"),
    ("grad_nonfinite", "bool"), ("lr", "list"), ("skipped", "bool"), ("samples", "int"),
    ("tokens", "int"), ("clip_max_norm", "float"), ("clip_coefficient", "float"),
    ("skip_reason", "null"),
)
_PACKED_NAMES = frozenset(name for name, _ in _PACKED_SLOTS)
# slot -> position of its value in the unpacked head tuple (scalars only)
_HEAD_INDEX = {"step": 6, "time": 7, "duration_s": 8, "loss": 9, "grad_norm": 10, "samples": 11,
               "tokens": 12, "clip_max_norm": 13, "clip_coefficient": 14}
_SLOT_BITS = (1 << (2 * len(_PACKED_SLOTS))) - 1
_LO = int("01" * len(_PACKED_SLOTS), 2)  # the low bit of every slot


def _slot_mask(pred) -> int:
    return sum(1 << (2 * i) for i, (name, kind) in enumerate(_PACKED_SLOTS) if pred(name, kind))


_STEP_SCHEMA = SCHEMAS[MessageType.STEP]
_NOT_BOOL = _slot_mask(lambda n, k: k != "bool")
_ONLY_NULL = _slot_mask(lambda n, k: k == "null")
_NOT_NULLABLE = _slot_mask(lambda n, k: not _STEP_SCHEMA[n].nullable)
_REQUIRED = _slot_mask(lambda n, k: _STEP_SCHEMA[n].required)
_MAX_LIST = 0xFFFF


def _float_list(value: Any, nulls: bool) -> bool:
    if type(value) is not list or len(value) > _MAX_LIST:
        return False
    if nulls:
        return all(type(v) is float or v is None for v in value)
    return all(type(v) is float for v in value)


_MISSING = object()
# (shift, name, kind, head index) per slot, for the encoder's loop
_ENCODE_SLOTS = tuple((2 * i, name, kind, _HEAD_INDEX.get(name, -1)) for i, (name, kind) in enumerate(_PACKED_SLOTS))
_FLOAT, _INT = float, int


def _with_null_bitmap(values: list) -> tuple[list, bytearray]:
    """group_grad_norms as packed: nulls become 0.0, and bit i of the bitmap marks value i null."""
    bitmap = bytearray((len(values) + 7) >> 3)
    if None not in values:
        return values, bitmap
    filled = []
    for j, v in enumerate(values):
        if v is None:
            bitmap[j >> 3] |= 1 << (j & 7)
            filled.append(0.0)
        else:
            filled.append(v)
    return filled, bitmap


def encode_step_packed(payload: Mapping[str, Any]) -> bytes:
    """Serialise a STEP payload into a STEP_PACKED frame (header included).

    Any field the binary layout cannot hold exactly goes into the JSON tail, so
    ``decode_step_packed`` gives back an equal dict for every payload.
    """
    presence = 0
    head = [STEP_PACKED_VERSION, 0, 0, 0, 0, 0, 0, 0.0, 0.0, 0.0, 0.0, 0, 0, 0.0, 0.0]
    ggn: list = []
    lr: list = []
    tail: dict[str, Any] = {}
    get = payload.get
    for shift, name, kind, index in _ENCODE_SLOTS:
        value = get(name, _MISSING)
        if value is _MISSING:
            continue
        if value is None:
            presence |= 1 << shift
            continue
        vtype = type(value)
        if kind == "float":
            if vtype is _FLOAT:
                head[index] = value
                presence |= 2 << shift
                continue
        elif kind == "bool":
            if vtype is bool:
                presence |= (3 if value else 2) << shift
                continue
        elif kind == "int":
            if vtype is _INT and _INT_MIN <= value <= _INT_MAX:
                head[index] = value
                presence |= 2 << shift
                continue
        elif kind == "list":
            if _float_list(value, nulls=name == "group_grad_norms"):
                if name == "lr":
                    lr = value
                else:
                    ggn = value
                presence |= 2 << shift
                continue
        tail[name] = value  # not exactly representable in the layout (or a skip reason's text)
    if len(payload) > len(tail) + (presence & _LO | (presence >> 1) & _LO).bit_count():
        for name, value in payload.items():
            if name not in _PACKED_NAMES:
                tail[name] = value
    n = len(ggn)
    ggn, bitmap = _with_null_bitmap(ggn)
    tail_bytes = _dumps(tail).encode("utf-8") if tail else b""
    head[2], head[3], head[4], head[5] = n, len(lr), presence, len(tail_bytes)
    body = b"".join((_PACKED_HEAD.pack(*head), _array(n).pack(*ggn), bitmap, _array(len(lr)).pack(*lr), tail_bytes))
    return HEADER.pack(MAGIC, PROTOCOL_VERSION, int(MessageType.STEP_PACKED), len(body)) + body


# The presence word of the usual step, built once: step, time, group_grad_norms,
# lr and skipped (false) present; skip_reason null; the other slots set per call.
_SLOT_SHIFT = {name: 2 * i for i, (name, _) in enumerate(_PACKED_SLOTS)}
_PLAIN_PRESENCE = (2 << _SLOT_SHIFT["step"] | 2 << _SLOT_SHIFT["time"] | 2 << _SLOT_SHIFT["group_grad_norms"]
                   | 2 << _SLOT_SHIFT["lr"] | 2 << _SLOT_SHIFT["skipped"] | 1 << _SLOT_SHIFT["skip_reason"])


def _nullable_float(value: Any) -> int:
    """Presence code of a nullable float slot: 1 null, 2 a float, 0 not representable as given."""
    return 1 if value is None else 2 if type(value) is float else 0


def _optional_int(value: Any) -> int | None:
    """Presence code of an optional int slot: 0 absent, 2 an int64, None not representable as given."""
    if value is None:
        return 0
    return 2 if type(value) is int and _INT_MIN <= value <= _INT_MAX else None


def encode_plain_step_packed(step: int, time: float, duration_s: float | None, loss: float | None,
                             grad_norm: float | None, group_grad_norms: list, grad_nonfinite: bool,
                             lr: list, samples: int | None, tokens: int | None) -> bytes | None:
    """``encode_step_packed`` for the usual step, from its fields rather than a dict.

    The usual step (applied, no deep block, extras, clip or fingerprint) is
    nearly every frame a trainer sends; its client thread holds the GIL while
    it encodes, so the dict and the per-slot loop are skipped. The bytes are
    exactly those of ``encode_step_packed`` for the same payload (tested).
    A ``loss`` of None means the step has no loss (the fields are left out).

    Returns:
        The frame, or None when a value does not fit the layout as given (the
        caller then builds the payload and calls ``encode_step_packed``).
    """
    if (type(step) is not int or type(time) is not float or not _INT_MIN <= step <= _INT_MAX
            or not _float_list(group_grad_norms, nulls=True) or not _float_list(lr, nulls=False)):
        return None
    d_code, g_code = _nullable_float(duration_s), _nullable_float(grad_norm)
    s_code, t_code = _optional_int(samples), _optional_int(tokens)
    if not (d_code and g_code) or s_code is None or t_code is None:
        return None
    presence = (_PLAIN_PRESENCE | (3 if grad_nonfinite else 2) << _SLOT_SHIFT["grad_nonfinite"]
                | d_code << _SLOT_SHIFT["duration_s"] | g_code << _SLOT_SHIFT["grad_norm"]
                | s_code << _SLOT_SHIFT["samples"] | t_code << _SLOT_SHIFT["tokens"])
    if loss is None:
        loss = 0.0
    elif type(loss) is float:
        presence |= 2 << _SLOT_SHIFT["loss"] | (2 if loss - loss == 0.0 else 3) << _SLOT_SHIFT["loss_nonfinite"]
    else:
        return None
    duration_s = duration_s if d_code == 2 else 0.0
    grad_norm = grad_norm if g_code == 2 else 0.0
    samples = samples if s_code else 0
    tokens = tokens if t_code else 0
    n = len(group_grad_norms)
    group_grad_norms, bitmap = _with_null_bitmap(group_grad_norms)
    body = b"".join((
        _PACKED_HEAD.pack(STEP_PACKED_VERSION, 0, n, len(lr), presence, 0, step, time, duration_s, loss,
                          grad_norm, samples, tokens, 0.0, 0.0),
        _array(n).pack(*group_grad_norms), bitmap, _array(len(lr)).pack(*lr),
    ))
    return HEADER.pack(MAGIC, PROTOCOL_VERSION, int(MessageType.STEP_PACKED), len(body)) + body


# presence word -> how to read it, computed once per distinct word (a trainer
# sends one or two): (names, indexes into head + extras, the rejection it
# implies or None, the required slots it leaves absent)
_PresencePlan = tuple[tuple[str, ...], tuple[int, ...], Optional[tuple[str, str]], int]
_PLANS: dict[int, _PresencePlan] = {}
_X_NONE, _X_FALSE, _X_TRUE, _X_GGN, _X_LR = range(15, 20)
_ARRAYS: dict[int, struct.Struct] = {}


def _first_slot(mask: int) -> str:
    for i, (name, _) in enumerate(_PACKED_SLOTS):
        if (mask >> (2 * i)) & 1:
            return name
    return "?"


def _plan(presence: int) -> _PresencePlan:
    lo = presence & _LO
    hi = (presence >> 1) & _LO
    error: tuple[str, str] | None = None
    if presence & ~_SLOT_BITS:
        error = ("malformed", f"STEP_PACKED presence word has reserved bits set ({presence:#x})")
    elif lo & hi & _NOT_BOOL:
        error = ("malformed", f"STEP_PACKED presence code 3 for non-bool field {_first_slot(lo & hi & _NOT_BOOL)}")
    elif hi & _ONLY_NULL:
        error = ("malformed", "STEP_PACKED skip_reason may only be marked null (its text travels in the tail)")
    elif lo & ~hi & _NOT_NULLABLE:
        error = ("schema", f"STEP.{_first_slot(lo & ~hi & _NOT_NULLABLE)} must not be null")
    names, idxs = [], []
    for i, (name, kind) in enumerate(_PACKED_SLOTS):
        code = (presence >> (2 * i)) & 3
        if not code:
            continue
        names.append(name)
        if code == 1:
            idxs.append(_X_NONE)
        elif kind == "bool":
            idxs.append(_X_TRUE if code == 3 else _X_FALSE)
        elif kind == "list":
            idxs.append(_X_GGN if name == "group_grad_norms" else _X_LR)
        else:
            idxs.append(_HEAD_INDEX.get(name, _X_NONE))
    if len(_PLANS) >= 256:  # a hostile peer could try every combination
        _PLANS.clear()
    plan = _PLANS[presence] = (tuple(names), tuple(idxs), error, ~(lo | hi) & _REQUIRED)
    return plan


def _array(count: int) -> struct.Struct:
    s = _ARRAYS.get(count)
    if s is None:
        if len(_ARRAYS) >= 64:
            _ARRAYS.clear()
        s = _ARRAYS[count] = struct.Struct(f"<{count}d")
    return s


_GGN_CODE_SHIFT, _LR_CODE_SHIFT = 12, 16  # slots 6 and 8


def decode_step_packed(body: bytes) -> Message | FrameError:
    """Decode the body of a STEP_PACKED frame into a STEP message, or the reason it is rejected."""
    size = _PACKED_HEAD.size
    if len(body) < size:
        return FrameError("malformed", f"STEP_PACKED body of {len(body)} bytes is shorter than its {size}-byte head")
    head = _PACKED_HEAD.unpack_from(body)
    version, reserved, n, n_lr, presence, tail_len = head[:6]
    if version != STEP_PACKED_VERSION:
        return FrameError("unsupported_version",
                          f"STEP_PACKED layout version {version} is not supported (speak {STEP_PACKED_VERSION})")
    if reserved:
        return FrameError("malformed", f"STEP_PACKED reserved byte is {reserved}, not 0")
    bitmap_len = (n + 7) >> 3
    expected = size + 8 * n + bitmap_len + 8 * n_lr + tail_len
    if len(body) != expected:
        return FrameError("malformed", f"STEP_PACKED declares {n} group norms, {n_lr} lr values and a "
                                       f"{tail_len}-byte tail ({expected} bytes) but the body has {len(body)}")
    names, idxs, error, missing = _PLANS.get(presence) or _plan(presence)
    if error is not None:
        reason, text = error
        return SchemaError(text) if reason == "schema" else FrameError(reason, text)
    if (n and (presence >> _GGN_CODE_SHIFT) & 3 != 2) or (n_lr and (presence >> _LR_CODE_SHIFT) & 3 != 2):
        return FrameError("malformed", "STEP_PACKED declares list values for a list it marks absent or null")
    pos = size
    if n:
        ggn = list(_array(n).unpack_from(body, pos))
        pos += 8 * n
        if body.count(0, pos, pos + bitmap_len) != bitmap_len:  # some group norm is null
            for j in range(n):
                if body[pos + (j >> 3)] >> (j & 7) & 1:
                    ggn[j] = None
        pos += bitmap_len
    else:
        ggn = []
    if n_lr:
        lr = list(_array(n_lr).unpack_from(body, pos))
        pos += 8 * n_lr
    else:
        lr = []
    values = head + (None, False, True, ggn, lr)
    payload = dict(zip(names, map(values.__getitem__, idxs)))
    if not tail_len:
        if missing:
            return SchemaError(f"STEP.{_first_slot(missing)} is required")
        return Message(MessageType.STEP, payload)
    raw = body[pos:]
    try:
        tail = _loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        return FrameError("malformed", f"STEP_PACKED tail is not valid UTF-8 JSON: {exc}")
    if not isinstance(tail, dict):
        return FrameError("malformed", f"STEP_PACKED tail must be a JSON object, got {type(tail).__name__}")
    if b"\\ud" in raw or b"\\uD" in raw:
        tail = valid_text(tail)
    clash = [k for k in tail if k in payload]
    if clash:
        return FrameError("malformed", f"STEP_PACKED tail repeats packed field {clash[0]!r}")
    # The packed slots are of their schema kind by construction: only the
    # tail's fields, and required fields neither packed nor in the tail, need checking.
    unknown = []
    for name, value in tail.items():
        spec = _STEP_SCHEMA.get(name)
        if spec is None:
            unknown.append(name)
        elif value is None:
            if not spec.nullable:
                return SchemaError(f"STEP.{name} must not be null")
        elif not _check(spec.kind, value):
            return SchemaError(f"STEP.{name} must be {spec.kind}, got {type(value).__name__}")
    if missing:
        for i, (name, _) in enumerate(_PACKED_SLOTS):
            if (missing >> (2 * i)) & 1 and name not in tail:
                return SchemaError(f"STEP.{name} is required")
    payload.update(tail)
    return Message(MessageType.STEP, payload, tuple(unknown))


@dataclass(frozen=True)
class Endpoint:
    """Where the sidecar listens: a Unix socket path or a loopback TCP port."""

    scheme: str  # "unix" or "tcp"
    path: str = ""
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        if self.scheme == "unix":
            return f"unix://{self.path}"
        return f"tcp://{self.host}:{self.port}"


def parse_endpoint(text: str) -> Endpoint:
    """Parse ``unix:///path/to.sock`` or ``tcp://HOST:PORT``.

    Raises:
        ValueError: naming what is wrong with the endpoint.
    """
    if not isinstance(text, str) or not text:
        raise ValueError("endpoint must be a non-empty string like unix:///run/adamwatch.sock or tcp://127.0.0.1:9409")
    if text.startswith("unix://"):
        path = text[len("unix://") :]
        if not path:
            raise ValueError(f"endpoint {text!r}: unix:// needs a socket path")
        return Endpoint("unix", path=path)
    if text.startswith("tcp://"):
        rest = text[len("tcp://") :]
        host, sep, port_text = rest.rpartition(":")
        if not sep or not host:
            raise ValueError(f"endpoint {text!r}: tcp:// needs HOST:PORT")
        host = host.strip("[]")
        try:
            port = int(port_text)
        except ValueError:
            raise ValueError(f"endpoint {text!r}: port {port_text!r} is not a number") from None
        if not 0 <= port <= 65535:
            raise ValueError(f"endpoint {text!r}: port {port} is out of range")
        return Endpoint("tcp", host=host, port=port)
    raise ValueError(f"endpoint {text!r}: scheme must be unix:// or tcp://")

