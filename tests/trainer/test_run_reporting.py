"""Trainer side of issue 11: observe_eval, exit reasons, footprint (items 1, 3, 6)."""

from __future__ import annotations

import signal

import pytest
import torch

import adamwatch
from adamwatch import wire
from adamwatch.evaluation import EvalRecorder
from adamwatch.exits import ExitReporter, classify_exception, classify_signal
from adamwatch.footprint import footprint_payload, optimizer_state_bytes, param_bytes

from .test_monitor import batch, make_model, make_optimizer
from .test_no_host_sync import HostReadCounter


def _train(model, opt, monitor, steps: int) -> None:
    for i in range(steps):
        x, y = batch(i)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        monitor.observe_loss(loss)
        opt.step()
        opt.zero_grad()


def test_observe_eval_sends_values_and_tensors_with_their_step(sink) -> None:
    model = make_model()
    opt = make_optimizer(model)
    with adamwatch.watch(opt, endpoint=sink.endpoint, job="j") as monitor:
        _train(model, opt, monitor, 3)
        monitor.observe_eval(loss=torch.tensor(1.5), accuracy=0.25)
        monitor.observe_eval(step=2, loss=float("nan"))
        sink.wait_for(lambda: len(sink.of_type(wire.MessageType.EVAL)) == 2)
    first, second = sink.of_type(wire.MessageType.EVAL)
    assert (first["step"], first["metrics"]) == (3, {"loss": 1.5, "accuracy": 0.25})
    assert second["step"] == 2 and second["metrics"]["loss"] != second["metrics"]["loss"]  # NaN travels


def test_observe_eval_reads_nothing_on_the_host() -> None:
    recorder = EvalRecorder()
    counter = HostReadCounter()
    value = torch.tensor([2.0]).sum()
    with counter.counting():
        recorder.observe(1, {"loss": value, "score": torch.tensor(3.0)}, now=0.0)
    assert counter.calls == []
    assert recorder.drain()[0]["metrics"] == {"loss": 2.0, "score": 3.0}


@pytest.mark.parametrize("metrics, error", [
    ({}, ValueError), ({"bad-name": 1.0}, ValueError), ({"loss": "low"}, TypeError),
    ({"loss": torch.ones(2)}, ValueError),
])
def test_observe_eval_rejects_bad_input_naming_it(metrics, error) -> None:
    model = make_model()
    with adamwatch.watch(make_optimizer(model), endpoint=None, report_exits=False) as monitor:
        with pytest.raises(error, match="observe_eval"):
            monitor.observe_eval(**metrics)


def test_evaluations_and_footprints_never_count_as_dropped_step_summaries(short_dir) -> None:
    model = make_model()
    with adamwatch.watch(make_optimizer(model), endpoint=f"unix://{short_dir}/missing.sock",
                         report_exits=False) as monitor:
        monitor.observe_eval(loss=1.0)
    # never connected: they waited, then left with the monitor; nothing counted as a dropped step summary
    assert monitor.dropped_total == 0


def test_evaluations_beyond_capacity_are_dropped_and_counted() -> None:
    recorder = EvalRecorder(capacity=2)
    for i in range(5):
        recorder.observe(i, {"loss": 1.0}, now=0.0)
    assert recorder.dropped == 3
    assert [p["step"] for p in recorder.drain()] == [0, 1]


def test_exit_classification() -> None:
    assert classify_exception(torch.OutOfMemoryError("x")) == ("oom", "OutOfMemoryError")
    assert classify_exception(RuntimeError("x")) == ("exception", "RuntimeError")
    assert classify_exception(KeyboardInterrupt()) == ("signal", "KeyboardInterrupt")
    assert classify_exception(SystemExit(0)) == ("clean", None)
    assert classify_exception(SystemExit(3)) == ("exception", "SystemExit")
    assert classify_signal(signal.SIGTERM) == ("preemption", "SIGTERM")
    assert classify_signal(signal.SIGHUP) == ("signal", "SIGHUP")


