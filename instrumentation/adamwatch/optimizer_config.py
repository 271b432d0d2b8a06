"""The optimizer's configuration as data: captured, fingerprinted, compared.

    config = capture_config(optimizer, scheduler, scaler)
    config_hash(config)          # "3f1c0a9e2b7d4c11": stable across processes and runs
    diff_configs(saved, config)  # ["param_groups[0].betas: [0.9, 0.999] -> [0.9, 0.95]"]

What the configuration holds (and what it leaves out, so that the fingerprint
only changes when a person changed something):

| part | holds | leaves out |
| --- | --- | --- |
| ``optimizer`` | kind (Adam/AdamW), implementation (for-loop/foreach/fused) | |
| ``param_groups`` | per group: name, peak learning rate, betas, eps, weight decay, amsgrad, maximize, capturable, differentiable, number of tensors and elements | the current ``lr`` (the scheduler moves it every step) |
| ``scheduler`` | class and the scalar arguments in its ``state_dict()`` | step counters, last rates, and the rates adamwatch scales when it cuts the learning rate |
| ``grad_scaler`` | enabled, initial scale, growth/backoff factors, growth interval | the current scale |

A scheduler that cycles momentum (OneCycleLR, CyclicLR) moves beta1: its
``max_momentum`` stands for beta1 then.

The peak learning rate of a group is ``max_lr`` (OneCycleLR), else
``initial_lr`` (set by every torch scheduler), else ``lr``, divided by the
cumulative factor adamwatch applied (:data:`adamwatch.lr_control.LR_SCALE_KEY`):
an adamwatch cut is not a configuration change. ``peak_lr_source`` says which:
``"lr"`` means no scheduler recorded a peak (no scheduler, or ReduceLROnPlateau),
so the value is the rate at capture time and a restore does not compare it.

:func:`group_signature` is the cheap form the Monitor compares at every step
boundary: plain Python values only, a tensor by its identity, never its value,
so checking it never waits for the device.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import torch

from .lr_control import LR_SCALE_KEY
from .optimizer_info import group_names, implementation, optimizer_kind

__all__ = [
    "CONFIG_FORMAT",
    "GroupsSnapshot",
    "capture_config",
    "config_hash",
    "diff_configs",
    "group_signature",
    "write_config_file",
]

#: bumped when the layout of the captured configuration changes
CONFIG_FORMAT = 1

# Group keys that are not configuration: the params themselves, the rate the
# scheduler moves, and the keys adamwatch and the schedulers maintain.
_VOLATILE_GROUP_KEYS = frozenset({"params", "lr", "initial_lr", "max_lr", "min_lr", LR_SCALE_KEY,
                                  "name", "foreach", "fused"})
# Hyperparameters exported per group, in this order.
_GROUP_FIELDS = ("betas", "eps", "weight_decay", "amsgrad", "maximize", "capturable", "differentiable",
                 "decoupled_weight_decay")
# Scheduler state that moves as it steps, or that adamwatch scales with a cut.
_VOLATILE_SCHEDULER_KEYS = frozenset({
    "last_epoch", "_step_count", "_last_lr", "_get_lr_called_within_step", "_is_initial", "base_lrs",
    "max_lrs", "min_lrs", "eta_min", "default_min_lr", "best", "num_bad_epochs", "cooldown_counter",
    "T_cur", "T_i", "_initial_step", "verbose", "optimizer", "_scale_fn_ref", "_scale_fn_custom", "mode_worse",
})


def _plain(value: Any, *, allow_sync: bool) -> Any:
    """A JSON-ready copy of a hyperparameter value; tensors read only when allowed."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            return f"tensor{list(value.shape)}"
        if value.device.type != "cpu" and not allow_sync:
            # Reading it would wait for the device: say what it is instead.
            return f"tensor on {value.device.type}"
        return _plain(value.detach().cpu().item(), allow_sync=allow_sync)
    if isinstance(value, bool) or value is None or isinstance(value, (str, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v, allow_sync=allow_sync) for v in value]
    return type(value).__name__


def _peak_lr(group: dict[str, Any], *, allow_sync: bool) -> tuple[Any, str | None]:
    """(peak learning rate, the group key it came from)."""
    for key in ("max_lr", "initial_lr", "lr"):
        if key in group:
            value = _plain(group[key], allow_sync=allow_sync)
            break
    else:
        return None, None
    scale = group.get(LR_SCALE_KEY, 1.0)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and isinstance(scale, (int, float)) and scale:
        # Rounded so that x*f/f, which may differ from x in the last bit, compares equal.
        return float(f"{value / scale:.12g}"), key
    return value, key


