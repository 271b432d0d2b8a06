"""Every trainer's recent steps, kept in bounded memory: what the status page charts.

:class:`StepHistory` is a run-state listener (``sidecar.state.add_listener``): it
runs on the ingest loop for every accepted message and, for a STEP, packs the
numbers the page charts into one row of doubles appended to that trainer's
buffer. HTTP threads read copies with :meth:`StepHistory.read`.

For each trainer it keeps three tiers:

| tier | what | how many |
| --- | --- | --- |
| full resolution | one row per STEP: step, time, loss, grad norm, step duration, samples, tokens, skipped/non-finite flags, the scheduled learning rate of each param group | the latest ``steps`` (10,000 by default) |
| deep statistics | one row per STEP that carried them: effective-LR and update-size quantiles, update-to-weight ratio, per param group | the same span of steps |
| downsampled | older steps folded into buckets: the mean of each value over the bucket, the max of loss and grad norm (spikes stay visible), counts of skipped and non-finite steps | at most ``downsampled_points`` buckets; when full, neighbours merge and the bucket width doubles |

Memory bound. Each trainer gets ``min(trainer_bytes, total_bytes / trainers)``
(4 MiB and 32 MiB by default, with an eighth held back for the allocator's
slack): a tenth for the downsampled buckets, the rest for as many full-resolution
steps as fit, up to ``steps``. A trainer with two param groups and deep
statistics every 10 steps needs ~110 bytes per step, so up to 27 trainers keep
their 10,000 steps, 64 keep ~4,160 and 1,000 keep ~270 steps each; never fewer
than ``min_steps`` (the total bound therefore holds up to ~10,000 trainers). At most
``max_groups`` param groups per trainer are charted. When the number of trainers
changes, every trainer's share is recomputed and larger histories are folded
down at once. ``tests/status_page/test_history.py`` measures the real
allocations with tracemalloc against this bound.

Cost. Appending a STEP is one ``struct.pack`` and a ``bytearray`` append under a
lock (O(1)); every ``steps // 10`` steps the oldest tenth is folded into buckets
with C-level sums over strided memoryviews (amortised O(1) per step).
``benchmarks/status_page.py`` measures both against the run state's own cost.

    >>> from adamwatch import wire
    >>> history = StepHistory(HistoryLimits(steps=100))
    >>> history.on_message(("gpt", 0), wire.Message(wire.MessageType.HELLO, {"optimizer": {"param_groups": ["all_params"]}}))
    >>> for step in range(1, 251):
    ...     history.on_message(("gpt", 0), wire.Message(wire.MessageType.STEP, {
    ...         "step": step, "time": 1000.0 + step, "duration_s": 1.0, "loss": 1.0 / step,
    ...         "grad_norm": 1.0, "group_grad_norms": [1.0], "grad_nonfinite": False, "lr": [1e-3]}))
    >>> read = history.read(("gpt", 0))
    >>> read.first_seq, read.last_seq, read.step_rows() > 0, read.bucket_rows() > 0
    (151, 250, True, True)
"""

from __future__ import annotations

import bisect
import math
import struct
import threading
import uuid
from array import array
from dataclasses import dataclass
from typing import Any, Iterable, Optional

from adamwatch import wire

__all__ = [
    "HistoryLimits",
    "HistoryPlan",
    "HistoryRead",
    "StepHistory",
    "STEP_COLUMNS",
    "AVERAGED_COLUMNS",
    "BUCKET_COLUMNS",
    "FLAG_SKIPPED",
    "FLAG_NONFINITE",
    "DEEP_VALUES_PER_GROUP",
]

NAN = math.nan
FLAG_SKIPPED = 1
FLAG_NONFINITE = 2

# A full-resolution row: these columns, then the scheduled learning rate of each group.
STEP_COLUMNS: tuple[str, ...] = ("step", "time", "loss", "grad_norm", "duration_s", "samples", "tokens", "flags")
_C = {name: i for i, name in enumerate(STEP_COLUMNS)}
_NSTEP = len(STEP_COLUMNS)
# Columns averaged in a downsampled bucket, besides the learning rates.
AVERAGED_COLUMNS: tuple[str, ...] = ("loss", "grad_norm", "duration_s", "samples", "tokens")
_AVERAGED: tuple[int, ...] = tuple(_C[n] for n in AVERAGED_COLUMNS)
# A bucket row: these columns, then (sum, finite count) for every averaged column and every group's lr.
BUCKET_COLUMNS: tuple[str, ...] = ("seq", "step", "time_sum", "steps", "skipped", "nonfinite", "loss_max",
                                   "grad_norm_max")
