"""Rung selection for one (job, ladder): cooldowns, limits per window, escalation.

The rules, applied to every incident the ladder receives:

1. **Cooldown.** After a rung acts, the ladder does nothing until that rung's
   ``cooldown_steps`` (steps the job reported since) *and* ``cooldown_seconds``
   have passed: the action needs time to show whether it worked.
2. **Where to start.** A *new* incident (the first step of a streak) starts at
   the bottom rung. An incident that *persists* through the cooldown of the rung
   that acted on it climbs to the next rung ("cut the LR; if the spike persists,
   restore").
3. **Limits.** A rung that already acted ``max_per_window`` times within its
   ``window_seconds`` is skipped; the next rung up is tried.
4. **Escalation.** Reaching an ``escalate`` rung, or running out of rungs,
   escalates once: the ladder is *exhausted* until :meth:`Ladder.reset`
   (``ctl reset`` or a new trainer session). Further incidents are suppressed.

The ladder only decides; :class:`~adamwatch_sidecar.remediation.service.RemediationService`
sends commands and records outcomes, and calls :meth:`Ladder.record` when it acts
(dry runs included, so a dry run walks the ladder exactly as a real run would).

    >>> from adamwatch_sidecar.remediation.policy import Rung
    >>> ladder = Ladder((Rung("reduce_lr", 0.5, cooldown_steps=5, max_per_window=1), Rung("escalate")))
    >>> d = ladder.decide(new=True, now=0.0, steps=100); d.action
    'reduce_lr'
    >>> ladder.record(d, now=0.0, steps=100)
    >>> ladder.decide(new=False, now=1.0, steps=102).reason
    'cooldown: 2 of 5 steps, 1s of 0s'
    >>> ladder.decide(new=False, now=2.0, steps=105).action
    'escalate'
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Sequence

from .policy import Rung

__all__ = ["Decision", "Ladder"]


@dataclass(frozen=True)
class Decision:
    """What the ladder wants done about one incident.

    Args:
        action: the action to take, or None when the incident is suppressed.
        rung: index of the rung that acts (None for an implicit escalation or a suppression).
        reason: why (for suppressions: cooldown, exhausted, ...).
        factor: the reduce_lr factor of the rung.
    """

    action: str | None
    rung: int | None
    reason: str
    factor: float | None = None

    @property
    def acts(self) -> bool:
        """True when an action was chosen."""
        return self.action is not None


class Ladder:
    """State of one ladder for one job.

    Args:
        rungs: the validated rungs of the policy.
    """

    def __init__(self, rungs: Sequence[Rung]):
        self.rungs = tuple(rungs)
        self._uses: list[deque[float]] = [deque() for _ in self.rungs]
        self.episode_rung: int | None = None
        self.last_rung: int | None = None
        self.last_time: float | None = None
        self.last_steps: int | None = None
        self.exhausted = False
        self.exhausted_at: float | None = None

    def reset(self) -> None:
        """Forget uses, cooldown and exhaustion (a human took over, or the run restarted)."""
        self.__init__(self.rungs)

    def _prune(self, now: float) -> None:
        for rung, uses in zip(self.rungs, self._uses):
            while uses and now - uses[0] >= rung.window_seconds:
                uses.popleft()

    def uses(self, index: int, now: float) -> int:
        """How often rung ``index`` acted within its window."""
        self._prune(now)
        return len(self._uses[index])

    def cooldown_left(self, now: float, steps: int) -> tuple[int, float] | None:
        """(steps, seconds) of cooldown left, or None when the ladder may act."""
        if self.last_rung is None or self.last_time is None or self.last_steps is None:
            return None
        rung = self.rungs[self.last_rung]
        steps_done = steps - self.last_steps
        seconds_done = now - self.last_time
        if steps_done >= rung.cooldown_steps and seconds_done >= rung.cooldown_seconds:
            return None
        return steps_done, seconds_done

    def decide(self, *, new: bool, now: float, steps: int) -> Decision:
        """Choose the rung for one incident (does not change the state; see :meth:`record`).

        Args:
            new: the incident starts a streak (True) or persists (False).
            now: sidecar clock.
            steps: STEPs the job has reported so far (for step cooldowns).

        Returns:
            The decision; ``decision.acts`` is False for a suppression.
        """
        self._prune(now)
        if self.exhausted:
            return Decision(None, None, "ladder exhausted: escalated, waiting for a human (ctl reset)")
        left = self.cooldown_left(now, steps)
        if left is not None:
            rung = self.rungs[self.last_rung]  # type: ignore[index]
            return Decision(None, None, f"cooldown: {left[0]} of {rung.cooldown_steps} steps, "
                                        f"{left[1]:.0f}s of {rung.cooldown_seconds:.0f}s")
        start = 0 if new or self.episode_rung is None else self.episode_rung + 1
        for index in range(start, len(self.rungs)):
            rung = self.rungs[index]
            if rung.action == "escalate" or len(self._uses[index]) < rung.max_per_window:
                why = "first rung with budget" if index == start else "lower rungs used up in their window"
                if not new and self.episode_rung is not None:
                    why = f"persisted after rung {self.episode_rung} ({self.rungs[self.episode_rung].action})"
                return Decision(rung.action, index, why, rung.factor)
        return Decision("escalate", None, "every rung used up in its window")

    def record(self, decision: Decision, *, now: float, steps: int) -> None:
        """The service acted on ``decision``: start the cooldown and count the use."""
        if not decision.acts:
            return
        if decision.action == "escalate":
            self.exhausted = True
            self.exhausted_at = now
        if decision.rung is None:
            return
        self._uses[decision.rung].append(now)
        self.episode_rung = decision.rung
        self.last_rung = decision.rung
        self.last_time = now
        self.last_steps = steps

    def snapshot(self, now: float, steps: int) -> dict[str, Any]:
        """JSON-ready state for ``GET /api/v1/status``."""
        self._prune(now)
        left = self.cooldown_left(now, steps)
        return {
            "exhausted": self.exhausted,
            "exhausted_at": self.exhausted_at,
            "in_cooldown": left is not None,
            "last_rung": self.last_rung,
            "rungs": [
                {"action": r.action, "uses_in_window": len(u), "max_per_window": r.max_per_window}
                for r, u in zip(self.rungs, self._uses)
            ],
        }