def _scheduler_config(scheduler: Any) -> dict[str, Any] | None:
    if scheduler is None:
        return None
    try:
        state = scheduler.state_dict()
    except Exception:  # noqa: BLE001 - a custom scheduler: its class still identifies it
        state = {}
    args: dict[str, Any] = {}
    for key in sorted(state):
        if key in _VOLATILE_SCHEDULER_KEYS or key.startswith("_") and key not in ("_anneal_func_type",):
            continue
        value = state[key]
        if isinstance(value, (bool, int, float, str)) or value is None:
            args[key] = _plain(value, allow_sync=True)
        elif isinstance(value, (list, tuple)) and all(isinstance(v, (bool, int, float, str)) for v in value):
            args[key] = _plain(value, allow_sync=True)
    children = getattr(scheduler, "_schedulers", None)
    out: dict[str, Any] = {"class": type(scheduler).__qualname__, "args": args}
    if children:
        out["children"] = [_scheduler_config(child) for child in children]
    return out


def _scaler_config(scaler: Any) -> dict[str, Any] | None:
    if scaler is None:
        return None
    return {
        "enabled": bool(getattr(scaler, "_enabled", True)),
        "init_scale": _plain(getattr(scaler, "_init_scale", None), allow_sync=True),
        "growth_factor": _plain(getattr(scaler, "_growth_factor", None), allow_sync=True),
        "backoff_factor": _plain(getattr(scaler, "_backoff_factor", None), allow_sync=True),
        "growth_interval": _plain(getattr(scaler, "_growth_interval", None), allow_sync=True),
    }


def capture_config(optimizer: torch.optim.Optimizer, scheduler: Any = None, scaler: Any = None, *,
                   allow_sync: bool = True) -> dict[str, Any]:
    """The optimizer's configuration as a JSON-ready dict (see the module docstring).

    Args:
        optimizer: a torch Adam or AdamW.
        scheduler: its LR scheduler, or None.
        scaler: its GradScaler, or None.
        allow_sync: read hyperparameters held in device tensors (a host sync
            each). False in the step path: such values are described, not read.

    Returns:
        ``{"format", "optimizer", "param_groups", "scheduler", "grad_scaler"}``.

    Raises:
        TypeError: the optimizer is not a torch Adam or AdamW.
    """
    names = group_names(optimizer)
    groups = []
    for name, group in zip(names, optimizer.param_groups):
        peak, source = _peak_lr(group, allow_sync=allow_sync)
        entry: dict[str, Any] = {"name": name, "peak_lr": peak, "peak_lr_source": source}
        for key in _GROUP_FIELDS:
            if key in group:
                entry[key] = _plain(group[key], allow_sync=allow_sync)
        if "max_momentum" in group and isinstance(entry.get("betas"), list):
            # OneCycleLR/CyclicLR with cycle_momentum move beta1 every step: its peak is the setting.
            entry["betas"] = [_plain(group["max_momentum"], allow_sync=allow_sync), entry["betas"][1]]
        for key in sorted(set(group) - _VOLATILE_GROUP_KEYS - set(_GROUP_FIELDS)):
            entry[key] = _plain(group[key], allow_sync=allow_sync)  # a user's own key is configuration too
        entry["num_tensors"] = len(group["params"])
        entry["num_elements"] = sum(p.numel() for p in group["params"])
        groups.append(entry)
    return {
        "format": CONFIG_FORMAT,
        "optimizer": {"kind": optimizer_kind(optimizer), "implementation": implementation(optimizer)},
        "param_groups": groups,
        "scheduler": _scheduler_config(scheduler),
        "grad_scaler": _scaler_config(scaler),
    }


def config_hash(config: dict[str, Any]) -> str:
    """A stable fingerprint of a captured configuration: 16 hex digits of a sha256.

    Canonical JSON (sorted keys, no spaces) makes it independent of dict order,
    process and machine.

    Args:
        config: from :func:`capture_config`.

    Returns:
        e.g. ``"3f1c0a9e2b7d4c11"``.
    """
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), allow_nan=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for key in value:
            _flatten(value[key], f"{prefix}.{key}" if prefix else str(key), out)
    elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        for index, item in enumerate(value):
            _flatten(item, f"{prefix}[{index}]", out)
        out[f"{prefix}.length"] = len(value)
    else:
        out[prefix] = value


