"""The sidecar's status page: the run at a glance in a browser, without Grafana.

``GET /`` on the metrics address serves a read-only page per trainer (job and
rank): live charts of loss, gradient norm, learning rate against Adam's
effective learning rate, update size, step time and throughput, skipped and
non-finite steps, with detections and repairs marked; the remediation timeline,
the ladder and detector state; connection, drops, versions and the optimizer.

| module | job |
| --- | --- |
| ``history`` | bounded per-trainer step history (a run-state listener), downsampled beyond its window |
| ``events`` | bounded, numbered timeline: audit records, connections, checkpoints, drops |
| ``api`` | ``/api/v1/series``, ``/api/v1/events``, ``/api/v1/trainers`` as JSON |
| ``page`` | :class:`StatusPage`: the routes, the static files, the wiring |
| ``static/`` | the page (HTML, JS, CSS) and the vendored uPlot chart library (MIT, see ``static/vendor/uplot/``) |
"""

from __future__ import annotations

from .events import EventLog
from .history import HistoryLimits, StepHistory
from .page import StatusPage

__all__ = ["EventLog", "HistoryLimits", "StatusPage", "StepHistory"]
