"""One job at a time on a helper thread, for work the step path need not wait for now.

On the CPU the Adam-state block (``StepStats.prepare_deep``) is ~40 tensor
ops: computed in the post-step hook they lengthen the step by their whole
duration, while the next forward and backward (which never touch Adam's
state) leave a core idle when torch runs on fewer threads than there are
cores. ``BackgroundJob`` runs the block there instead; the next optimizer
step waits for it (``wait``) before it updates the state the block reads.
On a GPU nothing needs this: the kernels are already asynchronous.

The trainer submits at most one job and waits for it before the next one,
so ``wait`` on the step path is one attribute read when the job is done,
which it is unless steps are shorter than the job.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from typing import Callable

import torch

__all__ = ["BackgroundJob"]


class BackgroundJob:
    """A daemon thread that runs one submitted function at a time.

    Args:
        name: the thread's name (seen in ``py-spy`` and thread dumps).
        on_error: called with ``where`` when a job raises (the job is expected
            to handle its own failures; this is the last resort).
    """

    def __init__(self, name: str, on_error: Callable[[str], None]):
        self._name = name
        self._on_error = on_error
        self._start = threading.Event()
        self._done = threading.Event()
        self._job: Callable[[], None] | None = None
        self._pending = False  # written by the submitting thread only
        self._thread: threading.Thread | None = None
        self._closed = False
        # CPU seconds the jobs took on the helper thread (benchmarks report it).
        self.cpu_seconds = 0.0
        self.jobs = 0
        # A fork (a DataLoader's workers, multiprocessing) copies only the forking
        # thread: let the job in flight finish first, so no lock it holds inside
        # torch is copied held, and start a fresh helper in the child if it uses one.
        _JOBS.add(self)

    def submit(self, job: Callable[[], None]) -> bool:
        """Start ``job`` on the helper thread; False (nothing started) once closed."""
        self.wait()
        if self._closed:
            return False
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()
        self._done.clear()
        self._job = job
        self._pending = True
        self._start.set()
        return True

    def wait(self) -> None:
        """Return once the submitted job (if any) has finished."""
        if self._pending:
            self._done.wait()
            self._pending = False

    def settle(self, timeout: float) -> bool:
        """From any thread: wait up to ``timeout`` for the job in flight; True when none is.

        (``wait`` is the submitting thread's: it also clears the submission.)
        """
        return not self._pending or self._done.wait(timeout)

    @property
    def busy(self) -> bool:
        """A job was submitted and has not finished yet."""
        return self._pending and not self._done.is_set()

    def close(self) -> None:
        """Wait for the job in flight, then let the thread end."""
        self.wait()
        self._closed = True
        if self._thread is not None:
            self._start.set()  # wakes the thread with no job: it returns
            self._thread.join(1.0)

    def _run(self) -> None:
        clock = time.thread_time
        while True:
            self._start.wait()
            self._start.clear()
            job, self._job = self._job, None
            if job is None:
                if self._closed:
                    return
                continue
            began = clock()
            try:
                # Grad mode is per thread, and a new thread starts with it on.
                with torch.no_grad():
                    job()
            except Exception:
                self._on_error("background_job")
            finally:
                self.cpu_seconds += clock() - began
                self.jobs += 1
                self._done.set()


# How long a fork waits for the job in flight (a block takes milliseconds; never hang a fork).
_FORK_WAIT_SECONDS = 10.0
# Every live job, for the fork hooks (registered once: they cannot be unregistered).
_JOBS: "weakref.WeakSet[BackgroundJob]" = weakref.WeakSet()


def _before_fork() -> None:
    for job in list(_JOBS):
        job.settle(_FORK_WAIT_SECONDS)


def _after_fork_in_child() -> None:
    for job in list(_JOBS):
        # The helper thread does not exist here: the next submit starts one.
        job._thread = None
        job._pending = False
        job._job = None
        job._start = threading.Event()
        job._done = threading.Event()


os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