def diff_configs(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The fields that differ between two captured configurations, one line each.

    Args:
        old: e.g. the configuration stored in a checkpoint.
        new: e.g. the live one.

    Returns:
        Sorted lines ``"param_groups[0].betas: [0.9, 0.999] -> [0.9, 0.95]"``;
        empty when the configurations are equal.
    """
    a: dict[str, Any] = {}
    b: dict[str, Any] = {}
    _flatten(old, "", a)
    _flatten(new, "", b)
    missing = object()
    lines = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key, missing), b.get(key, missing)
        if x != y:
            shown_x = "(absent)" if x is missing else json.dumps(x, default=str)
            shown_y = "(absent)" if y is missing else json.dumps(y, default=str)
            lines.append(f"{key}: {shown_x} -> {shown_y}")
    return lines


def group_signature(optimizer: torch.optim.Optimizer) -> tuple[Any, ...]:
    """What changes when someone edits the optimizer's hyperparameters or groups; cheap, no device access.

    The current ``lr`` is left out (schedulers move it); the peak rates are
    divided by adamwatch's own scale, so a cut is not a change. Tensors count
    by identity: replacing one is seen, an in-place edit of a device tensor is not.

    Args:
        optimizer: the optimizer.

    Returns:
        A hashable tuple; compare it with ``==``.
    """
    out: list[Any] = [len(optimizer.param_groups)]
    for group in optimizer.param_groups:
        scale = group.get(LR_SCALE_KEY, 1.0)
        items: list[Any] = [len(group["params"])]
        for key, value in group.items():
            if key in ("params", "lr", LR_SCALE_KEY):
                continue
            if isinstance(value, torch.Tensor):
                value = ("tensor", id(value))
            elif key in ("initial_lr", "max_lr", "min_lr") and isinstance(value, float) and scale:
                value = float(f"{value / scale:.12g}")
            elif isinstance(value, list):
                value = tuple(("tensor", id(v)) if isinstance(v, torch.Tensor) else v for v in value)
            elif isinstance(value, tuple):
                value = tuple(("tensor", id(v)) if isinstance(v, torch.Tensor) else v for v in value)
            if key == "betas" and "max_momentum" in group and isinstance(value, tuple) and len(value) == 2:
                value = ("scheduled", value[1])  # beta1 cycled by the scheduler
            items.append((key, value))
        out.append(tuple(items))
    return tuple(out)


class GroupsSnapshot:
    """The param groups' values by identity: "nothing was reassigned" in a few microseconds.

    ``group_signature`` walks and normalises every value; the step path asks
    every step whether anything changed, and the answer is almost always no.
    A changed value is a different object (floats, tuples) or, for a list, a
    list with different elements: this check sees both without normalising,
    and only when it fails does the caller compute the signature, which stays
    the arbiter (a value reassigned to an equal one is not a change). The
    current ``lr`` is skipped here as there (schedulers move it every step).
    """

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.take()

    def take(self) -> None:
        """Remember the groups as they are now."""
        groups = self.optimizer.param_groups
        self._groups = groups
        self._snapshot = []
        for group in groups:
            keys = tuple(group)
            values = tuple(group.values())
            lists = tuple((i, [id(x) for x in v]) for i, v in enumerate(values) if type(v) is list)
            self._snapshot.append((group, keys, values, keys.index("lr") if "lr" in group else -1, lists))

    def unchanged(self) -> bool:
        """True when no group, key or value (other than ``lr``) was replaced since ``take``."""
        groups = self.optimizer.param_groups
        if groups is not self._groups or len(groups) != len(self._snapshot):
            return False
        for group, (same_group, keys, values, lr_at, lists) in zip(groups, self._snapshot):
            if group is not same_group or len(group) != len(keys):
                return False
            for i, value in enumerate(group.values()):
                if value is not values[i] and i != lr_at:
                    return False
            for i, ids in lists:
                if [id(x) for x in values[i]] != ids:
                    return False
        return True


def write_config_file(path: str, optimizer: torch.optim.Optimizer, scheduler: Any = None, scaler: Any = None, *,
                      job: str | None = None, features: dict[str, bool] | None = None) -> dict[str, Any]:
    """Write the configuration as JSON for ``adamwatch-sidecar policy check`` (CI, before a run).

        write_config_file("optimizer-config.json", optimizer, scheduler, job="prod-gpt",
                          features={"checkpointer": True, "guard": True, "deep_stats": True})

    Args:
        path: the file to write.
        optimizer, scheduler, scaler: as for :func:`capture_config`.
        job: the job name the policy's patterns are matched with.
        features: what the run will have (``Monitor.features()`` gives the live ones).

    Returns:
        What was written: ``{"job", "config", "config_hash", "features"}``.
    """
    config = capture_config(optimizer, scheduler, scaler)
    data = {"job": job, "config": config, "config_hash": config_hash(config), "features": dict(features or {})}
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, sort_keys=True)
        fh.write("\n")
    return data
