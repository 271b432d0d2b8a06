"""Gradient clipping, seen by the Monitors that watch the clipped parameters.

``torch.nn.utils.clip_grad_norm_`` computes the total norm and then calls
``clip_grads_with_norm_``, which scales every gradient by
``min(1, max_norm / (total_norm + 1e-6))``. While at least one Monitor is alive
that second function is wrapped (torch's module attribute and its public alias),
so every norm clip — ``clip_grad_norm_``, Accelerate's and Lightning's clipping,
or a user's own ``get_total_norm`` + ``clip_grads_with_norm_`` — reaches the
Monitors first, with the gradients still unclipped:

- the Monitor takes the per-group sums of squares then (the pass it would make
  at the step anyway), so the step reports the pre-clip norm;
- it records the clip coefficient (a device tensor, no sync) and ``max_norm``.

``clip_grad_norm_`` itself is wrapped too, for its usual call (L2 norm, no
``error_if_nonfinite``, exactly the gradients of one watched optimizer): the
Monitor's pass gives the total norm the clip needs, so clipping and watching
share one pass over the gradients instead of making two. Any other call runs
torch's own function unchanged. The wrappers are removed when the last Monitor closes.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, Protocol

import torch
import torch.nn.utils
import torch.nn.utils.clip_grad as _clip_grad

from adamwatch.not_traced import not_traced

__all__ = ["ClipObserver", "attach", "detach", "installed"]


class ClipObserver(Protocol):
    def before_clip(self, parameters: list[torch.Tensor], max_norm: float, total_norm: torch.Tensor) -> None: ...

    def total_norm(self, parameters: list[torch.Tensor]) -> torch.Tensor | None:
        """The L2 norm of these parameters' gradients from the observer's own pass, or
        None when they are not exactly its optimizer's (then torch computes it)."""


_lock = threading.Lock()
_observers: "weakref.WeakSet[Any]" = weakref.WeakSet()
_original = _clip_grad._clip_grads_with_norm_
_original_clip_grad_norm_ = _clip_grad.clip_grad_norm_


@not_traced
def _clip_grads_with_norm_(parameters: Any, max_norm: float, total_norm: torch.Tensor, foreach: bool | None = None) -> None:
    # A generator would be consumed by the observers: make it a list once.
    parameters = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    for observer in list(_observers):
        observer.before_clip(parameters, max_norm, total_norm)  # observers never raise (they count)
    return _original(parameters, max_norm, total_norm, foreach)


_clip_grads_with_norm_.__doc__ = _original.__doc__
_clip_grads_with_norm_.__wrapped__ = _original  # type: ignore[attr-defined]


@not_traced
def clip_grad_norm_(parameters: Any, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False,
                    foreach: bool | None = None) -> torch.Tensor:
    if norm_type == 2.0 and not error_if_nonfinite and len(_observers):
        params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
        for observer in list(_observers):
            total = observer.total_norm(params)
            if total is not None:
                with torch.no_grad():
                    _clip_grads_with_norm_(params, max_norm, total, foreach)
                return total
        parameters = params
    return _original_clip_grad_norm_(parameters, max_norm, norm_type, error_if_nonfinite, foreach)


clip_grad_norm_.__doc__ = _original_clip_grad_norm_.__doc__
clip_grad_norm_.__wrapped__ = _original_clip_grad_norm_  # type: ignore[attr-defined]


def installed() -> bool:
    """Whether torch's clipping is wrapped now."""
    return _clip_grad._clip_grads_with_norm_ is _clip_grads_with_norm_


def attach(observer: ClipObserver) -> None:
    """Let ``observer`` see every norm clip from now on (installs the wrapper)."""
    with _lock:
        _observers.add(observer)
        if not installed():
            _clip_grad._clip_grads_with_norm_ = _clip_grads_with_norm_
            torch.nn.utils.clip_grads_with_norm_ = _clip_grads_with_norm_
            _clip_grad.clip_grad_norm_ = clip_grad_norm_
            torch.nn.utils.clip_grad_norm_ = clip_grad_norm_


def detach(observer: ClipObserver) -> None:
    """Stop showing clips to ``observer``; the last one out removes the wrapper."""
    with _lock:
        _observers.discard(observer)
        if not len(_observers) and installed():
            _clip_grad._clip_grads_with_norm_ = _original
            torch.nn.utils.clip_grads_with_norm_ = _original
            _clip_grad.clip_grad_norm_ = _original_clip_grad_norm_
            torch.nn.utils.clip_grad_norm_ = _original_clip_grad_norm_
