"""adamwatch: watch every Adam/AdamW step of a PyTorch training job.

    import adamwatch
    monitor = adamwatch.watch(optimizer, scheduler=scheduler)   # endpoint from ADAMWATCH_ENDPOINT
    for batch in loader:
        loss = model(batch); loss.backward()
        monitor.observe_loss(loss)          # a tensor is fine: nothing waits for the device
        optimizer.step(); scheduler.step(); optimizer.zero_grad()
    monitor.close()

The torch-dependent parts load on first use (PEP 562), so ``adamwatch.wire``,
the contract shared with the sidecar, imports without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "watch": "adamwatch.monitor",
    "Monitor": "adamwatch.monitor",
    "MonitorConfig": "adamwatch.monitor",
    "Checkpointer": "adamwatch.checkpoint",
    "watch_local_grads": "adamwatch.comm_watch",
    "SpikeGuardConfig": "adamwatch.spike_guard",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'adamwatch' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
