"""The remediation service: detectors → ladder → COMMAND → ACK → audit, counters, spans.

It is fed by the sidecar's run state (:meth:`RemediationService.on_message` for
every accepted trainer message, ``None`` on disconnect), ticked once a second
(:meth:`RemediationService.on_tick`: stalls and ACK timeouts), and driven by the
control API (:meth:`handle_alerts`, :meth:`manual_action`, :meth:`status`).

Flow of one automatic action::

    STEP (rank r) ─▶ detectors(job, r) ─▶ Incident ─▶ Ladder(job, ladder).decide
        ─▶ audit "decision" + span start + COMMAND to (job, rank 0)
    ACK (job, 0)  ─▶ audit "outcome" + adamwatch_remediations_total{action,outcome}
                     + span end (+ learning-rate scale, detector reset after a restore)

Rules that are not the ladder's:

- One command in flight per job, and one cooldown per job: while a COMMAND
  waits for its ACK, and until the cooldown of the rung that acted has passed,
  incidents of every ladder of that job are suppressed (a loss spike brings a
  grad-norm spike; the pair must not cut the learning rate twice).
- Commands go to rank 0 of the job, which broadcasts to the other ranks.
- **A sidecar acts for a job only while rank 0 of that job is connected to it.**
  In a multi-pod job every pod runs a sidecar, and a grad-norm spike (the same
  on every rank after the all-reduce) is seen by all of them; only the sidecar
  of rank 0 can deliver a command, so only it walks the ladder. The others
  still run their detectors, count ``adamwatch_detections_total`` and audit
  the detection, then audit the incident as ``deferred``: no command, no
  outcome, no ladder budget, no exhausted gauge. The same holds on the rank-0
  pod while rank 0 is disconnected (it is restarting): acting resumes when it
  reconnects. Manual actions and webhook alerts for such a job are refused
  (``no_trainer``, counted as rejected control requests).
- ``dry_run``: decide, audit, count outcome ``dry_run``, open and close the
  span; send nothing and change nothing (not even the exhausted gauge).
- Manual actions (``ctl``) bypass the ladder and are sent even in dry-run mode:
  a human asked for them. They are audited and counted like the others.

All state is guarded by one lock; commands are sent after it is released.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Protocol

from adamwatch import wire

from .audit import AuditLog
from .detectors import Incident, RankDetectors
from .ladder import Decision, Ladder
from .policy import RemediationConfig
from .tracing import SPAN_NAME_PREFIX

__all__ = ["MetricsSink", "RemediationService", "ActionError", "MANUAL_ACTIONS"]

log = logging.getLogger(__name__)

Key = tuple  # (job, rank); the core's TrainerKey is a NamedTuple of the same shape
MANUAL_ACTIONS: tuple[str, ...] = ("reduce_lr", "restore_checkpoint", "stop", "reset")
# A trainer gone this long is forgotten (detector windows, ladders): a long-lived
# sidecar must not grow with every job it ever saw.
FORGET_AFTER_SECONDS = 3600.0
# Action kinds a trainer may report on its own (adamwatch.remediation.ACTION_KINDS):
# the bound on the `action` label of ACKs it sends without a command of ours.
_TRAINER_ACTIONS: tuple[str, ...] = ("reduce_lr", "restore_checkpoint", "stop", "recover_lr")


class MetricsSink(Protocol):
    """The part of the sidecar's RunState the service writes metrics through."""

    def inc(self, key: Key, metric_name: str, labels: dict[str, Any], amount: float = 1.0) -> None: ...

    def set_gauge(self, key: Key, metric_name: str, labels: dict[str, Any], value: float) -> None: ...


