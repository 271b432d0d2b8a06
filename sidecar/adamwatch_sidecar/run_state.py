"""What the sidecar knows about every trainer: the state behind /metrics.

The ingest loop applies each accepted message (HELLO, STEP, DROPPED, CHECKPOINT,
ACK, GOODBYE) to the state of its trainer, keyed by ``TrainerKey(job, rank)``;
the collector takes a :meth:`RunState.snapshot` at scrape time. One lock guards
everything: the ingest thread writes, the HTTP scrape thread reads, and the
scrape side only copies values out under it.

    >>> from adamwatch import wire
    >>> state = RunState(retention_seconds=60, clock=lambda: 1000.0)
    >>> key = state.hello("conn-1", {"job": "gpt", "rank": 0, "world_size": 1, "host": "h",
    ...     "pid": 1, "session": "s1", "adamwatch_version": "0.1.0",
    ...     "optimizer": {"kind": "AdamW", "param_groups": ["decay", "no_decay"]}})
    >>> key
    TrainerKey(job='gpt', rank=0)

Besides the metrics derived from trainer messages, other components
(remediation) record their own metrics through a small generic store validated
against the metric table: :meth:`RunState.inc`, :meth:`RunState.set_gauge`
(per trainer) and :meth:`RunState.inc_global`, :meth:`RunState.set_global_gauge`
(sidecar-wide).

Listeners added with :meth:`RunState.add_listener` are called as
``fn(key, message)`` after every accepted message has been applied and as
``fn(key, None)`` when the trainer's connection closes. They run on the ingest
loop thread: keep them quick and never block.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, NamedTuple, Optional

from adamwatch import wire

from .metric_table import BY_NAME, METRICS, STEP_DURATION_BUCKETS, MetricSpec, metric
from .sre_messages import validate_sre_message

__all__ = [
    "TrainerKey",
    "as_key",
    "RunState",
    "Listener",
    "Snapshot",
    "MESSAGE_METRICS",
    "MAX_PARAM_GROUPS",
    "MAX_LABEL_CHARS",
    "MAX_SKIP_REASONS",
    "CHECKPOINT_OUTCOMES",
]

log = logging.getLogger(__name__)


class _RateLimited(logging.Filter):
    """At most ``burst`` records per ``interval`` seconds pass (a broken trainer renders at every scrape)."""

    def __init__(self, burst: int = 5, interval: float = 60.0):
        super().__init__()
        self.burst, self.interval = burst, interval
        self._start, self._n = 0.0, 0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.created - self._start >= self.interval:
            self._start, self._n = record.created, 0
        self._n += 1
        return self._n <= self.burst


_render_log = logging.getLogger(__name__ + ".render")
_render_log.addFilter(_RateLimited())


class TrainerKey(NamedTuple):
    """Identifies one trainer process: its job name and its rank."""

    job: str
    rank: int


def as_key(key: Any) -> TrainerKey:
    """Normalise ``(job, rank)`` (rank may be given as a digit string) to a TrainerKey.

    Raises:
        ValueError: naming the bad part.
    """
    try:
        job, rank = key
    except (TypeError, ValueError):
        raise ValueError(f"trainer key must be (job, rank), got {key!r}") from None
    if isinstance(rank, str) and rank.isdigit():
        rank = int(rank)
    if not isinstance(job, str) or isinstance(rank, bool) or not isinstance(rank, int):
        raise ValueError(f"trainer key must be (job: str, rank: int), got {key!r}")
    return TrainerKey(job, rank)


Listener = Callable[[TrainerKey, Optional[wire.Message]], None]

# (spec, [(label values in spec.labels order, value), ...]); histogram values
# are (cumulative bucket counts aligned with HISTOGRAM_LE, sum, count).
Snapshot = list[tuple[MetricSpec, list[tuple[tuple[str, ...], Any]]]]

# A trainer's label cardinality is bounded: more groups than this is a bug or
# an attack, and the message is rejected as a schema violation.
MAX_PARAM_GROUPS = 256
MAX_LABEL_CHARS = 256
MAX_SKIP_REASONS = 16
# STEP.extras (adamwatch.step_extensions): names per message and kept per trainer
MAX_EXTRAS = 64
MAX_EXTRA_NAME_CHARS = 64
# MONITOR_ERRORS: distinct `where` values per trainer (more fold into "other")
MAX_ERROR_PLACES = 32

HISTOGRAM_LE: tuple[str, ...] = tuple(repr(float(b)) for b in STEP_DURATION_BUCKETS) + ("+Inf",)
_QUANTILE_LABELS: tuple[str, ...] = tuple(str(q) for q in wire.QUANTILES)
_NQ = len(wire.QUANTILES)

# Metrics maintained from trainer messages (here) and by the ingest server;
# the generic store refuses them so that no series can have two writers.
MESSAGE_METRICS: frozenset[str] = frozenset(
    {
        "adamwatch_loss",
        "adamwatch_grad_norm",
        "adamwatch_learning_rate",
        "adamwatch_optimizer_step",
        "adamwatch_steps_total",
        "adamwatch_step_rewinds_total",
        "adamwatch_nonfinite_steps_total",
        "adamwatch_skipped_steps_total",
        "adamwatch_step_duration_seconds",
        "adamwatch_last_step_timestamp_seconds",
        "adamwatch_samples_total",
        "adamwatch_tokens_total",
        "adamwatch_effective_learning_rate",
        "adamwatch_update_size",
        "adamwatch_update_to_weight_ratio",
        "adamwatch_adam_exp_avg_norm",
        "adamwatch_adam_exp_avg_sq_norm",
        "adamwatch_eps_dominated_ratio",
        "adamwatch_deep_stats_step",
        "adamwatch_trainer_connected",
        "adamwatch_trainer_finished",
        "adamwatch_optimizer_info",
        "adamwatch_dropped_summaries_total",
        "adamwatch_last_checkpoint_timestamp_seconds",
        "adamwatch_last_known_good_checkpoint_timestamp_seconds",
        "adamwatch_last_known_good_checkpoint_step",
        # checkpoint health (issue 11 item 4)
        "adamwatch_checkpoint_saves_total",
        "adamwatch_checkpoint_save_duration_seconds",
        "adamwatch_checkpoint_size_bytes",
        "adamwatch_last_checkpoint_save_failure_timestamp_seconds",
        "adamwatch_checkpoint_restores_total",
        "adamwatch_checkpoint_restore_duration_seconds",
        "adamwatch_corrupt_checkpoints_total",
        # gradient clipping (issue 8 item 1)
        "adamwatch_grad_clip_coefficient",
        "adamwatch_grad_clip_max_norm",
        "adamwatch_clipped_steps_total",
        # a monitor that cannot compute or send is never silent (issue 8 item 8)
        "adamwatch_monitor_errors_total",
        "adamwatch_trainer_hello_timestamp_seconds",
    }
)
_TRAINER_LABELS = ("job", "rank")
_DEEP_SCALARS = ("update_to_weight", "exp_avg_norm", "exp_avg_sq_norm", "eps_dominated_ratio")
_DEEP_LISTS = ("effective_lr", "update_size")


def _number(value: Any) -> bool:
    # An int too large for a float would break float() at scrape time.
    if isinstance(value, float):
        return True
    return isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63


def _label_text(value: Any, max_chars: int = 64) -> str:
    text = str(value)
    return text if len(text) <= max_chars else text[:max_chars]


# Label values of adamwatch_checkpoint_{saves,restores}_total{outcome}.
CHECKPOINT_OUTCOMES: tuple[str, ...] = ("success", "failed")


@dataclass
class _CheckpointHealth:
    """Counters and latest values from one trainer's Checkpointer events (checkpoint health)."""

    saves: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CHECKPOINT_OUTCOMES, 0))
    restores: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CHECKPOINT_OUTCOMES, 0))
    corrupt: int = 0
    save_duration: float | None = None
    size_bytes: int | None = None
    save_failure_time: float | None = None
    restore_duration: float | None = None


