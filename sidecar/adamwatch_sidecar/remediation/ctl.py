"""``adamwatch-sidecar ctl``: the on-call engineer's hand on the remediation ladder.

    adamwatch-sidecar ctl reduce-lr 0.5          # cut the learning rate of the (only) job by half
    adamwatch-sidecar ctl restore                # restore the newest known-good checkpoint
    adamwatch-sidecar ctl restore 12000          # restore the checkpoint of step 12000
    adamwatch-sidecar ctl stop                   # stop the job cleanly
    adamwatch-sidecar ctl reset                  # clear the ladder after a human took over
    adamwatch-sidecar ctl status [--job gpt]     # ladders, pending commands, recent actions

Options (before or after the subcommand): ``--address HOST:PORT`` (default
``$ADAMWATCH_CONTROL_ADDRESS`` or 127.0.0.1:9401), ``--token-file F`` (default
``$ADAMWATCH_CONTROL_TOKEN_FILE``; else the token in ``$ADAMWATCH_CONTROL_TOKEN``),
``--job J`` (needed when several jobs report to the sidecar), ``--timeout S``.
Prints the sidecar's JSON answer; exits 0 on success, 1 when the sidecar refused
or failed the request (the message says why), 2 on usage errors.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from typing import Any, Sequence

__all__ = ["register_cli", "main", "DEFAULT_ADDRESS", "ADDRESS_ENV", "TOKEN_FILE_ENV", "CtlError", "request"]

DEFAULT_ADDRESS = "127.0.0.1:9401"
ADDRESS_ENV = "ADAMWATCH_CONTROL_ADDRESS"
TOKEN_FILE_ENV = "ADAMWATCH_CONTROL_TOKEN_FILE"
TOKEN_ENV = "ADAMWATCH_CONTROL_TOKEN"


class CtlError(Exception):
    """A request that did not succeed; the message is for the terminal."""


def _token(token_file: str | None) -> str:
    path = token_file or os.environ.get(TOKEN_FILE_ENV)
    if path:
        try:
            with open(path, encoding="utf-8") as fh:
                token = fh.read().strip()
        except OSError as exc:
            raise CtlError(f"--token-file: cannot read {path}: {exc.strerror}") from None
        if not token:
            raise CtlError(f"--token-file: {path} is empty")
        return token
    token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        raise CtlError(f"no control token: pass --token-file or set ${TOKEN_ENV}")
    return token


def request(address: str, method: str, path: str, token: str, body: Any = None, timeout: float = 10.0) -> Any:
    """Call the sidecar's control API.

    Args:
        address: ``HOST:PORT`` of the control endpoint.
        method: GET or POST.
        path: e.g. ``/api/v1/actions``.
        token: the bearer token.
        body: JSON-serialisable request body (POST).
        timeout: seconds.

    Returns:
        The decoded JSON answer.

    Raises:
        CtlError: the sidecar is unreachable or answered with an error.
    """
    url = f"http://{address}{path}"
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read().decode() or "null")
    except urllib.error.HTTPError as exc:
        raw = exc.read().decode(errors="replace")
        try:
            answer = json.loads(raw)
            message = answer.get("error") or answer.get("detail") or raw.strip()
        except ValueError:
            message = raw.strip()
        raise CtlError(f"sidecar at {address} answered {exc.code}: {message}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise CtlError(f"cannot reach the sidecar's control endpoint at {address}: {reason}") from None
    except ValueError as exc:
        raise CtlError(f"sidecar at {address} answered with invalid JSON: {exc}") from None


def _add_common(parser: argparse.ArgumentParser, *, top: bool) -> None:
    # Accept the options before and after the subcommand; SUPPRESS keeps a
    # subparser's default from overwriting a value given before it.
    default = None if top else argparse.SUPPRESS
    parser.add_argument("--address", default=default,
                        help=f"control endpoint HOST:PORT (default ${ADDRESS_ENV} or {DEFAULT_ADDRESS})")
    parser.add_argument("--token-file", default=default,
                        help=f"file holding the control token (default ${TOKEN_FILE_ENV}, else ${TOKEN_ENV})")
    parser.add_argument("--job", default=default, help="job to act on (needed when several jobs report here)")
    parser.add_argument("--rank", type=int, default=default, help="accepted for symmetry; commands go to rank 0")
    parser.add_argument("--timeout", type=float, default=10.0 if top else argparse.SUPPRESS,
                        help="seconds to wait for the sidecar (default 10)")


def _factor(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"FACTOR must be a number, got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"FACTOR must be between 0 and 1 (exclusive), got {text}")
    return value


def _step(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"STEP must be an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"STEP must be >= 0, got {value}")
    return value


def register_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``ctl`` to the ``adamwatch-sidecar`` command line.

    Args:
        subparsers: the object ``ArgumentParser.add_subparsers()`` returned.

    Returns:
        The ``ctl`` parser; it sets ``func`` to the function that runs it (returns the exit code).
    """
    ctl = subparsers.add_parser("ctl", help="act on a training job through the sidecar's control API",
                                description="Act on a training job through the sidecar's control API "
                                "(cut the learning rate, restore a checkpoint, stop, reset the ladder, status).")
    _add_common(ctl, top=True)
    actions = ctl.add_subparsers(dest="ctl_action", metavar="ACTION")
    actions.required = True
    p = actions.add_parser("reduce-lr", help="multiply the learning rate by FACTOR (0 < FACTOR < 1)")
    p.add_argument("factor", type=_factor, metavar="FACTOR")
    _add_common(p, top=False)
    p = actions.add_parser("restore", help="restore the newest known-good checkpoint, or the one of STEP")
    p.add_argument("step", type=_step, nargs="?", default=None, metavar="STEP")
    _add_common(p, top=False)
    p = actions.add_parser("stop", help="stop the training job cleanly")
    _add_common(p, top=False)
    p = actions.add_parser("reset", help="clear the ladder and the exhausted flag of a job")
    _add_common(p, top=False)
    p = actions.add_parser("status", help="ladders, pending commands and recent actions")
    _add_common(p, top=False)
    ctl.set_defaults(func=run)
    return ctl


