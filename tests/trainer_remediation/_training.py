"""A tiny, deterministic training setup shared by the trainer-remediation tests."""

from __future__ import annotations

import random

import torch

OPTIMIZER_CONFIGS = [
    ("Adam", {"foreach": False}),
    ("Adam", {"foreach": True}),
    ("Adam", {"fused": True}),
    ("AdamW", {"foreach": False}),
    ("AdamW", {"foreach": True}),
    ("AdamW", {"fused": True}),
]


def config_id(config: tuple[str, dict]) -> str:
    name, kwargs = config
    return f"{name}-" + "-".join(f"{k}={v}" for k, v in kwargs.items())


def make_model(seed: int = 0, width: int = 16) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(8, width), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(width, 1)
    )


def make_optimizer(model: torch.nn.Module, config: tuple[str, dict] = ("AdamW", {})) -> torch.optim.Optimizer:
    name, kwargs = config
    cls = getattr(torch.optim, name)
    return cls(model.parameters(), lr=1e-2, weight_decay=0.01, **kwargs)


def train_steps(model, optimizer, scheduler=None, scaler=None, steps: int = 3) -> list[float]:
    """Steps that consume the torch RNG (data, dropout) and python's random."""
    losses = []
    for _ in range(steps):
        x = torch.randn(4, 8)
        y = torch.randn(4, 1) * random.random()
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
    return losses


def snapshot(model, optimizer, scheduler=None, scaler=None) -> dict:
    """Everything that must come back bit-exactly, as plain comparable values."""
    state = optimizer.state_dict()
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "opt_state": {
            k: {n: (v.clone() if torch.is_tensor(v) else v) for n, v in s.items()} for k, s in state["state"].items()
        },
        "lrs": [g["lr"] for g in optimizer.param_groups],
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
    }


def assert_same(a: dict, b: dict) -> None:
    assert len(a["params"]) == len(b["params"])
    for i, (x, y) in enumerate(zip(a["params"], b["params"])):
        assert torch.equal(x, y), f"param {i} differs"
    assert a["opt_state"].keys() == b["opt_state"].keys()
    for k in a["opt_state"]:
        for name in ("step", "exp_avg", "exp_avg_sq"):
            x, y = a["opt_state"][k][name], b["opt_state"][k][name]
            assert torch.equal(torch.as_tensor(x), torch.as_tensor(y)), f"state {k}.{name} differs"
    assert a["lrs"] == b["lrs"]
    assert a["scheduler"] == b["scheduler"]
    assert a["scaler"] == b["scaler"]
