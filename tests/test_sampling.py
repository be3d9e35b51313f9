"""Completeness under sampling (issue 3, item 1): no sampler and no caller header removes a request from the trail.

Code setup: a real SDK ``TracerProvider(sampler=...)``, ``otel_o2audit.install(provider, endpoint=file://...)``
and a FastAPI app instrumented with ``FastAPIInstrumentor.instrument_app(app, tracer_provider=provider)``,
driven by TestClient. Zero-code setup: ``opentelemetry-instrument uvicorn`` with ``O2_AUDIT_ENABLED=true``,
stopped with SIGTERM. In both, every request gives exactly one audit record while tracing is unchanged: SDK
span processors (Simple and Batch) fed into an InMemorySpanExporter, and the console exporter, see only the
spans the user's sampler sampled; internal spans are not upgraded; the server span's sampled flag (and the
one propagated downstream) stays off.
"""

from __future__ import annotations

import re
import signal
import threading
import uuid
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from inproc import Counters, Harness, wait_until
from opentelemetry import propagate
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    Decision,
    ParentBased,
    Sampler,
    TraceIdRatioBased,
)
from opentelemetry.trace import SpanKind
from procs import Launcher, child_env, read_jsonl
from procs import wait_until as wait_proc

import otel_o2audit
from otel_o2audit import AuditSampler
from otel_o2audit.sampling import ensure_audit_sampler

SAMPLING_APP = "tests.apps_extra.sampling_app:app"
PARENT_SPAN_ID = "00f067aa0ba902b7"
ITEM_ROUTE = "/api/{org_id}/items/{item_id}"


def traceparent(trace_id: str, sampled: bool) -> str:
    return f"00-{trace_id}-{PARENT_SPAN_ID}-{'01' if sampled else '00'}"


def sampled_flag(header: str) -> bool:
    """The sampled bit of a W3C traceparent (the SDK may also set bit 1, "random trace id")."""
    return bool(int(header.rsplit("-", 1)[1], 16) & 0x01)


def new_trace_id() -> str:
    return uuid.uuid4().hex


