"""Convergence toward a declared target: estimated time and steps to reach it, time taken, plateaus.

A target names a metric and a value: ``{"eval_loss": 1.6}`` is the evaluation
result named ``loss`` (``eval_<name>`` for any ``observe_eval`` name), ``{"loss": 1.2}``
the training loss. The trainer announces targets in its HELLO
(``watch(target=...)``); the sidecar config's ``convergence.targets.<job>``
overrides them per job.

For each target the tracker keeps the recent points (time, step, value) and
fits a least-squares line over the last ``window_seconds``:

| metric | meaning |
| --- | --- |
| ``adamwatch_convergence_eta_seconds`` / ``_eta_steps`` | (target - latest value) / slope; absent when the trend leads away |
| ``adamwatch_convergence_reached_seconds`` / ``_reached_step`` | from the trainer's first step to the first value at or beyond the target |
| ``adamwatch_convergence_plateau`` | 1 when, over ``plateau_window_seconds``, the fitted improvement is below ``plateau_min_improvement`` of the value while the learning rate is above ``min_learning_rate`` |

The direction is learned from the first value: above the target means lower is better.

    >>> fit_slope([(0.0, 3.0), (1.0, 2.0), (2.0, 1.0)])
    -1.0
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from adamwatch import wire

from .run_state import RunState, TrainerKey

__all__ = ["ConvergenceConfig", "ConvergenceTracker", "parse_convergence_config", "fit_slope"]

_MAX_POINTS = 4096
_MIN_POINTS = 3
_TARGET_NAME_CHARS = 64


def fit_slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of y over x; None when x does not vary."""
    n = len(points)
    if n < 2:
        return None
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx <= 0:
        return None
    return sum((x - mx) * (y - my) for x, y in points) / sxx


@dataclass(frozen=True)
class ConvergenceConfig:
    """The sidecar config's ``convergence`` mapping, validated (see the README)."""

    targets: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    window_seconds: float = 600.0
    plateau_window_seconds: float = 1800.0
    plateau_min_improvement: float = 0.01
    min_learning_rate: float = 1e-8
    budget_seconds: float | None = None
    sample_interval_seconds: float = 1.0


_KEYS = {"targets", "window_seconds", "plateau_window_seconds", "plateau_min_improvement", "min_learning_rate",
         "budget_seconds", "sample_interval_seconds"}


def _positive(name: str, value: Any, allow_zero: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"convergence.{name}: must be a number {'>=' if allow_zero else '>'} 0, got {value!r}")
    return float(value)


def parse_convergence_config(raw: Mapping[str, Any] | None) -> ConvergenceConfig:
    """Validate the ``convergence`` mapping; ValueError names the bad field."""
    raw = raw or {}
    if not isinstance(raw, Mapping):
        raise ValueError(f"convergence: must be a mapping, got {type(raw).__name__}")
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise ValueError(f"convergence.{unknown[0]}: unknown key (known: {', '.join(sorted(_KEYS))})")
    targets_raw = raw.get("targets") or {}
    if not isinstance(targets_raw, Mapping):
        raise ValueError("convergence.targets: must map job names to {metric: value}")
    targets: dict[str, dict[str, float]] = {}
    for job, spec in targets_raw.items():
        targets[str(job)] = _targets(f"convergence.targets.{job}", spec)
    values: dict[str, Any] = {"targets": targets}
    for name in ("window_seconds", "plateau_window_seconds", "plateau_min_improvement", "sample_interval_seconds"):
        if name in raw:
            values[name] = _positive(name, raw[name], allow_zero=name == "sample_interval_seconds")
    if "min_learning_rate" in raw:
        values["min_learning_rate"] = _positive("min_learning_rate", raw["min_learning_rate"], allow_zero=True)
    if raw.get("budget_seconds") is not None:
        values["budget_seconds"] = _positive("budget_seconds", raw["budget_seconds"])
    return ConvergenceConfig(**values)


def _targets(where: str, spec: Any) -> dict[str, float]:
    if not isinstance(spec, Mapping) or not spec:
        raise ValueError(f"{where}: must be a non-empty mapping like {{eval_loss: 1.6}}")
    out = {}
    for metric, value in spec.items():
        if not isinstance(metric, str) or not (metric == "loss" or metric.startswith("eval_")) \
                or len(metric) > _TARGET_NAME_CHARS:
            raise ValueError(f"{where}.{metric}: target metric must be 'loss' or 'eval_<name>'")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{where}.{metric}: must be a finite number, got {value!r}")
        out[metric] = float(value)
    return out


@dataclass
class _Target:
    value: float
    points: collections.deque = field(default_factory=lambda: collections.deque(maxlen=_MAX_POINTS))
    minimize: bool | None = None
    reached_at: float | None = None
    last_sample: float = -math.inf


@dataclass
class _Run:
    targets: dict[str, _Target] = field(default_factory=dict)
    first_step_time: float | None = None
    lr: float = 0.0


