"""(a) What a request pays: ``O2AuditSpanProcessor`` against the SDK's ``BatchSpanProcessor``.

Both processors get the same span objects. Their queues are sized so that neither drops nor wakes its worker
during a round (the worker's work is measured separately, in :mod:`bench_worker`); between rounds, outside
the timed region, the queues are emptied so memory stays flat. That reaches into private attributes of
both processors on purpose: it is the only way to reset them without running the export path.
"""

from __future__ import annotations

import contextvars
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from bench_spans import INSTRUMENTATION_SCOPE, RESOURCE, ServerSpans, request_attributes
from bench_util import Comparison, interleave
from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import SpanKind

from otel_o2audit import O2AuditSpanProcessor
from otel_o2audit.client import DeliveryReport
from otel_o2audit.config import O2AuditConfig
from otel_o2audit.exporter import O2AuditSpanExporter
from otel_o2audit.record import AuditRecord

__all__ = [
    "NullSink",
    "NullSpanExporter",
    "RequestPathResults",
    "make_bsp",
    "make_ours",
    "run_request_path",
]

_now = time.perf_counter_ns
_HOUR_S = 3600.0


class NullSpanExporter(SpanExporter):
    """The BSP's do-nothing exporter."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        """Accept and forget."""
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        """Nothing to release."""


class NullSink:
    """A sink that acknowledges every record without touching them (the ``Sink`` protocol)."""

    def send(self, records: Sequence[AuditRecord], deadline: float) -> DeliveryReport:
        """Report every record as delivered."""
        return DeliveryReport(len(records), delivered=len(records), attempts=1)

    def close(self) -> None:
        """Nothing to release."""

    def describe(self) -> str:
        """Where records go."""
        return "null sink (benchmark)"


def make_ours(queue: int, sink: Optional[Any] = None, batch_size: Optional[int] = None,
              publish_interval: float = _HOUR_S) -> O2AuditSpanProcessor:
    """Our processor with a null sink; by default its worker only wakes after ``queue`` spans."""
    config = O2AuditConfig.from_env(
        {},
        endpoint="file:///tmp/otel-o2audit-bench-unused.jsonl",  # validated only: the sink below replaces it
        batch_size=batch_size or queue,
        max_queue_size=queue,
        publish_interval=publish_interval,
    )
    exporter = O2AuditSpanExporter(config, sink=sink or NullSink())
    return O2AuditSpanProcessor(exporter)


def make_bsp(queue: int) -> BatchSpanProcessor:
    """The SDK's BatchSpanProcessor with a do-nothing exporter; its worker only wakes after ``queue`` spans."""
    return BatchSpanProcessor(
        NullSpanExporter(),
        max_queue_size=queue,
        schedule_delay_millis=_HOUR_S * 1000,
        max_export_batch_size=queue,
    )


def _reset_ours(processor: O2AuditSpanProcessor) -> None:
    processor._intake.clear()
    processor._scopes.clear()


def _reset_bsp(processor: BatchSpanProcessor) -> None:
    processor._batch_processor._queue.clear()


def _queued(processor: SpanProcessor) -> int:
    if isinstance(processor, O2AuditSpanProcessor):
        return len(processor._intake)
    assert isinstance(processor, BatchSpanProcessor)
    return len(processor._batch_processor._queue)


@dataclass(frozen=True)
class RequestPathResults:
    """Nanoseconds per span, ours (candidate) against the BSP (baseline)."""

    on_end: Comparison
    on_start: Comparison
    start_end: Comparison
    start_end_fresh: Comparison
    span_end: Comparison
    lifecycle: Comparison
    spans_per_round: int


def _on_end_round(processor: SpanProcessor, finished: Sequence[ReadableSpan],
                  reset: Callable[[], None]) -> Callable[[], float]:
    on_end = processor.on_end
    count = len(finished)

    def run() -> float:
        start = _now()
        for span in finished:
            on_end(span)
        elapsed = _now() - start
        assert _queued(processor) == count, "a processor dropped or exported spans during a round"
        reset()
        return elapsed / count

    return run


def _on_start_round(processor: SpanProcessor, live: Sequence[Span], reset: Callable[[], None]) -> Callable[[], float]:
    on_start = processor.on_start
    count = len(live)

    def run() -> float:
        start = _now()
        for span in live:
            on_start(span, None)
        elapsed = _now() - start
        reset()
        return elapsed / count

    return run


def _start_end_round(processor: SpanProcessor, pairs: Sequence[Tuple[Span, ReadableSpan]],
                     reset: Callable[[], None]) -> Callable[[], float]:
    on_start = processor.on_start
    on_end = processor.on_end
    count = len(pairs)

    def run() -> float:
        start = _now()
        for live, finished in pairs:
            on_start(live, None)
            on_end(finished)
        elapsed = _now() - start
        assert _queued(processor) == count, "a processor dropped or exported spans during a round"
        reset()
        return elapsed / count

    return run


