"""JSON for the status page and anyone else: ``/api/v1/series``, ``/api/v1/events``, ``/api/v1/trainers``.

All three are read-only GETs on the metrics address. Query parameters:

| endpoint | parameters |
| --- | --- |
| ``/api/v1/series`` | ``job``, ``rank`` (both optional when the sidecar knows exactly one trainer); ``since``, ``epoch`` (the ``last_seq`` and ``epoch`` of the previous answer: only newer points); ``downsampled`` (the previous ``downsampled_version``: the buckets are left out while unchanged) |
| ``/api/v1/events`` | ``job``, ``rank`` (optional filters), ``since``, ``epoch`` (as above), ``limit`` (default 1000) |
| ``/api/v1/trainers`` | ``job``, ``rank`` (optional: describe only this trainer in full, and only its job's remediation) |

Series values are written with 8 significant digits (finer than the float32
the trainer computed them in), times in unix seconds with milliseconds, and NaN or
infinite values as ``null`` (a non-finite step also has ``nonfinite: 1``). The
arrays are built with one C-level ``%`` format per column: a trainer with
10,000 steps answers in a few milliseconds (``benchmarks/status_page.py``).
"""

from __future__ import annotations

import json
import math
import re
import time
from typing import Any, Callable, Optional, Sequence
from urllib.parse import parse_qs

from adamwatch import wire

from .. import __version__
from ..remediation.audit import _json_safe  # NaN/Inf become "nan"/"inf": strict JSON that still says what it was
from ..run_state import RunState, TrainerKey
from .events import EventLog
from .history import (
    AVERAGED_COLUMNS,
    BUCKET_COLUMNS,
    DEEP_VALUES_PER_GROUP,
    FLAG_NONFINITE,
    FLAG_SKIPPED,
    STEP_COLUMNS,
    HistoryRead,
    StepHistory,
)

__all__ = ["ApiError", "StatusApi", "series_json"]

JSON = "application/json; charset=utf-8"
_NONFINITE = re.compile(r"-?inf|nan")
_QUANTILE_KEYS = tuple(str(q) for q in wire.QUANTILES)
_COL = {name: i for i, name in enumerate(STEP_COLUMNS)}


