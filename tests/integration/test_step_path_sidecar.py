"""The step path through a real sidecar process: pre-clip norms and clipping on /metrics."""

from __future__ import annotations

import pytest
import torch

import adamwatch

from ..trainer.test_monitor import batch, make_model, make_optimizer


@pytest.mark.slow
def test_metrics_show_the_true_norm_of_a_clipped_run_and_how_hard_it_was_clipped(sidecar):
    model = make_model()
    opt = make_optimizer(model, "AdamW", "fused")
    labels = {"job": "clipped", "rank": "0"}
    norms = []
    with adamwatch.watch(opt, endpoint=sidecar.endpoint, job="clipped", rank=0, deep_stats_every=0) as monitor:
        for i, target in enumerate((2.0, 2.7, 4.3, 0.3)):
            x, y = batch(i)
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            monitor.observe_loss(loss)
            grads = [p.grad for p in model.parameters()]
            factor = target / torch.nn.utils.get_total_norm(grads)
            torch._foreach_mul_(grads, factor)
            norms.append(torch.nn.utils.get_total_norm(grads).item())
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            opt.step()
            opt.zero_grad()
            sidecar.wait_value("adamwatch_optimizer_step", lambda v, s=i + 1: v == s, **labels)
            shown = sidecar.value("adamwatch_grad_norm", param_group="all", **labels)
            assert shown == pytest.approx(norms[-1], rel=1e-5), f"step {i + 1}: /metrics shows {shown}"
    assert norms == pytest.approx([2.0, 2.7, 4.3, 0.3], rel=1e-5)
    assert sidecar.value("adamwatch_clipped_steps_total", **labels) == 3
    assert sidecar.value("adamwatch_grad_clip_max_norm", **labels) == 0.5
    assert sidecar.value("adamwatch_grad_clip_coefficient", **labels) == 1.0  # 0.3 < 0.5: not clipped
