"""``O2AuditSpanExporter``: audit records out of spans, delivered to a sink, every outcome accounted for."""

from __future__ import annotations

import logging
import time
from typing import Any, List, Optional, Sequence

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from .client import DeliveryReport, Sink, make_sink
from .config import ConfigError, O2AuditConfig
from .record import AuditRecord, RecordBuilder
from .redact import Redactor
from .scope import RequestScope
from .stats import COUNTERS, ensure_fork_hook, register_metrics

__all__ = ["O2AuditSpanExporter"]

_logger = logging.getLogger("otel_o2audit")


class O2AuditSpanExporter(SpanExporter):
    """Turns HTTP SERVER spans into audit records and writes them to OpenObserve or a JSON-lines file.

    ``O2AuditSpanExporter()`` reads the ``O2_AUDIT_*`` environment; pass a config or keyword overrides in
    code. Used alone (``OTEL_TRACES_EXPORTER=o2audit``) it is batched by the SDK's BatchSpanProcessor; used
    by :class:`~otel_o2audit.O2AuditSpanProcessor` it receives ready records through :meth:`export_records`.
    """

    def __init__(self, config: Optional[O2AuditConfig] = None, *, sink: Optional[Sink] = None,
                 redactor: Optional[Redactor] = None, **overrides: Any) -> None:
        ensure_fork_hook()
        self._inert_reason: Optional[str] = None
        from_sdk = config is None and sink is None and redactor is None and not overrides
        if from_sdk:
            # Built with no arguments: by the SDK for OTEL_TRACES_EXPORTER=o2audit. It must not raise into
            # start-up (that would abort all instrumentation), so errors follow the zero-code rules.
            config = self._config_for_sdk()
        elif config is None:
            config = O2AuditConfig.from_env(**overrides)
        self.config: O2AuditConfig = config
        # The redaction policy: the default names plus O2_AUDIT_REDACT, or a Redactor of the caller's.
        self._builder = RecordBuilder(config.skip_table(), redactor or config.redactor())
        self._sink: Optional[Sink] = sink
        if self._sink is None and self._inert_reason is None:
            try:
                self._sink = make_sink(config)
            except OSError as exc:
                self._fail(f"O2_AUDIT_ENDPOINT: cannot use {config.endpoint}: {exc}", from_sdk=from_sdk)
        self._closed = False

    def _config_for_sdk(self) -> O2AuditConfig:
        from .autoinstrument import handle_config_error

        try:
            config = O2AuditConfig.from_env()
        except ConfigError as exc:
            handle_config_error(exc)
            self._inert_reason = "configuration error"
            return O2AuditConfig.from_env({}, require_endpoint=False)
        if config.enabled:
            self._inert_reason = "O2_AUDIT_ENABLED is true: the audit processor delivers instead"
            _logger.info("otel-o2audit: exporter 'o2audit' is inactive because %s", self._inert_reason)
        else:
            from .lifecycle import flush_provider_on_exit, install_hooks

            # Our records wait in the SDK's BatchSpanProcessor: make SIGTERM under uvicorn flush it.
            flush_provider_on_exit()
            install_hooks()
            register_metrics()
        return config

    def _fail(self, message: str, from_sdk: bool) -> None:
        if not from_sdk:
            raise ConfigError(message)
        from .autoinstrument import handle_config_error

        handle_config_error(ConfigError(message))
        self._inert_reason = "configuration error"

    def __repr__(self) -> str:
        target = self._sink.describe() if self._sink is not None else "inactive"
        return f"O2AuditSpanExporter({target})"

    @property
    def active(self) -> bool:
        """False when this exporter was built by the SDK but another path (or nothing) delivers."""
        return self._inert_reason is None

    def to_record(self, span: ReadableSpan, scope: Optional[RequestScope] = None) -> Optional[AuditRecord]:
        """The audit record for ``span``, or None when it is not an audited HTTP server request."""
        return self._builder.build(span, scope)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        """Convert ``spans`` (non-server and non-audited ones are skipped) and deliver them in batches."""
        if self._inert_reason is not None:
            return SpanExportResult.SUCCESS
        records: List[AuditRecord] = []
        for span in spans:
            try:
                record = self._builder.build(span)
            except Exception:
                _logger.exception("otel-o2audit: could not convert span %r; counted as lost", span.name)
                COUNTERS.add("captured")
                COUNTERS.add("lost")
                continue
            if record is not None:
                records.append(record)
        if not records:
            return SpanExportResult.SUCCESS
        COUNTERS.add("captured", len(records))
        if self._closed:
            account(DeliveryReport(len(records), lost=len(records), reason="exporter is shut down"), self.describe())
            return SpanExportResult.FAILURE
        size = self.config.batch_size
        ok = True
        for start in range(0, len(records), size):
            report = self.export_records(records[start : start + size])
            ok = ok and report.ok
        return SpanExportResult.SUCCESS if ok else SpanExportResult.FAILURE

    def deliver(self, records: Sequence[AuditRecord], deadline: Optional[float] = None) -> DeliveryReport:
        """Send ready records (at most one batch) and report what became of them; counts nothing."""
        if self._sink is None or self._closed:
            return DeliveryReport(len(records), lost=len(records), reason="exporter is shut down",
                                  retry_later=True)
        if deadline is None:
            deadline = time.monotonic() + self.config.retry_max_elapsed
        return self._sink.send(records, deadline)

    def export_records(self, records: Sequence[AuditRecord], deadline: Optional[float] = None) -> DeliveryReport:
        """Deliver ready records (at most one batch), count and log the outcome, and return the report."""
        report = self.deliver(records, deadline)
        account(report, self.describe())
        return report

    def describe(self) -> str:
        """Where records go (never with credentials)."""
        return self._sink.describe() if self._sink is not None else "nowhere (inactive)"

    def shutdown(self, timeout_millis: float = 30000) -> None:
        """Stop: interrupt a retry backoff in progress; later exports fail and count their records as lost."""
        self._closed = True
        if self._sink is not None:
            self._sink.close()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Nothing is buffered here: batches are sent synchronously by :meth:`export`."""
        return True


def account(report: DeliveryReport, target: str) -> None:
    """Add a delivery report to the counters and log every record that did not make it."""
    COUNTERS.add("published", report.delivered)
    COUNTERS.add("rejected", report.rejected)
    COUNTERS.add("lost", report.lost)
    if report.retries:
        COUNTERS.add("retried", report.sent)
    if report.rejected:
        _logger.warning("otel-o2audit: %d of %d audit records rejected by %s (not re-sent, to avoid duplicating "
                        "the %d stored): %s", report.rejected, report.sent, target, report.delivered, report.reason)
    if report.lost:
        _logger.error("otel-o2audit: %d of %d audit records LOST sending to %s after %d attempt(s): %s",
                      report.lost, report.sent, target, report.attempts, report.reason)
    elif report.retries and report.ok:
        _logger.info("otel-o2audit: %d audit records delivered to %s after %d attempts",
                     report.sent, target, report.attempts)

