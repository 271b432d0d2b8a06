"""Step-latency detectors: pure functions of the STEP payloads of one rank and a clock.

| detector | fires when | evidence |
| --- | --- | --- |
| ``non_finite`` | ``consecutive_steps`` steps in a row hold a NaN/Inf loss or gradient | streak, loss, grad_norm, sources |
| ``loss_spike`` | loss > mean + k·σ of the last ``window`` healthy losses | value, mean, std, threshold, samples |
| ``grad_norm_spike`` | global grad norm > mean + k·σ of its own window | value, mean, std, threshold, samples |
| ``stall`` | a connected trainer that has stepped sends no STEP for ``timeout_seconds`` | seconds_since_last_step, last_step |
| ``spike_guard`` | the trainer's on-device spike guard acted on ``consecutive_steps`` steps in a row | streak, mode, loss, grad_norm |

A step the spike guard acted on (STEP ``extras`` ``spike_guard_clip``/``spike_guard_skip``
= 1) is neutral for ``loss_spike`` and ``grad_norm_spike``: it neither raises an incident
nor enters their windows, nor breaks their streaks. The guard judged the same pre-clip
norm and already handled the step; the repair ladder is for what it cannot handle, a
streak of activations (the ``spike_guard`` detector).

The spike rule, for a window ``x_1..x_n`` of the last healthy values
(``min_samples <= n <= window``)::

    mean = Σ x_i / n
    std  = sqrt(Σ (x_i - mean)² / (n - 1))
    threshold = mean + k · max(std, min_std_ratio · |mean|)

A value above ``threshold`` is a spike and does *not* enter the window, so a
run of spikes cannot drag the mean up and hide itself. Until the window holds
``min_samples`` values the detector is not armed and every finite value
enters. The ``min_std_ratio`` floor keeps a flat series (σ ≈ 0) from firing on
rounding noise. Non-finite values are left to the ``non_finite`` detector.

Consecutive anomalous steps form one streak: the first is reported with
``new=True`` (and counted in ``adamwatch_detections_total``), later ones with
``new=False`` so the ladder can tell "it persists" from "it happened again".

    >>> from adamwatch_sidecar.remediation.policy import SpikeParams
    >>> d = SpikeDetector("loss_spike", SpikeParams(k=6, window=8, min_samples=4))
    >>> [d.observe(v) for v in (1.0, 1.1, 0.9, 1.0)]
    [None, None, None, None]
    >>> round(d.observe(5.0)["threshold"], 3)
    1.49
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..extras_export import guard_activation
from .policy import DetectorParams, NonFiniteParams, SpikeGuardStreakParams, SpikeParams, StallParams

__all__ = [
    "Incident",
    "SpikeDetector",
    "NonFiniteDetector",
    "StallDetector",
    "SpikeGuardStreakDetector",
    "RankDetectors",
]


@dataclass
class Incident:
    """Something a detector (or an alert) saw, for the ladder to act on.

    Args:
        detector: detector name, or ``alert:<alertname>`` for webhook incidents.
        ladder: the ladder that handles it.
        job, rank: where it was seen.
        step: the trainer step it was seen at (None for stalls and alerts without one).
        time: sidecar clock time of the detection.
        evidence: the numbers behind the decision (JSON-serialisable).
        new: the first step of a streak (False: the anomaly persists).
        streak: how many consecutive steps (or alert deliveries) so far.
    """

    detector: str
    ladder: str
    job: str
    rank: int
    step: int | None
    time: float
    evidence: dict[str, Any] = field(default_factory=dict)
    new: bool = True
    streak: int = 1

    def summary(self) -> str:
        """One line for logs and the command's ``reason``."""
        at = f" at step {self.step}" if self.step is not None else ""
        return f"{self.detector} on {self.job}/{self.rank}{at}"


