"""Worker-side cost per record: span -> record, JSON encoding, gzip; and what the OTLP exporter pays instead.

None of this runs on the request path, but it runs under the same GIL, so it is CPU an application pays.
Each component is timed on its own (median of repeats) with the exact functions the sinks use.
"""

from __future__ import annotations

import gzip
import json
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence

from bench_request_path import make_ours
from bench_spans import batches
from bench_util import gc_paused, median
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import ReadableSpan

from otel_o2audit.client import DeliveryReport
from otel_o2audit.config import O2AuditConfig
from otel_o2audit.exporter import O2AuditSpanExporter
from otel_o2audit.record import AuditRecord

try:  # the exact encoder HttpSink uses
    from otel_o2audit.client import _encode as http_encode
except ImportError:  # pragma: no cover - the private helper moved: use the documented equivalent

    def http_encode(records: Sequence[AuditRecord]) -> bytes:
        """JSON array, compact, UTF-8 (what HttpSink puts on the wire before gzip)."""
        return json.dumps(list(records), separators=(",", ":"), ensure_ascii=False, default=str).encode("utf-8")


__all__ = ["GZIP_LEVEL", "EncodingSink", "WorkerResults", "file_sink_encode", "http_encode", "run_worker"]

_now = time.perf_counter_ns
GZIP_LEVEL = 5  # HttpSink's level


def file_sink_encode(records: Sequence[AuditRecord]) -> bytes:
    """FileSink's encoding: one ``json.dumps`` per record, one line each (copied from ``FileSink.send``)."""
    return b"".join(
        json.dumps(r, separators=(",", ":"), ensure_ascii=False, default=str).encode("utf-8") + b"\n"
        for r in records
    )


class EncodingSink:
    """Does HttpSink's CPU work (JSON + gzip) and acknowledges, without any I/O."""

    def __init__(self) -> None:
        self.records = 0

    def send(self, records: Sequence[AuditRecord], deadline: float) -> DeliveryReport:
        """Encode and compress like HttpSink, then report every record as delivered."""
        gzip.compress(http_encode(records), compresslevel=GZIP_LEVEL)
        self.records += len(records)
        return DeliveryReport(len(records), delivered=len(records), attempts=1)

    def close(self) -> None:
        """Nothing to release."""

    def describe(self) -> str:
        """Where records go."""
        return "encoding sink (benchmark)"


@dataclass(frozen=True)
class WorkerResults:
    """Microseconds per record of each worker-side step, and payload sizes."""

    convert_us: float
    json_us: float
    gzip_us: float
    file_json_us: float
    processor_us: float
    otlp_encode_us: float
    otlp_gzip_us: float
    json_bytes: float
    gzip_bytes: float
    otlp_bytes: float

    @property
    def http_path_us(self) -> float:
        """Conversion + JSON + gzip: the CPU HttpSink's records cost before the socket."""
        return self.convert_us + self.json_us + self.gzip_us

    def shares(self) -> Dict[str, float]:
        """Each step's share of :attr:`http_path_us`."""
        total = self.http_path_us or 1.0
        return {"conversion": self.convert_us / total, "json": self.json_us / total, "gzip": self.gzip_us / total}


def _per_record(steps: Dict[str, Callable[[], object]], records: int, repeats: int) -> Dict[str, float]:
    """Median microseconds per record of each step; the steps take turns, rotating, once per repeat, so
    load from elsewhere on the machine is shared out evenly."""
    samples: Dict[str, List[float]] = {name: [] for name in steps}
    order = list(steps.items())
    with gc_paused():
        for _name, step in order:  # warm-up
            step()
        for repeat in range(repeats):
            shift = repeat % len(order)
            for name, step in order[shift:] + order[:shift]:
                start = _now()
                step()
                samples[name].append((_now() - start) / records / 1000)
    return {name: median(values) for name, values in samples.items()}


def _processor_pipeline_us(spans: Sequence[ReadableSpan], batch_size: int, repeats: int) -> float:
    """Wall time per record of on_end -> worker drain (to_record, counters) -> EncodingSink, no I/O."""
    samples: List[float] = []
    for _ in range(repeats + 1):
        sink = EncodingSink()
        processor = make_ours(queue=len(spans) + batch_size, sink=sink, batch_size=batch_size)
        with gc_paused():
            start = _now()
            for span in spans:
                processor.on_end(span)
            ok = processor.force_flush(120_000)
            elapsed = _now() - start
        processor.shutdown()
        assert ok, "force_flush failed"
        assert sink.records == len(spans), "the processor did not deliver every record"
        samples.append(elapsed / len(spans) / 1000)
    return median(samples[1:])


def run_worker(spans: Sequence[ReadableSpan], batch_size: int, repeats: int) -> WorkerResults:
    """Time each worker-side step over ``spans`` in batches of ``batch_size``."""
    config = O2AuditConfig.from_env({}, endpoint="file:///tmp/otel-o2audit-bench-unused.jsonl")
    exporter = O2AuditSpanExporter(config, sink=EncodingSink())
    to_record = exporter.to_record
    records = [to_record(span) for span in spans]
    assert all(r is not None for r in records), "a benchmark span was not audited"
    ready: List[AuditRecord] = [r for r in records if r is not None]
    record_batches = batches(ready, batch_size)
    span_batches = batches(spans, batch_size)
    encoded = [http_encode(b) for b in record_batches]
    otlp = [encode_spans(b).SerializePartialToString() for b in span_batches]
    count = len(spans)

    def convert() -> None:
        for span in spans:
            to_record(span)

    def encode() -> None:
        for batch in record_batches:
            http_encode(batch)

    def compress() -> None:
        for body in encoded:
            gzip.compress(body, compresslevel=GZIP_LEVEL)

    def file_encode() -> None:
        for batch in record_batches:
            file_sink_encode(batch)

    def otlp_encode() -> None:
        for batch in span_batches:
            encode_spans(batch).SerializePartialToString()

    def otlp_compress() -> None:
        for body in otlp:
            gzip.compress(body)  # what OTLPSpanExporter(compression=gzip) does: GzipFile, level 9

    us = _per_record(
        {
            "convert": convert,
            "json": encode,
            "gzip": compress,
            "file_json": file_encode,
            "otlp_encode": otlp_encode,
            "otlp_gzip": otlp_compress,
        },
        count,
        repeats,
    )
    result = WorkerResults(
        convert_us=us["convert"],
        json_us=us["json"],
        gzip_us=us["gzip"],
        file_json_us=us["file_json"],
        processor_us=_processor_pipeline_us(spans, batch_size, max(1, repeats // 2)),
        otlp_encode_us=us["otlp_encode"],
        otlp_gzip_us=us["otlp_gzip"],
        json_bytes=sum(len(b) for b in encoded) / count,
        gzip_bytes=sum(len(gzip.compress(b, compresslevel=GZIP_LEVEL)) for b in encoded) / count,
        otlp_bytes=sum(len(b) for b in otlp) / count,
    )
    exporter.shutdown()
    return result
