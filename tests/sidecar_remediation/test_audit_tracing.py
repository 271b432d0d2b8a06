"""Audit log lines and the tracer the policy asks for."""

from __future__ import annotations

import json
import sys

from opentelemetry import trace

from adamwatch_sidecar.remediation.audit import AUDIT_FIELDS, AuditLog
from adamwatch_sidecar.remediation.policy import TracingParams
from adamwatch_sidecar.remediation.tracing import make_tracer


def test_audit_lines_are_appended_one_json_object_each_with_every_field(tmp_path):
    path = tmp_path / "deep" / "audit.jsonl"
    log = AuditLog(str(path), clock=lambda: 123.5)
    log.write("detection", job="gpt", rank=0, detector="loss_spike", step=7, evidence={"value": float("nan")})
    AuditLog(str(path), clock=lambda: 124.0).write("outcome", job="gpt", action="reduce_lr", outcome="applied")
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == 2
    assert all(tuple(line) == AUDIT_FIELDS for line in lines)
    assert lines[0]["time"] == 123.5 and lines[0]["event"] == "detection" and lines[0]["evidence"] == {"value": "nan"}
    assert lines[1]["outcome"] == "applied" and lines[1]["rank"] is None
    assert [r["event"] for r in log.recent()] == ["detection"]


def test_an_unwritable_audit_path_is_reported_and_never_raises(tmp_path):
    errors = []
    path = tmp_path / "audit.jsonl"
    log = AuditLog(str(path), on_error=errors.append)
    path.mkdir()  # a folder where the file should be: fails even for root
    log.write("decision", action="reduce_lr")
    assert log.write_errors == 1 and isinstance(errors[0], OSError)
    assert log.recent()[0]["action"] == "reduce_lr"


def test_memory_only_audit_keeps_recent_records():
    log = AuditLog(None, keep=2)
    for i in range(3):
        log.write("decision", step=i)
    assert [r["step"] for r in log.recent()] == [1, 2]


def test_exporter_none_uses_the_no_op_tracer():
    tracer, provider = make_tracer(TracingParams(exporter="none"))
    assert isinstance(tracer, trace.NoOpTracer) and provider is None


def test_exporter_console_prints_spans(capsys):
    tracer, provider = make_tracer(TracingParams(exporter="console", service_name="svc-test"))
    tracer.start_span("adamwatch.remediation.reduce_lr", attributes={"adamwatch.job": "gpt"}).end()
    provider.shutdown()
    err = capsys.readouterr().err
    assert '"name": "adamwatch.remediation.reduce_lr"' in err and "svc-test" in err


def test_exporter_otlp_http_is_imported_only_when_chosen():
    sys.modules.pop("opentelemetry.exporter.otlp.proto.http.trace_exporter", None)
    make_tracer(TracingParams(exporter="console"))[1].shutdown()
    assert "opentelemetry.exporter.otlp.proto.http.trace_exporter" not in sys.modules
    tracer, provider = make_tracer(TracingParams(exporter="otlp-http", endpoint="http://127.0.0.1:9/v1/traces"))
    assert "opentelemetry.exporter.otlp.proto.http.trace_exporter" in sys.modules
    assert tracer is not None
    provider.shutdown()


def test_the_readme_example_lines_have_exactly_the_audit_fields():
    import pathlib

    readme = pathlib.Path(__file__).resolve().parents[2] / "sidecar" / "README-remediation.md"
    examples = [json.loads(line) for line in readme.read_text().splitlines() if line.startswith('{"time":')]
    assert len(examples) == 2
    assert all(tuple(example) == AUDIT_FIELDS for example in examples)