# ------------------------------------------------------------------------------------------------ code setup
class EveryEndedSpan(SpanProcessor):
    """Sees every span that was recorded (sampled or RECORD_ONLY): the SDK calls processors for both."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._spans: List[ReadableSpan] = []

    def on_end(self, span: ReadableSpan) -> None:
        with self._lock:
            self._spans.append(span)

    @property
    def spans(self) -> List[ReadableSpan]:
        with self._lock:
            return list(self._spans)

    def of_kind(self, kind: SpanKind) -> List[ReadableSpan]:
        return [s for s in self.spans if s.kind is kind]


def sampling_app(provider: TracerProvider) -> FastAPI:
    """A small API traced only by the contrib instrumentation (FastAPI's native telemetry off)."""
    app = FastAPI(telemetry={"tracing": False, "metrics": False, "logs": False})  # type: ignore[arg-type]

    @app.get("/api/{org_id}/items/{item_id}")
    async def get_item(org_id: str, item_id: int) -> Dict[str, Any]:
        return {"org_id": org_id, "item_id": item_id}

    @app.get("/propagate")
    async def propagate_headers() -> Dict[str, str]:
        carrier: Dict[str, str] = {}
        propagate.inject(carrier)
        return carrier

    @app.get("/healthz")
    async def healthz() -> Dict[str, str]:
        return {"status": "ok"}

    FastAPIInstrumentor.instrument_app(app, tracer_provider=provider)
    return app


class Stack:
    """Provider with the user's sampler + (Simple|Batch)SpanProcessor -> memory + audit to a JSON-lines file."""

    def __init__(self, harness: Harness, tmp_path: Path, sampler: Sampler, span_processor: str = "simple") -> None:
        self.memory = InMemorySpanExporter()
        self.provider = harness.provider(sampler=sampler)
        self.everything = EveryEndedSpan()
        self.provider.add_span_processor(self.everything)
        self.batch: Optional[BatchSpanProcessor] = None
        if span_processor == "batch":
            self.batch = BatchSpanProcessor(self.memory, schedule_delay_millis=50)
            self.provider.add_span_processor(self.batch)
        else:
            self.provider.add_span_processor(SimpleSpanProcessor(self.memory))
        self.path = tmp_path / "audit.jsonl"
        self.processor = harness.install(self.provider, None, endpoint=f"file://{self.path}", publish_interval=0.2)
        self.app = sampling_app(self.provider)

    def records(self, expected: int) -> List[Dict[str, Any]]:
        """Wait for the publish interval to write ``expected`` records; then exactly that many."""
        wait_until(lambda: len(read_jsonl(self.path)) >= expected, timeout=10.0,
                   message=f"{expected} records in {self.path}")
        assert self.processor.force_flush(5000) is True
        records = read_jsonl(self.path)
        assert len(records) == expected, records
        return records

    def exported(self) -> Tuple[ReadableSpan, ...]:
        """What the user's exporter received."""
        if self.batch is not None:
            assert self.batch.force_flush(5000) is True
        return self.memory.get_finished_spans()


def drive(client: TestClient, count: int, header: Optional[Any] = None) -> List[Tuple[str, Optional[str]]]:
    """``count`` GETs of distinct items (plus their trace ids when ``header`` builds a traceparent)."""
    sent: List[Tuple[str, Optional[str]]] = []
    for i in range(count):
        trace_id = new_trace_id() if header is not None else None
        headers = {"traceparent": header(trace_id)} if header is not None else {}
        path = f"/api/acme/items/{i}"
        assert client.get(path, headers=headers).status_code == 200
        sent.append((path, trace_id))
    return sent


UNSAMPLED_CASES = [
    pytest.param(TraceIdRatioBased(0), None, id="traceidratio-0"),
    pytest.param(ALWAYS_OFF, None, id="always_off"),
    pytest.param(ParentBased(ALWAYS_ON), False, id="parentbased-always_on-caller-traceparent-00"),
    pytest.param(ParentBased(TraceIdRatioBased(0)), None, id="parentbased-traceidratio-0"),
    pytest.param(ALWAYS_OFF, True, id="always_off-caller-traceparent-01"),
]


@pytest.mark.parametrize("span_processor", ["simple", "batch"])
@pytest.mark.parametrize(("sampler", "caller_sampled"), UNSAMPLED_CASES)
def test_unsampled_requests_are_still_audited_and_tracing_is_unchanged(
        harness: Harness, tmp_path: Path, sampler: Sampler, caller_sampled: Optional[bool], span_processor: str
) -> None:
    stack = Stack(harness, tmp_path, sampler, span_processor)
    header = None if caller_sampled is None else (lambda t: traceparent(t, caller_sampled))
    counters = Counters()
    with TestClient(stack.app) as client:
        sent = drive(client, 4, header)
        probe_headers = {"traceparent": header(new_trace_id())} if header is not None else {}
        # Excluded from the audit, but its SERVER span is upgraded all the same.
        assert client.get("/healthz", headers=probe_headers).status_code == 200

    records = stack.records(len(sent))
    assert sorted(r["http_path"] for r in records) == sorted(path for path, _ in sent)
    for record in records:
        assert record["http_method"] == "GET"
        assert record["http_route"] == ITEM_ROUTE
        assert record["http_response_code"] == 200
        assert record["org_id"] == "acme"
    if caller_sampled is not None:
        by_path = {r["http_path"]: r for r in records}
        for path, trace_id in sent:
            assert by_path[path]["trace_id"] == trace_id, "the caller's trace id is kept on the record"
    assert counters["captured"] == len(sent)
    assert counters["published"] == len(sent)

    # The user's exporter sees none of them: the sampler said no.
    assert stack.exported() == ()
    # Only the SERVER spans were upgraded (RECORD_ONLY, sampled flag off); 'http send'/'http receive' stayed
    # unrecorded.
    recorded = stack.everything.spans
    assert [s.kind for s in recorded] == [SpanKind.SERVER] * (len(sent) + 1), [(s.name, s.kind) for s in recorded]
    assert not [s for s in recorded if "http send" in s.name or "http receive" in s.name]
    for span in recorded:
        assert span.context is not None
        assert span.context.trace_flags.sampled is False, span.name


@pytest.mark.parametrize("sampler", [ALWAYS_OFF, TraceIdRatioBased(0), ParentBased(ALWAYS_ON)])
def test_the_sampled_flag_sent_downstream_stays_off(harness: Harness, tmp_path: Path, sampler: Sampler) -> None:
    stack = Stack(harness, tmp_path, sampler)
    trace_id = new_trace_id()
    with TestClient(stack.app) as client:
        carrier = client.get("/propagate", headers={"traceparent": traceparent(trace_id, False)}).json()
    sent = carrier["traceparent"]
    _, sent_trace, sent_span, _ = sent.split("-")
    assert sampled_flag(sent) is False, f"a RECORD_ONLY span must propagate sampled=0, got {sent}"
    (server,) = stack.everything.of_kind(SpanKind.SERVER)
    assert server.context is not None
    assert sent_span == f"{server.context.span_id:016x}", "downstream sees the recorded server span as parent"
    if isinstance(sampler, ParentBased):
        assert sent_trace == trace_id
    (record,) = stack.records(1)
    assert record["http_path"] == "/propagate"
    assert record["trace_id"] == sent_trace
    assert stack.exported() == ()


@pytest.mark.parametrize("span_processor", ["simple", "batch"])
def test_parent_based_with_a_sampled_caller_exports_everything(harness: Harness, tmp_path: Path,
                                                               span_processor: str) -> None:
    stack = Stack(harness, tmp_path, ParentBased(ALWAYS_ON), span_processor)
    with TestClient(stack.app) as client:
        sent = drive(client, 3, lambda t: traceparent(t, True))

    records = stack.records(len(sent))
    assert sorted((r["http_path"], r["trace_id"]) for r in records) == sorted(sent)
    exported = stack.exported()
    recorded = stack.everything.spans
    assert {s.context.span_id for s in exported if s.context} == {s.context.span_id for s in recorded if s.context}
    assert len(exported) == len(recorded)
    servers = [s for s in exported if s.kind is SpanKind.SERVER]
    internals = [s for s in exported if s.kind is SpanKind.INTERNAL]
    assert len(servers) == len(sent)
    assert internals, "the contrib instrumentation's 'http send' spans are sampled and exported too"
    assert all("http send" in s.name or "http receive" in s.name for s in internals), [s.name for s in internals]
    assert all(s.context is not None and s.context.trace_flags.sampled for s in exported)
    assert {f"{s.context.trace_id:032x}" for s in servers if s.context} == {t for _, t in sent}


def test_sampled_requests_under_a_ratio_are_neither_duplicated_nor_changed(harness: Harness, tmp_path: Path) -> None:
    """ALWAYS_ON below the wrapper: the wrapper passes RECORD_AND_SAMPLE through untouched."""
    stack = Stack(harness, tmp_path, TraceIdRatioBased(1.0))
    with TestClient(stack.app) as client:
        sent = drive(client, 3)
    records = stack.records(len(sent))
    assert sorted(r["http_path"] for r in records) == sorted(p for p, _ in sent)
    exported = stack.exported()
    assert len([s for s in exported if s.kind is SpanKind.SERVER]) == len(sent)
    assert len(exported) == len(stack.everything.spans)


# ------------------------------------------------------------------------------------- the sampler itself
@pytest.mark.parametrize("kind", [SpanKind.INTERNAL, SpanKind.CLIENT, SpanKind.PRODUCER, SpanKind.CONSUMER, None])
@pytest.mark.parametrize("inner", [ALWAYS_OFF, TraceIdRatioBased(0), ParentBased(ALWAYS_OFF)])
def test_only_server_spans_are_upgraded(inner: Sampler, kind: Optional[SpanKind]) -> None:
    sampler = AuditSampler(inner)
    result = sampler.should_sample(None, 0x1234, "work", kind, {"a": 1})
    assert result.decision is Decision.DROP
    server = sampler.should_sample(None, 0x1234, "GET /x", SpanKind.SERVER, {"http.method": "GET"})
    assert server.decision is Decision.RECORD_ONLY


def test_a_sampled_decision_passes_through_unchanged() -> None:
    inner = ALWAYS_ON
    result = AuditSampler(inner).should_sample(None, 0x1234, "GET /x", SpanKind.SERVER, {"http.method": "GET"})
    assert result.decision is Decision.RECORD_AND_SAMPLE
    assert dict(result.attributes) == {"http.method": "GET"}


@pytest.mark.parametrize("inner", [ALWAYS_OFF, TraceIdRatioBased(0), ParentBased(TraceIdRatioBased(0))])
def test_an_upgraded_server_span_keeps_its_start_attributes(harness: Harness, inner: Sampler) -> None:
    """The SDK starts a span with the sampler's ``SamplingResult.attributes``, not with the attributes given
    to ``start_span``. A DROP result carries none, so the upgrade must carry the span's own attributes:
    instrumentations that pass request attributes only at start (WSGI/Flask, hand-made server spans) would
    otherwise make spans without ``http.method``, which are not audited at all."""
    provider = harness.provider(sampler=inner)
    everything = EveryEndedSpan()
    provider.add_span_processor(everything)
    ensure_audit_sampler(provider)
    tracer = provider.get_tracer("hand-made-server")
    attributes = {"http.method": "GET", "http.target": "/api/acme/things/1", "http.scheme": "http"}
    tracer.start_span("GET /api/acme/things/1", kind=SpanKind.SERVER, attributes=attributes).end()
    (span,) = everything.spans
    assert span.context is not None
    assert span.context.trace_flags.sampled is False
    assert dict(span.attributes or {}) == attributes, "the upgrade to RECORD_ONLY dropped the start attributes"


@pytest.mark.parametrize("audit_middleware", [True, False], ids=["documented-O2AuditWSGIMiddleware", "contrib-only"])
@pytest.mark.parametrize(("sampler", "caller_sampled"), [
    pytest.param(ALWAYS_OFF, None, id="always_off"),
    pytest.param(ParentBased(ALWAYS_ON), False, id="parentbased-caller-traceparent-00"),
])
def test_wsgi_unsampled_requests_are_audited(harness: Harness, tmp_path: Path, sampler: Sampler,
                                            caller_sampled: Optional[bool], audit_middleware: bool) -> None:
    """Flask behind the contrib WSGI middleware (README: ``O2AuditWSGIMiddleware(OpenTelemetryMiddleware(
    flask_app.wsgi_app))``): the WSGI instrumentation passes its request attributes only at span start."""
    from flask import Flask
    from opentelemetry.instrumentation.wsgi import OpenTelemetryMiddleware

    provider = harness.provider(sampler=sampler)
    path = tmp_path / "audit.jsonl"
    processor = harness.install(provider, None, endpoint=f"file://{path}", publish_interval=0.2)
    flask_app = Flask("wsgi-sampling")

    @flask_app.get("/api/<org_id>/things")
    def things(org_id: str) -> Dict[str, str]:
        return {"org_id": org_id}

    wrapped: Any = OpenTelemetryMiddleware(flask_app.wsgi_app, tracer_provider=provider)
    if audit_middleware:
        wrapped = otel_o2audit.O2AuditWSGIMiddleware(wrapped)
    flask_app.wsgi_app = wrapped  # type: ignore[method-assign]
    counters = Counters()
    trace_id = new_trace_id()
    headers = {"traceparent": traceparent(trace_id, False)} if caller_sampled is False else {}
    assert flask_app.test_client().get("/api/acme/things?page=2", headers=headers).status_code == 200
    assert processor.force_flush(5000) is True
    records = read_jsonl(path)
    assert counters["skipped"] == 0, "the request was classified as not auditable (no http.method on its span)"
    assert [(r["http_method"], r["http_path"], r["org_id"]) for r in records] == [("GET", "/api/acme/things", "acme")]


# ------------------------------------------------------------------------------------- wrapping the sampler
def test_ensure_audit_sampler_is_idempotent(harness: Harness, tmp_path: Path) -> None:
    inner = TraceIdRatioBased(0)
    provider = harness.provider(sampler=inner)
    ensure_audit_sampler(provider)
    wrapped = provider.sampler
    assert isinstance(wrapped, AuditSampler)
    assert wrapped.inner is inner
    ensure_audit_sampler(provider)
    ensure_audit_sampler(provider)
    assert provider.sampler is wrapped
    assert provider.sampler.get_description() == f"AuditSampler{{{inner.get_description()}}}"
    # install() on the same provider (once, twice) does not wrap it again either.
    first = harness.install(provider, None, endpoint=f"file://{tmp_path / 'a.jsonl'}", publish_interval=0.2)
    second = otel_o2audit.install(provider)
    assert second is first
    assert provider.sampler is wrapped


def test_a_user_supplied_audit_sampler_is_not_wrapped_again(harness: Harness, tmp_path: Path) -> None:
    mine = AuditSampler(ALWAYS_OFF)
    provider = harness.provider(sampler=mine)
    harness.install(provider, None, endpoint=f"file://{tmp_path / 'a.jsonl'}", publish_interval=0.2)
    assert provider.sampler is mine


def test_tracers_obtained_before_install_keep_the_old_sampler(harness: Harness, tmp_path: Path) -> None:
    """Documented limitation (README, "Sampling cannot remove a request"): call install() before creating
    tracers or instrumenting. ``instrument_app`` takes its tracer when called, and the SDK (1.45) caches tracers
    per instrumentation scope, so even an app instrumented AFTER install() gets the cached pre-install tracer
    of the same library, with the old sampler: under ALWAYS_OFF neither app is audited."""
    provider = harness.provider(sampler=ALWAYS_OFF)
    early_tracer = provider.get_tracer("early")
    early_app = sampling_app(provider)  # instrumented before install: its tracer has ALWAYS_OFF
    path = tmp_path / "audit.jsonl"
    processor = harness.install(provider, None, endpoint=f"file://{path}", publish_interval=0.2)
    late_tracer = provider.get_tracer("late")
    late_app = sampling_app(provider)  # same instrumentation scope: the SDK hands back the cached tracer

    assert isinstance(provider.sampler, AuditSampler)
    assert early_tracer.sampler is ALWAYS_OFF  # type: ignore[attr-defined]
    assert provider.get_tracer("early") is early_tracer
    assert isinstance(late_tracer.sampler, AuditSampler)  # type: ignore[attr-defined]
    early_span = early_tracer.start_span("GET /api/acme/early", kind=SpanKind.SERVER)
    late_span = late_tracer.start_span("GET /api/acme/late", kind=SpanKind.SERVER)
    assert early_span.is_recording() is False
    assert late_span.is_recording() is True
    late_span.end()
    early_span.end()

    counters = Counters()
    with TestClient(early_app) as client:
        assert client.get("/api/acme/items/1").status_code == 200
    with TestClient(late_app) as client:
        assert client.get("/api/acme/items/2").status_code == 200
    assert processor.force_flush(5000) is True
    assert read_jsonl(path) == [], "both apps use the FastAPI instrumentation's pre-install tracer"
    assert counters["captured"] == 0


# ------------------------------------------------------------------------------------------------ zero-code
@pytest.fixture
def launcher(tmp_path: Path) -> Iterator[Launcher]:
    pool = Launcher(tmp_path)
    try:
        yield pool
    finally:
        pool.cleanup()


_CONSOLE_TRACE_ID = re.compile(r'"trace_id":\s*"0x([0-9a-f]{32})"')


def console_trace_ids(text: str) -> List[str]:
    """Trace ids of the spans the console exporter printed (one per span)."""
    return _CONSOLE_TRACE_ID.findall(text)


ZERO_CODE_CASES = [
    pytest.param({"OTEL_TRACES_SAMPLER": "always_off"}, None, id="always_off"),
    pytest.param({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0"}, None,
                 id="traceidratio-0"),
    pytest.param({"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0"}, None,
                 id="parentbased_traceidratio-0"),
    pytest.param({}, False, id="default-sampler-caller-traceparent-00"),
]


def _zero_code_env(audit: Path, sampler_vars: Dict[str, str]) -> Dict[str, str]:
    return child_env({
        "O2_AUDIT_ENABLED": "true",
        "O2_AUDIT_ENDPOINT": f"file://{audit}",
        "O2_AUDIT_PUBLISH_INTERVAL": "0.2",
        "OTEL_TRACES_EXPORTER": "console",
        "OTEL_BSP_SCHEDULE_DELAY": "50",
        **sampler_vars,
    })


def _get(app: Any, path: str, trace_id: Optional[str], sampled: bool) -> Dict[str, Any]:
    headers = {"traceparent": traceparent(trace_id, sampled)} if trace_id is not None else {}
    response = app.fresh_request("GET", path, headers=headers)
    assert response.status_code == 200, f"{path} -> {response.status_code}{app.tail()}"
    body: Dict[str, Any] = response.json()
    return body


@pytest.mark.parametrize(("sampler_vars", "caller_sampled"), ZERO_CODE_CASES)
def test_zero_code_unsampled_requests_are_audited_and_not_traced(
        launcher: Launcher, tmp_path: Path, sampler_vars: Dict[str, str], caller_sampled: Optional[bool]) -> None:
    audit = tmp_path / "audit.jsonl"
    app = launcher.uvicorn(_zero_code_env(audit, sampler_vars), SAMPLING_APP).wait_ready()
    sent: List[Tuple[str, Optional[str]]] = []
    for path in ("/api/acme/items/1", "/api/globex/items/2", "/api/acme/items/3"):
        trace_id = new_trace_id() if caller_sampled is not None else None
        _get(app, path, trace_id, bool(caller_sampled))
        sent.append((path, trace_id))
    trace_id = new_trace_id() if caller_sampled is not None else None
    carrier = _get(app, "/propagate", trace_id, bool(caller_sampled))
    sent.append(("/propagate", trace_id))
    assert sampled_flag(carrier["traceparent"]) is False, carrier
    if trace_id is not None:
        assert carrier["traceparent"].split("-")[1] == trace_id, carrier

    wait_proc(lambda: len(read_jsonl(audit)) >= len(sent), 15,
              lambda: f"{len(sent)} records in {audit}{app.tail()}")
    status = app.stop(signal.SIGTERM)
    assert status in (0, -signal.SIGTERM), f"exit status {status}{app.tail()}"

    records = read_jsonl(audit)
    assert sorted(r["http_path"] for r in records) == sorted(p for p, _ in sent), f"{records}{app.tail()}"
    if caller_sampled is not None:
        assert sorted((r["http_path"], r["trace_id"]) for r in records) == sorted(sent)  # type: ignore[arg-type]
    printed = set(console_trace_ids(app.stdout()))
    if caller_sampled is None:
        assert printed == set(), f"the console exporter printed unsampled spans{app.tail()}"
    else:
        # (wait_ready's /healthz probes came without a traceparent: the default sampler samples those roots)
        leaked = printed & {t for _, t in sent}
        assert leaked == set(), f"the console exporter printed the unsampled callers' spans{app.tail()}"


def test_zero_code_sampled_and_unsampled_callers_in_one_process(launcher: Launcher, tmp_path: Path) -> None:
    """Default sampler (parentbased_always_on): the console exporter prints exactly the sampled caller's spans
    (positive control for the cases above), and every request, sampled or not, has one record."""
    audit = tmp_path / "audit.jsonl"
    app = launcher.uvicorn(_zero_code_env(audit, {}), SAMPLING_APP).wait_ready()
    unsampled = [new_trace_id() for _ in range(3)]
    for i, trace_id in enumerate(unsampled):
        _get(app, f"/api/acme/items/{i}", trace_id, sampled=False)
    sampled = new_trace_id()
    carrier = _get(app, "/propagate", sampled, sampled=True)
    assert carrier["traceparent"].split("-")[1] == sampled, carrier
    assert sampled_flag(carrier["traceparent"]) is True, carrier

    wait_proc(lambda: sampled in console_trace_ids(app.stdout()), 15,
              lambda: f"the console exporter to print the sampled request's spans{app.tail()}")
    wait_proc(lambda: len(read_jsonl(audit)) >= 4, 15, lambda: f"4 records in {audit}{app.tail()}")
    app.stop(signal.SIGTERM)

    printed = console_trace_ids(app.stdout())
    # (wait_ready's /healthz probes came without a traceparent: the default sampler samples those roots)
    leaked = set(printed) & set(unsampled)
    assert leaked == set(), f"unsampled traces leaked to the console exporter: {leaked}"
    assert printed.count(sampled) >= 2, "the sampled request's internal spans are exported too"
    assert app.stdout().count('"kind": "SpanKind.SERVER"') >= 1
    records = read_jsonl(audit)
    assert sorted(r["trace_id"] for r in records) == sorted([*unsampled, sampled]), records

