"""What happened to each trainer, in order: the status page's timeline and ``/api/v1/events``.

:class:`EventLog` collects two streams into one bounded, numbered list:

- remediation, from the audit log (:meth:`EventLog.on_audit`, an ``AuditLog``
  listener): ``detection``, ``decision``, ``suppressed``, ``deferred``, ``outcome``,
  with the audit record's fields (detector, ladder, step, action, args,
  command_id, outcome, detail, evidence, ...);
- the trainer's own messages (:meth:`EventLog.on_message`, a run-state
  listener): ``connected`` (``detail`` says whether it is a new session),
  ``disconnected``, ``finished`` (GOODBYE), ``checkpoint`` (``checkpoint``:
  saved, known_good, restored or corrupt) and ``dropped`` (the trainer's count of
  dropped summaries grew; at most one event per trainer every 10 s).

Every event is one JSON object with the keys of :data:`EVENT_FIELDS` (null where
one does not apply) and a ``seq`` that only grows: a reader passes the last
``seq`` it saw as ``since``. Events are serialised once, when they happen, so a
read only joins strings.

Memory bound: at most ``max_events`` events and ``max_bytes`` of serialised
JSON (10,000 and 4 MiB by default), the oldest dropped first; one event is cut
to ``max_event_bytes`` (its evidence replaced by ``{"truncated": true}``).
"""

from __future__ import annotations

import json
import math
import threading
import time
import uuid
from collections import deque
from typing import Any, Callable, Mapping, Optional

from adamwatch import wire

from ..remediation.audit import _json_safe  # the audit log's rule: NaN/Inf become "nan"/"inf", as in its file

__all__ = ["EVENT_FIELDS", "EventLog"]

EVENT_FIELDS: tuple[str, ...] = (
    "seq", "time", "kind", "job", "rank", "step", "detector", "ladder", "action", "args", "command_id", "outcome",
    "detail", "dry_run", "source", "latency_seconds", "steps_to_effect", "checkpoint", "dropped_total", "evidence",
)
_AUDIT_KINDS = frozenset({"detection", "decision", "suppressed", "deferred", "outcome"})
_FROM_AUDIT = ("detector", "ladder", "step", "action", "args", "command_id", "outcome", "detail", "dry_run", "source",
               "latency_seconds", "steps_to_effect", "evidence")
DROPPED_EVENT_INTERVAL = 10.0