def _seconds_or_none(value: Any) -> float | None:
    # Durations and times from the trainer: NaN, infinite or negative ones are
    # not exported (a wrong number is worse than none).
    return float(value) if _number(value) and math.isfinite(value) and value >= 0 else None


def _note_checkpoint_health(t: "_Trainer", p: dict[str, Any]) -> None:
    """Apply one CHECKPOINT event to the trainer's checkpoint health; unknown kinds are ignored."""
    event = p["event"]
    if event not in wire.CHECKPOINT_EVENTS:
        return
    health = t.checkpoint_health
    if health is None:
        health = t.checkpoint_health = _CheckpointHealth()
    duration = _seconds_or_none(p.get("duration_s"))
    if event == "saved":
        health.saves["success"] += 1
        health.save_duration = duration if duration is not None else health.save_duration
        size = p.get("size_bytes")
        if isinstance(size, int) and size >= 0:
            health.size_bytes = size
    elif event == "save_failed":
        health.saves["failed"] += 1
        failed_at = _seconds_or_none(p["time"])
        if failed_at is not None:
            health.save_failure_time = failed_at
    elif event in ("restored", "restore_failed"):
        health.restores["success" if event == "restored" else "failed"] += 1
        health.restore_duration = duration if duration is not None else health.restore_duration
    elif event == "corrupt":
        health.corrupt += 1


@dataclass
class _Trainer:
    """Everything known about one trainer. Mutated only under RunState._lock."""

    key: TrainerKey
    base: tuple[str, str]
    hello: dict[str, Any] | None = None
    groups: list[str] = field(default_factory=list)
    group_labels: list[tuple[str, str, str]] = field(default_factory=list)
    info_labels: tuple[str, ...] | None = None
    conn_id: Any = None
    connected: bool = False
    disconnected_at: float | None = None
    session: str | None = None
    dropped_by_session: dict[str, int] = field(default_factory=dict)
    goodbye: dict[str, Any] | None = None
    # per step
    loss: float | None = None
    grad_norm: float | None = None
    group_grad_norms: list[float | None] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    step: int | None = None
    steps_total: int = 0
    # The newest step of the current session, and how often a session's step
    # went backwards (a restore, a loop restarting its counter): the step gauge
    # is not monotonic across those, and this counter says so.
    session_step: int | None = None
    step_rewinds: int = 0
    nonfinite_loss: int = 0
    nonfinite_grad: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    hist_counts: list[int] = field(default_factory=lambda: [0] * len(HISTOGRAM_LE))
    hist_sum: float = 0.0
    hist_count: int = 0
    last_step_time: float | None = None
    samples_total: float | None = None
    tokens_total: float | None = None
    # deep statistics
    deep: list[dict[str, Any]] | None = None
    deep_step: int | None = None
    # checkpoints
    last_checkpoint_time: float | None = None
    known_good_time: float | None = None
    known_good_step: int | None = None
    checkpoint_health: _CheckpointHealth | None = None
    # generic store: metric name -> {full label values: value}
    custom: dict[str, dict[tuple[str, ...], float]] = field(default_factory=dict)
    # STEP.extras: the latest value of each name (step extensions' numbers, for features to export)
    extras: dict[str, float | None] = field(default_factory=dict)
    # gradient clipping: the latest clipped step's coefficient and max_norm; steps clipped
    clip_coefficient: float | None = None
    clip_max_norm: float | None = None
    clipped_steps: int = 0
    # MONITOR_ERRORS: cumulative {where: count} per session (summed on export, never going down)
    monitor_errors_by_session: dict[str, dict[str, int]] = field(default_factory=dict)
    hello_time: float | None = None  # sidecar clock at the latest HELLO
    # bumped by every RunState method that may change this trainer: the /metrics
    # renderer re-renders a trainer only when it moved (snapshot_by_trainer)
    version: int = 0
    step_changes: int = 0  # how many of those bumps were STEPs (the rest of the families did not move)
    # group label + quantile label tuples, built once (the /metrics renderer compares them by identity):
    # group index -> that group's; -n -> those of groups 0..n-1 in a row
    quantile_labels: dict[int, tuple[tuple[str, ...], ...]] = field(default_factory=dict)

    def group_label(self, index: int) -> tuple[str, str, str]:
        labels = self.group_labels
        while len(labels) <= index:
            i = len(labels)
            labels.append(self.base + (self.groups[i] if i < len(self.groups) else str(i),))
        return labels[index]


def _validate_hello(payload: dict[str, Any]) -> list[str]:
    """Checks the schema cannot express; returns the param-group names."""
    job = payload["job"]
    if not job or len(job) > MAX_LABEL_CHARS:
        raise wire.SchemaError(f"HELLO.job must be 1..{MAX_LABEL_CHARS} characters, got {len(job)}")
    if payload["rank"] < 0:
        raise wire.SchemaError(f"HELLO.rank must be >= 0, got {payload['rank']}")
    groups = payload["optimizer"].get("param_groups", [])
    if not isinstance(groups, list) or not all(isinstance(g, str) and 0 < len(g) <= MAX_LABEL_CHARS for g in groups):
        raise wire.SchemaError("HELLO.optimizer.param_groups must be a list of non-empty strings")
    if len(groups) > MAX_PARAM_GROUPS:
        raise wire.SchemaError(f"HELLO.optimizer.param_groups has {len(groups)} entries, limit {MAX_PARAM_GROUPS}")
    if len(set(groups)) != len(groups) or "all" in groups:
        # Duplicates would merge series; "all" is the global grad norm's label.
        raise wire.SchemaError("HELLO.optimizer.param_groups must be unique and must not contain 'all'")
    return list(groups)