def _fresh_context_round(processor: SpanProcessor, pairs: Sequence[Tuple[Span, ReadableSpan]],
                         reset: Callable[[], None]) -> Callable[[], float]:
    """on_start inside a new, empty ``contextvars.Context`` per request, as an ASGI server runs each request
    in its own task: our request-scope lookup then finds nothing instead of the previous request's (ended)
    scope. Both processors pay the same ``Context.run`` call."""
    on_start = processor.on_start
    on_end = processor.on_end
    count = len(pairs)

    def run() -> float:
        contexts = [contextvars.Context() for _ in range(count)]
        start = _now()
        for context, (live, finished) in zip(contexts, pairs):
            context.run(on_start, live, None)
            on_end(finished)
        elapsed = _now() - start
        assert _queued(processor) == count, "a processor dropped or exported spans during a round"
        reset()
        return elapsed / count

    return run


Request = Tuple[str, Dict[str, Any], int]


def _requests(count: int) -> List[Request]:
    rng = random.Random(11)
    out: List[Request] = []
    for index in range(count):
        name, attributes, status, _failed = request_attributes(index, rng)
        out.append((name, attributes, status))
    return out


def _span_end_round(provider: TracerProvider, processor: SpanProcessor, requests: Sequence[Request],
                    reset: Callable[[], None]) -> Callable[[], float]:
    tracer = provider.get_tracer(INSTRUMENTATION_SCOPE, "0.66b2")
    count = len(requests)
    empty = Context()

    def run() -> float:
        started = []
        for name, attributes, status in requests:
            span = tracer.start_span(name, context=empty, kind=SpanKind.SERVER, attributes=attributes)
            span.set_attribute("http.status_code", status)
            started.append(span)
        # Only ending is timed: Span.end() -> the provider's processors -> on_end(readable copy).
        start = _now()
        for span in started:
            span.end()
        elapsed = _now() - start
        assert _queued(processor) == count, "a processor dropped or exported spans during a round"
        reset()
        return elapsed / count

    return run


def _lifecycle_round(provider: TracerProvider, processor: SpanProcessor, requests: Sequence[Request],
                     reset: Callable[[], None]) -> Callable[[], float]:
    tracer = provider.get_tracer(INSTRUMENTATION_SCOPE, "0.66b2")
    count = len(requests)
    empty = Context()

    def run() -> float:
        start = _now()
        for name, attributes, status in requests:
            span = tracer.start_span(name, context=empty, kind=SpanKind.SERVER, attributes=attributes)
            span.set_attribute("http.status_code", status)
            span.end()
        elapsed = _now() - start
        assert _queued(processor) == count, "a processor dropped or exported spans during a round"
        reset()
        return elapsed / count

    return run


def run_request_path(spans: ServerSpans, rounds: int, e2e_rounds: int, e2e_spans: int) -> RequestPathResults:
    """Measure on_end, on_start, on_start+on_end, span.end() and start..end, ours against the BSP."""
    count = len(spans.finished)
    queue = max(count, e2e_spans) * 2 + 10
    ours = make_ours(queue)
    bsp = make_bsp(queue)
    try:
        ours_reset: Callable[[], None] = lambda: _reset_ours(ours)  # noqa: E731
        bsp_reset: Callable[[], None] = lambda: _reset_bsp(bsp)  # noqa: E731
        on_end = interleave(_on_end_round(ours, spans.finished, ours_reset),
                            _on_end_round(bsp, spans.finished, bsp_reset), rounds)
        on_start = interleave(_on_start_round(ours, spans.live, ours_reset),
                              _on_start_round(bsp, spans.live, bsp_reset), rounds)
        pairs = list(zip(spans.live, spans.finished))
        start_end = interleave(_start_end_round(ours, pairs, ours_reset),
                               _start_end_round(bsp, pairs, bsp_reset), rounds)
        start_end_fresh = interleave(_fresh_context_round(ours, pairs, ours_reset),
                                     _fresh_context_round(bsp, pairs, bsp_reset), rounds)
    finally:
        _reset_ours(ours)
        _reset_bsp(bsp)
        ours.shutdown()
        bsp.shutdown()  # type: ignore[no-untyped-call]

    # End to end: a TracerProvider with only our processor against one with only the BSP.
    requests = _requests(e2e_spans)
    ours = make_ours(queue)
    bsp = make_bsp(queue)
    ours_provider = TracerProvider(resource=RESOURCE)
    ours_provider.add_span_processor(ours)
    bsp_provider = TracerProvider(resource=RESOURCE)
    bsp_provider.add_span_processor(bsp)
    try:
        ours_reset = lambda: _reset_ours(ours)  # noqa: E731
        bsp_reset = lambda: _reset_bsp(bsp)  # noqa: E731
        span_end = interleave(_span_end_round(ours_provider, ours, requests, ours_reset),
                              _span_end_round(bsp_provider, bsp, requests, bsp_reset), e2e_rounds)
        lifecycle = interleave(_lifecycle_round(ours_provider, ours, requests, ours_reset),
                               _lifecycle_round(bsp_provider, bsp, requests, bsp_reset), e2e_rounds)
    finally:
        _reset_ours(ours)
        _reset_bsp(bsp)
        ours_provider.shutdown()
        bsp_provider.shutdown()
    return RequestPathResults(on_end, on_start, start_end, start_end_fresh, span_end, lifecycle, count)
