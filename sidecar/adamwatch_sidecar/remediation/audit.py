"""Append-only JSONL audit log of every remediation decision and outcome.

One JSON object per line, every line with the same keys (null where a key does
not apply), so ``jq`` and log shippers need no special cases::

    {"time": 1763700000.12, "event": "decision", "job": "gpt", "rank": 0,
     "detector": "loss_spike", "ladder": "loss_spike", "step": 812,
     "evidence": {"value": 9.1, "mean": 3.2, "std": 0.05, "threshold": 3.5, ...},
     "action": "reduce_lr", "args": {"factor": 0.5}, "command_id": "aw-1f0c...",
     "outcome": null, "detail": "first rung with budget", "dry_run": false,
     "source": "detector", "latency_seconds": null, "steps_to_effect": null}

``event`` is one of:

| event | written when |
| --- | --- |
| ``detection`` | a detector opens an incident (first step of a streak) |
| ``decision`` | the ladder (or a human, or an alert) chose an action |
| ``suppressed`` | an incident got no action (cooldown, command pending, exhausted) |
| ``deferred`` | an incident got no action because rank 0 of its job is not connected to this sidecar (it reports to another pod's sidecar, or is reconnecting); ``detail`` says which |
| ``outcome`` | an action finished: applied, failed, rejected, timeout or dry_run |

The file is opened in append mode for each line (rotation-friendly), written
with a single ``write`` and flushed; ``fsync: true`` also syncs every line.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections import deque
from typing import Any, Callable

__all__ = ["AUDIT_FIELDS", "AuditLog"]

AUDIT_FIELDS: tuple[str, ...] = (
    "time", "event", "job", "rank", "detector", "ladder", "step", "evidence", "action", "args",
    "command_id", "outcome", "detail", "dry_run", "source", "latency_seconds", "steps_to_effect",
)


def _json_safe(value: Any) -> Any:
    # Evidence may hold NaN/Inf (that is often the point); strict JSON cannot.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


class AuditLog:
    """Writes audit lines to ``path`` (if given) and keeps the latest in memory.

    Args:
        path: the JSONL file, created with its folder if missing; None keeps memory only.
        clock: seconds since the epoch, injectable for tests.
        fsync: fsync after every line.
        keep: how many recent lines :meth:`recent` returns.
        on_error: called with the exception when a write fails (the sidecar keeps running).
    """

    def __init__(self, path: str | None = None, *, clock: Callable[[], float] = time.time, fsync: bool = False,
                 keep: int = 200, on_error: Callable[[BaseException], None] | None = None):
        self.path = path
        self._clock = clock
        self._fsync = fsync
        self._lock = threading.Lock()
        self._recent: deque[dict[str, Any]] = deque(maxlen=keep)
        self._on_error = on_error
        self.write_errors = 0
        self._listeners: list[Callable[[dict[str, Any]], None]] = []
        if path:
            folder = os.path.dirname(os.path.abspath(path))
            os.makedirs(folder, exist_ok=True)

    def write(self, event: str, **fields: Any) -> dict[str, Any]:
        """Append one line.

        Args:
            event: detection, decision, suppressed, deferred or outcome.
            **fields: any of :data:`AUDIT_FIELDS`; unknown names are a programming error.

        Returns:
            The record as written.
        """
        unknown = set(fields) - set(AUDIT_FIELDS)
        assert not unknown, f"unknown audit fields {unknown}"
        record = {name: None for name in AUDIT_FIELDS}
        record.update(_json_safe(fields))
        record["event"] = event
        if record["time"] is None:
            record["time"] = self._clock()
        line = json.dumps(record, separators=(",", ":"), allow_nan=False) + "\n"
        with self._lock:
            self._recent.append(record)
            if self.path:
                try:
                    with open(self.path, "a", encoding="utf-8") as fh:
                        fh.write(line)
                        fh.flush()
                        if self._fsync:
                            os.fsync(fh.fileno())
                except OSError as exc:
                    self.write_errors += 1
                    if self._on_error is not None:
                        self._on_error(exc)
        for fn in self._listeners:
            try:
                fn(record)
            except Exception:
                logging.getLogger(__name__).exception("audit listener %r failed", fn)
        return record

    def add_listener(self, fn: Callable[[dict[str, Any]], None]) -> None:
        """Call ``fn(record)`` after every line is written (the status page's timeline).

        Args:
            fn: must return quickly (it runs where the line is written); exceptions are logged.
        """
        self._listeners.append(fn)

    def recent(self, limit: int | None = None) -> list[dict[str, Any]]:
        """The latest records, oldest first."""
        with self._lock:
            items = list(self._recent)
        return items if limit is None else items[-limit:]
