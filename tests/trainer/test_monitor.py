"""adamwatch.watch() on every torch Adam/AdamW implementation, read back from a real socket."""

from __future__ import annotations

import logging
import math

import pytest
import torch

import adamwatch
from adamwatch import wire

IMPLEMENTATIONS = {
    "for-loop": {"foreach": False},
    "foreach": {"foreach": True},
    "fused": {"fused": True},
}
KINDS = {"Adam": torch.optim.Adam, "AdamW": torch.optim.AdamW}


def make_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    return model.to(dtype)


def make_optimizer(model, kind="AdamW", impl="foreach", **kw):
    groups = [
        {"params": model[0].parameters(), "name": "encoder"},
        {"params": model[2].parameters(), "lr": 3e-3},
    ]
    return KINDS[kind](groups, lr=1e-3, **IMPLEMENTATIONS[impl], **kw)


def batch(seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 16, generator=g).to(dtype), torch.randn(8, 4, generator=g).to(dtype)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_summary_matches_what_the_training_script_saw(sink, kind, impl):
    model = make_model()
    opt = make_optimizer(model, kind, impl)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    seen = []
    with adamwatch.watch(opt, scheduler=sched, endpoint=sink.endpoint, job="unit", rank=3, deep_stats_every=3) as monitor:
        for i in range(6):
            x, y = batch(i)
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            monitor.observe_loss(loss)
            grads = [p.grad for p in model.parameters()]
            seen.append(
                {
                    "loss": loss.item(),
                    "norm": torch.nn.utils.get_total_norm(grads).item(),
                    "groups": [
                        torch.nn.utils.get_total_norm([p.grad for p in g["params"]]).item() for g in opt.param_groups
                    ],
                    "lr": [g["lr"] for g in opt.param_groups],
                }
            )
            opt.step()
            sched.step()
            opt.zero_grad()
    sink.wait_for(lambda: sink.of_type(wire.MessageType.GOODBYE))
    hello = sink.of_type(wire.MessageType.HELLO)[0]
    assert hello["job"] == "unit" and hello["rank"] == 3
    assert hello["optimizer"]["kind"] == kind
    assert hello["optimizer"]["implementation"] == impl
    assert hello["optimizer"]["param_groups"] == ["encoder", "1"]
    steps = sink.steps()
    assert [s["step"] for s in steps] == [1, 2, 3, 4, 5, 6]
    for s, expected in zip(steps, seen):
        assert s["loss"] == pytest.approx(expected["loss"], rel=1e-6)
        assert s["grad_norm"] == pytest.approx(expected["norm"], rel=1e-5)
        assert s["group_grad_norms"] == pytest.approx(expected["groups"], rel=1e-5)
        assert s["lr"] == pytest.approx(expected["lr"])
        assert s["grad_nonfinite"] is False and s["loss_nonfinite"] is False and s["skipped"] is False
    assert [("deep" in s) for s in steps] == [False, False, True, False, False, True]
    # Steps are spaced by real time.
    assert all(s["duration_s"] > 0 for s in steps[1:])


def test_deep_statistics_match_an_exact_computation(sink):
    """With a sample that covers every coordinate, the quantiles are exact."""
    model = make_model()
    opt = make_optimizer(model, "Adam", "foreach")
    with adamwatch.watch(opt, endpoint=sink.endpoint, deep_stats_every=2, sample_size=100_000) as monitor:
        for i in range(2):
            x, y = batch(i)
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            monitor.observe_loss(loss)
            opt.step()
            opt.zero_grad()
    sink.wait_for(lambda: len(sink.steps()) == 2)
    deep = sink.steps()[1]["deep"]
    q = torch.tensor(wire.QUANTILES, dtype=torch.float64)
    for group, stats in zip(opt.param_groups, deep):
        beta1, beta2 = group["betas"]
        eff, upd, upd_sq, w_sq, m_sq, v_sq, below = [], [], 0.0, 0.0, 0.0, 0.0, []
        for p in group["params"]:
            st = opt.state[p]
            t = st["step"].item()
            v_hat = st["exp_avg_sq"].double() / (1 - beta2**t)
            m_hat = st["exp_avg"].double() / (1 - beta1**t)
            e = group["lr"] / (v_hat.sqrt() + group["eps"])
            eff.append(e.flatten())
            u = m_hat * e
            upd.append(u.abs().flatten())
            upd_sq += float((u**2).sum())
            w_sq += float((p.double() ** 2).sum())
            m_sq += float((st["exp_avg"].double() ** 2).sum())
            v_sq += float((st["exp_avg_sq"].double() ** 2).sum())
            below.append((v_hat.sqrt() <= group["eps"]).flatten())
        assert stats["effective_lr"] == pytest.approx(torch.quantile(torch.cat(eff), q).tolist(), rel=1e-4)
        assert stats["update_size"] == pytest.approx(torch.quantile(torch.cat(upd), q).tolist(), rel=1e-4)
        assert stats["update_to_weight"] == pytest.approx(math.sqrt(upd_sq) / math.sqrt(w_sq), rel=1e-4)
        assert stats["exp_avg_norm"] == pytest.approx(math.sqrt(m_sq), rel=1e-5)
        assert stats["exp_avg_sq_norm"] == pytest.approx(math.sqrt(v_sq), rel=1e-5)
        assert stats["eps_dominated_ratio"] == pytest.approx(torch.cat(below).double().mean().item())


