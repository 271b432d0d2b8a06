"""On-device spike guard: stop most loss spikes inside the step instead of repairing them later.

Two modes, both computed on the device from the step's pre-clip global gradient
norm (and, for ``skip``, the step's loss), with no host sync and no Python branch
on a device value:

| mode | rule | published defaults | action |
| --- | --- | --- | --- |
| ``clip`` | ZClip: EMA of the norm's mean and variance; z = (g - mean) / std | alpha 0.97, z 2.5, warm-up 25 | scale the gradients so the norm sits at mean + z·std |
| ``skip`` | OLMo-core: loss or norm > mean + k·std of the last ``window`` accepted values | k 6, window 128 | skip the step (fused: ``found_inf``; else the one-sync fallback) |

Semantics that the sidecar and the docs rely on:

- The guard judges the **pre-clip** norm; the exported ``adamwatch_grad_norm`` stays
  the pre-clip norm as well. A step the guard acted on is flagged in the STEP's
  extras (``spike_guard_clip`` / ``spike_guard_skip`` = 1), so the sidecar's spike
  detectors neither raise on it nor let it into their windows: the guard already
  handled it. A *streak* of activations is its own detection (``spike_guard``).
- Values that triggered the guard never enter its statistics at full size: ``clip``
  feeds the EMA with the clipped norm (as ZClip does), ``skip`` leaves its window
  untouched. Non-finite values are left to the non-finite guard and never enter.
- ``std`` has a floor of ``min_std_ratio · mean`` (as the sidecar's detectors do),
  so a very flat norm is not clipped on rounding noise.
- Under torch.distributed the decision uses global values only: the norm from
  ``ctx.group_norm_sq`` after the cross-rank extension, and the loss averaged over
  ranks with one small on-device all-reduce (skip mode only), so every rank
  takes the same decision.

    >>> import torch
    >>> mean, var = torch.tensor(1.0), torch.tensor(0.01)
    >>> out = zclip_decide(torch.tensor(2.0), mean, var, z_threshold=2.5, alpha=0.97,
    ...                    min_std_ratio=0.0, armed=True)
    >>> round(float(out.threshold), 4), round(float(out.coefficient), 4), bool(out.activated)
    (1.25, 0.625, True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import torch

__all__ = [
    "SpikeGuardConfig",
    "SpikeGuard",
    "ZClipDecision",
    "zclip_decide",
    "welford_update",
    "window_bound",
    "window_push",
    "EXTRA_NAMES",
]

_MODES = ("clip", "skip")

# Defaults from the published work (see the module docstring).
_DEFAULT_THRESHOLD = {"clip": 2.5, "skip": 6.0}

# Names of the extras the guard sends in each STEP (the sidecar's collector reads them).
EXTRA_NAMES = {
    "clip": "spike_guard_clip",                 # 1.0 when this step was clipped
    "skip": "spike_guard_skip",                 # 1.0 when this step was skipped
    "threshold_grad_norm": "spike_guard_threshold_grad_norm",
    "zscore_grad_norm": "spike_guard_zscore_grad_norm",
    "threshold_loss": "spike_guard_threshold_loss",
    "zscore_loss": "spike_guard_zscore_loss",
}


@dataclass(frozen=True)
class SpikeGuardConfig:
    """How the spike guard decides. Pass it as ``adamwatch.watch(..., spike_guard=SpikeGuardConfig(...))``
    (or just ``spike_guard="clip"`` / ``"skip"`` for the defaults).

    Args:
        mode: "clip" (ZClip adaptive clipping) or "skip" (OLMo-core style step skipping).
        warmup: steps with a finite value before the guard may act (statistics only before that).
        threshold: z for "clip" (default 2.5), k for "skip" (default 6.0): the bound is
            mean + threshold · std.
        ema: "clip": weight of the history in the EMA of the norm's mean and variance (ZClip's alpha).
        window: "skip": how many recent accepted values the mean and std are taken over.
        min_std_ratio: std is at least this share of the mean, so a flat series does not trigger.
    """

    mode: str = "clip"
    warmup: int = 25
    threshold: float | None = None
    ema: float = 0.97
    window: int = 128
    min_std_ratio: float = 0.01

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise ValueError(f"spike_guard.mode must be one of {_MODES}, got {self.mode!r}")
        if not isinstance(self.warmup, int) or isinstance(self.warmup, bool) or self.warmup < 2:
            raise ValueError(f"spike_guard.warmup must be an int >= 2, got {self.warmup!r}")
        if self.threshold is not None and not (isinstance(self.threshold, (int, float))
                                               and math.isfinite(self.threshold) and self.threshold > 0):
            raise ValueError(f"spike_guard.threshold must be a finite number > 0 or None, got {self.threshold!r}")
        if not (isinstance(self.ema, (int, float)) and 0 < self.ema < 1):
            raise ValueError(f"spike_guard.ema must be in (0, 1), got {self.ema!r}")
        if not isinstance(self.window, int) or isinstance(self.window, bool) or self.window < 2:
            raise ValueError(f"spike_guard.window must be an int >= 2, got {self.window!r}")
        if self.mode == "skip" and self.warmup > self.window:
            raise ValueError(f"spike_guard.warmup ({self.warmup}) must not exceed spike_guard.window "
                             f"({self.window}) in skip mode: the window could never hold enough values")
        if not (isinstance(self.min_std_ratio, (int, float)) and 0 <= self.min_std_ratio < 1):
            raise ValueError(f"spike_guard.min_std_ratio must be in [0, 1), got {self.min_std_ratio!r}")

    @property
    def bound(self) -> float:
        """The threshold in use: the given one or the mode's published default."""
        return float(self.threshold) if self.threshold is not None else _DEFAULT_THRESHOLD[self.mode]

    @classmethod
    def coerce(cls, value: Any) -> "SpikeGuardConfig | None":
        """Accept None/False (off), "clip"/"skip", a mapping of fields, or a config."""
        if value is None or value is False:
            return None
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            return cls(mode=value)
        if isinstance(value, dict):
            unknown = set(value) - set(cls.__dataclass_fields__)
            if unknown:
                raise ValueError(f"spike_guard: unknown field(s) {sorted(unknown)}")
            return cls(**value)
        raise TypeError(f"spike_guard must be None, 'clip', 'skip', a dict or a SpikeGuardConfig, got {value!r}")


