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


class _Broken:
    def on_summary(self, ctx):
        raise RuntimeError("extension bug")


@pytest.mark.slow
def test_failures_inside_the_monitor_are_on_metrics_by_where_and_the_hello_time_is_exported(sidecar):
    import time

    model = make_model()
    opt = make_optimizer(model, "AdamW", "foreach")
    labels = {"job": "blind", "rank": "0"}
    before = time.time()
    with adamwatch.watch(opt, endpoint=sidecar.endpoint, job="blind", rank=0, deep_stats_every=0,
                         batch_interval=0) as monitor:
        sidecar.wait_value("adamwatch_trainer_hello_timestamp_seconds", lambda v: v >= before - 1, **labels)
        assert sidecar.value("adamwatch_last_step_timestamp_seconds", **labels) is None  # hello, no step yet
        monitor.add_step_extension(_Broken())
        for i in range(4):
            x, y = batch(i)
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        sidecar.wait_value("adamwatch_monitor_errors_total", lambda v: v == 4, where="extension", **labels)
    assert sidecar.value("adamwatch_steps_total", **labels) == 4


@pytest.mark.slow
def test_actions_the_training_script_takes_are_counted_like_the_sidecars(sidecar):
    model = make_model()
    opt = make_optimizer(model, "AdamW", "fused")
    labels = {"job": "manual", "rank": "0"}
    with adamwatch.watch(opt, endpoint=sidecar.endpoint, job="manual", rank=0, deep_stats_every=0,
                         batch_interval=0) as monitor:
        for i in range(4):
            if i in (1, 3):
                monitor.reduce_lr(0.5)
            x, y = batch(i)
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        sidecar.wait_value("adamwatch_remediations_total", lambda v: v == 2, action="reduce_lr", outcome="applied",
                           **labels)
    assert sidecar.value("adamwatch_learning_rate_scale", **labels) == 0.25


@pytest.mark.slow
def test_an_explosion_under_clipping_is_detected_and_repaired(sidecar):
    """Gradients x1000 for 3 steps under clip_grad_norm_(1.0): clipping hides nothing from the
    sidecar's detector, whose default ladder cuts the learning rate (before: 0 detections)."""
    import time

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, fused=True)
    w_true = torch.randn(8, 1)
    labels = {"job": "clip-spike", "rank": "0"}
    with adamwatch.watch(opt, endpoint=sidecar.endpoint, job="clip-spike", rank=0, deep_stats_every=0,
                         batch_interval=0) as monitor:
        for it in range(1, 121):
            x = torch.randn(64, 8)
            loss = torch.nn.functional.mse_loss(model(x), x @ w_true)
            loss.backward()
            monitor.observe_loss(loss)
            if 60 <= it < 63:
                for p in model.parameters():
                    p.grad.mul_(1000)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad()
            time.sleep(0.01)  # ~100 steps/s: the sidecar's command has a step boundary to land on
            if monitor.lr_scale < 1.0 and it > 70:
                break
        assert monitor.lr_scale == 0.5
    assert sidecar.value("adamwatch_detections_total", detector="grad_norm_spike", **labels) >= 1
    sidecar.wait_value("adamwatch_remediations_total", lambda v: v == 1, action="reduce_lr", outcome="applied",
                       **labels)
    assert sidecar.value("adamwatch_clipped_steps_total", **labels) >= 3
