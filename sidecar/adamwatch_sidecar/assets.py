"""``adamwatch-sidecar assets export DIR``: the shipped rules, Alertmanager example and dashboards.

The installed package carries the Prometheus rules, the example Alertmanager
configuration, the runbooks and the generated Grafana dashboards (the wheel maps
them into ``adamwatch_sidecar._assets``). Users without Helm write them out with::

    adamwatch-sidecar assets export ./adamwatch-assets

which creates::

    adamwatch-rules.yaml          Prometheus recording and alerting rules
    alertmanager.yaml             example routing: PagerDuty, tickets, the sidecar webhook
    runbooks/<AlertName>.md       one page per alert
    dashboards/<uid>.json         Grafana dashboards (Overview, On-call, Optimizer debug)

An existing file with different content is left alone (exit 1, naming it)
unless ``--force`` is given, so a locally edited copy is never lost silently.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from importlib import resources
from importlib.resources.abc import Traversable
from typing import Iterator

__all__ = ["ASSET_PACKAGES", "iter_assets", "export_assets", "register_cli"]

# (installed package, subfolder, folder in a source checkout, file patterns, folder under DIR).
ASSET_PACKAGES: tuple[tuple[str, str, str, tuple[str, ...], str], ...] = (
    ("adamwatch_sidecar._assets.alerts", "", "alerts", ("adamwatch-rules.yaml", "alertmanager.yaml"), ""),
    ("adamwatch_sidecar._assets.alerts", "runbooks", "alerts/runbooks", ("*.md",), "runbooks"),
    ("adamwatch_sidecar._assets.dashboards", "", "dashboards/generated", ("*.json",), "dashboards"),
)

# sidecar/adamwatch_sidecar/assets.py -> the repository root, when run from a checkout.
_SOURCE_ROOT = pathlib.Path(__file__).resolve().parents[2]


def _package_folder(package: str, subfolder: str, source_folder: str) -> Traversable | None:
    """The installed package's folder, else the source checkout's, else None."""
    try:
        folder = resources.files(package)
        if subfolder:
            folder = folder.joinpath(subfolder)
        if folder.is_dir():
            return folder
    except (ImportError, TypeError, ValueError):
        pass  # not installed with assets (a source checkout): try the checkout
    candidate = _SOURCE_ROOT / source_folder
    return candidate if candidate.is_dir() else None


def iter_assets() -> Iterator[tuple[str, bytes]]:
    """Every shipped asset as (relative output path, content), in a stable order.

    Returns:
        an iterator of ``(path, bytes)``; raises FileNotFoundError naming the
        missing asset group when the installation is incomplete.
    """
    for package, subfolder, source_folder, patterns, target in ASSET_PACKAGES:
        folder = _package_folder(package, subfolder, source_folder)
        if folder is None:
            raise FileNotFoundError(f"asset folder {source_folder} ({package}) is not installed")
        entries = sorted((e for e in folder.iterdir() if e.is_file()), key=lambda e: e.name)
        found = False
        for pattern in patterns:
            for entry in entries:
                if pathlib.PurePath(entry.name).match(pattern):
                    found = True
                    yield (f"{target}/{entry.name}" if target else entry.name), entry.read_bytes()
        if not found:
            raise FileNotFoundError(f"asset folder {source_folder} holds no {', '.join(patterns)}")


def export_assets(directory: pathlib.Path, *, force: bool = False) -> tuple[list[pathlib.Path], list[pathlib.Path]]:
    """Write every asset under ``directory``.

    Args:
        directory: output folder, created if missing.
        force: overwrite files whose content differs.

    Returns:
        (written, conflicts): files written or already identical, and existing
        files with different content that were left alone (empty with ``force``).
    """
    written: list[pathlib.Path] = []
    conflicts: list[pathlib.Path] = []
    for relative, content in iter_assets():
        path = directory / relative
        if path.exists() and path.read_bytes() != content and not force:
            conflicts.append(path)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        written.append(path)
    return written, conflicts


def _export(args: argparse.Namespace) -> int:
    try:
        written, conflicts = export_assets(pathlib.Path(args.dir), force=args.force)
    except (OSError, FileNotFoundError) as exc:
        print(f"assets export: {exc}", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    if conflicts:
        print("assets export: left alone (content differs; use --force): "
              + ", ".join(str(p) for p in conflicts), file=sys.stderr)
        return 1
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add ``assets export DIR`` to the ``adamwatch-sidecar`` command.

    Args:
        subparsers: the top-level parser's subparsers.
    """
    assets = subparsers.add_parser("assets", help="write out the shipped rules, Alertmanager example and dashboards")
    actions = assets.add_subparsers(dest="assets_command", metavar="ACTION", required=True)
    export = actions.add_parser(
        "export",
        help="write rules, alertmanager.yaml, runbooks and dashboards into DIR",
        description="Write adamwatch-rules.yaml, alertmanager.yaml, runbooks/*.md and dashboards/*.json into DIR.",
    )
    export.add_argument("dir", metavar="DIR", help="output folder (created if missing)")
    export.add_argument("--force", action="store_true", help="overwrite files whose content differs")
    export.set_defaults(func=_export)
