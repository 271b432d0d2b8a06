"""``monitor.observe_eval(loss=..., accuracy=...)``: evaluation results without a host sync.

Values may be Python numbers or tensors (a validation loss still on the GPU).
Tensors are stacked into one small vector and copied to the host with a
non-blocking copy and an event, exactly like step summaries; the Monitor's
background thread waits for the event and sends one EVAL message per call,
tagged with the optimizer step the evaluation belongs to.

    >>> recorder = EvalRecorder()
    >>> recorder.observe(7, {"loss": torch.tensor(1.25), "accuracy": 0.5}, now=1.0)
    >>> recorder.drain()
    [{'step': 7, 'time': 1.0, 'metrics': {'loss': 1.25, 'accuracy': 0.5}}]
"""

from __future__ import annotations

import queue
import re
from typing import Any

import torch

from adamwatch import wire

__all__ = ["EvalRecorder", "validate_eval_metrics"]

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


def validate_eval_metrics(metrics: dict[str, Any]) -> None:
    """Check names and value types; raises ValueError/TypeError naming the bad metric."""
    if not metrics:
        raise ValueError("observe_eval: give at least one metric, e.g. observe_eval(loss=val_loss)")
    if len(metrics) > wire.MAX_EVAL_METRICS:
        raise ValueError(f"observe_eval: {len(metrics)} metrics, at most {wire.MAX_EVAL_METRICS} per call")
    for name, value in metrics.items():
        if not _NAME.match(name):
            raise ValueError(f"observe_eval: metric name {name!r} must match {_NAME.pattern}")
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ValueError(f"observe_eval: {name} must be a scalar tensor, got shape {tuple(value.shape)}")
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"observe_eval: {name} must be a number or a scalar tensor, got {type(value).__name__}")


class EvalRecorder:
    """A queue of evaluation results from the training thread to the background thread.

    Args:
        capacity: evaluations waiting to be sent before new ones are dropped (and counted).
    """

    def __init__(self, capacity: int = 256):
        self.capacity = capacity
        self.dropped = 0
        self._pending: "queue.SimpleQueue[tuple[Any, ...]]" = queue.SimpleQueue()
        self._queued = 0  # written by the training thread
        self._sent = 0  # written by the background thread

    def observe(self, step: int, metrics: dict[str, Any], now: float) -> None:
        """Record one evaluation; never waits on the device. Call :func:`validate_eval_metrics` first."""
        if self._queued - self._sent >= self.capacity:
            self.dropped += 1
            return
        plain = {k: float(v) for k, v in metrics.items() if not isinstance(v, torch.Tensor)}
        names = [k for k, v in metrics.items() if isinstance(v, torch.Tensor)]
        vector = event = None
        if names:
            stacked = torch.stack([metrics[k].detach().reshape(()).to(torch.float64) for k in names])
            if stacked.device.type == "cuda":
                host = torch.empty(stacked.shape, dtype=stacked.dtype, pin_memory=True)
                host.copy_(stacked, non_blocking=True)
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(stacked.device))
                vector = host
            else:
                vector = stacked
        self._queued += 1
        self._pending.put((int(step), float(now), list(metrics), plain, names, vector, event))

    def discard(self) -> None:
        """Drop every recorded evaluation (the sidecar is unreachable), counting them."""
        while True:
            try:
                self._pending.get_nowait()
            except queue.Empty:
                return
            self._sent += 1
            self.dropped += 1

    def drain(self) -> list[dict[str, Any]]:
        """EVAL payloads of every recorded evaluation (background thread: may wait on copies)."""
        out = []
        while True:
            try:
                step, now, order, plain, names, vector, event = self._pending.get_nowait()
            except queue.Empty:
                return out
            self._sent += 1
            values = dict(plain)
            if vector is not None:
                if event is not None:
                    event.synchronize()  # background thread only
                values.update(zip(names, vector.tolist()))
            # NaN/Inf travel as such: a non-finite validation loss is news.
            out.append({"step": step, "time": now, "metrics": {k: values[k] for k in order}})
