"""Device → host transfer of summary vectors without waiting on the device.

The step path calls ``submit``: on CUDA it starts a non-blocking copy into a
pinned host buffer and records an event; on CPU the vector is already
computed. The background thread calls ``collect``, which waits on the event
(off the step path) and reads the values. A fixed pool of buffers bounds the
memory: when the reader falls behind, ``submit`` drops the summary and counts
it rather than waiting. The reader collects once per send pause; when half the
bound is in flight, ``submit`` calls ``on_backlog`` to have it collect now.
"""

from __future__ import annotations

import collections
import queue
from typing import Any, Callable

import torch

__all__ = ["SummaryTransfer"]


class SummaryTransfer:
    """A bounded, non-blocking pipe of summary vectors from the step path to a reader thread.

    Args:
        device: where the vectors are computed.
        max_length: longest vector (in elements) that will be submitted.
        dtype: element type of the vectors.
        capacity: pinned buffers in flight before summaries are dropped (CUDA).
        cpu_capacity: summaries in flight before they are dropped on the CPU,
            where each is a few small tensors rather than a preallocated
            buffer. The client sends every 100 ms: 1,024 covers steps down to
            0.1 ms.
    """

    def __init__(self, device: torch.device, max_length: int, dtype: torch.dtype, capacity: int = 64,
                 cpu_capacity: int = 1024):
        self.device = device
        self.capacity = capacity if device.type == "cuda" else cpu_capacity
        self.dropped = 0
        # Called after each accepted submit (the client thread's wake-up).
        self.on_submit: Callable[[], None] | None = None
        # Called when half the bound is in flight: the reader must collect now,
        # not at the end of its pause, or the next summaries are dropped.
        self.on_backlog: Callable[[], None] | None = None
        self._pending: "queue.SimpleQueue[tuple[Any, ...]]" = queue.SimpleQueue()
        self._async = device.type == "cuda"
        self._free: collections.deque[torch.Tensor] = collections.deque()
        # Each counter has a single writer (step thread / reader thread), so
        # their difference is race-free without a lock.
        self._submitted = 0
        self._collected = 0
        if self._async:
            # Pinned buffers are allocated up front: pinning inside the step
            # path could synchronise the device.
            for _ in range(capacity):
                self._free.append(torch.empty(max_length, dtype=dtype, pin_memory=True))

    def submit(self, vector: torch.Tensor, layout: Any) -> bool:
        """Hand a summary to the reader without waiting. Returns False if it was dropped."""
        if self._async:
            try:
                buffer = self._free.popleft()
            except IndexError:
                self.dropped += 1
                return False
            n = vector.numel()
            buffer[:n].copy_(vector, non_blocking=True)
            event = torch.cuda.Event()
            # The copy runs on the stream of the vector's device, which need not
            # be the current device.
            event.record(torch.cuda.current_stream(vector.device))
            self._pending.put((buffer, n, event, layout))
            if self.on_submit is not None:
                self.on_submit()
            if self.on_backlog is not None and len(self._free) == self.capacity // 2:
                self.on_backlog()
            return True
        if self._submitted - self._collected >= self.capacity:
            self.dropped += 1
            return False
        # CPU kernels run synchronously: the vector is final already.
        self._submitted += 1
        self._pending.put((vector, vector.numel(), None, layout))
        if self.on_submit is not None:
            self.on_submit()
        if self.on_backlog is not None and self._submitted - self._collected == self.capacity // 2:
            self.on_backlog()
        return True

    def wake(self) -> None:
        """Unblock a reader waiting in ``collect`` (used at shutdown)."""
        self._pending.put(None)

    def collect(self, timeout: float) -> list[tuple[list[float], Any]]:
        """Wait up to ``timeout`` for summaries; return every one that is ready, oldest first."""
        items = []
        try:
            first = self._pending.get(timeout=timeout) if timeout > 0 else self._pending.get_nowait()
        except queue.Empty:
            return items
        batch = [first]
        while True:
            try:
                batch.append(self._pending.get_nowait())
            except queue.Empty:
                break
        for item in batch:
            if item is None:
                continue
            buffer, n, event, layout = item
            if event is not None:
                event.synchronize()  # reader thread only: the trainer never waits here
                values = buffer[:n].tolist()
                self._free.append(buffer)
            else:
                values = buffer.tolist()
                self._collected += 1
            items.append((values, layout))
        return items

    @property
    def idle(self) -> bool:
        """Nothing submitted is still waiting to be collected."""
        return self._pending.empty()
