"""What every framework callback shares: never kill the run, and the window's loss on the device."""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable, TypeVar

import torch

__all__ = ["AdapterBase", "WindowLoss", "guarded"]

log = logging.getLogger("adamwatch")

F = TypeVar("F", bound=Callable[..., Any])


def guarded(where: str) -> Callable[[F], F]:
    """Run a callback method so that a failure in it never reaches the framework's loop.

    The failure is counted on the adapter (``errors``), and on its monitor when
    there is one (``monitor.errors``: the number the sidecar sees); the first is
    logged with its traceback, later ones only counted.
    """

    def decorate(method: F) -> F:
        @functools.wraps(method)
        def run(self: "AdapterBase", *args: Any, **kwargs: Any) -> Any:
            try:
                return method(self, *args, **kwargs)
            except Exception:
                self._report_error(where)
                return None

        return run  # type: ignore[return-value]

    return decorate


class AdapterBase:
    """State shared by the adapters: the options for ``watch()``, the monitor, error counting.

    Args:
        **watch_options: passed to :func:`adamwatch.watch` as they are
            (``endpoint``, ``job``, ``checkpointer``, ``deep_stats_every``, ``guard``, ...).
    """

    #: names the adapter in ``adamwatch_monitor_errors_total{where="<framework> adapter: <event>"}``
    framework = "framework"

    def __init__(self, **watch_options: Any):
        for name in ("optimizer", "scheduler"):
            if name in watch_options:
                raise TypeError(f"{type(self).__name__}({name}=...): the adapter takes the {name} from the trainer")
        self.watch_options = watch_options
        self.monitor: Any = None
        self.errors = 0
        self._error_logged = False

    def _report_error(self, where: str) -> None:
        self.errors += 1
        monitor = self.monitor
        if monitor is not None and hasattr(monitor, "_report_error"):
            # Through the monitor: counted where the sidecar reads it, logged once there.
            try:
                # "<framework> adapter: <event>": a short, bounded label value.
                monitor._report_error(f"{self.framework} adapter: {where}")
                return
            except Exception:
                pass
        if not self._error_logged:
            self._error_logged = True
            log.exception("adamwatch: %s failed in %s; training continues unmonitored or partly monitored "
                          "(further errors are counted, not logged)", where, type(self).__qualname__)

    def _watch(self, optimizer: Any, scheduler: Any, model: Any = None) -> None:
        """Start the monitor; a failure leaves training running, unmonitored, and says why.

        The framework builds the optimizer inside its training loop, so a
        Checkpointer (which needs it) can be given as a factory:
        ``checkpointer=lambda model, optimizer, scheduler: adamwatch.Checkpointer(dir, model=model,
        optimizer=optimizer, scheduler=scheduler)``, called here with the torch objects.
        """
        import adamwatch
        from adamwatch.unwrap import unwrap_optimizer

        self._close()
        options = dict(self.watch_options)
        checkpointer = options.get("checkpointer")
        if callable(checkpointer) and not hasattr(checkpointer, "save"):
            options["checkpointer"] = checkpointer(model=model, optimizer=unwrap_optimizer(optimizer),
                                                   scheduler=scheduler)
        self.monitor = adamwatch.watch(optimizer, scheduler=scheduler, **options)

    def _close(self) -> None:
        monitor, self.monitor = self.monitor, None
        if monitor is not None:
            monitor.close()


class WindowLoss:
    """The loss of one optimizer step, summed on the device over its micro-batches.

    Frameworks backpropagate each micro-batch's loss divided by the number of
    micro-batches (or normalised by the window's token count), so the sum of
    what they backpropagate is the window's mean loss: the number they log.
    Nothing here reads the tensor on the host.
    """

    def __init__(self) -> None:
        self._sum: torch.Tensor | None = None

    def add(self, loss: Any) -> None:
        if not isinstance(loss, torch.Tensor):
            loss = torch.tensor(float(loss), dtype=torch.float32)
        value = loss.detach().to(torch.float32).reshape(())
        self._sum = value if self._sum is None else self._sum + value

    def take(self) -> torch.Tensor | None:
        """The window's loss (None when no micro-batch reported one), and start a new window."""
        value, self._sum = self._sum, None
        return value

    def reset(self) -> None:
        self._sum = None
