"""What kind of Adam a user handed us: kind, implementation, hyperparameters, group names."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["optimizer_kind", "implementation", "group_names", "describe_optimizer", "is_fused"]


def optimizer_kind(optimizer: torch.optim.Optimizer) -> str:
    """"AdamW" or "Adam" (subclasses are reported by their nearest torch base).

    Raises:
        TypeError: naming the class when it is not a torch Adam or AdamW.
    """
    # AdamW subclasses Adam in recent torch: test the narrower class first.
    if isinstance(optimizer, torch.optim.AdamW):
        return "AdamW"
    if isinstance(optimizer, torch.optim.Adam):
        if optimizer.defaults.get("decoupled_weight_decay"):
            return "AdamW"
        return "Adam"
    raise TypeError(
        f"adamwatch.watch(optimizer): expected torch.optim.Adam or AdamW, got {type(optimizer).__qualname__}"
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
    group = optimizer.param_groups[0] if optimizer.param_groups else dict(optimizer.defaults)
    betas = group.get("betas", (0.9, 0.999))
    devices = sorted({p.device.type for g in optimizer.param_groups for p in g["params"]})
    return {
        "kind": optimizer_kind(optimizer),
        "implementation": implementation(optimizer),
        "betas": [_float(betas[0]), _float(betas[1])],
        "eps": _float(group.get("eps", 1e-8)),
        "weight_decay": _float(group.get("weight_decay", 0.0)),
        "amsgrad": bool(group.get("amsgrad", False)),
        "capturable": bool(group.get("capturable", False)),
        "param_groups": group_names(optimizer),
        "num_params": sum(p.numel() for g in optimizer.param_groups for p in g["params"]),
        "device": ",".join(devices) or "cpu",
    }
