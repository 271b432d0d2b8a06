"""adamwatch.unwrap: the torch object inside each stack's wrapper, and a useful error otherwise."""

from __future__ import annotations

import pytest
import torch

from adamwatch.unwrap import unwrap_optimizer, unwrap_scheduler


def adamw():
    return torch.optim.AdamW(torch.nn.Linear(2, 1).parameters(), lr=1e-3)


def test_a_torch_optimizer_is_itself():
    opt = adamw()
    assert unwrap_optimizer(opt) is opt


def test_accelerate_wrappers():
    accelerate = pytest.importorskip("accelerate")
    from accelerate.optimizer import AcceleratedOptimizer
    from accelerate.scheduler import AcceleratedScheduler

    accelerate.Accelerator(cpu=True)
    opt = adamw()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    wrapped = AcceleratedOptimizer(opt, device_placement=False)
    assert isinstance(wrapped, torch.optim.Optimizer)  # a subclass, yet not the one whose hooks fire
    assert unwrap_optimizer(wrapped) is opt
    assert unwrap_scheduler(AcceleratedScheduler(sched, wrapped)) is sched


def test_lightning_optimizer():
    pytest.importorskip("lightning")
    from lightning.pytorch.core.optimizer import LightningOptimizer

    opt = adamw()
    assert unwrap_optimizer(LightningOptimizer(opt)) is opt


def test_nested_and_duck_typed_wrappers():
    opt = adamw()

    class Outer:
        def __init__(self, optimizer):
            self.optimizer = optimizer

    assert unwrap_optimizer(Outer(Outer(opt))) is opt


def test_unknown_wrapper_error_names_the_class_and_the_fix():
    class Opaque:
        def __init__(self, o):
            self._o = o

    with pytest.raises(TypeError) as info:
        unwrap_optimizer(Opaque(adamw()))
    message = str(info.value)
    assert "Opaque" in message and "wrapper.optimizer" in message


def test_a_custom_scheduler_is_left_as_given():
    class Custom:
        base_lrs = [1.0]

    custom = Custom()
    assert unwrap_scheduler(custom) is custom
    assert unwrap_scheduler(None) is None