# ---------------------------------------------------------------------- pure tensor functions
def welford_update(value: torch.Tensor, count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor,
                   accept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step of Welford's running mean/variance, taken only where ``accept`` is True.

    Args:
        value, count, mean, m2: 0-dim float tensors (m2 = Σ (x - mean)²).
        accept: 0-dim bool tensor; False leaves the statistics unchanged (even for a NaN value).

    Returns:
        (count, mean, m2) after the step.
    """
    x = torch.where(accept, value, mean)  # a rejected NaN must not reach the arithmetic
    new_count = count + accept.to(count.dtype)
    delta = x - mean
    new_mean = mean + delta / new_count.clamp(min=1)
    new_m2 = m2 + delta * (x - new_mean)
    return new_count, new_mean, new_m2


class ZClipDecision(NamedTuple):
    """What :func:`zclip_decide` computed for one step (all 0-dim device tensors)."""

    coefficient: torch.Tensor  # multiply the gradients by this (1 when not activated)
    activated: torch.Tensor    # bool
    threshold: torch.Tensor    # mean + z·std before this step's update
    zscore: torch.Tensor       # (g - mean) / std
    mean: torch.Tensor         # EMA mean after this step
    var: torch.Tensor          # EMA variance after this step


def zclip_decide(norm: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, *, z_threshold: float,
                 alpha: float, min_std_ratio: float, armed: bool | torch.Tensor) -> ZClipDecision:
    """ZClip for one step: clip when the z-score of the norm exceeds ``z_threshold``.

    The EMA is fed the norm the update will actually have (the clipped one), so a
    spike cannot inflate the statistics that judge the next one; a non-finite norm
    neither clips nor updates (the non-finite guard handles it).

    About twenty 0-dim ops: after backward each costs ~10 µs of dispatch on a CPU,
    so the formulation counts ops (lerp for the EMA, one maximum for the std floor).

    Args:
        norm: the global pre-clip gradient norm (0-dim).
        mean, var: the EMA statistics before this step.
        z_threshold, alpha, min_std_ratio: see :class:`SpikeGuardConfig`.
        armed: warm-up is over (a host bool, or a device bool).

    Returns:
        A :class:`ZClipDecision`.
    """
    # std = max(sqrt(var), min_std_ratio·|mean|), never 0 (a zero norm must not divide by 0)
    floor = mean * (min_std_ratio * min_std_ratio) * mean
    std = torch.maximum(var, floor).clamp_(min=torch.finfo(var.dtype).tiny).sqrt_()
    threshold = torch.add(mean, std, alpha=z_threshold)
    zscore = (norm - mean) / std
    finite = torch.isfinite(norm)
    activated = (norm > threshold) & finite
    if isinstance(armed, torch.Tensor):
        activated = activated & armed
    elif not armed:
        activated = torch.zeros_like(activated)
    coefficient = torch.where(activated, threshold / norm, 1.0)
    used = torch.where(finite, torch.where(activated, threshold, norm), mean)
    new_mean = torch.lerp(mean, used, 1 - alpha)
    new_var = torch.lerp(var, (used - new_mean).square(), 1 - alpha)
    return ZClipDecision(coefficient, activated, threshold, zscore, new_mean, new_var)


def window_bound(buffer: torch.Tensor, count: torch.Tensor, k: float,
                 min_std_ratio: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, sample std and bound mean + k·max(std, min_std_ratio·|mean|) of circular windows.

    Args:
        buffer: float tensor [..., window]; only the first ``min(count, window)`` slots of
            each row are filled (in order, then overwritten oldest first).
        count: float tensor [...], values pushed so far per row (may exceed the window).

    Returns:
        (mean, std, bound), each shaped like ``count``; finite garbage while count < 2
        (the caller arms on count).
    """
    size = buffer.shape[-1]
    n = count.clamp(max=size).unsqueeze(-1)
    empty = torch.arange(size, device=buffer.device) >= n
    values = buffer.masked_fill(empty, 0.0)
    mean = values.sum(-1, keepdim=True) / n.clamp(min=1)
    dev = (values - mean).masked_fill_(empty, 0.0)
    std = (dev.square_().sum(-1, keepdim=True) / (n - 1).clamp_(min=1)).sqrt_()
    bound = mean + k * torch.maximum(std, min_std_ratio * mean.abs())
    return mean.squeeze(-1), std.squeeze(-1), bound.squeeze(-1)


def window_push(buffer: torch.Tensor, count: torch.Tensor, value: torch.Tensor, accept: torch.Tensor) -> None:
    """Write ``value`` into the circular windows (in place) where ``accept``; no host sync.

    Args:
        buffer: float tensor [..., window].
        count: float tensor [...], values pushed so far; incremented in place where accepted.
        value: float tensor shaped like ``count``.
        accept: bool tensor shaped like ``count``.
    """
    size = buffer.shape[-1]
    slot = torch.remainder(count, size).to(torch.long).unsqueeze(-1)
    old = buffer.gather(-1, slot)
    buffer.scatter_(-1, slot, torch.where(accept.unsqueeze(-1), value.unsqueeze(-1).to(buffer.dtype), old))
    count.add_(accept)


# ---------------------------------------------------------------------- the extension
class SpikeGuard:
    """The spike guard as a step extension (``Monitor.add_step_extension``).

    ``watch(..., spike_guard=...)`` registers it after the cross-rank extension, so
    ``ctx.group_norm_sq`` already holds global values. Keeps its statistics in a few
    device tensors created at the first step.

    Args:
        config: the :class:`SpikeGuardConfig`.
        process_group: the torch.distributed group the loss is averaged over in skip
            mode (default: the world, when torch.distributed is initialised).
        clip_coefficient: returns the factor the user's own ``clip_grad_norm_`` already
            applied to this step's gradients (a device tensor), or None when they were
            not clipped. ``ctx.group_norm_sq`` is pre-clip, so without it a guard behind
            a user clip would scale already-clipped gradients again.
    """

    def __init__(self, config: SpikeGuardConfig, *, process_group: Any = None,
                 clip_coefficient: Callable[[], torch.Tensor | None] | None = None):
        self.config = config
        self.process_group = process_group
        self.clip_coefficient = clip_coefficient
        self.calls = 0  # summaries seen (host-side count: the warm-up is not data dependent)
        self._device: torch.device | None = None
        self._grad_split: tuple[tuple[int, ...], dict[tuple[torch.device, torch.dtype], list[int]]] | None = None

    # State lives on the statistics device, in its dtype, created lazily.
    def _init_state(self, device: torch.device, dtype: torch.dtype) -> None:
        self._device = device
        f = dict(dtype=dtype, device=device)
        self._armed: torch.Tensor | None = None
        if self.config.mode == "clip":
            self.count = torch.zeros((), **f)
            self.mean = torch.zeros((), **f)
            self.m2 = torch.zeros((), **f)
            self.var = torch.zeros((), **f)
        else:
            # Row 0: the global gradient norm; row 1: the loss.
            self.window = torch.zeros(2, self.config.window, **f)
            self.counts = torch.zeros(2, **f)

    def on_summary(self, ctx: Any) -> None:
        """Decide for this step (see the module docstring); everything stays on the device."""
        norm_sq = ctx.group_norm_sq
        if self._device is None or norm_sq.device != self._device:
            self._init_state(norm_sq.device, norm_sq.dtype)
        # In the statistics dtype (float64 where available: a norm of 1e20 squared
        # overflows float32).
        norm = norm_sq.sum().sqrt()
        self.calls += 1
        if self.config.mode == "clip":
            self._clip(ctx, norm)
        else:
            self._skip(ctx, norm)

    def _clip(self, ctx: Any, norm: torch.Tensor) -> None:
        cfg = self.config
        if self.calls <= cfg.warmup:
            # Warm-up: exact mean and variance of the finite norms seen so far;
            # at its end they seed the EMA (ZClip initialises from the warm-up too).
            self.count, self.mean, self.m2 = welford_update(norm, self.count, self.mean, self.m2,
                                                            torch.isfinite(norm))
            self.var = self.m2 / self.count.clamp(min=1)
            ctx.add_extra(EXTRA_NAMES["clip"], 0.0)
            return
        if self._armed is None:
            # Once: armed when the warm-up saw at least two finite norms.
            self._armed = self.count >= 2
        decision = zclip_decide(norm, self.mean, self.var, z_threshold=cfg.bound, alpha=cfg.ema,
                                min_std_ratio=cfg.min_std_ratio, armed=self._armed)
        self.mean, self.var = decision.mean, decision.var
        coefficient = decision.coefficient
        user_clip = self.clip_coefficient() if self.clip_coefficient is not None else None
        if user_clip is not None:
            # The gradients already have norm g·c; bring them to the threshold only
            # if they are still above it: factor min(1, threshold / (g·c)).
            current = norm * user_clip.to(norm.device, norm.dtype).reshape(())
            coefficient = torch.where(decision.activated,
                                      (decision.threshold / current).clamp(max=1.0), coefficient)
        self._scale_grads(ctx.grads_by_group, coefficient)
        ctx.add_extra(EXTRA_NAMES["clip"], decision.activated)
        ctx.add_extra(EXTRA_NAMES["threshold_grad_norm"], decision.threshold)
        ctx.add_extra(EXTRA_NAMES["zscore_grad_norm"], decision.zscore)

    def _scale_grads(self, grads_by_group: list[list[torch.Tensor]], coefficient: torch.Tensor) -> None:
        grads = [g for group in grads_by_group for g in group]
        if not grads:
            return
        key = tuple(id(g) for g in grads)
        if self._grad_split is None or self._grad_split[0] != key:
            by_kind: dict[tuple[torch.device, torch.dtype], list[int]] = {}
            for i, g in enumerate(grads):
                by_kind.setdefault((g.device, g.dtype), []).append(i)
            self._grad_split = (key, by_kind)
        for (device, dtype), indices in self._grad_split[1].items():
            # The coefficient in the gradients' device and dtype, once per kind: a
            # float64 scalar tensor would make the foreach kernel convert per tensor.
            coef = coefficient.to(device, dtype, non_blocking=True)
            # One foreach kernel per kind; a coefficient of exactly 1 leaves the grads bit-identical.
            torch._foreach_mul_([grads[i] for i in indices], coef)

    def _global_loss(self, loss: torch.Tensor) -> torch.Tensor:
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()):
            return loss
        world = dist.get_world_size(self.process_group)
        if world <= 1:
            return loss
        # The same decision on every rank needs the same loss: average it (one
        # enqueued collective on a 1-element tensor; nothing waits on the host
        # with NCCL; gloo, CPU only, completes inline).
        buf = loss.reshape(1).clone()
        dist.all_reduce(buf, group=self.process_group)
        return buf.reshape(()) / world

    def _skip(self, ctx: Any, norm: torch.Tensor) -> None:
        cfg = self.config
        loss = self._global_loss(ctx.loss.to(norm.dtype).reshape(()))
        # Both signals at once: every op below works on [2] or [2, window].
        values = torch.stack([norm, loss])
        mean, std, bound = window_bound(self.window, self.counts, cfg.bound, cfg.min_std_ratio)
        armed = self.counts >= cfg.warmup
        finite = torch.isfinite(values)
        over = (values > bound) & finite & armed
        skip = over.any()
        # A skipped step's values do not enter the windows (a run of spikes
        # must not raise the bar for the next one).
        window_push(self.window, self.counts, values, finite & ~skip)
        # Named, so the skipped step counts as reason="spike_guard".
        ctx.request_skip(skip, "spike_guard")
        shown_bound = torch.where(armed, bound, torch.nan)
        zscore = torch.where(armed, (values - mean) / std.clamp(min=torch.finfo(std.dtype).tiny), torch.nan)
        ctx.add_extra(EXTRA_NAMES["skip"], skip)
        ctx.add_extra(EXTRA_NAMES["threshold_grad_norm"], shown_bound[0])
        ctx.add_extra(EXTRA_NAMES["zscore_grad_norm"], zscore[0])
        ctx.add_extra(EXTRA_NAMES["threshold_loss"], shown_bound[1])
        ctx.add_extra(EXTRA_NAMES["zscore_loss"], zscore[1])
