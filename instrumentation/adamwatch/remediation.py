"""Remediation actions, applied by the Monitor at a step boundary.

    remediator = Remediator(optimizer, scheduler, checkpointer, lr_floor=1e-6)
    result = remediator.apply(Action("reduce_lr", {"factor": 0.5}), step=1200)
    result.outcome        # "applied" | "failed" | "rejected"

| kind                 | args                                        | effect |
| -------------------- | ------------------------------------------- | ------ |
| `reduce_lr`          | `factor` in (0, 1]                          | persistent LR cut (lr_control.scale_learning_rate), floor `lr_floor` |
| `restore_checkpoint` | `step` int or null, `before_step` int or null | Checkpointer.restore; the LR cut in force is kept |
| `stop`               | none                                        | `stop_requested = True`, `on_stop()` |
| `recover_lr`         | `scale` in (0, 1]                           | set the cumulative LR scale (LRRecovery's steps) |

``apply`` never raises: a bad argument is "rejected" with a message naming it,
an error while applying is "failed" with the error in ``detail``.
"""

from __future__ import annotations

import logging
import math
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch.optim import Optimizer

from .lr_control import LRRecovery, current_lr_scales, scale_learning_rate, set_learning_rate_scale

__all__ = [
    "ACTION_KINDS",
    "Action",
    "ActionResult",
    "Remediator",
    "SchedulerStepHook",
    "after_scheduler_step",
    "skip_next_scheduler_step",
]

log = logging.getLogger(__name__)

ACTION_KINDS = ("reduce_lr", "restore_checkpoint", "stop", "recover_lr")


def _new_id() -> str:
    return uuid.uuid4().hex


