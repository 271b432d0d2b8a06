"""Write (or, with --check, verify) dashboards/generated/<uid>.json.

Usage (from the repository root)::

    PYTHONPATH=dashboards .venv/bin/python -m adamwatch_dashboards [--out DIR] [--check]
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from adamwatch_dashboards.build import build_all

DEFAULT_OUT = pathlib.Path(__file__).resolve().parents[1] / "generated"


def main(argv: list[str] | None = None) -> int:
    """Args: argv: command-line arguments. Returns: exit status (1 when --check finds a stale file)."""
    parser = argparse.ArgumentParser(prog="python -m adamwatch_dashboards", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    parser.add_argument("--check", action="store_true", help="compare with the files in --out instead of writing")
    args = parser.parse_args(argv)
    stale = []
    for name, content in build_all().items():
        path = args.out / name
        if args.check:
            if not path.exists() or path.read_text() != content:
                stale.append(str(path))
            continue
        args.out.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
        print(f"wrote {path}")
    if stale:
        print("stale (regenerate with python -m adamwatch_dashboards): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
