"""watch(spike_guard=...) and watch(scaler=...) end to end in a real trainer: what the optimizer
received, what the STEP frames say, no host reads, and the same decision on 2 gloo ranks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import adamwatch
from adamwatch.spike_guard import SpikeGuardConfig
from tests.distributed.rank_processes import run_ranks

from .test_monitor import IMPLEMENTATIONS, batch, make_model, make_optimizer
from .test_no_host_sync import count_step_reads

SPIKE_STEP = 30  # 0-based iteration whose loss is weighted x100


class Recorder:
    """A step extension registered after the guard: the grads and skip flag the optimizer is given."""

    def __init__(self):
        self.norms: list[torch.Tensor] = []
        self.skips: list[torch.Tensor] = []

    def on_summary(self, ctx) -> None:
        grads = [g for group in ctx.grads_by_group for g in group]
        self.norms.append(torch.stack(torch._foreach_norm(grads)).norm())
        self.skips.append(ctx.skip.clone())


def train(opt, model, monitor, steps=40, spike_weight=100.0):
    snapshots = []
    for i in range(steps):
        x, y = batch(i)
        loss = torch.nn.functional.mse_loss(model(x), y) * (spike_weight if i == SPIKE_STEP else 1.0)
        loss.backward()
        monitor.observe_loss(loss)
        before = [p.detach().clone() for p in model.parameters()]
        opt.step()
        opt.zero_grad()
        snapshots.append((before, [p.detach().clone() for p in model.parameters()]))
    return snapshots


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_clip_mode_hands_the_optimizer_gradients_at_the_threshold(sink, impl):
    model = make_model()
    opt = make_optimizer(model, "AdamW", impl)
    recorder = Recorder()
    with adamwatch.watch(opt, endpoint=sink.endpoint, deep_stats_every=0,
                         spike_guard=SpikeGuardConfig(mode="clip", warmup=10)) as monitor:
        monitor.add_step_extension(recorder)
        train(opt, model, monitor)
    sink.wait_for(lambda: len(sink.steps()) == 40)
    steps = sink.steps()
    clipped = [i for i, s in enumerate(steps) if s["extras"].get("spike_guard_clip") == 1.0]
    assert SPIKE_STEP in clipped
    for i, s in enumerate(steps):
        after = float(recorder.norms[i])
        if i in clipped:
            # the exported norm is the pre-clip one; the optimizer got exactly the threshold
            assert s["grad_norm"] > s["extras"]["spike_guard_threshold_grad_norm"]
            assert after == pytest.approx(s["extras"]["spike_guard_threshold_grad_norm"], rel=1e-5)
        else:
            assert after == pytest.approx(s["grad_norm"], rel=1e-5)
    assert all("spike_guard_zscore_grad_norm" in s["extras"] for s in steps[10:])


@pytest.mark.parametrize("impl, guard", [("fused", "auto"), ("for-loop", "sync"), ("foreach", "sync")])
def test_skip_mode_leaves_params_and_state_untouched_on_the_spike(sink, impl, guard):
    model = make_model()
    opt = make_optimizer(model, "AdamW", impl)
    with adamwatch.watch(opt, endpoint=sink.endpoint, deep_stats_every=0, guard=guard,
                         spike_guard=SpikeGuardConfig(mode="skip", warmup=10)) as monitor:
        snapshots = train(opt, model, monitor)
    sink.wait_for(lambda: len(sink.steps()) == 40)
    steps = sink.steps()
    skipped = [i for i, s in enumerate(steps) if s["extras"].get("spike_guard_skip") == 1.0]
    assert skipped == [SPIKE_STEP]
    assert steps[SPIKE_STEP]["skipped"] is True
    before, after = snapshots[SPIKE_STEP]
    assert all(torch.equal(b, a) for b, a in zip(before, after))
    before, after = snapshots[SPIKE_STEP + 1]
    assert not all(torch.equal(b, a) for b, a in zip(before, after))
    # Adam's step count skipped the spike too (40 iterations, 39 updates)
    assert {float(s["step"]) for s in opt.state.values()} == {39.0}


@pytest.mark.parametrize("mode", ["clip", "skip"])
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_a_guarded_step_adds_no_host_reads(sink, impl, mode):
    if mode == "skip" and impl != "fused":
        pytest.skip("skip mode without a fused optimizer is the documented one-sync fallback")
    bare_model, model = make_model(), make_model()
    bare_opt, opt = make_optimizer(bare_model, "AdamW", impl), make_optimizer(model, "AdamW", impl)
    count_step_reads(bare_opt, bare_model)
    with adamwatch.watch(opt, endpoint=sink.endpoint, deep_stats_every=0,
                         spike_guard=SpikeGuardConfig(mode=mode, warmup=2)) as monitor:
        count_step_reads(opt, model, monitor)
        for seed in range(1, 6):  # past the warm-up: the armed path is counted
            bare = count_step_reads(bare_opt, bare_model, seed=seed)
            watched = count_step_reads(opt, model, monitor, seed=seed)
            assert watched == bare, f"guarded step made extra host reads: {watched} vs {bare}"


def test_spike_guard_argument_is_validated():
    model = make_model()
    opt = make_optimizer(model, "AdamW", "fused")
    with pytest.raises(ValueError, match="spike_guard.mode"):
        adamwatch.watch(opt, endpoint=None, spike_guard="trim")


def test_skip_mode_without_a_way_to_skip_is_refused():
    """A non-fused optimizer can only skip at one host sync per step: opt in, or be told."""
    opt = make_optimizer(make_model(), "AdamW", "foreach")
    with pytest.raises(ValueError, match="needs a fused optimizer.*guard='sync'"):
        adamwatch.watch(opt, endpoint=None, spike_guard="skip")


def test_grad_scaler_scale_and_zero_share_reach_the_step_frames(sink):
    model = make_model()
    opt = make_optimizer(model, "AdamW", "foreach")
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=2)
    expected = []
    with adamwatch.watch(opt, endpoint=sink.endpoint, deep_stats_every=2, scaler=scaler) as monitor:
        for i in range(6):
            x, y = batch(i)
            loss = torch.nn.functional.mse_loss(model(x), y)
            scaler.scale(loss).backward()
            monitor.observe_loss(loss)
            expected.append(scaler.get_scale())
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
    sink.wait_for(lambda: len(sink.steps()) == 6)
    steps = sink.steps()
    assert [s["extras"]["grad_scaler_scale"] for s in steps] == expected == [1024.0, 1024.0, 2048.0, 2048.0,
                                                                             4096.0, 4096.0]
    # every deep_stats_every steps, per group; nothing in this model's gradients is exactly zero
    assert [("grad_zero_ratio.0" in s["extras"]) for s in steps] == [False, True] * 3
    assert all(s["extras"]["grad_zero_ratio.1"] == 0.0 for s in steps[1::2])


WORKER = Path(__file__).with_name("_spike_guard_dist_worker.py")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["clip", "skip"])
def test_two_gloo_ranks_take_the_same_decisions(tmp_path, mode):
    r0, r1 = run_ranks(tmp_path, 2, WORKER, mode, timeout=120)
    assert r0["skips"] == r1["skips"]
    assert r0["norms"] == pytest.approx(r1["norms"], rel=1e-6)
    assert r0["params"] == r1["params"]  # bit-identical replicas
    if mode == "skip":
        # the spikes were injected on rank 1 only; rank 0 skipped them too
        assert [i for i, s in enumerate(r0["skips"]) if s] == [30, 45]
    else:
        assert r0["clips"] == r1["clips"]
        clipped = [i for i, c in enumerate(r0["clips"]) if c]
        assert 30 in clipped and 45 in clipped
        assert max(r0["norms"][30], r0["norms"][45]) < 5 * sorted(r0["norms"])[30]


def test_clip_behind_the_users_clip_grad_norm_never_clips_twice(sink):
    """The exported (and judged) norm is pre-clip; the gradients the optimizer gets have
    norm min(user-clipped norm, guard threshold), never less."""
    model = make_model()
    opt = make_optimizer(model, "AdamW", "fused")
    recorder = Recorder()
    with adamwatch.watch(opt, endpoint=sink.endpoint, deep_stats_every=0,
                         spike_guard=SpikeGuardConfig(mode="clip", warmup=10)) as monitor:
        monitor.add_step_extension(recorder)
        for i in range(40):
            x, y = batch(i)
            loss = torch.nn.functional.mse_loss(model(x), y) * (100.0 if i == SPIKE_STEP else 1.0)
            loss.backward()
            monitor.observe_loss(loss)
            # a max_norm that only bites on the spike: the guard's threshold is below it
            torch.nn.utils.clip_grad_norm_(model.parameters(), 50.0)
            opt.step()
            opt.zero_grad()
    sink.wait_for(lambda: len(sink.steps()) == 40)
    steps = sink.steps()
    spike = steps[SPIKE_STEP]
    assert spike["extras"]["spike_guard_clip"] == 1.0 and spike["grad_norm"] > 50.0
    thr = spike["extras"]["spike_guard_threshold_grad_norm"]
    assert thr < 50.0
    assert float(recorder.norms[SPIKE_STEP]) == pytest.approx(thr, rel=1e-4)
    for i, s in enumerate(steps):
        expected = min(s["grad_norm"], 50.0)
        if s["extras"].get("spike_guard_clip") == 1.0:
            expected = min(expected, s["extras"]["spike_guard_threshold_grad_norm"])
        assert float(recorder.norms[i]) == pytest.approx(expected, rel=1e-4), i


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["clip", "skip"])
def test_guarded_cuda_steps_make_no_host_sync(sink, mode):
    """Under set_sync_debug_mode("error") any synchronising CUDA call raises."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 256)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    scaler = torch.amp.GradScaler("cuda")
    x = torch.randn(64, 256, device="cuda")
    with adamwatch.watch(opt, endpoint=sink.endpoint, deep_stats_every=10, scaler=scaler,
                         spike_guard=SpikeGuardConfig(mode=mode, warmup=5)) as monitor:
        def step(weight: float = 1.0) -> None:
            with torch.autocast("cuda", dtype=torch.float16):
                loss = model(x).float().square().mean() * weight
            scaler.scale(loss).backward()
            monitor.observe_loss(loss)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)

        for _ in range(3):
            step()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for i in range(60):
                step(100.0 if i == 40 else 1.0)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    sink.wait_for(lambda: len(sink.steps()) == 63, timeout=20)
    assert monitor.errors == 0
    spike = sink.steps()[43]
    # the guard acted, unless the x100 overflowed fp16 and GradScaler skipped the step first
    assert spike["extras"][f"spike_guard_{mode}"] == 1.0 or spike["skip_reason"] == "grad_scaler"
    assert all("grad_scaler_scale" in s["extras"] for s in sink.steps())
