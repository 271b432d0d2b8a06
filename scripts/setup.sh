#!/usr/bin/env bash
# Idempotent set-up for a fresh machine: Debian packages, a virtualenv with
# torch (CPU) and adamwatch with every extra. Safe to run again and again.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != "0" ] && command -v sudo >/dev/null; then SUDO="sudo"; fi

# Real Prometheus (promtool) and Alertmanager (amtool) for the alert tests.
if ! command -v promtool >/dev/null || ! command -v amtool >/dev/null || [ ! -x /usr/bin/prometheus-alertmanager ]; then
    echo "setup: installing prometheus and prometheus-alertmanager (Debian)"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus prometheus-alertmanager >/dev/null
fi

# Headless Chromium and its driver for the status page's browser test (Debian's
# own builds: the test never lets Selenium download a browser or a driver).
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
    echo "setup: installing chromium and chromium-driver (Debian)"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv"
    python3 -m venv .venv
fi
PY=.venv/bin/python
$PY -m pip install -q --upgrade pip >/dev/null 2>&1 || true

# torch first, the CPU build, so that no dependency range can pull a newer,
# several-GB CUDA build afterwards. Users bring their own torch; we accept a range.
if ! $PY -c "import torch" >/dev/null 2>&1; then
    echo "setup: installing torch==2.13.0 (CPU)"
    $PY -m pip install -q torch==2.13.0
fi
TORCH_VERSION=$($PY -c "import torch; print(torch.__version__)")
echo "torch==${TORCH_VERSION}" > .venv/constraints.txt

if ! $PY -c "import adamwatch, adamwatch_sidecar, prometheus_client, grafana_foundation_sdk, promql_parser, kubernetes_validate, selenium" >/dev/null 2>&1 \
   || [ pyproject.toml -nt .venv/.adamwatch-installed ]; then
    echo "setup: installing adamwatch with all extras"
    $PY -m pip install -q -c .venv/constraints.txt -e ".[trainer,sidecar,otlp,dashboards,test]"
    touch .venv/.adamwatch-installed
fi
echo "setup: ok ($($PY -c 'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__)'))"
