"""``O2AuditSpanProcessor``: OpenObserve's audit batching, without its silent losses.

On the request path (``on_start``/``on_end``) the processor does almost nothing: a kind check, a context
variable for the request scope, and an append to a bounded intake queue. One worker thread per process does
the rest: it classifies spans (ingestion and excluded routes never enter a batch), builds records, and
publishes as soon as ``batch_size`` records are pending or the oldest pending record has waited
``publish_interval`` seconds. Unlike the SDK's BatchSpanProcessor it keeps RECORD_ONLY spans, never evicts a
queued record, and accounts for every record it cannot deliver.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections import deque
from typing import Any, Deque, Dict, List, Optional

from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.trace import SpanKind

from .config import O2AuditConfig
from .exporter import O2AuditSpanExporter
from .record import AuditRecord
from .scope import RequestScope, current_scope, open_scope
from .stats import COUNTERS

__all__ = ["O2AuditSpanProcessor"]

_logger = logging.getLogger("otel_o2audit")
_SERVER = SpanKind.SERVER
_DROP_REPORT_INTERVAL = 10.0

# Every live processor of this process, for the shutdown hooks (signals, server shutdown).
_LIVE: weakref.WeakSet[O2AuditSpanProcessor] = weakref.WeakSet()


def live_processors() -> List[O2AuditSpanProcessor]:
    """The processors of this process that have not been shut down."""
    return [p for p in list(_LIVE) if not p.is_shut_down]


class _Flush:
    __slots__ = ("deadline", "done", "ok")

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.done = threading.Event()
        self.ok = False


class O2AuditSpanProcessor(SpanProcessor):
    """Batches audit records of HTTP SERVER spans and publishes them through an :class:`O2AuditSpanExporter`.

    Build it with an exporter, a config, or keyword overrides of the ``O2_AUDIT_*`` settings; with nothing,
    it reads the environment.
    """

    def __init__(self, exporter: Optional[O2AuditSpanExporter] = None, *,
                 config: Optional[O2AuditConfig] = None, **overrides: Any) -> None:
        if exporter is None:
            exporter = O2AuditSpanExporter(config or O2AuditConfig.from_env(**overrides))
        self._exporter = exporter
        cfg = exporter.config
        self._batch_size = cfg.batch_size
        self._interval = cfg.publish_interval
        self._max_queue = cfg.max_queue_size
        self._shutdown_timeout = cfg.shutdown_timeout
        self._shut_down = False
        self._init_state()
        _LIVE.add(self)
        if hasattr(os, "register_at_fork"):
            ref = weakref.ref(self)

            def after_fork() -> None:
                processor = ref()
                if processor is not None and not processor._shut_down:
                    processor._init_state()

            os.register_at_fork(after_in_child=after_fork)

    def _init_state(self) -> None:
        # Called at construction and in a forked child: the child starts empty (the parent's records are
        # the parent's to send) with its own lock, event and worker thread.
        self._intake: Deque[ReadableSpan] = deque()
        self._scopes: Dict[int, RequestScope] = {}
        self._pending: List[AuditRecord] = []
        self._held = 0  # records pending or in flight (the worker's count; read racily by on_end)
        self._wake_at = self._batch_size
        self._woken = False
        self._event = threading.Event()
        self._lock = threading.RLock()  # a signal handler may flush while the main thread holds it
        self._flushes: List[_Flush] = []
        self._stopping: Optional[float] = None  # shutdown deadline, set once
        self._dropped_unreported = 0
        self._drop_lock = threading.Lock()
        self._late_reported = False
        self._last_drop_report = 0.0
        self._worker = threading.Thread(target=self._run, name="otel-o2audit", daemon=True)
        self._worker.start()

    def __repr__(self) -> str:
        return (f"O2AuditSpanProcessor(to={self._exporter.describe()!r}, batch_size={self._batch_size}, "
                f"publish_interval={self._interval})")

    @property
    def exporter(self) -> O2AuditSpanExporter:
        """The exporter that delivers this processor's batches."""
        return self._exporter

    @property
    def is_shut_down(self) -> bool:
        """True once :meth:`shutdown` was called."""
        return self._shut_down

    # ---------------------------------------------------------------- request path: tiny, never raises
    def on_start(self, span: Span, parent_context: Optional[Context] = None) -> None:
        """Open the request scope for the outermost SERVER span; fold nested SERVER spans into it."""
        if span.kind is not _SERVER or self._shut_down:
            return
        try:
            scope = open_scope(span) or current_scope()
            if scope is not None:
                self._scopes[span.context.span_id] = scope
        except Exception:
            _logger.debug("otel-o2audit: on_start failed", exc_info=True)

    def on_end(self, span: ReadableSpan) -> None:
        """Queue a finished SERVER span for the worker; O(1), and it never raises or blocks."""
        if span.kind is not _SERVER:
            return
        if self._shut_down:
            self._late(span)
            return
        intake = self._intake
        if len(intake) + self._held >= self._max_queue:
            self._drop(span)
            return
        intake.append(span)
        if len(intake) >= self._wake_at and not self._woken:
            self._woken = True
            self._event.set()

    def _drop(self, span: ReadableSpan) -> None:
        try:
            context = span.context
            if context is not None:
                self._scopes.pop(context.span_id, None)
            COUNTERS.add("dropped")
            with self._drop_lock:
                self._dropped_unreported += 1
            self._event.set()  # the worker reports drops, rate-limited
        except Exception:
            _logger.debug("otel-o2audit: drop accounting failed", exc_info=True)

    def _late(self, span: ReadableSpan) -> None:
        # A request that ended after shutdown: nobody will publish it, so say so.
        try:
            COUNTERS.add("dropped")
            with self._drop_lock:
                first = not self._late_reported
                self._late_reported = True
            if first:
                _logger.warning("otel-o2audit: a request ended after the audit processor was shut down; "
                                "it and any later ones are not audited (counted as dropped)")
        except Exception:
            _logger.debug("otel-o2audit: late-span accounting failed", exc_info=True)

    # ---------------------------------------------------------------- control
    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Publish everything captured so far; True when it was all delivered within the timeout."""
        if self._shut_down or not self._worker.is_alive():
            return False
        timeout = max(0.0, timeout_millis / 1000)
        flush = _Flush(time.monotonic() + timeout)
        with self._lock:
            self._flushes.append(flush)
        self._event.set()
        return flush.done.wait(timeout) and flush.ok

    def shutdown(self, timeout_millis: Optional[float] = None) -> None:
        """Publish what is pending within the shutdown timeout (``O2_AUDIT_SHUTDOWN_TIMEOUT``), then stop.

        Whatever cannot be published in time is counted and logged as lost. Later spans are ignored.
        """
        if self._shut_down:
            return
        timeout = self._shutdown_timeout if timeout_millis is None else max(0.0, timeout_millis / 1000)
        self._shut_down = True
        self._stopping = time.monotonic() + timeout
        self._event.set()
        self._worker.join(timeout + 0.5)
        if self._worker.is_alive():
            # A send is stuck past the deadline: interrupt its backoff; its batch is then reported lost.
            self._exporter.shutdown()
            self._worker.join(2.0)
        else:
            self._exporter.shutdown()
        leftover = len(self._intake) + len(self._pending)
        if self._worker.is_alive() or leftover:
            _logger.error("otel-o2audit: shutdown timed out; about %d audit records not published", leftover)
            if not self._worker.is_alive() and leftover:
                COUNTERS.add("lost", leftover)
        _LIVE.discard(self)

    # ---------------------------------------------------------------- worker thread
    def _run(self) -> None:
        while True:
            try:
                if self._cycle():
                    return
            except Exception:
                _logger.exception("otel-o2audit: unexpected error in the worker; continuing")
                time.sleep(0.1)  # never spin on a persistent bug

    def _cycle(self) -> bool:
        """One wake-up of the worker; True when it should exit."""
        # Drain before sleeping: spans queued while the last publish ran must start their clock now.
        self._drain()
        self._wake_at = max(1, self._batch_size - len(self._pending))
        if len(self._pending) < self._batch_size:
            self._event.wait(self._sleep_time())
        # Order matters: clear the flags, then drain, so a span appended after the drain wakes us again.
        self._woken = False
        self._event.clear()
        self._drain()
        self._report_drops()
        now = time.monotonic()
        stopping = self._stopping
        with self._lock:
            flushes, self._flushes = self._flushes, []
        if stopping is not None:
            self._publish_all(stopping)
            for flush in flushes:
                flush.ok = not self._pending
                flush.done.set()
            return True
        while len(self._pending) >= self._batch_size:
            self._publish(self._batch_size, self._deadline(now))
        if self._pending and self._oldest_age() >= self._interval:
            self._publish_all(self._deadline(now))
        for flush in flushes:
            flush.ok = self._publish_all(flush.deadline)
            flush.done.set()
        return False

    def _deadline(self, now: float) -> float:
        # A batch may be retried for the retry window, but never past a shutdown deadline.
        deadline = now + self._exporter.config.retry_max_elapsed
        stopping = self._stopping
        return deadline if stopping is None else min(deadline, stopping)

    def _sleep_time(self) -> float:
        if not self._pending:
            # Anything queued since the last drain is younger than this, so it is seen before it is due.
            return self._interval
        return min(self._interval, max(0.0, self._interval - self._oldest_age()))

    def _oldest_age(self) -> float:
        oldest: int = self._pending[0]["_timestamp"]
        return max(0.0, time.time() - oldest / 1e6)

    def _drain(self) -> None:
        intake = self._intake
        scopes = self._scopes
        to_record = self._exporter.to_record
        pending = self._pending
        while intake:
            span = intake.popleft()
            context = span.context
            scope = scopes.pop(context.span_id, None) if context is not None else None
            if scope is not None and scope.span_id != context.span_id:
                _fold_into(scope, span)
                continue
            try:
                record = to_record(span, scope)
            except Exception:
                _logger.exception("otel-o2audit: could not convert span %r; counted as lost", span.name)
                COUNTERS.add("lost")
                continue
            if record is None:
                COUNTERS.add("skipped")
                continue
            COUNTERS.add("captured")
            pending.append(record)
        self._held = len(pending)

    def _publish(self, count: int, deadline: float) -> bool:
        batch = self._pending[:count]
        del self._pending[:count]
        self._held = len(self._pending) + len(batch)
        try:
            report = self._exporter.export_records(batch, deadline)
        finally:
            self._held = len(self._pending)
        return report.ok

    def _publish_all(self, deadline: float) -> bool:
        self._drain()
        ok = True
        while self._pending:
            ok = self._publish(min(self._batch_size, len(self._pending)), deadline) and ok
        return ok

    def _report_drops(self) -> None:
        dropped = self._dropped_unreported
        if not dropped:
            return
        now = time.monotonic()
        if now - self._last_drop_report < _DROP_REPORT_INTERVAL and self._stopping is None:
            return
        with self._drop_lock:
            self._dropped_unreported -= dropped
        self._last_drop_report = now
        _logger.warning("otel-o2audit: %d audit records DROPPED: the queue is full (O2_AUDIT_MAX_QUEUE_SIZE=%d); "
                        "the sink is too slow or unreachable", dropped, self._max_queue)


def _fold_into(scope: RequestScope, span: ReadableSpan) -> None:
    # A nested SERVER span of the same request (e.g. FastAPI's own span of a mounted sub-application):
    # keep its more specific route for the request's single record.
    route = (span.attributes or {}).get("http.route")
    if route and scope.inner_route is None:
        scope.inner_route = str(route)
