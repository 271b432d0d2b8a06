"""How trainer runs end: exits by reason, run outcomes for the SLOs, device time, model family.

| event | counted |
| --- | --- |
| HELLO with a new session | ``adamwatch_trainer_starts_total``; every exit reason and outcome series created at 0 (so ``increase()`` sees the first one) |
| GOODBYE | ``adamwatch_trainer_exits_total{reason}`` from ``exit_reason`` (older trainers: clean); on rank 0 only, ``adamwatch_runs_ended_total{outcome}`` and ``adamwatch_runs_target_total{outcome}`` when a target was declared |
| connection closed without GOODBYE | after ``vanish_grace_seconds`` without a reconnect of the same session: reason ``vanished`` (at once when a new session says hello) |
| every tick | ``adamwatch_trainer_device_seconds_total{device}`` grows by the time connected |

Outcomes: success (clean and no non-finite step in the session), nonfinite (clean
but a step had NaN/Inf), oom, crashed (exception, signal, vanished), preempted.

Runs as a RunState listener and a ticker on the ingest loop thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from adamwatch import wire

from .run_state import RunState, TrainerKey

__all__ = ["RunEndTracker", "RUN_OUTCOMES", "TARGET_OUTCOMES", "outcome_of"]

RUN_OUTCOMES: tuple[str, ...] = ("success", "nonfinite", "oom", "crashed", "preempted")
TARGET_OUTCOMES: tuple[str, ...] = ("reached", "missed")
MAX_EXCEPTION_TYPES = 16
_MAX_LABEL = 64


def outcome_of(exit_reason: str, had_nonfinite: bool) -> str:
    """The run outcome of an exit reason.

        >>> outcome_of("clean", False), outcome_of("clean", True), outcome_of("vanished", False)
        ('success', 'nonfinite', 'crashed')
    """
    if exit_reason == "clean":
        return "nonfinite" if had_nonfinite else "success"
    if exit_reason == "oom":
        return "oom"
    if exit_reason == "preemption":
        return "preempted"
    return "crashed"


@dataclass
class _Session:
    session: str
    device: str
    nonfinite: bool = False
    ended: bool = False
    connected: bool = True
    vanish_deadline: float | None = None
    accounted_until: float = 0.0  # device time is counted up to here


class RunEndTracker:
    """Counts how runs end.

    Args:
        state: the run state (generic store).
        clock: unix seconds (the sidecar's clock).
        vanish_grace_seconds: a trainer whose connection closed without a GOODBYE
            and that does not reconnect with the same session within this time vanished.
        target_outcome: ``fn(key, now) -> "reached" | "missed" | None``
            (:meth:`ConvergenceTracker.target_outcome`).
        has_target: ``fn(key) -> bool`` (:meth:`ConvergenceTracker.has_target`, which
            also knows targets from the sidecar config); runs before this listener.
    """

    def __init__(self, state: RunState, clock: Callable[[], float], vanish_grace_seconds: float = 30.0,
                 target_outcome: Callable[[TrainerKey, float], str | None] | None = None,
                 has_target: Callable[[TrainerKey], bool] | None = None):
        self.state = state
        self._clock = clock
        self.vanish_grace_seconds = vanish_grace_seconds
        self._target_outcome = target_outcome
        self._has_target = has_target
        self._sessions: dict[TrainerKey, _Session] = {}
        self._exception_types: dict[TrainerKey, set[str]] = {}
        self._families: dict[TrainerKey, str] = {}

    # ------------------------------------------------------------------ listener
    def on_message(self, key: TrainerKey, message: wire.Message | None) -> None:
        if message is None:
            self._on_disconnect(key)
            return
        mtype, p = message.type, message.payload
        if mtype is wire.MessageType.HELLO:
            self._on_hello(key, p)
        elif mtype is wire.MessageType.STEP:
            s = self._sessions.get(key)
            if s is not None and (p.get("loss_nonfinite") or (
                    p["grad_nonfinite"] and not (p.get("skipped") and p.get("skip_reason") == "grad_scaler"))):
                s.nonfinite = True
        elif mtype is wire.MessageType.GOODBYE:
            reason = p.get("exit_reason") or "clean"
            if reason not in wire.EXIT_REASONS or reason == "vanished":
                reason = "exception"  # unknown words from a newer trainer: not a clean end
            self._end(key, reason, p.get("exception"))

    def _on_hello(self, key: TrainerKey, hello: dict[str, Any]) -> None:
        previous = self._sessions.get(key)
        if previous is not None and previous.session == hello["session"]:
            previous.connected = True  # a reconnect of the same process
            previous.vanish_deadline = None
            previous.accounted_until = self._clock()
            return
        if previous is not None and not previous.ended:
            self._end(key, "vanished", None)  # restarted before the grace ran out
        state = self.state
        for reason in wire.EXIT_REASONS:
            state.inc(key, "adamwatch_trainer_exits_total", {"reason": reason}, 0)
        if key.rank == 0:  # a run is counted once, by its rank 0 (every rank sees the same end)
            for outcome in RUN_OUTCOMES:
                state.inc(key, "adamwatch_runs_ended_total", {"outcome": outcome}, 0)
            if self._has_target(key) if self._has_target is not None else hello.get("target"):
                for outcome in TARGET_OUTCOMES:
                    state.inc(key, "adamwatch_runs_target_total", {"outcome": outcome}, 0)
        state.inc(key, "adamwatch_trainer_starts_total", {})
        device = str(hello["optimizer"].get("device") or "unknown")[:_MAX_LABEL].split(":")[0]
        state.inc(key, "adamwatch_trainer_device_seconds_total", {"device": device}, 0)
        family = hello.get("model_family")
        family = family[:_MAX_LABEL] if isinstance(family, str) else ""
        old_family = self._families.get(key)
        if old_family is not None and old_family != family:
            state.remove_series(key, "adamwatch_run_info", {"model_family": old_family})
        self._families[key] = family
        state.set_gauge(key, "adamwatch_run_info", {"model_family": family}, 1.0)
        self._sessions[key] = _Session(hello["session"], device, accounted_until=self._clock())

    def _on_disconnect(self, key: TrainerKey) -> None:
        s = self._sessions.get(key)
        if s is None:
            return
        self._count_device_time(key, s, self._clock())
        s.connected = False
        if not s.ended:
            s.vanish_deadline = self._clock() + self.vanish_grace_seconds

    def _end(self, key: TrainerKey, reason: str, exception: Any) -> None:
        s = self._sessions.get(key)
        if s is None or s.ended:
            return
        self._count_device_time(key, s, self._clock())
        s.ended = True
        s.vanish_deadline = None
        state = self.state
        state.inc(key, "adamwatch_trainer_exits_total", {"reason": reason})
        if isinstance(exception, str) and exception:
            seen = self._exception_types.setdefault(key, set())
            name = exception[:_MAX_LABEL]
            if name not in seen and len(seen) >= MAX_EXCEPTION_TYPES:
                name = "other"
            seen.add(name)
            state.inc(key, "adamwatch_trainer_exception_exits_total", {"exception": name})
        if key.rank != 0:
            return
        outcome = outcome_of(reason, s.nonfinite)
        state.inc(key, "adamwatch_runs_ended_total", {"outcome": outcome})
        if outcome != "preempted" and self._target_outcome is not None:
            target = self._target_outcome(key, self._clock())
            if target is not None:
                state.inc(key, "adamwatch_runs_target_total", {"outcome": target})

    # ------------------------------------------------------------------ ticker
    def _count_device_time(self, key: TrainerKey, s: _Session, now: float) -> None:
        if s.connected and not s.ended and now > s.accounted_until:
            self.state.inc(key, "adamwatch_trainer_device_seconds_total", {"device": s.device},
                           now - s.accounted_until)
        s.accounted_until = max(s.accounted_until, now)

    def on_tick(self, now: float) -> None:
        """Accumulate device time of connected trainers; declare overdue disconnections vanished."""
        known = set(self.state.keys())
        for key, s in list(self._sessions.items()):
            if key not in known:
                del self._sessions[key]
                self._exception_types.pop(key, None)
                self._families.pop(key, None)
                continue
            self._count_device_time(key, s, now)
            if s.vanish_deadline is not None and now >= s.vanish_deadline:
                self._end(key, "vanished", None)
