"""Every rank exports the global numbers and takes the same non-finite decision, in one all-reduce per step.

A step extension (see ``adamwatch.step_extensions``), registered first, so
everything after it (the spike guard, the fused guard, the summary vector)
sees cross-rank values. One ``all_reduce(SUM)`` of one small vector per step,
on a process group of its own, launched asynchronously and waited on through
its work handle right before the values are used:

| slot | this rank puts in | after the SUM, every rank holds |
| --- | --- | --- |
| per-group ‖g‖² (sharded layouts only) | its shard's sum of squares | the global ‖g‖² per group |
| non-finite | 1 if its loss or (local) gradients are non-finite | > 0: skip on every rank, or on none |
| loss origin × world | 1 at its own index if its own loss is non-finite | which ranks' losses were |
| gradient origin × world | 1 at its own index if its own gradients were non-finite *before* the ranks' reduction | which ranks produced the bad gradient |

Under DDP the gradients are already identical after DDP's all-reduce: the
norm slots are left out (summing them would count each replica once per rank).

When other step extensions are registered after it (a spike guard), the
Monitor calls :meth:`CrossRankReduction.agree_on_skip` after them: one more
all-reduce (MAX) of the skip request, so a skip asked on one rank is every
rank's.

On CUDA with NCCL ``work.wait()`` makes the current stream wait for the
collective and returns at once: no host sync. On CPU with gloo the wait is the
reduction itself (CPU kernels are synchronous anyway); its cost per step is
measured by ``benchmarks/distributed_overhead.py``.

Every N steps the Adam-state norms (update, weight, m, v) are made global the
same way by :meth:`CrossRankReduction.reduce_deep` (their squares summed);
the quantiles of effective LR and update size and the eps-dominated share stay
computed from this rank's own shard (a sample of its coordinates), and the
README says so.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist

from adamwatch.comm_watch import LocalGradFlag
from adamwatch.shards import REPLICATED, SHARDED, is_sharded_param, local_tensor, params_are_sharded
from adamwatch.step_stats import DEEP_FIELDS_PER_GROUP
from adamwatch.wire import QUANTILES

__all__ = ["CrossRankReduction", "ORIGIN_EXTRAS"]

log = logging.getLogger(__name__)

_LAYOUTS = ("auto", SHARDED, REPLICATED)
_WIRE_DTYPE = torch.float64  # the per-step payload's dtype on every rank

#: extras each step carries (STEP frame ``extras``): this rank's own flags before the
#: reduction, and the lowest rank (-1: none) whose loss or gradients were non-finite
ORIGIN_EXTRAS = ("nonfinite_origin_loss", "nonfinite_origin_grad", "nonfinite_origin_first_rank")

# Norm fields of a deep block (update, weight, m, v): after the quantiles.
_DEEP_NORMS = slice(2 * len(QUANTILES), 2 * len(QUANTILES) + 4)


class CrossRankReduction:
    """Make the step summary global across ranks (a ``StepExtension``).

    Construct it on every rank after ``init_process_group`` (it creates a
    process group: a collective of the default group).

    Args:
        optimizer: the watched optimizer.
        process_group: the ranks that share the model (None: the default group).
        layout: "auto" (sharded when any parameter is an FSDP1 flat shard or
            an FSDP2 DTensor shard), "sharded" or "replicated".
        local_grads: from :func:`adamwatch.comm_watch.watch_local_grads`: this
            rank's gradients before the ranks' reduction. Without it only the
            loss names an origin (the gradients the optimizer sees are already
            reduced, so every rank would look like one) and the extra
            ``nonfinite_origin_grad`` is not sent.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        process_group: Any = None,
        layout: str = "auto",
        local_grads: LocalGradFlag | None = None,
    ):
        if layout not in _LAYOUTS:
            raise ValueError(f"layout: must be one of {_LAYOUTS}, got {layout!r}")
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("CrossRankReduction needs torch.distributed to be initialised")
        params = [p for g in optimizer.param_groups for p in g["params"]]
        ranks = None if process_group is None else dist.get_process_group_ranks(process_group)
        # A group of its own: the reduction never queues behind (or ahead of)
        # the model's own collectives on a shared communicator.
        self.group = dist.new_group(ranks=ranks)
        self.world = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        self.sharded = params_are_sharded(params) if layout == "auto" else layout == SHARDED
        # Parameters every rank holds whole inside a sharded layout (a partly
        # wrapped model): their squares are summed world times, so each rank
        # contributes 1/world of them.
        self._replicated = {id(p) for p in params if not is_sharded_param(p)} if self.sharded else set()
        self.local_grads = local_grads
        self.optimizer = optimizer
        self._group_kind = [
            "sharded" if not any(id(p) in self._replicated for p in g["params"])
            else "replicated" if all(id(p) in self._replicated for p in g["params"]) else "mixed"
            for g in optimizer.param_groups
        ]
        self._trainable_groups = [any(p.requires_grad for p in g["params"]) for g in optimizer.param_groups]
        self._basis: torch.Tensor | None = None
        self._index: torch.Tensor | None = None
        #: reductions launched (per-step and deep)
        self.reductions = 0
        #: steps this rank entered the collective with a "failed" payload
        self.failed_steps = 0
        self._device: torch.device | None = None  # the statistics' device, from the last payload
        log.info(
            "adamwatch: cross-rank reduction over %d ranks (%s%s)", self.world,
            SHARDED if self.sharded else REPLICATED,
            f", gradient origin from the {local_grads.kind} communication" if local_grads is not None else "",
        )

    # ------------------------------------------------------------------ per step
    def on_summary(self, ctx: Any) -> None:
        """Replace ``ctx.group_norm_sq`` and ``ctx.nonfinite`` with their cross-rank values; add origin extras.

        The all-reduce is unconditional (issue 9): when this rank fails to build
        its payload, it still enters the collective with a payload whose last
        slot says "this rank failed", so the other ranks never wait forever.
        Every rank then sees the failure (the ``cross_rank_failed_ranks`` extra),
        exports NaN for the cross-rank norms instead of a partial sum, takes no
        skip decision from the invalid numbers, and the failing rank raises
        after the collective (a counted monitor error, ``where="extension"``).
        """
        try:
            packed, finish = self._build_payload(ctx)
        except Exception as exc:
            self._enter_failed(ctx)
            raise RuntimeError(f"cross-rank payload failed on rank {self.rank}: {exc!r}") from exc
        work = dist.all_reduce(packed, group=self.group, async_op=True)
        self.reductions += 1
        # NCCL: the current stream waits, the host does not. gloo/CPU: returns when reduced.
        work.wait()
        finish(packed)

    def enter_failed(self) -> None:
        """This rank's summary failed before :meth:`on_summary`: enter the step's collectives anyway.

        Called by the Monitor (same collectives as a healthy step: the payload,
        then the skip agreement when later extensions are registered).
        """
        self._enter_failed(None)

    def _payload_size(self) -> int:
        groups = len(self.optimizer.param_groups) if self.sharded else 0
        return groups + 1 + 2 * self.world + 1

    def _payload_place(self, ctx: Any) -> tuple[torch.device, torch.dtype]:
        sq = getattr(ctx, "group_norm_sq", None) if ctx is not None else None
        if isinstance(sq, torch.Tensor):
            return sq.device, _WIRE_DTYPE
        if self._device is not None:
            return self._device, _WIRE_DTYPE
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                return local_tensor(p).device, _WIRE_DTYPE
        return torch.device("cpu"), _WIRE_DTYPE

    def _enter_failed(self, ctx: Any) -> None:
        device, dtype = self._payload_place(ctx)
        packed = torch.zeros(self._payload_size(), dtype=dtype, device=device)
        packed[-1] = 1.0  # scalar fill: no host-to-device copy
        work = dist.all_reduce(packed, group=self.group, async_op=True)
        self.reductions += 1
        work.wait()
        self.failed_steps += 1
        if ctx is not None:
            # This rank's own summary goes on (the caller counts the error): like
            # every other rank's, it must not pass its shard's sums off as the
            # global norms, and it names the failure.
            if self.sharded and isinstance(getattr(ctx, "group_norm_sq", None), torch.Tensor):
                ctx.group_norm_sq = torch.full_like(ctx.group_norm_sq, float("nan"))
                ctx.groups_reported = self._trainable_groups
            ctx.add_extra("cross_rank_failed_ranks", packed[-1].to(torch.float32))

    def _build_payload(self, ctx: Any) -> tuple[torch.Tensor, Any]:
        sq = ctx.group_norm_sq
        device, dtype = sq.device, sq.dtype
        if self._replicated:
            sq = sq - self._replicated_sq(ctx, device, dtype) * (1.0 - 1.0 / self.world)
        # Without the communication check the gradients seen here are already
        # reduced (every rank's NaN is everyone's): they name no origin.
        if self.local_grads is not None:
            before = self.local_grads.take().to(device)
        else:
            before = torch.zeros((), dtype=torch.bool, device=device)
        loss_bad = self._loss_nonfinite(ctx, device)
        nonfinite = ctx.nonfinite.to(device).reshape(()) | before
        world = self.world
        basis, index = self._constants(device, dtype)
        origins = torch.stack([loss_bad, before]).to(dtype) @ basis  # this rank's one-hot slots
        failed = torch.zeros(1, dtype=dtype, device=device)
        parts = ([sq.reshape(-1)] if self.sharded else []) + [nonfinite.to(dtype).reshape(1), origins, failed]
        # One dtype for the collective whatever the statistics' dtype, so a
        # failed rank's payload (built without them) always matches.
        packed = torch.cat(parts).to(_WIRE_DTYPE)
        self._device = device
        return packed, lambda reduced: self._apply(ctx, reduced.to(dtype), loss_bad, before)

    def _apply(self, ctx: Any, packed: torch.Tensor, loss_bad: torch.Tensor, before: torch.Tensor) -> None:
        world = self.world
        _, index = self._constants(packed.device, packed.dtype)
        failed_ranks = packed[-1]
        any_failed = failed_ranks > 0
        groups = len(self.optimizer.param_groups) if self.sharded else 0
        if self.sharded:
            # A failed rank's shard is missing from the sum: NaN, never a partial norm.
            ctx.group_norm_sq = torch.where(any_failed, torch.full_like(packed[:groups], float("nan")), packed[:groups])
            # Reported on every rank, even where this rank's shard of a group is empty.
            ctx.groups_reported = self._trainable_groups
        # No skip decided from invalid numbers: this rank's own verdict stands then.
        ctx.nonfinite = torch.where(any_failed, ctx.nonfinite.to(packed.device).reshape(()), packed[groups] > 0)
        ctx.add_extra("cross_rank_failed_ranks", failed_ranks.to(torch.float32))
        packed = packed[:-1]
        origin_any = (packed[groups + 1: groups + 1 + world] + packed[groups + 1 + world:]) > 0
        first = torch.where(origin_any, index, torch.full_like(index, world)).min()
        first = torch.where(first >= world, torch.full_like(first, -1), first)
        ctx.add_extra("nonfinite_origin_loss", loss_bad.to(torch.float32))
        if self.local_grads is not None:
            ctx.add_extra("nonfinite_origin_grad", before.to(torch.float32))
        ctx.add_extra("nonfinite_origin_first_rank", first.to(torch.float32))

    def agree_on_skip(self, ctx: Any) -> None:
        """Make the extensions' skip requests global: skipped on every rank if asked on any.

        Called by the Monitor after the later extensions, on every rank (a second
        all-reduce, only when other extensions are registered).
        """
        flag = ctx.skip.to(torch.float32).reshape(1)
        work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        self.reductions += 1
        work.wait()
        ctx.skip = flag.reshape(()) > 0

    def _constants(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Device constants, made once (scalar fills: no host-to-device copy in the step path)."""
        if self._basis is None or self._basis.device != device or self._basis.dtype != dtype:
            world, rank = self.world, self.rank
            basis = torch.zeros(2, 2 * world, dtype=dtype, device=device)
            basis[0, rank] = 1.0
            basis[1, world + rank] = 1.0
            self._basis = basis
            self._index = torch.arange(world, dtype=dtype, device=device)
        return self._basis, self._index

    def _loss_nonfinite(self, ctx: Any, device: torch.device) -> torch.Tensor:
        loss = getattr(ctx, "loss", None)
        # A step without a loss carries NaN: not a non-finite loss.
        if not isinstance(loss, torch.Tensor) or not getattr(ctx, "has_loss", True):
            return torch.zeros((), dtype=torch.bool, device=device)
        return ~torch.isfinite(loss.to(device).reshape(-1)[0])

    def _replicated_sq(self, ctx: Any, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        out = torch.zeros(len(ctx.grads_by_group), dtype=dtype, device=device)
        for index, (params, grads) in enumerate(zip(ctx.params_by_group, ctx.grads_by_group)):
            mine = [local_tensor(g) for p, g in zip(params, grads) if id(p) in self._replicated]
            if mine:
                norms = torch._foreach_norm(mine, 2, dtype=torch.float32)
                out[index] = torch.stack([n.to(device) for n in norms]).to(dtype).square().sum()
        return out

    # ------------------------------------------------------------------ deep
    def failed_deep(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, list[bool]]:
        """A deep block for a rank whose deep statistics failed: NaN everywhere, every group present.

        Passed to :meth:`reduce_deep` like a real block, so the rank still enters
        the collective the others entered, and its NaN makes every rank's
        global norms NaN for that step (a missing number, never a partial one).
        """
        groups = len(self.optimizer.param_groups)
        return torch.full((groups * DEEP_FIELDS_PER_GROUP,), float("nan"), dtype=dtype, device=device), [True] * groups

    def reduce_deep(self, deep: torch.Tensor, present: list[bool]) -> tuple[torch.Tensor, list[bool]]:
        """Make the norms of a deep block (update, weight, m, v per group) global.

        Args:
            deep: ``num_groups × DEEP_FIELDS_PER_GROUP`` values from ``StepStats.deep``.
            present: per group, whether this rank had Adam state for it.

        Returns:
            The block with global norms (quantiles and eps share unchanged:
            this rank's own sample), and per group whether it is reported:
            under sharding every group with parameters, since another rank may
            hold the state this one lacks (an empty shard: its sample, hence
            its quantiles, are NaN). Unchanged under a replicated layout.
        """
        if not self.sharded:
            return deep, present
        blocks = deep.reshape(len(present), DEEP_FIELDS_PER_GROUP)
        squares = blocks[:, _DEEP_NORMS].square()
        for index, has_state in enumerate(present):
            if not has_state:  # an empty shard here: contributes nothing, rather than NaN
                squares[index] = 0.0
            elif self._group_kind[index] == "replicated":  # every rank holds it whole: count it once
                squares[index] = squares[index] / self.world
            elif self._group_kind[index] == "mixed":
                # shards and whole tensors in one group: their deep norms are not
                # split here, and a wrong number is worse than a missing one
                squares[index] = float("nan")
        work = dist.all_reduce(squares, group=self.group, async_op=True)
        self.reductions += 1
        work.wait()
        blocks = blocks.clone()
        blocks[:, _DEEP_NORMS] = squares.sqrt()
        reported = [bool(g["params"]) for g in self.optimizer.param_groups]
        return blocks.reshape(-1), reported