_NBUCKET = len(BUCKET_COLUMNS)
_NQ = len(wire.QUANTILES)
# A deep row: seq, step, time, then per group: effective_lr quantiles, update_size quantiles, update_to_weight.
DEEP_VALUES_PER_GROUP = 2 * _NQ + 1
_DEEP_HEAD = 3
_NAN_QUANTILES = (NAN,) * _NQ
_STEP = wire.MessageType.STEP
_HELLO = wire.MessageType.HELLO


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: must be an integer >= 1, got {value!r}")


@dataclass(frozen=True)
class HistoryPlan:
    """How much one trainer may keep: full-resolution steps, deep rows, downsampled buckets."""

    steps: int
    deep_rows: int
    buckets: int


@dataclass(frozen=True)
class HistoryLimits:
    """The memory bound of :class:`StepHistory` (see the module docstring).

    Args:
        steps: full-resolution steps per trainer, at most.
        trainer_bytes: bytes per trainer, at most.
        total_bytes: bytes for all trainers together.
        min_steps: full-resolution steps every trainer keeps, however many there are.
        downsampled_points: downsampled buckets per trainer, at most.
        max_groups: param groups charted per trainer (the others are left out).
    """

    steps: int = 10_000
    trainer_bytes: int = 4 << 20
    total_bytes: int = 32 << 20
    min_steps: int = 32
    downsampled_points: int = 512
    max_groups: int = 8

    def __post_init__(self) -> None:
        for name in ("steps", "trainer_bytes", "total_bytes", "min_steps", "downsampled_points", "max_groups"):
            _positive_int(name, getattr(self, name))
        if self.downsampled_points < 2:
            raise ValueError(f"downsampled_points: must be >= 2 (neighbours merge in pairs), got {self.downsampled_points}")

    def plan(self, trainers: int, groups: int, deep_every: int) -> HistoryPlan:
        """What one trainer may keep when ``trainers`` share the budget.

        Args:
            trainers: trainers sharing ``total_bytes`` (>= 1).
            groups: charted param groups of this trainer.
            deep_every: steps between its deep statistics (0: none announced).

        Returns:
            The plan; its bytes (see :meth:`plan_bytes`) fit the trainer's share
            unless ``min_steps`` forces more.
        """
        share = min(self.trainer_bytes, self.total_bytes // max(1, trainers)) * 8 // 9  # allocator slack
        bucket_bytes = 8 * (_NBUCKET + 2 * (len(_AVERAGED) + groups))
        buckets = max(2, min(self.downsampled_points, share // 10 // bucket_bytes))
        step_bytes = 8 * (_NSTEP + groups)
        deep_bytes = 8 * (_DEEP_HEAD + DEEP_VALUES_PER_GROUP * groups) + 8  # + its seq index
        per_step = step_bytes + (deep_bytes / deep_every if deep_every > 0 else 0)
        steps = max(self.min_steps, min(self.steps, int((share - buckets * bucket_bytes) / per_step)))
        deep_rows = steps // deep_every + 1 if deep_every > 0 else 16
        return HistoryPlan(steps, deep_rows, buckets)

    @staticmethod
    def plan_bytes(plan: HistoryPlan, groups: int) -> int:
        """Bytes the buffers of a full history of ``plan`` hold (before allocator slack)."""
        return (plan.steps * 8 * (_NSTEP + groups)
                + plan.deep_rows * (8 * (_DEEP_HEAD + DEEP_VALUES_PER_GROUP * groups) + 8)
                + plan.buckets * 8 * (_NBUCKET + 2 * (len(_AVERAGED) + groups)))


class _Track:
    """One trainer's buffers. Mutated only under StepHistory._lock, on the ingest loop."""

    __slots__ = ("groups", "width", "row", "pack", "steps", "count", "first_seq", "deep_every", "deep_row", "deep",
                 "deep_seq", "buckets", "bucket_width", "bucket_steps", "buckets_version", "plan", "epoch")

    def __init__(self, groups: list[str], deep_every: int, plan: HistoryPlan):
        g = len(groups)
        self.groups = groups
        self.width = _NSTEP + g
        self.row = struct.Struct(f"{self.width}d")
        self.pack = self.row.pack
        self.steps = bytearray()
        self.count = 0
        self.first_seq = 1  # seq of the oldest full-resolution row; seqs count STEPs from 1
        self.deep_every = deep_every
        self.deep_row = struct.Struct(f"{_DEEP_HEAD + DEEP_VALUES_PER_GROUP * g}d")
        self.deep = bytearray()
        self.deep_seq = array("q")
        self.buckets = array("d")
        self.bucket_width = _NBUCKET + 2 * (len(_AVERAGED) + g)
        # Wide enough that a fold makes ~20 buckets: each costs a few C-level sums, not a Python loop per step.
        self.bucket_steps = max(1, plan.steps // 200)
        self.buckets_version = 0
        self.plan = plan
        # A reader's cursor is only meaningful for the buffers it came from.
        self.epoch = uuid.uuid4().hex[:12]

    @property
    def next_seq(self) -> int:
        return self.first_seq + self.count

    def nbytes(self) -> int:
        return len(self.steps) + len(self.deep) + self.deep_seq.itemsize * len(self.deep_seq) \
            + self.buckets.itemsize * len(self.buckets)


@dataclass(frozen=True)
class HistoryRead:
    """A copy of one trainer's history (or of what is newer than a cursor), taken under the lock.

    Attributes:
        groups: charted param-group names (the learning-rate columns, in order).
        epoch: identifies the buffers: a cursor from another epoch is void.
        first_seq, last_seq: seqs of the oldest and newest full-resolution rows kept
            (``last_seq`` is the cursor for the next read; ``first_seq > last_seq`` when empty).
        since: the cursor this read started after (None: everything).
        steps: packed full-resolution rows newer than ``since`` (doubles, ``len(STEP_COLUMNS) + groups`` a row).
        deep: packed deep rows newer than ``since``.
        buckets: packed downsampled buckets, or None when the reader already has ``buckets_version``.
        buckets_version: changes whenever the downsampled tier changes.
        bucket_steps: steps per bucket for the next fold.
        plan: this trainer's current bound.
        nbytes: bytes its buffers hold now.
    """

    groups: tuple[str, ...]
    epoch: str
    first_seq: int
    last_seq: int
    since: Optional[int]
    steps: bytes
    deep: bytes
    buckets: Optional[bytes]
    buckets_version: int
    bucket_steps: int
    plan: HistoryPlan
    nbytes: int

    @property
    def width(self) -> int:
        """Doubles per full-resolution row."""
        return _NSTEP + len(self.groups)

    @property
    def deep_width(self) -> int:
        """Doubles per deep row."""
        return _DEEP_HEAD + DEEP_VALUES_PER_GROUP * len(self.groups)

    @property
    def bucket_width(self) -> int:
        """Doubles per downsampled bucket."""
        return _NBUCKET + 2 * (len(_AVERAGED) + len(self.groups))

    def step_rows(self) -> int:
        """Full-resolution rows in this read."""
        return len(self.steps) // (8 * self.width)

    def bucket_rows(self) -> int:
        """Downsampled buckets in this read (0 when not included)."""
        return len(self.buckets or b"") // (8 * self.bucket_width)


def _finite_stats(values: memoryview, n: int, want_max: bool) -> tuple[float, int, float]:
    """(sum, count, max) of the finite values of a strided view; max is NaN when not wanted or none."""
    total = sum(values)
    if math.isfinite(total):
        return total, n, (max(values) if want_max else NAN)
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return 0.0, 0, NAN
    return math.fsum(finite), len(finite), (max(finite) if want_max else NAN)


def _nanmax(a: float, b: float) -> float:
    if a != a:
        return b
    if b != b:
        return a
    return a if a >= b else b


def _bucket_rows(t: _Track, rows: int) -> list[float]:
    """Downsampled buckets (BUCKET_COLUMNS, then sums and counts) of the oldest ``rows`` rows of ``t``."""
    width, per_bucket = t.width, t.bucket_steps
    step_col, time_col, flags_col, loss_col, norm_col = _C["step"], _C["time"], _C["flags"], _C["loss"], _C["grad_norm"]
    out: list[float] = []
    m = memoryview(t.steps).cast("d")
    for start in range(0, rows, per_bucket):
        end = min(start + per_bucket, rows)
        n = end - start
        a, b = start * width, end * width
        skipped = nonfinite = 0
        flags = m[a + flags_col:b:width]
        if any(flags):
            for f in flags:
                f = int(f)
                skipped += f & FLAG_SKIPPED
                nonfinite += (f & FLAG_NONFINITE) >> 1
        loss_sum, loss_n, loss_max = _finite_stats(m[a + loss_col:b:width], n, True)
        norm_sum, norm_n, norm_max = _finite_stats(m[a + norm_col:b:width], n, True)
        out += (t.first_seq + end - 1, m[b - width + step_col], sum(m[a + time_col:b:width]), n, skipped, nonfinite,
                loss_max, norm_max, loss_sum, loss_n, norm_sum, norm_n)
        for column in _AVERAGED[2:]:
            out += _finite_stats(m[a + column:b:width], n, False)[:2]
        for column in range(_NSTEP, width):
            out += _finite_stats(m[a + column:b:width], n, False)[:2]
    return out


class StepHistory:
    """Bounded per-trainer history of step summaries (see the module docstring).

    Args:
        limits: the memory bound.
    """

    def __init__(self, limits: HistoryLimits | None = None):
        self.limits = limits or HistoryLimits()
        self._lock = threading.Lock()
        self._tracks: dict[tuple, _Track] = {}
        # trainers the current shares were planned for (>= len(_tracks)), see _add_track
        self._planned_for = 0

    # ------------------------------------------------------------------ writing (ingest loop)
    def on_message(self, key: tuple, message: Optional[wire.Message]) -> None:
        """Run-state listener: record a STEP; a HELLO sizes (or resets) the trainer's history.

        Args:
            key: the trainer's ``(job, rank)``.
            message: the accepted message (None on disconnect: the history stays).
        """
        if message is None:
            return
        mtype = message.type
        if mtype is _STEP:
            self.on_step(key, message.payload)
        elif mtype is _HELLO:
            payload = message.payload
            optimizer = payload.get("optimizer") or {}
            groups = optimizer.get("param_groups") if isinstance(optimizer, dict) else None
            self._add_track(key, groups if isinstance(groups, list) else [], payload)

    def _add_track(self, key: tuple, groups: list[str] | None, hello: dict[str, Any]) -> _Track:
        """Create (or keep, or reset) the trainer's track; rebalance the budget when the set changed."""
        limits = self.limits
        names = [str(g) for g in (groups or [])[: limits.max_groups]]
        deep_every = hello.get("deep_stats_every")
        if isinstance(deep_every, bool) or not isinstance(deep_every, int) or deep_every < 0:
            deep_every = 10  # not announced: the trainer's default
        with self._lock:
            track = self._tracks.get(key)
            if track is not None and (groups is None or (track.groups == names and track.deep_every == deep_every)):
                return track  # a reconnect, or a new session of the same layout: the curve continues
            count = len(self._tracks) + (track is None)
            grow = count > self._planned_for
            if grow:
                # Shares are planned for 25 % more trainers than there are, so the
                # O(n) rebalance runs once per 25 % growth: n HELLOs cost O(n) in
                # all, not O(n^2) (3,000 ranks stalled ingest for a minute), and
                # the total stays within the budget in between.
                self._planned_for = count if count <= 4 else count + count // 4
            plan = limits.plan(self._planned_for, len(names), deep_every)
            track = self._tracks[key] = _Track(names, deep_every, plan)
            if grow:
                self._rebalance()
            return track

    def on_step(self, key: tuple, p: dict[str, Any]) -> None:
        """Record one STEP payload (already validated by the run state) of trainer ``key``: the hot path."""
        t = self._tracks.get(key)
        if t is None:
            t = self._add_track(key, None, {})
        get = p.get
        loss = get("loss")
        grad_norm = p["grad_norm"]
        duration = p["duration_s"]
        samples = get("samples")
        tokens = get("tokens")
        flags = FLAG_SKIPPED if get("skipped") else 0
        if p["grad_nonfinite"] or get("loss_nonfinite"):
            flags |= FLAG_NONFINITE
        lr = p["lr"]
        ngroups = t.width - _NSTEP
        if len(lr) != ngroups:
            if not t.groups and t.count == 0 and lr:
                # No names in the HELLO: the first STEP fixes the layout, groups named by index.
                with self._lock:
                    self._relayout(t, [str(i) for i in range(min(len(lr), self.limits.max_groups))])
                ngroups = t.width - _NSTEP
            lr = (list(lr) + [NAN] * ngroups)[:ngroups]
        row = t.pack(p["step"], p["time"], NAN if loss is None else loss, NAN if grad_norm is None else grad_norm,
                     NAN if duration is None else duration, NAN if samples is None else samples,
                     NAN if tokens is None else tokens, flags, *lr)
        deep = get("deep")
        with self._lock:
            if t.count >= t.plan.steps:
                self._fold(t, max(1, t.plan.steps // 10) + t.count - t.plan.steps)
            t.steps += row
            t.count += 1
            if deep is not None:
                self._append_deep(t, p, deep)

    def _relayout(self, t: _Track, groups: list[str]) -> None:
        fresh = _Track(groups, t.deep_every, self.limits.plan(max(1, self._planned_for, len(self._tracks)), len(groups),
                                                              t.deep_every))
        for name in _Track.__slots__:
            setattr(t, name, getattr(fresh, name))

    def _append_deep(self, t: _Track, p: dict[str, Any], deep: list) -> None:
        # The run state validated the entries: dicts whose quantile lists have len(QUANTILES) numbers or nulls.
        values: list[Any] = [t.next_seq - 1, p["step"], p["time"]]
        groups = len(t.groups)
        for entry in deep[:groups]:
            get = entry.get
            values += get("effective_lr") or _NAN_QUANTILES
            values += get("update_size") or _NAN_QUANTILES
            values.append(get("update_to_weight"))
        if len(deep) < groups:
            values += [NAN] * (DEEP_VALUES_PER_GROUP * (groups - len(deep)))
        if None in values:
            values = [NAN if v is None else v for v in values]
        if len(t.deep_seq) >= t.plan.deep_rows:
            drop = max(1, t.plan.deep_rows // 10) + len(t.deep_seq) - t.plan.deep_rows
            del t.deep[: drop * t.deep_row.size]
            del t.deep_seq[:drop]
        t.deep += t.deep_row.pack(*values)
        t.deep_seq.append(values[0])

    # ------------------------------------------------------------------ downsampling
    def _fold(self, t: _Track, rows: int) -> None:
        """Fold the oldest ``rows`` full-resolution rows into downsampled buckets (under the lock)."""
        rows = min(rows, t.count)
        if rows <= 0:
            return
        t.buckets.extend(_bucket_rows(t, rows))  # every view of t.steps is released on return
        del t.steps[: rows * t.row.size]
        t.first_seq += rows
        t.count -= rows
        self._merge_buckets(t)
        t.buckets_version += 1

    @staticmethod
    def _merge_buckets(t: _Track) -> None:
        """While over the plan: merge neighbouring buckets in pairs (the bucket width doubles)."""
        bw = t.bucket_width
        while len(t.buckets) > t.plan.buckets * bw:
            old = t.buckets
            rows = len(old) // bw
            new = array("d")
            for i in range(0, rows - 1, 2):
                x = old[i * bw:(i + 1) * bw]
                y = old[(i + 1) * bw:(i + 2) * bw]
                new.extend((y[0], y[1], x[2] + y[2], x[3] + y[3], x[4] + y[4], x[5] + y[5],
                            _nanmax(x[6], y[6]), _nanmax(x[7], y[7])))
                new.extend(map(float.__add__, x[_NBUCKET:], y[_NBUCKET:]))
            if rows % 2:
                new.extend(old[(rows - 1) * bw:])
            t.buckets = new
            t.bucket_steps *= 2

    def _rebalance(self) -> None:
        """Give every trainer its share of the total; shrink larger histories at once (under the lock)."""
        n = max(1, self._planned_for, len(self._tracks))
        plans: dict[tuple[int, int], HistoryPlan] = {}
        for t in self._tracks.values():
            shape = (len(t.groups), t.deep_every)
            plan = plans.get(shape)
            if plan is None:
                plan = plans[shape] = self.limits.plan(n, *shape)
            if plan == t.plan:
                continue
            shrinking = plan.steps < t.plan.steps or plan.deep_rows < t.plan.deep_rows or plan.buckets < t.plan.buckets
            t.plan = plan
            if not shrinking:
                continue
            if t.count > plan.steps:
                self._fold(t, t.count - plan.steps)
            self._merge_buckets(t)
            if len(t.deep_seq) > plan.deep_rows:
                drop = len(t.deep_seq) - plan.deep_rows
                del t.deep[: drop * t.deep_row.size]
                del t.deep_seq[:drop]
            # Copies release the slack of buffers sized for the larger share.
            t.steps = bytearray(t.steps)
            t.deep = bytearray(t.deep)
            t.deep_seq = array("q", t.deep_seq)
            t.buckets = array("d", t.buckets)

    def retain(self, keys: Iterable[tuple]) -> list[tuple]:
        """Drop the history of every trainer not in ``keys`` (the run state expired it).

        Args:
            keys: the trainers the run state still knows.

        Returns:
            The keys dropped.
        """
        wanted = set(keys)
        with self._lock:
            gone = [k for k in self._tracks if k not in wanted]
            for k in gone:
                del self._tracks[k]
            if gone:
                self._planned_for = len(self._tracks)
                self._rebalance()
        return gone

    # ------------------------------------------------------------------ reading (any thread)
    def keys(self) -> list[tuple]:
        """Trainers with a history."""
        with self._lock:
            return list(self._tracks)

    def nbytes(self) -> int:
        """Bytes all buffers hold now (the allocator adds at most an eighth)."""
        with self._lock:
            return sum(t.nbytes() for t in self._tracks.values())

    def info(self, key: tuple) -> dict[str, Any] | None:
        """Size of one trainer's history without copying it: steps kept, seqs, limit, bytes (None: no history)."""
        with self._lock:
            t = self._tracks.get(key)
            if t is None:
                return None
            return {"steps": t.count, "first_seq": t.first_seq, "last_seq": t.next_seq - 1,
                    "limit_steps": t.plan.steps, "downsampled_points": len(t.buckets) // t.bucket_width,
                    "steps_per_downsampled_point": t.bucket_steps, "bytes": t.nbytes()}

    def read(self, key: tuple, since: int | None = None, epoch: str | None = None,
             buckets_version: int | None = None) -> HistoryRead | None:
        """Copy one trainer's history, or what is newer than a cursor.

        Args:
            key: ``(job, rank)``.
            since: the ``last_seq`` of the reader's previous read (None: everything).
            epoch: the ``epoch`` of that read; when it differs (the trainer's history was
                reset, or the sidecar restarted) the cursor is void and everything is returned.
            buckets_version: the reader's ``buckets_version``; the buckets are copied
                only when they changed since.

        Returns:
            The copy, or None for a trainer without history.
        """
        with self._lock:
            t = self._tracks.get(key)
            if t is None:
                return None
            last = t.next_seq - 1
            if (epoch is not None and epoch != t.epoch) or since is None or since > last:
                since = None
                buckets_version = None
            start = 0 if since is None else min(t.count, max(0, since - t.first_seq + 1))
            steps = bytes(memoryview(t.steps)[start * t.row.size:])
            deep_start = 0 if since is None else bisect.bisect_right(t.deep_seq, since)
            deep = bytes(memoryview(t.deep)[deep_start * t.deep_row.size:])
            buckets = t.buckets.tobytes() if buckets_version != t.buckets_version else None
            return HistoryRead(tuple(t.groups), t.epoch, t.first_seq, last, since, steps, deep, buckets,
                               t.buckets_version, t.bucket_steps, t.plan, t.nbytes())
