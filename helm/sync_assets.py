#!/usr/bin/env python3
"""Copy the Prometheus rules and Grafana dashboards into the Helm chart.

Helm's ``.Files.Get`` reads only files inside the chart, so the chart carries
copies of ``alerts/adamwatch-rules.yaml``, ``alerts/alertmanager.yaml`` (its
inhibition rules) and ``dashboards/generated/*.json`` under
``helm/adamwatch/files/``. alerts/ and dashboards/ stay the one source
of truth: run this after changing them, and ``--check`` (in the tests) fails
while a copy differs, is missing, or is left over.

    python helm/sync_assets.py           # write the copies
    python helm/sync_assets.py --check   # exit 1 and list what differs
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys

__all__ = ["AssetCopy", "plan", "stale", "sync", "main"]

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
CHART_FILES = pathlib.Path("helm/adamwatch/files")
RULES_SOURCE = pathlib.Path("alerts/adamwatch-rules.yaml")
ALERTMANAGER_SOURCE = pathlib.Path("alerts/alertmanager.yaml")
DASHBOARDS_SOURCE = pathlib.Path("dashboards/generated")
# The chart's folders this script owns: anything else in them is left over.
FOLDERS = ("rules", "alertmanager", "dashboards")


@dataclasses.dataclass(frozen=True)
class AssetCopy:
    """One file the chart must carry: where it comes from and where it goes."""

    source: pathlib.Path
    target: pathlib.Path


def plan(
    rules: pathlib.Path, alertmanager: pathlib.Path, dashboards: pathlib.Path, chart_files: pathlib.Path
) -> list[AssetCopy]:
    """List the copies the chart needs.

    Args:
        rules: the rules file (alerts/adamwatch-rules.yaml).
        alertmanager: the Alertmanager example (alerts/alertmanager.yaml).
        dashboards: the folder of generated dashboard JSON files.
        chart_files: the chart's ``files/`` folder.

    Returns:
        One AssetCopy per file: rules, Alertmanager example, dashboards sorted by name.

    Raises:
        ValueError: if a source file or every dashboard is missing, naming the path.
    """
    for source in (rules, alertmanager):
        if not source.is_file():
            raise ValueError(f"{source} does not exist")
    dashboard_files = sorted(dashboards.glob("*.json")) if dashboards.is_dir() else []
    if not dashboard_files:
        raise ValueError(f"no dashboards (*.json) in {dashboards}")
    copies = [
        AssetCopy(rules, chart_files / "rules" / "adamwatch-rules.yaml"),
        AssetCopy(alertmanager, chart_files / "alertmanager" / "alertmanager.yaml"),
    ]
    copies += [AssetCopy(path, chart_files / "dashboards" / path.name) for path in dashboard_files]
    return copies


def stale(copies: list[AssetCopy], chart_files: pathlib.Path) -> list[str]:
    """Say which chart copies differ from their sources.

    Args:
        copies: the result of :func:`plan`.
        chart_files: the chart's ``files/`` folder.

    Returns:
        One line per problem (a differing, missing or left-over copy); empty
        when the chart is in sync.
    """
    problems = []
    for copy in copies:
        if not copy.target.is_file():
            problems.append(f"missing: {copy.target} (from {copy.source})")
        elif copy.target.read_bytes() != copy.source.read_bytes():
            problems.append(f"differs: {copy.target} from {copy.source}")
    wanted = {copy.target for copy in copies}
    for folder in FOLDERS:
        for path in sorted((chart_files / folder).glob("*")):
            if path.is_file() and path not in wanted:
                problems.append(f"left over: {path} (its source is gone)")
    return problems


def sync(copies: list[AssetCopy], chart_files: pathlib.Path) -> list[str]:
    """Write the chart copies and delete left-over ones.

    Args:
        copies: the result of :func:`plan`.
        chart_files: the chart's ``files/`` folder.

    Returns:
        What was changed, one line per file (empty when already in sync).
    """
    changes = stale(copies, chart_files)
    wanted = {copy.target for copy in copies}
    for folder in FOLDERS:
        for path in (chart_files / folder).glob("*"):
            if path.is_file() and path not in wanted:
                path.unlink()
    for copy in copies:
        copy.target.parent.mkdir(parents=True, exist_ok=True)
        if not copy.target.is_file() or copy.target.read_bytes() != copy.source.read_bytes():
            copy.target.write_bytes(copy.source.read_bytes())
    return changes


def main(argv: list[str] | None = None) -> int:
    """Command line entry point.

    Args:
        argv: arguments without the program name (default: sys.argv[1:]).

    Returns:
        0 when the chart is (now) in sync; 1 with ``--check`` when it is not;
        2 when a source is missing.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report differences; exit 1 if any")
    parser.add_argument("--root", type=pathlib.Path, default=REPO_ROOT, help="repository root")
    parser.add_argument("--rules", type=pathlib.Path, help=f"rules file (default: ROOT/{RULES_SOURCE})")
    parser.add_argument(
        "--alertmanager", type=pathlib.Path, help=f"Alertmanager example (default: ROOT/{ALERTMANAGER_SOURCE})"
    )
    parser.add_argument(
        "--dashboards", type=pathlib.Path, help=f"dashboards folder (default: ROOT/{DASHBOARDS_SOURCE})"
    )
    parser.add_argument(
        "--chart-files", type=pathlib.Path, help=f"the chart's files/ folder (default: ROOT/{CHART_FILES})"
    )
    args = parser.parse_args(argv)
    chart_files = args.chart_files or args.root / CHART_FILES
    try:
        copies = plan(
            args.rules or args.root / RULES_SOURCE,
            args.alertmanager or args.root / ALERTMANAGER_SOURCE,
            args.dashboards or args.root / DASHBOARDS_SOURCE,
            chart_files,
        )
    except ValueError as error:
        print(f"sync_assets: {error}", file=sys.stderr)
        return 2
    if args.check:
        problems = stale(copies, chart_files)
        for line in problems:
            print(line, file=sys.stderr)
        if problems:
            print("run `python helm/sync_assets.py` to update the chart", file=sys.stderr)
        return 1 if problems else 0
    for line in sync(copies, chart_files):
        print(f"updated ({line})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