def _validate_step(payload: dict[str, Any]) -> None:
    """Checks the schema cannot express (inner structure of ``deep``, sizes)."""
    if payload["step"] < 0:
        raise wire.SchemaError(f"STEP.step must be >= 0, got {payload['step']}")
    if not math.isfinite(payload["time"]):
        # a NaN or infinite timestamp would break every "time since" alert
        raise wire.SchemaError(f"STEP.time must be a finite unix time, got {payload['time']!r}")
    if len(payload["group_grad_norms"]) > MAX_PARAM_GROUPS or len(payload["lr"]) > MAX_PARAM_GROUPS:
        raise wire.SchemaError(f"STEP carries more than {MAX_PARAM_GROUPS} param groups")
    for name in ("samples", "tokens"):
        value = payload.get(name)
        if value is not None and value < 0:
            raise wire.SchemaError(f"STEP.{name} must be >= 0, got {value}")
    extras = payload.get("extras")
    if extras is not None:
        if len(extras) > MAX_EXTRAS:
            raise wire.SchemaError(f"STEP.extras has {len(extras)} entries, limit {MAX_EXTRAS}")
        for name, value in extras.items():
            if not 0 < len(name) <= MAX_EXTRA_NAME_CHARS:
                raise wire.SchemaError(f"STEP.extras names must be 1..{MAX_EXTRA_NAME_CHARS} characters")
            if value is not None and not _number(value):
                raise wire.SchemaError(f"STEP.extras[{name!r}] must be a number, got {type(value).__name__}")
    deep = payload.get("deep")
    if deep is None:
        return
    if len(deep) > MAX_PARAM_GROUPS:
        raise wire.SchemaError(f"STEP.deep carries more than {MAX_PARAM_GROUPS} param groups")
    for index, entry in enumerate(deep):
        for name in _DEEP_LISTS:
            values = entry.get(name)
            if values is None:
                continue
            if not isinstance(values, list) or len(values) != _NQ or not all(
                v is None or _number(v) for v in values
            ):
                raise wire.SchemaError(f"STEP.deep[{index}].{name} must be a list of {_NQ} numbers (wire.QUANTILES)")
        for name in _DEEP_SCALARS:
            value = entry.get(name)
            if value is not None and not _number(value):
                raise wire.SchemaError(f"STEP.deep[{index}].{name} must be a number, got {type(value).__name__}")


def _info_labels(base: tuple[str, str], hello: dict[str, Any]) -> tuple[str, ...]:
    opt = hello["optimizer"]
    betas = opt.get("betas")
    if not (isinstance(betas, list) and len(betas) == 2):
        betas = ["", ""]
    amsgrad = opt.get("amsgrad")
    return base + (
        _label_text(opt.get("kind", "")),
        _label_text(opt.get("implementation", "")),
        _label_text(betas[0]),
        _label_text(betas[1]),
        _label_text(opt.get("eps", "")),
        _label_text(opt.get("weight_decay", "")),
        ("true" if amsgrad else "false") if isinstance(amsgrad, bool) else _label_text(amsgrad or ""),
        str(hello["world_size"]),
        _label_text(hello["host"], MAX_LABEL_CHARS),
        _label_text(hello.get("torch_version") or ""),
        _label_text(hello["adamwatch_version"]),
        _label_text(hello.get("config_hash") or ""),
    )


