"""Export the spike guard's, the GradScaler's and the cross-rank reduction's per-step extras as metrics.

A run-state listener (``sidecar.state.add_listener``): each STEP frame may carry an
``extras`` map ``{name: float}`` filled by the trainer's step extensions. This module
turns the names it knows into metric-table series through the generic store:

| extra | metric |
| --- | --- |
| ``spike_guard_clip`` / ``spike_guard_skip`` (0 or 1) | ``adamwatch_spike_guard_activations_total{mode}`` |
| ``spike_guard_threshold_<signal>`` | ``adamwatch_spike_guard_threshold{signal}`` |
| ``spike_guard_zscore_<signal>`` | ``adamwatch_spike_guard_zscore{signal}`` |
| ``grad_scaler_scale`` | ``adamwatch_grad_scaler_scale`` |
| ``cross_rank_failed_ranks`` (ranks whose payload failed) | ``adamwatch_cross_rank_failed_steps_total`` (+1 when above 0) |
| ``grad_zero_ratio.<group index>`` | ``adamwatch_grad_zero_ratio{param_group}`` |

Unknown names are ignored (a newer trainer); non-numbers and non-finite gauge values
leave the previous value in place (NaN means "not armed yet" for the guard's bound).

    >>> guard_activation({"spike_guard_clip": 1.0})
    'clip'
    >>> guard_activation({"spike_guard_skip": 0.0}) is None
    True
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from adamwatch import wire

from .run_state import MAX_PARAM_GROUPS, RunState, TrainerKey

__all__ = ["StepExtrasExporter", "guard_activation", "GUARD_MODES", "GUARD_SIGNALS"]

GUARD_MODES: tuple[str, ...] = ("clip", "skip")
GUARD_SIGNALS: tuple[str, ...] = ("grad_norm", "loss")
_ZERO_RATIO_PREFIX = "grad_zero_ratio."


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def guard_activation(extras: Mapping[str, Any] | None) -> str | None:
    """The mode in which the spike guard acted on this step, or None (also for a step without extras)."""
    if not isinstance(extras, Mapping):
        return None
    for mode in GUARD_MODES:
        value = extras.get(f"spike_guard_{mode}")
        if _finite(value) and value > 0:
            return mode
    return None


class StepExtrasExporter:
    """Listener that writes the known extras of each STEP into the run state's generic store.

    Args:
        state: the sidecar's run state.
    """

    def __init__(self, state: RunState):
        self.state = state
        self._groups: dict[TrainerKey, list[str]] = {}

    def on_message(self, key: TrainerKey, message: wire.Message | None) -> None:
        """Run-state listener: remember group names from HELLO, export extras from STEP."""
        if message is None:
            return
        if message.type is wire.MessageType.HELLO:
            groups = message.payload.get("optimizer", {}).get("param_groups") or []
            self._groups[key] = [str(g) for g in groups]
            return
        if message.type is not wire.MessageType.STEP:
            return
        extras = message.payload.get("extras")
        if extras and isinstance(extras, Mapping):  # None first: the ABC check is not free
            self._export(key, extras)

    def _export(self, key: TrainerKey, extras: Mapping[str, Any]) -> None:
        state = self.state
        for mode in GUARD_MODES:
            value = extras.get(f"spike_guard_{mode}")
            if _finite(value):
                # 0 on a quiet step creates the series, so increase() sees the first activation.
                state.inc(key, "adamwatch_spike_guard_activations_total", {"mode": mode},
                          1.0 if value > 0 else 0.0)
        for signal in GUARD_SIGNALS:
            for kind, metric in (("threshold", "adamwatch_spike_guard_threshold"),
                                 ("zscore", "adamwatch_spike_guard_zscore")):
                value = extras.get(f"spike_guard_{kind}_{signal}")
                if _finite(value):
                    state.set_gauge(key, metric, {"signal": signal}, float(value))
        failed = extras.get("cross_rank_failed_ranks")
        if _finite(failed):
            state.inc(key, "adamwatch_cross_rank_failed_steps_total", {}, 1.0 if failed > 0 else 0.0)
        scale = extras.get("grad_scaler_scale")
        if _finite(scale):
            state.set_gauge(key, "adamwatch_grad_scaler_scale", {}, float(scale))
        groups = self._groups.get(key, [])
        for name, value in extras.items():
            if not name.startswith(_ZERO_RATIO_PREFIX) or not _finite(value):
                continue
            index = name[len(_ZERO_RATIO_PREFIX):]
            if not index.isdigit() or int(index) >= (len(groups) or MAX_PARAM_GROUPS):
                continue  # a group the HELLO did not announce: the label set stays bounded
            i = int(index)
            label = groups[i] if groups else str(i)
            state.set_gauge(key, "adamwatch_grad_zero_ratio", {"param_group": label}, float(value))
