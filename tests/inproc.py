"""Shared helpers for the in-process pipeline tests (exporter, processor, FastAPI).

Everything here is real: SDK TracerProviders, FastAPI apps with the contrib instrumentation (and FastAPI's
own native telemetry), and HTTP to :class:`o2receiver.FakeOpenObserve` on 127.0.0.1. Waits are condition
polls with a deadline (:func:`wait_until`), never sleeps that hope for timing.

:class:`Harness` builds providers, processors and exporters for one test and shuts every one of them down
at teardown, then checks that no audit worker thread it started is still alive.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple

from fastapi import Depends, FastAPI, Header, HTTPException
from o2receiver import FakeOpenObserve
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import Sampler
from opentelemetry.trace import SpanKind

import otel_o2audit
from otel_o2audit import O2AuditConfig, O2AuditSpanExporter, O2AuditSpanProcessor

SERVICE_NAME = "inproc-tests"
WORKER_THREAD_PREFIX = "otel-o2audit"

#: Keys every audit record carries (error_msg only on failures), per audit-record.md.
CORE_KEYS = frozenset(
    {
        "_timestamp",
        "user_email",
        "org_id",
        "protocol",
        "http_method",
        "http_path",
        "http_query_params",
        "http_body",
        "http_response_code",
        "trace_id",
        "event_id",
        "span_id",
    }
)

# Polling tick for wait_until: an Event nobody sets, so waiting on it is a bounded pause between checks.
_TICK = threading.Event()


# --------------------------------------------------------------------------------------------------
# waiting
# --------------------------------------------------------------------------------------------------


def wait_until(predicate: Callable[[], Any], timeout: float = 5.0, message: str = "condition",
               interval: float = 0.005) -> None:
    """Poll ``predicate`` until it is truthy; raise AssertionError naming ``message`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        _TICK.wait(interval)


def assert_stays(predicate: Callable[[], Any], duration: float = 0.3, message: str = "condition",
                 interval: float = 0.005) -> None:
    """Check that ``predicate`` holds during ``duration`` seconds (a bounded negative check)."""
    deadline = time.monotonic() + duration
    while True:
        assert predicate(), f"{message} stopped holding"
        if time.monotonic() >= deadline:
            return
        _TICK.wait(interval)


def wait_child(pid: int, timeout: float) -> int:
    """Reap the forked child ``pid`` within ``timeout`` seconds; return its wait status (kill it if late)."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return status
        if time.monotonic() >= deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"forked child {pid} did not finish within {timeout}s (killed)")
        _TICK.wait(0.01)


# --------------------------------------------------------------------------------------------------
# counters
# --------------------------------------------------------------------------------------------------


class Counters:
    """Deltas of ``otel_o2audit.stats()`` since construction (the counters are process-wide)."""

    def __init__(self) -> None:
        self.before = otel_o2audit.stats()

    def delta(self) -> Dict[str, int]:
        now = otel_o2audit.stats()
        return {key: now[key] - self.before.get(key, 0) for key in now}

    def __getitem__(self, key: str) -> int:
        return self.delta()[key]


# --------------------------------------------------------------------------------------------------
# configuration, providers, processors
# --------------------------------------------------------------------------------------------------


def settings_for(receiver: Optional[FakeOpenObserve] = None, **overrides: Any) -> Dict[str, Any]:
    """Keyword settings for the tests: small timeouts, long interval, the receiver's credentials."""
    settings: Dict[str, Any] = {
        "batch_size": 100,
        "publish_interval": 60.0,
        "timeout": 1.0,
        "retry_initial_backoff": 0.05,
        "retry_max_elapsed": 5.0,
        "shutdown_timeout": 2.0,
    }
    if receiver is not None:
        settings.update(endpoint=receiver.url, user=receiver.user, password=receiver.password)
    settings.update(overrides)
    return settings


def audit_config(receiver: Optional[FakeOpenObserve] = None, **overrides: Any) -> O2AuditConfig:
    """An :class:`O2AuditConfig` built like a code user does: ``from_env({}, **keywords)``."""
    return O2AuditConfig.from_env({}, **settings_for(receiver, **overrides))


def _worker_threads() -> Set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith(WORKER_THREAD_PREFIX)}


class Harness:
    """Owns the providers, processors and exporters of one test; :meth:`close` shuts them all down."""

    def __init__(self) -> None:
        self._threads_before = _worker_threads()
        self.providers: List[TracerProvider] = []
        self.processors: List[O2AuditSpanProcessor] = []
        self.exporters: List[O2AuditSpanExporter] = []

    def provider(self, sampler: Optional[Sampler] = None, memory: Optional[InMemorySpanExporter] = None
                 ) -> TracerProvider:
        """A fresh SDK provider (no atexit hook); ``memory`` receives every sampled span."""
        kwargs: Dict[str, Any] = {"resource": Resource.create({"service.name": SERVICE_NAME}),
                                  "shutdown_on_exit": False}
        if sampler is not None:
            kwargs["sampler"] = sampler
        provider = TracerProvider(**kwargs)
        if memory is not None:
            provider.add_span_processor(SimpleSpanProcessor(memory))
        self.providers.append(provider)
        return provider

    def processor(self, receiver: Optional[FakeOpenObserve], provider: Optional[TracerProvider] = None,
                  **overrides: Any) -> Tuple[TracerProvider, O2AuditSpanProcessor]:
        """A processor built from keyword settings and added to ``provider`` (a new one by default)."""
        if provider is None:
            provider = self.provider()
        processor = O2AuditSpanProcessor(config=audit_config(receiver, **overrides))
        provider.add_span_processor(processor)
        self.processors.append(processor)
        return provider, processor

    def install(self, provider: TracerProvider, receiver: Optional[FakeOpenObserve], **overrides: Any
                ) -> O2AuditSpanProcessor:
        """``otel_o2audit.install(provider, **keywords)``, tracked for teardown."""
        processor = otel_o2audit.install(provider, **settings_for(receiver, **overrides))
        self.track(processor)
        return processor

    def track(self, processor: O2AuditSpanProcessor) -> O2AuditSpanProcessor:
        if processor not in self.processors:
            self.processors.append(processor)
        return processor

    def exporter(self, receiver: Optional[FakeOpenObserve] = None, **overrides: Any) -> O2AuditSpanExporter:
        """An exporter built from a config (``O2AuditSpanExporter(config)``), tracked for teardown."""
        exporter = O2AuditSpanExporter(audit_config(receiver, **overrides))
        self.exporters.append(exporter)
        return exporter

    def close(self) -> None:
        for processor in self.processors:
            processor.shutdown(timeout_millis=2000)
        for exporter in self.exporters:
            exporter.shutdown()
        for provider in self.providers:
            provider.shutdown()
        started = _worker_threads() - self._threads_before
        wait_until(lambda: not any(t.is_alive() for t in started), timeout=5.0,
                   message="the audit worker threads of this test to exit")


# --------------------------------------------------------------------------------------------------
# spans made by a real SDK tracer (for the exporter's SpanExporter API)
# --------------------------------------------------------------------------------------------------


class SpanMaker:
    """Makes finished spans with a real SDK tracer and hands back the ReadableSpans."""

    def __init__(self) -> None:
        self.memory = InMemorySpanExporter()
        self.provider = TracerProvider(resource=Resource.create({"service.name": SERVICE_NAME}),
                                       shutdown_on_exit=False)
        self.provider.add_span_processor(SimpleSpanProcessor(self.memory))
        self.tracer = self.provider.get_tracer("inproc-tests")

    def span(self, name: str, kind: SpanKind = SpanKind.SERVER,
             attributes: Optional[Mapping[str, Any]] = None) -> ReadableSpan:
        self.memory.clear()
        span = self.tracer.start_span(name, kind=kind, attributes=dict(attributes or {}))
        span.end()
        (finished,) = self.memory.get_finished_spans()
        return finished

    def request(self, method: str = "GET", path: str = "/api/acme/things/1", status: int = 200,
                route: Optional[str] = None, query: str = "", kind: SpanKind = SpanKind.SERVER,
                **extra: Any) -> ReadableSpan:
        """A span shaped like the contrib instrumentation's (old semantic conventions)."""
        url = f"http://testserver{path}" + (f"?{query}" if query else "")
        attributes: Dict[str, Any] = {
            "http.method": method,
            "http.target": path,
            "http.url": url,
            "http.status_code": status,
            "net.peer.ip": "10.1.2.3",
            "http.user_agent": "inproc-agent/1.0",
        }
        if route:
            attributes["http.route"] = route
        attributes.update(extra)
        return self.span(f"{method} {route or path}", kind=kind, attributes=attributes)

    def requests(self, count: int, prefix: str = "/api/acme/things") -> List[ReadableSpan]:
        return [self.request(path=f"{prefix}/{i}", route=f"{prefix.replace('acme', '{org_id}')}/{{tid}}")
                for i in range(count)]

    def close(self) -> None:
        self.provider.shutdown()


def records_of(exporter: O2AuditSpanExporter, spans: Iterable[ReadableSpan]) -> List[Dict[str, Any]]:
    """The audit records of ``spans`` (audited ones only), built by the exporter itself."""
    out = []
    for span in spans:
        record = exporter.to_record(span)
        if record is not None:
            out.append(record)
    return out


def event_ids(records: Sequence[Mapping[str, Any]]) -> List[str]:
    return [str(r["event_id"]) for r in records]


# --------------------------------------------------------------------------------------------------
# FastAPI apps
# --------------------------------------------------------------------------------------------------


def _user_from_header_sync(x_user: Optional[str] = Header(default=None)) -> Optional[str]:
    if x_user:
        otel_o2audit.set_user(x_user)
    return x_user


async def _user_from_header_async(x_user: Optional[str] = Header(default=None)) -> Optional[str]:
    if x_user:
        otel_o2audit.set_user(x_user)
    return x_user


def _sub_app(telemetry: Dict[str, Any]) -> FastAPI:
    sub = FastAPI(telemetry=telemetry)  # type: ignore[arg-type]

    @sub.get("/things/{tid}")
    def sub_thing(tid: int, user: Optional[str] = Depends(_user_from_header_async)) -> Dict[str, Any]:
        return {"tid": tid, "user": user}

    return sub


def make_app(provider: TracerProvider, *, native: bool = True, contrib: bool = True, mount: bool = True
             ) -> FastAPI:
    """A small API: audited routes, ingestion and health routes, failures, set_user dependencies, a mount.

    ``native``: FastAPI's own telemetry traces into ``provider`` (FastAPI 0.142+ does this by itself once an
    SDK provider exists; here the provider is passed explicitly so the test process's global provider does
    not matter). ``contrib``: ``FastAPIInstrumentor.instrument_app(app, tracer_provider=provider)``.
    """
    telemetry: Dict[str, Any] = (
        {"tracer_provider": provider} if native else {"tracing": False, "metrics": False, "logs": False}
    )
    app = FastAPI(telemetry=telemetry)  # type: ignore[arg-type]

    @app.get("/api/{org_id}/things/{tid}")
    def get_thing(org_id: str, tid: int) -> Dict[str, Any]:
        return {"org": org_id, "tid": tid}

    @app.post("/api/{org_id}/things")
    def create_thing(org_id: str, payload: Dict[str, Any]) -> Dict[str, Any]:
        return {"org": org_id, "created": payload}

    @app.get("/orgs/{org_id}/items")
    def org_items(org_id: str) -> List[str]:
        return [org_id]

    @app.post("/api/{org}/{stream}/_json")
    def ingest(org: str, stream: str) -> Dict[str, Any]:
        return {"code": 200}

    @app.get("/healthz")
    def healthz() -> Dict[str, str]:
        return {"status": "ok"}

    @app.get("/me/sync")
    def me_sync(user: Optional[str] = Depends(_user_from_header_sync)) -> Dict[str, Optional[str]]:
        return {"user": user}

    @app.get("/me/async")
    async def me_async(user: Optional[str] = Depends(_user_from_header_async)) -> Dict[str, Optional[str]]:
        return {"user": user}

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("kaboom in the handler")

    @app.get("/forbidden")
    def forbidden() -> None:
        raise HTTPException(status_code=403, detail="no")

    @app.get("/unavailable")
    def unavailable() -> None:
        raise HTTPException(status_code=503, detail="later")

    @app.get("/search")
    def search() -> Dict[str, str]:
        return {"ok": "yes"}

    if mount:
        app.mount("/sub", _sub_app(telemetry))
    if contrib:
        FastAPIInstrumentor.instrument_app(app, tracer_provider=provider)
    return app


def server_spans(memory: InMemorySpanExporter) -> List[ReadableSpan]:
    return [s for s in memory.get_finished_spans() if s.kind is SpanKind.SERVER]


async def _asgi_call(app: Any, scope: Dict[str, Any]) -> List[Dict[str, Any]]:
    sent: List[Dict[str, Any]] = []
    delivered = False

    async def receive() -> Dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": b"", "more_body": False}
        return {"type": "http.disconnect"}

    async def send(message: Dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


def raw_asgi_get(app: Any, path: str, headers: Sequence[Tuple[bytes, bytes]], query: bytes = b"") -> int:
    """One GET straight into the ASGI app with raw header bytes, the way an ASGI server hands them over.

    TestClient (httpx) re-encodes header values, so bytes that are not UTF-8 can only arrive like this.
    Returns the response status.
    """
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode("ascii"),
        "query_string": query,
        "root_path": "",
        "headers": [(b"host", b"testserver"), *headers],
        "client": ("10.9.8.7", 40000),
        "server": ("testserver", 80),
    }
    sent = asyncio.run(_asgi_call(app, scope))
    starts = [m for m in sent if m["type"] == "http.response.start"]
    return int(starts[0]["status"])
