"""GradScaler scale and the gradients' zero share, with the real torch.amp.GradScaler on CPU."""

from __future__ import annotations

import pytest
import torch

from adamwatch.step_extensions import StepContext
from adamwatch.mixed_precision import SCALE_EXTRA, ZERO_RATIO_EXTRA_PREFIX, GradScalerStats

from .test_no_host_sync import HostReadCounter


def Ctx(step: int, params_by_group: list[list[torch.Tensor]]) -> StepContext:
    """The real StepContext of one step."""
    grads = [[p.grad for p in ps] for ps in params_by_group]
    return StepContext(None, step, params_by_group, grads, torch.zeros(len(params_by_group), dtype=torch.float64),
                       torch.tensor(float("nan")), has_loss=False)


def test_scale_is_the_scale_the_step_used_even_after_update():
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.Adam(model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1)
    stats = GradScalerStats(scaler, every=0)
    seen = []
    for i in range(3):
        loss = model(torch.randn(8, 4)).square().mean()
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        ctx = Ctx(i + 1, [list(model.parameters())])
        stats.on_summary(ctx)
        expected = scaler.get_scale()
        scaler.step(opt)
        scaler.update()  # growth_interval=1: the scale doubles after every good step
        opt.zero_grad()
        seen.append(float(dict(ctx.extras)[SCALE_EXTRA]))
        assert seen[-1] == expected
    assert seen == [1024.0, 2048.0, 4096.0]


def test_an_overflow_halves_the_reported_scale():
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.Adam(model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=1000)
    stats = GradScalerStats(scaler, every=0)
    scales = []
    for poison in (False, True, False):
        loss = model(torch.randn(8, 4)).square().mean() * (float("inf") if poison else 1.0)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        ctx = Ctx(1, [list(model.parameters())])
        stats.on_summary(ctx)
        scales.append(float(dict(ctx.extras)[SCALE_EXTRA]))
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    assert scales == [2.0**16, 2.0**16, 2.0**15]


def test_zero_ratio_is_the_share_of_sampled_coordinates_that_are_zero():
    big, small, other = torch.nn.Parameter(torch.ones(3000)), torch.nn.Parameter(torch.ones(1000)), \
        torch.nn.Parameter(torch.ones(10))
    big.grad = torch.zeros(3000)                       # underflowed entirely
    small.grad = torch.full((1000,), 1e-3)              # no zeros
    g = torch.ones(10)
    g[:3] = 0
    other.grad = g                                      # 3 of 10 zero, all sampled (below sample size)
    stats = GradScalerStats(None, every=5, sample_size=1024)
    ctx = Ctx(10, [[big, small], [other]])
    stats.on_summary(ctx)
    assert SCALE_EXTRA not in dict(ctx.extras)
    # 1024 coordinates shared in proportion to size: 768 from big (all zero), 256 from small.
    assert float(dict(ctx.extras)[ZERO_RATIO_EXTRA_PREFIX + "0"]) == pytest.approx(0.75)
    assert float(dict(ctx.extras)[ZERO_RATIO_EXTRA_PREFIX + "1"]) == pytest.approx(0.3)
    ctx = Ctx(11, [[big, small], [other]])  # not a multiple of every
    stats.on_summary(ctx)
    assert ctx.extras == []


def test_no_host_reads():
    model = torch.nn.Linear(64, 8)
    opt = torch.optim.Adam(model.parameters())
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(model(torch.randn(4, 64)).sum()).backward()
    scaler.unscale_(opt)
    stats = GradScalerStats(scaler, every=1)
    stats.on_summary(Ctx(1, [list(model.parameters())]))  # builds the sample plan
    counter = HostReadCounter()
    with counter.counting():
        stats.on_summary(Ctx(2, [list(model.parameters())]))
    assert counter.calls == []


@pytest.mark.parametrize("kwargs", [{"every": -1}, {"sample_size": 0}])
def test_bad_arguments_are_named(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        GradScalerStats(None, **kwargs)
