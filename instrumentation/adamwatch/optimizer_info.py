"""What optimizer a user handed us: kind, implementation, hyperparameters, group names.

Any ``torch.optim.Optimizer`` is watched: loss, gradient norms, learning rates,
non-finite flags and step time do not depend on the update rule. Adam's state
statistics need ``exp_avg``/``exp_avg_sq`` in the state (see ``StepStats.deep``).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["optimizer_kind", "implementation", "group_names", "describe_optimizer", "is_fused"]


def optimizer_kind(optimizer: torch.optim.Optimizer) -> str:
    """"AdamW" or "Adam" (subclasses reported by their nearest torch base), else the class's own name.

    Raises:
        TypeError: naming the class when it is not a ``torch.optim.Optimizer``.
    """
    # AdamW subclasses Adam in recent torch: test the narrower class first.
    if isinstance(optimizer, torch.optim.AdamW):
        return "AdamW"
    if isinstance(optimizer, torch.optim.Adam):
        if optimizer.defaults.get("decoupled_weight_decay"):
            return "AdamW"
        return "Adam"
    if isinstance(optimizer, torch.optim.Optimizer):
        return type(optimizer).__name__
    raise TypeError(
        f"adamwatch.watch(optimizer): expected a torch.optim.Optimizer, got {type(optimizer).__qualname__}; "
        f"pass the torch optimizer it wraps (often its .optimizer attribute)"
    )



def is_fused(optimizer: torch.optim.Optimizer) -> bool:
    """True when the optimizer runs the fused kernel (which honours ``found_inf``)."""
    return any(bool(g.get("fused")) for g in optimizer.param_groups)


def implementation(optimizer: torch.optim.Optimizer) -> str:
    """"fused", "foreach" or "for-loop", resolving torch's own default when unset."""
    if is_fused(optimizer):
        return "fused"
    foreach = optimizer.param_groups[0].get("foreach") if optimizer.param_groups else None
    if foreach is None:
        # torch picks foreach by default only when every param is on a
        # foreach-capable accelerator; ask it rather than re-deriving its rule.
        from torch.optim.optimizer import _default_to_fused_or_foreach

        params = [p for g in optimizer.param_groups for p in g["params"]]
        _, foreach = _default_to_fused_or_foreach(params, differentiable=False, use_fused=False)
    return "foreach" if foreach else "for-loop"


def group_names(optimizer: torch.optim.Optimizer) -> list[str]:
    """Label value per param group: its "name" key if the user set one, else its index."""
    names = []
    for index, group in enumerate(optimizer.param_groups):
        name = group.get("name")
        names.append(str(name) if name not in (None, "") else str(index))
    if len(set(names)) != len(names):
        # Duplicate names would merge series; fall back to indices.
        names = [str(i) for i in range(len(names))]
    if "all" in names:
        # "all" is reserved for the global gradient norm.
        names = [n if n != "all" else f"all_{i}" for i, n in enumerate(names)]
    return names


def _float(value: Any) -> float:
    if isinstance(value, torch.Tensor):
        # Called once at watch() time, never in the step path.
        return float(value.detach().cpu())
    return float(value)


def describe_optimizer(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The HELLO message's ``optimizer`` field."""
    kind = optimizer_kind(optimizer)  # first: refuses what is not a torch optimizer
    group = optimizer.param_groups[0] if optimizer.param_groups else dict(optimizer.defaults)
    devices = sorted({p.device.type for g in optimizer.param_groups for p in g["params"]})
    info: dict[str, Any] = {
        "kind": kind,
        "implementation": implementation(optimizer),
        "param_groups": group_names(optimizer),
        "num_params": sum(p.numel() for g in optimizer.param_groups for p in g["params"]),
        "device": ",".join(devices) or "cpu",
        "capturable": bool(group.get("capturable", False)),
        "weight_decay": _float(group.get("weight_decay", 0.0)),
    }
    # Hyperparameters only where the optimizer has them (SGD has no betas, no eps):
    # the sidecar leaves a missing one's label empty rather than invent a value.
    betas = group.get("betas")
    if isinstance(betas, (tuple, list)) and len(betas) == 2:
        info["betas"] = [_float(betas[0]), _float(betas[1])]
    if group.get("eps") is not None:
        info["eps"] = _float(group["eps"])
    if "amsgrad" in group:
        info["amsgrad"] = bool(group["amsgrad"])
    return info