@dataclass
class Action:
    """One remediation to apply at the next step boundary.

    Args:
        kind: one of :data:`ACTION_KINDS`.
        args: the kind's arguments (JSON values).
        id: unique id, echoed in the ACK (a sidecar COMMAND brings its own).
        source: "local" (user code, in process), "sidecar", "recovery".
        reason: why, for the audit log.
    """

    kind: str
    args: dict[str, Any] = field(default_factory=dict)
    id: str = field(default_factory=_new_id)
    source: str = "local"
    reason: str | None = None

    @classmethod
    def from_command(cls, payload: dict[str, Any]) -> Action:
        """Build an action from a wire COMMAND payload (``id``, ``action``, ``args``, ``reason``).

        Args:
            payload: the decoded COMMAND message payload.

        Returns:
            The action, ``source="sidecar"``.
        """
        return cls(
            kind=str(payload["action"]),
            args=dict(payload.get("args") or {}),
            id=str(payload["id"]),
            source="sidecar",
            reason=payload.get("reason"),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (used to broadcast actions between ranks).

        Returns:
            ``{"kind", "args", "id", "source", "reason"}``.
        """
        return {"kind": self.kind, "args": self.args, "id": self.id, "source": self.source, "reason": self.reason}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Action:
        """Inverse of :meth:`to_dict`.

        Args:
            data: a dict from :meth:`to_dict`.

        Returns:
            The action.
        """
        return cls(kind=data["kind"], args=dict(data["args"]), id=data["id"], source=data["source"], reason=data["reason"])


@dataclass
class ActionResult:
    """What became of an action.

    Args:
        action: the action.
        outcome: "applied", "failed" or "rejected".
        step: the step boundary at which it took effect (None if it did not).
        detail: human-readable detail (the error, the new lrs, the restored step).
        data: machine-readable detail, e.g. ``{"restored_step": 80}``,
            ``{"lr_scales": [0.5], "lrs": [5e-4]}``.
    """

    action: Action
    outcome: str
    step: int | None
    detail: str = ""
    data: dict[str, Any] = field(default_factory=dict)

    def to_ack(self) -> dict[str, Any]:
        """The wire ACK payload for this result.

        Returns:
            ``{"id", "action", "outcome", "step", "detail"}``.
        """
        return {
            "id": self.action.id,
            "action": self.action.kind,
            "outcome": self.outcome,
            "step": self.step,
            "detail": self.detail,
        }


class _Rejected(ValueError):
    pass


def _optional_step(args: dict[str, Any], name: str) -> int | None:
    value = args.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _Rejected(f"{name}: expected an int >= 0 or null, got {value!r}")
    return value


def _unit_interval(args: dict[str, Any], name: str) -> float:
    if name not in args:
        raise _Rejected(f"{name}: missing")
    value = args[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Rejected(f"{name}: expected a number in (0, 1], got {value!r}")
    if not (math.isfinite(value) and 0 < value <= 1):
        raise _Rejected(f"{name}: must be in (0, 1], got {value!r}")
    return float(value)


def _no_unknown(args: dict[str, Any], allowed: Sequence[str]) -> None:
    unknown = sorted(set(args) - set(allowed))
    if unknown:
        raise _Rejected(f"{unknown[0]}: unknown argument (allowed: {', '.join(allowed) or 'none'})")


class Remediator:
    """Applies :class:`Action` objects to an optimizer, its scheduler and a Checkpointer.

    Call :meth:`apply` only at a step boundary on the training thread (after
    ``scheduler.step()``, before the next forward pass). :meth:`note_step` may
    be called from any thread.

    Args:
        optimizer: the Adam/AdamW optimizer.
        scheduler: its LR scheduler, or None.
        checkpointer: an :class:`adamwatch.checkpoint.Checkpointer`, or None
            (then restores are rejected).
        lr_floor: a cut never takes a group's lr below this (float or one per group).
        lr_recovery: an :class:`LRRecovery` to raise a cut LR back gradually
            after healthy steps; None (default) keeps cuts for good.
        keep_lr_cut_on_restore: a checkpoint holds the lr of its time; with
            True (default) the cut in force when the restore happens is
            re-applied afterwards, so that "cut, then restore" keeps the cut.
        on_stop: called once when a "stop" action is applied.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        scheduler: Any = None,
        checkpointer: Any = None,
        *,
        lr_floor: float | Sequence[float] = 0.0,
        lr_recovery: LRRecovery | None = None,
        keep_lr_cut_on_restore: bool = True,
        on_stop: Callable[[], None] | None = None,
    ):
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if lr_recovery is not None and not isinstance(lr_recovery, LRRecovery):
            raise TypeError(f"lr_recovery: expected an LRRecovery or None, got {type(lr_recovery).__name__}")
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.checkpointer = checkpointer
        self.lr_floor = lr_floor
        self.lr_recovery = lr_recovery
        self.keep_lr_cut_on_restore = keep_lr_cut_on_restore
        self.on_stop = on_stop
        self.stop_requested = False
        # Why restores are refused on this run (set by the Monitor when the
        # ranks' checkpointing differs, e.g. a Checkpointer on rank 0 only: a
        # restore agreed over all ranks would wait forever for the others).
        self.restore_refusal: str | None = None
        self._lock = threading.Lock()

    @property
    def lr_scale(self) -> float:
        """Cumulative factor applied to the learning rate (the smallest over groups; 1.0 = none)."""
        scales = current_lr_scales(self.optimizer)
        return min(scales) if scales else 1.0

    @property
    def lr_scales(self) -> list[float]:
        """Cumulative factor applied to each param group."""
        return current_lr_scales(self.optimizer)

    # ----------------------------------------------------------------- health
    def note_step(self, step: int, healthy: bool) -> None:
        """Count a step summary for LR recovery (thread-safe, cheap).

        Args:
            step: the step.
            healthy: whether it was healthy.
        """
        if self.lr_recovery is not None:
            with self._lock:
                self.lr_recovery.note(healthy)

    def pending_actions(self) -> list[Action]:
        """Actions this remediator wants to take by itself (an LR recovery step).

        The Monitor adds them to its local actions before the distributed
        exchange, so that rank 0 decides for every rank.

        Returns:
            A list with at most one "recover_lr" action.
        """
        if self.lr_recovery is None:
            return []
        with self._lock:
            target = self.lr_recovery.next_scale(self.lr_scale)
        if target is None:
            return []
        return [Action("recover_lr", {"scale": target}, source="recovery", reason="healthy steps since the cut")]

    # ------------------------------------------------------------------ apply
    def resolve(self, action: Action) -> Action:
        """Pin ``restore_checkpoint(step=None)`` to a concrete step (rank 0, before broadcast).

        Other ranks may not have seen the same incidents, so they must restore
        the step rank 0 chose. With a Checkpointer that agrees across ranks,
        rank 0's choice becomes ``before_step`` (an upper bound) and the ranks
        agree on the newest step usable on all of them when they restore.
        Anything else is returned unchanged, as is a restore that cannot be
        resolved (applying it then fails with the reason).

        Args:
            action: the action.

        Returns:
            The action, with ``args["step"]`` set for a restore.
        """
        if action.kind != "restore_checkpoint" or self.checkpointer is None or action.args.get("step") is not None:
            return action
        agrees = getattr(self.checkpointer, "agrees_across_ranks", lambda: False)()
        try:
            step = self.checkpointer.select(before_step=_optional_step(action.args, "before_step"))
        except Exception:  # noqa: BLE001 - reported when applied
            return action
        if agrees:
            # The Checkpointer picks, with every rank, the newest step usable on all
            # of them. Rank 0's choice is an upper bound (it alone may know of an
            # incident), not a pin: a rank whose copy of that step is corrupt would
            # refuse an exact step, and the ranks would disagree.
            args = dict(action.args, step=None, before_step=step + 1)
            return Action(action.kind, args, id=action.id, source=action.source, reason=action.reason)
        args = dict(action.args, step=step)
        args.pop("before_step", None)
        return Action(action.kind, args, id=action.id, source=action.source, reason=action.reason)

    def apply(self, action: Action, step: int) -> ActionResult:
        """Apply one action now. Never raises.

        Args:
            action: the action.
            step: the current step boundary (reported in the result).

        Returns:
            The :class:`ActionResult`.
        """
        try:
            if not isinstance(action, Action):
                raise _Rejected(f"action: expected an Action, got {type(action).__name__}")
            if not isinstance(action.args, dict):
                raise _Rejected(f"args: expected a mapping, got {type(action.args).__name__}")
            handler = {
                "reduce_lr": self._reduce_lr,
                "restore_checkpoint": self._restore,
                "stop": self._stop,
                "recover_lr": self._recover_lr,
            }.get(action.kind)
            if handler is None:
                raise _Rejected(f"kind: unknown action {action.kind!r} (expected one of {', '.join(ACTION_KINDS)})")
            detail, data = handler(action.args)
        except _Rejected as exc:
            log.warning("adamwatch: rejected %s at step %s: %s", getattr(action, "kind", action), step, exc)
            return ActionResult(action, "rejected", None, str(exc))
        except Exception as exc:  # noqa: BLE001 - apply must never take the training loop down
            log.exception("adamwatch: %s failed at step %s", action.kind, step)
            return ActionResult(action, "failed", None, f"{type(exc).__name__}: {exc}")
        log.info("adamwatch: applied %s at step %s: %s", action.kind, step, detail)
        return ActionResult(action, "applied", step, detail, data)

    def _lr_data(self) -> dict[str, Any]:
        return {"lr_scales": self.lr_scales, "lrs": [float(g["lr"]) for g in self.optimizer.param_groups]}

    def _reduce_lr(self, args: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        _no_unknown(args, ("factor",))
        factor = _unit_interval(args, "factor")
        applied = scale_learning_rate(self.optimizer, self.scheduler, factor, floor=self.lr_floor)
        if self.lr_recovery is not None:
            with self._lock:
                self.lr_recovery.reset()
        data = self._lr_data()
        floored = "" if all(f == factor for f in applied) else f" (floor {self.lr_floor} limited it to {applied})"
        return f"lr x{factor}{floored}: lr now {data['lrs']}", data

    def _recover_lr(self, args: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        _no_unknown(args, ("scale",))
        scale = _unit_interval(args, "scale")
        set_learning_rate_scale(self.optimizer, self.scheduler, scale)
        data = self._lr_data()
        return f"lr scale now {scale}: lr now {data['lrs']}", data

    def _restore(self, args: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        _no_unknown(args, ("step", "before_step"))
        step = _optional_step(args, "step")
        before_step = _optional_step(args, "before_step")
        if step is not None and before_step is not None:
            raise _Rejected("before_step: only allowed when step is null")
        if self.checkpointer is None:
            raise _Rejected("checkpointer: none configured, cannot restore")
        if self.restore_refusal is not None:
            raise _Rejected(self.restore_refusal)
        scales_before = self.lr_scales
        restored = self.checkpointer.restore(step, before_step=before_step)
        if self.keep_lr_cut_on_restore:
            set_learning_rate_scale(self.optimizer, self.scheduler, scales_before)
        data = {"restored_step": restored, **self._lr_data()}
        return f"restored checkpoint of step {restored}", data

    def _stop(self, args: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        _no_unknown(args, ())
        first = not self.stop_requested
        self.stop_requested = True
        if first and self.on_stop is not None:
            try:
                self.on_stop()
            except Exception as exc:  # noqa: BLE001 - the stop itself stands
                log.exception("adamwatch: on_stop callback failed")
                return f"stop requested (on_stop failed: {type(exc).__name__}: {exc})", {}
        return "stop requested", {}


class SchedulerStepHook:
    """Handle returned by :func:`after_scheduler_step` and :func:`skip_next_scheduler_step`;
    ``remove()`` undoes it."""

    def __init__(self, scheduler: Any, original_class: type):
        self._scheduler = scheduler
        self._original_class = original_class

    @property
    def active(self) -> bool:
        """Whether the scheduler still runs the swapped ``step``."""
        return self._scheduler is not None

    def remove(self) -> None:
        """Give the scheduler its own class back (idempotent)."""
        if self._scheduler is not None:
            self._scheduler.__class__ = self._original_class
            self._scheduler = None


def _swap_step(scheduler: Any, make_step: Callable[[type, SchedulerStepHook], Callable[..., Any]]) -> SchedulerStepHook:
    """Swap the scheduler's class for a subclass with another ``step``.

    A subclass, not an instance attribute: torch schedulers put every instance
    attribute into ``state_dict()``, and a checkpoint saved meanwhile would
    then fail to pickle.
    """
    original_class = type(scheduler)
    hook = SchedulerStepHook(scheduler, original_class)
    step = make_step(original_class, hook)
    scheduler.__class__ = type(original_class.__name__, (original_class,),
                               {"step": step, "__module__": original_class.__module__})
    return hook


def after_scheduler_step(scheduler: Any, callback: Callable[[], None]) -> SchedulerStepHook:
    """Call ``callback()`` right after every ``scheduler.step(...)``.

    The boundary after ``scheduler.step()`` is the one where a checkpoint
    restore is exact: a checkpoint saved after ``scheduler.step()`` holds the
    scheduler of that step, so restoring between ``optimizer.step()`` and
    ``scheduler.step()`` would advance the schedule one step too far.

        hook = after_scheduler_step(scheduler, monitor_apply_actions)
        ...
        hook.remove()

    Args:
        scheduler: any torch LR scheduler (ReduceLROnPlateau's ``step(metrics)`` too).
        callback: called with no arguments after each step; its exceptions propagate.

    Returns:
        A handle with ``remove()``.
    """

    def make_step(original_class: type, hook: SchedulerStepHook) -> Callable[..., Any]:
        def step(self: Any, *args: Any, **kwargs: Any) -> Any:
            result = original_class.step(self, *args, **kwargs)
            callback()
            return result

        return step

    return _swap_step(scheduler, make_step)


def skip_next_scheduler_step(scheduler: Any) -> SchedulerStepHook:
    """Make the next ``scheduler.step(...)`` do nothing, then restore the scheduler.

    Used after a restore applied between ``optimizer.step()`` and the user's
    ``scheduler.step()``: the checkpoint already holds the scheduler as it was
    after its own step's ``scheduler.step()``. ``remove()`` disarms it early.

    Args:
        scheduler: any torch LR scheduler.

    Returns:
        A handle with ``remove()`` and ``active``.
    """

    def make_step(original_class: type, hook: SchedulerStepHook) -> Callable[..., Any]:
        def step(self: Any, *args: Any, **kwargs: Any) -> None:
            hook.remove()
            log.info("adamwatch: scheduler.step() of the iteration abandoned by the restore was skipped")

        return step

    return _swap_step(scheduler, make_step)