class ApiError(ValueError):
    """A request the API cannot answer; ``status`` is the HTTP status."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def _numbers(values: Sequence[float], fmt: str = "%.8g") -> str:
    """A JSON array of numbers, non-finite ones as null, formatted in one C-level pass."""
    if not values:
        return "[]"
    text = ((fmt + ",") * len(values)) % tuple(values)
    if "n" in text:  # only "nan" and "inf" hold an n
        text = _NONFINITE.sub("null", text)
    return "[" + text[:-1] + "]"


def _object(pairs: Sequence[tuple[str, str]]) -> str:
    """A JSON object from (key, JSON text of the value) pairs."""
    return "{" + ",".join(json.dumps(k) + ":" + v for k, v in pairs) + "}"


def series_json(key: TrainerKey, read: HistoryRead) -> str:
    """The ``/api/v1/series`` answer for one trainer's :class:`HistoryRead`.

    Args:
        key: the trainer.
        read: what :meth:`StepHistory.read` copied.

    Returns:
        JSON text (see the README's "Status page" section for the fields).
    """
    groups = read.groups
    points: list[tuple[str, str]] = []
    rows = read.step_rows()
    first = read.last_seq - rows + 1
    m = memoryview(read.steps).cast("d")
    width = read.width

    def column(index: int, fmt: str = "%.8g") -> str:
        return _numbers(m[index::width].tolist(), fmt)

    flags = [int(f) for f in m[_COL["flags"]::width].tolist()]
    points.append(("seq", "[" + ",".join(map(str, range(first, read.last_seq + 1))) + "]"))
    points.append(("step", column(_COL["step"], "%d")))
    points.append(("time", column(_COL["time"], "%.3f")))
    for name in ("loss", "grad_norm", "duration_s", "samples", "tokens"):
        points.append((name, column(_COL[name])))
    points.append(("skipped", "[" + ",".join("1" if f & FLAG_SKIPPED else "0" for f in flags) + "]"))
    points.append(("nonfinite", "[" + ",".join("1" if f & FLAG_NONFINITE else "0" for f in flags) + "]"))
    points.append(("lr", _object([(g, column(len(STEP_COLUMNS) + i)) for i, g in enumerate(groups)])))

    deep_width = read.deep_width
    d = memoryview(read.deep).cast("d")

    def deep_column(index: int, fmt: str = "%.8g") -> str:
        return _numbers(d[index::deep_width].tolist(), fmt)

    deep_groups = []
    for i, g in enumerate(groups):
        base = 3 + i * DEEP_VALUES_PER_GROUP
        nq = len(_QUANTILE_KEYS)
        deep_groups.append((g, _object([
            ("effective_lr", _object([(q, deep_column(base + j)) for j, q in enumerate(_QUANTILE_KEYS)])),
            ("update_size", _object([(q, deep_column(base + nq + j)) for j, q in enumerate(_QUANTILE_KEYS)])),
            ("update_to_weight", deep_column(base + 2 * nq)),
        ])))
    deep = _object([("seq", deep_column(0, "%d")), ("step", deep_column(1, "%d")), ("time", deep_column(2, "%.3f")),
                    ("groups", _object(deep_groups))])

    downsampled = "null"
    if read.buckets is not None:
        bw = read.bucket_width
        b = memoryview(read.buckets).cast("d")
        head = {name: b[i::bw].tolist() for i, name in enumerate(BUCKET_COLUMNS)}
        steps = head["steps"]

        def mean(pair_index: int) -> str:
            base = len(BUCKET_COLUMNS) + 2 * pair_index
            sums, counts = b[base::bw].tolist(), b[base + 1::bw].tolist()
            return _numbers([s / c if c else math.nan for s, c in zip(sums, counts)])

        downsampled = _object([
            ("version", str(read.buckets_version)),
            ("seq", _numbers(head["seq"], "%d")),
            ("step", _numbers(head["step"], "%d")),
            ("time", _numbers([t / n for t, n in zip(head["time_sum"], steps)], "%.3f")),
            ("steps", _numbers(steps, "%d")),
            ("skipped", _numbers(head["skipped"], "%d")),
            ("nonfinite", _numbers(head["nonfinite"], "%d")),
            ("loss_max", _numbers(head["loss_max"])),
            ("grad_norm_max", _numbers(head["grad_norm_max"])),
            *((name, mean(i)) for i, name in enumerate(AVERAGED_COLUMNS)),
            ("lr", _object([(g, mean(len(AVERAGED_COLUMNS) + i)) for i, g in enumerate(groups)])),
        ])
    plan = read.plan
    return _object([
        ("job", json.dumps(key.job)),
        ("rank", str(key.rank)),
        ("epoch", json.dumps(read.epoch)),
        ("since", "null" if read.since is None else str(read.since)),
        ("first_seq", str(read.first_seq)),
        ("last_seq", str(read.last_seq)),
        ("param_groups", json.dumps(list(groups), separators=(",", ":"))),
        ("limits", json.dumps({"steps": plan.steps, "deep_rows": plan.deep_rows, "downsampled_points": plan.buckets,
                               "steps_per_downsampled_point": read.bucket_steps, "bytes": read.nbytes},
                              separators=(",", ":"))),
        ("points", _object(points)),
        ("deep", deep),
        ("downsampled_version", str(read.buckets_version)),
        ("downsampled", downsampled),
    ])


def _one(query: dict[str, list[str]], name: str) -> Optional[str]:
    values = query.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise ApiError(f"{name}: give it once, got {len(values)} values")
    return values[0]


def _int(query: dict[str, list[str]], name: str, default: Optional[int] = None, minimum: int = 0) -> Optional[int]:
    text = _one(query, name)
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        raise ApiError(f"{name}: must be an integer, got {text[:40]!r}") from None
    if value < minimum:
        raise ApiError(f"{name}: must be >= {minimum}, got {value}")
    return value


class StatusApi:
    """The JSON handlers, over the run state, the step history, the event log and (optionally) remediation.

    Args:
        state: the sidecar's run state.
        history: the step history.
        events: the event log.
        remediation: a callable returning the remediation service or None (it may be attached later).
        clock: unix seconds.
    """

    def __init__(self, state: RunState, history: StepHistory, events: EventLog,
                 remediation: Callable[[], Any], clock: Callable[[], float] = time.time):
        self.state = state
        self.history = history
        self.events = events
        self._remediation = remediation
        self._clock = clock

    def _key(self, query: dict[str, list[str]]) -> TrainerKey:
        job = _one(query, "job")
        rank = _int(query, "rank")
        if job is None and rank is None:
            keys = self.history.keys()
            if len(keys) == 1:
                return TrainerKey(*keys[0])
            raise ApiError(f"job, rank: required when the sidecar knows {len(keys)} trainers "
                           f"(GET /api/v1/trainers lists them)")
        if job is None or rank is None:
            raise ApiError(f"{'job' if job is None else 'rank'}: required")
        return TrainerKey(job, rank)

    def series(self, query_text: str) -> str:
        """``GET /api/v1/series``: one trainer's points (see :func:`series_json`).

        Raises:
            ApiError: bad parameters (400) or a trainer without history (404).
        """
        query = parse_qs(query_text, keep_blank_values=True)
        key = self._key(query)
        read = self.history.read(key, since=_int(query, "since"), epoch=_one(query, "epoch"),
                                 buckets_version=_int(query, "downsampled"))
        if read is None:
            raise ApiError(f"no history for job={key.job!r} rank={key.rank}", status=404)
        return series_json(key, read)

    def events_json(self, query_text: str) -> str:
        """``GET /api/v1/events``: ``{"epoch", "last_seq", "events": [...]}`` (see :mod:`.events`)."""
        query = parse_qs(query_text, keep_blank_values=True)
        since = _int(query, "since", 0)
        if _one(query, "epoch") not in (None, self.events.epoch):
            since = 0
        events, last = self.events.read(_one(query, "job"), since, _int(query, "rank"),
                                        _int(query, "limit", 1000, minimum=1))
        return _object([("epoch", json.dumps(self.events.epoch)), ("last_seq", str(last)),
                        ("events", "[" + ",".join(events) + "]")])

    def trainers_json(self, query_text: str = "") -> str:
        """``GET /api/v1/trainers``: every trainer's state, its job's remediation and the memory in use.

        With ``job`` and ``rank`` (what the page sends), only that trainer is described in full and
        only its job's remediation is included; the others are listed by key and connection: a page
        open on a sidecar with 1,000 ranks stays cheap.
        """
        query = parse_qs(query_text, keep_blank_values=True)
        job, rank = _one(query, "job"), _int(query, "rank")
        remediation = self._remediation()
        status = None
        if remediation is not None:
            try:
                status = remediation.status(job)
            except Exception:  # the page must load even when remediation misbehaves
                status = None
        trainers = []
        for key in sorted(self.state.keys()):
            info = self.state.describe(key)
            if info is None or info.get("hello") is None:
                continue  # known only from remediation metrics: nothing to show
            hello = info.pop("hello")
            if job is not None and (key.job, key.rank) != (job, rank):
                trainers.append({"job": key.job, "rank": key.rank, "connected": info["connected"],
                                 "finished": info.get("goodbye") is not None})
                continue
            info.update(
                host=hello.get("host"), pid=hello.get("pid"), world_size=hello.get("world_size"),
                adamwatch_version=hello.get("adamwatch_version"), torch_version=hello.get("torch_version"),
                deep_stats_every=hello.get("deep_stats_every"), optimizer=hello.get("optimizer"),
                finished=info.get("goodbye") is not None, history=self.history.info(key),
            )
            trainers.append(info)
        return json.dumps(_json_safe({
            "sidecar": {"version": __version__, "time": self._clock()},
            "memory": {"history_bytes": self.history.nbytes(), "history_limits": _fields(self.history.limits),
                       "events_bytes": self.events.nbytes(), "events_max_bytes": self.events.max_bytes},
            "remediation": None if status is None else {"enabled": status.get("enabled"),
                                                        "dry_run": status.get("dry_run")},
            "jobs": {} if status is None else status.get("jobs", {}),
            "trainers": trainers,
        }), separators=(",", ":"))


def _fields(limits: Any) -> dict[str, Any]:
    return {name: getattr(limits, name) for name in limits.__dataclass_fields__}
