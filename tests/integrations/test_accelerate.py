"""Accelerate: ``adamwatch.watch()`` takes the prepared optimizer and scheduler, and LR cuts persist."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("accelerate")
transformers = pytest.importorskip("transformers")

from accelerate import Accelerator  # noqa: E402
from accelerate.optimizer import AcceleratedOptimizer  # noqa: E402
from accelerate.scheduler import AcceleratedScheduler  # noqa: E402

import adamwatch  # noqa: E402


def prepared(warmup: int = 3, total: int = 20, fused: bool = False):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused)
    sched = transformers.get_linear_schedule_with_warmup(opt, num_warmup_steps=warmup, num_training_steps=total)
    accelerator = Accelerator(cpu=True)
    model, opt, sched = accelerator.prepare(model, opt, sched)
    assert isinstance(opt, AcceleratedOptimizer) and isinstance(sched, AcceleratedScheduler)
    return accelerator, model, opt, sched


def step(accelerator, model, opt, sched, i: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(i)
    x, y = torch.randn(16, 8, generator=g), torch.randn(16, 1, generator=g)
    loss = torch.nn.functional.mse_loss(model(x), y)
    accelerator.backward(loss)
    return loss


@pytest.mark.slow
def test_watch_takes_accelerated_objects_and_metrics_match(sidecar):
    accelerator, model, opt, sched = prepared()
    labels = {"job": "accel", "rank": "0"}
    with adamwatch.watch(opt, scheduler=sched, endpoint=sidecar.endpoint, job="accel", rank=0) as monitor:
        assert monitor.optimizer is opt.optimizer
        for i in range(5):
            loss = step(accelerator, model, opt, sched, i)
            monitor.observe_loss(loss)
            truth = {"loss": loss.item(), "lr": opt.param_groups[0]["lr"],
                     "norm": torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]).item()}
            opt.step()
            sched.step()
            opt.zero_grad()
    sidecar.wait_value("adamwatch_optimizer_step", lambda v: v == 5, **labels)
    assert sidecar.value("adamwatch_loss", **labels) == pytest.approx(truth["loss"], rel=1e-6)
    assert sidecar.value("adamwatch_grad_norm", param_group="all", **labels) == pytest.approx(truth["norm"], rel=1e-5)
    assert sidecar.value("adamwatch_learning_rate", param_group="0", **labels) == pytest.approx(truth["lr"], rel=1e-9)


@pytest.mark.parametrize("fused", [False, True])
def test_an_lr_cut_survives_accelerated_lambdalr(fused):
    """HF's linear warmup is a LambdaLR behind an AcceleratedScheduler: the cut must hold at every later step."""
    accelerator, model, opt, sched = prepared(fused=fused)
    base = sched.scheduler.base_lrs[0]
    lam = sched.scheduler.lr_lambdas[0]
    with adamwatch.watch(opt, scheduler=sched, endpoint=None, rank=0) as monitor:
        cut_seen_at = None
        for i in range(12):
            step(accelerator, model, opt, sched, i)
            opt.step()
            sched.step()
            opt.zero_grad()
            if i == 4:
                monitor.reduce_lr(0.5, reason="test")
            if monitor.lr_scale == 0.5:
                cut_seen_at = cut_seen_at if cut_seen_at is not None else i
                expected = 0.5 * base * lam(sched.scheduler.last_epoch)
                assert opt.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12), f"undone at iteration {i}"
        assert cut_seen_at is not None and cut_seen_at <= 6
        assert sched.scheduler.last_epoch == 12 and lam(12) > 0


def test_an_unknown_wrapper_gets_an_error_naming_the_fix():
    class Wrapper:
        def __init__(self, inner):
            self.inner = inner

    model = torch.nn.Linear(2, 1)
    with pytest.raises(TypeError, match=r"Wrapper.*pass the torch optimizer it wraps.*\.optimizer"):
        adamwatch.watch(Wrapper(torch.optim.AdamW(model.parameters())), endpoint=None)
