"""The Adam-state block on the CPU helper thread (adamwatch.background): same numbers, off the step path."""

from __future__ import annotations

import math
import os
import threading
import time

import pytest
import torch

import adamwatch
from adamwatch import step_stats, wire


def make_run(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    opt = torch.optim.AdamW([
        {"params": model[0].parameters()},
        {"params": model[2].parameters(), "lr": 3e-3, "weight_decay": 0.0},
    ], lr=1e-3)
    return model, opt


def train(model, opt, monitor, steps: int, after_step=None) -> None:
    for i in range(steps):
        g = torch.Generator().manual_seed(i)
        x, y = torch.randn(8, 16, generator=g), torch.randn(8, 4, generator=g)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        monitor.observe_loss(loss)
        opt.step()
        if after_step is not None:
            after_step(i)
        opt.zero_grad()


def exp_avg_norms(opt) -> list[float]:
    """Each group's ||m|| as the optimizer holds it now (float64, from the state itself)."""
    return [
        sum(float(opt.state[p]["exp_avg"].double().square().sum()) for p in g["params"]) ** 0.5
        for g in opt.param_groups
    ]


@pytest.fixture
def compute_threads(monkeypatch):
    """The name of the thread each deep block was computed on."""
    names: list[str] = []
    original = step_stats._DeepPlan.compute

    def compute(self, state, dtype):
        names.append(threading.current_thread().name)
        return original(self, state, dtype)

    monkeypatch.setattr(step_stats._DeepPlan, "compute", compute)
    return names


@pytest.fixture
def slow_blocks(monkeypatch) -> float:
    """Every deep block takes 0.3 s more (longer than a step of these models); returns that."""
    original = step_stats._DeepPlan.compute
    slow = 0.3

    def slow_compute(self, state, dtype):
        time.sleep(slow)
        return original(self, state, dtype)

    monkeypatch.setattr(step_stats._DeepPlan, "compute", slow_compute)
    return slow


def test_the_helper_thread_computes_the_same_block_as_the_step_path(sink, compute_threads):
    steps = 6
    for threaded in (False, True):
        model, opt = make_run()
        with adamwatch.watch(opt, endpoint=sink.endpoint, deep_stats_every=2, deep_stats_thread=threaded) as monitor:
            assert (monitor._deep_job is not None) is threaded
            train(model, opt, monitor, steps)
    sink.wait_for(lambda: len(sink.steps()) == 2 * steps)
    inline, threaded = sink.steps()[:steps], sink.steps()[steps:]
    assert [("deep" in s) for s in threaded] == [False, True] * 3
    # Bit for bit: the same ops on the same state, only on another thread.
    assert [s.get("deep") for s in threaded] == [s.get("deep") for s in inline]
    assert compute_threads == ["MainThread"] * 3 + ["adamwatch-deep-stats"] * 3


def test_the_next_step_waits_for_a_slow_block(sink, slow_blocks):
    """The block reads the state the next update rewrites: that update must wait for it."""
    model, opt = make_run()
    expected: list[list[float]] = []
    busy_after_step: list[bool] = []
    with adamwatch.watch(opt, endpoint=sink.endpoint, deep_stats_every=1) as monitor:
        def after_step(i):
            # The step returned while its block is still being computed...
            busy_after_step.append(monitor._deep_job.busy)
            expected.append(exp_avg_norms(opt))

        began = time.monotonic()
        train(model, opt, monitor, 4, after_step)
        elapsed = time.monotonic() - began
    sink.wait_for(lambda: len(sink.steps()) == 4)
    assert busy_after_step == [True] * 4
    # ...and each block is of its own step's state, not the next one's.
    got = [[group["exp_avg_norm"] for group in s["deep"]] for s in sink.steps()]
    assert got == [pytest.approx(e, rel=1e-6) for e in expected]
    assert expected[0] != pytest.approx(expected[1], rel=1e-3)  # the state does move between steps
    assert elapsed >= 3 * slow_blocks  # steps 2..4 each waited for the block before them


@pytest.mark.parametrize("threaded", [True, False])
def test_a_failing_block_is_counted_and_its_step_still_arrives(sink, monkeypatch, threaded):
    def broken(self, state, dtype):
        raise RuntimeError("deep block failed")

    monkeypatch.setattr(step_stats._DeepPlan, "compute", broken)
    model, opt = make_run()
    with adamwatch.watch(opt, endpoint=sink.endpoint, deep_stats_every=2, deep_stats_thread=threaded) as monitor:
        train(model, opt, monitor, 6)
    assert monitor.errors_by_where == {"deep_stats": 3}  # the last one counted by close() at the latest
    sink.wait_for(lambda: len(sink.steps()) == 6 and sink.of_type(wire.MessageType.MONITOR_ERRORS))
    steps = sink.steps()
    assert [s["step"] for s in steps] == [1, 2, 3, 4, 5, 6]
    assert not any("deep" in s for s in steps)
    assert math.isfinite(steps[1]["loss"]) and steps[1]["grad_norm"] > 0
    assert sink.of_type(wire.MessageType.MONITOR_ERRORS)[-1]["errors"]["deep_stats"] == 3


def test_close_sends_the_block_still_in_flight(sink, slow_blocks):
    model, opt = make_run()
    monitor = adamwatch.watch(opt, endpoint=sink.endpoint, deep_stats_every=1)
    train(model, opt, monitor, 1)
    assert monitor._deep_job.busy
    monitor.close()
    sink.wait_for(lambda: sink.of_type(wire.MessageType.GOODBYE))
    (step,) = sink.steps()
    assert step["step"] == 1 and len(step["deep"]) == 2 and step["deep"][0]["exp_avg_norm"] > 0
    assert not monitor._deep_job._thread.is_alive()


def test_deep_stats_thread_is_a_bool():
    model, opt = make_run()
    with pytest.raises(ValueError, match="deep_stats_thread must be True or False"):
        adamwatch.watch(opt, deep_stats_thread="yes")


def test_a_fork_waits_for_the_block_and_the_child_gets_a_helper_of_its_own(sink, slow_blocks):
    """A DataLoader's workers fork between steps, while a block may be computing."""
    model, opt = make_run()
    with adamwatch.watch(opt, endpoint=sink.endpoint, deep_stats_every=1) as monitor:
        train(model, opt, monitor, 1)
        job = monitor._deep_job
        assert job.busy
        began = time.monotonic()
        pid = os.fork()
        if pid == 0:  # the child: the helper is gone; a new job runs on a new one
            ran = []
            job.submit(lambda: ran.append(threading.current_thread().name))
            job.wait()
            os._exit(0 if ran == ["adamwatch-deep-stats"] else 1)
        forked_after = time.monotonic() - began
        assert not job.busy  # the fork waited for the block
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert forked_after >= 0.2


def test_a_signals_goodbye_waits_for_the_block_on_the_helper(sink, slow_blocks):
    """A SIGTERM's goodbye comes from another thread while the hooks stay: the deep step goes out first."""
    model, opt = make_run()
    monitor = adamwatch.watch(opt, endpoint=sink.endpoint, deep_stats_every=1, report_exits=False)
    try:
        train(model, opt, monitor, 1)
        assert monitor._deep_job.busy
        monitor._report_exit("preemption", signal="SIGTERM")  # what the SIGTERM handler calls
        sink.wait_for(lambda: sink.of_type(wire.MessageType.GOODBYE))
        order = [m.type for m in sink.messages if m.type in (wire.MessageType.STEP, wire.MessageType.GOODBYE)]
        assert order == [wire.MessageType.STEP, wire.MessageType.GOODBYE]
        assert len(sink.steps()[0]["deep"]) == 2
        assert sink.of_type(wire.MessageType.GOODBYE)[0]["signal"] == "SIGTERM"
    finally:
        monitor.close()


def test_the_fingerprint_is_computed_on_the_helper_with_the_same_value(sink, monkeypatch):
    """The replica fingerprint reads the weights and Adam's state like the deep block: on
    the helper too, even with deep statistics off, and the same value as in the hook."""
    from adamwatch import monitor as monitor_module

    threads: list[str] = []
    original = monitor_module.fingerprint

    def recording(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return original(*args, **kwargs)

    monkeypatch.setattr(monitor_module, "fingerprint", recording)
    steps = 6
    expected: list[int] = []
    for threaded in (False, True):
        model, opt = make_run()

        def after_step(i: int) -> None:  # the truth, computed here after the inline run's even steps
            if not threaded and i % 2 == 1:
                expected.append(int(original(opt, torch.device("cpu")).item()))

        with adamwatch.watch(opt, endpoint=sink.endpoint, deep_stats_every=0, fingerprint_every=2,
                             deep_stats_thread=threaded) as monitor:
            assert (monitor._deep_job is not None) is threaded
            train(model, opt, monitor, steps, after_step)
    sink.wait_for(lambda: len(sink.of_type(wire.MessageType.FINGERPRINT)) == 6)
    sent = [(m["step"], m["fingerprint"]) for m in sink.of_type(wire.MessageType.FINGERPRINT)]
    inline, helper = sent[:3], sent[3:]
    assert inline == list(zip([2, 4, 6], expected))
    assert helper == inline
    assert threads == ["MainThread"] * 3 + ["adamwatch-deep-stats"] * 3


@pytest.mark.parametrize("threaded", [True, False])
def test_a_failing_fingerprint_is_counted_and_its_step_still_arrives(sink, monkeypatch, threaded):
    from adamwatch import monitor as monitor_module

    def broken(*args, **kwargs):
        raise RuntimeError("fingerprint failed")

    monkeypatch.setattr(monitor_module, "fingerprint", broken)
    model, opt = make_run()
    with adamwatch.watch(opt, endpoint=sink.endpoint, deep_stats_every=2, fingerprint_every=2,
                         deep_stats_thread=threaded) as monitor:
        train(model, opt, monitor, 4)
    assert monitor.errors_by_where == {"fingerprint": 2}
    sink.wait_for(lambda: len(sink.steps()) == 4)
    steps = sink.steps()
    assert [s["step"] for s in steps] == [1, 2, 3, 4]
    assert sink.of_type(wire.MessageType.FINGERPRINT) == []
    assert [("deep" in s) for s in steps] == [False, True, False, True]  # the deep block is unaffected


def test_sharded_parameters_keep_the_blocks_in_the_hook(sink):
    """FSDP1 points its flat parameters at the unsharded storage during forward and backward:
    a helper reading them then would describe the whole tensor, not this rank's shard."""
    model, opt = make_run()
    for p in model.parameters():
        p._fsdp_flattened = True  # how adamwatch.shards recognises FSDP1's parameters
    with adamwatch.watch(opt, endpoint=sink.endpoint, deep_stats_every=2) as monitor:
        assert monitor._deep_job is None
        train(model, opt, monitor, 2)
    sink.wait_for(lambda: len(sink.steps()) == 2)
    assert "deep" in sink.steps()[1]
