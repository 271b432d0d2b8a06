"""How a run ended: classify exceptions and signals into ``wire.EXIT_REASONS``.

| end | exit_reason | detail |
| --- | --- | --- |
| ``monitor.close()`` / leaving ``with watch(...)`` normally | clean | |
| ``torch.OutOfMemoryError`` (CUDA, MPS, ...) | oom | ``exception`` |
| any other uncaught exception | exception | ``exception`` (its type name) |
| SIGTERM (the scheduler preempts the pod) | preemption | ``signal`` |
| another fatal signal (SIGINT, SIGHUP, SIGQUIT) | signal | ``signal`` |
| the script ends without closing the Monitor (``atexit``) | clean | |

A trainer killed by SIGKILL or a segfault says nothing: the sidecar records it
as "vanished" when the connection closes without a GOODBYE.

:class:`ExitReporter` installs the hooks that see an end the user's code does
not: a chained ``sys.excepthook`` for an uncaught exception outside a ``with``
block, and chained handlers for SIGTERM/SIGINT/SIGHUP (main thread only). Each
reports once, then hands over to what was installed before, so the process
still dies (or the user's own handler still runs) exactly as without adamwatch.
An ``atexit`` hook reports a script that simply ends without closing its Monitor
as clean; so is ``sys.exit(code)`` outside a ``with`` block, whatever the
code, because Python hands SystemExit to no hook.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
import threading
from types import TracebackType
from typing import Any, Callable

import torch

__all__ = ["classify_exception", "classify_signal", "ExitReporter", "REPORTED_SIGNALS"]

# Signals whose default action ends the process and that a handler can catch.
REPORTED_SIGNALS: tuple[str, ...] = ("SIGTERM", "SIGINT", "SIGHUP")

_OOM_TYPES: tuple[type, ...] = tuple(
    t for t in (getattr(torch, "OutOfMemoryError", None), getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None))
    if isinstance(t, type)
)


def classify_exception(exc: BaseException | None) -> tuple[str, str | None]:
    """The exit reason and exception type name for an exception that ended the run.

    Args:
        exc: the exception, or None for a normal end.

    Returns:
        ``("clean", None)``, ``("oom", "OutOfMemoryError")``, ``("signal", None)``
        for KeyboardInterrupt (SIGINT), or ``("exception", "<TypeName>")``.

        >>> classify_exception(None)
        ('clean', None)
        >>> classify_exception(torch.OutOfMemoryError("CUDA out of memory"))
        ('oom', 'OutOfMemoryError')
        >>> classify_exception(ValueError("bad batch"))
        ('exception', 'ValueError')
    """
    if exc is None:
        return "clean", None
    name = type(exc).__name__
    if _OOM_TYPES and isinstance(exc, _OOM_TYPES):
        return "oom", name
    if isinstance(exc, KeyboardInterrupt):
        return "signal", name
    if isinstance(exc, SystemExit):
        # sys.exit(0) is a normal end; any other code is a failure the script chose.
        return ("clean", None) if exc.code in (None, 0) else ("exception", name)
    return "exception", name


def classify_signal(signum: int) -> tuple[str, str]:
    """``("preemption", "SIGTERM")`` for SIGTERM, ``("signal", name)`` for the others."""
    name = signal.Signals(signum).name
    return ("preemption" if name == "SIGTERM" else "signal"), name


Report = Callable[..., None]  # report(exit_reason, *, exception=None, signal=None)


class ExitReporter:
    """Reports the end of a run through ``report`` from the hooks a script does not call.

    Args:
        report: ``report(exit_reason, exception=..., signal=...)``; called at most once.
        signals: signal names to chain handlers for (only from the main thread).
    """

    def __init__(self, report: Report, signals: tuple[str, ...] = REPORTED_SIGNALS):
        self._report = report
        self._lock = threading.Lock()
        self._done = False
        self._previous_hook: Any = None
        self._previous_signals: dict[int, Any] = {}
        self._signals = signals

    def install(self) -> None:
        """Chain ``sys.excepthook`` and the signal handlers (signals only on the main thread); register atexit."""
        self._previous_hook = sys.excepthook
        sys.excepthook = self._excepthook
        atexit.register(self._atexit)
        if threading.current_thread() is not threading.main_thread():
            return
        for name in self._signals:
            signum = getattr(signal, name, None)
            if signum is None:
                continue
            try:
                previous = signal.getsignal(signum)
                if previous is signal.SIG_IGN or previous is None:
                    # ignored: it does not end the run; None: a handler installed
                    # outside Python, which we could not put back
                    continue
                signal.signal(signum, self._on_signal)
                self._previous_signals[signum] = previous
            except (ValueError, OSError):
                continue

    def uninstall(self) -> None:
        """Put back what :meth:`install` replaced, where nobody replaced ours since."""
        if sys.excepthook == self._excepthook:
            sys.excepthook = self._previous_hook
        atexit.unregister(self._atexit)
        if threading.current_thread() is threading.main_thread():
            for signum, previous in self._previous_signals.items():
                try:
                    if signal.getsignal(signum) == self._on_signal:
                        signal.signal(signum, previous)
                except (ValueError, OSError):
                    pass
        self._previous_signals = {}

    def disarm(self) -> None:
        """Report nothing from now on (the run reported its end itself)."""
        with self._lock:
            self._done = True

    def report(self, exit_reason: str, *, exception: str | None = None, signal_name: str | None = None) -> bool:
        """Report once; later calls (the hook after a ``with`` block reported) are ignored."""
        with self._lock:
            if self._done:
                return False
            self._done = True
        try:
            self._report(exit_reason, exception=exception, signal=signal_name)
        except Exception:
            pass  # the run is ending anyway; never mask the user's error
        return True

    # ------------------------------------------------------------------ hooks
    def _atexit(self) -> None:
        # Runs after sys.excepthook (which reported already) and while the
        # client's daemon thread is still alive, so the goodbye can go out.
        self.report("clean")

    def _excepthook(self, exc_type: type, exc: BaseException, tb: TracebackType | None) -> None:
        reason, name = classify_exception(exc)
        self.report(reason, exception=name)
        hook = self._previous_hook or sys.__excepthook__
        hook(exc_type, exc, tb)

    def _on_signal(self, signum: int, frame: Any) -> None:
        reason, name = classify_signal(signum)
        previous = self._previous_signals.get(signum, signal.SIG_DFL)
        if callable(previous) and previous not in (signal.default_int_handler,):
            # The script handles this signal itself (e.g. saves and exits on
            # SIGTERM): report, and let it decide; its own exit follows.
            self.report(reason, signal_name=name)
            previous(signum, frame)
            return
        self.report(reason, signal_name=name)
        if previous is signal.default_int_handler:
            previous(signum, frame)  # raises KeyboardInterrupt as Python would
            return
        # SIG_DFL: die of the same signal, so the exit status stays what the
        # scheduler expects (128 + signum).
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
