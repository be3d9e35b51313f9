"""``O2AuditSpanProcessor``: OpenObserve's audit batching, without its silent losses.

On the request path (``on_start``/``on_end``) the processor does almost nothing: a kind check, a context
variable for the request scope, and an append to a bounded intake queue. Two threads per process do the
rest:

* the **collector** classifies finished spans (ingestion and excluded routes never enter a batch), builds
  records, and adds them to the store: memory, or the durable spool when ``O2_AUDIT_SPOOL_DIR`` is set
  (then within 0.25 s of capture);
* the **sender** publishes a batch as soon as ``batch_size`` records wait, or when the oldest has waited
  ``publish_interval`` seconds, and settles every record: published, rejected, expired, kept on disk for a
  later attempt, or counted and logged as lost.

Unlike the SDK's BatchSpanProcessor it keeps RECORD_ONLY spans, never evicts a queued record, applies an
explicit overflow policy, and accounts for every record it does not deliver.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.trace import SpanKind

from .client import DeliveryReport
from .config import O2AuditConfig
from .exporter import O2AuditSpanExporter, account
from .record import AuditRecord
from .scope import RequestScope, current_scope, open_scope
from .stats import COUNTERS
from .store import Batch, MemoryStore, Store

__all__ = ["O2AuditSpanProcessor"]

_logger = logging.getLogger("otel_o2audit")
_SERVER = SpanKind.SERVER
_REPORT_EVERY = 10.0
_RETRY_LATER = 30.0  # longest pause before retrying a batch the spool kept
_SPOOL_TICK = 0.25
_NESTED_WAIT = 1.0  # how long a request's record waits for a nested SERVER span to end

# Every live processor of this process, for the shutdown hooks (signals, server shutdown).
_LIVE: weakref.WeakSet[O2AuditSpanProcessor] = weakref.WeakSet()


def live_processors() -> List[O2AuditSpanProcessor]:
    """The processors of this process that have not been shut down."""
    return [p for p in list(_LIVE) if not p.is_shut_down]


class _Flush:
    __slots__ = ("collected", "deadline", "done", "ok")

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.collected = False  # the collector has moved everything captured before the flush into the store
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
        self._config = cfg
        self._batch_size = cfg.batch_size
        self._interval = cfg.publish_interval
        self._max_queue = cfg.max_queue_size
        self._overflow_policy = cfg.overflow_policy
        self._shut_down = False
        self._store: Optional[Store] = None
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
        # At construction and in a forked child: the child starts empty (the parent's records are the
        # parent's to send) with its own locks, store and threads.
        old = self._store
        if old is not None and hasattr(old, "abandon"):
            old.abandon()
        self._chain = _make_chain(self._config)
        self._store = self._make_store()
        self._intake: Deque[ReadableSpan] = deque()
        self._scopes: Dict[int, RequestScope] = {}
        self._nested_open: Dict[int, int] = {}
        self._nested_lock = threading.Lock()
        self._deferred: List[Tuple[ReadableSpan, RequestScope, float]] = []
        self._held = 0  # records in memory beyond the intake (read racily on the request path)
        self._inflight = 0
        self._wake_at = self._batch_size
        self._woken = False
        self._collect_event = threading.Event()
        self._cv = threading.Condition(threading.RLock())  # guards flushes/stop; a signal handler may flush
        self._space = threading.Condition(threading.Lock())
        self._waiting_for_space = 0
        self._flushes: List[_Flush] = []
        self._stopping: Optional[float] = None
        self._collector_done = False
        self._retry_after = 0.0
        self._keep_backoff = 0.0
        self._last_checkpoint = time.monotonic()
        self._counts_lock = threading.Lock()
        self._unreported: Dict[str, int] = {}
        self._last_report = 0.0
        self._late_reported = False
        self._collector = threading.Thread(target=self._loop, args=(self._collect_once,),
                                           name="otel-o2audit-collector", daemon=True)
        self._sender = threading.Thread(target=self._loop, args=(self._send_once,),
                                        name="otel-o2audit-sender", daemon=True)
        self._collector.start()
        self._sender.start()

    def _make_store(self) -> Store:
        sealer = self._chain.seal if self._chain is not None else None
        if self._config.spool_dir:
            from .spool import SpoolStore

            return SpoolStore(self._config.spool_dir, max_bytes=self._config.spool_max_bytes,
                              fsync_interval=self._config.spool_fsync_interval, sealer=sealer)
        return MemoryStore(sealer)

    def __repr__(self) -> str:
        return (f"O2AuditSpanProcessor(to={self._exporter.describe()!r}, batch_size={self._batch_size}, "
                f"publish_interval={self._interval}, spool={self._config.spool_dir!r})")

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
            scope = open_scope(span)
            if scope is not None:  # the common case: the request's outermost SERVER span
                self._scopes[scope.span_id] = scope
                return
            scope = current_scope()
            if scope is None:
                return
            span_id = span.context.span_id
            if scope.span_id != span_id:
                # A nested SERVER span: the request's record waits for it (see _build).
                with self._nested_lock:
                    self._nested_open[scope.span_id] = self._nested_open.get(scope.span_id, 0) + 1
            self._scopes[span_id] = scope
        except Exception:  # never raise into the application
            _logger.debug("otel-o2audit: on_start failed", exc_info=True)

    def on_end(self, span: ReadableSpan) -> None:
        """Queue a finished SERVER span for the collector; O(1), never raises (blocks only if asked to)."""
        if span.kind is not _SERVER:
            return
        if self._shut_down:
            self._late()
            return
        intake = self._intake
        if len(intake) + self._held >= self._max_queue:
            self._overflow(span)
            return
        intake.append(span)
        if len(intake) >= self._wake_at and not self._woken:
            self._woken = True
            self._collect_event.set()

    def _overflow(self, span: ReadableSpan) -> None:
        try:
            policy = self._overflow_policy
            if policy == "spool" and self._store is not None and self._store.durable:
                record = self._build(span)
                if record is not None and self._store.add([record]):
                    COUNTERS.add("captured")
                    COUNTERS.add("spooled")
                return
            if policy == "block":
                deadline = time.monotonic() + self._config.block_timeout
                with self._space:
                    self._waiting_for_space += 1
                    try:
                        while len(self._intake) + self._held >= self._max_queue and not self._shut_down:
                            remaining = deadline - time.monotonic()
                            if remaining <= 0:
                                break
                            self._collect_event.set()
                            self._space.wait(remaining)
                    finally:
                        self._waiting_for_space -= 1
                if len(self._intake) + self._held < self._max_queue and not self._shut_down:
                    self._intake.append(span)
                    self._collect_event.set()
                    return
            context = span.context
            if context is not None:
                self._scopes.pop(context.span_id, None)
            self._count("dropped")
            if self._chain is not None:
                self._chain.note_dropped(1)
            self._collect_event.set()  # the collector reports drops, rate-limited
        except Exception:  # never raise into the application
            _logger.debug("otel-o2audit: overflow handling failed", exc_info=True)

    def _late(self) -> None:
        # A request that ended after shutdown: nobody will publish it, so say so.
        try:
            COUNTERS.add("dropped")
            if not self._late_reported:
                self._late_reported = True
                _logger.warning("otel-o2audit: a request ended after the audit processor was shut down; "
                                "it and any later ones are not audited (counted as dropped)")
        except Exception:  # never raise into the application
            _logger.debug("otel-o2audit: late-span accounting failed", exc_info=True)

    def _count(self, key: str, amount: int = 1) -> None:
        COUNTERS.add(key, amount)
        with self._counts_lock:
            self._unreported[key] = self._unreported.get(key, 0) + amount

    # ---------------------------------------------------------------- control
    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Publish everything captured so far; True when it was all delivered within the timeout."""
        if self._shut_down or not self._sender.is_alive():
            return False
        timeout = max(0.0, timeout_millis / 1000)
        flush = _Flush(time.monotonic() + timeout)
        with self._cv:
            self._flushes.append(flush)
        self._collect_event.set()
        return flush.done.wait(timeout) and flush.ok

    def shutdown(self, timeout_millis: Optional[float] = None) -> None:
        """Publish what is pending within ``O2_AUDIT_SHUTDOWN_TIMEOUT`` (or ``timeout_millis``), then stop.

        With a spool, what cannot be published in time stays on disk for the next start; without one it
        is counted and logged as lost. Spans that end later are counted as dropped.
        """
        if self._shut_down:
            return
        timeout = self._config.shutdown_timeout if timeout_millis is None else max(0.0, timeout_millis / 1000)
        deadline = time.monotonic() + timeout
        self._shut_down = True
        with self._cv:
            self._stopping = deadline
            self._cv.notify_all()
        self._collect_event.set()
        with self._space:
            self._space.notify_all()
        self._collector.join(max(0.0, deadline - time.monotonic()) + 0.5)
        self._sender.join(max(0.0, deadline - time.monotonic()) + 0.5)
        if self._sender.is_alive():
            # A send is stuck past the deadline: interrupt its backoff; the sender then settles the batch.
            self._exporter.shutdown()
            self._sender.join(2.0)
        self._exporter.shutdown()
        self._finish()
        _LIVE.discard(self)

    def _finish(self) -> None:
        store = self._store
        if store is None:
            return
        left_in_intake = len(self._intake)
        if left_in_intake:
            self._count("lost", left_in_intake)
            self._intake.clear()
        if store.durable:
            left = store.close()
            if left:
                COUNTERS.add("spooled", left)
                _logger.warning("otel-o2audit: %d audit records not yet published stay in the spool %s; the next "
                                "start sends them", left, self._config.spool_dir)
        else:
            left = store.pending()
            if left:
                self._count("lost", left)
        self._report(force=True)

    # ---------------------------------------------------------------- threads
    def _loop(self, step: Callable[[], bool]) -> None:
        while True:
            try:
                if step():
                    return
            except Exception:  # the threads must survive anything
                _logger.exception("otel-o2audit: unexpected error in a worker thread; continuing")
                time.sleep(0.1)  # never spin on a persistent bug

    def _collect_once(self) -> bool:
        """One round of the collector: intake -> records -> store. True when it should exit."""
        tick = min(self._interval, _SPOOL_TICK if self._config.spool_dir else self._interval / 2)
        if self._deferred:
            tick = min(tick, 0.02)
        if self._chain is not None:
            tick = min(tick, max(0.0, self._interval - (time.monotonic() - self._last_checkpoint)))
        self._collect_event.wait(tick)
        # Order matters: clear the flags, then drain, so a span appended after the drain wakes us again.
        self._woken = False
        self._collect_event.clear()
        with self._cv:
            flushes = [f for f in self._flushes if not f.collected]
            stopping = self._stopping
        self._drain()
        store = self._store
        assert store is not None
        if self._chain is not None and (stopping is not None
                                        or time.monotonic() - self._last_checkpoint >= self._interval):
            # A signed checkpoint each interval, even when idle, and a closing one at shutdown.
            self._last_checkpoint = time.monotonic()
            store.add([self._chain.checkpoint(closing=stopping is not None)])
        store.tick()
        pending = store.pending()
        # With a full batch (or a backlog) already waiting, more spans do not make a publish due: wake per
        # batch, not per span.
        self._wake_at = self._batch_size - pending if pending < self._batch_size else self._batch_size
        self._report()
        with self._cv:
            for flush in flushes:
                flush.collected = True
            if stopping is not None:
                self._collector_done = True
            self._cv.notify_all()
        return stopping is not None

    def _build(self, span: ReadableSpan, scope: Optional[RequestScope] = None,
               defer: bool = True) -> Optional[AuditRecord]:
        context = span.context
        if scope is None and context is not None:
            scope = self._scopes.pop(context.span_id, None)
        if scope is not None and context is not None and scope.span_id != context.span_id:
            _fold_into(scope, span)
            with self._nested_lock:
                left = self._nested_open.get(scope.span_id, 1) - 1
                if left > 0:
                    self._nested_open[scope.span_id] = left
                else:
                    self._nested_open.pop(scope.span_id, None)
            return None
        if scope is not None and defer and self._nested_open.get(scope.span_id):
            # The outer span ended before a nested one (contrib ends its span in the send wrapper): wait,
            # briefly, for the nested span's route.
            self._deferred.append((span, scope, time.monotonic() + _NESTED_WAIT))
            return None
        if scope is not None:
            with self._nested_lock:
                self._nested_open.pop(scope.span_id, None)
        try:
            record = self._exporter.to_record(span, scope)
        except Exception:  # one odd span must not cost the others
            _logger.exception("otel-o2audit: could not convert span %r; counted as lost", span.name)
            self._count("lost")
            return None
        if record is None:
            COUNTERS.add("skipped")
        return record

    def _drain(self) -> None:
        intake = self._intake
        records: List[AuditRecord] = []
        while intake:
            record = self._build(intake.popleft())
            if record is not None:
                records.append(record)
        if self._deferred:
            now = time.monotonic()
            waiting = []
            for span, scope, until in self._deferred:
                if self._nested_open.get(scope.span_id) and now < until and self._stopping is None:
                    waiting.append((span, scope, until))
                    continue
                record = self._build(span, scope, defer=False)
                if record is not None:
                    records.append(record)
            self._deferred = waiting
        store = self._store
        assert store is not None
        if records:
            accepted = store.add(records)
            COUNTERS.add("captured", accepted)
        self._held = store.in_memory() + self._inflight
        if self._waiting_for_space:
            with self._space:
                self._space.notify_all()

    def _send_once(self) -> bool:
        """One round of the sender. True when it should exit."""
        store = self._store
        assert store is not None
        with self._cv:
            while True:
                flushes = [f for f in self._flushes if f.collected]
                if flushes or self._collector_done:
                    break
                wait = self._due_in(store)
                if wait is not None and wait <= 0:
                    break
                self._cv.wait(wait)
            stopping = self._stopping if self._collector_done else None
        if stopping is not None:
            self._publish_until(lambda: True, stopping)
            return True
        if flushes:
            deadline = max(f.deadline for f in flushes)
            ok = self._publish_until(lambda: True, deadline)
            with self._cv:
                for flush in flushes:
                    self._flushes.remove(flush)
                    flush.ok = ok and store.pending() == 0
                    flush.done.set()
            return False
        self._publish_until(lambda: self._due_in(store) == 0, None)
        return False

    def _due_in(self, store: Store) -> Optional[float]:
        """Seconds until a publish is due (0: now), None when nothing waits."""
        if time.monotonic() < self._retry_after:
            return self._retry_after - time.monotonic()
        if store.pending() >= self._batch_size:
            return 0.0
        oldest = store.oldest()
        if oldest is None:
            return None
        age = time.time() - oldest / 1e6
        return max(0.0, min(self._interval, self._interval - age))

    def _publish_until(self, more: Callable[[], bool], deadline: Optional[float]) -> bool:
        """Publish batches while ``more()`` holds and records wait; False when something was not delivered."""
        store = self._store
        assert store is not None
        ok = True
        while more():
            if deadline is not None and time.monotonic() >= deadline:
                return store.pending() == 0
            if deadline is None and time.monotonic() < self._retry_after:
                return False
            batch = store.take(self._batch_size)
            if batch is None:
                break
            ok = self._publish(store, batch, deadline) and ok
            if not ok and (deadline is None or time.monotonic() < self._retry_after):
                break  # a kept batch waits for its next attempt, even in a flush
        return ok

    def _publish(self, store: Store, batch: Batch, deadline: Optional[float]) -> bool:
        self._inflight = len(batch.records)
        try:
            records, expired = self._split_expired(batch.records)
            now = time.monotonic()
            send_deadline = now + self._config.retry_max_elapsed
            if deadline is not None:
                send_deadline = min(send_deadline, deadline)
            if self._stopping is not None:
                send_deadline = min(send_deadline, self._stopping)
            try:
                report = self._exporter.deliver(records, send_deadline)
            except Exception as exc:  # noqa: BLE001 - a failing send must still settle its records
                _logger.error("otel-o2audit: unexpected %s while delivering %d records", type(exc).__name__,
                              len(records))
                report = DeliveryReport(len(records), lost=len(records), reason=f"internal error: {type(exc).__name__}")
            if not report.ok and report.retry_later and report.delivered == 0 and store.keep(batch):
                # The next attempt backs off exponentially (capped), so a sink that recovers is noticed within
                # one step and a fast failure (401/403/404) is not hammered.
                self._keep_backoff = min(_RETRY_LATER, max(self._config.retry_initial_backoff,
                                                           self._keep_backoff * 2))
                self._retry_after = time.monotonic() + self._keep_backoff
                _logger.warning("otel-o2audit: %d audit records kept in the spool, retrying in %.1fs: %s",
                                len(records), self._keep_backoff, report.reason)
                return False
            self._expire(store, expired)  # only now: a kept batch is split again when it is retaken
            self._settle(store, batch, records, report)
            return report.ok
        finally:
            self._inflight = 0
            self._held = store.in_memory()
            if self._waiting_for_space:
                with self._space:
                    self._space.notify_all()

    def _settle(self, store: Store, batch: Batch, records: List[AuditRecord], report: DeliveryReport) -> None:
        account(report, self._exporter.describe())
        final_losses = report.rejected + report.lost
        if final_losses and self._chain is not None:
            # Declared in the next checkpoint, so that verify reports an honest loss, not a deletion.
            self._chain.note_lost(records, final_losses)
        if batch.replay and report.delivered:
            COUNTERS.add("replayed", report.delivered)
        if (report.rejected or (report.lost and not report.retry_later)) and hasattr(store, "write_rejected"):
            store.write_rejected(records)
            _logger.warning("otel-o2audit: the batch of %d records is kept for inspection in %s/rejected",
                            len(records), self._config.spool_dir)
        store.settle(batch)
        self._retry_after = 0.0
        self._keep_backoff = 0.0

    def _split_expired(self, records: List[AuditRecord]) -> Tuple[List[AuditRecord], List[AuditRecord]]:
        # OpenObserve rejects records older than its ingestion window one by one: do not send them.
        limit = (time.time() - self._config.max_record_age) * 1e6
        fresh: List[AuditRecord] = []
        expired: List[AuditRecord] = []
        for record in records:
            (expired if int(record.get("_timestamp") or 0) < limit else fresh).append(record)
        return fresh, expired

    def _expire(self, store: Store, expired: List[AuditRecord]) -> None:
        if not expired:
            return
        self._count("expired", len(expired))
        if self._chain is not None:
            self._chain.note_lost(expired)
        if hasattr(store, "write_expired"):
            store.write_expired(expired)
            where = f"moved to {self._config.spool_dir}/expired"
        else:
            where = "discarded (no spool)"
        _logger.warning("otel-o2audit: %d audit records EXPIRED (older than O2_AUDIT_MAX_RECORD_AGE=%gs), %s",
                        len(expired), self._config.max_record_age, where)

    def _report(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_report < _REPORT_EVERY:
            return
        with self._counts_lock:
            if not self._unreported:
                return
            counts, self._unreported = self._unreported, {}
        self._last_report = now
        if counts.get("dropped"):
            _logger.warning("otel-o2audit: %d audit records DROPPED: the queue was full (O2_AUDIT_MAX_QUEUE_SIZE=%d, "
                            "O2_AUDIT_OVERFLOW=%s)", counts["dropped"], self._max_queue, self._overflow_policy)
        if counts.get("lost"):
            _logger.error("otel-o2audit: %d audit records LOST (see the messages above for the reasons)",
                          counts["lost"])


def _fold_into(scope: RequestScope, span: ReadableSpan) -> None:
    # A nested SERVER span of the same request (e.g. FastAPI's own span of a mounted sub-application):
    # keep its more specific route for the request's single record.
    route = (span.attributes or {}).get("http.route")
    if route and scope.inner_route is None:
        scope.inner_route = str(route)


def _make_chain(config: O2AuditConfig) -> Any:
    if config.hmac_key is None:
        return None
    from .chain import Chain

    return Chain(config.hmac_key.reveal().encode("utf-8"), checkpoint_interval=config.publish_interval)