class RunState:
    """Per-trainer state built from trainer messages, plus a validated generic store.

    Args:
        retention_seconds: how long a disconnected trainer's series stay before
            its state is deleted (by :meth:`expire`, called once a second).
        clock: returns unix seconds; injected so tests need no sleeps.
    """

    def __init__(self, retention_seconds: float = 300.0, clock: Callable[[], float] = time.time):
        if not _number(retention_seconds) or retention_seconds < 0:
            raise ValueError(f"retention_seconds: must be a number >= 0, got {retention_seconds!r}")
        self.retention_seconds = float(retention_seconds)
        self._clock = clock
        self._lock = threading.Lock()
        self._trainers: dict[TrainerKey, _Trainer] = {}
        self._globals: dict[str, dict[tuple[str, ...], float]] = {}
        self._listeners: list[Listener] = []
        self._listener_types: list[frozenset[wire.MessageType] | None] = []  # parallel to _listeners
        self._by_type: dict[wire.MessageType, list[Listener]] = {}  # message type -> the listeners it reaches

    # ------------------------------------------------------------------ listeners
    def add_listener(self, fn: Listener, types: Iterable[wire.MessageType] | None = None) -> None:
        """Call ``fn(key, message)`` after each accepted message, ``fn(key, None)`` on disconnect.

        Args:
            fn: runs on the ingest loop thread; exceptions are logged and ignored.
            types: only messages of these types reach ``fn`` (disconnects always do);
                None: every message. A listener with nothing to do for a STEP says so
                here, so the ingest hot path does not call it tens of thousands of times a second.
        """
        self._listeners.append(fn)
        wanted = None if types is None else frozenset(types)
        self._listener_types.append(wanted)
        self._by_type = {t: [f for f, w in zip(self._listeners, self._listener_types) if w is None or t in w]
                         for t in wire.MessageType}

    def _notify(self, key: TrainerKey, message: wire.Message | None) -> None:
        listeners = self._listeners if message is None else self._by_type.get(message.type, self._listeners)
        for fn in listeners:
            try:
                fn(key, message)
            except Exception:
                log.exception("run-state listener %r failed on %s", fn, key)

    # ------------------------------------------------------------------ messages
    def hello(self, conn_id: Any, payload: dict[str, Any],
              on_registered: Callable[[TrainerKey], None] | None = None) -> TrainerKey:
        """Register (or re-register) a trainer from its HELLO; counters are kept.

        Args:
            conn_id: identifies the connection; a later :meth:`disconnect` only
                counts when it comes from the trainer's current connection.
            payload: a HELLO payload already validated by ``wire``.
            on_registered: called with the key after the state is updated and
                before the listeners (ingest uses it to route commands, so a
                listener may already send one to the new trainer).

        Returns:
            The trainer's key.

        Raises:
            wire.SchemaError: for what the wire schema cannot express
                (empty job, negative rank, bad param-group names).
        """
        groups = _validate_hello(payload)
        key = TrainerKey(payload["job"], payload["rank"])
        with self._lock:
            trainer = self._trainers.get(key)
            if trainer is None:
                trainer = self._trainers[key] = _Trainer(key, (key.job, str(key.rank)))
            trainer.version += 1
            if trainer.groups != groups:
                trainer.groups = groups
                trainer.group_labels = []
                trainer.quantile_labels = {}
            trainer.hello = payload
            trainer.info_labels = _info_labels(trainer.base, payload)
            trainer.conn_id = conn_id
            trainer.connected = True
            trainer.disconnected_at = None
            trainer.goodbye = None
            if trainer.session != payload["session"]:
                trainer.session_step = None  # a new run of the script starts its own count
            trainer.session = payload["session"]
            trainer.hello_time = self._clock()
            self._note_dropped(trainer, payload.get("dropped_total"))
            errors = payload.get("monitor_errors")
            if isinstance(errors, dict):
                try:
                    self._note_monitor_errors(trainer, errors)
                except wire.SchemaError:
                    pass  # a bad optional field must not refuse the trainer; MONITOR_ERRORS frames follow
        if on_registered is not None:
            on_registered(key)
        self._notify(key, wire.Message(wire.MessageType.HELLO, payload))
        return key

    def apply(self, key: TrainerKey, message: wire.Message) -> None:
        """Apply one validated non-HELLO message from the trainer ``key``.

        Args:
            key: the trainer, as returned by :meth:`hello`.
            message: a decoded message (STEP, DROPPED, CHECKPOINT, ACK, GOODBYE).

        Raises:
            wire.SchemaError: the payload breaks a rule the wire schema cannot express.
            wire.FrameError: reason "unexpected" for a message type a trainer may not send.
        """
        mtype = message.type
        payload = message.payload
        if mtype is wire.MessageType.STEP:
            _validate_step(payload)
            with self._lock:
                trainer = self._trainers.get(key)
                if trainer is None:
                    raise wire.FrameError("unexpected", f"STEP for unknown trainer {key}")
                trainer.version += 1
                trainer.step_changes += 1
                self._apply_step(trainer, payload)
        elif mtype is wire.MessageType.DROPPED:
            with self._lock:
                self._note_dropped(self._get(key), payload["dropped_total"])
        elif mtype is wire.MessageType.CHECKPOINT:
            with self._lock:
                trainer = self._get(key)
                event = payload["event"]
                if event == "saved":
                    trainer.last_checkpoint_time = float(payload["time"])
                elif event == "known_good":
                    trainer.known_good_time = float(payload["time"])
                    trainer.known_good_step = payload["step"]
                _note_checkpoint_health(trainer, payload)
        elif mtype is wire.MessageType.MONITOR_ERRORS:
            with self._lock:
                self._note_monitor_errors(self._get(key), payload["errors"])
        elif mtype is wire.MessageType.GOODBYE:
            with self._lock:
                self._get(key).goodbye = payload
        elif mtype is wire.MessageType.ACK:
            with self._lock:
                self._get(key)
        elif mtype is wire.MessageType.CONFIG:
            # The optimizer's configuration changed mid-run: the info series
            # follows the new fingerprint (counting and policy are listeners').
            with self._lock:
                trainer = self._get(key)
                if trainer.hello is not None:
                    trainer.hello = dict(trainer.hello, config=payload["config"], config_hash=payload["config_hash"])
                    trainer.info_labels = _info_labels(trainer.base, trainer.hello)
        elif mtype in (wire.MessageType.EVAL, wire.MessageType.FOOTPRINT):
            # issue 11: listeners (adamwatch_sidecar.evaluation, .footprint) export these
            validate_sre_message(mtype, payload)
            with self._lock:
                self._get(key)
        elif mtype is wire.MessageType.FINGERPRINT:
            # Kept by the replica check (adamwatch_sidecar.replica_check), a listener.
            value = payload["fingerprint"]
            if not 0 <= value < 1 << 53:
                raise wire.SchemaError(f"FINGERPRINT.fingerprint must be an integer in [0, 2^53), got {value}")
            with self._lock:
                self._get(key)
        else:
            raise wire.FrameError("unexpected", f"{mtype.name} is not a trainer message")
        if self._listeners:
            self._notify(key, message)

    def _get(self, key: TrainerKey) -> _Trainer:
        trainer = self._trainers.get(key)
        if trainer is None:
            raise wire.FrameError("unexpected", f"message for unknown trainer {key}")
        trainer.version += 1  # callers change it
        return trainer

    @staticmethod
    def _note_dropped(trainer: _Trainer, dropped_total: Any) -> None:
        # dropped_total is cumulative per session (one Monitor); a restarted
        # trainer starts a new session at 0, so the exported counter is the sum
        # over sessions and never goes backwards.
        if dropped_total is None or trainer.session is None or dropped_total < 0:
            return
        previous = trainer.dropped_by_session.get(trainer.session, 0)
        if dropped_total > previous:
            trainer.dropped_by_session[trainer.session] = dropped_total

    @staticmethod
    def _note_monitor_errors(trainer: _Trainer, errors: dict[str, Any]) -> None:
        # Cumulative per session, like dropped_total: a restarted trainer starts
        # at 0 in a new session and the exported counter never goes backwards.
        if trainer.session is None:
            return
        for where, count in errors.items():
            if not isinstance(where, str) or isinstance(count, bool) or not isinstance(count, int) \
                    or not 0 <= count < 2**63:
                raise wire.SchemaError("MONITOR_ERRORS.errors must map names to counts >= 0")
        known = trainer.monitor_errors_by_session.setdefault(trainer.session, {})
        places = {w for counts in trainer.monitor_errors_by_session.values() for w in counts}
        for where, count in errors.items():
            where = _label_text(where)
            if where not in places and len(places) >= MAX_ERROR_PLACES:
                where = "other"  # free text from the trainer: bound the label's values
            places.add(where)
            if int(count) > known.get(where, 0):
                known[where] = int(count)

    @staticmethod
    def _apply_step(t: _Trainer, p: dict[str, Any]) -> None:
        get = p.get
        loss = get("loss")
        loss_nonfinite = get("loss_nonfinite")
        if loss is not None:
            t.loss = loss
        elif loss_nonfinite:
            t.loss = math.nan
        if p["grad_norm"] is not None:
            t.grad_norm = p["grad_norm"]
        norms = p["group_grad_norms"]
        if norms:
            old = t.group_grad_norms
            if len(old) == len(norms):
                # keep the previous value of a group whose norm is unknown (null)
                t.group_grad_norms = [o if n is None else n for n, o in zip(norms, old)]
            else:
                t.group_grad_norms = norms
        if p["lr"]:
            t.lr = p["lr"]
        step = p["step"]
        last = t.session_step
        if last is not None and step < last:
            t.step_rewinds += 1
        t.session_step = step
        t.step = step
        t.steps_total += 1
        if loss_nonfinite:
            t.nonfinite_loss += 1
        # A GradScaler overflow is the scaler doing its job (fp16 start-up, each
        # growth interval): counted as a skipped step, not as a non-finite one,
        # so the critical non-finite alert does not page on routine mixed precision.
        if p["grad_nonfinite"] and not (get("skipped") and get("skip_reason") == "grad_scaler"):
            t.nonfinite_grad += 1
        if get("skipped"):
            reason = get("skip_reason") or "unknown"
            skipped = t.skipped
            if reason not in skipped and len(skipped) >= MAX_SKIP_REASONS:
                reason = "other"  # the reason is free text: bound the label's values
            skipped[reason] = skipped.get(reason, 0) + 1
        duration = p["duration_s"]
        if duration is not None and duration >= 0:  # NaN compares false: not observed
            t.hist_counts[bisect.bisect_left(STEP_DURATION_BUCKETS, duration)] += 1
            t.hist_sum += duration
            t.hist_count += 1
        t.last_step_time = p["time"]
        samples = get("samples")
        if samples is not None:
            t.samples_total = (t.samples_total or 0.0) + samples
        tokens = get("tokens")
        if tokens is not None:
            t.tokens_total = (t.tokens_total or 0.0) + tokens
        deep = get("deep")
        if deep is not None:
            t.deep = deep
            t.deep_step = step
        extras = get("extras")
        if extras:
            if len(t.extras) + len(extras) > MAX_EXTRAS and not extras.keys() <= t.extras.keys():
                t.extras = {}  # names changed: start over rather than grow without bound
            t.extras.update((name, None if v is None else float(v)) for name, v in extras.items())
        coefficient = get("clip_coefficient")
        if coefficient is not None:
            t.clip_coefficient = float(coefficient)
            t.clip_max_norm = get("clip_max_norm")
            if coefficient < 1.0:
                t.clipped_steps += 1

    def disconnect(self, key: TrainerKey, conn_id: Any) -> bool:
        """The connection ``conn_id`` of trainer ``key`` closed.

        Returns:
            True when it was the trainer's current connection (now marked
            disconnected; listeners get ``fn(key, None)``), False for a
            connection that had already been replaced.
        """
        with self._lock:
            trainer = self._trainers.get(key)
            if trainer is None or trainer.conn_id != conn_id or not trainer.connected:
                return False
            trainer.version += 1
            trainer.connected = False
            trainer.conn_id = None
            trainer.disconnected_at = self._clock()
        self._notify(key, None)
        return True

    def expire(self, now: float | None = None) -> list[TrainerKey]:
        """Delete trainers disconnected for at least ``retention_seconds``.

        Args:
            now: unix seconds; the injected clock when None.

        Returns:
            The keys whose state was deleted.
        """
        now = self._clock() if now is None else now
        limit = now - self.retention_seconds
        with self._lock:
            gone = [
                k for k, t in self._trainers.items()
                if not t.connected and t.disconnected_at is not None and t.disconnected_at <= limit
            ]
            for k in gone:
                del self._trainers[k]
        for k in gone:
            log.info("trainer job=%s rank=%s expired after %.0f s disconnected", k.job, k.rank, self.retention_seconds)
        return gone

    # ------------------------------------------------------------------ queries
    def keys(self) -> list[TrainerKey]:
        """Every trainer currently known (connected or within retention)."""
        with self._lock:
            return list(self._trainers)

    def is_connected(self, key: TrainerKey) -> bool:
        """Whether trainer ``key`` has an open connection now."""
        with self._lock:
            trainer = self._trainers.get(as_key(key))
            return bool(trainer and trainer.connected)

    def knows(self, key: TrainerKey) -> bool:
        """Whether the state holds trainer ``key`` (connected or within retention)."""
        return key in self._trainers

    def trainer_count(self) -> int:
        """Trainers held now (connected or within retention); O(1)."""
        return len(self._trainers)

    def describe(self, key: TrainerKey) -> dict[str, Any] | None:
        """A plain summary of one trainer (for status endpoints), or None if unknown.

        Returns:
            ``{"job", "rank", "connected", "step", "last_step_time", "loss",
            "grad_norm", "learning_rates", "param_groups", "session", "hello",
            "known_good_step", "dropped_total", "goodbye"}``.
        """
        key = as_key(key)
        with self._lock:
            t = self._trainers.get(key)
            if t is None:
                return None
            return {
                "job": key.job,
                "rank": key.rank,
                "connected": t.connected,
                "step": t.step,
                "last_step_time": t.last_step_time,
                "loss": t.loss,
                "grad_norm": t.grad_norm,
                "learning_rates": {t.group_label(i)[2]: v for i, v in enumerate(t.lr)},
                "param_groups": list(t.groups),
                "session": t.session,
                "hello": t.hello,
                "known_good_step": t.known_good_step,
                "dropped_total": sum(t.dropped_by_session.values()),
                "goodbye": t.goodbye,
                "extras": dict(t.extras),
            }

    # ------------------------------------------------------------------ generic store
    @staticmethod
    def _check(name: str, kind: str, labels: dict[str, Any], trainer: bool) -> tuple[MetricSpec, tuple[str, ...]]:
        spec = metric(name)
        if name in MESSAGE_METRICS or name not in BY_NAME:
            raise ValueError(f"{name}: is maintained from trainer messages and cannot be written directly")
        if spec.type != kind:
            raise ValueError(f"{name}: is a {spec.type}, not a {kind}")
        has_trainer = spec.labels[:2] == _TRAINER_LABELS
        if has_trainer != trainer:
            where = "per-trainer (use inc/set_gauge with a key)" if has_trainer else "sidecar-wide (use inc_global/set_global_gauge)"
            raise ValueError(f"{name}: is {where}")
        expected = spec.labels[2:] if trainer else spec.labels
        if not isinstance(labels, dict) or set(labels) != set(expected):
            got = sorted(labels) if isinstance(labels, dict) else labels
            raise ValueError(f"{name}: labels must be {list(expected)}, got {got!r}")
        return spec, tuple(str(labels[n]) for n in expected)

    @staticmethod
    def _amount(name: str, amount: Any) -> float:
        if not _number(amount) or not amount >= 0:
            raise ValueError(f"{name}: counter increment must be a number >= 0, got {amount!r}")
        return float(amount)

    def _trainer_for_store(self, key: TrainerKey) -> _Trainer:
        key = as_key(key)
        trainer = self._trainers.get(key)
        if trainer is None:
            # A component may record something for a trainer we have not heard
            # from (e.g. an alert for an expired one): keep it for the retention time.
            trainer = self._trainers[key] = _Trainer(key, (key.job, str(key.rank)), disconnected_at=self._clock())
        trainer.version += 1  # callers change it
        return trainer

    def inc(self, key: TrainerKey, metric_name: str, labels: dict[str, Any], amount: float = 1.0) -> None:
        """Add ``amount`` to a per-trainer counter of the metric table.

        Args:
            key: the trainer (job, rank).
            metric_name: exposed name, e.g. ``adamwatch_remediations_total``.
            labels: every label of the metric except job and rank.
            amount: a number >= 0.

        Raises:
            KeyError: the metric is not in the table.
            ValueError: not a counter, wrong label set, negative amount, or a
                metric maintained from trainer messages.
        """
        _, values = self._check(metric_name, "counter", labels, trainer=True)
        amount = self._amount(metric_name, amount)
        with self._lock:
            trainer = self._trainer_for_store(key)
            series = trainer.custom.setdefault(metric_name, {})
            full = trainer.base + values
            series[full] = series.get(full, 0.0) + amount

    def set_gauge(self, key: TrainerKey, metric_name: str, labels: dict[str, Any], value: float) -> None:
        """Set a per-trainer gauge of the metric table (see :meth:`inc` for the rules)."""
        _, values = self._check(metric_name, "gauge", labels, trainer=True)
        if not _number(value):
            raise ValueError(f"{metric_name}: gauge value must be a number, got {value!r}")
        with self._lock:
            trainer = self._trainer_for_store(key)
            trainer.custom.setdefault(metric_name, {})[trainer.base + values] = float(value)

    def inc_global(self, metric_name: str, labels: dict[str, Any], amount: float = 1.0) -> None:
        """Add ``amount`` to a sidecar-wide counter (no job/rank labels).

        Raises:
            KeyError: the metric is not in the table.
            ValueError: not a counter, wrong label set, or a per-trainer metric.
        """
        _, values = self._check(metric_name, "counter", labels, trainer=False)
        amount = self._amount(metric_name, amount)
        with self._lock:
            series = self._globals.setdefault(metric_name, {})
            series[values] = series.get(values, 0.0) + amount

    def set_global_gauge(self, metric_name: str, labels: dict[str, Any], value: float) -> None:
        """Set a sidecar-wide gauge (no job/rank labels); rules as :meth:`inc_global`."""
        _, values = self._check(metric_name, "gauge", labels, trainer=False)
        if not _number(value):
            raise ValueError(f"{metric_name}: gauge value must be a number, got {value!r}")
        with self._lock:
            self._globals.setdefault(metric_name, {})[values] = float(value)

    def remove_series(self, key: TrainerKey, metric_name: str, labels: dict[str, Any]) -> None:
        """Delete one per-trainer series of the generic store (a value that is no longer known).

        Args:
            key: the trainer; labels: every label of the metric except job and rank.
        """
        spec = metric(metric_name)
        _, values = self._check(metric_name, spec.type, labels, trainer=True)
        with self._lock:
            trainer = self._trainers.get(as_key(key))
            if trainer is not None and metric_name in trainer.custom:
                trainer.version += 1
                trainer.custom[metric_name].pop(trainer.base + values, None)

    def value(self, metric_name: str, labels: dict[str, Any]) -> float | None:
        """Current value of one series by its full label set (tests, status pages).

        Histograms are not supported; returns None when the series does not exist.
        """
        spec = metric(metric_name)
        try:
            wanted = tuple(str(labels[n]) for n in spec.labels)
        except KeyError as exc:
            raise ValueError(f"{metric_name}: missing label {exc.args[0]!r}") from None
        for s, samples in self.snapshot(only=metric_name):
            for values, v in samples:
                if values == wanted:
                    return v
        return None

    # ------------------------------------------------------------------ snapshot
    def snapshot(self, only: str | None = None) -> Snapshot:
        """Every series, in METRICS order, copied out under the lock.

        Args:
            only: restrict to one metric name (tests).

        Returns:
            ``[(spec, [(label values, value), ...]), ...]`` for every metric in
            the table (empty lists included, so every family is declared).
        """
        specs = [spec for spec in METRICS if only is None or spec.name == only]
        lists: list[list[tuple[tuple[str, ...], Any]]] = [[] for _ in specs]
        everything, _, _, _, index = _renderer_order()
        position = {index[spec.name]: n for n, spec in enumerate(specs)}  # METRICS index -> lists index
        renderers = everything if only is None else [(i, r) for i, r in everything if i in position]
        failed: list[tuple[TrainerKey, str]] = []
        with self._lock:
            trainers = list(self._trainers.values())
        # The lock is taken trainer by trainer, not for the whole copy: with
        # 1,024 ranks the copy takes tens of ms and ingest must keep applying
        # steps meanwhile (issue 15). Each trainer's series stay consistent.
        for t in trainers:
            with self._lock:
                if self._trainers.get(t.key) is not t:
                    continue  # expired or replaced since the list was taken
                custom = t.custom
                if custom and only is not None:
                    custom = {only: custom[only]} if only in custom else None
                try:
                    # Trainer by trainer, so that a bug rendering one trainer's
                    # state costs that trainer's series, never the whole scrape.
                    layout, labels, values = _part(t, renderers if t.hello is not None else (), custom, index)
                except Exception as exc:
                    failed.append((t.key, f"{type(exc).__name__}: {exc}"[:200]))
                    continue
            start = 0
            for i, end in layout:
                lists[position[i]].extend(zip(labels[start:end], values[start:end]))
                start = end
        with self._lock:
            if failed:
                errors = self._globals.setdefault("adamwatch_sidecar_render_errors_total", {})
                errors[()] = errors.get((), 0.0) + len(failed)
            for spec, samples in zip(specs, lists):
                glob = self._globals.get(spec.name)
                if glob:
                    samples.extend(glob.items())
        for key, error in failed:
            _render_log.warning("trainer job=%.64r rank=%s: its series could not be rendered (%s) and are left "
                                "out of this scrape", key.job, key.rank, error)
        return list(zip(specs, lists))

    def snapshot_by_trainer(self, known: dict | None = None) -> tuple[
            list[MetricSpec], list[tuple[TrainerKey, tuple[Part | None, Part | None, Part | None] | None]],
            list[list[tuple[tuple[str, ...], Any]]]]:
        """Every series, grouped by trainer, for the incremental /metrics renderer.

        Same series as :meth:`snapshot`; the lock is held one trainer at a time.
        A trainer's families come in three parts that change at different rates:
        what every STEP moves (:data:`STEP_METRICS`), the Adam-state statistics
        (:data:`DEEP_METRICS`, new only with a STEP's deep block: one step in
        ``deep_stats_every``), and the rest (HELLO, checkpoints, errors,
        remediation counters...). A part that cannot have changed since the
        caller's last copy is not copied.

        Args:
            known: the caller's record of each trainer from its last call,
                updated here. Without it every part is copied.

        Returns:
            ``(specs, trainers, globals)``: ``specs`` is METRICS; ``trainers`` is
            ``[(key, (steps, deep, rest)), ...]`` where each part is a
            :data:`Part`, or None when unchanged since the caller's last copy
            (the tuple itself None when nothing changed); ``globals[i]`` holds
            the sidecar-wide samples of ``specs[i]``.
        """
        specs = list(METRICS)
        _, steps_order, deep_order, rest_order, index = _renderer_order()
        failed: list[tuple[TrainerKey, str]] = []
        out: list = []
        with self._lock:
            trainers = list(self._trainers.values())
        for t in trainers:
            with self._lock:
                if self._trainers.get(t.key) is not t:
                    continue  # expired or replaced since the list was taken
                seen = known.get(t.key) if known is not None else None
                if seen is not None and seen[0] is not t:
                    seen = None
                if seen is not None and seen[1] == t.version:
                    out.append((t.key, None))  # unchanged since the caller's last copy
                    continue
                others = t.version - t.step_changes  # changes by anything but a STEP
                # The deep families read t.deep (replaced, never changed in
                # place, by a STEP with a deep block), t.deep_step and the group
                # labels (a new list when a HELLO renames the groups).
                deep_same = (seen is not None and seen[3] is t.deep and seen[4] == t.deep_step
                             and seen[5] is t.group_labels)
                rest_same = seen is not None and seen[2] == others
                if known is not None:
                    known[t.key] = (t, t.version, others, t.deep, t.deep_step, t.group_labels)
                try:
                    hello = t.hello is not None
                    parts = (_part(t, steps_order if hello else (), None, index),
                             None if deep_same else _part(t, deep_order if hello else (), None, index),
                             None if rest_same else _part(t, rest_order if hello else (), t.custom, index))
                except Exception as exc:
                    if known is not None:
                        known.pop(t.key, None)
                    failed.append((t.key, f"{type(exc).__name__}: {exc}"[:200]))
                    continue
            out.append((t.key, parts))
        globs: list[list] = []
        with self._lock:
            if failed:
                errors = self._globals.setdefault("adamwatch_sidecar_render_errors_total", {})
                errors[()] = errors.get((), 0.0) + len(failed)
            for spec in specs:
                glob = self._globals.get(spec.name)
                globs.append(list(glob.items()) if glob else [])
        for key, error in failed:
            _render_log.warning("trainer job=%.64r rank=%s: its series could not be rendered (%s) and are left "
                                "out of this scrape", key.job, key.rank, error)
        return specs, out, globs

    def count_render_errors(self, n: int = 1) -> None:
        """Count trainers whose series were left out of a scrape (see the collector)."""
        self.inc_global("adamwatch_sidecar_render_errors_total", {}, n)