class ConvergenceTracker:
    """RunState listener exporting the convergence series of every trainer with a target.

    Args:
        state: the run state (generic store).
        config: validated :class:`ConvergenceConfig`.
    """

    def __init__(self, state: RunState, config: ConvergenceConfig | None = None):
        self.state = state
        self.config = config or ConvergenceConfig()
        self._runs: dict[TrainerKey, _Run] = {}

    # ------------------------------------------------------------------ listener
    def on_message(self, key: TrainerKey, message: wire.Message | None) -> None:
        if message is None:
            return
        mtype, p = message.type, message.payload
        if mtype is wire.MessageType.HELLO:
            self._on_hello(key, p)
            return
        run = self._runs.get(key)
        if run is None:
            return
        if mtype is wire.MessageType.STEP:
            if run.first_step_time is None:
                run.first_step_time = float(p["time"])
            if p["lr"]:
                run.lr = max(p["lr"])
            target = run.targets.get("loss")
            loss = p.get("loss")
            if target is not None and loss is not None:
                self._observe(key, run, "loss", target, float(p["time"]), p["step"], float(loss))
        elif mtype is wire.MessageType.EVAL:
            for name, value in p["metrics"].items():
                target = run.targets.get("eval_" + name)
                if target is not None and value is not None:
                    self._observe(key, run, "eval_" + name, target, float(p["time"]), p["step"], float(value))

    def _on_hello(self, key: TrainerKey, hello: dict[str, Any]) -> None:
        configured = self.config.targets.get(key.job)
        if configured is None:
            announced = hello.get("target")
            try:
                configured = _targets("HELLO.target", announced) if announced else {}
            except ValueError:
                configured = {}  # a bad announced target is ignored, not fatal
        run = self._runs.get(key)
        if run is None:
            run = self._runs[key] = _Run()
        for metric in [m for m in run.targets if m not in configured]:
            del run.targets[metric]
            self._clear(key, metric, reached=True)
            self.state.remove_series(key, "adamwatch_convergence_target", {"metric": metric})
        for metric, value in configured.items():
            if metric not in run.targets or run.targets[metric].value != value:
                run.targets[metric] = _Target(value)
                self._clear(key, metric, reached=True)
            self.state.set_gauge(key, "adamwatch_convergence_target", {"metric": metric}, value)
            self.state.set_gauge(key, "adamwatch_convergence_plateau", {"metric": metric}, 0.0)

    # ------------------------------------------------------------------ estimate
    def _observe(self, key: TrainerKey, run: _Run, metric: str, target: _Target, t: float, step: int,
                 value: float) -> None:
        if not math.isfinite(value):
            return
        if metric == "loss" and t - target.last_sample < self.config.sample_interval_seconds:
            return  # per-step losses are thinned to one point per interval: bounded work and memory
        target.last_sample = t
        if target.minimize is None:
            target.minimize = value > target.value
        target.points.append((t, float(step), value))
        horizon = t - max(self.config.window_seconds, self.config.plateau_window_seconds)
        while target.points and target.points[0][0] < horizon:
            target.points.popleft()
        labels = {"metric": metric}
        state = self.state
        reached = value <= target.value if target.minimize else value >= target.value
        if target.reached_at is None and reached:
            target.reached_at = t
            start = run.first_step_time if run.first_step_time is not None else t
            state.set_gauge(key, "adamwatch_convergence_reached_seconds", labels, max(0.0, t - start))
            state.set_gauge(key, "adamwatch_convergence_reached_step", labels, float(step))
        if target.reached_at is not None:
            state.set_gauge(key, "adamwatch_convergence_eta_seconds", labels, 0.0)
            state.set_gauge(key, "adamwatch_convergence_eta_steps", labels, 0.0)
            state.set_gauge(key, "adamwatch_convergence_plateau", labels, 0.0)
            return
        recent = [p for p in target.points if p[0] >= t - self.config.window_seconds]
        gap = target.value - value
        for index, name in ((0, "adamwatch_convergence_eta_seconds"), (1, "adamwatch_convergence_eta_steps")):
            slope = fit_slope([(p[index], p[2]) for p in recent]) if len(recent) >= _MIN_POINTS else None
            if slope is not None and slope != 0 and (gap / slope) > 0:
                state.set_gauge(key, name, labels, gap / slope)
            else:
                state.remove_series(key, name, labels)  # the trend does not lead to the target
        state.set_gauge(key, "adamwatch_convergence_plateau", labels,
                        1.0 if self._plateau(target, t, run.lr) else 0.0)

    def _plateau(self, target: _Target, t: float, lr: float) -> bool:
        window = self.config.plateau_window_seconds
        points = [p for p in target.points if p[0] >= t - window]
        if len(points) < _MIN_POINTS or points[-1][0] - points[0][0] < 0.8 * window:
            return False  # not enough history to call it flat
        if lr <= self.config.min_learning_rate:
            return False  # a finished schedule is flat on purpose
        slope = fit_slope([(p[0], p[2]) for p in points])
        if slope is None:
            return False
        improvement = (-slope if target.minimize else slope) * (points[-1][0] - points[0][0])
        scale = abs(sum(p[2] for p in points) / len(points)) or 1.0
        return improvement < self.config.plateau_min_improvement * scale

    def _clear(self, key: TrainerKey, metric: str, reached: bool) -> None:
        labels = {"metric": metric}
        names = ["adamwatch_convergence_eta_seconds", "adamwatch_convergence_eta_steps",
                 "adamwatch_convergence_plateau"]
        if reached:
            names += ["adamwatch_convergence_reached_seconds", "adamwatch_convergence_reached_step"]
        for name in names:
            self.state.remove_series(key, name, labels)

    # ------------------------------------------------------------------ queries
    def has_target(self, key: TrainerKey) -> bool:
        """Whether trainer ``key`` has a convergence target (announced or configured)."""
        run = self._runs.get(key)
        return bool(run and run.targets)

    def target_outcome(self, key: TrainerKey, now: float) -> str | None:
        """At a run's end: "reached" (within ``budget_seconds`` when set), "missed", or None without targets."""
        run = self._runs.get(key)
        if run is None or not run.targets:
            return None
        budget = self.config.budget_seconds
        start = run.first_step_time
        for target in run.targets.values():
            if target.reached_at is None:
                return "missed"
            if budget is not None and start is not None and target.reached_at - start > budget:
                return "missed"
        return "reached"

    def forget(self, keys: set[TrainerKey]) -> None:
        """Drop the state of trainers the run state no longer knows (expired)."""
        for key in [k for k in self._runs if k not in keys]:
            del self._runs[key]