class EventLog:
    """Bounded, numbered events of every trainer (see the module docstring).

    Args:
        clock: unix seconds, for events whose message carries no time.
        max_events: events kept, at most.
        max_bytes: serialised bytes kept, at most.
        max_event_bytes: one event's serialised size, at most.
    """

    def __init__(self, clock: Callable[[], float] = time.time, *, max_events: int = 10_000,
                 max_bytes: int = 4 << 20, max_event_bytes: int = 2048):
        for name, value in (("max_events", max_events), ("max_bytes", max_bytes), ("max_event_bytes", max_event_bytes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: must be an integer >= 1, got {value!r}")
        self._clock = clock
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.max_event_bytes = max_event_bytes
        self._lock = threading.Lock()
        self._events: deque[tuple[int, str, Optional[int], bool, str]] = deque()  # (seq, job, rank, job-wide, json)
        self._bytes = 0
        self._seq = 0
        # A reader's cursor is only meaningful for this log (a restarted sidecar numbers from 1 again).
        self.epoch = uuid.uuid4().hex[:12]
        # key -> [session, dropped total already reported, time of that event]; the total counts per session.
        self._dropped_seen: dict[tuple, list[Any]] = {}

    # ------------------------------------------------------------------ writing
    def add(self, kind: str, job: str, rank: Optional[int], time_s: Optional[float] = None, *, job_wide: bool = False,
            **fields: Any) -> int:
        """Record one event.

        Args:
            kind: what happened (see the module docstring).
            job, rank: whose event (rank None: the whole job).
            time_s: unix seconds (default: the clock).
            job_wide: shown with every rank of the job (remediation acts for the whole job).
            **fields: any of :data:`EVENT_FIELDS`.

        Returns:
            The event's ``seq``.
        """
        unknown = set(fields) - set(EVENT_FIELDS)
        assert not unknown, f"unknown event fields {unknown}"
        record = dict.fromkeys(EVENT_FIELDS)
        record.update(_json_safe(fields))
        record.update(kind=kind, job=job, rank=rank, time=self._clock() if time_s is None else time_s)
        with self._lock:
            self._seq += 1
            record["seq"] = self._seq
            text = json.dumps(record, separators=(",", ":"), allow_nan=False, default=str)
            if len(text) > self.max_event_bytes:
                record["evidence"] = {"truncated": True}
                record["args"] = record["detail"] = None
                text = json.dumps(record, separators=(",", ":"), allow_nan=False, default=str)[: self.max_event_bytes]
                if not text.endswith("}"):  # still too long: keep what identifies it
                    text = json.dumps({k: record[k] for k in ("seq", "time", "kind", "job", "rank", "step")})
            self._events.append((self._seq, job, rank, job_wide or rank is None, text))
            self._bytes += len(text)
            while len(self._events) > self.max_events or self._bytes > self.max_bytes:
                self._bytes -= len(self._events.popleft()[4])
            return self._seq

    def on_audit(self, record: Mapping[str, Any]) -> None:
        """``AuditLog`` listener: a detection, decision, suppression, deferral or outcome."""
        kind = record.get("event")
        if kind not in _AUDIT_KINDS:
            return
        rank = record.get("rank")
        self.add(kind, str(record.get("job")), rank if isinstance(rank, int) else None, record.get("time"),
                 job_wide=True, **{name: record.get(name) for name in _FROM_AUDIT})

    def on_message(self, key: tuple, message: Optional[wire.Message]) -> None:
        """Run-state listener: connections, checkpoints, GOODBYE and growing drop counts."""
        job, rank = key[0], key[1]
        if message is None:
            self.add("disconnected", job, rank)
            return
        mtype, payload = message.type, message.payload
        if mtype is wire.MessageType.STEP or mtype is wire.MessageType.ACK:
            return  # steps are the history's; ACKs reach the audit log as outcomes
        if mtype is wire.MessageType.HELLO:
            self.add("connected", job, rank, detail=f"session {payload.get('session')}, "
                     f"{payload.get('host')} pid {payload.get('pid')}, world size {payload.get('world_size')}")
            seen = self._dropped_seen.get(key)
            if seen is None or seen[0] != payload.get("session"):
                self._dropped_seen[key] = [payload.get("session"), 0, -math.inf]
            self._note_dropped(key, payload.get("dropped_total"))
        elif mtype is wire.MessageType.CHECKPOINT:
            self.add("checkpoint", job, rank, payload.get("time"), step=payload.get("step"),
                     checkpoint=payload.get("event"), detail=payload.get("detail") or payload.get("path"))
        elif mtype is wire.MessageType.GOODBYE:
            self.add("finished", job, rank, step=payload.get("step"), detail=payload.get("reason"))
        elif mtype is wire.MessageType.DROPPED:
            self._note_dropped(key, payload.get("dropped_total"))

    def _note_dropped(self, key: tuple, total: Any) -> None:
        if isinstance(total, bool) or not isinstance(total, int) or total <= 0:
            return
        now = self._clock()
        entry = self._dropped_seen.setdefault(key, [None, 0, -math.inf])
        seen = entry[1]
        if total > seen and now - entry[2] >= DROPPED_EVENT_INTERVAL:
            entry[1:] = [total, now]
            self.add("dropped", key[0], key[1], dropped_total=total,
                     detail=f"the trainer dropped {total - seen} summaries (sidecar unreachable or slow)")

    def forget(self, keys: list[tuple]) -> None:
        """Forget the drop counts of trainers the run state expired (their events age out)."""
        for key in keys:
            self._dropped_seen.pop(key, None)

    # ------------------------------------------------------------------ reading
    @property
    def last_seq(self) -> int:
        """The newest event's seq (0 before any)."""
        return self._seq

    def read(self, job: Optional[str] = None, since: int = 0, rank: Optional[int] = None,
             limit: int = 1000) -> tuple[list[str], int]:
        """Serialised events newer than ``since``, oldest first.

        Args:
            job: only this job's events (None: every job).
            since: the last seq the reader has.
            rank: only this rank's events and the job-wide ones (remediation).
            limit: the newest ``limit`` of them at most.

        Returns:
            (JSON objects as text, the newest seq of the log): pass the second as
            the next ``since``.
        """
        out: list[str] = []
        with self._lock:
            last = self._seq
            for seq, ev_job, ev_rank, job_wide, text in reversed(self._events):
                if seq <= since or len(out) >= limit:
                    break
                if (job is None or ev_job == job) and (rank is None or job_wide or ev_rank == rank):
                    out.append(text)
        out.reverse()
        return out, last

    def nbytes(self) -> int:
        """Serialised bytes held now."""
        with self._lock:
            return self._bytes

