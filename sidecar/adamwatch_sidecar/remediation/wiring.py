"""Attach remediation to a running sidecar: ``attach(sidecar, raw_remediation_config)``.

    sidecar = Sidecar(config)
    remediation = attach(sidecar, config.remediation)   # before sidecar.start()
    try:
        sidecar.serve_forever()
    finally:
        remediation.shutdown()

What it wires: the service listens to every accepted trainer message
(``sidecar.state.add_listener``), ticks once a second (``sidecar.add_ticker``),
sends commands through ``sidecar.ingest.send_command``, writes metrics into
``sidecar.state``, and — when ``control_address`` is set — serves the control
routes on their own :class:`~adamwatch_sidecar.http_server.HttpServer`.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Mapping

from ..http_server import HttpServer
from .control_http import ControlRoutes, TokenSource
from .policy import parse_remediation_config
from .service import RemediationService
from .tracing import make_tracer

__all__ = ["attach", "AttachedRemediation"]

log = logging.getLogger(__name__)


class AttachedRemediation(RemediationService):
    """A :class:`RemediationService` that also owns its tracer provider and control server."""

    provider: Any = None
    control_server: HttpServer | None = None
    tokens: TokenSource | None = None

    def shutdown(self) -> None:
        """Count unacknowledged commands as timeouts and flush spans (call when the sidecar stops)."""
        self.close()
        if self.provider is not None:
            try:
                self.provider.shutdown()
            except Exception:
                log.exception("tracer provider did not shut down cleanly")


def attach(sidecar: Any, raw_remediation_config: Mapping[str, Any] | None = None, *, tracer: Any = None,
           clock: Callable[[], float] = time.time, environ: Mapping[str, str] | None = None) -> AttachedRemediation:
    """Build the remediation service from the policy and hook it into ``sidecar``.

    Args:
        sidecar: an ``adamwatch_sidecar.server.Sidecar`` (not started yet, or started:
            the control server then starts at once).
        raw_remediation_config: the ``remediation:`` mapping of the config file.
        tracer: an OpenTelemetry tracer to use instead of the policy's exporter (tests).
        clock: unix seconds (tests).
        environ: environment for ``ADAMWATCH_CONTROL_TOKEN`` (default ``os.environ``).

    Returns:
        The service (``status()``, ``shutdown()``, ``control_server``).

    Raises:
        PolicyError: a ValueError naming the bad field of the policy.
    """
    if isinstance(getattr(sidecar, "remediation", None), RemediationService):
        raise RuntimeError("remediation is already attached to this sidecar")
    config = parse_remediation_config(raw_remediation_config)
    provider = None
    if tracer is None:
        tracer, provider = make_tracer(config.tracing)
    service = AttachedRemediation(config, send_command=sidecar.ingest.send_command, metrics=sidecar.state,
                                  clock=clock, tracer=tracer)
    service.provider = provider
    sidecar.state.add_listener(service.on_message)
    sidecar.add_ticker(service.on_tick)
    address = getattr(sidecar.config, "control_address", None)
    if address:
        tokens = TokenSource(getattr(sidecar.config, "control_token_file", None), environ)
        if tokens.current() is None:
            log.warning("control API on %s is closed: no control token configured "
                        "(control_token_file or $ADAMWATCH_CONTROL_TOKEN)", address)
        try:
            from ..ingest import RateLimitedLog

            log_rejection = RateLimitedLog(logging.getLogger("adamwatch_sidecar.control")).warning
        except ImportError:  # pragma: no cover - the core always has it
            log_rejection = None
        routes = ControlRoutes(service, tokens, sidecar.state, log_rejection)
        server = HttpServer(address, routes.routes(), name="control", max_body_bytes=1 << 20,
                            authorize=routes.authorize_request, on_reject=getattr(sidecar, "count_http_rejection", None))
        sidecar.add_http_server(server)
        service.control_server = server
        service.tokens = tokens
    sidecar.remediation = service
    status_page = getattr(sidecar, "status_page", None)
    if status_page is not None:  # the timeline and ladder panel of the status page
        status_page.follow_remediation(service)
    log.info("remediation %s%s: ladders %s, audit %s, tracing %s",
             "enabled" if config.enabled else "disabled", " (dry run)" if config.dry_run else "",
             ", ".join(config.ladders), config.audit.path or "in memory", config.tracing.exporter)
    return service
