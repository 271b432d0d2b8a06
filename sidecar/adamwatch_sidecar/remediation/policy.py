"""The ``remediation:`` section of the sidecar config: schema, defaults, validation.

Every error names the field it is about, as a path from the top of the sidecar
config, so ``adamwatch-sidecar --config`` can exit with a message like::

    remediation.ladders.loss_spike[1].cooldown_seconds: must be >= 0, got -5

    >>> cfg = parse_remediation_config({"dry_run": True, "detectors": {"loss_spike": {"k": 4}}})
    >>> cfg.dry_run, cfg.detectors.loss_spike.k, cfg.ladders["loss_spike"][0].action
    (True, 4.0, 'reduce_lr')

Missing keys take the defaults of :data:`DEFAULT_POLICY`; a ladder given in the
YAML replaces the default ladder of that name as a whole; unknown keys are errors.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

__all__ = [
    "ACTIONS",
    "COMMAND_ACTIONS",
    "DETECTOR_NAMES",
    "TRACING_EXPORTERS",
    "DEFAULT_POLICY",
    "PolicyError",
    "SpikeParams",
    "NonFiniteParams",
    "StallParams",
    "SpikeGuardStreakParams",
    "DetectorParams",
    "Rung",
    "AuditParams",
    "TracingParams",
    "RemediationConfig",
    "parse_remediation_config",
    "default_policy_copy",
]

# Rung actions. The first three travel to the trainer as COMMANDs; "escalate"
# is done by the sidecar itself (exhausted gauge, optionally a "stop" COMMAND).
ACTIONS: tuple[str, ...] = ("reduce_lr", "restore_checkpoint", "stop", "escalate")
COMMAND_ACTIONS: tuple[str, ...] = ("reduce_lr", "restore_checkpoint", "stop")
DETECTOR_NAMES: tuple[str, ...] = ("non_finite", "loss_spike", "grad_norm_spike", "stall", "spike_guard")
TRACING_EXPORTERS: tuple[str, ...] = ("none", "console", "otlp-http")

_HOUR = 3600.0

# The default policy, in the same shape as the YAML. The README's reference
# example is this mapping; a test keeps the two equal.
DEFAULT_POLICY: dict[str, Any] = {
    "enabled": True,
    "dry_run": False,
    "ack_timeout_seconds": 120.0,
    "detectors": {
        # The trainer's guard already skips each non-finite step; the sidecar
        # only steps in when they keep coming.
        "non_finite": {"enabled": True, "consecutive_steps": 3, "ignore_grad_scaler_skips": True},
        # OLMo-core and Levanter flag a loss 6 sigma above its last 128 values.
        "loss_spike": {"enabled": True, "k": 6.0, "window": 128, "min_samples": 32, "min_std_ratio": 0.01},
        "grad_norm_spike": {"enabled": True, "k": 6.0, "window": 128, "min_samples": 32, "min_std_ratio": 0.01},
        "stall": {"enabled": True, "timeout_seconds": 300.0},
        # The trainer's spike guard (watch(spike_guard=...)) handles single spikes
        # inside the step; a streak of activations means it is fighting a trend.
        "spike_guard": {"enabled": True, "consecutive_steps": 10},
    },
    "ladders": {
        "non_finite": [
            {"action": "restore_checkpoint", "cooldown_steps": 10, "max_per_window": 2, "window_seconds": _HOUR},
            {"action": "escalate"},
        ],
        "loss_spike": [
            {"action": "reduce_lr", "factor": 0.5, "cooldown_steps": 10, "max_per_window": 2, "window_seconds": _HOUR},
            {"action": "restore_checkpoint", "cooldown_steps": 10, "max_per_window": 1, "window_seconds": _HOUR},
            {"action": "escalate"},
        ],
        "grad_norm_spike": [
            {"action": "reduce_lr", "factor": 0.5, "cooldown_steps": 10, "max_per_window": 2, "window_seconds": _HOUR},
            {"action": "escalate"},
        ],
        "stall": [{"action": "escalate"}],
        "spike_guard": [
            {"action": "reduce_lr", "factor": 0.5, "cooldown_steps": 20, "max_per_window": 2, "window_seconds": _HOUR},
            {"action": "restore_checkpoint", "cooldown_steps": 10, "max_per_window": 1, "window_seconds": _HOUR},
            {"action": "escalate"},
        ],
    },
    "escalate": {"stop_training": False},
    # Alerts routed to the sidecar's webhook (label adamwatch_remediate="true").
    # AdamwatchNonFiniteStep is left out on purpose: it fires on a single step
    # the trainer's guard already skipped; the non_finite detector acts on streaks.
    "alert_actions": {"AdamwatchLossSpike": "loss_spike", "AdamwatchGradNormExplosion": "grad_norm_spike"},
    "audit": {"path": None, "fsync": False},
    "tracing": {"exporter": "none", "endpoint": None, "service_name": "adamwatch-sidecar"},
}


class PolicyError(ValueError):
    """A bad value in the remediation policy; the message starts with the field path."""

    def __init__(self, path: str, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


@dataclass(frozen=True)
class SpikeParams:
    """A rolling-window spike detector: fires when value > mean + k * max(std, min_std_ratio * |mean|)."""

    enabled: bool = True
    k: float = 6.0
    window: int = 128
    min_samples: int = 32
    min_std_ratio: float = 0.01


@dataclass(frozen=True)
class NonFiniteParams:
    """Fires when ``consecutive_steps`` steps in a row report a NaN/Inf loss or gradient."""

    enabled: bool = True
    consecutive_steps: int = 3
    ignore_grad_scaler_skips: bool = True


@dataclass(frozen=True)
class StallParams:
    """Fires when a connected trainer that has stepped reports no step for ``timeout_seconds``."""

    enabled: bool = True
    timeout_seconds: float = 300.0


@dataclass(frozen=True)
class SpikeGuardStreakParams:
    """Fires when the trainer's spike guard acted on ``consecutive_steps`` steps in a row."""

    enabled: bool = True
    consecutive_steps: int = 10


