"""What a rank holds of each parameter: its own shard (FSDP1, FSDP2) or a full replica (DDP).

| layout | optimizer's params | what a rank's gradient is | global norm² |
| --- | --- | --- | --- |
| DDP (or one process) | plain tensors | the full, already averaged gradient | the rank's own |
| FSDP1 | ``FlatParameter`` shards (or views of them, ``use_orig_params``) | its shard, reduce-scattered | sum over ranks |
| FSDP2 (``fully_shard``) | ``DTensor`` with ``Shard`` placements | a ``DTensor``; ``.to_local()`` is the shard | sum over ranks |

Readers work on :func:`local_tensor` of every parameter, gradient and state
tensor: an operation on a ``DTensor`` would either fail (``.tolist()``, mixing
with plain tensors) or run a hidden, blocking collective on the step path.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

__all__ = ["local_tensor", "is_dtensor", "is_sharded_param", "params_are_sharded", "SHARDED", "REPLICATED"]

SHARDED = "sharded"
REPLICATED = "replicated"

try:  # DTensor is public from torch 2.5; older builds simply have none
    from torch.distributed.tensor import DTensor as _DTensor
except Exception:  # noqa: BLE001 - any import failure means: no DTensor here
    _DTensor = None


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a torch.distributed DTensor."""
    return _DTensor is not None and isinstance(t, _DTensor)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The plain tensor this rank holds: ``t.to_local()`` for a DTensor, else ``t``.

    ``to_local()`` is a view, with no communication and no copy.
    """
    return t.to_local() if is_dtensor(t) else t


def _dtensor_is_sharded(t: Any) -> bool:
    placements = getattr(t, "placements", ())
    return any(getattr(p, "is_shard", lambda: False)() for p in placements)


def is_sharded_param(p: torch.Tensor) -> bool:
    """Whether this rank holds only a shard of ``p`` (FSDP2 DTensor shard, FSDP1 flat shard)."""
    if is_dtensor(p):
        return _dtensor_is_sharded(p)
    # FSDP1: the FlatParameter itself, or (use_orig_params=True) the original
    # params that FSDP turned into views of it.
    if getattr(p, "_fsdp_flattened", False):
        return True
    return type(p).__name__ == "FlatParameter"


def params_are_sharded(params: Iterable[torch.Tensor]) -> bool:
    """Whether the optimizer's parameters are shards (any one of them).

    A mix of sharded and replicated parameters (a model only partly wrapped)
    counts as sharded; :class:`adamwatch.cross_rank.CrossRankReduction` then
    counts each replicated tensor once (see its ``replicated_scale``).
    """
    return any(is_sharded_param(p) for p in params)
