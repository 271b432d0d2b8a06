"""The sidecar for the end-to-end test, as a real process: core plus remediation.

    python _sidecar.py CONFIG_YAML

What ``adamwatch-sidecar serve --config CONFIG_YAML`` runs, with the remediation
service attached (control API, Alertmanager webhook), until SIGTERM.
"""

from __future__ import annotations

import sys

from adamwatch_sidecar.config import configure_logging, load_config
from adamwatch_sidecar.remediation.wiring import attach
from adamwatch_sidecar.server import Sidecar

config = load_config(sys.argv[1])
configure_logging(config.log_level)
sidecar = Sidecar(config)
remediation = attach(sidecar, config.remediation)
try:
    sidecar.serve_forever()
finally:
    remediation.shutdown()
