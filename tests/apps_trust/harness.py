"""In-process harness for the trust tests: a real SDK provider, the audit processor writing JSON lines to a
file, and real applications (FastAPI with the contrib instrumentation, Flask behind OpenTelemetry's WSGI
middleware) with the library's middleware outside them. Waiting is on conditions with deadlines.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from fastapi import FastAPI, Request, Response
from fastapi.testclient import TestClient
from flask import Flask
from flask import request as flask_request
from opentelemetry import trace
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.instrumentation.wsgi import OpenTelemetryMiddleware
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import otel_o2audit
from otel_o2audit import O2AuditConfig
from otel_o2audit.middleware import O2AuditASGIMiddleware, O2AuditWSGIMiddleware

SERVICE = "trust-tests"
_TICK = threading.Event()


def wait_for(predicate: Callable[[], Any], timeout: float = 5.0, message: str = "condition") -> Any:
    """Poll ``predicate`` until truthy (returned) or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        _TICK.wait(0.01)


class Audit:
    """A provider with the audit processor (file sink) and an in-memory span exporter for one test."""

    def __init__(self, tmp_path: Path, **settings: Any) -> None:
        self.path = tmp_path / "audit.jsonl"
        self.config = O2AuditConfig.from_env({}, endpoint=f"file://{self.path}", publish_interval=600,
                                             batch_size=500, **settings)
        self.provider = TracerProvider(resource=Resource.create({"service.name": SERVICE}), shutdown_on_exit=False)
        self.memory = InMemorySpanExporter()
        self.provider.add_span_processor(SimpleSpanProcessor(self.memory))
        self.processor = otel_o2audit.install(self.provider, config=self.config)
        self._seen = 0

    # -- records ---------------------------------------------------------------------------------
    def all_records(self) -> List[Dict[str, Any]]:
        if not self.path.exists():
            return []
        # JSON lines are separated by "\n" only: a record may hold U+2028 or U+0085 (str.splitlines() would cut).
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").split("\n") if line.strip()]

    def new_records(self, count: int = 1, timeout: float = 5.0) -> List[Dict[str, Any]]:
        """The next ``count`` records written since the last call (flushes, then waits with a deadline)."""
        target = self._seen + count

        def ready() -> bool:
            self.processor.force_flush(2000)
            return len(self.all_records()) >= target

        wait_for(ready, timeout, f"{count} new audit record(s)")
        records = self.all_records()
        fresh, self._seen = records[self._seen:target], target
        assert len(records) == target, f"expected exactly {target} records, got {len(records)}: {records[target:]}"
        return fresh

    def one(self) -> Dict[str, Any]:
        return self.new_records(1)[0]

    def raw_text(self) -> str:
        return self.path.read_text(encoding="utf-8") if self.path.exists() else ""

    # -- spans -----------------------------------------------------------------------------------
    def spans(self) -> Tuple[ReadableSpan, ...]:
        return tuple(self.memory.get_finished_spans())

    def span_text(self) -> str:
        """Every attribute and event of every finished span, as one string (to look for leaks)."""
        parts: List[str] = []
        for span in self.spans():
            parts.append(span.name)
            parts.extend(f"{k}={v!r}" for k, v in (span.attributes or {}).items())
            for event in span.events:
                parts.append(event.name)
                parts.extend(f"{k}={v!r}" for k, v in (event.attributes or {}).items())
        return "\n".join(parts)

    # -- apps ------------------------------------------------------------------------------------
    def fastapi_client(self, peer: str = "203.0.113.10", config: Optional[O2AuditConfig] = None,
                       app: Optional[FastAPI] = None) -> TestClient:
        """FastAPI (contrib instrumentation) wrapped in O2AuditASGIMiddleware, called from ``peer``."""
        app = app if app is not None else make_fastapi_app()
        FastAPIInstrumentor.instrument_app(app, tracer_provider=self.provider)
        wrapped = O2AuditASGIMiddleware(app, config if config is not None else self.config)
        return TestClient(wrapped, client=(peer, 43210))

    def flask_client(self, config: Optional[O2AuditConfig] = None, app: Optional[Flask] = None) -> Any:
        """Flask behind OpenTelemetry's WSGI middleware, wrapped in O2AuditWSGIMiddleware."""
        app = app if app is not None else make_flask_app()
        app.wsgi_app = O2AuditWSGIMiddleware(  # type: ignore[method-assign]
            OpenTelemetryMiddleware(app.wsgi_app, tracer_provider=self.provider),
            config if config is not None else self.config,
        )
        return app.test_client()

    def close(self) -> None:
        self.processor.shutdown(timeout_millis=2000)
        self.provider.shutdown()


def digest(data: bytes) -> Dict[str, Any]:
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def make_fastapi_app() -> FastAPI:
    """Routes: echo (reads the body, reports its digest), login (401 unless the right password), whoami
    (optionally names the user through set_user or a span attribute), ignore-body (never reads it)."""
    app = FastAPI()

    @app.post("/api/{org_id}/echo")
    async def echo(org_id: str, request: Request) -> Dict[str, Any]:
        return digest(await request.body())

    @app.post("/api/{org_id}/stream")
    async def stream(org_id: str, request: Request) -> Dict[str, Any]:
        hasher, size = hashlib.sha256(), 0
        async for chunk in request.stream():
            hasher.update(chunk)
            size += len(chunk)
        return {"size": size, "sha256": hasher.hexdigest()}

    @app.post("/api/{org_id}/ignore-body")
    async def ignore_body(org_id: str) -> Dict[str, str]:
        return {"read": "nothing"}

    @app.post("/api/{org_id}/login")
    async def login(org_id: str, request: Request, response: Response) -> Dict[str, bool]:
        await request.body()
        ok = request.headers.get("authorization", "") == "Basic YWxpY2U6Y29ycmVjdA=="  # alice:correct
        if not ok:
            response.status_code = 401
        return {"ok": ok}

    @app.get("/api/{org_id}/whoami")
    async def whoami(org_id: str, app_user: Optional[str] = None, span_user: Optional[str] = None
                     ) -> Dict[str, Optional[str]]:
        if span_user is not None:
            trace.get_current_span().set_attribute("enduser.id", span_user)
        if app_user is not None:
            otel_o2audit.set_user(app_user)
        return {"org_id": org_id}

    return app


def make_flask_app() -> Flask:
    app = Flask("trust-tests")

    @app.post("/api/<org_id>/echo")
    def echo(org_id: str) -> Dict[str, Any]:
        return digest(flask_request.get_data())

    @app.post("/api/<org_id>/stream")
    def stream(org_id: str) -> Dict[str, Any]:
        stream = flask_request.stream
        hasher, size = hashlib.sha256(), 0
        while True:
            chunk = stream.read(1000)
            if not chunk:
                break
            hasher.update(chunk)
            size += len(chunk)
        return {"size": size, "sha256": hasher.hexdigest()}

    @app.post("/api/<org_id>/login")
    def login(org_id: str) -> Tuple[Dict[str, bool], int]:
        flask_request.get_data()
        ok = flask_request.headers.get("Authorization", "") == "Basic YWxpY2U6Y29ycmVjdA=="
        return {"ok": ok}, (200 if ok else 401)

    @app.get("/api/<org_id>/whoami")
    def whoami(org_id: str) -> Dict[str, str]:
        app_user = flask_request.args.get("app_user")
        if app_user is not None:
            otel_o2audit.set_user(app_user)
        return {"org_id": org_id}

    return app


def chunks(data: bytes, size: int) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]
