"""Helpers shared by the Checkpointer tests: an event recorder and a run with known-good checkpoints."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from adamwatch.checkpoint import CheckpointEvent, Checkpointer

from ._training import make_model, make_optimizer, train_steps


class Events:
    """Records on_event calls (and, as a listener, whole CheckpointEvents)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, int, str | None, str | None]] = []
        self.events: list[CheckpointEvent] = []

    def __call__(self, kind, step, path, detail) -> None:
        self.seen.append((kind, step, path, detail))

    def listener(self, event: CheckpointEvent) -> None:
        self.events.append(event)

    def kinds(self, kind: str) -> list[int]:
        return [step for k, step, _, _ in self.seen if k == kind]

    def details(self, kind: str) -> list[str | None]:
        return [detail for k, _, _, detail in self.seen if k == kind]


def setup(config=("AdamW", {}), seed=0, with_scaler=True):
    """model, optimizer, a warm-up LambdaLR, and a CPU GradScaler (or None)."""
    model = make_model(seed)
    optimizer = make_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: min(1.0, (e + 1) / 4))
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0, growth_interval=2) if with_scaler else None
    return model, optimizer, scheduler, scaler


def good_checkpoints(directory: Path, steps: set[int], events=None, **kwargs):
    """Train, save at ``steps``, report every step healthy (good_window=2): all of them known-good."""
    model, optimizer, scheduler, _ = setup(with_scaler=False)
    ckpt = Checkpointer(directory, model=model, optimizer=optimizer, scheduler=scheduler,
                        good_window=2, on_event=events, **kwargs)
    for step in range(1, max(steps) + 3):
        train_steps(model, optimizer, scheduler, steps=1)
        if step in steps:
            ckpt.save(step)
        ckpt.note_step(step, True)
    return ckpt, model, optimizer, scheduler


def live_state(model, optimizer, scheduler=None, scaler=None) -> dict:
    """Every piece of live state a restore may touch, copied: params, buffers, m, v, step, groups, scheduler, scaler, RNGs."""
    import numpy

    opt = optimizer.state_dict()
    return {
        "model": {k: v.clone() for k, v in model.state_dict().items()},
        "opt_state": {k: {n: v.clone() if torch.is_tensor(v) else v for n, v in s.items()}
                      for k, s in opt["state"].items()},
        "param_groups": [{k: v for k, v in g.items()} for g in opt["param_groups"]],
        "opt_state_objects": id(optimizer.state),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "torch_rng": torch.get_rng_state(),
        "python_rng": random.getstate(),
        "numpy_rng": numpy.random.get_state(),
    }


def assert_unchanged(before: dict, after: dict) -> None:
    """Bit-exact equality of two live_state() snapshots."""
    import numpy

    assert before["model"].keys() == after["model"].keys()
    for key in before["model"]:
        assert torch.equal(before["model"][key], after["model"][key]), f"model {key} changed"
    assert before["opt_state"].keys() == after["opt_state"].keys()
    for index, state in before["opt_state"].items():
        for name, value in state.items():
            other = after["opt_state"][index][name]
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(other)), f"optimizer {index}.{name} changed"
    assert before["param_groups"] == after["param_groups"]
    assert before["opt_state_objects"] == after["opt_state_objects"], "the optimizer's state dict was replaced"
    assert before["scheduler"] == after["scheduler"]
    assert before["scaler"] == after["scaler"]
    assert torch.equal(before["torch_rng"], after["torch_rng"])
    assert before["python_rng"] == after["python_rng"]
    b, a = before["numpy_rng"], after["numpy_rng"]
    assert b[0] == a[0] and numpy.array_equal(b[1], a[1]) and b[2:] == a[2:]