# --------------------------------------------------------------------------- renderers
# One function per message-derived metric: append each series' label values to
# ``labels`` and its value to ``values`` (aligned lists: the incremental
# /metrics renderer formats the values of unchanged label sets in one go).

def _r_loss(t: _Trainer, labels: list, values: list) -> None:
    if t.loss is not None:
        labels.append(t.base)
        values.append(t.loss)


def _r_grad_norm(t: _Trainer, labels: list, values: list) -> None:
    if t.grad_norm is not None:
        labels.append(t.base + ("all",))
        values.append(t.grad_norm)
    for i, v in enumerate(t.group_grad_norms):
        if v is not None:
            labels.append(t.group_label(i))
            values.append(v)


def _r_lr(t: _Trainer, labels: list, values: list) -> None:
    for i, v in enumerate(t.lr):
        labels.append(t.group_label(i))
        values.append(v)


def _r_step(t: _Trainer, labels: list, values: list) -> None:
    if t.step is not None:
        labels.append(t.base)
        values.append(float(t.step))


def _r_steps_total(t: _Trainer, labels: list, values: list) -> None:
    labels.append(t.base)
    values.append(float(t.steps_total))


def _r_step_rewinds(t: _Trainer, labels: list, values: list) -> None:
    labels.append(t.base)
    values.append(float(t.step_rewinds))


