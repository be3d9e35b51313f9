"""Who: user_email without ever storing a credential (issue 4, item 1).

Order: set_user() > span attributes > the trusted proxy's user header > the Basic-auth username. Through
real applications (FastAPI with the contrib instrumentation, Flask behind OpenTelemetry's WSGI middleware),
with hostile input: forged identity headers, failed logins, tokens, injection attempts.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Set, Tuple

import pytest
from apps_trust.harness import Audit, make_fastapi_app
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

from otel_o2audit import O2AuditConfig
from otel_o2audit.middleware import O2AuditASGIMiddleware, basic_username, startup_warnings

PASSWORD = "Tr0ub4dor&3-never-stored"


def basic(user: str, password: str = PASSWORD) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.fixture
def audit(tmp_path: Path) -> Iterator[Audit]:
    audit = Audit(tmp_path, trusted_proxies="10.0.0.0/8", user_header="X-Forwarded-Email")
    yield audit
    audit.close()


def whoami(audit: Audit, peer: str = "203.0.113.5", headers: Optional[Dict[str, str]] = None,
           **params: str) -> Dict[str, Any]:
    client = audit.fastapi_client(peer=peer)
    response = client.get("/api/acme/whoami", headers=headers or {}, params=params)
    assert response.status_code == 200
    return audit.one()


# ------------------------------------------------------------------------------------------ order
@pytest.mark.parametrize(
    ("sources", "expected"),
    [
        ({"app", "span", "header", "basic"}, "app@example.com"),
        ({"span", "header", "basic"}, "span@example.com"),
        ({"header", "basic"}, "proxy@example.com"),
        ({"basic"}, "basic-user"),
        (set(), ""),
    ],
)
def test_identity_order(audit: Audit, sources: Set[str], expected: str) -> None:
    headers: Dict[str, str] = {}
    params: Dict[str, str] = {}
    if "app" in sources:
        params["app_user"] = "app@example.com"
    if "span" in sources:
        params["span_user"] = "span@example.com"
    if "header" in sources:
        headers["X-Forwarded-Email"] = "proxy@example.com"
    if "basic" in sources:
        headers["Authorization"] = basic("basic-user")
    record = whoami(audit, peer="10.0.0.7", headers=headers, **params)
    assert record["user_email"] == expected


def test_set_user_empty_means_anonymous_even_with_basic_auth(audit: Audit) -> None:
    record = whoami(audit, headers={"Authorization": basic("bob")}, app_user="")
    assert record["user_email"] == ""


# ------------------------------------------------------------------------------------------ proxy header
def test_user_header_from_untrusted_peer_is_ignored(audit: Audit) -> None:
    record = whoami(audit, peer="203.0.113.5", headers={"X-Forwarded-Email": "admin@example.com"})
    assert record["user_email"] == ""


def test_user_header_from_untrusted_peer_falls_back_to_basic(audit: Audit) -> None:
    record = whoami(audit, peer="203.0.113.5",
                    headers={"X-Forwarded-Email": "admin@example.com", "Authorization": basic("eve")})
    assert record["user_email"] == "eve"


def test_user_header_from_trusted_peer(audit: Audit) -> None:
    record = whoami(audit, peer="10.1.2.3", headers={"X-Forwarded-Email": "dana@example.com"})
    assert record["user_email"] == "dana@example.com"


def test_user_header_is_trusted_by_peer_not_by_forwarded_for(audit: Audit) -> None:
    # A caller claiming, in X-Forwarded-For, to come through a trusted proxy is still untrusted.
    record = whoami(audit, peer="203.0.113.5",
                    headers={"X-Forwarded-Email": "admin@example.com", "X-Forwarded-For": "10.0.0.1"})
    assert record["user_email"] == ""


def test_user_header_without_trusted_proxies_is_never_honoured(tmp_path: Path) -> None:
    audit = Audit(tmp_path, user_header="X-Forwarded-Email")
    try:
        record = whoami(audit, peer="127.0.0.1", headers={"X-Forwarded-Email": "admin@example.com"})
        assert record["user_email"] == ""
    finally:
        audit.close()


def test_several_user_headers_are_ambiguous(audit: Audit) -> None:
    client = audit.fastapi_client(peer="10.1.2.3")
    response = client.get("/api/acme/whoami", headers=[("X-Forwarded-Email", "mallory@example.com"),
                                                       ("X-Forwarded-Email", "dana@example.com")])
    assert response.status_code == 200
    assert audit.one()["user_email"] == ""


def test_utf8_identity_from_the_proxy_header(audit: Audit) -> None:
    client = audit.fastapi_client(peer="10.1.2.3")
    response = client.get("/api/acme/whoami", headers={"X-Forwarded-Email": "jos\u00e9@example.com".encode()})
    assert response.status_code == 200
    record = audit.one()
    assert record["user_email"] == "jos\u00e9@example.com"


def test_startup_warnings() -> None:
    lonely = O2AuditConfig.from_env({}, require_endpoint=False, user_header="X-Forwarded-Email")
    assert any("O2_AUDIT_TRUSTED_PROXIES is empty" in m for m in startup_warnings(lonely))
    everyone = O2AuditConfig.from_env({}, require_endpoint=False, trusted_proxies="0.0.0.0/0")
    assert any("every caller is trusted" in m for m in startup_warnings(everyone))
    fine = O2AuditConfig.from_env({}, require_endpoint=False, trusted_proxies="10.0.0.0/8",
                                  user_header="X-Forwarded-Email", capture_body=True)
    assert startup_warnings(fine) == []


@pytest.mark.parametrize("header", ["Authorization", "Cookie", "Proxy-Authorization"])
def test_credential_header_is_never_an_identity(tmp_path: Path, header: str) -> None:
    audit = Audit(tmp_path, trusted_proxies="10.0.0.0/8", user_header=header)
    try:
        assert any("credential header" in m for m in startup_warnings(audit.config))
        value = basic("alice") if header != "Cookie" else f"session={PASSWORD}"
        record = whoami(audit, peer="10.0.0.9", headers={header: value})
        assert record["user_email"] in ("", "alice")  # at most the Basic username, never the header value
        assert PASSWORD not in audit.raw_text()
        response = audit.flask_client().get("/api/acme/whoami", headers={header: value},
                                            environ_base={"REMOTE_ADDR": "10.0.0.9"}, buffered=True)
        assert response.status_code == 200
        assert audit.one()["user_email"] in ("", "alice")
        assert PASSWORD not in audit.raw_text()
    finally:
        audit.close()


def test_startup_warning_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    config = O2AuditConfig.from_env({}, require_endpoint=False, user_header="X-Auth-Request-Email")
    with caplog.at_level(logging.WARNING, logger="otel_o2audit"):
        for _ in range(3):
            O2AuditASGIMiddleware(make_fastapi_app(), config)
    hits = [r for r in caplog.records if "X-Auth-Request-Email".lower() in r.getMessage()]
    assert len(hits) == 1
    assert hits[0].levelno == logging.WARNING


# ------------------------------------------------------------------------------------------ Basic auth
def test_failed_login_records_who_tried(audit: Audit, caplog: pytest.LogCaptureFixture) -> None:
    client = audit.fastapi_client()
    with caplog.at_level(logging.DEBUG):
        response = client.post("/api/acme/login", headers={"Authorization": basic("alice")}, json={"x": 1})
    assert response.status_code == 401
    record = audit.one()
    assert record["user_email"] == "alice"
    assert record["http_response_code"] == 401
    for text in (audit.raw_text(), audit.span_text(), caplog.text):
        assert PASSWORD not in text
        assert base64.b64encode(f"alice:{PASSWORD}".encode()).decode()[8:] not in text
    assert "authorization" not in audit.span_text().lower()


def test_successful_login(audit: Audit) -> None:
    client = audit.fastapi_client()
    response = client.post("/api/acme/login", headers={"Authorization": "Basic YWxpY2U6Y29ycmVjdA=="})
    assert response.status_code == 200
    assert audit.one()["user_email"] == "alice"
    assert "correct" not in audit.raw_text()
    assert "YWxpY2U6Y29ycmVjdA" not in audit.raw_text()


def test_authorization_never_reaches_spans(audit: Audit) -> None:
    client = audit.fastapi_client()
    client.get("/api/acme/whoami", headers={"Authorization": basic("alice")})
    audit.one()
    text = audit.span_text().lower()
    assert "authorization" not in text
    assert PASSWORD.lower() not in text
    assert "alice" not in text  # not even the username: identities stay out of traces


@pytest.mark.parametrize(
    "header",
    [
        "Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ0b2tlbi11c2VyIiwiZW1haWwiOiJ0b2tlbkBleGFtcGxlLmNvbSJ9.c2ln",
        "Basic " + base64.b64encode(b"sk_live_0123456789:").decode(),  # an API key as username, no password
        "Basic " + base64.b64encode(b"just-a-token").decode(),  # no colon
        "Basic !!!not base64!!!",
        "Basic ",
        "Digest username=\"carol\", realm=\"x\"",
        "Basic " + base64.b64encode(b":password-only").decode(),
        "Basic " + "QUFB" * 2000,  # absurdly long
    ],
)
def test_no_identity_from_tokens_or_malformed_values(audit: Audit, header: str) -> None:
    record = whoami(audit, headers={"Authorization": header})
    assert record["user_email"] == ""
    assert "token" not in audit.raw_text()
    assert "sk_live" not in audit.raw_text()


def test_basic_username_unit() -> None:
    assert basic_username(basic("alice")) == "alice"
    assert basic_username(basic("alice").encode()) == "alice"
    assert basic_username("basic " + base64.b64encode(b"bob:pw").decode()) == "bob"
    assert basic_username("BASIC   " + base64.b64encode(b"bob:pw").decode().rstrip("=")) == "bob"
    assert basic_username("Basic " + base64.b64encode("jos\u00e9:pw".encode()).decode()) == "jos\u00e9"
    assert basic_username("Basic " + base64.b64encode("jos\u00e9:pw".encode("latin-1")).decode()) == "jos\u00e9"
    assert basic_username("Basic " + base64.b64encode(b"a:b:c").decode()) == "a"  # the password may hold ':'


@pytest.mark.parametrize(
    ("username", "check"),
    [
        ("mallory\r\nadmin@example.com", lambda u: u == "mallory admin@example.com"),
        ("eve\x00root", lambda u: u == "eve root"),
        ("x\u2028y\u2029z\x85w", lambda u: len(u.splitlines()) == 1),
        ("a\x1b[31mred", lambda u: "\x1b" not in u),
        ("u" * 2000, lambda u: u == "u" * 256),
    ],
)
def test_basic_username_injection_is_cleaned(audit: Audit, username: str, check: Any) -> None:
    record = whoami(audit, headers={"Authorization": basic(username)})
    assert check(record["user_email"]), record["user_email"]
    assert len(record["user_email"].splitlines()) == 1


def _raw_asgi_get(app: Any, headers: List[Tuple[bytes, bytes]], peer: str) -> int:
    """One GET through an ASGI app with header bytes no HTTP client library would send."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
             "scheme": "http", "path": "/api/acme/whoami", "raw_path": b"/api/acme/whoami", "query_string": b"",
             "root_path": "", "headers": [(b"host", b"testserver"), *headers], "client": (peer, 1234),
             "server": ("testserver", 80)}
    status: List[int] = []

    async def receive() -> Dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            status.append(message["status"])

    asyncio.run(app(scope, receive, send))
    return status[0]


