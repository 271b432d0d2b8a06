"""On-device reductions of one optimizer step into a single small tensor.

| value | when | how |
| --- | --- | --- |
| loss, non-finite loss | every step | the tensor given to ``observe_loss`` |
| global and per-group gradient L2 norm | every step | ``torch._foreach_norm``, summed in float64, unscaled by GradScaler's scale |
| skipped flag | every step | GradScaler's / adamwatch's ``found_inf`` |
| effective LR and update-size quantiles | every N steps | fixed random coordinate sample per group, sorted on device |
| update L2 norm, weight norm, m and v norms | every N steps | exact, one parameter at a time (bounded extra memory) |
| share of coordinates with sqrt(v_hat) <= eps | every N steps | on the sample |

Nothing here reads a tensor on the host: no ``.item()``, ``.cpu()``, ``bool()``.
The vector is decoded by ``decode_step`` in the background thread after the
asynchronous copy has landed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from adamwatch.step_extensions import MAX_EXTRAS, StepContext
from adamwatch.wire import QUANTILES

__all__ = ["StepLayout", "StepStats", "decode_step", "skip_reason", "DEEP_FIELDS_PER_GROUP"]

# Per-step vector: [loss, total_sq_norm, skip code, group_sq_norm × G, lr tensors...]
_FIXED = 3
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

    @property
    def step_length(self) -> int:
        return _FIXED + self.num_groups + len(self.tensor_lr_groups) + len(self.extra_names)

    @property
    def length(self) -> int:
        deep = self.num_groups * DEEP_FIELDS_PER_GROUP if self.deep_groups is not None else 0
        clip = 1 if self.clip_max_norm is not None and not self.clip_from_norm else 0
        return self.step_length + deep + clip


class _SamplePlan:
    """Fixed random coordinates of one param group, drawn once."""

    def __init__(self, params: list[torch.Tensor], sample_size: int, generator: torch.Generator, device: torch.device):
        numels = [p.numel() for p in params]
        total = sum(numels)
        self.key = tuple(id(p) for p in params)
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
        # Built on the host and copied without blocking: this runs inside the
        # first deep step, which must not synchronise either.
        self.counts = torch.tensor(counts).to(device, non_blocking=True)
        # Linear-interpolation quantiles from a sorted sample, positions fixed
        # on the host so no device value decides an index (no sync).
        positions = [q * (self.size - 1) for q in QUANTILES]
        lo = [int(math.floor(p)) for p in positions]
        hi = [min(i + 1, self.size - 1) for i in lo]
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

    def __init__(self, optimizer: torch.optim.Optimizer, *, sample_size: int = 4096, seed: int = 0):
        self.optimizer = optimizer
        self.sample_size = sample_size
        first = next((p for g in optimizer.param_groups for p in g["params"]), None)
        self.device = first.device if first is not None else torch.device("cpu")
        # float64 keeps the sum of squared norms of an exploding gradient
        # (1e20 and up) finite; MPS has no float64.
        self.dtype = torch.float32 if self.device.type == "mps" else torch.float64
        self._generator = torch.Generator().manual_seed(seed)
        self._plans: dict[int, _SamplePlan] = {}
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

    def _to_dev(self, t: torch.Tensor) -> torch.Tensor:
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
        return _FIXED + 2 * groups + MAX_EXTRAS + groups * DEEP_FIELDS_PER_GROUP + 1

    # ------------------------------------------------------------------ per step
    def per_step(
        self,
        loss: torch.Tensor | float | None,
        *,
        grad_scale: torch.Tensor | None = None,
        found_inf: torch.Tensor | None = None,
        guard: bool = False,
        need_flag: bool = False,
        group_sq: torch.Tensor | None = None,
        on_context: Callable[[StepContext], None] | None = None,
        step: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor | None, StepLayout]:
        """Reduce the gradients (pre-step: they are about to be applied).

        Args:
            loss: the step's loss (tensor or float: the micro-batch mean), or None.
            grad_scale: GradScaler's scale when the grads are still scaled (fused path).
            found_inf: GradScaler's overflow flag, if any.
            guard: the non-finite flag (or an extension's skip request) marks the
                step as skipped (fused guard).
            need_flag: return the skip flag as a device tensor (implied by guard).
            group_sq: per-group sums of squares taken earlier (before clipping,
                adamwatch.grad_clip), used instead of a pass over the grads.
            on_context: called with the step's StepContext after the local norms
                (the step extensions); may replace the norms and the flags.
            step: the index of the step being summarised (for the context).

        Returns:
            (vector, skip flag as a 1-element bool tensor or None, layout). The
            flag is the non-finite flag OR'ed with the extensions' skip requests.
        """
        need_flag = need_flag or guard
        groups = self.optimizer.param_groups
        grads: list[torch.Tensor] = []
        owners: list[int] = []  # the group of each grad
        has_grads: list[bool] = []
        for index, group in enumerate(groups):
            before = len(grads)
            for p in group["params"]:
                if p.grad is not None:
                    grads.append(p.grad)
                    owners.append(index)
            has_grads.append(len(grads) > before)
        # Few, small ops: after backward every dispatch costs ~10 µs of cold
        # caches, and this runs on every step.
        if group_sq is not None:
            sq = group_sq
        elif grads:
            # One foreach kernel for every gradient of every group, then
            # per-group sums of squares (float64: an exploding norm of 1e20
            # squared stays finite).
            norms = torch._foreach_norm(grads, 2, dtype=torch.float32)
            squares = torch.stack(self._on_device(norms)).to(self.dtype).square()
            if len(groups) == 1:
                sq = squares.sum(0, keepdim=True)
            else:
                sq = torch.zeros(len(groups), dtype=self.dtype, device=self.device).index_add_(
                    0, self._owner_index(owners), squares
                )
        else:
            sq = torch.zeros(len(groups), dtype=self.dtype, device=self.device)
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
            if ctx.group_norm_sq is not sq:
                if tuple(ctx.group_norm_sq.shape) != (len(groups),):
                    raise ValueError(f"StepContext.group_norm_sq must keep shape [{len(groups)}], "
                                     f"got {tuple(ctx.group_norm_sq.shape)}")
                sq = self._to_dev(ctx.group_norm_sq).to(self.dtype)
                total = sq.sum(0, keepdim=True)

        # The non-finite flag on the device is only needed to skip the step
        # (the fused guard); otherwise the host derives it from the values.
        bad = None
        if need_flag:
            if ctx is not None and ctx.nonfinite_read:
                bad = ctx.nonfinite.reshape(1)
            else:
                bad = ~torch.isfinite(total) if grads or group_sq is not None else self._false
                if isinstance(loss, torch.Tensor):
                    bad = bad | ~torch.isfinite(loss_t)

        # Skip code: 0 applied, 1 skipped by the adamwatch guard, 2 skipped by
        # GradScaler, 3 + i skipped at an extension's request (layout.skip_reasons[i]).
        skipped = bad.to(self.dtype) if guard else self._zero
        skip_reasons: list[str] = []
        if ctx is not None and ctx.skip_requested and need_flag:
            code = skipped.reshape(())
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
        if found_inf is not None:
            skipped = torch.where(self._to_dev(found_inf) > 0, 2.0, skipped).to(self.dtype)

        host_lrs: list[float | None] = []
        lr_tensors: list[torch.Tensor] = []
        tensor_lr_groups: list[int] = []
        for index, group in enumerate(groups):
            lr = group["lr"]
            if isinstance(lr, torch.Tensor):
                host_lrs.append(None)
                tensor_lr_groups.append(index)
                lr_tensors.append(self._to_dev(lr.detach()).reshape(1).to(self.dtype))
            else:
                host_lrs.append(float(lr))

        parts = [loss_t, total, skipped.reshape(1), sq]
        parts.extend(lr_tensors)
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
        return vector, bad, layout

    def _context(self, step: int, groups: list[dict], sq: torch.Tensor, loss_t: torch.Tensor,
                 loss: Any, host_loss: float | None, grad_scale: torch.Tensor | None) -> StepContext:
        params_by_group = [[p for p in g["params"] if p.grad is not None] for g in groups]
        grads_by_group = [[p.grad for p in ps] for ps in params_by_group]
        if host_loss is not None:
            loss_0d = torch.full((), host_loss, dtype=torch.float32, device=self.device)
        else:
            loss_0d = loss_t.reshape(()).to(torch.float32)
        return StepContext(self.optimizer, step, params_by_group, grads_by_group, sq, loss_0d,
                           has_loss=loss is not None, grad_scale=grad_scale)

    def group_sq(self) -> torch.Tensor:
        """Per-group sums of squared gradients as they are now ([num_groups], no sync).

        Taken just before clipping (adamwatch.grad_clip), so the step's summary
        reports the pre-clip norm without a second pass over the gradients.
        """
        groups = self.optimizer.param_groups
        grads: list[torch.Tensor] = []
        owners: list[int] = []
        for index, group in enumerate(groups):
            for p in group["params"]:
                if p.grad is not None:
                    grads.append(p.grad)
                    owners.append(index)
        if not grads:
            return torch.zeros(len(groups), dtype=self.dtype, device=self.device)
        norms = torch._foreach_norm(grads, 2, dtype=torch.float32)
        squares = torch.stack(self._on_device(norms)).to(self.dtype).square()
        if len(groups) == 1:
            return squares.sum(0, keepdim=True)
        return torch.zeros(len(groups), dtype=self.dtype, device=self.device).index_add_(
            0, self._owner_index(owners), squares
        )

    def _owner_index(self, owners: list[int]) -> torch.Tensor:
        """Device tensor of group indices per grad, cached: the set of params
        with a grad rarely changes between steps."""
        key = tuple(owners)
        if key != self._owners_key:
            self._owners_key = key
            self._owners = torch.tensor(owners).to(self.device, non_blocking=True)
        return self._owners

    # ------------------------------------------------------------------ deep
    def _plan(self, index: int, params: list[torch.Tensor]) -> _SamplePlan:
        plan = self._plans.get(index)
        key = tuple(id(p) for p in params)
        if plan is None or plan.key != key:
            plan = _SamplePlan(params, self.sample_size, self._generator, self.device)
            self._plans[index] = plan
        return plan

    def deep(self) -> tuple[torch.Tensor, list[bool]]:
        """Adam's own state after the update (post-step).

        Returns:
            (vector of num_groups × DEEP_FIELDS_PER_GROUP, per group: had state).
        """
        opt = self.optimizer
        blocks: list[torch.Tensor] = []
        present: list[bool] = []
        empty = torch.full((DEEP_FIELDS_PER_GROUP,), float("nan"), dtype=self.dtype, device=self.device)
        for index, group in enumerate(opt.param_groups):
            # Adam's statistics where the state holds Adam's moments (Adam, AdamW, NAdam,
            # RAdam); other optimizers (SGD, Adagrad, Adamax...) have no deep block.
            second = "max_exp_avg_sq" if group.get("amsgrad") else "exp_avg_sq"
            params = [] if "betas" not in group or "eps" not in group else [
                p for p in group["params"] if "exp_avg" in (st := opt.state.get(p, {})) and second in st
            ]
            if not params:
                blocks.append(empty)
                present.append(False)
                continue
            present.append(True)
            blocks.append(self._deep_group(index, group, params))
        return torch.cat(blocks), present

    def _deep_group(self, index: int, group: dict, params: list[torch.Tensor]) -> torch.Tensor:
        state = self.optimizer.state
        beta1, beta2 = group["betas"]
        eps = group["eps"]
        lr = group["lr"]
        if isinstance(lr, torch.Tensor):
            lr = self._to_dev(lr.detach()).to(torch.float32)
        second = "max_exp_avg_sq" if group.get("amsgrad") else "exp_avg_sq"
        plan = self._plan(index, params)

        step_tensors = [state[p]["step"].detach().reshape(()) for p in params]
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
            [state[p]["exp_avg"].reshape(-1).index_select(0, idx) for p, idx in zip(params, plan.indices)]
        )))
        v_sample = _as_float32(torch.cat(self._on_device(
            [state[p][second].reshape(-1).index_select(0, idx) for p, idx in zip(params, plan.indices)]
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
            ms = [_as_float32(state[p]["exp_avg"]) for _, p in chunk]
            vs = [_as_float32(state[p][second]) for _, p in chunk]
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
        weight_norm = self._group_norm([p.detach() for p in params])
        m_norm = self._group_norm([state[p]["exp_avg"] for p in params])
        v_norm = self._group_norm([state[p]["exp_avg_sq"] for p in params])

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
    total_sq = values[1]
    any_grads = any(layout.group_has_grads)
    grad_norm = math.sqrt(total_sq) if any_grads and total_sq >= 0 else (total_sq if any_grads else None)
    group_norms: list[float | None] = []
    for i in range(g):
        sq = values[_FIXED + i]
        if not layout.group_has_grads[i]:
            group_norms.append(None)
        else:
            group_norms.append(math.sqrt(sq) if sq >= 0 else sq)  # NaN stays NaN
    lrs = list(layout.host_lrs)
    for slot, group_index in enumerate(layout.tensor_lr_groups):
        lrs[group_index] = values[_FIXED + g + slot]
    payload: dict[str, Any] = {
        "grad_norm": grad_norm,
        "group_grad_norms": group_norms,
        "grad_nonfinite": bool(any_grads and not math.isfinite(total_sq)),
        "lr": [float(x) for x in lrs],
        "skipped": bool(values[2] > 0),
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
    if layout.clip_max_norm is not None:
        payload["clip_max_norm"] = layout.clip_max_norm
        if layout.clip_from_norm:
            # torch's own formula, on the norm the clip was given
            # (a NaN norm stays NaN: min() would turn it into 1)
            payload["clip_coefficient"] = (min(1.0, layout.clip_max_norm / (math.sqrt(total_sq) + 1e-6))
                                           if total_sq >= 0 else math.nan)
        else:
            payload["clip_coefficient"] = values[layout.length - 1]
    if layout.deep_groups is not None:
        deep = []
        nq = len(QUANTILES)
        base = layout.step_length
        for i in range(g):
            if not layout.deep_groups[i]:
                deep.append({})
                continue
            block = values[base + i * DEEP_FIELDS_PER_GROUP : base + (i + 1) * DEEP_FIELDS_PER_GROUP]
            update_norm, weight_norm, m_norm, v_norm, eps_share = block[2 * nq :]
            deep.append(
                {
                    "effective_lr": block[:nq],
                    "update_size": block[nq : 2 * nq],
                    "update_norm": update_norm,
                    "weight_norm": weight_norm,
                    "update_to_weight": (update_norm / weight_norm) if weight_norm > 0 else None,
                    "exp_avg_norm": m_norm,
                    "exp_avg_sq_norm": v_norm,
                    "eps_dominated_ratio": eps_share,
                }
            )
        payload["deep"] = deep
    return payload


def skip_reason(code: float, layout: StepLayout) -> str:
    """The reason for a skip code of the vector (1 guard, 2 GradScaler, 3+ an extension's request)."""
    if code >= 3:
        index = int(code) - 3
        return layout.skip_reasons[index] if index < len(layout.skip_reasons) else "extension"
    return "grad_scaler" if code >= 2 else "guard"
