"""On-device reductions of one optimizer step into a single small tensor.

| value | when | how |
| --- | --- | --- |
| loss, non-finite loss | every step | the tensor given to ``observe_loss`` |
| global and per-group gradient L2 norm | every step | one ``torch._foreach_norm`` over every gradient (flat list built at ``watch()``), squares summed per group in float64 by one masked row sum, unscaled by GradScaler's scale; on the CPU a plain step stops after the norm pass and the reader thread sums (adamwatch.folded_vector) |
| non-finite gradients | every step | derived from the norms (a NaN/Inf anywhere makes the sum of squares non-finite): no second pass |
| skipped flag | every step | GradScaler's / adamwatch's ``found_inf`` |
| effective LR and update-size quantiles | every N steps | fixed random coordinate sample per group (bounded in total, see ``group_sample_size``), every group ordered by ONE call: ``torch.sort``, or on CPU numpy's in-place sort (same order, NaN last) |
| update L2 norm, weight norm, m and v norms | every N steps | exact: weights, m and v in one fused norm call (one pass each), the update norm in four foreach passes over chunks (bounded extra memory) |
| share of coordinates with sqrt(v_hat) <= eps | every N steps | on the sample |

The learning rate is left out of the deep block on the device and applied by
``decode_step`` (it is in the per-step part already).

Nothing here reads a tensor on the host: no ``.item()``, ``.cpu()``, ``bool()``.
The vector is decoded by ``decode_step`` in the background thread after the
asynchronous copy has landed (on the CPU: after the reader folded it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

try:  # torch does not require numpy; without it the CPU quantiles sort (same values, slower)
    import numpy as _np
except ImportError:  # pragma: no cover - numpy is everywhere torch is used in practice
    _np = None

from adamwatch.folded_vector import FoldedStepVector
from adamwatch.shards import is_dtensor, local_tensor
from adamwatch.step_extensions import MAX_EXTRAS, StepContext
from adamwatch.wire import QUANTILES

__all__ = ["GradNorms", "StepLayout", "StepStats", "decode_step", "skip_reason", "DEEP_FIELDS_PER_GROUP", "SKIP_INDEX", "TOTAL_INDEX"]

# Per-step vector: [loss, total_sq_norm, skip code, group_sq_norm × G, lr tensors...]
_FIXED = 3
TOTAL_INDEX = 1
SKIP_INDEX = 2
# Per group in the deep block: quantiles of effective lr and update size, then
# update norm, weight norm, m norm, v norm, eps-dominated share.
DEEP_FIELDS_PER_GROUP = 2 * len(QUANTILES) + 5


@dataclass
class StepLayout:
    """Host-side description of one summary vector (everything known without the device)."""

    num_groups: int
    has_loss: bool
    host_loss: float | None  # a Python float given to observe_loss
    group_has_grads: list[bool]
    host_lrs: list[float | None]  # None where the lr is a tensor carried in the vector
    tensor_lr_groups: list[int]
    deep_groups: list[bool] | None = None  # per group: had optimizer state (deep block present)
    meta: dict[str, Any] = field(default_factory=dict)
    # StepContext.add_extra: names of the values after the lr tensors; host-side values by name
    extra_names: list[str] = field(default_factory=list)
    host_extras: dict[str, float] = field(default_factory=dict)
    # StepContext.request_skip reasons: skip code 3 + i is skip_reasons[i]
    skip_reasons: list[str] = field(default_factory=list)
    # clipping (adamwatch.grad_clip): max_norm of the step's clip; the coefficient
    # travels in the vector's tail block when clip_max_norm is set
    clip_max_norm: float | None = None
    # the clip used the summary's own pre-clip norm: its coefficient is computed on
    # the host from that norm, and the vector has no clip element
    clip_from_norm: bool = False
    # the replica fingerprint is the vector's last value (after the clip element)
    fingerprint: bool = False
    # the gradient norms are sums over every rank's shard (FSDP): when a rank's
    # cross-rank payload failed (extra ``cross_rank_failed_ranks``) they are NaN
    # by construction, and the step's norms are unknown, not non-finite
    norms_from_every_rank: bool = False

    @property
    def step_length(self) -> int:
        return _FIXED + self.num_groups + len(self.tensor_lr_groups) + len(self.extra_names)

    @property
    def length(self) -> int:
        deep = self.num_groups * DEEP_FIELDS_PER_GROUP if self.deep_groups is not None else 0
        clip = 1 if self.clip_max_norm is not None and not self.clip_from_norm else 0
        return self.step_length + deep + clip + int(self.fingerprint)


def _groups_key(groups: list[dict]) -> tuple:
    """Identity of the param groups' contents, cheap enough to check every step."""
    return tuple((id(g["params"]), len(g["params"])) for g in groups)