def test_sampled_quantiles_are_close_to_the_exact_ones(sink):
    torch.manual_seed(0)
    model = torch.nn.Linear(512, 256)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with adamwatch.watch(opt, endpoint=sink.endpoint, deep_stats_every=1, sample_size=4096) as monitor:
        model(torch.randn(64, 512)).square().mean().backward()
        monitor.observe_loss(1.0)
        opt.step()
    sink.wait_for(lambda: len(sink.steps()) == 1)
    stats = sink.steps()[0]["deep"][0]
    st = opt.state[model.weight]
    v_hat = torch.cat([opt.state[p]["exp_avg_sq"].flatten() for p in model.parameters()]) / (1 - 0.999)
    exact = torch.quantile((1e-3 / (v_hat.sqrt() + 1e-8)).double(), torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
    assert st["step"].item() == 1
    sampled = [stats["effective_lr"][1], stats["effective_lr"][2], stats["effective_lr"][3]]
    for s, e in zip(sampled, exact.tolist()):
        assert s == pytest.approx(e, rel=0.15)


def test_params_without_grad_in_a_step_are_allowed(sink):
    model = make_model()
    opt = make_optimizer(model, "AdamW", "foreach")
    with adamwatch.watch(opt, endpoint=sink.endpoint, deep_stats_every=1) as monitor:
        x, _ = batch(0)
        # Only the first layer gets gradients; the second group has none at all.
        model[0](x).sum().backward()
        monitor.observe_loss(0.5)
        opt.step()
    sink.wait_for(lambda: len(sink.steps()) == 1)
    s = sink.steps()[0]
    expected = torch.nn.utils.get_total_norm([p.grad for p in model[0].parameters()]).item()
    assert s["grad_norm"] == pytest.approx(expected, rel=1e-5)
    assert s["group_grad_norms"][0] == pytest.approx(expected, rel=1e-5)
    assert s["group_grad_norms"][1] is None
    assert s["deep"][1] == {}  # no Adam state yet for that group
    assert s["loss"] == 0.5


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_bf16_parameters(sink, impl):
    model = make_model(dtype=torch.bfloat16)
    opt = make_optimizer(model, "AdamW", impl)
    with adamwatch.watch(opt, endpoint=sink.endpoint, deep_stats_every=1) as monitor:
        x, y = batch(0, torch.bfloat16)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        monitor.observe_loss(loss)
        expected = torch.nn.utils.get_total_norm([p.grad.float() for p in model.parameters()]).item()
        opt.step()
    sink.wait_for(lambda: len(sink.steps()) == 1)
    s = sink.steps()[0]
    assert s["grad_norm"] == pytest.approx(expected, rel=1e-3)
    assert s["loss"] == pytest.approx(loss.float().item())
    assert all(math.isfinite(q) for q in s["deep"][0]["effective_lr"])


def test_grad_scaler_overflow_without_fused_is_reported_as_skipped(sink):
    """torch skips optimizer.step() entirely on overflow here, so no optimizer hook fires."""
    model = make_model()
    opt = make_optimizer(model, "AdamW", "foreach")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    with adamwatch.watch(opt, endpoint=sink.endpoint, scaler=scaler, deep_stats_every=0) as monitor:
        for i in range(3):
            x, y = batch(i)
            loss = torch.nn.functional.mse_loss(model(x), y)
            if i == 1:
                loss = loss * float("inf")
            scaler.scale(loss).backward()
            monitor.observe_loss(loss)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
    sink.wait_for(lambda: len(sink.steps()) == 3)
    steps = sink.steps()
    assert [s["step"] for s in steps] == [1, 2, 3]
    assert [s["skipped"] for s in steps] == [False, True, False]
    assert steps[1]["skip_reason"] == "grad_scaler"
    assert steps[1]["grad_nonfinite"] is True
    assert steps[1]["loss_nonfinite"] is True
    assert not hasattr(scaler.step, "__self__") or scaler.step.__self__ is scaler  # close() unwrapped it


def test_grad_scaler_with_fused_reports_unscaled_norms(sink):
    """Fused + GradScaler: the pre-step hook sees still-scaled grads and optimizer.grad_scale."""
    model = make_model()
    opt = make_optimizer(model, "AdamW", "fused")
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    with adamwatch.watch(opt, endpoint=sink.endpoint, scaler=scaler, deep_stats_every=0) as monitor:
        x, y = batch(0)
        loss = torch.nn.functional.mse_loss(model(x), y)
        scaler.scale(loss).backward()
        expected = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]).item() / 1024.0
        monitor.observe_loss(loss)
        scaler.step(opt)
        scaler.update()
        # Overflow step: fused kernel skips, the hook fires and reports it.
        loss = torch.nn.functional.mse_loss(model(x), y) * float("nan")
        before = [p.detach().clone() for p in model.parameters()]
        scaler.scale(loss).backward()
        monitor.observe_loss(loss)
        scaler.step(opt)
        scaler.update()
        assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
    sink.wait_for(lambda: len(sink.steps()) == 2)
    first, second = sink.steps()
    assert first["grad_norm"] == pytest.approx(expected, rel=1e-5)
    assert first["skipped"] is False
    assert second["skipped"] is True and second["skip_reason"] == "grad_scaler"