def _finite(value: Any) -> bool:
    if type(value) is float:  # the usual case, checked first (ingest hot path)
        return math.isfinite(value)
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class SpikeDetector:
    """Rolling mean + k·σ detector over the last ``window`` healthy values (see module docstring).

    Args:
        name: detector name reported in evidence.
        params: k, window, min_samples, min_std_ratio.
    """

    def __init__(self, name: str, params: SpikeParams):
        self.name = name
        self.params = params
        self._values: deque[float] = deque()
        self.streak = 0
        self._recenter()

    # Running sums of (x - shift) and (x - shift)^2 make each step O(1). The
    # shift is re-centred on the window mean (and the sums recomputed exactly)
    # every ``window`` insertions, so neither cancellation nor rounding drift
    # can build up: the statistics equal the direct formulas to ~1e-12.
    def _recenter(self) -> None:
        values = self._values
        self._shift = math.fsum(values) / len(values) if values else 0.0
        self._s1 = math.fsum(x - self._shift for x in values)
        self._s2 = math.fsum((x - self._shift) ** 2 for x in values)
        self._since_recenter = 0

    @property
    def samples(self) -> int:
        """Healthy values in the window."""
        return len(self._values)

    @property
    def armed(self) -> bool:
        """The window holds enough values to judge."""
        return len(self._values) >= self.params.min_samples

    def reset(self) -> None:
        """Forget the window (after a checkpoint restore the old level is meaningless)."""
        self._values.clear()
        self.streak = 0
        self._recenter()

    def _push(self, value: float) -> None:
        values = self._values
        d = value - self._shift
        values.append(value)
        self._s1 += d
        self._s2 += d * d
        cancelled = False
        if len(values) > self.params.window:
            old = values.popleft() - self._shift
            self._s1 -= old
            self._s2 -= old * old
            # A large value leaving a now-quiet window would leave rounding
            # residue bigger than the true variance: recompute exactly.
            cancelled = old * old > 1e6 * self._s2
        self._since_recenter += 1
        if cancelled or self._since_recenter >= self.params.window or len(values) == 1:
            self._recenter()

    def stats(self) -> tuple[float, float]:
        """(mean, sample standard deviation) of the window (needs at least 2 values)."""
        n = len(self._values)
        s1 = self._s1
        mean = self._shift + s1 / n
        var = max(self._s2 - s1 * s1 / n, 0.0) / (n - 1)
        return mean, math.sqrt(var)

    def threshold(self) -> tuple[float, float, float] | None:
        """(mean, std, threshold) of the current window, or None while not armed."""
        if not self.armed:
            return None
        mean, std = self.stats()
        return mean, std, mean + self.params.k * max(std, self.params.min_std_ratio * abs(mean))

    def describe(self) -> dict[str, Any]:
        """JSON-ready state: armed, samples, streak, mean, std, threshold (status API, status page)."""
        window = self.threshold()
        mean, std, threshold = window if window is not None else (None, None, None)
        return {"armed": window is not None, "samples": self.samples, "min_samples": self.params.min_samples,
                "streak": self.streak, "mean": mean, "std": std, "threshold": threshold}

    def observe(self, value: float | None) -> dict[str, Any] | None:
        """Judge one value.

        Args:
            value: the step's loss or grad norm; None or non-finite values are ignored.

        Returns:
            Evidence (value, mean, std, threshold, k, samples, streak) when the value is a
            spike, else None.
        """
        if not _finite(value):
            return None
        value = float(value)
        # threshold() inlined (same arithmetic, same result): this runs for every STEP
        params = self.params
        n = len(self._values)
        if n < params.min_samples:
            self._push(value)
            return None
        s1 = self._s1
        mean = self._shift + s1 / n
        std = math.sqrt(max(self._s2 - s1 * s1 / n, 0.0) / (n - 1))
        threshold = mean + params.k * max(std, params.min_std_ratio * abs(mean))
        if value > threshold:
            self.streak += 1
            return {
                "value": value,
                "mean": mean,
                "std": std,
                "threshold": threshold,
                "k": self.params.k,
                "samples": len(self._values),
                "streak": self.streak,
            }
        self.streak = 0
        self._push(value)
        return None


