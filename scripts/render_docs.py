"""Regenerate the README's generated blocks from their single sources.

| block | source |
| --- | --- |
| `<!-- metrics:begin -->` | `adamwatch_sidecar.metric_table.METRICS` |
| `<!-- config:begin -->` | `adamwatch_sidecar.config.render_markdown_reference()` |
| `<!-- alerts:begin -->` | the alerts of `alerts/adamwatch-rules.yaml` |

    python scripts/render_docs.py          # rewrite README.md in place
    python scripts/render_docs.py --check  # exit 1 if README.md is stale
"""

from __future__ import annotations

import argparse
import pathlib
import re
import sys

import yaml

from adamwatch_sidecar import config, metric_table

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RULES = ROOT / "alerts" / "adamwatch-rules.yaml"


def alert_table() -> str:
    """One row per alert: name (linked to its runbook), severity, `for`, summary."""
    lines = ["| alert | severity | for | what it means |", "| --- | --- | --- | --- |"]
    doc = yaml.safe_load(RULES.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            if "alert" not in rule:
                continue
            name = rule["alert"]
            lines.append(
                f"| [{name}](alerts/runbooks/{name}.md) | {rule['labels']['severity']} | "
                f"{rule.get('for', '—')} | {rule['annotations']['summary']} |"
            )
    return "\n".join(lines) + "\n"


BLOCKS = {
    "metrics": metric_table.render_markdown_reference,
    "config": config.render_markdown_reference,
    "alerts": alert_table,
}


def rendered(text: str) -> str:
    for name, render in BLOCKS.items():
        block = re.compile(rf"(<!-- {name}:begin -->\n).*?(<!-- {name}:end -->)", re.S)
        if not block.search(text):
            raise SystemExit(f"README.md has no <!-- {name}:begin --> / <!-- {name}:end --> block")
        body = render()
        text = block.sub(lambda m: m.group(1) + body + m.group(2), text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    current = README.read_text()
    new = rendered(current)
    if args.check:
        if new != current:
            print("README.md is stale: run python scripts/render_docs.py", file=sys.stderr)
            return 1
        return 0
    README.write_text(new)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
