"""OpenTelemetry tracer for remediation actions: one span per action.

The exporter is chosen in the policy (``tracing.exporter``):

| exporter | what it does |
| --- | --- |
| ``none`` | no SDK pipeline at all: the API's no-op tracer |
| ``console`` | spans printed as JSON to stderr (debugging) |
| ``otlp-http`` | spans sent to an OTLP/HTTP collector (``tracing.endpoint``, else the ``OTEL_EXPORTER_OTLP_*`` env vars); needs the ``otlp`` extra, imported only when chosen |

The provider is private to the sidecar (never installed as the global one), so
tests can pass their own provider with an in-memory exporter.
"""

from __future__ import annotations

import sys
from typing import Any

from opentelemetry import trace

from .policy import TracingParams

__all__ = ["make_tracer", "SPAN_NAME_PREFIX", "INSTRUMENTATION_NAME"]

SPAN_NAME_PREFIX = "adamwatch.remediation."
INSTRUMENTATION_NAME = "adamwatch_sidecar.remediation"


def make_tracer(params: TracingParams) -> tuple[trace.Tracer, Any]:
    """Build the tracer the policy asks for.

    Args:
        params: exporter, endpoint and service name from the policy.

    Returns:
        ``(tracer, provider)``; ``provider`` is None for ``none`` and otherwise has
        ``shutdown()`` to flush spans when the sidecar stops.

    Raises:
        ValueError: ``otlp-http`` was chosen but the exporter package is missing.
    """
    if params.exporter == "none":
        return trace.NoOpTracer(), None
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": params.service_name}))
    if params.exporter == "console":
        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter(out=sys.stderr)))
    elif params.exporter == "otlp-http":
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError as exc:  # the otlp extra is optional
            raise ValueError(
                "remediation.tracing.exporter: otlp-http needs the opentelemetry-exporter-otlp-proto-http "
                "package (pip install 'adamwatch[otlp]')"
            ) from exc
        kwargs = {"endpoint": params.endpoint} if params.endpoint else {}
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(**kwargs)))
    else:  # parse_remediation_config already rejected anything else
        raise AssertionError(params.exporter)
    return provider.get_tracer(INSTRUMENTATION_NAME), provider
