"""(b) Records per second to a loopback receiver: our exporter (HttpSink) against ``OTLPSpanExporter``.

Both export the same finished spans, in the same batches, synchronously, to the same kind of receiver
(:mod:`bench_receiver`, a separate process on 127.0.0.1). The wall time covers everything each exporter does
per batch: ours converts spans to records, encodes JSON, gzips and POSTs, then reads OpenObserve's answer;
OTLP encodes protobuf, (optionally) gzips and POSTs. Repeats are interleaved, rotating the order.
"""

from __future__ import annotations

import contextlib
import cProfile
import gzip
import io
import json
import os
import pstats
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Sequence, Tuple

import requests
from bench_spans import batches
from bench_util import gc_paused, median
from bench_worker import GZIP_LEVEL, http_encode
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from otel_o2audit.config import O2AuditConfig
from otel_o2audit.exporter import O2AuditSpanExporter

__all__ = [
    "OTLP",
    "OTLP_CPU",
    "OTLP_GZIP",
    "OTLP_HTTP",
    "OURS",
    "OURS_CPU",
    "OURS_HTTP",
    "ThroughputResults",
    "profile_ours",
    "receiver",
    "run_throughput",
]

_HERE = os.path.dirname(os.path.abspath(__file__))
OURS = "otel-o2audit (HttpSink, JSON+gzip)"
OTLP = "OTLPSpanExporter (protobuf, no compression: default)"
OTLP_GZIP = "OTLPSpanExporter (protobuf, gzip)"
OURS_CPU = "ours without HTTP (convert + JSON + gzip)"
OTLP_CPU = "OTLP without HTTP (protobuf encoding)"
OURS_HTTP = "ours HTTP only (POST of the ready gzip body + reading the answer)"
OTLP_HTTP = "OTLP HTTP only (POST of the ready protobuf body)"