def _r_nonfinite(t: _Trainer, labels: list, values: list) -> None:
    labels.append(t.base + ("loss",))
    values.append(float(t.nonfinite_loss))
    labels.append(t.base + ("grad",))
    values.append(float(t.nonfinite_grad))


def _r_skipped(t: _Trainer, labels: list, values: list) -> None:
    for reason, n in t.skipped.items():
        labels.append(t.base + (reason,))
        values.append(float(n))


def _r_duration(t: _Trainer, labels: list, values: list) -> None:
    labels.append(t.base)
    values.append((list(itertools.accumulate(t.hist_counts)), t.hist_sum, t.hist_count))


def _r_last_step(t: _Trainer, labels: list, values: list) -> None:
    if t.last_step_time is not None:
        labels.append(t.base)
        values.append(float(t.last_step_time))


def _r_samples(t: _Trainer, labels: list, values: list) -> None:
    if t.samples_total is not None:
        labels.append(t.base)
        values.append(t.samples_total)


def _r_tokens(t: _Trainer, labels: list, values: list) -> None:
    if t.tokens_total is not None:
        labels.append(t.base)
        values.append(t.tokens_total)


def _deep_quantiles(field_name: str) -> Callable[[_Trainer, list, list], None]:
    def render(t: _Trainer, labels: list, values: list) -> None:
        deep = t.deep
        if not deep:
            return
        found = [entry.get(field_name) for entry in deep]
        for quantiles in found:
            if quantiles is None or len(quantiles) != _NQ or None in quantiles:
                break
        else:  # the usual case: every quantile of every group, without a Python loop over them
            flat = t.quantile_labels.get(-len(deep))  # keyed by -n: the labels of groups 0..n-1
            if flat is None:
                flat = t.quantile_labels[-len(deep)] = tuple(
                    itertools.chain.from_iterable(_quantile_labels(t, i) for i in range(len(deep))))
            labels.extend(flat)
            values.extend(itertools.chain.from_iterable(found))
            return
        for i, quantiles in enumerate(found):
            if quantiles is not None:
                for label_set, v in zip(_quantile_labels(t, i), quantiles):
                    if v is not None:
                        labels.append(label_set)
                        values.append(v)

    return render


