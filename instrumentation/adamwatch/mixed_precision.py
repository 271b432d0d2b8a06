"""Mixed-precision signals: GradScaler's scale and an underflow signal, as a step extension.

| extra (STEP ``extras``) | metric | when |
| --- | --- | --- |
| ``grad_scaler_scale`` | ``adamwatch_grad_scaler_scale`` | every summarised step, when a GradScaler is in use |
| ``grad_zero_ratio.<group index>`` | ``adamwatch_grad_zero_ratio{param_group}`` | every ``every`` steps |

Overflow skips need no extra: GradScaler's skipped steps are already reported as
``adamwatch_skipped_steps_total{reason="grad_scaler"}``, so the skip rate is that
counter's rate over ``adamwatch_steps_total``'s.

The underflow signal is the share of a fixed random sample of gradient coordinates
(the same kind of sample the deep statistics use) that are exactly zero. fp16
gradients that underflow become exactly 0; a share that climbs while the loss
scale falls is the sign that the scale no longer protects small gradients. The
share is taken on the gradients as the optimizer receives them (zero is zero
whether or not they are still scaled).

Everything stays on the device: the scale is copied (GradScaler updates it in
place after the step) and the ratio is one gather and one mean per group.
"""

from __future__ import annotations

from typing import Any

import torch

from adamwatch.step_stats import _SamplePlan

__all__ = ["GradScalerStats", "SCALE_EXTRA", "ZERO_RATIO_EXTRA_PREFIX"]

SCALE_EXTRA = "grad_scaler_scale"
ZERO_RATIO_EXTRA_PREFIX = "grad_zero_ratio."


class GradScalerStats:
    """Step extension reporting a GradScaler's scale and the gradients' zero share.

    Args:
        scaler: a ``torch.amp.GradScaler`` (or None: then only the zero share is reported).
        every: compute the zero share every this many steps (0: never). A gather
            per parameter is more than the per-step budget for models with many tensors.
        sample_size: coordinates sampled per param group.
        seed: for the fixed sample.
    """

    def __init__(self, scaler: Any = None, *, every: int = 10, sample_size: int = 4096, seed: int = 0):
        if not isinstance(every, int) or every < 0:
            raise ValueError(f"every must be an int >= 0, got {every!r}")
        if not isinstance(sample_size, int) or sample_size < 1:
            raise ValueError(f"sample_size must be an int >= 1, got {sample_size!r}")
        self.scaler = scaler
        self.every = every
        self.sample_size = sample_size
        self._generator = torch.Generator().manual_seed(seed)
        self._plans: dict[int, _SamplePlan] = {}

    def on_summary(self, ctx: Any) -> None:
        """Add the scale and, every ``every`` steps, the zero share per group."""
        device = ctx.group_norm_sq.device
        scale = getattr(self.scaler, "_scale", None) if self.scaler is not None else None
        enabled = self.scaler is not None and getattr(self.scaler, "is_enabled", lambda: True)()
        if enabled and isinstance(scale, torch.Tensor):
            # A copy: scaler.update() rewrites _scale in place right after the step.
            ctx.add_extra(SCALE_EXTRA, scale.detach().reshape(()).to(device, torch.float32, copy=True))
        if not self.every or ctx.step % self.every:
            return
        for index, (params, grads) in enumerate(zip(ctx.params_by_group, ctx.grads_by_group)):
            if grads:
                ctx.add_extra(f"{ZERO_RATIO_EXTRA_PREFIX}{index}", self.zero_ratio(index, params, grads, device))

    def zero_ratio(self, index: int, params: list[torch.Tensor], grads: list[torch.Tensor],
                   device: torch.device) -> torch.Tensor:
        """Share of the sampled coordinates of ``grads`` that are exactly zero (0-dim float32 on ``device``)."""
        plan = self._plans.get(index)
        if plan is None or plan.key != tuple(id(p) for p in params):
            plan = self._plans[index] = _SamplePlan(params, self.sample_size, self._generator, device)
        zeros = [
            (g.reshape(-1).index_select(0, idx) == 0).sum(dtype=torch.float32).reshape(1).to(device, non_blocking=True)
            for g, idx in zip(grads, plan.indices)
        ]
        return torch.cat(zeros).sum() / plan.size