def _one_hot(owners: list[int], num_groups: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[num_groups x len(owners)] mask (``dtype`` bool) or matrix, true / 1 where tensor j
    belongs to group i, built on the host and copied without blocking (no device value is read)."""
    matrix = torch.zeros(num_groups, len(owners), dtype=dtype)
    if owners:
        matrix[torch.tensor(owners), torch.arange(len(owners))] = 1.0
    return matrix.to(device, non_blocking=True)


class _GradLayout:
    """Which group each parameter belongs to, computed once (at ``watch()`` or
    the first step) and again only when the param groups change."""

    def __init__(self, groups: list[dict], device: torch.device, dtype: torch.dtype):
        self.key = _groups_key(groups)
        self.num_groups = len(groups)
        self.params = [p for g in groups for p in g["params"]]
        self.owner_list = [i for i, g in enumerate(groups) for _ in g["params"]]
        self.group_of = {id(p): o for p, o in zip(self.params, self.owner_list)}  # param id -> group
        self.nonempty = [len(g["params"]) > 0 for g in groups]
        self.owners = _one_hot(self.owner_list, self.num_groups, torch.bool, device)
        # FSDP2: the grads are DTensors; the sums are over this rank's shard
        # (adamwatch.cross_rank makes them global). Checked once, not per step.
        self.sharded = any(is_dtensor(p) for p in self.params)

    def matches(self, groups: list[dict]) -> bool:
        return len(groups) == self.num_groups and _groups_key(groups) == self.key


class GradNorms:
    """One fused norm pass over a step's gradients: float32 per-tensor norms and the group of each.

    Taken once per step, by the summary or just before a clip (adamwatch.grad_clip),
    and shared by both. The per-group sums of squares and the clip's total norm
    are derived from it on demand.
    """

    __slots__ = ("norms", "owner_list", "num_groups", "has_grads", "_owners", "_stats", "_stacked")

    def __init__(self, stats: "StepStats", norms: list[torch.Tensor], owner_list: list[int], num_groups: int,
                 has_grads: list[bool], owners: torch.Tensor | None):
        self._stats = stats
        self.norms = norms
        self.owner_list = owner_list
        self.num_groups = num_groups
        self.has_grads = has_grads
        self._owners = owners  # the one-hot [groups x grads] mask; built on demand when None
        self._stacked: torch.Tensor | None = None

    def stacked(self) -> torch.Tensor:
        """The norms as one float32 tensor on the statistics device (cached)."""
        if self._stacked is None:
            self._stacked = torch.stack(self._stats._on_device(self.norms))
        return self._stacked

    def total_norm(self) -> torch.Tensor:
        """The global norm exactly as ``clip_grad_norm_`` computes it from these norms (float32)."""
        return torch.linalg.vector_norm(self.stacked(), 2.0)

    def group_sq(self) -> torch.Tensor:
        """Per-group sums of squares ([num_groups], float64 on the statistics device: an
        exploding norm of 1e20 squared stays finite), by one masked row sum."""
        stats = self._stats
        if not self.norms:
            return torch.zeros(self.num_groups, dtype=stats.dtype, device=stats.device)
        squares = self.stacked().to(stats.dtype).square()
        if self.num_groups == 1:
            return squares.sum(0, keepdim=True)
        if self._owners is None:
            self._owners = stats._owner_matrix(self.owner_list, self.num_groups)
        # Each group's squares picked by a one-hot [groups x grads] mask and summed
        # per row: deterministic (bincount and index_add_ use atomics on CUDA and
        # refuse to run under torch.use_deterministic_algorithms), and a NaN
        # gradient makes its own group's norm NaN only (a matrix product with the
        # one-hot matrix would spread it to every group: 0 x NaN is NaN).
        return torch.where(self._owners, squares, 0.0).sum(1)


class _SamplePlan:
    """Fixed random coordinates of one param group, drawn once."""

    def __init__(self, params: list[torch.Tensor], sample_size: int, generator: torch.Generator, device: torch.device):
        numels = [p.numel() for p in params]
        total = sum(numels)
        self.key = tuple(id(p) for p in params)
        self.requested = sample_size
        self.indices: list[torch.Tensor] = []
        counts = []
        # Exactly sample_size coordinates, shared out in proportion to size
        # (largest remainders), so many small tensors cannot inflate the sample.
        if total > sample_size:
            shares = [sample_size * n / total for n in numels]
            quota = [int(x) for x in shares]
            by_remainder = sorted(range(len(numels)), key=lambda i: shares[i] - quota[i], reverse=True)
            for i in by_remainder[: sample_size - sum(quota)]:
                quota[i] += 1
        for i, (p, n) in enumerate(zip(params, numels)):
            if total <= sample_size:
                idx = torch.arange(n)
            else:
                idx = torch.randint(0, n, (quota[i],), generator=generator)
            self.indices.append(idx.to(p.device, non_blocking=True))
            counts.append(len(idx))
        self.size = sum(counts)
        self.count_list = counts
        # Built on the host and copied without blocking: this runs inside the
        # first deep step, which must not synchronise either.
        self.counts = torch.tensor(counts).to(device, non_blocking=True)
        # Linear-interpolation quantiles from a sorted sample, positions fixed
        # on the host so no device value decides an index (no sync).
        positions = [q * (self.size - 1) for q in QUANTILES]
        lo = [int(math.floor(p)) for p in positions]
        hi = [min(i + 1, self.size - 1) for i in lo]
        self.host_positions = (lo, hi, [p - i for p, i in zip(positions, lo)])
        self.q_lo = torch.tensor(lo).to(device, non_blocking=True)
        self.q_hi = torch.tensor(hi).to(device, non_blocking=True)
        self.q_w = torch.tensor([p - i for p, i in zip(positions, lo)], dtype=torch.float32).to(device, non_blocking=True)
        self.q_lo_mirror = torch.tensor([self.size - 1 - i for i in lo]).to(device, non_blocking=True)
        self.q_hi_mirror = torch.tensor([self.size - 1 - i for i in hi]).to(device, non_blocking=True)

    def decreasing_quantiles(self, values: torch.Tensor, transform) -> torch.Tensor:
        """Quantiles of ``transform(values)`` for a decreasing ``transform``, sorting
        ``values`` instead: the k-th smallest transformed value is the transform of
        the k-th largest value. Saves a sort when ``values`` is needed sorted anyway."""
        ordered = torch.sort(values).values
        low = transform(ordered.index_select(0, self.q_lo_mirror))
        high = transform(ordered.index_select(0, self.q_hi_mirror))
        return low + (high - low) * self.q_w

    def quantiles(self, values: torch.Tensor) -> torch.Tensor:
        ordered = torch.sort(values).values
        low = ordered.index_select(0, self.q_lo)
        high = ordered.index_select(0, self.q_hi)
        return low + (high - low) * self.q_w


class StepStats:
    """Computes the summary of a step on the device that holds the parameters.

    Args:
        optimizer: a torch Adam or AdamW.
        sample_size: coordinates sampled per param group for the quantiles.
        seed: seed of the coordinate sample (fixed so runs are comparable).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, sample_size: int = 4096, seed: int = 0,
                 fold_on_reader: bool = False):
        self.optimizer = optimizer
        self.sample_size = sample_size
        first = next((p for g in optimizer.param_groups for p in g["params"]), None)
        self.device = first.device if first is not None else torch.device("cpu")
        # float64 keeps the sum of squared norms of an exploding gradient
        # (1e20 and up) finite; MPS has no float64.
        self.dtype = torch.float32 if self.device.type == "mps" else torch.float64
        self._generator = torch.Generator().manual_seed(seed)
        self._plans: dict[int, _SamplePlan] = {}
        self._deep_plan: _DeepPlan | None = None
        self._nan = torch.full((1,), float("nan"), dtype=self.dtype, device=self.device)
        self._zero = torch.zeros(1, dtype=self.dtype, device=self.device)
        self._false = torch.zeros(1, dtype=torch.bool, device=self.device)
        # With every parameter on one device (the usual case) per-step tensors
        # need no device moves; model-parallel layouts take the general path.
        self._single_device = all(
            p.device == self.device for g in optimizer.param_groups for p in g["params"]
        )
        self._owners_key: tuple[int, ...] | None = None
        self._owners = self._zero
        # The per-parameter bookkeeping, done here at watch() time.
        self._layout: _GradLayout | None = None
        self._grad_layout()
        # On the CPU a plain step's vector is folded by the reader thread
        # (adamwatch.folded_vector): the step path runs the norm pass only.
        self.fold_on_reader = fold_on_reader and self.device.type == "cpu" and self._single_device

    def _to_dev(self, t: torch.Tensor) -> torch.Tensor:
        t = local_tensor(t)  # a DTensor's own shard: no hidden collective on the step path
        if t.device != self.device:
            t = t.to(self.device, non_blocking=True)
        return t

    def _on_device(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """The tensors on the statistics device: as they are when every param lives there."""
        return tensors if self._single_device else [self._to_dev(t) for t in tensors]

    @property
    def max_length(self) -> int:
        """Longest vector this optimizer's summaries can take (per step, extras, deep block, clip)."""
        groups = len(self.optimizer.param_groups)
        return _FIXED + 2 * groups + MAX_EXTRAS + groups * DEEP_FIELDS_PER_GROUP + 2  # + clip, fingerprint

    # ------------------------------------------------------------------ per step
    def _grad_layout(self) -> "_GradLayout":
        """The flat parameter list and group index of each parameter, rebuilt
        only when the param groups change (not per step)."""
        groups = self.optimizer.param_groups
        layout = self._layout
        if layout is None or not layout.matches(groups):
            layout = self._layout = _GradLayout(groups, self.device, self.dtype)
        return layout

    def grad_norms(self, order: tuple[list[torch.Tensor], list[int]] | None = None) -> GradNorms:
        """This step's gradients, reduced by one fused norm kernel over every
        gradient of every group (the flat list was built at ``watch()``).

        Args:
            order: (this optimizer's parameters in another order, the group of
                each): the norms come in that order. A clip takes its total norm
                from them, and torch sums its norms in its own parameter order:
                the same order gives the same float32 sum, bit for bit.
        """
        layout = self._grad_layout()
        params, all_owners = (layout.params, layout.owner_list) if order is None else order
        grads = [p.grad for p in params]
        if layout.sharded:
            grads = [None if g is None else local_tensor(g) for g in grads]
        present = [g for g in grads if g is not None]
        if len(present) == len(grads):
            owner_list, has_grads = all_owners, layout.nonempty
            owners = layout.owners if order is None else None
        else:
            # Some params have no grad this step (frozen, unused): the general path.
            owner_list = [o for o, g in zip(all_owners, grads) if g is not None]
            has_grads = [False] * layout.num_groups
            for o in owner_list:
                has_grads[o] = True
            owners = None
        norms = list(torch._foreach_norm(present, 2, dtype=torch.float32)) if present else []
        return GradNorms(self, norms, owner_list, layout.num_groups, has_grads, owners)

    def owns(self, param: torch.Tensor) -> bool:
        """Whether ``param`` is one of this optimizer's parameters (as its groups are now)."""
        return id(param) in self._grad_layout().group_of

    def owners_of(self, params: list[torch.Tensor]) -> list[int] | None:
        """The param group of each of ``params``, or None when they are not exactly this optimizer's."""
        layout = self._grad_layout()
        if len(params) != len(layout.params):
            return None
        owners = [layout.group_of.get(id(p), -1) for p in params]
        if -1 in owners or len(set(map(id, params))) != len(params):
            return None
        return owners

    def per_step(
        self,
        loss: torch.Tensor | float | None,
        *,
        grad_scale: torch.Tensor | None = None,
        found_inf: torch.Tensor | None = None,
        guard: bool = False,
        need_flag: bool = False,
        norms: GradNorms | None = None,
        on_context: Callable[[StepContext], None] | None = None,
        step: int = 0,
    ) -> tuple[torch.Tensor | FoldedStepVector, torch.Tensor | None, StepLayout]:
        """Reduce the gradients (pre-step: they are about to be applied).

        Args:
            loss: the step's loss (tensor or float: the micro-batch mean), or None.
            grad_scale: GradScaler's scale when the grads are still scaled (fused path).
            found_inf: GradScaler's overflow flag, if any.
            guard: the non-finite flag (or an extension's skip request) marks the
                step as skipped (fused guard).
            need_flag: return the skip flag as a device tensor (implied by guard).
            norms: the norm pass taken earlier (before clipping,
                adamwatch.grad_clip), used instead of a second pass over the grads.
            on_context: called with the step's StepContext after the local norms
                (the step extensions); may replace the norms and the flags.
            step: the index of the step being summarised (for the context).

        Returns:
            (vector, skip flag as a 1-element bool tensor or None, layout). The
            flag is the non-finite flag OR'ed with the extensions' skip requests.
            The vector is a tensor, or with ``fold_on_reader`` for a plain step
            (nothing to decide on the device) a FoldedStepVector.
        """
        need_flag = need_flag or guard
        groups = self.optimizer.param_groups
        # Few, small ops: after backward every dispatch costs ~10 µs of cold
        # caches, and this runs on every step. The per-parameter Python work
        # (which param belongs to which group) was done once, in _GradLayout.
        if norms is None:
            norms = self.grad_norms()
        has_grads = norms.has_grads
        if (self.fold_on_reader and grad_scale is None and found_inf is None and not need_flag
                and on_context is None):
            folded = self._folded(loss, norms, groups)
            if folded is not None:
                return folded[0], None, folded[1]
        sq = norms.group_sq()
        if grad_scale is not None:
            scale = self._to_dev(grad_scale).to(self.dtype)
            sq = sq / (scale * scale)
        total = sq.sum(0, keepdim=True)

        host_loss = None
        if isinstance(loss, torch.Tensor):
            loss_t = self._to_dev(loss.detach())
            # (torch.cat below promotes it to the vector's float64)
            loss_t = loss_t.reshape(1) if loss_t.numel() == 1 else loss_t.reshape(-1)[:1]
        else:
            loss_t = self._nan
            if loss is not None:
                host_loss = float(loss)

        ctx = None
        if on_context is not None:
            ctx = self._context(step, groups, sq, loss_t, loss, host_loss, grad_scale)
            on_context(ctx)
            # A cross-rank reduction may report groups this rank holds no gradient
            # of (an empty FSDP shard): the reduced norm is the other ranks'.
            reported = getattr(ctx, "groups_reported", None)
            if reported is not None:
                has_grads = [bool(r) for r in reported]
            if ctx.group_norm_sq is not sq:
                if tuple(ctx.group_norm_sq.shape) != (len(groups),):
                    raise ValueError(f"StepContext.group_norm_sq must keep shape [{len(groups)}], "
                                     f"got {tuple(ctx.group_norm_sq.shape)}")
                sq = self._to_dev(ctx.group_norm_sq).to(self.dtype)
                total = sq.sum(0, keepdim=True)

        # The non-finite flag on the device is only needed to skip the step
        # (the fused guard); otherwise the host derives it from the values.
        # It comes from the norms: a NaN or Inf in any gradient makes the sum
        # of squares non-finite, so no second pass over the gradients.
        bad = None
        if need_flag:
            if ctx is not None and ctx.nonfinite_read:
                bad = ctx.nonfinite.reshape(1)
            else:
                bad = ~torch.isfinite(total) if norms.norms else self._false
                if isinstance(loss, torch.Tensor):
                    bad = bad | ~torch.isfinite(loss_t)

        # Skip code: 0 applied, 1 skipped by the adamwatch guard, 2 skipped by
        # GradScaler, 3 + i skipped at an extension's request (layout.skip_reasons[i]).
        skipped = bad.to(self.dtype) if guard else self._zero
        skip_reasons: list[str] = []
        sync_code = None
        if ctx is not None and ctx.skip_requested and need_flag:
            code = bad.to(self.dtype).reshape(())  # 1 where non-finite
            for flag, reason in ctx.skip_requests:
                if reason not in skip_reasons:
                    skip_reasons.append(reason)
                code = torch.where(flag & (code == 0), float(3 + skip_reasons.index(reason)), code)
            # What is left was OR'ed into ctx.skip without a reason.
            skip_reasons.append("extension")
            code = torch.where(ctx.skip.reshape(()) & (code == 0), float(2 + len(skip_reasons)), code)
            bad = bad | ctx.skip.reshape(1)
            if guard:
                skipped = code.to(self.dtype)
            else:
                sync_code = code  # guard="sync": read on the host only when the step is skipped
        if found_inf is not None:
            skipped = torch.where(self._to_dev(found_inf) > 0, 2.0, skipped).to(self.dtype)

        lrs = [group["lr"] for group in groups]
        parts = [loss_t, total, skipped.reshape(1), sq]
        tensor_lr_groups: list[int] = []
        if any(isinstance(lr, torch.Tensor) for lr in lrs):
            host_lrs: list[float | None] = []
            for index, lr in enumerate(lrs):
                if isinstance(lr, torch.Tensor):
                    host_lrs.append(None)
                    tensor_lr_groups.append(index)
                    parts.append(self._to_dev(lr.detach()).reshape(1).to(self.dtype))
                else:
                    host_lrs.append(float(lr))
        else:
            host_lrs = [float(lr) for lr in lrs]
        extra_names: list[str] = []
        host_extras: dict[str, float] = {}
        if ctx is not None:
            for name, value in ctx.extras:
                if isinstance(value, torch.Tensor):
                    extra_names.append(name)
                    parts.append(self._to_dev(value).reshape(1).to(self.dtype))
                else:
                    host_extras[name] = float(value)
        vector = torch.cat(parts)
        layout = StepLayout(
            num_groups=len(groups),
            has_loss=loss is not None,
            host_loss=host_loss,
            group_has_grads=has_grads,
            host_lrs=host_lrs,
            tensor_lr_groups=tensor_lr_groups,
            extra_names=extra_names,
            host_extras=host_extras,
            skip_reasons=skip_reasons,
        )
        if sync_code is not None:
            layout.meta["skip_code"] = sync_code
        return vector, bad, layout

    def _folded(self, loss: torch.Tensor | float | None, norms: GradNorms,
                groups: list[dict]) -> tuple[FoldedStepVector, StepLayout] | None:
        """A plain CPU step: the norms and the loss go to the reader thread as
        they are (adamwatch.folded_vector). None when the step needs the tensor
        path (a tensor learning rate, a loss that is not a plain CPU tensor)."""
        host_loss = None
        loss_t = None
        if isinstance(loss, torch.Tensor):
            if type(loss) is not torch.Tensor or not loss.is_cpu or loss.numel() != 1:
                return None
            loss_t = loss.detach() if loss.requires_grad else loss  # LossWindow's is detached
            if loss_t.dim() != 0:
                loss_t = loss_t.reshape(())
        elif loss is not None:
            host_loss = float(loss)
        host_lrs: list[float | None] = []
        for group in groups:
            lr = group["lr"]
            if isinstance(lr, torch.Tensor):
                return None
            host_lrs.append(float(lr))
        stacked = norms.stacked() if norms.norms else None  # (a clip before the step stacked them already)
        vector = FoldedStepVector(loss_t, stacked, norms.owner_list, norms.num_groups)
        layout = StepLayout(
            num_groups=len(groups),
            has_loss=loss is not None,
            host_loss=host_loss,
            group_has_grads=norms.has_grads,
            host_lrs=host_lrs,
            tensor_lr_groups=[],
        )
        return vector, layout

    def _context(self, step: int, groups: list[dict], sq: torch.Tensor, loss_t: torch.Tensor,
                 loss: Any, host_loss: float | None, grad_scale: torch.Tensor | None) -> StepContext:
        params_by_group = [[p for p in g["params"] if p.grad is not None] for g in groups]
        # FSDP2: this rank's shard (a view: scaling it in place scales the DTensor)
        grads_by_group = [[local_tensor(p.grad) for p in ps] for ps in params_by_group]
        if host_loss is not None:
            loss_0d = torch.full((), host_loss, dtype=torch.float32, device=self.device)
        else:
            loss_0d = loss_t.reshape(()).to(torch.float32)
        return StepContext(self.optimizer, step, params_by_group, grads_by_group, sq, loss_0d,
                           has_loss=loss is not None, grad_scale=grad_scale)

    def _owner_matrix(self, owners: list[int], num_groups: int) -> torch.Tensor:
        """One-hot group matrix of a subset of the params, cached: the set of
        params with a grad rarely changes between steps."""
        key = (num_groups, *owners)
        if key != self._owners_key:
            self._owners_key = key
            self._owners = _one_hot(owners, num_groups, torch.bool, self.device)
        return self._owners

    # ------------------------------------------------------------------ deep
    def group_sample_size(self, num_groups: int) -> int:
        """Coordinates sampled per group: ``sample_size`` for up to
        ``_SAMPLE_GROUPS`` groups, beyond that an equal share of
        ``_SAMPLE_GROUPS × sample_size``, so the sample (and its one sort) does
        not grow with the number of groups."""
        return max(1, min(self.sample_size, (_SAMPLE_GROUPS * self.sample_size) // max(1, num_groups)))

    def _plan(self, index: int, params: list[torch.Tensor], size: int | None = None) -> _SamplePlan:
        plan = self._plans.get(index)
        key = tuple(id(p) for p in params)
        size = self.sample_size if size is None else size
        if plan is None or plan.key != key or plan.requested != size:
            # Sharded params: a sample of this rank's own shard (to_local() is
            # a fresh view each call, so the key is the params' identity).
            plan = _SamplePlan([local_tensor(p) for p in params], size, self._generator, self.device)
            plan.key = key
            self._plans[index] = plan
        return plan

    def deep(self) -> tuple[torch.Tensor, list[bool]]:
        """Adam's own state after the update (post-step).

        The learning rate is left out of the block (lr = 1): the reader
        multiplies each group's effective LR, update sizes and update norm by
        the group's LR, which the per-step part of the vector already carries.

        Returns:
            (vector of num_groups × DEEP_FIELDS_PER_GROUP, per group: had state).
        """
        return self.prepare_deep()()

    def prepare_deep(self) -> Callable[[], tuple[torch.Tensor, list[bool]]]:
        """``deep()`` in two parts: the host bookkeeping now, the tensor work when called.

        The returned function may run on another thread (adamwatch.background:
        on the CPU the block overlaps the next forward and backward), as long
        as it finishes before the next optimizer step updates the state. What
        a scheduler may change in between (betas under OneCycleLR, eps) is
        read here, at the step the block describes.
        """
        opt = self.optimizer
        groups = opt.param_groups
        params_by_group = [_adam_params(group, opt.state) for group in groups]
        present = [bool(ps) for ps in params_by_group]
        if any(present) and self._single_device and all(
            not isinstance(b, torch.Tensor) for g, ps in zip(groups, params_by_group) if ps for b in g["betas"]
        ):
            key = _DeepPlan.key_of(groups, params_by_group)
            plan = self._deep_plan
            if plan is None or plan.key != key:
                plan = self._deep_plan = _DeepPlan(
                    groups, params_by_group, self, self.group_sample_size(sum(present))
                )
            state, dtype = opt.state, self.dtype
            return lambda: (plan.compute(state, dtype), present)
        # General path (tensor betas, parameters on several devices): group by group,
        # from the hyperparameters as they are now.
        frozen = [dict(group) for group in groups]
        size = self.group_sample_size(sum(present))

        def general() -> tuple[torch.Tensor, list[bool]]:
            blocks: list[torch.Tensor] = []
            empty = torch.full((DEEP_FIELDS_PER_GROUP,), float("nan"), dtype=self.dtype, device=self.device)
            for index, (group, params) in enumerate(zip(frozen, params_by_group)):
                blocks.append(self._deep_group(index, group, params, size) if params else empty)
            return torch.cat(blocks), present

        return general

    def _deep_group(self, index: int, group: dict, params: list[torch.Tensor], size: int) -> torch.Tensor:
        state = self.optimizer.state
        beta1, beta2 = group["betas"]
        eps = group["eps"]
        lr = 1.0  # applied by the reader (see deep())
        second = "max_exp_avg_sq" if group.get("amsgrad") else "exp_avg_sq"
        plan = self._plan(index, params, size)

        step_tensors = [local_tensor(state[p]["step"]).detach().reshape(()) for p in params]
        if self._single_device or all(t.device == step_tensors[0].device for t in step_tensors):
            steps = torch.stack(step_tensors).to(self.device, torch.float32, non_blocking=True)
        else:
            steps = torch.stack([self._to_dev(t).to(torch.float32) for t in step_tensors])
        # Tensor betas (capturable) become device scalars; floats stay floats.
        b1 = self._to_dev(beta1).to(torch.float32) if isinstance(beta1, torch.Tensor) else beta1
        b2 = self._to_dev(beta2).to(torch.float32) if isinstance(beta2, torch.Tensor) else beta2
        bc1 = 1 - torch.pow(b1, steps)
        bc2 = 1 - torch.pow(b2, steps)

        m_sample = _as_float32(torch.cat(self._on_device(
            [local_tensor(state[p]["exp_avg"]).reshape(-1).index_select(0, idx) for p, idx in zip(params, plan.indices)]
        )))
        v_sample = _as_float32(torch.cat(self._on_device(
            [local_tensor(state[p][second]).reshape(-1).index_select(0, idx) for p, idx in zip(params, plan.indices)]
        )))
        bc1_c = torch.repeat_interleave(bc1, plan.counts, output_size=plan.size)
        bc2_c = torch.repeat_interleave(bc2, plan.counts, output_size=plan.size)
        sqrt_v_hat = (v_sample / bc2_c).sqrt()
        effective_lr = lr / (sqrt_v_hat + eps)
        update_size = (m_sample.abs() / bc1_c) * effective_lr
        eps_dominated = (sqrt_v_hat <= eps).to(torch.float32).mean()

        # Exact update norms with foreach kernels over chunks of parameters:
        # few kernel launches, and extra memory bounded by the chunk size
        # (or the largest tensor), not the model.
        update_sq = []
        bc1_each, bc2_each = bc1.unbind(), bc2.unbind()
        for chunk in _chunks(params, _DEEP_CHUNK_ELEMENTS):
            ms = [_as_float32(local_tensor(state[p]["exp_avg"])) for _, p in chunk]
            vs = [_as_float32(local_tensor(state[p][second])) for _, p in chunk]
            if self._single_device:
                b2s, b1s = [bc2_each[i] for i, _ in chunk], [bc1_each[i] for i, _ in chunk]
            else:
                b2s = [bc2_each[i].to(v.device) for (i, _), v in zip(chunk, vs)]
                b1s = [bc1_each[i].to(m.device) for (i, _), m in zip(chunk, ms)]
            denom = torch._foreach_div(vs, b2s)
            torch._foreach_sqrt_(denom)
            torch._foreach_add_(denom, eps)
            upd = torch._foreach_div(ms, b1s)
            torch._foreach_div_(upd, denom)
            update_sq.append(torch.stack(self._on_device(torch._foreach_norm(upd))))
            del ms, vs, denom, upd
        update_norm = torch.cat(update_sq).to(self.dtype).square().sum().sqrt() * lr
        weight_norm = self._group_norm([local_tensor(p).detach() for p in params])
        m_norm = self._group_norm([local_tensor(state[p]["exp_avg"]) for p in params])
        v_norm = self._group_norm([local_tensor(state[p]["exp_avg_sq"]) for p in params])

        return torch.cat(
            [
                # lr/(sqrt(v_hat)+eps) decreases with sqrt(v_hat): no second sort.
                plan.decreasing_quantiles(sqrt_v_hat, lambda x: lr / (x + eps)).to(self.dtype),
                plan.quantiles(update_size).to(self.dtype),
                torch.stack([
                    update_norm.reshape(()).to(self.dtype),
                    weight_norm,
                    m_norm,
                    v_norm,
                    eps_dominated.to(self.dtype),
                ]),
            ]
        )

    def _group_norm(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        norms = torch._foreach_norm(tensors, 2, dtype=torch.float32)
        return torch.stack(self._on_device(norms)).to(self.dtype).square().sum().sqrt()


# Groups that each get the full ``sample_size``; more share that many samples' worth.
_SAMPLE_GROUPS = 4


class _DeepPlan:
    """The deep statistics of every group at once, with the per-parameter and
    per-group bookkeeping done once (again only when groups, state or
    hyperparameters other than the LR change).

    Cost per deep step, whatever the number of groups: one gather per
    parameter for the sample, ONE sort call (every group's sqrt(v_hat) and
    update sizes as the rows of one matrix; on CPU numpy's sort), one fused norm over weights, m
    and v, and four foreach passes for the exact update norm.
    """

    def __init__(self, groups: list[dict], params_by_group: list[list[torch.Tensor]], stats: "StepStats",
                 group_size: int):
        device, dtype = stats.device, stats.dtype
        self.key = self.key_of(groups, params_by_group)
        self.num_groups = len(groups)
        self.present = [i for i, ps in enumerate(params_by_group) if ps]
        self.params = [p for i in self.present for p in params_by_group[i]]
        self.second = [("max_exp_avg_sq" if groups[i].get("amsgrad") else "exp_avg_sq")
                       for i in self.present for _ in params_by_group[i]]
        owner = [k for k, i in enumerate(self.present) for _ in params_by_group[i]]
        g = len(self.present)
        # [g x params]: which group each parameter is in. Masked sums, not a product
        # with a one-hot matrix: 0 x NaN is NaN, which would spread one group's NaN to all.
        self.owned = _one_hot(owner, g, torch.bool, device)
        f32 = dict(dtype=torch.float32)
        self.beta1 = torch.tensor([groups[self.present[k]]["betas"][0] for k in owner], **f32).to(device, non_blocking=True)
        self.beta2 = torch.tensor([groups[self.present[k]]["betas"][1] for k in owner], **f32).to(device, non_blocking=True)
        self.eps_param = torch.tensor([groups[self.present[k]]["eps"] for k in owner], **f32).to(device, non_blocking=True)
        # One coordinate sample per group (the same draw as group-by-group), laid end to end.
        self.indices: list[torch.Tensor] = []
        counts: list[int] = []
        sizes: list[int] = []
        lo_rel, hi_rel, weights = [], [], []
        for i in self.present:
            plan = stats._plan(i, params_by_group[i], group_size)
            self.indices.extend(plan.indices)
            counts.extend(plan.count_list)
            sizes.append(plan.size)
            lo, hi, w = plan.host_positions
            lo_rel.append(lo)
            hi_rel.append(hi)
            weights.append(w)
        # The parameter each sampled coordinate comes from (a gather spreads the
        # per-parameter bias corrections over the sample: repeat_interleave
        # would rebuild this index on every call).
        self.sample_param = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts)).to(
            device, non_blocking=True)
        group_eps = [float(groups[i]["eps"]) for i in self.present]
        self.eps_sample = torch.repeat_interleave(
            torch.tensor(group_eps, **f32), torch.tensor(sizes)).to(device, non_blocking=True)
        # One sort for every group and both distributions: rows 0..g-1 of a
        # [2g x longest] matrix hold each group's sqrt(v_hat), rows g..2g-1 its
        # update sizes, padded with NaN (sorted last, as a NaN in the data is).
        width = max(sizes)
        rows = torch.repeat_interleave(torch.arange(g), torch.tensor(sizes))
        cols = torch.cat([torch.arange(n) for n in sizes])
        self.padded_shape = (2 * g, width)
        self.scatter = torch.cat([rows * width + cols, (rows + g) * width + cols]).to(device, non_blocking=True)
        # Positions in the sorted matrix. The effective LR decreases with
        # sqrt(v_hat): its k-th smallest value comes from the (n-1-k)-th
        # sqrt(v_hat) of the group (mirrored), so one sort serves both.
        mirrored = lambda rel: [k * width + sizes[k] - 1 - j for k, row in enumerate(rel) for j in row]  # noqa: E731
        direct = lambda rel: [(g + k) * width + j for k, row in enumerate(rel) for j in row]  # noqa: E731
        gather = mirrored(lo_rel) + mirrored(hi_rel) + direct(lo_rel) + direct(hi_rel)
        self.gather = torch.tensor(gather).to(device, non_blocking=True)
        # On CPU numpy sorts the rows in place (vectorised sorting networks where
        # the CPU has them): the demo model's 4 x 4096 in 0.04 ms, against 0.75 ms
        # for torch.sort and 0.33 ms for a numpy.partition on just the ranks read.
        # Same order as torch.sort: NaN (data or padding) last.
        self.numpy_sort = _np is not None and torch.device(device).type == "cpu"
        self.w = torch.tensor(weights, **f32).to(device, non_blocking=True)  # [g x Q]
        self.eps_q = torch.tensor([[e] * len(QUANTILES) for e in group_eps], **f32).to(device, non_blocking=True)
        self.sizes = torch.tensor(sizes, dtype=dtype).to(device, non_blocking=True)
        self.place = None
        if g != self.num_groups:
            self.place = torch.tensor(self.present).to(device, non_blocking=True)
        self.chunks = _chunks(self.params, _DEEP_CHUNK_ELEMENTS)
        self.device, self.dtype = device, dtype
        self.sharded = any(is_dtensor(p) for p in self.params)

    @staticmethod
    def key_of(groups: list[dict], params_by_group: list[list[torch.Tensor]]) -> tuple:
        return tuple(
            (tuple(map(id, ps)), tuple(g.get("betas", ())), g.get("eps"), bool(g.get("amsgrad")))
            for g, ps in zip(groups, params_by_group)
        )

    def compute(self, state: dict, dtype: torch.dtype) -> torch.Tensor:
        params = self.params
        states = [state[p] for p in params]  # one look-up each: a tensor's hash is Python code
        # FSDP2: each rank's own shard of the state (local_tensor; cross_rank sums the norms)
        own = local_tensor if self.sharded else _itself
        steps = torch.stack([own(s["step"]) for s in states]).reshape(-1).to(
            self.device, torch.float32, non_blocking=True)
        bc1 = 1 - torch.pow(self.beta1, steps)
        bc2 = 1 - torch.pow(self.beta2, steps)
        ms = [own(s["exp_avg"]) for s in states]
        vs = [own(s[second]) for s, second in zip(states, self.second)]

        m_sample = _as_float32(torch.cat([m.reshape(-1).index_select(0, idx) for m, idx in zip(ms, self.indices)]))
        v_sample = _as_float32(torch.cat([v.reshape(-1).index_select(0, idx) for v, idx in zip(vs, self.indices)]))
        effective_lr, update_q, eps_share = self._quantiles(m_sample, v_sample, bc1, bc2, dtype)

        # Exact norms: weights, m and v in one fused pass, summed per group.
        norms = torch._foreach_norm([own(p).detach() for p in params] + ms + [own(s["exp_avg_sq"]) for s in states],
                                    2, dtype=torch.float32)
        squares = torch.stack(norms).to(dtype).square().view(3, 1, -1)
        wmv = torch.where(self.owned, squares, 0.0).sum(2).sqrt()  # [3 x g]
        # Exact update norm: m / (sqrt(v) + eps*sqrt(bc2)) = update * bc1 / sqrt(bc2),
        # four foreach passes over chunks of parameters (bounded extra memory).
        root_bc2 = bc2.sqrt()
        eps_scaled = (self.eps_param * root_bc2).unbind()
        update_norms = []
        for chunk in self.chunks:
            denom = torch._foreach_sqrt([_as_float32(vs[i]) for i, _ in chunk])
            torch._foreach_add_(denom, [eps_scaled[i] for i, _ in chunk])
            upd = torch._foreach_div([_as_float32(ms[i]) for i, _ in chunk], denom)
            update_norms.append(torch.stack(torch._foreach_norm(upd)))
            del denom, upd
        per_param = torch.cat(update_norms) * (root_bc2 / bc1)
        update_norm = torch.where(self.owned, per_param.to(dtype).square(), 0.0).sum(1).sqrt()
        block = torch.cat([
            effective_lr.to(dtype), update_q.to(dtype),
            torch.stack([update_norm, wmv[0], wmv[1], wmv[2], eps_share.to(dtype)], dim=1),
        ], dim=1)  # [g x DEEP_FIELDS_PER_GROUP]
        if self.place is not None:
            full = torch.full((self.num_groups, DEEP_FIELDS_PER_GROUP), float("nan"), dtype=dtype, device=self.device)
            block = full.index_copy_(0, self.place, block)
        return block.reshape(-1)

    def _quantiles(self, m_sample: torch.Tensor, v_sample: torch.Tensor, bc1: torch.Tensor, bc2: torch.Tensor,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Effective-LR and update-size quantiles and the eps-dominated share, per group, from the sample."""
        g = len(self.present)
        bc1_c, bc2_c = torch.stack([bc1, bc2]).index_select(1, self.sample_param)
        sqrt_v_hat = (v_sample / bc2_c).sqrt()
        update_size = (m_sample.abs() / bc1_c) / (sqrt_v_hat + self.eps_sample)  # lr = 1

        # One sort for every group and both distributions (see __init__).
        padded = torch.full((self.padded_shape[0] * self.padded_shape[1],), float("nan"), device=self.device)
        padded.index_copy_(0, self.scatter, torch.cat([sqrt_v_hat, update_size]))
        if self.numpy_sort and padded.dtype in (torch.float32, torch.float64):
            ordered = padded.view(self.padded_shape)
            ordered.numpy().sort(axis=1)  # in place, in the tensor's own memory
        else:
            ordered = torch.sort(padded.view(self.padded_shape), dim=1).values
        picked = ordered.view(-1).index_select(0, self.gather).view(4, g, -1)
        # Share of sqrt(v_hat) <= eps per group (NaN, data or padding, compares false).
        below = (ordered[:g] <= self.eps_q[:, :1]).sum(1)
        eps_share = below.to(dtype) / self.sizes
        eff_low = 1 / (picked[0] + self.eps_q)
        eff_high = 1 / (picked[1] + self.eps_q)
        effective_lr = eff_low + (eff_high - eff_low) * self.w
        update_q = picked[2] + (picked[3] - picked[2]) * self.w
        return effective_lr, update_q, eps_share


def _adam_params(group: dict, state: dict) -> list[torch.Tensor]:
    """The group's params whose state holds Adam's moments (Adam, AdamW, NAdam,
    RAdam); other optimizers (SGD, Adagrad, Adamax...) have no deep block."""
    if "betas" not in group or "eps" not in group:
        return []
    second = "max_exp_avg_sq" if group.get("amsgrad") else "exp_avg_sq"
    return [p for p in group["params"] if "exp_avg" in (st := state.get(p, {})) and second in st]


def _itself(t: torch.Tensor) -> torch.Tensor:
    return t


def _as_float32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float32 else t.to(torch.float32)


# Elements per foreach chunk of the deep update-norm pass (temporaries ~ 3x this in fp32).
_DEEP_CHUNK_ELEMENTS = 1 << 24


def _chunks(params: list[torch.Tensor], max_elements: int) -> list[list[tuple[int, torch.Tensor]]]:
    """Consecutive (index, param) runs of at most ``max_elements`` (a bigger tensor stands alone)."""
    chunks: list[list[tuple[int, torch.Tensor]]] = [[]]
    size = 0
    for i, p in enumerate(params):
        if chunks[-1] and size + p.numel() > max_elements:
            chunks.append([])
            size = 0
        chunks[-1].append((i, p))
        size += p.numel()
    return chunks


def decode_step(values: list[float], layout: StepLayout) -> dict[str, Any]:
    """Turn a summary vector (read on the host, off the step path) into a STEP payload.

    Args:
        values: the vector as floats, ``layout.length`` long.
        layout: the layout recorded when the vector was built.

    Returns:
        The STEP payload fields computed from the device (the caller adds step,
        time, duration and throughput).
    """
    g = layout.num_groups
    loss_value = values[0] if layout.host_loss is None else layout.host_loss
    total_sq = values[TOTAL_INDEX]
    grad_norm, group_norms, grad_nonfinite = _norms(values, layout)
    lrs = list(layout.host_lrs)
    for slot, group_index in enumerate(layout.tensor_lr_groups):
        lrs[group_index] = values[_FIXED + g + slot]
    payload: dict[str, Any] = {
        "grad_norm": grad_norm,
        "group_grad_norms": group_norms,
        "grad_nonfinite": grad_nonfinite,
        "lr": [float(x) for x in lrs],
        "skipped": bool(values[SKIP_INDEX] > 0),
    }
    if layout.has_loss:
        payload["loss"] = float(loss_value)
        payload["loss_nonfinite"] = not math.isfinite(loss_value)
    if layout.extra_names or layout.host_extras:
        extras = dict(layout.host_extras)
        base = _FIXED + g + len(layout.tensor_lr_groups)
        for i, name in enumerate(layout.extra_names):
            extras[name] = values[base + i]
        payload["extras"] = extras
        if layout.norms_from_every_rank and extras.get("cross_rank_failed_ranks", 0.0) > 0:
            # A shard is missing from the sums: no norm rather than a NaN that
            # the sidecar would count, page on and repair as a non-finite
            # gradient. The failure itself is in the extras and in the failing
            # rank's monitor errors.
            payload["grad_norm"] = None
            payload["group_grad_norms"] = [None] * g
            payload["grad_nonfinite"] = False
    if layout.clip_max_norm is not None:
        payload["clip_max_norm"] = layout.clip_max_norm
        if layout.clip_from_norm:
            # torch's own formula, on the norm the clip was given
            # (a NaN norm stays NaN: min() would turn it into 1)
            payload["clip_coefficient"] = (min(1.0, layout.clip_max_norm / (math.sqrt(total_sq) + 1e-6))
                                           if total_sq >= 0 else math.nan)
        else:
            payload["clip_coefficient"] = values[layout.length - 1 - int(layout.fingerprint)]
    if layout.deep_groups is not None:
        deep = []
        nq = len(QUANTILES)
        base = layout.step_length
        for i in range(g):
            if not layout.deep_groups[i]:
                deep.append({})
                continue
            block = values[base + i * DEEP_FIELDS_PER_GROUP : base + (i + 1) * DEEP_FIELDS_PER_GROUP]
            # The device left the LR out (lr = 1): scale by this step's LR here.
            lr = float(lrs[i])
            update_norm, weight_norm, m_norm, v_norm, eps_share = block[2 * nq :]
            update_norm = update_norm * lr
            deep.append(
                {
                    "effective_lr": [x * lr for x in block[:nq]],
                    "update_size": [x * lr for x in block[nq : 2 * nq]],
                    "update_norm": update_norm,
                    "weight_norm": weight_norm,
                    "update_to_weight": (update_norm / weight_norm) if weight_norm > 0 else None,
                    "exp_avg_norm": m_norm,
                    "exp_avg_sq_norm": v_norm,
                    "eps_dominated_ratio": eps_share,
                }
            )
        payload["deep"] = deep
    if layout.fingerprint:
        # Sent as its own FINGERPRINT message (see Monitor): an integer below 2^52.
        payload["fingerprint"] = int(values[layout.length - 1])
    return payload


def _norms(values: list[float], layout: StepLayout) -> tuple[float | None, list[float | None], bool]:
    """(grad_norm, group_grad_norms, grad_nonfinite) of a STEP payload, from the squared norms."""
    total_sq = values[TOTAL_INDEX]
    has_grads = layout.group_has_grads
    any_grads = any(has_grads)
    grad_norm = math.sqrt(total_sq) if any_grads and total_sq >= 0 else (total_sq if any_grads else None)
    group_norms: list[float | None] = []
    for i in range(layout.num_groups):
        sq = values[_FIXED + i]
        if not has_grads[i]:
            group_norms.append(None)
        else:
            group_norms.append(math.sqrt(sq) if sq >= 0 else sq)  # NaN stays NaN
    return grad_norm, group_norms, bool(any_grads and not math.isfinite(total_sq))


def plain_step(values: list[float], layout: StepLayout) -> tuple | None:
    """The usual step's STEP fields without building the payload: (loss or None, grad_norm,
    group_grad_norms, grad_nonfinite, lr), exactly as ``decode_step`` gives them.

    The usual step was applied and has a float learning rate per group and no
    deep block, extras, clip or fingerprint. None for any other step (the
    caller then calls ``decode_step``).
    """
    if (layout.deep_groups is not None or layout.tensor_lr_groups or layout.extra_names or layout.host_extras
            or layout.clip_max_norm is not None or layout.fingerprint or values[SKIP_INDEX] > 0):
        return None
    loss = None
    if layout.has_loss:
        loss = float(values[0] if layout.host_loss is None else layout.host_loss)
    return (loss, *_norms(values, layout), layout.host_lrs)


def skip_reason(code: float, layout: StepLayout) -> str:
    """The reason for a skip code of the vector (1 guard, 2 GradScaler, 3+ an extension's request)."""
    if code >= 3:
        index = int(code) - 3
        return layout.skip_reasons[index] if index < len(layout.skip_reasons) else "extension"
    return "grad_scaler" if code >= 2 else "guard"
