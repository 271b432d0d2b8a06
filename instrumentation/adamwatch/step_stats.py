"""On-device reductions of one optimizer step into a single small tensor.

| value | when | how |
| --- | --- | --- |
| loss, non-finite loss | every step | the tensor given to ``observe_loss`` |
| global and per-group gradient L2 norm | every step | ``torch._foreach_norm``, summed in float64, unscaled by GradScaler's scale |
| parameter tensors with a NaN/Inf gradient | every step | non-finite per-tensor norms |
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
from typing import Any

import torch

from adamwatch.wire import QUANTILES

__all__ = ["StepLayout", "StepStats", "decode_step", "DEEP_FIELDS_PER_GROUP"]

# Per-step vector: [loss, total_sq_norm, skipped, nonfinite_tensors, group_sq_norm × G, lr tensors...]
_FIXED = 4
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

    @property
    def step_length(self) -> int:
        return _FIXED + self.num_groups + len(self.tensor_lr_groups)

    @property
    def length(self) -> int:
        deep = self.num_groups * DEEP_FIELDS_PER_GROUP if self.deep_groups is not None else 0
        return self.step_length + deep


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
        self._zero = torch.zeros((), dtype=self.dtype, device=self.device)
        self._false = torch.zeros((), dtype=torch.bool, device=self.device)

    def _to_dev(self, t: torch.Tensor) -> torch.Tensor:
        if t.device != self.device:
            t = t.to(self.device, non_blocking=True)
        return t

    # ------------------------------------------------------------------ per step
    def per_step(
        self,
        loss: torch.Tensor | float | None,
        *,
        grad_scale: torch.Tensor | None = None,
        found_inf: torch.Tensor | None = None,
        guard: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, StepLayout]:
        """Reduce the gradients (pre-step: they are about to be applied).

        Args:
            loss: what observe_loss received (tensor or float), or None.
            grad_scale: GradScaler's scale when the grads are still scaled (fused path).
            found_inf: GradScaler's overflow flag, if any.
            guard: the non-finite flag marks the step as skipped (fused guard).

        Returns:
            (vector, nonfinite flag as a 0-dim bool tensor, layout).
        """
        groups = self.optimizer.param_groups
        group_sq: list[torch.Tensor] = []
        all_norms: list[torch.Tensor] = []
        has_grads: list[bool] = []
        for group in groups:
            grads = [p.grad for p in group["params"] if p.grad is not None]
            has_grads.append(bool(grads))
            if not grads:
                group_sq.append(self._zero)
                continue
            norms = torch._foreach_norm(grads, 2, dtype=torch.float32)
            stacked = torch.stack([self._to_dev(n) for n in norms]).to(self.dtype)
            all_norms.append(stacked)
            group_sq.append(stacked.square().sum())
        sq = torch.stack(group_sq)
        if grad_scale is not None:
            scale = self._to_dev(grad_scale).to(self.dtype)
            sq = sq / (scale * scale)
        total = sq.sum()
        if all_norms:
            nonfinite_tensors = (~torch.isfinite(torch.cat(all_norms))).sum().to(self.dtype)
            grad_bad = ~torch.isfinite(total)
        else:
            nonfinite_tensors = self._zero
            grad_bad = self._false

        host_loss = None
        if isinstance(loss, torch.Tensor):
            loss_t = self._to_dev(loss.detach()).reshape(-1)[:1].to(self.dtype)
            loss_bad = ~torch.isfinite(loss_t[0])
        else:
            loss_t = self._nan
            loss_bad = self._false
            if loss is not None:
                host_loss = float(loss)
        bad = grad_bad | loss_bad

        # Skip code: 0 applied, 1 skipped by the adamwatch guard, 2 skipped by GradScaler.
        skipped = bad.to(self.dtype) if guard else self._zero
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

        parts = [loss_t, total.reshape(1), skipped.reshape(1), nonfinite_tensors.reshape(1), sq]
        parts.extend(lr_tensors)
        vector = torch.cat(parts)
        layout = StepLayout(
            num_groups=len(groups),
            has_loss=loss is not None,
            host_loss=host_loss,
            group_has_grads=has_grads,
            host_lrs=host_lrs,
            tensor_lr_groups=tensor_lr_groups,
        )
        return vector, bad, layout

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
            params = [p for p in group["params"] if "exp_avg" in opt.state.get(p, {})]
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

        steps = torch.stack(
            [self._to_dev(state[p]["step"].detach()).reshape(()).to(torch.float32) for p in params]
        )
        # Tensor betas (capturable) become device scalars; floats stay floats.
        b1 = self._to_dev(beta1).to(torch.float32) if isinstance(beta1, torch.Tensor) else beta1
        b2 = self._to_dev(beta2).to(torch.float32) if isinstance(beta2, torch.Tensor) else beta2
        bc1 = 1 - torch.pow(b1, steps)
        bc2 = 1 - torch.pow(b2, steps)

        m_sample = torch.cat(
            [self._to_dev(state[p]["exp_avg"].reshape(-1).index_select(0, idx)) for p, idx in zip(params, plan.indices)]
        ).to(torch.float32)
        v_sample = torch.cat(
            [self._to_dev(state[p][second].reshape(-1).index_select(0, idx)) for p, idx in zip(params, plan.indices)]
        ).to(torch.float32)
        bc1_c = torch.repeat_interleave(bc1, plan.counts, output_size=plan.size)
        bc2_c = torch.repeat_interleave(bc2, plan.counts, output_size=plan.size)
        sqrt_v_hat = (v_sample / bc2_c).sqrt()
        effective_lr = lr / (sqrt_v_hat + eps)
        update_size = (m_sample.abs() / bc1_c) * effective_lr
        eps_dominated = (sqrt_v_hat <= eps).to(torch.float32).mean()

        # Exact norms, one parameter at a time so the extra memory is bounded
        # by the largest tensor, not the model.
        update_sq = []
        for i, p in enumerate(params):
            st = state[p]
            denom = (st[second].to(torch.float32) / bc2[i].to(st[second].device)).sqrt_().add_(eps)
            upd = (st["exp_avg"].to(torch.float32) / bc1[i].to(denom.device)).div_(denom)
            update_sq.append(self._to_dev(torch.linalg.vector_norm(upd)).to(self.dtype).square())
        update_norm = torch.stack(update_sq).sum().sqrt() * lr
        weight_norm = self._group_norm([p.detach() for p in params])
        m_norm = self._group_norm([state[p]["exp_avg"] for p in params])
        v_norm = self._group_norm([state[p]["exp_avg_sq"] for p in params])

        return torch.cat(
            [
                plan.quantiles(effective_lr).to(self.dtype),
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
        return torch.stack([self._to_dev(n) for n in norms]).to(self.dtype).square().sum().sqrt()


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


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
        "grad_nonfinite_tensors": int(values[3]) if math.isfinite(values[3]) else 0,
        "lr": [float(x) for x in lrs],
        "skipped": bool(values[2] > 0),
    }
    if layout.has_loss:
        payload["loss"] = float(loss_value)
        payload["loss_nonfinite"] = not math.isfinite(loss_value)
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
