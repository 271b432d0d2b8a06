#!/usr/bin/env bash
# Set up (idempotent), then run the demo: a real adamwatch-sidecar and a small
# GPT-style model training on CPU for about a minute. Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python examples/demo.py "$@"