@contextlib.contextmanager
def receiver() -> Iterator[Tuple[int, Callable[[], Dict[str, int]]]]:
    """Start :mod:`bench_receiver` in a child process; yield its port and a ``stats()`` reader."""
    proc = subprocess.Popen(  # our own child, stopped by its handle below
        [sys.executable, os.path.join(_HERE, "bench_receiver.py")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        if not line.isdigit():
            raise RuntimeError(f"the receiver did not start (it said {line!r})")
        port = int(line)

        def stats() -> Dict[str, int]:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=10) as response:
                data: Dict[str, int] = json.load(response)
            return data

        yield port, stats
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class ThroughputResults:
    """Per-repeat wall seconds of exporting every span, by exporter."""

    spans: int
    batch_size: int
    seconds: Dict[str, List[float]] = field(default_factory=dict)
    wire_bytes: Dict[str, float] = field(default_factory=dict)

    def rate(self, name: str) -> float:
        """Median records per second."""
        return self.spans / median(self.seconds[name])

    def us_per_record(self, name: str) -> float:
        """Median microseconds per record."""
        return median(self.seconds[name]) / self.spans * 1e6

    def ratio(self, name: str, baseline: str) -> float:
        """Median of the per-repeat throughput ratios ``name / baseline`` (higher is better)."""
        return median([b / c for c, b in zip(self.seconds[name], self.seconds[baseline])])

    def ratio_spread(self, name: str, baseline: str) -> Tuple[float, float]:
        """Lowest and highest per-repeat throughput ratio."""
        ratios = [b / c for c, b in zip(self.seconds[name], self.seconds[baseline])]
        return min(ratios), max(ratios)


def _ours(port: int, batch_size: int) -> O2AuditSpanExporter:
    config = O2AuditConfig.from_env(
        {},
        endpoint=f"http://127.0.0.1:{port}",
        user="bench@example.com",
        password="bench-password",
        batch_size=batch_size,
        retry_max_elapsed=30.0,
    )
    return O2AuditSpanExporter(config)


def _otlp(port: int, gzip: bool) -> OTLPSpanExporter:
    return OTLPSpanExporter(
        endpoint=f"http://127.0.0.1:{port}/v1/traces",
        compression=Compression.Gzip if gzip else Compression.NoCompression,
        timeout=30,
    )


def _export_loop(exporter: SpanExporter, span_batches: Sequence[Sequence[ReadableSpan]]) -> None:
    for batch in span_batches:
        result = exporter.export(batch)
        if result is not SpanExportResult.SUCCESS:
            raise RuntimeError(f"{exporter!r} failed to export a batch")


def _timed(run: Callable[[Sequence[ReadableSpan]], object], span_batches: Sequence[Sequence[ReadableSpan]]) -> float:
    """Seconds to pass every batch to ``run``; an exporter's result must be SUCCESS."""
    start = time.perf_counter()
    for batch in span_batches:
        if run(batch) is SpanExportResult.FAILURE:
            raise RuntimeError(f"{run!r} failed to export a batch")
    return time.perf_counter() - start


Runner = Callable[[Sequence[ReadableSpan]], object]


def _probes(ours: O2AuditSpanExporter, port: int, span_batches: Sequence[Sequence[ReadableSpan]],
            session: requests.Session) -> List[Tuple[str, Runner]]:
    """Each exporter's work split in two, for the same batches, timed in the same rotation as the exports.

    Before the socket: ours converts, encodes JSON and gzips; OTLP encodes protobuf. The HTTP round trip:
    the ready bodies (built here, untimed) are POSTed on a keep-alive ``requests.Session`` with the headers
    each exporter sends, to the same receiver, and the answer is read (ours parses OpenObserve's JSON).
    """
    to_record = ours.to_record

    def ours_cpu(batch: Sequence[ReadableSpan]) -> None:
        records = [r for r in (to_record(span) for span in batch) if r is not None]
        gzip.compress(http_encode(records), compresslevel=GZIP_LEVEL)

    def otlp_cpu(batch: Sequence[ReadableSpan]) -> None:
        encode_spans(batch).SerializePartialToString()

    ours_bodies = {
        id(batch): gzip.compress(http_encode([r for r in (to_record(s) for s in batch) if r is not None]),
                                 compresslevel=GZIP_LEVEL)
        for batch in span_batches
    }
    otlp_bodies = {id(batch): encode_spans(batch).SerializePartialToString() for batch in span_batches}
    ours_url = f"http://127.0.0.1:{port}/api/_meta/audit/_json"
    ours_headers = {"Authorization": "Basic YmVuY2g6YmVuY2g=", "Content-Type": "application/json",
                    "Content-Encoding": "gzip", "User-Agent": "otel-o2audit"}
    otlp_url = f"http://127.0.0.1:{port}/v1/traces"
    otlp_headers = {"Content-Type": "application/x-protobuf"}

    def ours_http(batch: Sequence[ReadableSpan]) -> None:
        response = session.post(ours_url, data=ours_bodies[id(batch)], headers=ours_headers, timeout=30,
                                allow_redirects=False)
        if response.status_code != 200 or response.json()["status"][0]["successful"] != len(batch):
            raise RuntimeError(f"the receiver did not accept the batch: {response.status_code}")

    def otlp_http(batch: Sequence[ReadableSpan]) -> None:
        response = session.post(otlp_url, data=otlp_bodies[id(batch)], headers=otlp_headers, timeout=30)
        if response.status_code != 200:
            raise RuntimeError(f"the receiver did not accept the batch: {response.status_code}")
        response.content  # noqa: B018 - read the (empty) answer, as the exporter does

    return [(OURS_CPU, ours_cpu), (OTLP_CPU, otlp_cpu), (OURS_HTTP, ours_http), (OTLP_HTTP, otlp_http)]


def run_throughput(spans: Sequence[ReadableSpan], batch_size: int, repeats: int,
                   chunk_batches: int = 4) -> ThroughputResults:
    """Export all ``spans`` ``repeats`` times with each exporter; verify the receiver's counts.

    Within a repeat the exporters take turns every ``chunk_batches`` batches (rotating who goes first), so
    a burst of load from elsewhere on the machine hits all of them alike; each exporter's time is the sum
    of its chunks. The probes (:func:`_probes`) take part in the same rotation.
    """
    span_batches = batches(spans, batch_size)
    chunks = [span_batches[i : i + chunk_batches] for i in range(0, len(span_batches), chunk_batches)]
    results = ThroughputResults(spans=len(spans), batch_size=batch_size)
    with receiver() as (port, stats), requests.Session() as session:
        exporters: List[Tuple[str, SpanExporter]] = [
            (OURS, _ours(port, batch_size)),
            (OTLP, _otlp(port, gzip=False)),
            (OTLP_GZIP, _otlp(port, gzip=True)),
        ]
        runners: List[Tuple[str, Runner]] = [(name, exporter.export) for name, exporter in exporters]
        first = exporters[0][1]
        assert isinstance(first, O2AuditSpanExporter)
        probes = _probes(first, port, span_batches, session)
        runners += probes
        warm_up = span_batches[:2]
        for name, exporter in exporters:  # warm-up (connect, fill caches); measures the payload size too
            before = stats()["wire_bytes"]
            _export_loop(exporter, warm_up)
            results.wire_bytes[name] = (stats()["wire_bytes"] - before) / sum(len(b) for b in warm_up)
        for name, _run in runners:
            results.seconds[name] = []
        turn = 0
        for _ in range(repeats):
            elapsed = {name: 0.0 for name, _ in runners}
            start_stats = stats()
            with gc_paused():
                for chunk in chunks:
                    shift = turn % len(runners)
                    turn += 1
                    for name, run in runners[shift:] + runners[:shift]:
                        elapsed[name] += _timed(run, chunk)
            end_stats = stats()
            expected_requests = len(span_batches) * (len(exporters) + 2)  # + the two HTTP-only probes
            if end_stats["requests"] - start_stats["requests"] != expected_requests:
                raise RuntimeError(f"the receiver saw {end_stats['requests'] - start_stats['requests']} "
                                   f"requests, expected {expected_requests}")
            if end_stats["records"] - start_stats["records"] != 2 * len(spans):  # ours + its HTTP probe
                raise RuntimeError(f"{OURS}: the receiver counted {end_stats['records'] - start_stats['records']}"
                                   f" records, expected {2 * len(spans)}")
            for name, seconds in elapsed.items():
                results.seconds[name].append(seconds)
        if stats()["mismatches"]:
            raise RuntimeError("the receiver's cheap record count disagreed with json.loads")
        for _, exporter in exporters:
            exporter.shutdown()
    return results


_CATEGORIES: Tuple[Tuple[str, Tuple[str, ...]], ...] = (
    ("conversion", ("otel_o2audit/record.py", "otel_o2audit/redact.py", "otel_o2audit/routes.py",
                    "otel_o2audit/scope.py", "otel_o2audit/exporter.py", "opentelemetry/", "_collections_abc",
                    "urllib/parse.py", "functools")),
    ("json", ("json/", "_json")),
    ("gzip", ("gzip.py", "zlib")),
    ("http", ("requests/", "urllib3/", "http/client.py", "socket", "email/", "ssl", "selectors", "select",
              "urllib/request.py", "<frozen os>", "otel_o2audit/client.py")),
)

_Key = Tuple[str, int, str]


def _category(key: _Key, table: Dict[_Key, Tuple[Any, ...]], depth: int = 0) -> Dict[str, float]:
    """Weights of the categories ``key``'s own time belongs to; a builtin (``~``) or an unknown function
    inherits them from its callers, in proportion to the time each caller spent in it."""
    filename, _line, function = key
    where = f"{filename} {function}"
    for name, needles in _CATEGORIES:
        if any(needle in where for needle in needles):
            return {name: 1.0}
    callers = table[key][4] if key in table else {}
    if depth > 6 or not callers:
        return {"other": 1.0}
    total = sum(row[2] for row in callers.values())
    weights: Dict[str, float] = {}
    for caller, row in callers.items():
        share = row[2] / total if total else 1.0 / len(callers)
        for name, weight in _category(caller, table, depth + 1).items():
            weights[name] = weights.get(name, 0.0) + share * weight
    return weights or {"other": 1.0}


def profile_ours(spans: Sequence[ReadableSpan], batch_size: int, top: int = 15) -> Tuple[Dict[str, float], str]:
    """cProfile one full export by our exporter; return time shares by category and the top functions."""
    span_batches = batches(spans, batch_size)
    with receiver() as (port, _stats):
        exporter = _ours(port, batch_size)
        _export_loop(exporter, span_batches[:1])
        profiler = cProfile.Profile()
        with gc_paused():
            profiler.enable()
            _export_loop(exporter, span_batches)
            profiler.disable()
        exporter.shutdown()
    stats = pstats.Stats(profiler)
    totals: Dict[str, float] = {name: 0.0 for name, _ in _CATEGORIES}
    totals["other"] = 0.0
    grand = 0.0
    table: Dict[_Key, Tuple[Any, ...]] = stats.stats  # type: ignore[attr-defined]
    for key, row in table.items():
        grand += row[2]
        for name, weight in _category(key, table).items():
            totals[name] += row[2] * weight
    shares = {name: value / grand for name, value in totals.items()} if grand else totals
    text = io.StringIO()
    stats.stream = text  # type: ignore[attr-defined]
    stats.strip_dirs().sort_stats("tottime").print_stats(top)
    lines = [line for line in text.getvalue().splitlines() if line.strip()]
    start = next((i for i, line in enumerate(lines) if line.lstrip().startswith("ncalls")), 0)
    return shares, "\n".join(lines[start:])
