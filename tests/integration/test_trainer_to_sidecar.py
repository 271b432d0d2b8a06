"""A real trainer and a real sidecar process: what the script saw is what /metrics says."""

from __future__ import annotations

import threading
import time

import pytest
import torch

import adamwatch

from ..trainer.test_monitor import IMPLEMENTATIONS, KINDS, batch, make_model, make_optimizer


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("encoding", ["packed", "json"])
def test_metrics_match_the_training_script(sidecar, kind, impl, encoding):
    model = make_model()
    opt = make_optimizer(model, kind, impl)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)
    job = f"it-{kind}-{impl}-{encoding}"
    with adamwatch.watch(opt, scheduler=sched, endpoint=sidecar.endpoint, job=job, rank=0,
                         step_encoding=encoding) as monitor:
        assert monitor._hello()["step_encoding"] == encoding
        for i in range(5):
            x, y = batch(i)
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            monitor.observe_loss(loss)
            last = {
                "loss": loss.item(),
                "norm": torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]).item(),
                "lr": [g["lr"] for g in opt.param_groups],
            }
            opt.step()
            sched.step()
            opt.zero_grad()
    labels = {"job": job, "rank": "0"}
    sidecar.wait_value("adamwatch_optimizer_step", lambda v: v == 5, **labels)
    assert sidecar.value("adamwatch_steps_total", **labels) == 5
    assert sidecar.value("adamwatch_loss", **labels) == pytest.approx(last["loss"], rel=1e-6)
    assert sidecar.value("adamwatch_grad_norm", param_group="all", **labels) == pytest.approx(last["norm"], rel=1e-5)
    assert sidecar.value("adamwatch_learning_rate", param_group="encoder", **labels) == pytest.approx(last["lr"][0])
    assert sidecar.value("adamwatch_learning_rate", param_group="1", **labels) == pytest.approx(last["lr"][1])
    info = [k for k in sidecar.samples() if k[0] == "adamwatch_optimizer_info" and ("job", job) in k[1]]
    assert len(info) == 1
    assert ("implementation", impl) in info[0][1] and ("optimizer", kind) in info[0][1]


@pytest.mark.slow
def test_sigkill_of_the_sidecar_costs_the_loop_nothing(sidecar):
    """Kill -9 mid-run: no exception, no stall; restart: summaries resume in < 2 s, the gap is counted."""
    model = make_model()
    opt = make_optimizer(model, "AdamW", "fused")
    labels = {"job": "sigkill", "rank": "0"}
    durations: list[tuple[str, float]] = []
    phase = {"name": "before"}
    resumed_at: list[float] = []

    def chaos() -> None:
        time.sleep(1.0)
        sidecar.kill()
        phase["name"] = "outage"
        time.sleep(1.0)
        phase["name"] = "restarting"
        sidecar.start()
        restarted = time.monotonic()
        phase["name"] = "after"
        sidecar.wait_value("adamwatch_steps_total", lambda v: v > 0, timeout=5, **labels)
        resumed_at.append(time.monotonic() - restarted)

    thread = threading.Thread(target=chaos)
    x, y = batch(0)
    with adamwatch.watch(opt, endpoint=sidecar.endpoint, job="sigkill", rank=0, deep_stats_every=10) as monitor:
        thread.start()
        deadline = time.monotonic() + 6.0
        while time.monotonic() < deadline and (thread.is_alive() or not resumed_at):
            start = time.perf_counter()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            monitor.observe_loss(loss)
            opt.step()
            opt.zero_grad()
            durations.append((phase["name"], time.perf_counter() - start))
            time.sleep(0.002)  # pace the loop like a real trainer
        thread.join(10)
        dropped_by_trainer = monitor.dropped_total
    assert resumed_at and resumed_at[0] < 2.0, f"summaries resumed after {resumed_at}"
    before = sorted(d for p, d in durations if p == "before")
    outage = sorted(d for p, d in durations if p == "outage")
    assert before and outage
    # No step waited on the dead sidecar: the slowest outage step stays far
    # below the client's 1 s connect timeout, and the median speed is kept.
    assert max(outage) < 0.25
    assert outage[len(outage) // 2] < 3 * before[len(before) // 2] + 0.002
    # The restarted sidecar learns about the gap from the trainer's HELLO.
    dropped = sidecar.wait_value("adamwatch_dropped_summaries_total", lambda v: v > 0, **labels)
    assert dropped >= len(outage) * 0.5
    assert dropped_by_trainer >= dropped
    assert sidecar.proc.poll() is None  # the restarted sidecar is alive