def test_fused_guard_skips_a_nonfinite_step_without_touching_params_or_state(sink):
    model = make_model()
    opt = make_optimizer(model, "AdamW", "fused")
    with adamwatch.watch(opt, endpoint=sink.endpoint, deep_stats_every=0) as monitor:
        x, y = batch(0)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        params = [p.detach().clone() for p in model.parameters()]
        state = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()}
        loss = torch.nn.functional.mse_loss(model(x), y) * float("nan")
        loss.backward()
        monitor.observe_loss(loss)
        opt.step()
        assert not hasattr(opt, "found_inf")  # the guard cleans up after itself
        for p, before in zip(model.parameters(), params):
            assert torch.equal(p, before)
            for k, v in opt.state[p].items():
                assert torch.equal(v, state[id(p)][k]), k
    sink.wait_for(lambda: len(sink.steps()) == 2)
    skipped = sink.steps()[1]
    assert skipped["skipped"] is True and skipped["skip_reason"] == "guard"
    assert skipped["loss_nonfinite"] is True and skipped["grad_nonfinite"] is True


def test_sync_guard_skips_nonfinite_steps_for_non_fused_optimizers(sink):
    model = make_model()
    opt = make_optimizer(model, "Adam", "foreach")
    with adamwatch.watch(opt, endpoint=sink.endpoint, deep_stats_every=0, guard="sync") as monitor:
        x, y = batch(0)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        params = [p.detach().clone() for p in model.parameters()]
        (torch.nn.functional.mse_loss(model(x), y) * float("inf")).backward()
        monitor.observe_loss(float("inf"))
        opt.step()
        assert all(torch.equal(p, b) for p, b in zip(model.parameters(), params))
        assert all(opt.state[p]["step"].item() == 1 for p in model.parameters())
    sink.wait_for(lambda: len(sink.steps()) == 2)
    assert sink.steps()[1]["skipped"] is True and sink.steps()[1]["skip_reason"] == "guard"


