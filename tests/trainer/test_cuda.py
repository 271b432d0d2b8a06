"""On a CUDA device: watched steps never synchronise with the host.

``torch.cuda.set_sync_debug_mode("error")`` makes every synchronising CUDA
call raise, so 100 watched steps (fused AdamW, deep statistics every 10
steps) passing under it prove the step path stays asynchronous.
"""

from __future__ import annotations

import pytest
import torch

import adamwatch

pytestmark = pytest.mark.gpu

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("impl", [{"fused": True}, {"foreach": True}])
def test_watched_steps_make_no_host_sync(sink, impl):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 256)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, **impl)
    x = torch.randn(64, 256, device="cuda")
    with adamwatch.watch(opt, endpoint=sink.endpoint, deep_stats_every=10) as monitor:
        for _ in range(3):  # Adam allocates its state on the first step
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(100):
                loss = model(x).square().mean()
                loss.backward()
                monitor.observe_loss(loss)
                opt.step()
                opt.zero_grad(set_to_none=True)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sink.wait_for(lambda: len(sink.steps()) == 103, timeout=20)
    assert sum("deep" in s for s in sink.steps()) == 10
    assert monitor.errors == 0


class _SpikeGuardLike:
    """What a step extension typically does, on the device only."""

    def on_summary(self, ctx):
        ctx.request_skip(ctx.loss > 1e6, "loss_above")
        ctx.add_extra("global_norm_sq", ctx.group_norm_sq.sum())
        ctx.add_extra("nonfinite", ctx.nonfinite.float())


@cuda
def test_accumulation_clipping_and_extensions_make_no_host_sync(sink):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 256)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    x = torch.randn(4, 64, 256, device="cuda")

    def step(monitor):
        for micro in range(4):
            loss = model(x[micro]).square().mean() / 4
            loss.backward()
            monitor.observe_loss(loss, scaled_by=4)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
        opt.step()
        opt.zero_grad(set_to_none=True)

    with adamwatch.watch(opt, endpoint=sink.endpoint, deep_stats_every=10) as monitor:
        monitor.add_step_extension(_SpikeGuardLike())
        for _ in range(3):
            step(monitor)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(50):
                step(monitor)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sink.wait_for(lambda: len(sink.steps()) == 53, timeout=20)
    assert monitor.errors == 0
    last = sink.steps()[-1]
    assert last["clip_max_norm"] == 0.01 and last["clip_coefficient"] < 1
    assert last["extras"]["global_norm_sq"] == pytest.approx(last["grad_norm"] ** 2, rel=1e-5)
