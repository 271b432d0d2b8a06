"""Wire the run-level trackers (issue 11) into a Sidecar: evaluation, convergence, run ends, footprint.

    sidecar = Sidecar(config)
    attach_run_tracking(sidecar, config.convergence, config.runs)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from adamwatch import wire

from .convergence import ConvergenceTracker, parse_convergence_config
from .evaluation import EvaluationExporter
from .footprint import FootprintExporter
from .run_end import RunEndTracker

__all__ = ["RunTracking", "attach_run_tracking", "parse_runs_config"]


def parse_runs_config(raw: Mapping[str, Any] | None) -> dict[str, float]:
    """Validate the ``runs`` mapping (``vanish_grace_seconds``); ValueError names the field."""
    raw = raw or {}
    if not isinstance(raw, Mapping):
        raise ValueError(f"runs: must be a mapping, got {type(raw).__name__}")
    unknown = sorted(set(raw) - {"vanish_grace_seconds"})
    if unknown:
        raise ValueError(f"runs.{unknown[0]}: unknown key (known: vanish_grace_seconds)")
    grace = raw.get("vanish_grace_seconds", 30.0)
    if isinstance(grace, bool) or not isinstance(grace, (int, float)) or not math.isfinite(grace) or grace < 0:
        raise ValueError(f"runs.vanish_grace_seconds: must be a number >= 0, got {grace!r}")
    return {"vanish_grace_seconds": float(grace)}


@dataclass
class RunTracking:
    """The attached trackers (tests read them)."""

    evaluation: EvaluationExporter
    convergence: ConvergenceTracker
    run_end: RunEndTracker
    footprint: FootprintExporter

    def on_tick(self, now: float) -> None:
        self.run_end.on_tick(now)
        known = set(self.run_end.state.keys())
        self.evaluation.forget(known)
        self.convergence.forget(known)
        self.footprint.forget(known)


def attach_run_tracking(sidecar: Any, convergence: Mapping[str, Any] | None = None,
                        runs: Mapping[str, Any] | None = None) -> RunTracking:
    """Register the trackers as listeners and a ticker of ``sidecar``.

    Raises:
        ValueError: a bad ``convergence`` or ``runs`` setting, naming the field.
    """
    state = sidecar.state
    convergence_tracker = ConvergenceTracker(state, parse_convergence_config(convergence))
    tracking = RunTracking(
        evaluation=EvaluationExporter(state),
        convergence=convergence_tracker,
        run_end=RunEndTracker(state, sidecar.clock, parse_runs_config(runs)["vanish_grace_seconds"],
                              target_outcome=convergence_tracker.target_outcome,
                              has_target=convergence_tracker.has_target),
        footprint=FootprintExporter(state),
    )
    # run_end reads the convergence state at a GOODBYE: convergence goes first.
    for listener in (tracking.evaluation, tracking.convergence, tracking.run_end):
        state.add_listener(listener.on_message)
    state.add_listener(tracking.footprint.on_message, types=(wire.MessageType.FOOTPRINT,))  # nothing to do for a STEP
    sidecar.add_ticker(tracking.on_tick)
    return tracking
