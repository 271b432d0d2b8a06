"""Sidecar configuration: a YAML file, overridden by command-line flags, validated.

    >>> cfg = build_config({"retention_seconds": 60}, {"listen": "tcp://127.0.0.1:9409"})
    >>> (cfg.listen, cfg.retention_seconds)
    ('tcp://127.0.0.1:9409', 60.0)
    >>> build_config({"retention_seconds": "abc"})
    Traceback (most recent call last):
    ...
    adamwatch_sidecar.config.ConfigError: retention_seconds: must be a number >= 0, got 'abc'

Every error is a :class:`ConfigError` whose message starts with the field name;
``adamwatch-sidecar`` prints it as ``config error: <message>`` and exits 2.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from adamwatch import wire

from .http_server import parse_address

__all__ = [
    "SidecarConfig",
    "ConfigError",
    "build_config",
    "load_config",
    "configure_logging",
    "render_markdown_reference",
    "FIELDS",
    "LOG_LEVELS",
]

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_MIN_FRAME_BYTES = 1024
_MAX_FRAME_BYTES = 64 << 20


class ConfigError(ValueError):
    """A configuration value is invalid; the message starts with the field name."""


@dataclass(frozen=True)
class SidecarConfig:
    """Validated sidecar settings (see the README's configuration table)."""

    listen: str = "unix:///var/run/adamwatch/adamwatch.sock"
    metrics_address: str = "0.0.0.0:9400"
    control_address: str | None = None
    control_token_file: str | None = None
    retention_seconds: float = 300.0
    max_frame_bytes: int = wire.DEFAULT_MAX_FRAME_BYTES
    log_level: str = "INFO"
    remediation: dict[str, Any] = field(default_factory=dict)
    optimizer_policy: dict[str, Any] = field(default_factory=dict)
    convergence: dict[str, Any] = field(default_factory=dict)
    runs: dict[str, Any] = field(default_factory=dict)


# Field name -> one-line description (the README table is written from this).
FIELDS: dict[str, str] = {
    "listen": "Where trainers connect: `unix:///path.sock` or `tcp://127.0.0.1:PORT`.",
    "metrics_address": "`HOST:PORT` serving `/metrics`, `/healthz`, `/readyz`.",
    "control_address": "`HOST:PORT` of the control API (Alertmanager webhook, `ctl`); off when unset.",
    "control_token_file": "File holding the control API's bearer token (or env `ADAMWATCH_CONTROL_TOKEN`).",
    "retention_seconds": "How long a disconnected trainer's series stay before they are dropped.",
    "max_frame_bytes": "Largest frame payload accepted; larger frames close the connection.",
    "log_level": "One of DEBUG, INFO, WARNING, ERROR, CRITICAL.",
    "remediation": "Remediation policy (a mapping; see the remediation section).",
    "optimizer_policy": "Allowed optimizer configurations per job-name pattern (a mapping; see the optimizer policy section).",
    "convergence": "Convergence targets per job and trend windows (a mapping; see \"Runs, evaluation and SLOs\").",
    "runs": "Run-end tracking: `vanish_grace_seconds` before a silent disconnect counts as vanished (default 30).",
}
assert set(FIELDS) == {f.name for f in dataclasses.fields(SidecarConfig)}


def _endpoint(name: str, value: Any) -> str:
    try:
        wire.parse_endpoint(value)
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from None
    return value


def _address(name: str, value: Any, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    try:
        parse_address(value)
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from None
    return value


def _number(name: str, value: Any, minimum: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= minimum or value != value:
        raise ConfigError(f"{name}: must be a number >= {minimum:g}, got {value!r}")
    if value == float("inf"):
        raise ConfigError(f"{name}: must be finite, got {value!r}")
    return float(value)


def _int(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{name}: must be an integer from {low} to {high}, got {value!r}")
    return value


def _validate(raw: Mapping[str, Any]) -> SidecarConfig:
    unknown = sorted(k for k in raw if k not in FIELDS)
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown key (known keys: {', '.join(FIELDS)})")
    defaults = SidecarConfig()
    values: dict[str, Any] = {}
    values["listen"] = _endpoint("listen", raw.get("listen", defaults.listen))
    values["metrics_address"] = _address("metrics_address", raw.get("metrics_address", defaults.metrics_address))
    values["control_address"] = _address("control_address", raw.get("control_address"), optional=True)
    token_file = raw.get("control_token_file")
    if token_file is not None:
        if not isinstance(token_file, str) or not token_file:
            raise ConfigError(f"control_token_file: must be a file path, got {token_file!r}")
        if not os.access(token_file, os.R_OK):
            raise ConfigError(f"control_token_file: cannot read {token_file!r}")
    values["control_token_file"] = token_file
    values["retention_seconds"] = _number("retention_seconds", raw.get("retention_seconds", defaults.retention_seconds), 0)
    values["max_frame_bytes"] = _int("max_frame_bytes", raw.get("max_frame_bytes", defaults.max_frame_bytes),
                                     _MIN_FRAME_BYTES, _MAX_FRAME_BYTES)
    level = raw.get("log_level", defaults.log_level)
    if not isinstance(level, str) or level.upper() not in LOG_LEVELS:
        raise ConfigError(f"log_level: must be one of {', '.join(LOG_LEVELS)}, got {level!r}")
    values["log_level"] = level.upper()
    remediation = raw.get("remediation", {})
    if remediation is None:
        remediation = {}
    if not isinstance(remediation, dict):
        raise ConfigError(f"remediation: must be a mapping, got {type(remediation).__name__}")
    values["remediation"] = remediation
    from .optimizer_policy import PolicyError, parse_policy

    optimizer_policy = raw.get("optimizer_policy") or {}
    try:
        parse_policy(optimizer_policy)
    except PolicyError as exc:
        raise ConfigError(str(exc)) from None
    values["optimizer_policy"] = dict(optimizer_policy)
    from .convergence import parse_convergence_config
    from .run_tracking import parse_runs_config

    for name, parse in (("convergence", parse_convergence_config), ("runs", parse_runs_config)):
        section = raw.get(name) or {}
        try:
            parse(section)  # messages start with the field name: "convergence.targets.gpt: ..."
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        values[name] = dict(section)
    return SidecarConfig(**values)


def build_config(file_values: Mapping[str, Any] | None = None, overrides: Mapping[str, Any] | None = None) -> SidecarConfig:
    """Merge file values and overrides (overrides win; None means "not given") and validate.

    Args:
        file_values: the parsed YAML mapping (or None).
        overrides: command-line values keyed by field name.

    Returns:
        The validated configuration.

    Raises:
        ConfigError: naming the first bad field.
    """
    merged: dict[str, Any] = dict(file_values or {})
    for name, value in (overrides or {}).items():
        if value is not None:
            merged[name] = value
    return _validate(merged)


def load_config(path: str | os.PathLike[str] | None, overrides: Mapping[str, Any] | None = None) -> SidecarConfig:
    """Read a YAML config file (optional), apply overrides and validate.

    Args:
        path: the YAML file, or None for defaults plus overrides.
        overrides: command-line values keyed by field name (None = not given).

    Returns:
        The validated configuration.

    Raises:
        ConfigError: the file cannot be read or parsed, or a field is bad.
    """
    file_values: dict[str, Any] = {}
    if path is not None:
        import yaml

        try:
            with open(path, encoding="utf-8") as fh:
                loaded = yaml.safe_load(fh)
        except OSError as exc:
            raise ConfigError(f"config: cannot read {os.fspath(path)!r}: {exc.strerror or exc}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config: {os.fspath(path)!r} is not valid YAML: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config: top level of {os.fspath(path)!r} must be a mapping, got {type(loaded).__name__}")
        file_values = {str(k): v for k, v in loaded.items()}
    return build_config(file_values, overrides)


def configure_logging(level: str) -> None:
    """Log to stderr at ``level`` with timestamps (the container's log stream)."""
    logging.basicConfig(
        level=getattr(logging, level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def render_markdown_reference() -> str:
    """The README's configuration table, generated from FIELDS and the defaults."""
    defaults = SidecarConfig()
    lines = ["| key | flag | default | meaning |", "| --- | --- | --- | --- |"]
    for name, meaning in FIELDS.items():
        default = getattr(defaults, name)
        shown = "unset" if default is None else ("`{}`" if default == {} else f"`{default}`")
        flag = "—" if name in ("remediation", "optimizer_policy", "convergence", "runs") else f"`--{name.replace('_', '-')}`"
        lines.append(f"| `{name}` | {flag} | {shown} | {meaning} |")
    return "\n".join(lines) + "\n"