def run(args: argparse.Namespace) -> int:
    """Run a parsed ``ctl`` command; prints the answer. Returns the exit code."""
    address = args.address or os.environ.get(ADDRESS_ENV) or DEFAULT_ADDRESS
    try:
        token = _token(args.token_file)
        body: dict[str, Any]
        if args.ctl_action == "reduce-lr":
            body = {"action": "reduce_lr", "factor": args.factor}
        elif args.ctl_action == "restore":
            body = {"action": "restore_checkpoint", "step": args.step}
        elif args.ctl_action == "stop":
            body = {"action": "stop"}
        elif args.ctl_action == "reset":
            body = {"action": "reset"}
        else:
            body = {"action": "status"}
        body["job"] = args.job
        if args.rank is not None:
            body["rank"] = args.rank
        body["requested_by"] = f"ctl@{os.environ.get('USER') or os.environ.get('HOSTNAME') or 'unknown'}"
        answer = request(address, "POST", "/api/v1/actions", token, body, timeout=args.timeout)
    except CtlError as exc:
        print(f"adamwatch-sidecar ctl: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(answer, indent=2, sort_keys=True))
    if isinstance(answer, dict) and answer.get("outcome") in ("failed", "rejected", "timeout"):
        print(f"adamwatch-sidecar ctl: {args.ctl_action} {answer['outcome']}: {answer.get('detail')}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry point: ``python -m adamwatch_sidecar.remediation.ctl ACTION ...``."""
    parser = argparse.ArgumentParser(prog="adamwatch-sidecar")
    sub = parser.add_subparsers(dest="command")
    register_cli(sub)
    args = parser.parse_args(["ctl", *(argv if argv is not None else sys.argv[1:])])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