def test_header_injection_in_the_proxy_header(audit: Audit) -> None:
    app = make_fastapi_app()
    FastAPIInstrumentor.instrument_app(app, tracer_provider=audit.provider)
    wrapped = O2AuditASGIMiddleware(app, audit.config)
    status = _raw_asgi_get(wrapped, [(b"x-forwarded-email", b"dana@example.com\r\nX-Admin: true\x00\x7f")],
                           "10.0.0.3")
    assert status == 200
    user = audit.one()["user_email"]
    assert user == "dana@example.com X-Admin: true"


def test_oversized_proxy_header_is_ignored(audit: Audit) -> None:
    record = whoami(audit, peer="10.1.2.3", headers={"X-Forwarded-Email": "a" * 5000})
    assert record["user_email"] == ""


# ------------------------------------------------------------------------------------------ Flask
def test_flask_identity(audit: Audit) -> None:
    client = audit.flask_client()
    failed = client.post("/api/acme/login", headers={"Authorization": basic("alice")},
                         environ_base={"REMOTE_ADDR": "203.0.113.9"}, buffered=True)
    assert failed.status_code == 401
    record = audit.one()
    assert (record["user_email"], record["http_response_code"]) == ("alice", 401)
    forged = client.get("/api/acme/whoami", headers={"X-Forwarded-Email": "admin@example.com"},
                        environ_base={"REMOTE_ADDR": "203.0.113.9"}, buffered=True)
    assert forged.status_code == 200
    assert audit.one()["user_email"] == ""
    proxied = client.get("/api/acme/whoami", headers={"X-Forwarded-Email": "dana@example.com",
                                                      "Authorization": basic("alice")},
                         environ_base={"REMOTE_ADDR": "10.4.4.4"}, buffered=True)
    assert proxied.status_code == 200
    assert audit.one()["user_email"] == "dana@example.com"
    named = client.get("/api/acme/whoami?app_user=app@example.com", headers={"Authorization": basic("alice")},
                       buffered=True)
    assert named.status_code == 200
    assert audit.one()["user_email"] == "app@example.com"
    assert PASSWORD not in audit.raw_text()
    assert PASSWORD not in audit.span_text()


def test_flask_header_injection(audit: Audit) -> None:
    client = audit.flask_client()
    response = client.get("/api/acme/whoami", environ_base={"REMOTE_ADDR": "10.4.4.4",
                                                            "HTTP_X_FORWARDED_EMAIL": "eve\r\nadmin"},
                          buffered=True)
    assert response.status_code == 200
    assert audit.one()["user_email"] == "eve admin"
