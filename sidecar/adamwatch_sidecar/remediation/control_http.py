"""Control API routes: the Alertmanager webhook, manual actions and status, behind a bearer token.

| route | body | answer |
| --- | --- | --- |
| ``POST /api/v1/alertmanager`` | Alertmanager webhook JSON (version 4) | 200 ``{"results": [...]}`` |
| ``POST /api/v1/actions`` | ``{"action": "reduce_lr", "factor": 0.5, "job": "gpt"}``, ``{"action": "restore_checkpoint", "step": null}``, ``{"action": "stop"}``, ``{"action": "reset"}``, ``{"action": "status", "job": null}`` | 202 ``{"command_id", "outcome": "sent", ...}`` |
| ``GET /api/v1/status`` | — | 200 status of every job |

Every request needs ``Authorization: Bearer <token>``; the token comes from
``control_token_file`` (re-read when the file changes, so a rotated Kubernetes
secret takes effect) or ``$ADAMWATCH_CONTROL_TOKEN``, and is compared in
constant time. Without a configured token every request is refused: the
control API never runs open. Refusals answer 401 (token) or 400/404/409 (the
request), are counted in ``adamwatch_control_requests_rejected_total{endpoint,reason}``
and logged (rate-limited). A webhook alert for a job whose rank 0 does not
report to this sidecar is refused in its result entry (the webhook itself is
answered 200) and counted with reason ``no_trainer``; a manual action for such
a job answers 409 ``no_trainer``.

Handlers follow the core's :class:`~adamwatch_sidecar.http_server.HttpServer`
contract: ``handler(headers, body) -> (status, content_type, body)``.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import threading
from typing import Any, Callable, Mapping, Protocol

from .service import ActionError, RemediationService

__all__ = [
    "TOKEN_ENV",
    "REJECT_REASONS",
    "ENDPOINTS",
    "TokenSource",
    "ControlRoutes",
]

log = logging.getLogger(__name__)

TOKEN_ENV = "ADAMWATCH_CONTROL_TOKEN"
ENDPOINTS = ("alertmanager", "actions", "status")
# Label values of adamwatch_control_requests_rejected_total{reason}.
REJECT_REASONS = (
    "no_token_configured",  # the sidecar has no token: the control API is closed
    "missing_token",  # no "Authorization: Bearer ..." header
    "bad_token",  # a token that does not match
    "malformed",  # body is not the JSON the endpoint expects
    "unknown_action",  # /api/v1/actions with an action we do not know
    "unknown_job",  # names a job this sidecar has never seen
    "no_trainer",  # no trainer to act on: none connected, or rank 0 of the job not connected here
)

Response = tuple[int, str, bytes]


class GlobalCounter(Protocol):
    """The part of RunState that counts sidecar-wide rejections."""

    def inc_global(self, metric_name: str, labels: dict[str, Any], amount: float = 1.0) -> None: ...


class TokenSource:
    """Where the control token comes from: a file (preferred) or an environment variable.

    Args:
        path: ``control_token_file``; re-read whenever its mtime or size changes.
        environ: the environment to read ``ADAMWATCH_CONTROL_TOKEN`` from (injectable).
    """

    def __init__(self, path: str | None = None, environ: Mapping[str, str] | None = None):
        self.path = path
        self._env_token = (environ if environ is not None else os.environ).get(TOKEN_ENV, "").strip() or None
        self._lock = threading.Lock()
        self._stamp: tuple[float, int] | None = None
        self._file_token: str | None = None

    def current(self) -> str | None:
        """The token to accept now, or None when none is configured (or the file is unreadable)."""
        if self.path is None:
            return self._env_token
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime, st.st_size)
            with self._lock:
                if stamp != self._stamp:
                    with open(self.path, encoding="utf-8") as fh:
                        self._file_token = fh.read().strip() or None
                    self._stamp = stamp
                return self._file_token
        except OSError as exc:
            log.error("cannot read control_token_file %s: %s", self.path, exc)
            return None


def _json(status: int, body: Any) -> Response:
    return status, "application/json", (json.dumps(body, sort_keys=True, default=str) + "\n").encode()


class ControlRoutes:
    """Builds the control routes for a :class:`RemediationService`.

    Args:
        service: the remediation service.
        tokens: the token source.
        counter: counts rejections (``RunState.inc_global``).
        log_rejection: ``fn(msg, *args)`` for rejection log lines (the core's rate-limited logger).
    """

    def __init__(self, service: RemediationService, tokens: TokenSource, counter: GlobalCounter,
                 log_rejection: Callable[..., Any] | None = None):
        self.service = service
        self.tokens = tokens
        self._counter = counter
        self._log = log_rejection or log.warning

    def routes(self) -> dict[tuple[str, str], Callable[[Any, bytes], Response]]:
        """``{(method, path): handler}`` for ``HttpServer``."""
        return {
            ("POST", "/api/v1/alertmanager"): self.alertmanager,
            ("POST", "/api/v1/actions"): self.actions,
            ("GET", "/api/v1/status"): self.status,
        }

    def authorize_request(self, headers: Any, method: str, path: str) -> Response | None:
        """``HttpServer``'s ``authorize`` hook: check the token before the body is read."""
        endpoint = {"/api/v1/alertmanager": "alertmanager", "/api/v1/actions": "actions",
                    "/api/v1/status": "status"}.get(path)
        return None if endpoint is None else self._authorize(endpoint, headers)

    # ------------------------------------------------------------------ helpers
    def _count_rejection(self, endpoint: str, reason: str, message: str) -> None:
        try:
            self._counter.inc_global("adamwatch_control_requests_rejected_total",
                                     {"endpoint": endpoint, "reason": reason})
        except Exception:
            log.exception("could not count a control rejection")
        self._log("control request to %s rejected (%s): %s", endpoint, reason, message)

    def _reject(self, endpoint: str, reason: str, status: int, message: str) -> Response:
        self._count_rejection(endpoint, reason, message)
        extra = {"error": message, "reason": reason}
        return _json(status, extra)

    def _authorize(self, endpoint: str, headers: Any) -> Response | None:
        expected = self.tokens.current()
        if expected is None:
            return self._reject(endpoint, "no_token_configured", 401,
                                "the control API is closed: no control token is configured "
                                f"(control_token_file or ${TOKEN_ENV})")
        header = headers.get("Authorization") if headers is not None else None
        if not header or not header.startswith("Bearer "):
            return self._reject(endpoint, "missing_token", 401, "missing 'Authorization: Bearer <token>' header")
        given = header[len("Bearer "):].strip()
        if not hmac.compare_digest(given.encode(), expected.encode()):
            return self._reject(endpoint, "bad_token", 401, "the bearer token does not match")
        return None

    def _body(self, endpoint: str, body: bytes) -> tuple[Any, Response | None]:
        try:
            value = json.loads(body.decode("utf-8")) if body else None
        except (UnicodeDecodeError, ValueError) as exc:
            return None, self._reject(endpoint, "malformed", 400, f"body is not UTF-8 JSON: {exc}")
        except RecursionError:  # nested deeper than the parser goes: bad input, not our error
            return None, self._reject(endpoint, "malformed", 400, "body is nested too deeply")
        if not isinstance(value, dict):
            return None, self._reject(endpoint, "malformed", 400, "body must be a JSON object")
        return value, None

    # ------------------------------------------------------------------ handlers
    def alertmanager(self, headers: Any, body: bytes) -> Response:
        """``POST /api/v1/alertmanager``: Alertmanager webhook (version 4)."""
        denied = self._authorize("alertmanager", headers)
        if denied:
            return denied
        payload, bad = self._body("alertmanager", body)
        if bad:
            return bad
        alerts = payload.get("alerts")
        if payload.get("version", "4") != "4":
            return self._reject("alertmanager", "malformed", 400,
                                f"version: only webhook version 4 is supported, got {payload.get('version')!r}")
        if not isinstance(alerts, list) or not all(
            isinstance(a, dict) and isinstance(a.get("labels", {}), dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in a.get("labels", {}).items())
            for a in alerts
        ):
            return self._reject("alertmanager", "malformed", 400,
                                "alerts: must be a list of objects with string labels")
        answer = self.service.handle_alerts(payload)
        # The webhook is answered 200 (a non-2xx makes Alertmanager re-send the
        # batch), but an alert this sidecar refused to act on, because rank 0 of
        # its job is not connected here, is a rejected control request: count it.
        for entry in answer["results"]:
            if entry.get("reason") in REJECT_REASONS:
                self._count_rejection("alertmanager", entry["reason"],
                                      f"{entry.get('alertname')} for job {entry.get('job')!r}: {entry['result']}")
        return _json(200, answer)

    def actions(self, headers: Any, body: bytes) -> Response:
        """``POST /api/v1/actions``: a manual action or a status query."""
        denied = self._authorize("actions", headers)
        if denied:
            return denied
        request, bad = self._body("actions", body)
        if bad:
            return bad
        if request.get("action") == "status":
            job = request.get("job")
            if job is not None and not isinstance(job, str):
                return self._reject("actions", "malformed", 400, f"job: must be a string, got {job!r}")
            return _json(200, self.service.status(job))
        try:
            result = self.service.manual_action(request)
        except ActionError as exc:
            return self._reject("actions", exc.reason, exc.status, str(exc))
        status = 202 if result["outcome"] in ("sent", "applied", "reset") else 409
        return _json(status, result)

    def status(self, headers: Any, body: bytes) -> Response:
        """``GET /api/v1/status``: every job's ladders, pending commands, recent actions."""
        denied = self._authorize("status", headers)
        if denied:
            return denied
        return _json(200, self.service.status())