class NonFiniteDetector:
    """Counts consecutive steps with a NaN/Inf loss or gradient.

    Steps the GradScaler skipped are neutral by default (they neither count nor
    break a streak): dynamic loss scaling overflows on purpose.
    """

    def __init__(self, params: NonFiniteParams):
        self.params = params
        self.streak = 0
        self._origin: dict[str, Any] | None = None  # where the current streak began (multi-rank)

    def reset(self) -> None:
        """Forget the current streak."""
        self.streak = 0

    def observe(self, payload: Mapping[str, Any]) -> dict[str, Any] | None:
        """Judge one STEP payload.

        Args:
            payload: the STEP message payload.

        Returns:
            Evidence once the streak reaches ``consecutive_steps`` (and for every further
            non-finite step of the same streak), else None.
        """
        loss = payload.get("loss")
        sources = []
        if payload.get("loss_nonfinite") or (loss is not None and not _finite(loss)):
            sources.append("loss")
        grad_norm = payload.get("grad_norm")
        if payload.get("grad_nonfinite") or (grad_norm is not None and not _finite(grad_norm)):
            sources.append("grad")
        if not sources:
            self.streak = 0
            return None
        if self.params.ignore_grad_scaler_skips and payload.get("skip_reason") == "grad_scaler":
            return None
        self.streak += 1
        if self.streak == 1:
            self._origin = _nonfinite_origin(payload)
        if self.streak < self.params.consecutive_steps:
            return None
        evidence = {
            "sources": sources,
            "streak": self.streak,
            "consecutive_steps": self.params.consecutive_steps,
            "loss": loss if _finite(loss) else (None if loss is None else str(loss)),
            "grad_norm": grad_norm if _finite(grad_norm) else (None if grad_norm is None else str(grad_norm)),
            "skipped": bool(payload.get("skipped", False)),
        }
        if self._origin is not None:
            evidence["origin"] = self._origin
        return evidence


def _nonfinite_origin(payload: Mapping[str, Any]) -> dict[str, Any] | None:
    """Under torch.distributed (adamwatch.cross_rank): the lowest rank whose own loss or
    gradients were non-finite before the ranks' reduction, at the streak's first step."""
    extras = payload.get("extras") or {}
    first = extras.get("nonfinite_origin_first_rank")
    if not isinstance(first, (int, float)) or not _finite(first) or first < 0:
        return None
    return {"rank": int(first), "step": payload.get("step")}


class StallDetector:
    """No STEP for ``timeout_seconds`` while connected, after at least one step.

    The clock is the sidecar's (when STEPs arrived), not the trainer's, so clock
    skew between containers cannot fake or hide a stall. A stall fires once and
    re-arms at the next STEP.
    """

    def __init__(self, params: StallParams):
        self.params = params
        self.last_step_at: float | None = None
        self.last_step: int | None = None
        self.connected = False
        self.fired = False

    def step_seen(self, step: int, now: float) -> None:
        """Record a STEP arriving at sidecar time ``now``."""
        self.last_step_at = now
        self.last_step = step
        self.connected = True
        self.fired = False

    def check(self, now: float) -> dict[str, Any] | None:
        """Evidence when the trainer just became stalled, else None."""
        if not self.connected or self.fired or self.last_step_at is None:
            return None
        idle = now - self.last_step_at
        if idle < self.params.timeout_seconds:
            return None
        self.fired = True
        return {"seconds_since_last_step": idle, "last_step": self.last_step,
                "timeout_seconds": self.params.timeout_seconds}


def _guard_mode(payload: Mapping[str, Any]) -> str | None:
    """The mode in which the trainer's spike guard acted on this STEP, or None."""
    extras = payload.get("extras")
    return None if extras is None else guard_activation(extras)


