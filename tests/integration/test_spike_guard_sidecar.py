"""The spike guard and GradScaler through a real sidecar process: /metrics against the truth seen in the trainer."""

from __future__ import annotations

import pytest
import torch

import adamwatch
from adamwatch.spike_guard import SpikeGuardConfig

from ..trainer.test_monitor import batch, make_model, make_optimizer

SPIKES = {25: 100.0, 36: 60.0}  # 36: the detectors are armed (32 samples) by then


class Truth:
    """Registered after the guard: what it decided and reported, read after the run."""

    def __init__(self):
        self.extras: list[dict[str, torch.Tensor]] = []

    def on_summary(self, ctx) -> None:
        self.extras.append({name: v.clone() for name, v in ctx.extras if isinstance(v, torch.Tensor)})


@pytest.mark.slow
def test_guard_and_scaler_metrics_on_the_sidecar_match_the_trainer(sidecar):
    model = make_model()
    opt = make_optimizer(model, "AdamW", "fused")
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0, growth_interval=5)
    truth = Truth()
    labels = {"job": "guarded", "rank": "0"}
    steps = 40
    with adamwatch.watch(opt, endpoint=sidecar.endpoint, job="guarded", rank=0, deep_stats_every=5, scaler=scaler,
                         spike_guard=SpikeGuardConfig(mode="clip", warmup=10)) as monitor:
        monitor.add_step_extension(truth)
        for i in range(steps):
            x, y = batch(i)
            loss = torch.nn.functional.mse_loss(model(x), y) * SPIKES.get(i, 1.0)
            scaler.scale(loss).backward()
            monitor.observe_loss(loss)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
    sidecar.wait_value("adamwatch_optimizer_step", lambda v: v == steps, **labels)
    clipped = [i for i, e in enumerate(truth.extras) if float(e.get("spike_guard_clip", 0.0)) == 1.0]
    assert set(SPIKES) <= set(clipped)
    assert sidecar.value("adamwatch_spike_guard_activations_total", mode="clip", **labels) == len(clipped)
    last = truth.extras[-1]
    assert sidecar.value("adamwatch_spike_guard_threshold", signal="grad_norm", **labels) == pytest.approx(
        float(last["spike_guard_threshold_grad_norm"]), rel=1e-6)
    assert sidecar.value("adamwatch_spike_guard_zscore", signal="grad_norm", **labels) == pytest.approx(
        float(last["spike_guard_zscore_grad_norm"]), rel=1e-6)
    assert sidecar.value("adamwatch_grad_scaler_scale", **labels) == float(last["grad_scaler_scale"])
    zero_ratio = sidecar.value("adamwatch_grad_zero_ratio", param_group="encoder", **labels)
    assert zero_ratio == float(truth.extras[-1]["grad_zero_ratio.0"]) == 0.0  # step 40: a deep_stats_every step
    # the guarded spikes are no incidents for the sidecar's spike detectors
    assert sidecar.value("adamwatch_detections_total", detector="grad_norm_spike", **labels) is None
    assert sidecar.value("adamwatch_detections_total", detector="loss_spike", **labels) is None
