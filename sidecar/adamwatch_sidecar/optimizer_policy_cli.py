"""``adamwatch-sidecar policy check``: evaluate an optimizer policy against a configuration file, offline (CI).

    adamwatch-sidecar policy check --policy sidecar.yaml --job prod-gpt optimizer-config.json

``--policy`` is a sidecar config file (its ``optimizer_policy`` key is used) or a
file holding the policy mapping itself (``enforce``/``rules``). The configuration
file is JSON or YAML: either what ``adamwatch.optimizer_config.write_config_file``
writes (``{"job", "config", "features"}``), one entry of ``ctl status``'s
``optimizer_configs``, or a bare ``capture_config`` dict. ``--job`` overrides
the file's job name.

Prints one line per violation (``VIOLATION <rule> [<enforce>]: <message>``), or
``OK``. Exit codes: 0 compliant, 1 violations, 2 usage, file or policy errors.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .optimizer_policy import PolicyError, evaluate, parse_policy, verdict

__all__ = ["register_cli", "check"]


class _InputError(Exception):
    pass


def _load(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise _InputError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        return json.loads(text)
    except ValueError:
        pass
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise _InputError(f"{path}: neither JSON nor valid YAML: {exc}") from None


def check(policy_path: str, config_path: str, job: str | None = None) -> tuple[int, list[str]]:
    """Evaluate the policy in ``policy_path`` against the configuration in ``config_path``.

    Args:
        policy_path: sidecar config file or bare policy file.
        config_path: the configuration file.
        job: the job name to match the rules with (default: the file's ``job``).

    Returns:
        (exit code, output lines).
    """
    try:
        raw = _load(policy_path)
        if isinstance(raw, dict) and "optimizer_policy" in raw:
            raw = raw["optimizer_policy"]
            where = "optimizer_policy"
        else:
            where = "policy"
        policy = parse_policy(raw, where)
        data = _load(config_path)
    except (_InputError, PolicyError) as exc:
        return 2, [f"error: {exc}"]
    if not isinstance(data, dict):
        return 2, [f"error: {config_path}: must hold a mapping, got {type(data).__name__}"]
    config = data.get("config") if "config" in data else data
    features = data.get("features") or {}
    job = job or data.get("job")
    if not isinstance(job, str) or not job:
        return 2, ["error: no job name: pass --job or put \"job\" in the configuration file"]
    if not isinstance(config, dict) or not isinstance(config.get("param_groups"), list):
        return 2, [f"error: {config_path}: no configuration with param_groups found"]
    violations = evaluate(policy, job, config, features)
    if not violations:
        return 0, [f"OK: job {job} complies with {len([r for r in policy.rules if r.covers(job)])} rule(s)"]
    lines = [f"VIOLATION {v.rule} [{v.enforce}]: {v.message}" for v in violations]
    lines.append(f"verdict: {verdict(violations)}")
    return 1, lines


def _run(args: argparse.Namespace) -> int:
    code, lines = check(args.policy, args.config_file, args.job)
    stream = sys.stdout if code in (0, 1) else sys.stderr
    for line in lines:
        print(line, file=stream)
    return code


def register_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``policy check`` to the ``adamwatch-sidecar`` command line.

    Args:
        subparsers: from ``ArgumentParser.add_subparsers()``.

    Returns:
        The ``policy`` parser.
    """
    policy = subparsers.add_parser("policy", help="check optimizer configurations against the optimizer policy",
                                   description="Check optimizer configurations against the optimizer policy.")
    actions = policy.add_subparsers(dest="policy_action", metavar="ACTION")
    actions.required = True
    p = actions.add_parser("check", help="evaluate a policy against a configuration file (exit 1 on violations)")
    p.add_argument("--policy", required=True, metavar="FILE",
                   help="sidecar config file (its optimizer_policy) or a bare policy file")
    p.add_argument("--job", help="job name the rules are matched against (default: the file's job)")
    p.add_argument("config_file", metavar="CONFIG_FILE", help="JSON/YAML optimizer configuration")
    policy.set_defaults(func=_run)
    return policy