def test_a_with_block_reports_the_exception_in_goodbye(sink) -> None:
    model = make_model()
    opt = make_optimizer(model)
    with pytest.raises(torch.OutOfMemoryError):
        with adamwatch.watch(opt, endpoint=sink.endpoint, job="j") as monitor:
            _train(model, opt, monitor, 2)
            raise torch.OutOfMemoryError("CUDA out of memory")
    sink.wait_for(lambda: sink.of_type(wire.MessageType.GOODBYE))
    goodbye = sink.of_type(wire.MessageType.GOODBYE)[0]
    assert (goodbye["exit_reason"], goodbye["exception"]) == ("oom", "OutOfMemoryError")


def test_the_reporter_chains_the_previous_signal_handler_and_reports_once() -> None:
    reports, handled = [], []
    previous = signal.signal(signal.SIGHUP, lambda s, f: handled.append(s))
    try:
        reporter = ExitReporter(lambda reason, **kw: reports.append((reason, kw)))
        reporter.install()
        signal.raise_signal(signal.SIGHUP)
        signal.raise_signal(signal.SIGHUP)
        reporter.uninstall()
        assert reports == [("signal", {"exception": None, "signal": "SIGHUP"})]
        assert handled == [signal.SIGHUP, signal.SIGHUP]  # the user's handler still runs every time
        assert signal.getsignal(signal.SIGHUP) is not reporter._on_signal
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_close_uninstalls_the_hooks() -> None:
    import sys

    before = sys.excepthook
    model = make_model()
    monitor = adamwatch.watch(make_optimizer(model), endpoint=None)
    assert sys.excepthook is not before
    monitor.close()
    assert sys.excepthook is before


def test_footprint_counts_bytes_by_dtype() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2).to(torch.bfloat16))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, foreach=False)
    assert param_bytes(opt) == {"float32": (12 + 3) * 4, "bfloat16": (6 + 2) * 2}
    assert optimizer_state_bytes(opt) == {}  # lazy until the first step
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    # m and v in each param's dtype, plus a float32 step scalar per param
    assert optimizer_state_bytes(opt) == {"float32": 2 * 15 * 4 + 4 * 4, "bfloat16": 2 * 8 * 2}
    payload = footprint_payload(opt, now=5.0)
    assert "device_memory_peak_bytes" not in payload  # CPU
    wire.validate_payload(wire.MessageType.FOOTPRINT, payload)


def test_hello_announces_target_and_model_family(sink) -> None:
    model = make_model()
    with adamwatch.watch(make_optimizer(model), endpoint=sink.endpoint, target={"eval_loss": 1.6},
                         model_family="gpt2-small"):
        sink.wait_for(lambda: sink.of_type(wire.MessageType.HELLO))
    hello = sink.of_type(wire.MessageType.HELLO)[0]
    assert (hello["target"], hello["model_family"]) == ({"eval_loss": 1.6}, "gpt2-small")


@pytest.mark.parametrize("options, field", [
    ({"target": {"eval_loss": "x"}}, "target"), ({"target": {}}, "target"),
    ({"model_family": ""}, "model_family"), ({"footprint_interval": 0}, "footprint_interval"),
])
def test_bad_options_are_named(options, field) -> None:
    with pytest.raises(ValueError, match=field):
        adamwatch.watch(make_optimizer(make_model()), endpoint=None, **options)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_footprint_reports_device_memory_and_observe_eval_does_not_sync() -> None:
    model = torch.nn.Linear(64, 64).cuda()
    opt = torch.optim.AdamW(model.parameters(), fused=True)
    model(torch.randn(8, 64, device="cuda")).sum().backward()
    opt.step()
    payload = footprint_payload(opt, now=0.0)
    assert payload["device"] == "cuda"
    assert payload["device_memory_peak_bytes"] >= (64 * 64 + 64) * 4 * 3
    assert payload["device_memory_reserved_bytes"] >= payload["device_memory_peak_bytes"]
    recorder = EvalRecorder()
    counter = HostReadCounter()
    value = torch.randn(1024, device="cuda").square().mean()
    with counter.counting():
        recorder.observe(1, {"loss": value}, now=0.0)
    assert counter.calls == []
    assert recorder.drain()[0]["metrics"]["loss"] == pytest.approx(value.item())


@pytest.mark.parametrize("module", ["adamwatch.exits", "adamwatch.footprint", "adamwatch.evaluation"])
def test_docstring_examples(module: str) -> None:
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module))
    assert result.attempted > 0 and result.failed == 0
