"""Where a NaN began: per-rank origin metrics from the STEP extras of adamwatch.cross_rank.

Each rank's trainer reports, with every step, whether its *own* loss and its
*own* gradients were non-finite before the ranks combined them
(``nonfinite_origin_loss``, ``nonfinite_origin_grad``), and the lowest rank
any rank reported (``nonfinite_origin_first_rank``, -1 for none). A run-state
listener turns them into:

| metric | labels | value |
| --- | --- | --- |
| ``adamwatch_nonfinite_origin_steps_total`` | source | steps at which this rank's own loss/gradients were non-finite |
| ``adamwatch_nonfinite_origin_step`` | source | the step at which the rank's latest such streak began |
| ``adamwatch_nonfinite_first_rank`` | | lowest origin rank at the latest step where any rank was one |

and one warning log line per streak naming the job, rank, source and step.
"""

from __future__ import annotations

import logging
from typing import Any

from adamwatch import wire

from .run_state import RunState, TrainerKey

__all__ = ["NanOriginTracker", "ORIGIN_SOURCES"]

log = logging.getLogger(__name__)

ORIGIN_SOURCES = ("loss", "grad")
_FIRST_RANK = "nonfinite_origin_first_rank"


class NanOriginTracker:
    """A run-state listener exporting where non-finite values began.

    Args:
        state: the sidecar's run state (its generic metric store receives the series).
    """

    def __init__(self, state: RunState):
        self.state = state
        # (trainer, source) -> whether the previous step was already non-finite there
        self._in_streak: dict[tuple[TrainerKey, str], bool] = {}
        self._seen: set[TrainerKey] = set()
        #: streaks seen (one log line each)
        self.streaks = 0

    def on_message(self, key: TrainerKey, message: wire.Message | None) -> None:
        """Run-state listener: every accepted message, and None on disconnect."""
        if message is None:
            self._seen.discard(key)
            for source in ORIGIN_SOURCES:
                self._in_streak.pop((key, source), None)
            return
        if message.type is not wire.MessageType.STEP:
            return
        payload = message.payload
        extras: dict[str, Any] = payload.get("extras") or {}
        if not extras:
            return  # most STEPs: no extras at all
        if not any(f"nonfinite_origin_{s}" in extras for s in ORIGIN_SOURCES):
            return
        if key not in self._seen:
            # Born at 0, so increase() sees the first non-finite step.
            self._seen.add(key)
            for source in ORIGIN_SOURCES:
                self.state.inc(key, "adamwatch_nonfinite_origin_steps_total", {"source": source}, 0.0)
        step = payload.get("step")
        for source in ORIGIN_SOURCES:
            value = extras.get(f"nonfinite_origin_{source}")
            if value is None:
                continue
            bad = value > 0
            if bad:
                self.state.inc(key, "adamwatch_nonfinite_origin_steps_total", {"source": source})
                if not self._in_streak.get((key, source)) and isinstance(step, int):
                    self.state.set_gauge(key, "adamwatch_nonfinite_origin_step", {"source": source}, float(step))
                    self.streaks += 1
                    log.warning(
                        "non-finite %s began on job %s rank %d at step %d (its own, before the ranks' reduction)",
                        source, key.job, key.rank, step,
                    )
            self._in_streak[(key, source)] = bad
        first = extras.get(_FIRST_RANK)
        if first is not None and first >= 0:
            self.state.set_gauge(key, "adamwatch_nonfinite_first_rank", {}, float(first))
