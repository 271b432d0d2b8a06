"""Find the torch optimizer and LR scheduler inside a framework's wrapper.

Training stacks hand users wrappers, not torch objects: Accelerate's
``AcceleratedOptimizer`` / ``AcceleratedScheduler`` (what HF ``Trainer`` holds),
Lightning's ``LightningOptimizer``. adamwatch must attach its step hooks to the
torch optimizer itself (the wrapper's ``step`` calls the inner one, whose hooks
then fire) and scale the inner scheduler's stored rates (the wrapper keeps
none, so a cut made on it would be undone by the next ``scheduler.step()``).

| wrapper | the torch object |
| --- | --- |
| ``accelerate.optimizer.AcceleratedOptimizer`` | ``.optimizer`` |
| ``accelerate.scheduler.AcceleratedScheduler`` | ``.scheduler`` |
| ``lightning.pytorch.core.optimizer.LightningOptimizer`` | ``._optimizer`` (also ``.optimizer``) |
| any other wrapper | whatever it exposes as ``.optimizer`` / ``.scheduler`` |

    from adamwatch.unwrap import unwrap_optimizer
    unwrap_optimizer(accelerated_optimizer)   # -> the torch.optim.AdamW inside
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["unwrap_optimizer", "unwrap_scheduler"]

# Where wrappers keep the object they wrap, in the order we look.
_OPTIMIZER_ATTRS = ("optimizer", "_optimizer")
_SCHEDULER_ATTRS = ("scheduler", "_scheduler", "lr_scheduler")
# A chain of wrappers deeper than this is a cycle, not a stack.
_MAX_DEPTH = 8


def _is_torch_optimizer_class(cls: type) -> bool:
    """A class defined by torch itself (Adam, AdamW, SGD, ...): never a wrapper."""
    return cls.__module__.startswith("torch.")


def _inner(obj: Any, attrs: tuple[str, ...], kind: type) -> Any:
    for attr in attrs:
        # A property or __getattr__ raising anything at all means "not here".
        try:
            inner = getattr(obj, attr, None)
        except Exception:
            continue
        if inner is not None and inner is not obj and isinstance(inner, kind):
            return inner
    return None


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer a framework wrapper holds (the argument itself when it is one).

    A wrapper that subclasses ``torch.optim.Optimizer`` without being one of
    torch's own classes (Accelerate's ``AcceleratedOptimizer``) is unwrapped too:
    torch's step hooks fire on the inner optimizer, not on the wrapper.

    Args:
        optimizer: a torch optimizer or a wrapper exposing one as ``.optimizer``
            (or ``._optimizer``), possibly nested.

    Returns:
        The innermost ``torch.optim.Optimizer``.

    Raises:
        TypeError: naming the class and the fix when no torch optimizer is found.
    """
    current = optimizer
    for _ in range(_MAX_DEPTH):
        if isinstance(current, torch.optim.Optimizer) and _is_torch_optimizer_class(type(current)):
            break  # torch's own class: the real thing, whatever attributes it carries
        inner = _inner(current, _OPTIMIZER_ATTRS, object)
        if inner is None:
            break
        current = inner
    if isinstance(current, torch.optim.Optimizer):
        return current
    raise TypeError(
        f"adamwatch.watch(optimizer): expected a torch.optim.Optimizer, got {type(optimizer).__qualname__} "
        f"(from {type(optimizer).__module__}), which exposes none as `.optimizer`; if it wraps one, pass "
        "the torch optimizer it wraps (e.g. `adamwatch.watch(wrapper.optimizer)`), or give the wrapper an "
        "`optimizer` attribute holding it"
    )


def _is_scheduler(obj: Any) -> bool:
    lr_scheduler = torch.optim.lr_scheduler
    return isinstance(obj, (lr_scheduler.LRScheduler, lr_scheduler.ReduceLROnPlateau))


def unwrap_scheduler(scheduler: Any) -> Any:
    """The torch LR scheduler a framework wrapper holds (the argument itself otherwise).

    Unlike optimizers, schedulers are duck-typed: an object that is no torch
    scheduler and wraps none is returned as it is (a custom scheduler keeping
    its own ``base_lrs`` still works with :mod:`adamwatch.lr_control`).

    Args:
        scheduler: a torch scheduler, a wrapper exposing one as ``.scheduler``
            (Accelerate's ``AcceleratedScheduler``), or None.

    Returns:
        The innermost torch scheduler, or ``scheduler`` unchanged.
    """
    current = scheduler
    for _ in range(_MAX_DEPTH):
        if current is None or _is_scheduler(current):
            return current
        current = _inner(current, _SCHEDULER_ATTRS, object)
        if current is None:
            break
    # No torch scheduler down the chain: leave a custom one as the user gave it.
    return scheduler
