"""Export the trainer's evaluation results (EVAL messages) and the overfitting streak.

| metric | from |
| --- | --- |
| ``adamwatch_eval_metric{metric}`` | each named value of the latest EVAL |
| ``adamwatch_eval_step``, ``adamwatch_eval_timestamp_seconds`` | its step and time |
| ``adamwatch_evaluations_total`` | EVAL messages (0 from the trainer's hello) |
| ``adamwatch_eval_overfitting_streak`` | :class:`~adamwatch_sidecar.overfitting.OverfittingStreak` |

Runs as a RunState listener on the ingest loop thread.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from adamwatch import wire

from .overfitting import VALIDATION_LOSS_NAMES, OverfittingStreak
from .run_state import RunState, TrainerKey

__all__ = ["EvaluationExporter"]

log = logging.getLogger(__name__)


class EvaluationExporter:
    """Listener that turns EVAL messages into metrics.

    Args:
        state: the run state whose generic store receives the series.
    """

    def __init__(self, state: RunState):
        self.state = state
        self._streaks: dict[TrainerKey, OverfittingStreak] = {}
        # names exported per trainer: bounded, or a trainer inventing a new
        # name per evaluation would grow /metrics without end
        self._names: dict[TrainerKey, set[str]] = {}

    def on_message(self, key: TrainerKey, message: wire.Message | None) -> None:
        if message is None:
            return
        mtype = message.type
        if mtype is wire.MessageType.HELLO:
            self.state.inc(key, "adamwatch_evaluations_total", {}, 0)
            self._streaks.setdefault(key, OverfittingStreak())
        elif mtype is wire.MessageType.STEP:
            loss = message.payload.get("loss")
            streak = self._streaks.get(key)
            if streak is not None and loss is not None:
                streak.add_train_loss(float(loss))
        elif mtype is wire.MessageType.EVAL:
            self._on_eval(key, message.payload)

    def _on_eval(self, key: TrainerKey, p: dict[str, Any]) -> None:
        state = self.state
        metrics = p["metrics"]
        names = self._names.setdefault(key, set())
        for name, value in metrics.items():
            if name not in names:
                if len(names) >= wire.MAX_EVAL_METRICS:
                    if len(names) == wire.MAX_EVAL_METRICS:
                        log.warning("trainer %s: more than %d evaluation names; %r and later new names are not "
                                    "exported", key, wire.MAX_EVAL_METRICS, name)
                        names.add("\0full")  # warn once
                    continue
                names.add(name)
            state.set_gauge(key, "adamwatch_eval_metric", {"metric": name},
                            math.nan if value is None else float(value))
        state.set_gauge(key, "adamwatch_eval_step", {}, float(p["step"]))
        state.set_gauge(key, "adamwatch_eval_timestamp_seconds", {}, float(p["time"]))
        state.inc(key, "adamwatch_evaluations_total", {})
        name = next((n for n in VALIDATION_LOSS_NAMES if n in metrics), None)
        if name is not None:
            streak = self._streaks.setdefault(key, OverfittingStreak())
            value = metrics[name]
            n = streak.add_eval_loss(None if value is None else float(value))
            state.set_gauge(key, "adamwatch_eval_overfitting_streak", {}, float(n))

    def forget(self, keys: set[TrainerKey]) -> None:
        """Drop the state of trainers the run state no longer knows (expired)."""
        for key in [k for k in self._streaks if k not in keys]:
            del self._streaks[key]
        for key in [k for k in self._names if k not in keys]:
            del self._names[key]
