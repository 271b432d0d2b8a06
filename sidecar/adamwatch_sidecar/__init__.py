"""adamwatch-sidecar: receives step summaries from trainers, exports Prometheus
metrics, detects incidents and drives remediation. Never imports torch."""

__version__ = "0.1.0"
__all__ = ["__version__"]
