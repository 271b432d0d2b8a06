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
    # --- who may connect, and what one sidecar holds (issue 10) -------------------
    socket_mode: int = 0o660
    socket_group: str | None = None
    allowed_uids: tuple[int, ...] = ()
    allowed_gids: tuple[int, ...] = ()
    secret_file: str | None = None
    max_trainers: int = 2048
    max_series_per_trainer: int = 2000
    max_buffered_bytes: int = 32 << 20
    partial_frame_timeout_seconds: float = 30.0
    http_workers: int = 16


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
    "socket_mode": "Permission bits of the Unix socket (octal, e.g. `0660`); its folder gets the same bits plus search. Never world-accessible.",
    "socket_group": "Group (name or gid) given to the Unix socket and its folder; the trainer container runs with it (chart: `fsGroup`).",
    "allowed_uids": "Peer uids allowed on the Unix socket (`SO_PEERCRED`), comma-separated; empty: any peer the file mode lets in.",
    "allowed_gids": "Peer gids allowed on the Unix socket; a peer passes when its uid or its gid is allowed.",
    "secret_file": "File holding the shared secret every HELLO must carry (`secret`); required for a non-loopback TCP `listen`.",
    "max_trainers": "Trainers (connected or within retention) one sidecar holds; further HELLOs are refused.",
    "max_series_per_trainer": "Series one trainer may create (from its param groups); a larger HELLO is refused.",
    "max_buffered_bytes": "Bytes of partial frames buffered across all connections; the connection that overflows it is closed.",
    "partial_frame_timeout_seconds": "A connection holding a partial frame without progress this long is closed.",
    "http_workers": "Threads serving HTTP requests (metrics, status page, control API); further connections wait.",
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
    values.update(_validate_limits(raw, defaults))
    _check_paths(values)
    return SidecarConfig(**values)


def _mode(name: str, value: Any) -> int:
    # YAML reads 0660 as an octal int; a flag or a quoted value is a string of octal digits.
    if isinstance(value, str):
        try:
            value = int(value, 8)
        except ValueError:
            raise ConfigError(f"{name}: must be octal permission bits like 0660, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0o777:
        raise ConfigError(f"{name}: must be octal permission bits like 0660, got {value!r}")
    if value & 0o007:
        raise ConfigError(f"{name}: must not give others any access (the socket drives remediation), got {value:04o}")
    return value


def _ids(name: str, value: Any) -> tuple[int, ...]:
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{name}: must be a list of numeric ids, got {value!r}")
    out = []
    for item in value:
        try:
            number = int(item)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: must be a list of numeric ids, got {item!r}") from None
        if isinstance(item, bool) or number < 0:
            raise ConfigError(f"{name}: ids must be integers >= 0, got {item!r}")
        out.append(number)
    return tuple(out)


def _validate_limits(raw: Mapping[str, Any], defaults: SidecarConfig) -> dict[str, Any]:
    values: dict[str, Any] = {}
    values["socket_mode"] = _mode("socket_mode", raw.get("socket_mode", defaults.socket_mode))
    group = raw.get("socket_group")
    if group is not None:
        group = str(group)
        if not group:
            raise ConfigError("socket_group: must be a group name or gid")
    values["socket_group"] = group
    values["allowed_uids"] = _ids("allowed_uids", raw.get("allowed_uids"))
    values["allowed_gids"] = _ids("allowed_gids", raw.get("allowed_gids"))
    values["secret_file"] = raw.get("secret_file")
    values["max_trainers"] = _int("max_trainers", raw.get("max_trainers", defaults.max_trainers), 1, 1_000_000)
    values["max_series_per_trainer"] = _int("max_series_per_trainer",
                                            raw.get("max_series_per_trainer", defaults.max_series_per_trainer),
                                            100, 1_000_000)
    values["max_buffered_bytes"] = _int("max_buffered_bytes", raw.get("max_buffered_bytes", defaults.max_buffered_bytes),
                                        _MIN_FRAME_BYTES, 1 << 40)
    values["partial_frame_timeout_seconds"] = _number(
        "partial_frame_timeout_seconds",
        raw.get("partial_frame_timeout_seconds", defaults.partial_frame_timeout_seconds), 0.1)
    values["http_workers"] = _int("http_workers", raw.get("http_workers", defaults.http_workers), 1, 1024)
    return values


def _readable_file(name: str, value: Any) -> None:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{name}: must be a file path, got {value!r}")
    if os.path.isdir(value):
        raise ConfigError(f"{name}: {value!r} is a directory, not a file")
    if not os.access(value, os.R_OK):
        raise ConfigError(f"{name}: cannot read {value!r}")


def _check_paths(values: dict[str, Any]) -> None:
    """Start-up checks of every path, so a bad one exits 2 naming its field, not a traceback later."""
    if values["control_token_file"] is not None:
        _readable_file("control_token_file", values["control_token_file"])
    if values["secret_file"] is not None:
        _readable_file("secret_file", values["secret_file"])
    endpoint = wire.parse_endpoint(values["listen"])
    if endpoint.scheme == "unix":
        # Walk up to the first existing ancestor: it must be a folder we can create in.
        parent = os.path.dirname(os.path.abspath(endpoint.path))
        while parent and not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if parent and not os.path.isdir(parent):
            raise ConfigError(f"listen: {endpoint.path!r} lies under {parent!r}, which is a file, not a folder")
        if os.path.isdir(endpoint.path):
            raise ConfigError(f"listen: {endpoint.path!r} is a folder; give the socket file's path")
    elif endpoint.host not in ("127.0.0.1", "localhost", "::1") and values["secret_file"] is None:
        raise ConfigError(f"listen: {values['listen']!r} is reachable beyond loopback; "
                          "set secret_file so that only trainers holding the secret are accepted")
    audit = values["remediation"].get("audit") if isinstance(values["remediation"], dict) else None
    path = audit.get("path") if isinstance(audit, dict) else None
    if path is not None:
        name = "remediation.audit.path"
        if not isinstance(path, str) or not path:
            raise ConfigError(f"{name}: must be a file path, got {path!r}")
        if os.path.isdir(path):
            raise ConfigError(f"{name}: {path!r} is a directory, not a file")
        parent = os.path.dirname(os.path.abspath(path))
        while parent and not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if parent and not os.path.isdir(parent):
            raise ConfigError(f"{name}: {path!r} lies under {parent!r}, which is a file, not a folder")
        if parent and not os.access(parent, os.W_OK):
            raise ConfigError(f"{name}: cannot create files in {parent!r}")


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
        if name == "socket_mode":
            default = f"{default:04o}"
        shown = "unset" if default is None else ("`{}`" if default == {} else "empty" if default == () else f"`{default}`")
        flag = "—" if name in ("remediation", "optimizer_policy", "convergence", "runs") else f"`--{name.replace('_', '-')}`"
        lines.append(f"| `{name}` | {flag} | {shown} | {meaning} |")
    return "\n".join(lines) + "\n"
