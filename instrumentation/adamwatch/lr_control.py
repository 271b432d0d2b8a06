"""Cut the learning rate so that the cut survives ``scheduler.step()``.

Scaling ``param_group["lr"]`` alone is not enough: most torch schedulers
recompute the rate from values they keep themselves (``base_lrs``, the group's
``initial_lr``, OneCycleLR's ``max_lr``/``min_lr``, ``eta_min`` ...), so the
next ``scheduler.step()`` undoes a bare cut. :func:`scale_learning_rate` scales
every value the next ``step()`` can read, once, so that from then on every
rate the schedule produces is exactly ``factor`` times the uncut schedule.

Two kinds of scheduler exist in torch 2.13 and both are handled by the same
rule "scale the group's current lr and every stored value the schedule reads":

- *chainable* ones (StepLR, MultiStepLR, ExponentialLR, LinearLR, ConstantLR,
  PolynomialLR, MultiplicativeLR, CosineAnnealingLR's recursive branch) compute
  the next rate from the group's current ``lr``: scaling the group carries the
  cut forward; their ``base_lrs`` still matter for the closed form used at a
  SequentialLR milestone.
- *closed-form* ones (LambdaLR, CosineAnnealingWarmRestarts, OneCycleLR,
  CyclicLR) compute from ``base_lrs`` or group keys: those are scaled too.

Affine schedules (``eta_min`` in the cosine schedulers, ReduceLROnPlateau's
``min_lrs``) stay exact because their offset is scaled with the rest.

The cumulative scale of each group is stored in the group itself under
:data:`LR_SCALE_KEY`, so it is saved and restored with the optimizer's
``state_dict()`` along with the rates it describes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch.optim import Optimizer

from adamwatch.unwrap import unwrap_scheduler

__all__ = [
    "LR_SCALE_KEY",
    "LRRecovery",
    "current_lr_scales",
    "scale_learning_rate",
    "set_learning_rate_scale",
]

log = logging.getLogger(__name__)

#: param-group key holding the cumulative scale adamwatch applied to that group.
LR_SCALE_KEY = "adamwatch_lr_scale"

# group keys a scheduler reads to compute the next rate (OneCycleLR writes all
# three; LRScheduler writes initial_lr). "lr" is handled separately.
_GROUP_KEYS = ("initial_lr", "max_lr", "min_lr")


def _mul(value: Any, factor: float) -> Any:
    """``value * factor``, out of place: a tensor value may be aliased elsewhere."""
    return value * factor


def _scale_list(values: list[Any], factors: Sequence[float]) -> list[Any]:
    if len(values) != len(factors):
        # A group was added after the scheduler was built: scale what matches.
        return [_mul(v, factors[i]) if i < len(factors) else v for i, v in enumerate(values)]
    return [_mul(v, f) for v, f in zip(values, factors)]


def _scale_scheduler(scheduler: Any, factors: Sequence[float], seen: set[int]) -> None:
    """Scale every stored value of ``scheduler`` (and nested ones) once."""
    if scheduler is None or id(scheduler) in seen:
        return
    seen.add(id(scheduler))
    inner = unwrap_scheduler(scheduler)
    if inner is not scheduler:
        # A framework's wrapper (Accelerate's AcceleratedScheduler, what HF
        # Trainer holds) keeps no rates of its own: its step() steps the inner
        # scheduler, whose base_lrs (LambdaLR: HF's warmup schedules) must carry the cut.
        _scale_scheduler(inner, factors, seen)
        return
    for child in getattr(scheduler, "_schedulers", None) or ():
        # SequentialLR and ChainedScheduler: children share the optimizer, so
        # the groups are scaled once by the caller; each child's own copies here.
        _scale_scheduler(child, factors, seen)
    if isinstance(getattr(scheduler, "base_lrs", None), list):
        scheduler.base_lrs = _scale_list(scheduler.base_lrs, factors)
    if isinstance(getattr(scheduler, "max_lrs", None), list):  # CyclicLR
        scheduler.max_lrs = _scale_list(scheduler.max_lrs, factors)
    if isinstance(getattr(scheduler, "min_lrs", None), list):  # ReduceLROnPlateau
        scheduler.min_lrs = _scale_list(scheduler.min_lrs, factors)
        default_min = getattr(scheduler, "default_min_lr", None)
        if isinstance(default_min, (int, float)) and default_min:
            scheduler.default_min_lr = default_min * _common_factor(factors, "default_min_lr")
    eta_min = getattr(scheduler, "eta_min", None)
    if isinstance(eta_min, (int, float, torch.Tensor)) and not isinstance(eta_min, bool):
        if isinstance(eta_min, torch.Tensor) or eta_min != 0:
            # eta_min is one scalar for all groups: exact only when every group
            # got the same factor (it differs only where a floor stopped a cut).
            scheduler.eta_min = _mul(eta_min, _common_factor(factors, "eta_min"))
    if isinstance(getattr(scheduler, "_last_lr", None), list):
        scheduler._last_lr = _scale_list(scheduler._last_lr, factors)


def _common_factor(factors: Sequence[float], what: str) -> float:
    if len(set(factors)) > 1:
        log.warning(
            "adamwatch: the lr floor gave param groups different factors %s; the "
            "scheduler's single %s is scaled by the largest, so the cut is not exact "
            "for the floored groups",
            list(factors),
            what,
        )
    return max(factors) if factors else 1.0


def _group_lr(group: dict[str, Any]) -> float:
    lr = group["lr"]
    return float(lr) if isinstance(lr, torch.Tensor) else lr


def _floors(optimizer: Optimizer, floor: float | Sequence[float]) -> list[float]:
    n = len(optimizer.param_groups)
    if isinstance(floor, (int, float)) and not isinstance(floor, bool):
        floors = [float(floor)] * n
    elif isinstance(floor, Sequence) and not isinstance(floor, str):
        floors = [float(f) for f in floor]
        if len(floors) != n:
            raise ValueError(f"floor: expected {n} values (one per param group), got {len(floors)}")
    else:
        raise TypeError(f"floor: expected a float or a sequence of floats, got {type(floor).__name__}")
    for f in floors:
        if not math.isfinite(f) or f < 0:
            raise ValueError(f"floor: must be finite and >= 0, got {f}")
    return floors


def _apply_factors(optimizer: Optimizer, scheduler: Any, factors: list[float]) -> None:
    for group, f in zip(optimizer.param_groups, factors):
        if isinstance(group["lr"], torch.Tensor):
            # keep the tensor object: fused/capturable optimizers hold it
            group["lr"].mul_(f)
        else:
            group["lr"] = group["lr"] * f
        for key in _GROUP_KEYS:
            if key in group:
                group[key] = _mul(group[key], f)
        group[LR_SCALE_KEY] = group.get(LR_SCALE_KEY, 1.0) * f
    _scale_scheduler(scheduler, factors, set())


def scale_learning_rate(
    optimizer: Optimizer,
    scheduler: Any = None,
    factor: float = 0.5,
    *,
    floor: float | Sequence[float] = 0.0,
) -> list[float]:
    """Multiply the learning rate of every param group by ``factor``, persistently.

    The cut is applied once to the groups and to the scheduler's stored values,
    so every later ``scheduler.step()`` yields ``factor`` times what it would
    have yielded without the cut. Call it between steps (after
    ``scheduler.step()``, before the next ``optimizer.step()``).

        scale_learning_rate(optimizer, scheduler, 0.5)   # lr halves, stays halved

    Args:
        optimizer: the torch optimizer whose groups are scaled.
        scheduler: its LR scheduler (any torch scheduler, SequentialLR and
            ChainedScheduler included), or None.
        factor: in (0, 1].
        floor: a group's current lr is never cut below this (one value, or
            one per group). A group already at or below its floor is left alone.
            The floor bounds the cut, not the schedule: a schedule that decays
            below the floor by itself still does.

    Returns:
        The factor actually applied to each param group (``factor`` unless the
        floor limited it).
    """
    if isinstance(factor, bool) or not isinstance(factor, (int, float)):
        raise TypeError(f"factor: expected a number, got {type(factor).__name__}")
    if not (math.isfinite(factor) and 0 < factor <= 1):
        raise ValueError(f"factor: must be in (0, 1], got {factor}")
    floors = _floors(optimizer, floor)
    factors: list[float] = []
    for group, group_floor in zip(optimizer.param_groups, floors):
        lr = _group_lr(group)
        if lr <= 0 or lr * factor >= group_floor:
            factors.append(float(factor))
        elif lr <= group_floor:
            factors.append(1.0)
        else:
            factors.append(group_floor / lr)
    _apply_factors(optimizer, scheduler, factors)
    return factors


def current_lr_scales(optimizer: Optimizer) -> list[float]:
    """The cumulative scale adamwatch applied to each param group (1.0 = none).

    Args:
        optimizer: the optimizer.

    Returns:
        One float per param group.
    """
    return [float(g.get(LR_SCALE_KEY, 1.0)) for g in optimizer.param_groups]


def set_learning_rate_scale(
    optimizer: Optimizer, scheduler: Any, scales: float | Sequence[float]
) -> list[float]:
    """Set the cumulative adamwatch scale of each group (recovery, re-applying a cut).

    Unlike :func:`scale_learning_rate` this may raise the rate, up to the
    uncut schedule (scale 1.0). No floor applies.

    Args:
        optimizer: the optimizer.
        scheduler: its scheduler or None.
        scales: target cumulative scale in (0, 1], one value or one per group.

    Returns:
        The factor applied to each group to reach the target.
    """
    n = len(optimizer.param_groups)
    targets = [float(scales)] * n if isinstance(scales, (int, float)) else [float(s) for s in scales]
    if len(targets) != n:
        raise ValueError(f"scales: expected {n} values (one per param group), got {len(targets)}")
    for t in targets:
        if not (math.isfinite(t) and 0 < t <= 1):
            raise ValueError(f"scales: each must be in (0, 1], got {t}")
    factors = [t / s for t, s in zip(targets, current_lr_scales(optimizer))]
    if any(f != 1.0 for f in factors):
        _apply_factors(optimizer, scheduler, factors)
        # avoid drift: store the exact target, not a product of ratios
        for group, t in zip(optimizer.param_groups, targets):
            group[LR_SCALE_KEY] = t
    return factors


class LRRecovery:
    """Gradual recovery of a cut learning rate after a run of healthy steps.

    Off unless passed to :class:`adamwatch.remediation.Remediator`. After
    ``after_steps`` consecutive healthy steps, the cumulative scale is
    multiplied by ``growth`` (never above 1.0); an unhealthy step or a new cut
    starts the count again.

        recovery = LRRecovery(after_steps=200, growth=2.0)

    Thread-safety: :meth:`note` is called from the Monitor's background thread;
    it only counts (one int assignment under the GIL). The rate itself changes
    only at a step boundary, through an action.

    Args:
        after_steps: healthy steps needed before each recovery step (> 0).
        growth: factor applied to the cumulative scale at each recovery step (> 1).
    """

    def __init__(self, after_steps: int = 100, growth: float = 2.0):
        if isinstance(after_steps, bool) or not isinstance(after_steps, int) or after_steps <= 0:
            raise ValueError(f"after_steps: must be a positive int, got {after_steps!r}")
        if not (isinstance(growth, (int, float)) and math.isfinite(growth) and growth > 1):
            raise ValueError(f"growth: must be a number > 1, got {growth!r}")
        self.after_steps = after_steps
        self.growth = float(growth)
        self._healthy_run = 0

    def note(self, healthy: bool) -> None:
        """Count one step summary.

        Args:
            healthy: False resets the count.
        """
        self._healthy_run = self._healthy_run + 1 if healthy else 0

    def reset(self) -> None:
        """Start counting again (called after every cut)."""
        self._healthy_run = 0

    def next_scale(self, current_scale: float) -> float | None:
        """The scale to move to now, or None when no recovery step is due.

        Args:
            current_scale: the current cumulative scale (the smallest group's).

        Returns:
            The new cumulative scale, or None.
        """
        if current_scale >= 1.0 or self._healthy_run < self.after_steps:
            return None
        self._healthy_run = 0
        return min(1.0, current_scale * self.growth)