class SpikeGuardStreakDetector:
    """Counts consecutive steps the trainer's spike guard acted on.

    Steps without the guard's extras (guard off, or a summary that skipped the
    extensions) leave the streak as it is; a step where the guard did not act ends it.
    """

    def __init__(self, params: SpikeGuardStreakParams):
        self.params = params
        self.streak = 0

    def reset(self) -> None:
        """Forget the current streak."""
        self.streak = 0

    def observe(self, payload: Mapping[str, Any]) -> dict[str, Any] | None:
        """Judge one STEP payload.

        Returns:
            Evidence once the streak reaches ``consecutive_steps`` (and on every further
            activation of the same streak), else None.
        """
        extras = payload.get("extras")
        if not extras or not isinstance(extras, Mapping) or not any(f"spike_guard_{m}" in extras for m in ("clip", "skip")):
            return None
        mode = _guard_mode(payload)
        if mode is None:
            self.streak = 0
            return None
        self.streak += 1
        if self.streak < self.params.consecutive_steps:
            return None
        return {
            "mode": mode,
            "streak": self.streak,
            "consecutive_steps": self.params.consecutive_steps,
            "loss": payload.get("loss") if _finite(payload.get("loss")) else None,
            "grad_norm": payload.get("grad_norm") if _finite(payload.get("grad_norm")) else None,
        }


class RankDetectors:
    """All detectors of one (job, rank), fed with that rank's STEP payloads.

    Args:
        job, rank: where the STEPs come from.
        params: detector parameters from the policy.
    """

    def __init__(self, job: str, rank: int, params: DetectorParams):
        self.job = job
        self.rank = rank
        self.params = params
        self.non_finite = NonFiniteDetector(params.non_finite)
        self.loss_spike = SpikeDetector("loss_spike", params.loss_spike)
        self.grad_norm_spike = SpikeDetector("grad_norm_spike", params.grad_norm_spike)
        self.stall = StallDetector(params.stall)
        self.spike_guard = SpikeGuardStreakDetector(params.spike_guard)

    def reset_windows(self) -> None:
        """Forget spike windows and streaks (after a restore or a new session)."""
        self.non_finite.reset()
        self.loss_spike.reset()
        self.grad_norm_spike.reset()
        self.spike_guard.reset()

    def _incident(self, detector: str, step: int | None, now: float, evidence: dict[str, Any],
                  streak: int, first_at: int) -> Incident:
        return Incident(detector=detector, ladder=detector, job=self.job, rank=self.rank, step=step,
                        time=now, evidence=evidence, new=streak == first_at, streak=streak)

    def observe_step(self, payload: Mapping[str, Any], now: float) -> list[Incident]:
        """Feed one STEP payload received at sidecar time ``now``.

        Returns:
            The incidents this step raised (usually none).
        """
        step = payload.get("step")
        self.stall.step_seen(step, now)
        found: list[Incident] = []
        p = self.params
        if p.non_finite.enabled:
            ev = self.non_finite.observe(payload)
            if ev is not None:
                found.append(self._incident("non_finite", step, now, ev, ev["streak"],
                                            p.non_finite.consecutive_steps))
        guarded = _guard_mode(payload) is not None  # neutral for the spike detectors (module docstring)
        if p.loss_spike.enabled and not guarded:
            ev = self.loss_spike.observe(payload.get("loss"))
            if ev is not None:
                found.append(self._incident("loss_spike", step, now, ev, ev["streak"], 1))
        if p.grad_norm_spike.enabled and not guarded:
            ev = self.grad_norm_spike.observe(payload.get("grad_norm"))
            if ev is not None:
                found.append(self._incident("grad_norm_spike", step, now, ev, ev["streak"], 1))
        if p.spike_guard.enabled:
            ev = self.spike_guard.observe(payload)
            if ev is not None:
                found.append(self._incident("spike_guard", step, now, ev, ev["streak"],
                                            p.spike_guard.consecutive_steps))
        return found

    def check_stall(self, now: float) -> Incident | None:
        """Called once a second: a stall incident when this rank just stalled."""
        if not self.params.stall.enabled:
            return None
        ev = self.stall.check(now)
        if ev is None:
            return None
        return self._incident("stall", self.stall.last_step, now, ev, 1, 1)
