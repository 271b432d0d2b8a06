"""The step path never reads a tensor on the host.

On CUDA a host read of a device tensor is a synchronisation that stalls the
GPU pipeline. We cannot see CUDA syncs on a CPU machine, but every such read
goes through one of a few Tensor methods: patch them for the duration of
``optimizer.step()`` and count calls made on the training thread. torch's own
for-loop Adam reads its step counter on the host, so the claim is: a watched
step makes exactly as many host reads as a bare one.
"""

from __future__ import annotations

import contextlib
import sys
import threading

import pytest
import torch

import adamwatch
from adamwatch import wire

from .test_monitor import IMPLEMENTATIONS, batch, make_model, make_optimizer

HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__", "__format__")


class HostReadCounter:
    def __init__(self):
        self.calls: list[str] = []
        # The deep block's quantiles view their CPU sample as a numpy array (an
        # in-place numpy sort): CPU memory, no device to wait on, and only taken
        # when the statistics live on the CPU (on CUDA it is torch.sort).
        # Counted apart, and only when the tensor is on the CPU.
        self.cpu_selection_views = 0
        self.thread = threading.current_thread()

    @contextlib.contextmanager
    def counting(self):
        originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

        def wrap(name, fn):
            def counted(*args, **kwargs):
                if threading.current_thread() is self.thread:
                    caller = sys._getframe(1).f_code
                    if (name == "numpy" and caller.co_name == "_quantiles" and caller.co_filename.endswith("step_stats.py")
                            and args[0].device.type == "cpu"):
                        self.cpu_selection_views += 1
                    else:
                        self.calls.append(name)
                return fn(*args, **kwargs)

            return counted

        for name, fn in originals.items():
            setattr(torch.Tensor, name, wrap(name, fn))
        try:
            yield self
        finally:
            for name, fn in originals.items():
                setattr(torch.Tensor, name, fn)


def count_step_reads(opt, model, monitor=None, seed=0) -> list[str]:
    x, y = batch(seed)
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    if monitor is not None:
        monitor.observe_loss(loss)
    counter = HostReadCounter()
    with counter.counting():
        opt.step()
    opt.zero_grad()
    return counter.calls


def test_the_counter_sees_host_reads():
    """Guard against a counter that cannot fail."""
    counter = HostReadCounter()
    with counter.counting():
        torch.ones(2).sum().item()
        bool(torch.ones(()))
        f"{torch.ones(())}"
    assert counter.calls[:2] == ["item", "__bool__"] and "__format__" in counter.calls


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_a_watched_step_adds_no_host_reads(sink, impl):
    bare_model, model = make_model(), make_model()
    bare_opt, opt = make_optimizer(bare_model, "AdamW", impl), make_optimizer(model, "AdamW", impl)
    # Adam creates its state on the first step; compare steady-state steps.
    count_step_reads(bare_opt, bare_model)
    with adamwatch.watch(opt, endpoint=sink.endpoint, deep_stats_every=1, fingerprint_every=1) as monitor:
        count_step_reads(opt, model, monitor)
        for seed in range(1, 4):
            bare = count_step_reads(bare_opt, bare_model, seed=seed)
            watched = count_step_reads(opt, model, monitor, seed=seed)
            assert watched == bare, f"watched step made extra host reads: {watched} vs {bare}"
    sink.wait_for(lambda: len(sink.steps()) == 4)
    assert all("deep" in s for s in sink.steps())  # the deep path ran inside the counted steps
    assert len(sink.of_type(wire.MessageType.FINGERPRINT)) == 4  # and the replica fingerprint


def test_the_fused_guard_skips_without_host_reads(sink):
    model = make_model()
    opt = make_optimizer(model, "AdamW", "fused")
    with adamwatch.watch(opt, endpoint=sink.endpoint, deep_stats_every=1) as monitor:
        count_step_reads(opt, model, monitor)
        x, y = batch(1)
        (torch.nn.functional.mse_loss(model(x), y) * float("nan")).backward()
        counter = HostReadCounter()
        with counter.counting():
            opt.step()
        assert counter.calls == []
    sink.wait_for(lambda: len(sink.steps()) == 2)
    assert sink.steps()[1]["skipped"] is True