def _quantile_labels(t: _Trainer, group: int) -> tuple[tuple[str, ...], ...]:
    full = t.quantile_labels.get(group)
    if full is None:
        labels = t.group_label(group)
        full = t.quantile_labels[group] = tuple(labels + (q,) for q in _QUANTILE_LABELS)
    return full


def _deep_scalar(field_name: str) -> Callable[[_Trainer, list, list], None]:
    def render(t: _Trainer, labels: list, values: list) -> None:
        deep = t.deep
        if not deep:
            return
        found = [entry.get(field_name) for entry in deep]
        if None in found:
            for i, v in enumerate(found):
                if v is not None:
                    labels.append(t.group_label(i))
                    values.append(v)
        else:  # the usual case: every group has it
            t.group_label(len(deep) - 1)  # builds the labels of groups 0..n-1
            labels.extend(t.group_labels[:len(deep)])
            values.extend(found)

    return render


def _r_deep_step(t: _Trainer, labels: list, values: list) -> None:
    if t.deep_step is not None:
        labels.append(t.base)
        values.append(float(t.deep_step))


def _r_connected(t: _Trainer, labels: list, values: list) -> None:
    labels.append(t.base)
    values.append(1.0 if t.connected else 0.0)


def _r_finished(t: _Trainer, labels: list, values: list) -> None:
    # A GOODBYE means the run ended on purpose: alerts on a disconnected
    # trainer exclude it. A new HELLO clears it (see hello()).
    # A GOODBYE that reports a crash (exception, OOM, fatal signal: issue 11)
    # is not a finished run: the disconnection alert must still see it.
    finished = t.goodbye is not None and t.goodbye.get("exit_reason") in (None, "clean", "preemption")
    labels.append(t.base)
    values.append(1.0 if finished else 0.0)


def _r_info(t: _Trainer, labels: list, values: list) -> None:
    if t.info_labels is not None:
        labels.append(t.info_labels)
        values.append(1.0)


def _r_dropped(t: _Trainer, labels: list, values: list) -> None:
    labels.append(t.base)
    values.append(float(sum(t.dropped_by_session.values())))


def _r_ckpt(t: _Trainer, labels: list, values: list) -> None:
    if t.last_checkpoint_time is not None:
        labels.append(t.base)
        values.append(t.last_checkpoint_time)


def _r_known_good_time(t: _Trainer, labels: list, values: list) -> None:
    if t.known_good_time is not None:
        labels.append(t.base)
        values.append(t.known_good_time)


def _r_known_good_step(t: _Trainer, labels: list, values: list) -> None:
    if t.known_good_step is not None:
        labels.append(t.base)
        values.append(float(t.known_good_step))


def _checkpoint_outcomes(attr: str) -> Callable[[_Trainer, list, list], None]:
    def render(t: _Trainer, labels: list, values: list) -> None:
        if t.checkpoint_health is not None:
            for outcome, n in getattr(t.checkpoint_health, attr).items():
                labels.append(t.base + (outcome,))
                values.append(float(n))

    return render


def _checkpoint_value(attr: str) -> Callable[[_Trainer, list, list], None]:
    def render(t: _Trainer, labels: list, values: list) -> None:
        value = getattr(t.checkpoint_health, attr) if t.checkpoint_health is not None else None
        if value is not None:
            labels.append(t.base)
            values.append(float(value))

    return render


def _r_monitor_errors(t: _Trainer, labels: list, values: list) -> None:
    totals: dict[str, int] = {}
    for counts in t.monitor_errors_by_session.values():
        for where, n in counts.items():
            totals[where] = totals.get(where, 0) + n
    for where in sorted(totals):
        labels.append(t.base + (where,))
        values.append(float(totals[where]))


def _r_hello_time(t: _Trainer, labels: list, values: list) -> None:
    if t.hello_time is not None:
        labels.append(t.base)
        values.append(t.hello_time)


def _r_clip_coefficient(t: _Trainer, labels: list, values: list) -> None:
    if t.clip_coefficient is not None:
        labels.append(t.base)
        values.append(t.clip_coefficient)


def _r_clip_max_norm(t: _Trainer, labels: list, values: list) -> None:
    if t.clip_max_norm is not None:
        labels.append(t.base)
        values.append(float(t.clip_max_norm))


def _r_clipped_steps(t: _Trainer, labels: list, values: list) -> None:
    # Present (at 0) from the first step that was clipped at all, so increase() sees the first one.
    if t.clip_coefficient is not None:
        labels.append(t.base)
        values.append(float(t.clipped_steps))


