"""otel-o2audit: an OpenObserve-compatible audit trail for Python web services, built on OpenTelemetry.

Code setup::

    import otel_o2audit
    otel_o2audit.install(tracer_provider)          # settings from O2_AUDIT_* or keywords

Zero-code setup: ``O2_AUDIT_ENABLED=true opentelemetry-instrument uvicorn app:app``.
"""

from __future__ import annotations

from .client import DeliveryReport
from .config import ConfigError, O2AuditConfig
from .exporter import O2AuditSpanExporter
from .middleware import O2AuditASGIMiddleware, O2AuditWSGIMiddleware
from .processor import O2AuditSpanProcessor
from .redact import DEFAULT_SENSITIVE_NAMES, REDACTED, Redactor
from .routes import DEFAULT_EXCLUDE_ROUTES, DEFAULT_INGESTION_ROUTES
from .sampling import AuditSampler
from .scope import set_user
from .setup import install
from .stats import COUNTER_KEYS, stats

__version__ = "0.2.0"

__all__ = [
    "COUNTER_KEYS",
    "DEFAULT_EXCLUDE_ROUTES",
    "DEFAULT_INGESTION_ROUTES",
    "DEFAULT_SENSITIVE_NAMES",
    "REDACTED",
    "AuditSampler",
    "ConfigError",
    "DeliveryReport",
    "O2AuditASGIMiddleware",
    "O2AuditConfig",
    "O2AuditSpanExporter",
    "O2AuditSpanProcessor",
    "O2AuditWSGIMiddleware",
    "Redactor",
    "__version__",
    "install",
    "set_user",
    "stats",
]
