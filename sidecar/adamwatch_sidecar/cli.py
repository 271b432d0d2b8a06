"""The ``adamwatch-sidecar`` command.

    adamwatch-sidecar [serve] --listen unix:///var/run/adamwatch/adamwatch.sock \\
                              --metrics-address 0.0.0.0:9400 [--config FILE] ...

``serve`` is the default when the first argument is an option. Other modules add
subcommands (``assets``, ``ctl``): each module named in SUBCOMMAND_MODULES
exposes ``register_cli(subparsers) -> None``, which adds a parser and sets
``func=callable(args) -> int`` as its default.

Exit codes: 0 after a clean shutdown (SIGTERM/SIGINT), 1 when a socket or
address cannot be bound, 2 for usage and configuration errors.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Sequence

from . import __version__
from .config import LOG_LEVELS, ConfigError, configure_logging, load_config

__all__ = ["main", "build_parser", "SUBCOMMAND_MODULES"]

# Modules that add subcommands through register_cli(subparsers); their owners
# add their entry ("adamwatch_sidecar.assets", "adamwatch_sidecar.remediation.ctl").
SUBCOMMAND_MODULES: list[str] = ["adamwatch_sidecar.remediation.ctl", "adamwatch_sidecar.assets",
                                  "adamwatch_sidecar.optimizer_policy_cli"]

log = logging.getLogger("adamwatch_sidecar")


def _add_serve(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser(
        "serve",
        help="receive trainer summaries and serve /metrics (the default)",
        description="Receive trainer summaries and serve Prometheus metrics. "
        "Flags override the config file; unset flags keep the file's value or the default.",
    )
    serve.add_argument("--config", metavar="FILE", help="YAML config file (keys as in the README's table)")
    serve.add_argument("--listen", metavar="ENDPOINT",
                       help="trainer endpoint: unix:///path.sock or tcp://127.0.0.1:PORT "
                            "(default unix:///var/run/adamwatch/adamwatch.sock)")
    serve.add_argument("--metrics-address", metavar="HOST:PORT",
                       help="serves /metrics, /healthz, /readyz (default 0.0.0.0:9400)")
    serve.add_argument("--control-address", metavar="HOST:PORT",
                       help="control API (Alertmanager webhook, ctl); off unless set")
    serve.add_argument("--control-token-file", metavar="PATH",
                       help="file holding the control API bearer token (or env ADAMWATCH_CONTROL_TOKEN)")
    serve.add_argument("--retention-seconds", type=float, metavar="SECONDS",
                       help="how long a disconnected trainer's series stay (default 300)")
    serve.add_argument("--max-frame-bytes", type=int, metavar="BYTES",
                       help="largest frame payload accepted (default 1048576)")
    serve.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS, help="default INFO")
    serve.add_argument("--socket-mode", metavar="OCTAL", help="Unix socket permission bits (default 0660)")
    serve.add_argument("--socket-group", metavar="GROUP", help="group of the Unix socket and its folder")
    serve.add_argument("--allowed-uids", metavar="UID,...", help="peer uids allowed on the Unix socket")
    serve.add_argument("--allowed-gids", metavar="GID,...", help="peer gids allowed on the Unix socket")
    serve.add_argument("--secret-file", metavar="PATH", help="shared secret every HELLO must carry")
    serve.add_argument("--max-trainers", type=int, metavar="N", help="trainers one sidecar holds (default 2048)")
    serve.add_argument("--max-series-per-trainer", type=int, metavar="N", help="default 2000")
    serve.add_argument("--max-buffered-bytes", type=int, metavar="BYTES",
                       help="partial-frame bytes buffered over all connections (default 33554432)")
    serve.add_argument("--partial-frame-timeout-seconds", type=float, metavar="SECONDS",
                       help="close a connection whose partial frame makes no progress (default 30)")
    serve.add_argument("--http-workers", type=int, metavar="N", help="HTTP request threads (default 16)")
    serve.set_defaults(func=_serve)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with ``serve`` and every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="adamwatch-sidecar",
        description="adamwatch sidecar: trainer summaries in, Prometheus metrics and remediation out.",
    )
    parser.add_argument("--version", action="version", version=f"adamwatch-sidecar {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_serve(subparsers)
    for module_name in SUBCOMMAND_MODULES:
        importlib.import_module(module_name).register_cli(subparsers)
    return parser


def _serve(args: argparse.Namespace) -> int:
    overrides = {
        "listen": args.listen,
        "metrics_address": args.metrics_address,
        "control_address": args.control_address,
        "control_token_file": args.control_token_file,
        "retention_seconds": args.retention_seconds,
        "max_frame_bytes": args.max_frame_bytes,
        "log_level": args.log_level,
        "socket_mode": args.socket_mode,
        "socket_group": args.socket_group,
        "allowed_uids": args.allowed_uids,
        "allowed_gids": args.allowed_gids,
        "secret_file": args.secret_file,
        "max_trainers": args.max_trainers,
        "max_series_per_trainer": args.max_series_per_trainer,
        "max_buffered_bytes": args.max_buffered_bytes,
        "partial_frame_timeout_seconds": args.partial_frame_timeout_seconds,
        "http_workers": args.http_workers,
    }
    try:
        config = load_config(args.config, overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.log_level)
    from .server import Sidecar  # imported here: the other subcommands need none of it

    from .remediation.wiring import attach
    from .run_tracking import attach_run_tracking

    sidecar = Sidecar(config)
    attach_run_tracking(sidecar, config.convergence, config.runs)  # validated by load_config
    try:
        remediation = attach(sidecar, config.remediation)
    except ValueError as exc:  # PolicyError names the field: "remediation.x: ..."
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    from .optimizer_policy_service import attach_policy

    attach_policy(sidecar, config.optimizer_policy)
    sidecar.replica_check.audit = remediation.audit  # divergences go to the audit log too
    try:
        sidecar.serve_forever()
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return 1
    finally:
        remediation.shutdown()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line.

    Args:
        argv: arguments without the program name (``sys.argv[1:]`` when None).

    Returns:
        The exit code.
    """
    args_list = list(sys.argv[1:] if argv is None else argv)
    if not args_list or (args_list[0].startswith("-") and args_list[0] not in ("-h", "--help", "--version")):
        args_list.insert(0, "serve")
    parser = build_parser()
    args = parser.parse_args(args_list)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