@dataclass(frozen=True)
class DetectorParams:
    """Parameters of the detectors."""

    non_finite: NonFiniteParams = field(default_factory=NonFiniteParams)
    loss_spike: SpikeParams = field(default_factory=SpikeParams)
    grad_norm_spike: SpikeParams = field(default_factory=SpikeParams)
    stall: StallParams = field(default_factory=StallParams)
    spike_guard: SpikeGuardStreakParams = field(default_factory=SpikeGuardStreakParams)


@dataclass(frozen=True)
class Rung:
    """One rung of a ladder.

    Args:
        action: one of :data:`ACTIONS`.
        factor: learning-rate multiplier for ``reduce_lr`` (0 < factor < 1).
        cooldown_steps: after this rung acts, the ladder takes no further action
            for this many steps of the job...
        cooldown_seconds: ...and this many seconds (both must pass).
        max_per_window: how often this rung may act within ``window_seconds``.
        window_seconds: the sliding window for ``max_per_window``.
    """

    action: str
    factor: float | None = None
    cooldown_steps: int = 0
    cooldown_seconds: float = 0.0
    max_per_window: int = 1
    window_seconds: float = _HOUR


@dataclass(frozen=True)
class AuditParams:
    """Where the JSONL audit log goes (``path: null`` keeps it in memory only)."""

    path: str | None = None
    fsync: bool = False


@dataclass(frozen=True)
class TracingParams:
    """OpenTelemetry exporter for the one-span-per-action traces."""

    exporter: str = "none"
    endpoint: str | None = None
    service_name: str = "adamwatch-sidecar"


@dataclass(frozen=True)
class RemediationConfig:
    """The validated ``remediation:`` section. Build it with :func:`parse_remediation_config`."""

    enabled: bool = True
    dry_run: bool = False
    ack_timeout_seconds: float = 120.0
    detectors: DetectorParams = field(default_factory=DetectorParams)
    ladders: Mapping[str, tuple[Rung, ...]] = field(default_factory=dict)
    stop_training: bool = False
    alert_actions: Mapping[str, str] = field(default_factory=dict)
    audit: AuditParams = field(default_factory=AuditParams)
    tracing: TracingParams = field(default_factory=TracingParams)


