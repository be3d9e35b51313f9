"""(c) What a request pays with the durable spool on, against the 0.1 configuration (memory store, no spool).

Both sides are ``O2AuditSpanProcessor`` with the same exporter settings and a sink that acknowledges at once
(:class:`bench_request_path.NullSink`); the only difference is ``spool_dir``. Three views, all in one run:

* **Isolated** (the method of table (a)): the same span objects, on_start + on_end, span.end() and a whole
  span through a TracerProvider, rounds alternating between the two sides, the GC paused, queues emptied
  between rounds. The spool's collector writes every 0.25 s on its own; for these rounds that tick is parked
  (``otel_o2audit.processor._SPOOL_TICK``), exactly as the memory side's worker never wakes during a round,
  so both measure the request path alone.
* **Live pipeline**: production-like processors (batch 500, publish interval 1 s, queue 10000) with their
  collector and sender threads running, fed real SERVER spans at a steady rate through a TracerProvider. The
  two sides take turns phase by phase; every request's start_span..end() is timed, so the background work
  (building records, and for the spool: encoding, writing, reading back) shows up where it competes with the
  request for the GIL. CPU per request includes that background work (the process's CPU time over the phase
  and the flush that settles it).
* **The spool store, worker side**: SpoolStore.add (as the collector writes), take + settle (as the sender
  reads), against the cost of only decoding the same lines (crc32 + json.loads), and the memory store.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
import time
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from bench_request_path import (
    NullSink,
    _lifecycle_round,
    _requests,
    _reset_ours,
    _span_end_round,
    _start_end_round,
)
from bench_spans import INSTRUMENTATION_SCOPE, RESOURCE, ServerSpans
from bench_util import Comparison, interleave, median, quantile
from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.trace import SpanKind

import otel_o2audit.processor as processor_module
from otel_o2audit import O2AuditSpanProcessor
from otel_o2audit.config import O2AuditConfig
from otel_o2audit.exporter import O2AuditSpanExporter
from otel_o2audit.record import AuditRecord
from otel_o2audit.spool import SpoolStore
from otel_o2audit.store import MemoryStore

__all__ = ["SpoolPathResults", "run_spool_path", "spool_path_sections"]

_HOUR_S = 3600.0
SPOOL_PATH_TARGET = 1.2  # spool on / 0.1 configuration, time per request: at most


def _processor(spool_dir: Optional[str], **settings: Any) -> O2AuditSpanProcessor:
    config = O2AuditConfig.from_env(
        {}, endpoint="file:///tmp/otel-o2audit-bench-unused.jsonl",  # validated only: the sink replaces it
        spool_dir=spool_dir, **settings,
    )
    return O2AuditSpanProcessor(O2AuditSpanExporter(config, sink=NullSink()))


@dataclass(frozen=True)
class LiveSide:
    """Per-phase figures of one side of the live comparison."""

    mean_ns: List[float]
    p50_ns: List[float]
    p99_ns: List[float]
    cpu_us: List[float]  # process CPU per request, background work included


@dataclass(frozen=True)
class SpoolPathResults:
    """Spool on (candidate) against the 0.1 configuration (baseline)."""

    start_end: Comparison
    span_end: Comparison
    lifecycle: Comparison
    live_spool: LiveSide
    live_memory: LiveSide
    live_rate: float
    live_phases: int
    live_seconds: float
    store: Dict[str, float]  # microseconds per record
    spans_per_round: int
    rounds: int
    e2e_rounds: int
    e2e_spans: int


# ---------------------------------------------------------------- isolated
def _isolated(spans: ServerSpans, rounds: int, e2e_rounds: int, e2e_spans: int,
              work: str) -> Tuple[Comparison, Comparison, Comparison]:
    count = len(spans.finished)
    queue = max(count, e2e_spans) * 2 + 10
    settings = {"batch_size": queue, "max_queue_size": queue, "publish_interval": _HOUR_S}
    parked = processor_module._SPOOL_TICK
    processor_module._SPOOL_TICK = _HOUR_S  # read by the collector at each wait: built parked, it stays so
    try:
        spool = _processor(os.path.join(work, "isolated"), **settings)
        memory = _processor(None, **settings)
        try:
            pairs = list(zip(spans.live, spans.finished))
            start_end = interleave(_start_end_round(spool, pairs, lambda: _reset_ours(spool)),
                                   _start_end_round(memory, pairs, lambda: _reset_ours(memory)), rounds)
        finally:
            _reset_ours(spool)
            _reset_ours(memory)
            spool.shutdown()
            memory.shutdown()
        requests = _requests(e2e_spans)
        spool = _processor(os.path.join(work, "isolated-e2e"), **settings)
        memory = _processor(None, **settings)
        spool_provider = TracerProvider(resource=RESOURCE)
        spool_provider.add_span_processor(spool)
        memory_provider = TracerProvider(resource=RESOURCE)
        memory_provider.add_span_processor(memory)
        try:
            span_end = interleave(_span_end_round(spool_provider, spool, requests, lambda: _reset_ours(spool)),
                                  _span_end_round(memory_provider, memory, requests, lambda: _reset_ours(memory)),
                                  e2e_rounds)
            lifecycle = interleave(_lifecycle_round(spool_provider, spool, requests, lambda: _reset_ours(spool)),
                                   _lifecycle_round(memory_provider, memory, requests,
                                                    lambda: _reset_ours(memory)), e2e_rounds)
        finally:
            _reset_ours(spool)
            _reset_ours(memory)
            spool_provider.shutdown()
            memory_provider.shutdown()
    finally:
        processor_module._SPOOL_TICK = parked
    return start_end, span_end, lifecycle


# ---------------------------------------------------------------- live pipeline
def _live_phase(provider: TracerProvider, processor: O2AuditSpanProcessor, requests: Sequence[Tuple[str, Dict[str,
                Any], int]], rate: float, seconds: float) -> Tuple[float, float, float, float]:
    tracer = provider.get_tracer(INSTRUMENTATION_SCOPE, "0.66b2")
    empty = Context()
    server = SpanKind.SERVER
    clock = time.perf_counter_ns
    latencies: List[int] = []
    total = int(rate * seconds)
    tick = 0.005
    cpu0 = sum(os.times()[:2])
    start = time.perf_counter()
    sent = 0
    next_tick = start
    while sent < total:
        due = min(total, int((time.perf_counter() - start) * rate) + 1) - sent
        for _ in range(due):
            name, attributes, status = requests[sent % len(requests)]
            began = clock()
            span = tracer.start_span(name, context=empty, kind=server, attributes=attributes)
            span.set_attribute("http.status_code", status)
            span.end()
            latencies.append(clock() - began)
            sent += 1
        next_tick += tick
        delay = next_tick - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
    # Settle this phase's background work before the other side's phase starts; bill it to this side.
    processor.force_flush(60_000)
    cpu = sum(os.times()[:2]) - cpu0
    latencies.sort()
    return (statistics.fmean(latencies), float(latencies[len(latencies) // 2]),
            float(latencies[int(len(latencies) * 0.99)]), cpu / total * 1e6)


def _live(rate: float, phases: int, seconds: float, work: str) -> Tuple[LiveSide, LiveSide]:
    settings = {"batch_size": 500, "publish_interval": 1.0, "max_queue_size": 10_000}
    requests = _requests(997)
    sides: Dict[str, Tuple[List[float], List[float], List[float], List[float]]] = {}
    providers: Dict[str, Tuple[TracerProvider, O2AuditSpanProcessor]] = {}
    for name, spool_dir in (("spool", os.path.join(work, "live")), ("memory", None)):
        processor = _processor(spool_dir, **settings)
        provider = TracerProvider(resource=RESOURCE)
        provider.add_span_processor(processor)
        providers[name] = (provider, processor)
        sides[name] = ([], [], [], [])
    try:
        for name in ("spool", "memory"):  # warm-up
            _live_phase(*providers[name], requests, rate, min(seconds, 0.5))
        for index in range(phases):
            order = ("spool", "memory") if index % 2 == 0 else ("memory", "spool")
            for name in order:
                figures = _live_phase(*providers[name], requests, rate, seconds)
                for column, value in zip(sides[name], figures):
                    column.append(value)
                time.sleep(0.2)
    finally:
        for provider, _unused in providers.values():
            provider.shutdown()
    return LiveSide(*sides["spool"]), LiveSide(*sides["memory"])


# ---------------------------------------------------------------- the store alone
def _records(spans: Sequence[ReadableSpan]) -> List[AuditRecord]:
    exporter = O2AuditSpanExporter(O2AuditConfig.from_env({}, endpoint="file:///tmp/otel-o2audit-bench-unused.jsonl"),
                                   sink=NullSink())
    out = [exporter.to_record(span) for span in spans]
    return [r for r in out if r is not None]


def _chunks(items: Sequence[AuditRecord], size: int) -> Iterator[Sequence[AuditRecord]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _store_costs(records: List[AuditRecord], work: str, repeats: int) -> Dict[str, float]:
    adds: List[float] = []
    takes: List[float] = []
    decodes: List[float] = []
    memory: List[float] = []
    line_bytes = 0.0
    for repeat in range(repeats):
        directory = os.path.join(work, f"store-{repeat}")
        store = SpoolStore(directory, max_bytes=1 << 34, fsync_interval=1.0)
        start = time.perf_counter()
        for chunk in _chunks(records, 125):  # what the collector writes per 0.25 s tick at 500 requests/s
            store.add(chunk)
        adds.append(time.perf_counter() - start)
        segments = [name for name in os.listdir(directory) if name.endswith(".log")]
        size = sum(os.path.getsize(os.path.join(directory, name)) for name in segments)
        line_bytes = size / len(records)
        start = time.perf_counter()
        taken = 0
        while True:
            batch = store.take(500)
            if batch is None:
                break
            taken += len(batch.records)
            store.settle(batch)
        takes.append(time.perf_counter() - start)
        assert taken == len(records), f"the spool gave back {taken} of {len(records)} records"
        store.close()
        # The floor: only splitting and decoding the same lines.
        lines = []
        for record in records:
            body = json.dumps(record, separators=(",", ":"), ensure_ascii=False, default=str).encode()
            lines.append(b"%08x %s" % (zlib.crc32(body), body))
        data = b"\n".join(lines) + b"\n"
        start = time.perf_counter()
        position = 0
        while True:
            end = data.find(b"\n", position)
            if end < 0:
                break
            line = data[position:end]
            position = end + 1
            body = line[9:]
            if int(line[:8], 16) == zlib.crc32(body):
                json.loads(body)
        decodes.append(time.perf_counter() - start)
        shutil.rmtree(directory, ignore_errors=True)
        mem = MemoryStore()
        start = time.perf_counter()
        for chunk in _chunks(records, 125):
            mem.add(chunk)
        while mem.take(500) is not None:
            pass
        memory.append(time.perf_counter() - start)
    per = 1e6 / len(records)
    return {
        "add": median(adds) * per,
        "take": median(takes) * per,
        "decode": median(decodes) * per,
        "memory": median(memory) * per,
        "line_bytes": line_bytes,
        "records": float(len(records)),
    }


def run_spool_path(spans: ServerSpans, rounds: int, e2e_rounds: int, e2e_spans: int, live_rate: float = 2000.0,
                   live_phases: int = 8, live_seconds: float = 2.0, store_records: Sequence[ReadableSpan] = (),
                   store_repeats: int = 3, progress: Callable[[str], None] = lambda message: None) -> SpoolPathResults:
    """Measure the spool side against the memory side: isolated, live, and the store alone."""
    work = tempfile.mkdtemp(prefix="o2audit-spool-path-")
    try:
        progress("(c) spool vs 0.1 configuration: isolated request path")
        start_end, span_end, lifecycle = _isolated(spans, rounds, e2e_rounds, e2e_spans, work)
        progress(f"(c) live pipeline: {live_phases} phases x {live_seconds:g} s per side at {live_rate:g} requests/s")
        live_spool, live_memory = _live(live_rate, live_phases, live_seconds, work)
        progress("(c) spool store, worker side")
        store = _store_costs(_records(store_records or spans.finished), work, store_repeats)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return SpoolPathResults(start_end, span_end, lifecycle, live_spool, live_memory, live_rate, live_phases,
                            live_seconds, store, len(spans.finished), rounds, e2e_rounds, e2e_spans)


# ---------------------------------------------------------------- tables
def _paired(candidate: List[float], baseline: List[float]) -> Tuple[float, float, float]:
    ratios = [c / b for c, b in zip(candidate, baseline) if b]
    return median(ratios), quantile(ratios, 0.25), quantile(ratios, 0.75)


def spool_path_sections(results: SpoolPathResults) -> List[Any]:
    """Tables (c): request path, live pipeline, store."""
    from bench_report import Section, fmt_ratio, verdict

    section = Section(
        "(c) Request path with the durable spool on vs the 0.1 configuration (memory store, no spool)",
        headers=["measure", "spool on ns", "0.1 config ns", "spool/0.1", "IQR", "target", "result"],
    )

    def row(label: str, comparison: Comparison, target: Optional[float]) -> List[str]:
        low, high = comparison.ratio_spread
        return [label, f"{comparison.candidate_median:,.0f}", f"{comparison.baseline_median:,.0f}",
                fmt_ratio(comparison.ratio), f"{low:.2f}-{high:.2f}",
                f"<= {fmt_ratio(target)}" if target else "info",
                verdict(comparison.ratio <= target) if target else "-"]

    def live_row(label: str, spool: List[float], memory: List[float], target: Optional[float],
                 unit: float = 1.0, digits: int = 0) -> List[str]:
        ratio, low, high = _paired(spool, memory)
        return [label, f"{median(spool) * unit:,.{digits}f}", f"{median(memory) * unit:,.{digits}f}", fmt_ratio(ratio),
                f"{low:.2f}-{high:.2f}", f"<= {fmt_ratio(target)}" if target else "info",
                verdict(ratio <= target) if target else "-"]

    spool, memory = results.live_spool, results.live_memory
    section.rows = [
        row("isolated: on_start + on_end  [headline]", results.start_end, SPOOL_PATH_TARGET),
        row("isolated: span.end() through a TracerProvider", results.span_end, SPOOL_PATH_TARGET),
        row("isolated: start_span + set_attribute + end() via TracerProvider", results.lifecycle, None),
        live_row(f"live, {results.live_rate:,.0f} req/s: start_span..end() mean", spool.mean_ns, memory.mean_ns,
                 None),
        live_row("live: start_span..end() median", spool.p50_ns, memory.p50_ns, None),
        live_row("live: start_span..end() p99", spool.p99_ns, memory.p99_ns, None),
        live_row("live: process CPU per request, background work included (ns)", spool.cpu_us, memory.cpu_us,
                 None, unit=1000.0),
    ]
    section.notes = [
        f"Isolated: median of {results.rounds} rounds x {results.spans_per_round} spans (on_start + on_end) and "
        f"{results.e2e_rounds} rounds x {results.e2e_spans} spans (through a TracerProvider with only that "
        "processor), the sides alternating round by round, GC paused, queues emptied between rounds; the spool "
        "collector's 0.25 s tick is parked during these rounds (as the memory side's worker never wakes), so "
        "they time the request path alone. With the spool on, on_start/on_end run the same code as without: "
        "the spool is written by the collector thread.",
        f"Live: both processors as in production (batch 500, publish interval 1 s, queue 10000, fsync 1 s), "
        f"threads running, a sink that acknowledges at once; {results.live_phases} phases of "
        f"{results.live_seconds:g} s per side at {results.live_rate:,.0f} requests/s (10 per 5 ms tick), the "
        "sides alternating phase by phase; per phase the mean, median and 99th percentile of each request's "
        "start_span..end() and the process CPU time per request (the phase plus force_flush, so the "
        "background work of that side is billed to it); the row shows medians over phases and the median of "
        "the paired phase ratios. Latency includes waiting for the GIL while the collector or sender runs; "
        "the mean and p99 depend on where the background bursts fall and are noisy, hence no verdict.",
        "The 0.1 configuration is this same processor without spool_dir: the memory store. Table (a) compares "
        "it with the SDK's BatchSpanProcessor.",
    ]
    store = results.store
    store_section = Section(
        "(c) The spool store, worker side, per record (not on the request path)",
        headers=["step", "us/record"],
        rows=[
            ["SpoolStore.add (JSON + crc32 + write, 125 records per call)", f"{store['add']:.2f}"],
            ["SpoolStore.take(500) + settle (read back, split, verify, decode, ack)", f"{store['take']:.2f}"],
            ["for comparison: split + crc32 + json.loads of the same lines, nothing else", f"{store['decode']:.2f}"],
            ["for comparison: MemoryStore add + take", f"{store['memory']:.2f}"],
        ],
    )
    store_section.notes = [
        f"{store['records']:,.0f} records built from the benchmark's spans, {store['line_bytes']:.0f} bytes per "
        "spool line; median of the repeats. take() runs while the spool drains after an outage, on the "
        "sender thread, in series with the HTTP send: records/s of the drain <= 1e6 / (take + send).",
    ]
    return [section, store_section]