def test_default_guard_only_reports_for_non_fused(sink):
    model = make_model()
    opt = make_optimizer(model, "Adam", "for-loop")
    with adamwatch.watch(opt, endpoint=sink.endpoint, deep_stats_every=0) as monitor:
        x, y = batch(0)
        (torch.nn.functional.mse_loss(model(x), y) * float("nan")).backward()
        monitor.observe_loss(float("nan"))
        opt.step()
    sink.wait_for(lambda: len(sink.steps()) == 1)
    s = sink.steps()[0]
    assert s["grad_nonfinite"] is True and s["loss_nonfinite"] is True
    assert s["skipped"] is False


def test_close_removes_hooks_and_flushes(sink):
    model = make_model()
    opt = make_optimizer(model)
    monitor = adamwatch.watch(opt, endpoint=sink.endpoint, deep_stats_every=0)
    x, y = batch(0)
    for _ in range(50):
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    monitor.close()
    # Flushed before close() returned.
    assert len(sink.steps()) == 50 or sink.wait_for(lambda: len(sink.steps()) == 50) is None
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    opt.step()
    assert len(sink.steps()) == 50


def test_throughput_is_reported(sink):
    model = make_model()
    opt = make_optimizer(model)
    with adamwatch.watch(opt, endpoint=sink.endpoint, samples_per_step=8, tokens_per_step=512) as monitor:
        x, y = batch(0)
        for i in range(2):
            torch.nn.functional.mse_loss(model(x), y).backward()
            if i == 1:
                monitor.set_throughput(samples=4, tokens=100)
            opt.step()
            opt.zero_grad()
    sink.wait_for(lambda: len(sink.steps()) == 2)
    a, b = sink.steps()
    assert (a["samples"], a["tokens"]) == (8, 512)
    assert (b["samples"], b["tokens"]) == (4, 100)
    assert "loss" not in a  # a step without a loss is allowed


def test_no_sidecar_trains_normally_and_logs_once(short_dir, caplog):
    model = make_model()
    opt = make_optimizer(model)
    reference = make_model()
    ref_opt = make_optimizer(reference)
    caplog.set_level(logging.WARNING, logger="adamwatch")
    with adamwatch.watch(opt, endpoint=f"unix://{short_dir}/missing.sock") as monitor:
        for i in range(20):
            for m, o in ((model, opt), (reference, ref_opt)):
                x, y = batch(i)
                torch.nn.functional.mse_loss(m(x), y).backward()
                o.step()
                o.zero_grad()
            monitor.observe_loss(1.0)
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p, q)
    missing = [r for r in caplog.records if "no sidecar" in r.getMessage()]
    assert len(missing) == 1
    assert monitor.dropped_total == 20


def test_rejects_non_optimizers_and_bad_options():
    model = make_model()
    with pytest.raises(TypeError, match="torch.optim.Optimizer, got Sequential"):
        adamwatch.watch(model)
    opt = make_optimizer(model)
    with pytest.raises(ValueError, match="guard"):
        adamwatch.watch(opt, guard="maybe")
    with pytest.raises(ValueError, match="deep_stats_every"):
        adamwatch.watch(opt, deep_stats_every=-1)
    with pytest.raises(ValueError, match="scheme"):
        adamwatch.watch(opt, endpoint="http://x")


def test_the_coordinate_sample_has_exactly_the_requested_size():
    from adamwatch.step_stats import _SamplePlan

    params = [torch.zeros(3) for _ in range(500)] + [torch.zeros(10_000)]
    plan = _SamplePlan(params, 256, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert plan.size == 256 == sum(len(i) for i in plan.indices)
    assert len(plan.indices[-1]) >= 190  # the big tensor gets its share


def test_the_client_pauses_100_ms_between_sends_unless_configured(sink):
    model = make_model()
    opt = make_optimizer(model)
    with adamwatch.watch(opt, endpoint=sink.endpoint) as monitor:
        assert monitor._batch_interval() == 0.1
    with adamwatch.watch(make_optimizer(make_model()), endpoint=sink.endpoint, batch_interval=0.01) as fixed:
        assert fixed._batch_interval() == 0.01
    with adamwatch.watch(make_optimizer(make_model()), endpoint=sink.endpoint, batch_interval=0) as streamed:
        assert streamed._batch_interval() == 0.0
    with pytest.raises(ValueError, match="batch_interval"):
        adamwatch.watch(make_optimizer(make_model()), batch_interval=-1)
