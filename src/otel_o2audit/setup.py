"""``install()``: the one line that adds the audit processor to a TracerProvider."""

from __future__ import annotations

import logging
import os
import re
import threading
import weakref
from typing import Any, Optional

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from .config import O2AuditConfig
from .exporter import O2AuditSpanExporter
from .processor import O2AuditSpanProcessor
from .redact import Redactor
from .sampling import ensure_audit_sampler
from .stats import register_metrics

__all__ = ["install"]

_logger = logging.getLogger("otel_o2audit")
_lock = threading.Lock()
_installed: weakref.WeakKeyDictionary[TracerProvider, O2AuditSpanProcessor] = weakref.WeakKeyDictionary()
_EXCLUDED_URLS = re.compile(r"OTEL_PYTHON_(?:[A-Z0-9_]+_)?EXCLUDED_URLS")


def install(tracer_provider: Optional[TracerProvider] = None, *, config: Optional[O2AuditConfig] = None,
            redactor: Optional[Redactor] = None, **overrides: Any) -> O2AuditSpanProcessor:
    """Add the audit processor to ``tracer_provider`` (default: the global one) and return it.

    Settings come from the ``O2_AUDIT_*`` environment, overridden by keywords named like the config
    fields (``endpoint=``, ``batch_size=``, ...); ``redactor`` replaces the redaction policy. Calling it
    again for the same provider returns the processor already installed. Raises
    :class:`~otel_o2audit.ConfigError` for an invalid configuration and ``TypeError`` when the provider is
    not the SDK's. Code setup is an explicit opt-in: it does not depend on ``O2_AUDIT_ENABLED``. It also
    wraps the provider's sampler so that no sampling decision can drop a SERVER span (see
    :mod:`otel_o2audit.sampling`): call it before creating tracers or instrumenting.
    """
    provider = tracer_provider if tracer_provider is not None else trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        raise TypeError(
            f"otel-o2audit needs an SDK TracerProvider, got {type(provider).__name__}; create one with "
            "opentelemetry.sdk.trace.TracerProvider() and pass it, or set it as the global provider first"
        )
    with _lock:
        existing = _installed.get(provider)
        if existing is not None and not existing.is_shut_down:
            if overrides or config is not None:
                _logger.warning("otel-o2audit: already installed on this TracerProvider; new settings ignored")
            return existing
        cfg = config if config is not None else O2AuditConfig.from_env(**overrides)
        processor = O2AuditSpanProcessor(O2AuditSpanExporter(cfg, redactor=redactor))
        # Sampling must not be able to remove a request from the audit trail.
        ensure_audit_sampler(provider)
        provider.add_span_processor(processor)
        _installed[provider] = processor
    register_metrics()
    from .lifecycle import install_hooks

    install_hooks()
    _warn_hidden_routes()
    _logger.info("otel-o2audit: auditing HTTP requests to %s (batch size %d, publish interval %gs)",
                 processor.exporter.describe(), cfg.batch_size, cfg.publish_interval)
    return processor


def _warn_hidden_routes() -> None:
    # Requests excluded from tracing make no span at all, so they cannot be audited either.
    for name, value in sorted(os.environ.items()):
        if _EXCLUDED_URLS.fullmatch(name) and value.strip():
            _logger.warning("otel-o2audit: %s=%r makes no spans for these URLs, so requests to them are NOT "
                            "audited; exclude routes from the audit with O2_AUDIT_EXCLUDE_ROUTES instead",
                            name, value)
