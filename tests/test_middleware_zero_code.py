"""The framework hook (:func:`patch_frameworks`) and the middleware's placement, in-process and in real servers.

In-process: FastAPIInstrumentor().instrument() (what zero-code does, replacing fastapi.FastAPI by a subclass)
plus patch_frameworks; Flask with OpenTelemetry's WSGI middleware; the middleware inside or outside
OpenTelemetry's. Subprocesses: uvicorn under opentelemetry-instrument configured only by environment
variables, through ``tests.apps_trust.serve_patched`` (the hook applied exactly as zero-code setup will apply
it once wired), and plain ``opentelemetry-instrument uvicorn`` (skipped until the hook is wired into
``otel_o2audit.autoinstrument``).
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import inspect
import json
import logging
import signal
from pathlib import Path
from typing import Any, AsyncIterator, Dict, Iterator

import pytest
from apps_trust.harness import Audit, digest, make_fastapi_app, make_flask_app
from apps_trust.servers import Servers
from fastapi import WebSocket
from fastapi.testclient import TestClient
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.instrumentation.wsgi import OpenTelemetryMiddleware
from starlette.applications import Starlette

import otel_o2audit.autoinstrument
from otel_o2audit import O2AuditConfig
from otel_o2audit.middleware import (
    O2AuditASGIMiddleware,
    O2AuditWSGIMiddleware,
    patch_frameworks,
    unpatch_frameworks,
)

PASSWORD = "pw-8f3a-never-stored"
SECRET = "s3cr3t-8f3a-never-stored"


def basic(user: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{PASSWORD}".encode()).decode()


@pytest.fixture
def audit(tmp_path: Path) -> Iterator[Audit]:
    audit = Audit(tmp_path, trusted_proxies="10.0.0.0/8", user_header="X-Forwarded-Email", capture_body=True)
    yield audit
    audit.close()


@pytest.fixture
def patched(audit: Audit) -> Iterator[Audit]:
    """Zero-code in one process: the contrib instrumentor replaces fastapi.FastAPI, then the hook."""
    instrumentor = FastAPIInstrumentor()
    instrumentor.instrument(tracer_provider=audit.provider)
    patch_frameworks(audit.config)
    try:
        yield audit
    finally:
        unpatch_frameworks()
        instrumentor.uninstrument()


def _new_fastapi() -> Any:
    import fastapi  # the instrumentor has replaced fastapi.FastAPI by its subclass

    app = fastapi.FastAPI()
    app.router.routes.extend(make_fastapi_app().router.routes)
    return app


# ------------------------------------------------------------------------------------------ in-process
def test_patched_fastapi_gathers_facts(patched: Audit) -> None:
    app = _new_fastapi()
    assert type(app).__name__ == "_InstrumentedFastAPI"
    client = TestClient(app, client=("10.1.1.1", 1234))
    response = client.post("/api/acme/login?token=" + SECRET, json={"password": SECRET, "n": 1},
                           headers={"Authorization": basic("alice"), "X-Forwarded-For": "6.6.6.6, 198.51.100.4"})
    assert response.status_code == 401
    record = patched.one()
    assert record["user_email"] == "alice"
    assert record["client_ip"] == "198.51.100.4"
    assert record["http_query_params"] == "token=[REDACTED]"
    assert json.loads(record["http_body"]) == {"password": "[REDACTED]", "n": 1}
    assert record["http_route"] == "/api/{org_id}/login"
    assert SECRET not in patched.raw_text()
    assert PASSWORD not in patched.raw_text() + patched.span_text()


def test_patched_apps_built_before_the_hook(audit: Audit) -> None:
    app = make_fastapi_app()
    FastAPIInstrumentor.instrument_app(app, tracer_provider=audit.provider)
    patch_frameworks(audit.config)
    try:
        client = TestClient(app)
        assert client.get("/api/acme/whoami", headers={"Authorization": basic("bob")}).status_code == 200
        assert audit.one()["user_email"] == "bob"
    finally:
        unpatch_frameworks()


def test_one_record_per_request_with_a_mounted_sub_app(patched: Audit) -> None:
    app = _new_fastapi()
    sub = _new_fastapi()
    app.mount("/sub", sub)
    client = TestClient(app)
    response = client.post("/sub/api/acme/echo", content=b'{"api_key": "k"}',
                           headers={"Authorization": basic("carol"), "Content-Type": "application/json"})
    assert response.status_code == 200
    record = patched.one()
    assert record["user_email"] == "carol"
    assert json.loads(record["http_body"]) == {"api_key": "[REDACTED]"}
    assert len(patched.all_records()) == 1


def test_hook_is_idempotent_and_reversible(audit: Audit) -> None:
    unpatch_frameworks()  # a clean start, whatever ran before in this process
    original = Starlette.__dict__["__call__"]
    assert not getattr(original, "_otel_o2audit", False)
    patch_frameworks(audit.config)
    first = Starlette.__dict__["__call__"]
    patch_frameworks(audit.config)
    try:
        assert Starlette.__dict__["__call__"] is first
        assert first.__wrapped__ is original
    finally:
        unpatch_frameworks()
    assert Starlette.__dict__["__call__"] is original
    import flask

    assert not getattr(flask.Flask.__call__, "_otel_o2audit", False)


def test_later_call_replaces_the_settings(audit: Audit) -> None:
    app = make_fastapi_app()
    FastAPIInstrumentor.instrument_app(app, tracer_provider=audit.provider)
    patch_frameworks(O2AuditConfig.from_env({}, require_endpoint=False))
    patch_frameworks(audit.config)  # trusts 10.0.0.0/8
    try:
        client = TestClient(app, client=("10.1.1.1", 1234))
        client.get("/api/acme/whoami", headers={"X-Forwarded-For": "198.51.100.4"})
        assert audit.one()["client_ip"] == "198.51.100.4"
    finally:
        unpatch_frameworks()


def test_hook_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    unpatch_frameworks()
    with caplog.at_level(logging.ERROR, logger="otel_o2audit"):
        patch_frameworks(object())  # type: ignore[arg-type]
    assert "not installed" in caplog.text
    assert not getattr(Starlette.__call__, "_otel_o2audit", False)


def test_explicit_middleware_and_hook_together(patched: Audit) -> None:
    app = _new_fastapi()
    client = TestClient(O2AuditASGIMiddleware(app, patched.config), client=("10.2.2.2", 1))
    response = client.get("/api/acme/whoami", headers={"X-Forwarded-Email": "dana@example.com"})
    assert response.status_code == 200
    assert patched.one()["user_email"] == "dana@example.com"
    assert len(patched.all_records()) == 1


def test_middleware_inside_opentelemetry(audit: Audit) -> None:
    # Placed INSIDE the instrumentation's middleware (a user middleware), the facts still reach the record:
    # the server span's scope is already open, and the middleware links its facts into it.
    app = make_fastapi_app()
    app.add_middleware(O2AuditASGIMiddleware, config=audit.config)
    FastAPIInstrumentor.instrument_app(app, tracer_provider=audit.provider)
    client = TestClient(app, client=("10.1.1.1", 1))
    response = client.post("/api/acme/echo", content=b"password=x&a=1", headers={
        "Authorization": basic("erin"), "X-Forwarded-For": "198.51.100.7",
        "Content-Type": "application/x-www-form-urlencoded"})
    assert response.status_code == 200
    record = audit.one()
    assert (record["user_email"], record["client_ip"]) == ("erin", "198.51.100.7")
    assert record["http_body"] == "password=[REDACTED]&a=1"


def test_patched_flask(audit: Audit) -> None:
    patch_frameworks(audit.config)
    try:
        app = make_flask_app()
        # What FlaskInstrumentor does: OpenTelemetry's WSGI middleware as the app's wsgi_app.
        app.wsgi_app = OpenTelemetryMiddleware(app.wsgi_app, tracer_provider=audit.provider)  # type: ignore[method-assign]
        client = app.test_client()
        response = client.post("/api/acme/login", data=json.dumps({"password": SECRET}),
                               content_type="application/json", headers={"Authorization": basic("frank"),
                                                                         "X-Forwarded-For": "198.51.100.8"},
                               environ_base={"REMOTE_ADDR": "10.3.3.3"}, buffered=True)
        assert response.status_code == 401
        record = audit.one()
        assert (record["user_email"], record["client_ip"]) == ("frank", "198.51.100.8")
        assert json.loads(record["http_body"]) == {"password": "[REDACTED]"}
    finally:
        unpatch_frameworks()


def test_wsgi_middleware_inside_opentelemetry(audit: Audit) -> None:
    app = make_flask_app()
    outer = OpenTelemetryMiddleware(O2AuditWSGIMiddleware(app.wsgi_app, audit.config),
                                    tracer_provider=audit.provider)
    app.wsgi_app = outer  # type: ignore[method-assign]
    response = app.test_client().post("/api/acme/echo", data=b"token=t&b=2",
                                      content_type="application/x-www-form-urlencoded",
                                      headers={"Authorization": basic("gina")}, buffered=True)
    assert response.json == digest(b"token=t&b=2")
    record = audit.one()
    assert record["user_email"] == "gina"
    assert record["http_body"] == "token=[REDACTED]&b=2"


def test_middleware_reads_the_environment_without_config(monkeypatch: pytest.MonkeyPatch, audit: Audit) -> None:
    monkeypatch.setenv("O2_AUDIT_TRUSTED_PROXIES", "10.0.0.0/8")
    monkeypatch.setenv("O2_AUDIT_CAPTURE_BODY", "true")
    monkeypatch.setenv("O2_AUDIT_MAX_BODY_BYTES", "16")
    app = make_fastapi_app()
    FastAPIInstrumentor.instrument_app(app, tracer_provider=audit.provider)
    client = TestClient(O2AuditASGIMiddleware(app), client=("10.1.1.1", 1))
    client.post("/api/acme/echo", content=b"0123456789abcdefghij", headers={"X-Forwarded-For": "198.51.100.9",
                                                                              "Content-Type": "text/plain"})
    record = audit.one()
    assert record["client_ip"] == "198.51.100.9"
    assert record["http_body"] == "0123456789abcdef"
    assert record["http_body_truncated"] is True


def test_invalid_environment_raises_in_code_setup(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("O2_AUDIT_TRUSTED_PROXIES", "10.0.0.0/8, not-a-network")
    with pytest.raises(ValueError, match="O2_AUDIT_TRUSTED_PROXIES"):
        O2AuditASGIMiddleware(make_fastapi_app())


def test_websocket_and_lifespan_pass_through(patched: Audit) -> None:
    import fastapi

    events = []

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:  # lifespan through the hooked __call__
        events.append("started")
        yield
        events.append("stopped")

    app = fastapi.FastAPI(lifespan=lifespan)

    @app.websocket("/ws")
    async def ws(socket: WebSocket) -> None:
        await socket.accept()
        await socket.send_text("hi")
        await socket.close()

    with TestClient(app) as client, client.websocket_connect("/ws") as socket:
        assert socket.receive_text() == "hi"
    assert events == ["started", "stopped"]
    patched.processor.force_flush()
    assert patched.all_records() == []


# ------------------------------------------------------------------------------------------ subprocesses
@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Servers]:
    servers = Servers(tmp_path)
    yield servers
    servers.cleanup()


ENV: Dict[str, str] = {
    "O2_AUDIT_TRUSTED_PROXIES": "127.0.0.1",
    "O2_AUDIT_USER_HEADER": "X-Forwarded-Email",
    "O2_AUDIT_CAPTURE_BODY": "true",
    "O2_AUDIT_MAX_BODY_BYTES": "512",
}


def _exercise(server: Any) -> None:
    """Requests covering identity, address, agent, query and body; checked by :func:`_check`."""
    bad_login = server.request("POST", f"/api/acme/login?api_key={SECRET}&page=2",
                               json={"password": SECRET, "remember": True},
                               headers={"Authorization": basic("alice"), "X-Forwarded-For": "6.6.6.6, 198.51.100.20",
                                        "User-Agent": "trust-test/1.0 " + "x" * 2000})
    assert bad_login.status_code == 401, server.tail()
    proxied = server.request("GET", "/api/acme/whoami", headers={"X-Forwarded-Email": "dana@example.com",
                                                                "X-Forwarded-For": "198.51.100.21"})
    assert proxied.status_code == 200, server.tail()
    bomb = gzip.compress(b'{"a": "' + b"0" * 20_000_000 + b'"}')
    echoed = server.request("POST", "/api/acme/echo", data=bomb,
                            headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})
    assert echoed.json() == digest(bomb), server.tail()


def _check(server: Any, records: Any) -> None:
    by_path = {r["http_path"]: r for r in records}
    login = by_path["/api/acme/login"]
    assert login["user_email"] == "alice"
    assert login["http_response_code"] == 401
    assert login["client_ip"] == "198.51.100.20"
    assert login["user_agent"] == ("trust-test/1.0 " + "x" * 2000)[:1024]
    assert login["http_query_params"] == "api_key=[REDACTED]&page=2"
    assert json.loads(login["http_body"]) == {"password": "[REDACTED]", "remember": True}
    whoami = by_path["/api/acme/whoami"]
    assert (whoami["user_email"], whoami["client_ip"]) == ("dana@example.com", "198.51.100.21")
    echo = by_path["/api/acme/echo"]
    assert echo["http_body_truncated"] is True
    assert len(echo["http_body"]) <= 512
    assert "api_key=[REDACTED]&page=2" in server.output()  # uvicorn's access log, masked by the hook
    everything = server.audit_path.read_text() + server.output()
    assert SECRET not in everything
    assert PASSWORD not in everything


def test_zero_code_env_only_through_the_hook(servers: Servers) -> None:
    server = servers.patched("--no-proxy-headers", **ENV)
    _exercise(server)
    _check(server, server.wait_records(3))


def test_zero_code_sigterm_publishes_what_is_pending(servers: Servers) -> None:
    server = servers.patched("--no-proxy-headers", O2_AUDIT_PUBLISH_INTERVAL="600", **ENV)
    _exercise(server)
    assert server.records() == []  # nothing is due before the interval
    assert server.process.stop(signal.SIGTERM) is not None
    _check(server, server.wait_records(3, timeout=5))


def _hook_is_wired() -> bool:
    from otel_o2audit import setup

    return any("patch_frameworks" in inspect.getsource(module) for module in (otel_o2audit.autoinstrument, setup))


@pytest.mark.skipif(not _hook_is_wired(), reason="patch_frameworks is not yet called by zero-code setup "
                                                 "(otel_o2audit.autoinstrument); see tests.apps_trust.serve_patched")
def test_real_zero_code(servers: Servers) -> None:
    server = servers.zero_code("--no-proxy-headers", **ENV)
    assert server.request("GET", "/debug/hooked").json() == {"hooked": True}
    _exercise(server)
    records = [r for r in server.wait_records(4) if r["http_path"] != "/debug/hooked"]
    _check(server, records)
