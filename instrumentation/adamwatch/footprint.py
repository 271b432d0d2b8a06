"""Bytes of parameters and optimizer state by dtype, and device memory, off the step path.

Everything here reads tensor metadata (dtype, element count) and the CUDA caching
allocator's host-side counters: no kernel launch, no host-device synchronisation.
The Monitor's background thread calls :func:`footprint_payload` every
``footprint_interval`` seconds and sends it as a FOOTPRINT message.

    >>> p = torch.nn.Parameter(torch.zeros(10))
    >>> opt = torch.optim.Adam([p])
    >>> footprint_payload(opt, now=0.0)["param_bytes"]
    {'float32': 40}
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["bytes_by_dtype", "param_bytes", "optimizer_state_bytes", "device_memory", "footprint_payload"]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def bytes_by_dtype(tensors: Any) -> dict[str, int]:
    """Sum ``numel * element_size`` of each distinct tensor (by storage identity), keyed by dtype name."""
    out: dict[str, int] = {}
    seen: set[int] = set()
    for t in tensors:
        if not isinstance(t, torch.Tensor) or id(t) in seen:
            continue
        seen.add(id(t))
        name = _dtype_name(t.dtype)
        out[name] = out.get(name, 0) + t.numel() * t.element_size()
    return out


def param_bytes(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of the parameters the optimizer updates, on this rank, by dtype."""
    return bytes_by_dtype(p for group in optimizer.param_groups for p in group["params"])


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of the optimizer state (m, v, max v, step tensors) on this rank, by dtype.

    Empty before the first step (Adam creates its state lazily).
    """
    # Copied first: the training thread may add entries at its first step.
    states = list(optimizer.state.values())
    return bytes_by_dtype(v for state in states for v in list(state.values()))


def device_memory(device: torch.device) -> dict[str, int]:
    """Peak allocated and reserved bytes of a CUDA device; empty elsewhere.

    These are counters of the caching allocator kept on the host: reading them
    waits for nothing on the device.
    """
    if device.type != "cuda" or not torch.cuda.is_available():
        return {}
    return {
        "device_memory_peak_bytes": int(torch.cuda.max_memory_allocated(device)),
        "device_memory_reserved_bytes": int(torch.cuda.memory_reserved(device)),
    }


def _device(optimizer: torch.optim.Optimizer) -> torch.device:
    for group in optimizer.param_groups:
        for p in group["params"]:
            return p.device
    return torch.device("cpu")


def footprint_payload(optimizer: torch.optim.Optimizer, now: float) -> dict[str, Any]:
    """A FOOTPRINT payload (see ``wire.SCHEMAS``) for ``optimizer`` at unix time ``now``."""
    device = _device(optimizer)
    payload: dict[str, Any] = {
        "time": float(now),
        "param_bytes": param_bytes(optimizer),
        "optimizer_state_bytes": optimizer_state_bytes(optimizer),
        "device": device.type,
    }
    payload.update(device_memory(device))
    return payload
