"""Where a NaN began: was this rank's own gradient non-finite before the ranks combined theirs?

After DDP's all-reduce or FSDP's reduce-scatter one rank's NaN is every
rank's NaN, so the only place to see who produced it is the gradient
communication itself. :func:`watch_local_grads` wraps it:

| wrapper | layout | what it sees |
| --- | --- | --- |
| DDP communication hook (around ``allreduce_hook`` or yours) | DDP | each bucket before its all-reduce |
| FSDP1 communication hook (around ``reduce_scatter_hook``) | FSDP1, sharded strategies | each unsharded flat gradient before its reduce-scatter |
| ``set_custom_reduce_scatter`` (around the default one) | FSDP2 | each reduce-scatter input |

Each check is one reduction on the device (``isfinite(sum)`` in float32: NaN,
+inf and -inf all make the sum non-finite) OR-ed into a flag that
:class:`adamwatch.cross_rank.CrossRankReduction` reads once per step and
clears. No host read, no extra collective.

    model = DistributedDataParallel(model)
    grads = watch_local_grads(model)            # before the first forward
    monitor = adamwatch.watch(optimizer, local_grads=grads)
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch

__all__ = ["LocalGradFlag", "watch_local_grads", "watch_ddp", "watch_fsdp1", "watch_fsdp2"]

log = logging.getLogger(__name__)


class LocalGradFlag:
    """A device flag: some gradient this rank produced since the last :meth:`take` was non-finite.

    Args:
        device: where the gradients live.
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self._flag = torch.zeros((), dtype=torch.bool, device=self.device)
        #: communications observed so far (host counter, for tests and cost accounting)
        self.observed = 0
        #: how the gradients are watched: "ddp", "fsdp1", "fsdp2"
        self.kind: str | None = None

    def observe(self, grad: torch.Tensor) -> None:
        """OR ``grad``'s non-finiteness into the flag (device ops only)."""
        self.observed += 1
        if grad.numel() == 0:
            return
        total = grad.detach().sum(dtype=torch.float32)
        if total.device != self.device:
            total = total.to(self.device, non_blocking=True)
        self._flag.logical_or_(~torch.isfinite(total))

    def take(self) -> torch.Tensor:
        """This step's flag (a 0-dim bool device tensor); the next step starts clear."""
        flag = self._flag.clone()
        self._flag.zero_()
        return flag


def watch_ddp(model: Any, flag: LocalGradFlag, *, hook: Callable | None = None, state: Any = None) -> LocalGradFlag:
    """Register a DDP communication hook that observes each bucket, then runs ``hook``.

    DDP accepts one communication hook: pass yours as ``hook``/``state``
    (default: DDP's own all-reduce, ``allreduce_hook`` on the model's group).
    """
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    inner = hook or default_hooks.allreduce_hook

    # No annotations: DDP rejects any but the exact dist.GradBucket objects, and
    # this module's annotations are strings.
    def observed_hook(hook_state, bucket):  # noqa: ANN001, ANN202
        flag.observe(bucket.buffer())
        return inner(hook_state, bucket)

    model.register_comm_hook(state, observed_hook)
    flag.kind = "ddp"
    return flag


def watch_fsdp1(model: Any, flag: LocalGradFlag) -> LocalGradFlag:
    """Register an FSDP1 communication hook (on the root) that observes each flat gradient.

    Reproduces FSDP1's default: divide, reduce-scatter (sharded strategies) or
    all-reduce (NO_SHARD), divide again.
    """
    from torch.distributed.algorithms._comm_hooks import default_hooks

    state = default_hooks.DefaultState(model.process_group)

    def observed_hook(hook_state: Any, grad: torch.Tensor, output: torch.Tensor | None = None) -> None:
        flag.observe(grad)
        if output is None:
            default_hooks.allreduce_hook(hook_state, grad)
        else:
            default_hooks.reduce_scatter_hook(hook_state, grad, output)

    model.register_comm_hook(state, observed_hook)
    flag.kind = "fsdp1"
    return flag


def watch_fsdp2(model: Any, flag: LocalGradFlag) -> LocalGradFlag:
    """Install an observing reduce-scatter on every ``fully_shard`` module of ``model``.

    A module with its own reduce-scatter already (``set_custom_reduce_scatter``,
    symmetric memory) keeps it, with a warning. Call it after such settings:
    FSDP2 refuses some of them (``set_symm_mem_for_comm``, process-group
    allocation) once a custom reduce-scatter is installed.
    """
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultReduceScatter

    class ObservedReduceScatter(DefaultReduceScatter):
        def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: Any, op: Any,
                     async_op: bool = False) -> Any:
            flag.observe(input_tensor)
            return super().__call__(output_tensor, input_tensor, group, op, async_op)

    comm = ObservedReduceScatter()
    count = 0
    kept = 0
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        count += 1
        current = [getattr(g, "_reduce_scatter_comm", None) for g in module._get_fsdp_state()._fsdp_param_groups]
        if any(type(c) is not DefaultReduceScatter for c in current):
            kept += 1  # the user's own reduce-scatter (or a symmetric-memory one) stays; not observed
            continue
        module.set_custom_reduce_scatter(comm)
    if count == 0:
        raise ValueError("watch_fsdp2: model has no fully_shard module")
    if kept:
        log.warning("adamwatch: %d of %d fully_shard modules keep their own reduce-scatter: "
                    "gradients they reduce are not checked before the reduction", kept, count)
    flag.kind = "fsdp2"
    return flag


def watch_local_grads(model: Any, *, hook: Callable | None = None, state: Any = None) -> LocalGradFlag:
    """Watch ``model``'s gradient communication for non-finite local gradients.

    Call it once, after wrapping the model (DDP, FSDP1 or ``fully_shard``) and
    before the first backward; hand the result to ``adamwatch.watch(...,
    local_grads=...)``.

    Args:
        model: a DistributedDataParallel, a FullyShardedDataParallel root, or a
            module with ``fully_shard`` applied.
        hook, state: DDP only: your own communication hook, run after the check.

    Returns:
        The flag the cross-rank reduction reads each step.

    Raises:
        TypeError: ``model`` is none of those.
    """
    first = next(iter(model.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    flag = LocalGradFlag(device)
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        return watch_ddp(model, flag, hook=hook, state=state)
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    if isinstance(model, FullyShardedDataParallel):
        return watch_fsdp1(model, flag)
    if isinstance(model, FSDPModule) or any(isinstance(m, FSDPModule) for m in model.modules()):
        return watch_fsdp2(model, flag)
    raise TypeError(
        f"watch_local_grads: expected a DistributedDataParallel, FullyShardedDataParallel or fully_shard "
        f"model, got {type(model).__name__}"
    )
