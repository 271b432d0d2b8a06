"""Keep torch.compile out of adamwatch's hooks, at no cost while nothing is compiled.

The hooks run eagerly even inside a compiled ``optimizer.step()``: traced, they
would break its graph into pieces and guard on host state that changes every
step (timestamps, counters), recompiling until dynamo's limit. Kept out of the
trace, they cost one graph break each around an unchanged compiled update.

``torch.compiler.disable(fn)`` returns a wrapper that switches dynamo's frame
evaluation off around every call, compiled or not: 0.4 µs warm, but ~20 µs
right after backward, when the caches are cold, which is where the hooks run.
Three to five wrapped calls per step (``observe_loss``, the step hooks, the
clip's wrappers) cost about 60 µs of the demo model's 17 ms step
(``benchmarks/step_sections.py``).

``not_traced(fn)`` keeps what ``disable`` guarantees, paying for it only when
dynamo is active:

- dynamo's tracer sees the same marks ``disable`` puts on its wrapper: a call
  to the hook from a compiled region is a graph break, and the hook runs
  eagerly (it is never inlined into a graph);
- at run time the wrapper asks whether a frame-evaluation callback is set (one
  C call). None (the usual case: no compiled region is running) calls ``fn``
  directly. Otherwise (the hook called from a compiled region, after its graph
  break) the call goes through ``torch.compiler.disable(fn)``, so dynamo does
  not compile the hook's frames either;
- the wrapper's own frame is marked for dynamo to skip, so dynamo never tries
  to trace the callback check itself.

Where this torch lacks one of the private functions it uses, ``not_traced`` is
``torch.compiler.disable`` itself: correct, only slower.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, TypeVar

import torch

__all__ = ["not_traced"]

F = TypeVar("F", bound=Callable[..., Any])

try:
    from torch._C._dynamo.eval_frame import get_eval_frame_callback as _callback
    from torch._dynamo.eval_frame import skip_code as _skip_code
except (ImportError, AttributeError):  # an older or newer torch: disable's wrapper on every call
    _callback = None
    _skip_code = None


def not_traced(fn: F) -> F:
    """``fn``, never traced or compiled by dynamo; called directly while no compiled region runs."""
    disabled = torch.compiler.disable(fn)
    if _callback is None or _skip_code is None:
        return disabled

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        if _callback() is None:
            return fn(*args, **kwargs)
        return disabled(*args, **kwargs)

    try:
        _skip_code(call.__code__)
    except Exception:  # the skip mark's API changed: keep disable's wrapper
        return disabled
    # The marks dynamo's tracer reads on disable's own wrapper (a graph break, run eagerly).
    for name, value in vars(disabled).items():
        if name.startswith("_torchdynamo_disable"):
            setattr(call, name, value)
    return call  # type: ignore[return-value]
