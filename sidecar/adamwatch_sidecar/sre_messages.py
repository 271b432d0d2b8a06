"""Checks of EVAL and FOOTPRINT payloads that the wire schema cannot express.

A violation raises ``wire.SchemaError`` naming the field: the frame is counted
as rejected (reason "schema") and the connection carries on.

    >>> validate_sre_message(wire.MessageType.EVAL, {"step": 1, "time": 0.0, "metrics": {"loss": 1.5}})
    >>> validate_sre_message(wire.MessageType.EVAL, {"step": 1, "time": 0.0, "metrics": {"loss": "low"}})
    Traceback (most recent call last):
    ...
    adamwatch.wire.SchemaError: EVAL.metrics.loss must be a number or null, got str
"""

from __future__ import annotations

import re
from typing import Any

from adamwatch import wire

__all__ = ["validate_sre_message", "MAX_DTYPES", "EVAL_NAME"]

MAX_DTYPES = 16  # distinct dtypes in one FOOTPRINT map (torch has fewer)
EVAL_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_DTYPE = re.compile(r"^[a-z0-9_]{1,32}$")


def _number(value: Any) -> bool:
    return isinstance(value, float) or (isinstance(value, int) and not isinstance(value, bool)
                                        and -(2**63) <= value < 2**63)


def _byte_map(name: str, value: dict[str, Any]) -> None:
    if len(value) > MAX_DTYPES:
        raise wire.SchemaError(f"FOOTPRINT.{name} has {len(value)} dtypes, limit {MAX_DTYPES}")
    for dtype, n in value.items():
        if not _DTYPE.match(dtype):
            raise wire.SchemaError(f"FOOTPRINT.{name}: dtype name {dtype[:40]!r} is not like 'float32'")
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n < 2**63:
            raise wire.SchemaError(f"FOOTPRINT.{name}.{dtype} must be an integer byte count >= 0")


def validate_sre_message(mtype: wire.MessageType, payload: dict[str, Any]) -> None:
    """Raise ``wire.SchemaError`` for an EVAL or FOOTPRINT payload the sidecar must not export."""
    if mtype is wire.MessageType.EVAL:
        metrics = payload["metrics"]
        if not metrics or len(metrics) > wire.MAX_EVAL_METRICS:
            raise wire.SchemaError(f"EVAL.metrics must hold 1..{wire.MAX_EVAL_METRICS} entries, got {len(metrics)}")
        for name, value in metrics.items():
            if not EVAL_NAME.match(name):
                raise wire.SchemaError(f"EVAL.metrics: name {name[:70]!r} must match {EVAL_NAME.pattern}")
            if value is not None and not _number(value):
                raise wire.SchemaError(f"EVAL.metrics.{name} must be a number or null, got {type(value).__name__}")
        if payload["step"] < 0:
            raise wire.SchemaError(f"EVAL.step must be >= 0, got {payload['step']}")
    elif mtype is wire.MessageType.FOOTPRINT:
        _byte_map("param_bytes", payload["param_bytes"])
        _byte_map("optimizer_state_bytes", payload["optimizer_state_bytes"])
        for name in ("device_memory_peak_bytes", "device_memory_reserved_bytes"):
            value = payload.get(name)
            if value is not None and value < 0:
                raise wire.SchemaError(f"FOOTPRINT.{name} must be >= 0, got {value}")
