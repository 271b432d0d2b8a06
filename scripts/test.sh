#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite: unit, integration with real
# processes and sockets, and end-to-end with real Prometheus and Alertmanager.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
