"""Export FOOTPRINT messages: bytes of parameters and optimizer state by dtype, CUDA memory.

Runs as a RunState listener on the ingest loop thread. A dtype that disappears
from a later FOOTPRINT (a model cast to bfloat16) has its series removed.
"""

from __future__ import annotations

from typing import Any

from adamwatch import wire

from .run_state import RunState, TrainerKey

__all__ = ["FootprintExporter"]

_MAPS = (("param_bytes", "adamwatch_param_bytes"), ("optimizer_state_bytes", "adamwatch_optimizer_state_bytes"))
_DEVICE = (("device_memory_peak_bytes", "adamwatch_device_memory_peak_bytes"),
           ("device_memory_reserved_bytes", "adamwatch_device_memory_reserved_bytes"))


class FootprintExporter:
    """Listener that turns FOOTPRINT messages into byte gauges."""

    def __init__(self, state: RunState):
        self.state = state
        self._dtypes: dict[tuple[TrainerKey, str], set[str]] = {}

    def on_message(self, key: TrainerKey, message: wire.Message | None) -> None:
        if message is None or message.type is not wire.MessageType.FOOTPRINT:
            return
        p: dict[str, Any] = message.payload
        for field, name in _MAPS:
            values = p[field]
            old = self._dtypes.get((key, name), set())
            for dtype in old - set(values):
                self.state.remove_series(key, name, {"dtype": dtype})
            for dtype, n in values.items():
                self.state.set_gauge(key, name, {"dtype": dtype}, float(n))
            self._dtypes[(key, name)] = set(values)
        for field, name in _DEVICE:
            value = p.get(field)
            if value is None:
                self.state.remove_series(key, name, {})
            else:
                self.state.set_gauge(key, name, {}, float(value))

    def forget(self, keys: set[TrainerKey]) -> None:
        """Drop the state of trainers the run state no longer knows (expired)."""
        for k in [k for k in self._dtypes if k[0] not in keys]:
            del self._dtypes[k]