class ActionError(ValueError):
    """A manual action cannot be carried out; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400, reason: str = "malformed"):
        super().__init__(message)
        self.status = status
        self.reason = reason


@dataclass
class _RankState:
    detectors: RankDetectors
    session: str | None = None
    connected: bool = True
    steps_seen: int = 0
    last_step: int | None = None
    disconnected_at: float | None = None


@dataclass
class _Pending:
    command_id: str
    job: str
    rank: int  # the rank the command went to
    action: str
    args: dict[str, Any]
    incident: Incident
    source: str
    sent_at: float
    deadline: float
    span: Any
    done: bool = False


@dataclass
class _JobState:
    ladders: dict[str, Ladder] = field(default_factory=dict)
    lr_scale: float = 1.0
    exhausted: bool = False
    pending: str | None = None  # command id in flight
    alerts_firing: dict[str, int] = field(default_factory=dict)  # alert fingerprint -> deliveries
    suppressed: int = 0  # suppressed incidents since the last "suppressed" audit line (see _audit_streak)
    deferred: int = 0  # deferred incidents since the last "deferred" audit line
    # Job-wide cooldown of the latest action: (action, until_steps, until_time).
    cooldown: tuple[str, int, float] | None = None


class RemediationService:
    """Detectors, ladders, commands and their audit trail for every job this sidecar sees.

    Args:
        config: the validated policy.
        send_command: ``fn(key, payload) -> bool``, thread-safe (``IngestServer.send_command``).
        metrics: where counters and gauges go (the sidecar's ``RunState``).
        clock: unix seconds; injectable.
        audit: the audit log (default: from ``config.audit``).
        tracer: an OpenTelemetry tracer (default: a no-op tracer).
        new_id: makes command ids (injectable for tests).
    """

    def __init__(
        self,
        config: RemediationConfig,
        *,
        send_command: Callable[[Key, dict[str, Any]], bool],
        metrics: MetricsSink,
        clock: Callable[[], float] = time.time,
        audit: AuditLog | None = None,
        tracer: Any = None,
        new_id: Callable[[], str] | None = None,
    ):
        if tracer is None:
            from opentelemetry import trace

            tracer = trace.NoOpTracer()
        self.config = config
        self._send = send_command
        self._metrics = metrics
        self._clock = clock
        self.audit = audit or AuditLog(config.audit.path, clock=clock, fsync=config.audit.fsync,
                                       on_error=lambda exc: log.error("audit log write failed: %s", exc))
        self._tracer = tracer
        self._new_id = new_id or (lambda: "aw-" + uuid.uuid4().hex[:16])
        self._lock = threading.RLock()
        self._ranks: dict[Key, _RankState] = {}
        self._jobs: dict[str, _JobState] = {}
        self._pending: dict[str, _Pending] = {}
        self._recent: deque[dict[str, Any]] = deque(maxlen=50)
        # name -> fn(job or None): more sections for status() (e.g. the optimizer policy's)
        self.status_extensions: dict[str, Callable[[str | None], Any]] = {}

    # ------------------------------------------------------------------ inputs
    def on_message(self, key: Key, message: Any) -> None:
        """Run-state listener: one accepted trainer message, or None when the connection closed.

        Args:
            key: (job, rank).
            message: an ``adamwatch.wire.Message`` or None.
        """
        key = (key[0], int(key[1]))
        sends: list[tuple[Key, dict[str, Any], _Pending]] = []
        with self._lock:
            if message is None:
                rank = self._ranks.get(key)
                if rank is not None:
                    self._disconnected(rank)
                return
            mtype, payload = message.type, message.payload
            if mtype is wire.MessageType.HELLO:
                self._hello(key, payload)
            elif mtype is wire.MessageType.STEP:
                rank = self._rank(key)
                rank.steps_seen += 1
                rank.last_step = payload.get("step")
                for incident in rank.detectors.observe_step(payload, self._clock()):
                    self._handle_incident(incident, sends)
            elif mtype is wire.MessageType.ACK:
                self._ack(key, payload)
            elif mtype is wire.MessageType.CHECKPOINT:
                if payload.get("event") == "restored":
                    self._reset_detectors(key[0])
                    if isinstance(payload.get("lr_scale"), (int, float)) and key[1] == 0:
                        # the checkpoint's own scale, when the trainer restored by itself
                        self._job(key[0]).lr_scale = float(payload["lr_scale"])
                        self._publish_job_gauges(key[0])
            elif mtype is wire.MessageType.GOODBYE:
                self._disconnected(self._rank(key))
        self._flush(sends)

    def _disconnected(self, rank: _RankState) -> None:
        if rank.connected:
            rank.disconnected_at = self._clock()
        rank.connected = False
        rank.detectors.stall.connected = False

    def on_tick(self, now: float | None = None) -> None:
        """Once a second: stall detection and ACK timeouts (``now`` is ignored: the service's clock rules)."""
        sends: list[tuple[Key, dict[str, Any], _Pending]] = []
        with self._lock:
            now = self._clock()
            for rank in list(self._ranks.values()):
                incident = rank.detectors.check_stall(now)
                if incident is not None:
                    self._handle_incident(incident, sends)
            for pending in list(self._pending.values()):
                if now >= pending.deadline:
                    self._finish(pending, "timeout",
                                 f"no ACK within {self.config.ack_timeout_seconds:g}s", None)
            self._forget_gone(now)
        self._flush(sends)

    def _forget_gone(self, now: float) -> None:
        """Drop ranks gone for FORGET_AFTER_SECONDS, and jobs with no ranks and nothing in flight."""
        for key, rank in list(self._ranks.items()):
            if not rank.connected and rank.disconnected_at is not None \
                    and now - rank.disconnected_at >= FORGET_AFTER_SECONDS:
                del self._ranks[key]
        live_jobs = {k[0] for k in self._ranks}
        for name, job in list(self._jobs.items()):
            if name not in live_jobs and job.pending is None:
                del self._jobs[name]

    # ------------------------------------------------------------------ state
    def _job(self, job: str) -> _JobState:
        state = self._jobs.get(job)
        if state is None:
            state = self._jobs[job] = _JobState(
                ladders={name: Ladder(rungs) for name, rungs in self.config.ladders.items()})
        return state

    def _rank(self, key: Key) -> _RankState:
        rank = self._ranks.get(key)
        if rank is None:
            rank = self._ranks[key] = _RankState(RankDetectors(key[0], key[1], self.config.detectors))
            self._job(key[0])
        return rank

    def _job_steps(self, job: str) -> int:
        return max((r.steps_seen for k, r in self._ranks.items() if k[0] == job), default=0)

    def _hello(self, key: Key, payload: Mapping[str, Any]) -> None:
        rank = self._rank(key)
        rank.connected = True
        rank.disconnected_at = None
        rank.detectors.stall.connected = True
        session = payload.get("session")
        if session == rank.session:
            return  # a reconnect of the same run: keep the windows
        rank.session = session
        rank.detectors.reset_windows()
        if key[1] == 0:
            # A new rank-0 session is a restarted run: the ladder starts over
            # (whoever restarted it has dealt with the escalation).
            job = self._job(key[0])
            for ladder in job.ladders.values():
                ladder.reset()
            job.exhausted = False
            job.cooldown = None
            job.lr_scale = float(payload["lr_scale"]) if isinstance(payload.get("lr_scale"), (int, float)) else 1.0
            job.alerts_firing.clear()
            self._publish_job_gauges(key[0])
        else:
            # Only this rank's gauges are new: a HELLO costs O(1) in the job's
            # size (3,000 ranks saying hello must not stall ingest for minutes).
            state = self._job(key[0])
            self._gauge(key, "adamwatch_remediation_ladder_exhausted", 1.0 if state.exhausted else 0.0)
            self._gauge(key, "adamwatch_learning_rate_scale", state.lr_scale)

    def _home(self, job: str) -> Key:
        """The trainer key a job's remediation series hang on: rank 0 when it reports here.

        In a multi-node job the other nodes' sidecars have no rank 0; writing a
        (job, 0) series there would invent a disconnected rank 0 in /metrics.
        """
        if (job, 0) in self._ranks:
            return (job, 0)
        ranks = sorted(k for k in self._ranks if k[0] == job)
        return ranks[0] if ranks else (job, 0)

    def _publish_job_gauges(self, job: str) -> None:
        # Every rank applies the same actions (rank 0 broadcasts), so the job's
        # learning-rate scale and exhaustion hold for each of its ranks here.
        state = self._job(job)
        for key in [k for k in self._ranks if k[0] == job] or [self._home(job)]:
            self._gauge(key, "adamwatch_remediation_ladder_exhausted", 1.0 if state.exhausted else 0.0)
            self._gauge(key, "adamwatch_learning_rate_scale", state.lr_scale)

    def _gauge(self, key: Key, name: str, value: float) -> None:
        try:
            self._metrics.set_gauge(key, name, {}, value)
        except Exception:
            log.exception("could not set %s", name)

    def _count(self, key: Key, name: str, labels: dict[str, Any]) -> None:
        try:
            self._metrics.inc(key, name, labels)
        except Exception:
            log.exception("could not count %s", name)

    def _reset_detectors(self, job: str) -> None:
        for key, rank in self._ranks.items():
            if key[0] == job:
                rank.detectors.reset_windows()

    # ------------------------------------------------------------------ incidents
    def _handle_incident(self, incident: Incident, sends: list) -> tuple[str | None, str | None, str]:
        """Run one incident through its ladder; returns (action, command id, reason)."""
        key = (incident.job, incident.rank)
        if incident.new and not incident.detector.startswith("alert:"):
            self._count(key, "adamwatch_detections_total", {"detector": incident.detector})
            self.audit.write("detection", time=incident.time, job=incident.job, rank=incident.rank,
                             detector=incident.detector, ladder=incident.ladder, step=incident.step,
                             evidence=incident.evidence, source="detector")
            log.warning("detected %s: %s", incident.summary(), incident.evidence)
        if not self.config.enabled:
            return None, None, "remediation is disabled"
        job = self._job(incident.job)
        ladder = job.ladders.get(incident.ladder)
        if ladder is None:
            return None, None, f"no ladder named {incident.ladder!r}"
        deferral = self.deferral(incident.job)
        if deferral is not None:
            # Checked before the pending command and the cooldown: whatever else
            # holds, this sidecar cannot act for the job, and must not record a
            # failure (a false page on every worker pod) or use up the ladder.
            self._defer(incident, job, deferral)
            return None, None, deferral
        now = self._clock()
        if job.pending is not None:
            reason = f"command {job.pending} is waiting for its ACK"
            self._suppress(incident, job, reason)
            return None, None, reason
        steps = self._job_steps(incident.job)
        if job.cooldown is not None:
            action, until_steps, until_time = job.cooldown
            if steps < until_steps or now < until_time:
                # Correlated detectors (a loss spike brings a grad-norm spike) must
                # not stack actions: every ladder of the job waits for the last one.
                reason = (f"cooldown after {action}: {max(0, until_steps - steps)} steps, "
                          f"{max(0.0, until_time - now):.0f}s left")
                self._suppress(incident, job, reason)
                return None, None, reason
            job.cooldown = None
        decision = ladder.decide(new=incident.new, now=now, steps=steps)
        if not decision.acts:
            self._suppress(incident, job, decision.reason)
            return None, None, decision.reason
        ladder.record(decision, now=now, steps=steps)
        if decision.rung is not None:
            rung = ladder.rungs[decision.rung]
            if rung.cooldown_steps or rung.cooldown_seconds:
                job.cooldown = (decision.action, steps + rung.cooldown_steps, now + rung.cooldown_seconds)
        command_id = self._act(incident, decision, job, sends,
                               source="alertmanager" if incident.detector.startswith("alert:") else "detector")
        return decision.action, command_id, decision.reason

    def _audit_streak(self, event: str, incident: Incident, job: _JobState, reason: str, **fields: Any) -> bool:
        """Audit a "suppressed" or "deferred" incident once per streak.

        Persisting anomalies arrive every step: the first of a streak gets a
        line, the rest are counted (in the job's counter of the same name) into
        the next line.

        Returns:
            True when a line was written.
        """
        if not incident.new:
            setattr(job, event, getattr(job, event) + 1)
            return False
        missed = getattr(job, event)
        self.audit.write(event, job=incident.job, rank=incident.rank, detector=incident.detector,
                         ladder=incident.ladder, step=incident.step, evidence=incident.evidence,
                         detail=reason + (f" ({missed} more {event} since the last line)" if missed else ""),
                         dry_run=self.config.dry_run, **fields)
        setattr(job, event, 0)
        return True

    def _suppress(self, incident: Incident, job: _JobState, reason: str) -> None:
        self._audit_streak("suppressed", incident, job, reason)

    def deferral(self, job: str) -> str | None:
        """Why this sidecar does not act for ``job`` now, or None when it does (rank 0 is connected here).

        Args:
            job: the job name.

        Returns:
            None, or a reason starting with ``"deferred: "`` for the audit log and the control API.
        """
        with self._lock:
            rank0 = self._ranks.get((job, 0))
            if rank0 is not None and rank0.connected:
                return None
            if rank0 is not None:
                return (f"deferred: rank 0 of job {job!r} is disconnected from this sidecar; "
                        "this sidecar acts for the job again when it reconnects")
            local = ", ".join(str(k[1]) for k in sorted(self._ranks) if k[0] == job) or "none"
            return (f"deferred: rank 0 of job {job!r} reports to another sidecar (ranks here: {local}); "
                    "only the sidecar of rank 0 acts for the job")

    def _defer(self, incident: Incident, job: _JobState, reason: str) -> None:
        source = "alertmanager" if incident.detector.startswith("alert:") else "detector"
        if self._audit_streak("deferred", incident, job, reason, source=source):
            log.info("no action for %s: %s", incident.summary(), reason)

    def _act(self, incident: Incident, decision: Decision, job: _JobState, sends: list, source: str) -> str:
        if decision.action == "escalate":
            return self._escalate(incident, decision, job, sends, source)
        args: dict[str, Any] = {}
        if decision.action == "reduce_lr":
            args = {"factor": decision.factor}
        elif decision.action == "restore_checkpoint":
            args = {"step": None, "before_step": incident.step}
        return self._command(incident, decision.action, args, decision.reason, sends, source,
                             dry_run=self.config.dry_run).command_id

    def _escalate(self, incident: Incident, decision: Decision, job: _JobState, sends: list, source: str) -> str:
        dry = self.config.dry_run
        command_id = self._new_id()
        span = self._start_span(incident, "escalate", command_id, source)
        self.audit.write("decision", job=incident.job, rank=incident.rank, detector=incident.detector,
                         ladder=incident.ladder, step=incident.step, evidence=incident.evidence, action="escalate",
                         command_id=command_id, detail=decision.reason, dry_run=dry, source=source)
        outcome = "dry_run" if dry else "applied"
        if not dry:
            job.exhausted = True
            self._publish_job_gauges(incident.job)
            log.error("remediation ladder exhausted for job %s after %s: a human must act", incident.job,
                      incident.summary())
        home = self._home(incident.job)
        self._count(home, "adamwatch_remediations_total", {"action": "escalate", "outcome": outcome})
        self.audit.write("outcome", job=incident.job, rank=home[1], detector=incident.detector, ladder=incident.ladder,
                         step=incident.step, action="escalate", command_id=command_id, outcome=outcome,
                         detail="ladder exhausted: adamwatch_remediation_ladder_exhausted=1" if not dry
                         else "dry run: gauge not set", dry_run=dry, source=source, latency_seconds=0.0)
        self._end_span(span, outcome, incident.step)
        self._remember(command_id, incident.job, "escalate", outcome, incident, source)
        if self.config.stop_training:
            self._command(incident, "stop", {}, "escalation: ladder exhausted", sends, source, dry_run=dry)
        return command_id

    def _command(self, incident: Incident, action: str, args: dict[str, Any], why: str, sends: list, source: str,
                 *, dry_run: bool) -> _Pending:
        job = self._job(incident.job)
        now = self._clock()
        command_id = self._new_id()
        target = (incident.job, 0)
        span = self._start_span(incident, action, command_id, source)
        # Outcomes are recorded on rank 0 when it reports here, else on a local rank.
        pending = _Pending(command_id, incident.job, self._home(incident.job)[1], action, args, incident, source,
                           now, now + self.config.ack_timeout_seconds, span)
        self.audit.write("decision", job=incident.job, rank=incident.rank, detector=incident.detector,
                         ladder=incident.ladder, step=incident.step, evidence=incident.evidence, action=action,
                         args=args, command_id=command_id, detail=why, dry_run=dry_run, source=source)
        log.warning("remediation: %s %s for %s (%s)%s", action, args, incident.summary(), why,
                    " [dry run]" if dry_run else "")
        if dry_run:
            self._finish(pending, "dry_run", "dry run: command not sent", None)
            return pending
        rank0 = self._ranks.get(target)
        if rank0 is None or not rank0.connected:
            # Not reached in normal operation: incidents and manual actions for a job
            # whose rank 0 is not here are deferred or refused before any decision.
            self._finish(pending, "failed", f"rank 0 of job {incident.job!r} is not connected to this sidecar", None)
            return pending
        self._pending[command_id] = pending
        job.pending = command_id
        payload = {"id": command_id, "action": action, "args": args, "reason": f"{incident.detector}: {why}",
                   "step": incident.step}
        sends.append((target, payload, pending))
        return pending

    def _flush(self, sends: Iterable[tuple[Key, dict[str, Any], _Pending]]) -> None:
        """Send the commands decided under the lock, now that it is released."""
        for target, payload, pending in sends:
            try:
                ok = self._send(target, payload)
                detail = "trainer connection closed before the command could be sent"
            except Exception as exc:  # a schema error here is our bug; never take the sidecar down
                log.exception("sending %s failed", payload)
                ok, detail = False, f"send failed: {exc}"
            if not ok:
                with self._lock:
                    if not pending.done:
                        self._finish(pending, "failed", detail, None)

    # ------------------------------------------------------------------ outcomes
    def _ack(self, key: Key, payload: Mapping[str, Any]) -> None:
        command_id = payload.get("id")
        pending = self._pending.get(command_id)
        outcome = payload.get("outcome")
        if outcome not in ("applied", "failed", "rejected"):
            outcome = "failed"
        job = self._job(key[0])
        if isinstance(payload.get("lr_scale"), (int, float)) and outcome == "applied" \
                and payload.get("action") in ("reduce_lr", "restore_checkpoint", "recover_lr"):
            job.lr_scale = float(payload["lr_scale"])
        if pending is None:
            # An action the trainer took on its own (monitor.reduce_lr), or an ACK after our timeout.
            self.audit.write("outcome", job=key[0], rank=key[1], action=payload.get("action"), command_id=command_id,
                             step=payload.get("step"), outcome=outcome, detail=payload.get("detail"),
                             source="trainer")
            if payload.get("source") in ("local", "recovery"):
                # Actions the training script (or the trainer's LR recovery) took count
                # like ours; a late ACK of our own command (no source) was counted as a timeout.
                action = payload.get("action")
                self._count(key, "adamwatch_remediations_total",
                            {"action": action if action in _TRAINER_ACTIONS else "other", "outcome": outcome})
            if outcome == "applied" and payload.get("action") == "restore_checkpoint":
                self._reset_detectors(key[0])
            self._publish_job_gauges(key[0])
            return
        if outcome == "applied":
            if pending.action == "reduce_lr" and not isinstance(payload.get("lr_scale"), (int, float)):
                job.lr_scale *= float(pending.args.get("factor", 1.0))
            if pending.action == "restore_checkpoint":
                self._reset_detectors(key[0])
        self._publish_job_gauges(key[0])  # before the counter: a scrape that sees the outcome sees the scale
        self._finish(pending, outcome, payload.get("detail"), payload.get("step"))

    def _finish(self, pending: _Pending, outcome: str, detail: str | None, ack_step: int | None) -> None:
        if pending.done:
            return
        pending.done = True
        self._pending.pop(pending.command_id, None)
        job = self._job(pending.job)
        if job.pending == pending.command_id:
            job.pending = None
        now = self._clock()
        incident = pending.incident
        steps_to_effect = None
        if ack_step is not None and incident.step is not None:
            steps_to_effect = ack_step - incident.step
        self._count((pending.job, pending.rank), "adamwatch_remediations_total",
                    {"action": pending.action, "outcome": outcome})
        self.audit.write("outcome", job=pending.job, rank=pending.rank, detector=incident.detector,
                         ladder=incident.ladder, step=ack_step if ack_step is not None else incident.step,
                         action=pending.action, args=pending.args, command_id=pending.command_id, outcome=outcome,
                         detail=detail, dry_run=outcome == "dry_run", source=pending.source,
                         latency_seconds=round(now - pending.sent_at, 6), steps_to_effect=steps_to_effect)
        (log.info if outcome in ("applied", "dry_run") else log.warning)(
            "remediation %s %s: %s%s", pending.action, pending.command_id, outcome, f" ({detail})" if detail else "")
        self._end_span(pending.span, outcome, ack_step if ack_step is not None else incident.step)
        self._remember(pending.command_id, pending.job, pending.action, outcome, incident, pending.source,
                       ack_step=ack_step, detail=detail)

    def _remember(self, command_id: str, job: str, action: str, outcome: str, incident: Incident, source: str,
                  ack_step: int | None = None, detail: str | None = None) -> None:
        self._recent.append({"command_id": command_id, "job": job, "action": action, "outcome": outcome,
                             "detector": incident.detector, "step": incident.step, "ack_step": ack_step,
                             "source": source, "detail": detail, "time": self._clock()})

    # ------------------------------------------------------------------ tracing
    def _start_span(self, incident: Incident, action: str, command_id: str, source: str) -> Any:
        try:
            attrs = {
                "adamwatch.job": incident.job,
                "adamwatch.rank": incident.rank,
                "adamwatch.detector": incident.detector,
                "adamwatch.action": action,
                "adamwatch.command_id": command_id,
                "adamwatch.source": source,
                "adamwatch.dry_run": self.config.dry_run,
            }
            if incident.step is not None:
                attrs["adamwatch.step"] = incident.step
            return self._tracer.start_span(SPAN_NAME_PREFIX + action, attributes=attrs,
                                           start_time=int(self._clock() * 1e9))
        except Exception:
            log.exception("could not start a span")
            return None

    def _end_span(self, span: Any, outcome: str, step: int | None) -> None:
        if span is None:
            return
        try:
            from opentelemetry.trace import Status, StatusCode

            span.set_attribute("adamwatch.outcome", outcome)
            if step is not None:
                span.set_attribute("adamwatch.effective_step", step)
            if outcome in ("failed", "rejected", "timeout"):
                span.set_status(Status(StatusCode.ERROR, outcome))
            span.end(end_time=int(self._clock() * 1e9))
        except Exception:
            log.exception("could not end a span")

    # ------------------------------------------------------------------ control API
    def handle_alerts(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        """Map an Alertmanager webhook (version 4) to ladder incidents.

        Firing alerts whose ``alertname`` is in ``alert_actions`` become incidents
        of the named ladder for the job in their ``job`` (or ``exported_job``)
        label; a re-delivery of a still-firing alert counts as "it persists".

        Args:
            payload: the decoded webhook body (already checked to be a mapping with a list of alerts).

        Returns:
            ``{"results": [{"alertname", "job", "result"}, ...]}``; an alert for a job whose
            rank 0 is not connected here is refused with ``"reason": "no_trainer"`` in its entry.
        """
        results = []
        sends: list = []
        with self._lock:
            for alert in payload["alerts"]:
                labels = alert.get("labels") or {}
                name = labels.get("alertname")
                # With honor_labels off, Prometheus renames the trainer's job label to
                # exported_job; prefer whichever names a job this sidecar knows.
                job_name = labels.get("job")
                if job_name not in self._jobs and labels.get("exported_job"):
                    job_name = labels["exported_job"]
                fingerprint = str(alert.get("fingerprint") or sorted(labels.items()))
                entry = {"alertname": name, "job": job_name}
                results.append(entry)
                ladder = self.config.alert_actions.get(name)
                if ladder is None:
                    entry["result"] = "ignored: no alert_actions entry for this alertname"
                    continue
                if not job_name:
                    entry["result"] = "ignored: the alert has no job label"
                    continue
                if not any(k[0] == job_name for k in self._ranks):
                    entry["result"] = "ignored: no trainer of this job reports to this sidecar"
                    continue
                job = self._job(job_name)
                if alert.get("status") != "firing":
                    job.alerts_firing.pop(fingerprint, None)
                    entry["result"] = "resolved"
                    continue
                deferral = self.deferral(job_name)
                if deferral is not None and self.config.enabled:
                    # Misrouted (the webhook should reach the rank-0 pod's sidecar) or
                    # rank 0 is restarting: refuse, and let the control API count it.
                    entry["result"] = "refused: " + deferral
                    entry["reason"] = "no_trainer"
                    continue
                deliveries = job.alerts_firing.get(fingerprint, 0) + 1
                job.alerts_firing[fingerprint] = deliveries
                try:
                    rank = int(labels.get("rank", 0))
                except (TypeError, ValueError):
                    rank = 0
                rank0 = self._ranks.get((job_name, 0))
                incident = Incident(detector=f"alert:{name}", ladder=ladder, job=job_name, rank=rank,
                                    step=rank0.last_step if rank0 else None, time=self._clock(),
                                    evidence={"alertname": name, "labels": dict(labels),
                                              "annotations": dict(alert.get("annotations") or {}),
                                              "startsAt": alert.get("startsAt"), "deliveries": deliveries},
                                    new=deliveries == 1, streak=deliveries)
                action, command_id, reason = self._handle_incident(incident, sends)
                entry["result"] = f"action {action}" if action else f"no action: {reason}"
                if command_id:
                    entry["command_id"] = command_id
        self._flush(sends)
        return {"results": results}

    def manual_action(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """Carry out a human's request from ``ctl`` (bypasses the ladder; sent even in dry-run mode).

        Args:
            request: ``{"action": "reduce_lr", "factor": 0.5, "job": ..., "rank": ...}``,
                ``{"action": "restore_checkpoint", "step": N|null}``, ``{"action": "stop"}``
                or ``{"action": "reset"}`` (clears the ladders and the exhausted gauge).

        Returns:
            ``{"command_id", "action", "job", "outcome"}`` (outcome "sent", "failed" or "reset").

        Raises:
            ActionError: the request is malformed, names no connected job, or names a job
                whose rank 0 is not connected here (409, reason ``no_trainer``).
        """
        action = request.get("action")
        if action == "restore":
            action = "restore_checkpoint"
        if action == "reduce-lr":
            action = "reduce_lr"
        if action not in MANUAL_ACTIONS:
            raise ActionError(f"action: must be one of {', '.join(MANUAL_ACTIONS)}, got {action!r}",
                              reason="unknown_action")
        args: dict[str, Any] = {}
        if action == "reduce_lr":
            factor = request.get("factor")
            if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor < 1:
                raise ActionError(f"factor: must be a number with 0 < factor < 1, got {factor!r}")
            args = {"factor": float(factor)}
        elif action == "restore_checkpoint":
            step = request.get("step")
            if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
                raise ActionError(f"step: must be a step number >= 0 or null, got {step!r}")
            args = {"step": step, "before_step": None}
        sends: list = []
        with self._lock:
            job_name = self._pick_job(request.get("job"))
            if action == "reset":
                job = self._job(job_name)
                for ladder in job.ladders.values():
                    ladder.reset()
                job.exhausted = False
                job.cooldown = None
                job.alerts_firing.clear()
                self._publish_job_gauges(job_name)
                self.audit.write("decision", job=job_name, action="reset", source="manual",
                                 detail="ladders and exhausted flag cleared by a human")
                return {"command_id": None, "action": "reset", "job": job_name, "outcome": "reset"}
            deferral = self.deferral(job_name)
            if deferral is not None:
                raise ActionError(f"job: cannot {action} {job_name!r} from this sidecar: "
                                  + deferral[len("deferred: "):], status=409, reason="no_trainer")
            rank0 = self._ranks.get((job_name, 0))
            incident = Incident(detector="manual", ladder="manual", job=job_name, rank=0,
                                step=rank0.last_step if rank0 else None, time=self._clock(),
                                evidence={"requested_by": str(request.get("requested_by") or "ctl")})
            pending = self._command(incident, action, args, str(request.get("reason") or "requested with ctl"),
                                    sends, "manual", dry_run=False)
        self._flush(sends)
        out = {"command_id": pending.command_id, "action": action, "job": job_name, "args": args, "outcome": "sent"}
        with self._lock:
            if pending.done:  # finished before any ACK could arrive: not connected, send failed
                record = next(r for r in reversed(self._recent) if r["command_id"] == pending.command_id)
                out["outcome"], out["detail"] = record["outcome"], record["detail"]
        return out

    def _pick_job(self, requested: Any) -> str:
        connected = sorted({k[0] for k, r in self._ranks.items() if r.connected})
        if requested is not None:
            if not isinstance(requested, str) or not requested:
                raise ActionError(f"job: must be a job name, got {requested!r}")
            if requested not in {k[0] for k in self._ranks}:
                raise ActionError(f"job: {requested!r} is unknown to this sidecar (connected: "
                                  f"{', '.join(connected) or 'none'})", status=404, reason="unknown_job")
            return requested
        if len(connected) == 1:
            return connected[0]
        if not connected:
            raise ActionError("job: no trainer is connected to this sidecar", status=409, reason="no_trainer")
        raise ActionError(f"job: several jobs are connected ({', '.join(connected)}); pass --job", reason="malformed")

    def status(self, job: str | None = None) -> dict[str, Any]:
        """JSON-ready state for ``GET /api/v1/status`` and ``ctl status``.

        Args:
            job: only this job (None: every job).

        Returns:
            Policy summary, per-job ladders, pending commands and recent actions.
        """
        with self._lock:
            now = self._clock()
            jobs = {}
            for name, state in sorted(self._jobs.items()):
                if job is not None and name != job:
                    continue
                steps = self._job_steps(name)
                jobs[name] = {
                    "ranks": {str(k[1]): {"connected": r.connected, "last_step": r.last_step,
                                          "loss_window": r.detectors.loss_spike.samples,
                                          "grad_norm_window": r.detectors.grad_norm_spike.samples,
                                          "detectors": self._describe_detectors(r)}
                              for k, r in sorted(self._ranks.items()) if k[0] == name},
                    "cooldown": self._describe_cooldown(state, now, steps),
                    "acting_here": self.deferral(name) is None,
                    "deferred_reason": self.deferral(name),
                    "learning_rate_scale": state.lr_scale,
                    "exhausted": state.exhausted,
                    "pending_command": state.pending,
                    "ladders": {lname: ladder.snapshot(now, steps) for lname, ladder in state.ladders.items()},
                }
            return {
                "enabled": self.config.enabled,
                "dry_run": self.config.dry_run,
                "jobs": jobs,
                "pending": [{"command_id": p.command_id, "job": p.job, "action": p.action,
                             "age_seconds": round(now - p.sent_at, 3)} for p in self._pending.values()
                            if job is None or p.job == job],
                "recent": [r for r in self._recent if job is None or r["job"] == job],
                **{name: self._extension(fn, job) for name, fn in self.status_extensions.items()},
            }

    @staticmethod
    def _extension(fn: Callable[[str | None], Any], job: str | None) -> Any:
        try:
            return fn(job)
        except Exception as exc:  # a broken section must not break status
            log.exception("status extension %r failed", fn)
            return {"error": f"{type(exc).__name__}: {exc}"}

    def _describe_detectors(self, rank: _RankState) -> dict[str, Any]:
        # For the status page: what each detector would fire on right now.
        d = rank.detectors
        return {
            "loss_spike": dict(d.loss_spike.describe(), enabled=d.params.loss_spike.enabled),
            "grad_norm_spike": dict(d.grad_norm_spike.describe(), enabled=d.params.grad_norm_spike.enabled),
            "non_finite": {"enabled": d.params.non_finite.enabled, "streak": d.non_finite.streak,
                           "consecutive_steps": d.params.non_finite.consecutive_steps},
            "stall": {"enabled": d.params.stall.enabled, "timeout_seconds": d.params.stall.timeout_seconds,
                      "last_step_at": d.stall.last_step_at, "fired": d.stall.fired},
            "spike_guard": {"enabled": d.params.spike_guard.enabled, "streak": d.spike_guard.streak,
                            "consecutive_steps": d.params.spike_guard.consecutive_steps},
        }

    @staticmethod
    def _describe_cooldown(job: _JobState, now: float, steps: int) -> dict[str, Any] | None:
        if job.cooldown is None:
            return None
        action, until_steps, until_time = job.cooldown
        if steps >= until_steps and now >= until_time:
            return None
        return {"after": action, "steps_left": max(0, until_steps - steps),
                "seconds_left": round(max(0.0, until_time - now), 3)}

    def close(self) -> None:
        """Count every command still waiting for its ACK as a timeout (the sidecar is stopping)."""
        with self._lock:
            for pending in list(self._pending.values()):
                self._finish(pending, "timeout", "sidecar stopped before the ACK arrived", None)

