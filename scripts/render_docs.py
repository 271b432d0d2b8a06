"""Regenerate the README's metric reference from the sidecar's metric table.

    python scripts/render_docs.py          # rewrite README.md in place
    python scripts/render_docs.py --check  # exit 1 if README.md is stale
"""

from __future__ import annotations

import argparse
import pathlib
import re
import sys

from adamwatch_sidecar.metric_table import render_markdown_reference

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"(<!-- metrics:begin -->\n).*?(<!-- metrics:end -->)", re.S)


def rendered(text: str) -> str:
    if not BLOCK.search(text):
        raise SystemExit("README.md has no <!-- metrics:begin --> / <!-- metrics:end --> block")
    return BLOCK.sub(lambda m: m.group(1) + render_markdown_reference() + m.group(2), text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    current = README.read_text()
    new = rendered(current)
    if args.check:
        if new != current:
            print("README.md metric reference is stale: run python scripts/render_docs.py", file=sys.stderr)
            return 1
        return 0
    README.write_text(new)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