_RENDERERS: dict[str, Callable[[_Trainer, list, list], None]] = {
    "adamwatch_loss": _r_loss,
    "adamwatch_grad_norm": _r_grad_norm,
    "adamwatch_learning_rate": _r_lr,
    "adamwatch_optimizer_step": _r_step,
    "adamwatch_steps_total": _r_steps_total,
    "adamwatch_step_rewinds_total": _r_step_rewinds,
    "adamwatch_nonfinite_steps_total": _r_nonfinite,
    "adamwatch_skipped_steps_total": _r_skipped,
    "adamwatch_step_duration_seconds": _r_duration,
    "adamwatch_last_step_timestamp_seconds": _r_last_step,
    "adamwatch_samples_total": _r_samples,
    "adamwatch_tokens_total": _r_tokens,
    "adamwatch_effective_learning_rate": _deep_quantiles("effective_lr"),
    "adamwatch_update_size": _deep_quantiles("update_size"),
    "adamwatch_update_to_weight_ratio": _deep_scalar("update_to_weight"),
    "adamwatch_adam_exp_avg_norm": _deep_scalar("exp_avg_norm"),
    "adamwatch_adam_exp_avg_sq_norm": _deep_scalar("exp_avg_sq_norm"),
    "adamwatch_eps_dominated_ratio": _deep_scalar("eps_dominated_ratio"),
    "adamwatch_deep_stats_step": _r_deep_step,
    "adamwatch_trainer_connected": _r_connected,
    "adamwatch_trainer_finished": _r_finished,
    "adamwatch_optimizer_info": _r_info,
    "adamwatch_dropped_summaries_total": _r_dropped,
    "adamwatch_last_checkpoint_timestamp_seconds": _r_ckpt,
    "adamwatch_last_known_good_checkpoint_timestamp_seconds": _r_known_good_time,
    "adamwatch_last_known_good_checkpoint_step": _r_known_good_step,
    "adamwatch_checkpoint_saves_total": _checkpoint_outcomes("saves"),
    "adamwatch_checkpoint_save_duration_seconds": _checkpoint_value("save_duration"),
    "adamwatch_checkpoint_size_bytes": _checkpoint_value("size_bytes"),
    "adamwatch_last_checkpoint_save_failure_timestamp_seconds": _checkpoint_value("save_failure_time"),
    "adamwatch_checkpoint_restores_total": _checkpoint_outcomes("restores"),
    "adamwatch_checkpoint_restore_duration_seconds": _checkpoint_value("restore_duration"),
    "adamwatch_corrupt_checkpoints_total": _checkpoint_value("corrupt"),
    "adamwatch_grad_clip_coefficient": _r_clip_coefficient,
    "adamwatch_grad_clip_max_norm": _r_clip_max_norm,
    "adamwatch_clipped_steps_total": _r_clipped_steps,
    "adamwatch_monitor_errors_total": _r_monitor_errors,
    "adamwatch_trainer_hello_timestamp_seconds": _r_hello_time,
}
assert set(_RENDERERS) == MESSAGE_METRICS, "every message-derived metric needs exactly one renderer"
assert MESSAGE_METRICS <= set(BY_NAME), "renderers must only use names from the metric table"


# The three parts of a trainer's families for the incremental /metrics renderer
# (RunState.snapshot_by_trainer), by how they change. STEP_METRICS: what
# _apply_step may change (re-read whenever the trainer changed). DEEP_METRICS:
# computed from STEP.deep and the trainer's labels only. Every other family
# (the rest) is re-read only after a change that was not a STEP: _apply_step
# must change nothing they read (tests/sidecar/test_collector.py checks it).
STEP_METRICS: frozenset[str] = frozenset({
    "adamwatch_loss", "adamwatch_grad_norm", "adamwatch_learning_rate", "adamwatch_optimizer_step",
    "adamwatch_steps_total", "adamwatch_step_rewinds_total", "adamwatch_nonfinite_steps_total",
    "adamwatch_skipped_steps_total", "adamwatch_step_duration_seconds", "adamwatch_last_step_timestamp_seconds",
    "adamwatch_samples_total", "adamwatch_tokens_total", "adamwatch_grad_clip_coefficient",
    "adamwatch_grad_clip_max_norm", "adamwatch_clipped_steps_total",
})
DEEP_METRICS: frozenset[str] = frozenset({
    "adamwatch_effective_learning_rate", "adamwatch_update_size", "adamwatch_update_to_weight_ratio",
    "adamwatch_adam_exp_avg_norm", "adamwatch_adam_exp_avg_sq_norm", "adamwatch_eps_dominated_ratio",
    "adamwatch_deep_stats_step",
})
assert STEP_METRICS <= MESSAGE_METRICS and DEEP_METRICS <= MESSAGE_METRICS and not STEP_METRICS & DEEP_METRICS

# One part of a trainer's series: ``(layout, labels, values)``; ``labels`` and
# ``values`` are aligned, ``layout`` is ``[(index into METRICS, end), ...]``:
# family ``index`` holds the entries from the previous family's end to ``end``.
Part = tuple[list[tuple[int, int]], list[tuple[str, ...]], list[Any]]

_Renderers = list[tuple[int, Callable[[_Trainer, list, list], None]]]


def _renderer_order() -> tuple[_Renderers, _Renderers, _Renderers, _Renderers, dict[str, int]]:
    """Every renderer, then each part's: ``[(index into METRICS, renderer), ...]`` in METRICS order.

    The last item is ``{name: index into METRICS}``.
    """
    global _ORDER
    if _ORDER is None:
        index = {spec.name: i for i, spec in enumerate(METRICS)}
        order = sorted((index[name], name) for name in _RENDERERS)
        _ORDER = ([(i, _RENDERERS[name]) for i, name in order],
                  [(i, _RENDERERS[name]) for i, name in order if name in STEP_METRICS],
                  [(i, _RENDERERS[name]) for i, name in order if name in DEEP_METRICS],
                  [(i, _RENDERERS[name]) for i, name in order if name not in STEP_METRICS | DEEP_METRICS],
                  index)
    return _ORDER


_ORDER: tuple[_Renderers, _Renderers, _Renderers, _Renderers, dict[str, int]] | None = None


def _part(t: _Trainer, renderers: _Renderers | tuple, custom: dict[str, dict[tuple[str, ...], float]] | None,
          index: dict[str, int]) -> Part:
    """One part of a trainer's series (see :data:`Part`), with its custom series when given."""
    layout: list[tuple[int, int]] = []
    labels: list[tuple[str, ...]] = []
    values: list[Any] = []
    end = 0
    if not custom:
        for i, render in renderers:
            render(t, labels, values)
            if len(labels) != end:
                end = len(labels)
                layout.append((i, end))
        return layout, labels, values
    # the generic store's families (never message-derived ones) in METRICS order among the renderers'
    sources: list = list(renderers)
    sources += [(index[name], series) for name, series in custom.items() if series and name in index]
    sources.sort(key=lambda entry: entry[0])
    for i, source in sources:
        if type(source) is dict:
            labels.extend(source.keys())
            values.extend(source.values())
        else:
            source(t, labels, values)
        if len(labels) != end:
            end = len(labels)
            layout.append((i, end))
    return layout, labels, values