# ---------------------------------------------------------------------- checks
def _mapping(value: Any, path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise PolicyError(path, f"must be a mapping, got {_kind(value)}")
    for key in value:
        if not isinstance(key, str):
            raise PolicyError(path, f"keys must be strings, got {key!r}")
    return value


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _no_unknown(value: Mapping[str, Any], allowed: Mapping[str, Any] | tuple[str, ...], path: str) -> None:
    for key in value:
        if key not in allowed:
            raise PolicyError(f"{path}.{key}", f"unknown key (known: {', '.join(sorted(allowed))})")


def _bool(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise PolicyError(path, f"must be true or false, got {value!r}")
    return value


def _number(value: Any, path: str, *, minimum: float | None = None, above: float | None = None,
            below: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise PolicyError(path, f"must be a finite number, got {value!r}")
    if minimum is not None and value < minimum:
        raise PolicyError(path, f"must be >= {minimum:g}, got {value!r}")
    if above is not None and value <= above:
        raise PolicyError(path, f"must be > {above:g}, got {value!r}")
    if below is not None and value >= below:
        raise PolicyError(path, f"must be < {below:g}, got {value!r}")
    return float(value)


def _int(value: Any, path: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise PolicyError(path, f"must be an integer, got {value!r}")
    if value < minimum:
        raise PolicyError(path, f"must be >= {minimum}, got {value!r}")
    return value


def _optional_str(value: Any, path: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise PolicyError(path, f"must be a non-empty string or null, got {value!r}")
    return value


def _merged(defaults: Mapping[str, Any], raw: Any, path: str) -> dict[str, Any]:
    """Defaults overlaid with the user's keys, after rejecting unknown keys."""
    if raw is None:
        return dict(defaults)
    raw = _mapping(raw, path)
    _no_unknown(raw, defaults, path)
    out = dict(defaults)
    out.update(raw)
    return out


# ---------------------------------------------------------------------- sections
def _spike(raw: Any, defaults: Mapping[str, Any], path: str) -> SpikeParams:
    v = _merged(defaults, raw, path)
    window = _int(v["window"], f"{path}.window", minimum=2)
    min_samples = _int(v["min_samples"], f"{path}.min_samples", minimum=2)
    if min_samples > window:
        raise PolicyError(f"{path}.min_samples", f"must be <= window ({window}), got {min_samples}")
    return SpikeParams(
        enabled=_bool(v["enabled"], f"{path}.enabled"),
        k=_number(v["k"], f"{path}.k", above=0),
        window=window,
        min_samples=min_samples,
        min_std_ratio=_number(v["min_std_ratio"], f"{path}.min_std_ratio", minimum=0),
    )


def _detectors(raw: Any, path: str) -> DetectorParams:
    defaults = DEFAULT_POLICY["detectors"]
    raw = _mapping(raw, path) if raw is not None else {}
    _no_unknown(raw, defaults, path)
    nf = _merged(defaults["non_finite"], raw.get("non_finite"), f"{path}.non_finite")
    st = _merged(defaults["stall"], raw.get("stall"), f"{path}.stall")
    sg = _merged(defaults["spike_guard"], raw.get("spike_guard"), f"{path}.spike_guard")
    return DetectorParams(
        non_finite=NonFiniteParams(
            enabled=_bool(nf["enabled"], f"{path}.non_finite.enabled"),
            consecutive_steps=_int(nf["consecutive_steps"], f"{path}.non_finite.consecutive_steps", minimum=1),
            ignore_grad_scaler_skips=_bool(nf["ignore_grad_scaler_skips"],
                                           f"{path}.non_finite.ignore_grad_scaler_skips"),
        ),
        loss_spike=_spike(raw.get("loss_spike"), defaults["loss_spike"], f"{path}.loss_spike"),
        grad_norm_spike=_spike(raw.get("grad_norm_spike"), defaults["grad_norm_spike"], f"{path}.grad_norm_spike"),
        stall=StallParams(
            enabled=_bool(st["enabled"], f"{path}.stall.enabled"),
            timeout_seconds=_number(st["timeout_seconds"], f"{path}.stall.timeout_seconds", above=0),
        ),
        spike_guard=SpikeGuardStreakParams(
            enabled=_bool(sg["enabled"], f"{path}.spike_guard.enabled"),
            consecutive_steps=_int(sg["consecutive_steps"], f"{path}.spike_guard.consecutive_steps", minimum=1),
        ),
    )


_RUNG_KEYS = ("action", "factor", "cooldown_steps", "cooldown_seconds", "max_per_window", "window_seconds")


def _rung(raw: Any, path: str) -> Rung:
    raw = _mapping(raw, path)
    _no_unknown(raw, _RUNG_KEYS, path)
    if "action" not in raw:
        raise PolicyError(f"{path}.action", f"is required (one of {', '.join(ACTIONS)})")
    action = raw["action"]
    if action not in ACTIONS:
        raise PolicyError(f"{path}.action", f"must be one of {', '.join(ACTIONS)}, got {action!r}")
    factor = None
    if action == "reduce_lr":
        factor = _number(raw.get("factor", 0.5), f"{path}.factor", above=0, below=1)
    elif "factor" in raw:
        raise PolicyError(f"{path}.factor", f"only applies to action reduce_lr, not {action}")
    return Rung(
        action=action,
        factor=factor,
        cooldown_steps=_int(raw.get("cooldown_steps", 0), f"{path}.cooldown_steps", minimum=0),
        cooldown_seconds=_number(raw.get("cooldown_seconds", 0.0), f"{path}.cooldown_seconds", minimum=0),
        max_per_window=_int(raw.get("max_per_window", 1), f"{path}.max_per_window", minimum=1),
        window_seconds=_number(raw.get("window_seconds", _HOUR), f"{path}.window_seconds", above=0),
    )


_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _ladders(raw: Any, path: str) -> dict[str, tuple[Rung, ...]]:
    merged: dict[str, Any] = dict(DEFAULT_POLICY["ladders"])
    if raw is not None:
        merged.update(_mapping(raw, path))
    out: dict[str, tuple[Rung, ...]] = {}
    for name, rungs in merged.items():
        lpath = f"{path}.{name}"
        if not _NAME.match(name):
            raise PolicyError(lpath, "ladder names must be identifiers (letters, digits, _)")
        if not isinstance(rungs, list) or not rungs:
            raise PolicyError(lpath, f"must be a non-empty list of rungs, got {rungs!r}")
        parsed = tuple(_rung(r, f"{lpath}[{i}]") for i, r in enumerate(rungs))
        for i, rung in enumerate(parsed[:-1]):
            if rung.action == "escalate":
                raise PolicyError(f"{lpath}[{i}].action", "escalate must be the last rung")
        out[name] = parsed
    return out


def _alert_actions(raw: Any, ladders: Mapping[str, Any], path: str) -> dict[str, str]:
    if raw is None:
        return {}
    raw = _mapping(raw, path)
    out = {}
    for alertname, target in raw.items():
        apath = f"{path}.{alertname}"
        if isinstance(target, Mapping):
            _no_unknown(target, ("ladder",), apath)
            apath, target = f"{apath}.ladder", target.get("ladder")
        if not isinstance(target, str) or target not in ladders:
            raise PolicyError(apath, f"must name a ladder ({', '.join(sorted(ladders))}), got {target!r}")
        out[alertname] = target
    return out


def _otlp_installed() -> bool:
    # Looks for the package without importing the exporter: it is imported
    # only when the sidecar builds its tracer.
    import importlib.util

    try:
        return importlib.util.find_spec("opentelemetry.exporter.otlp.proto.http") is not None
    except ImportError:
        return False


def parse_remediation_config(raw: Mapping[str, Any] | None, path: str = "remediation") -> RemediationConfig:
    """Validate the ``remediation:`` mapping of the sidecar config and fill in defaults.

    Args:
        raw: the parsed YAML mapping, or None for the default policy.
        path: the field path of ``raw`` in the sidecar config, used in error messages.

    Returns:
        The validated, immutable :class:`RemediationConfig`.

    Raises:
        PolicyError: a ValueError whose message starts with the path of the bad field.
    """
    top = _merged(DEFAULT_POLICY, raw, path)
    ladders = _ladders(top["ladders"], f"{path}.ladders")
    esc = _merged(DEFAULT_POLICY["escalate"], top["escalate"], f"{path}.escalate")
    audit = _merged(DEFAULT_POLICY["audit"], top["audit"], f"{path}.audit")
    tracing = _merged(DEFAULT_POLICY["tracing"], top["tracing"], f"{path}.tracing")
    if tracing["exporter"] not in TRACING_EXPORTERS:
        raise PolicyError(f"{path}.tracing.exporter",
                          f"must be one of {', '.join(TRACING_EXPORTERS)}, got {tracing['exporter']!r}")
    if tracing["exporter"] == "otlp-http" and not _otlp_installed():
        raise PolicyError(f"{path}.tracing.exporter",
                          "otlp-http needs the opentelemetry-exporter-otlp-proto-http package "
                          "(pip install 'adamwatch[otlp]')")
    service_name = _optional_str(tracing["service_name"], f"{path}.tracing.service_name")
    if service_name is None:
        raise PolicyError(f"{path}.tracing.service_name", "must be a non-empty string")
    return RemediationConfig(
        enabled=_bool(top["enabled"], f"{path}.enabled"),
        dry_run=_bool(top["dry_run"], f"{path}.dry_run"),
        ack_timeout_seconds=_number(top["ack_timeout_seconds"], f"{path}.ack_timeout_seconds", above=0),
        detectors=_detectors(top["detectors"], f"{path}.detectors"),
        ladders=ladders,
        stop_training=_bool(esc["stop_training"], f"{path}.escalate.stop_training"),
        alert_actions=_alert_actions(top["alert_actions"], ladders, f"{path}.alert_actions"),
        audit=AuditParams(
            path=_optional_str(audit["path"], f"{path}.audit.path"),
            fsync=_bool(audit["fsync"], f"{path}.audit.fsync"),
        ),
        tracing=TracingParams(
            exporter=tracing["exporter"],
            endpoint=_optional_str(tracing["endpoint"], f"{path}.tracing.endpoint"),
            service_name=service_name,
        ),
    )


def default_policy_copy() -> dict[str, Any]:
    """A deep copy of :data:`DEFAULT_POLICY` (for docs and tests)."""
    return copy.deepcopy(DEFAULT_POLICY)
