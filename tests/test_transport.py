"""Transport security (issue 4, item 5): TLS verification, private CA, mTLS, secret files, plain-http warning.

Certificates are made at test time with the ``openssl`` CLI (a private CA, a server certificate for
127.0.0.1, a client certificate, and an unrelated CA). :class:`TLSFakeOpenObserve` is tests/o2receiver.py's
FakeOpenObserve (same ingestion API, Basic-auth check and JSON counts) with each accepted connection wrapped
in an ``ssl.SSLContext`` on 127.0.0.1; it records failed handshakes and the client certificates it saw. It
subclasses the fake's server class and ``_bind`` (o2receiver has no public hook for TLS).
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import re
import shutil
import socket
import ssl
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import o2receiver
import pytest
import requests
from inproc import Counters, Harness, SpanMaker, records_of
from o2receiver import FakeOpenObserve

import otel_o2audit
from otel_o2audit import ConfigError, O2AuditConfig, O2AuditSpanExporter
from otel_o2audit.client import HttpSink

LOGGER = "otel_o2audit"
USER = "root@example.com"
PASSWORD = "Tr4nsport#Secret-Value"  # distinctive: searched for in every log line and error message
FAST = {"timeout": 1.0, "retry_initial_backoff": 0.05, "retry_max_elapsed": 1.0, "batch_size": 100,
        "publish_interval": 60.0, "shutdown_timeout": 2.0}


# ------------------------------------------------------------------------------------------ certificates
class Certs:
    """Paths of the PEM files made for this module."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.ca = directory / "ca.pem"
        self.ca_key = directory / "ca.key"
        self.server = directory / "server.pem"
        self.server_key = directory / "server.key"
        self.client = directory / "client.pem"
        self.client_key = directory / "client.key"
        self.client_combined = directory / "client-combined.pem"
        self.other_ca = directory / "other-ca.pem"
        self.other_ca_key = directory / "other-ca.key"


def _openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, f"openssl {' '.join(args)} failed:\n{result.stderr}"


def _make_ca(directory: Path, cert: Path, key: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             "-addext", "subjectKeyIdentifier=hash", cwd=directory)


def _make_leaf(directory: Path, certs: Certs, stem: str, cn: str, extensions: str) -> None:
    ext = directory / f"{stem}.ext"
    ext.write_text(extensions + "\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n", encoding="ascii")
    csr = directory / f"{stem}.csr"
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{stem}.key", "-out", str(csr), "-subj", f"/CN={cn}", cwd=directory)
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(certs.ca), "-CAkey", str(certs.ca_key),
             "-CAcreateserial", "-out", f"{stem}.pem", "-days", "2", "-extfile", str(ext), cwd=directory)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    if shutil.which("openssl") is None:
        pytest.fail("the openssl CLI is needed to make test certificates (and the cryptography package is not "
                    "installed either)")
    directory = tmp_path_factory.mktemp("certs")
    made = Certs(directory)
    _make_ca(directory, made.ca, made.ca_key, "o2audit test CA")
    _make_ca(directory, made.other_ca, made.other_ca_key, "unrelated test CA")
    _make_leaf(directory, made, "server", "127.0.0.1",
               "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
               "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost")
    _make_leaf(directory, made, "client", "o2audit-client",
               "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
               "extendedKeyUsage=clientAuth")
    made.client_combined.write_text(made.client.read_text() + made.client_key.read_text())
    return made


# -------------------------------------------------------------------------------------- the HTTPS fake
class _TLSServer(o2receiver._Server):
    """The fake's server; each accepted connection is wrapped in TLS in its own handler thread."""

    def __init__(self, port: int, fake: TLSFakeOpenObserve) -> None:
        self.tls_fake = fake
        super().__init__(port, fake)

    def finish_request(self, request: Any, client_address: Any) -> None:
        fake = self.tls_fake
        request.settimeout(5.0)
        try:
            tls = fake.context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            fake.note_handshake_failure(exc)
            return
        try:
            fake.note_peer(tls.getpeercert())
            tls.settimeout(None)
            self.RequestHandlerClass(tls, client_address, self)
        finally:
            with contextlib.suppress(OSError):
                tls.close()


class TLSFakeOpenObserve(FakeOpenObserve):
    """FakeOpenObserve over HTTPS on 127.0.0.1 with the given server context."""

    def __init__(self, context: ssl.SSLContext, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.context = context
        self._tls_lock = threading.Lock()
        self.handshake_failures: List[str] = []
        self.peer_certs: List[Dict[str, Any]] = []

    def _bind(self, port: int) -> o2receiver._Server:
        return _TLSServer(port, self)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def note_handshake_failure(self, exc: BaseException) -> None:
        with self._tls_lock:
            self.handshake_failures.append(f"{type(exc).__name__}: {exc}")

    def note_peer(self, cert: Optional[Dict[str, Any]]) -> None:
        if cert:
            with self._tls_lock:
                self.peer_certs.append(cert)

    def failures(self) -> List[str]:
        with self._tls_lock:
            return list(self.handshake_failures)

    def peers(self) -> List[Dict[str, Any]]:
        with self._tls_lock:
            return list(self.peer_certs)


def server_context(certs: Certs, require_client_cert: bool = False) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(certs.server), str(certs.server_key))
    if require_client_cert:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(str(certs.ca))
    return context


@pytest.fixture
def https(certs: Certs) -> Iterator[TLSFakeOpenObserve]:
    fake = TLSFakeOpenObserve(server_context(certs), user=USER, password=PASSWORD).start()
    try:
        yield fake
    finally:
        fake.stop()
    assert fake.server_errors == []


@pytest.fixture
def mtls(certs: Certs) -> Iterator[TLSFakeOpenObserve]:
    fake = TLSFakeOpenObserve(server_context(certs, require_client_cert=True), user=USER, password=PASSWORD).start()
    try:
        yield fake
    finally:
        fake.stop()
    assert fake.server_errors == []


@pytest.fixture
def plain() -> Iterator[FakeOpenObserve]:
    fake = FakeOpenObserve(user=USER, password=PASSWORD).start()
    try:
        yield fake
    finally:
        fake.stop()
    assert fake.server_errors == []


@pytest.fixture
def spans() -> Iterator[SpanMaker]:
    maker = SpanMaker()
    try:
        yield maker
    finally:
        maker.close()


@pytest.fixture(autouse=True)
def _no_ambient_tls_or_proxy_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR", "NETRC",
                 "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    for name in [n for n in os.environ if n.startswith("O2_AUDIT_")]:
        monkeypatch.delenv(name, raising=False)


# ------------------------------------------------------------------------------------------------ helpers
def env_for(fake: FakeOpenObserve, **extra: str) -> Dict[str, str]:
    return {"O2_AUDIT_ENDPOINT": fake.url, "O2_AUDIT_USER": fake.user, **extra}


def exporter_from(harness: Harness, environ: Dict[str, str], **overrides: Any) -> O2AuditSpanExporter:
    """An exporter configured from an explicit ``O2_AUDIT_*`` environment (plus fast retry keywords)."""
    exporter = O2AuditSpanExporter(O2AuditConfig.from_env(environ, **{**FAST, **overrides}))
    harness.exporters.append(exporter)
    return exporter


def secrets_absent(text: str, *extra: str) -> None:
    token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    for secret in (PASSWORD, token, *extra):
        assert secret not in text, f"a secret leaked: {text!r}"


def log_text(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() + (f"\n{r.exc_text}" if r.exc_text else "") for r in caplog.records)


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# ------------------------------------------------------------------------------------------ verification
def test_unknown_ca_is_refused_counted_lost_and_logged_without_secrets(
        harness: Harness, https: TLSFakeOpenObserve, spans: SpanMaker, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    exporter = exporter_from(harness, env_for(https, O2_AUDIT_PASSWORD=PASSWORD))
    records = records_of(exporter, spans.requests(3))
    counters = Counters()
    report = exporter.export_records(records)

    assert report.delivered == 0
    assert report.lost == 3
    assert "SSL" in report.reason or "certificate" in report.reason.lower(), report.reason
    assert counters["lost"] == 3
    assert counters["published"] == 0
    assert https.ingestion_requests() == [], "nothing may reach a server whose certificate failed"
    assert https.records == []
    assert https.failures(), "the server saw the client abort the handshake"
    errors = [r for r in caplog.records if r.name == LOGGER and r.levelno >= logging.ERROR]
    assert any("3 of 3 audit records LOST" in r.getMessage() for r in errors), [r.getMessage() for r in errors]
    secrets_absent(log_text(caplog))
    secrets_absent(repr(exporter) + repr(exporter.config) + str(exporter.config.describe()))


def test_verification_is_on_even_when_the_system_trusts_nothing_extra(harness: Harness, https: TLSFakeOpenObserve,
                                                                       spans: SpanMaker) -> None:
    """The default is the system CA store: a private CA is not in it, whatever the endpoint's host."""
    exporter = exporter_from(harness, env_for(https, O2_AUDIT_PASSWORD=PASSWORD))
    assert exporter.export_records(records_of(exporter, spans.requests(1))).ok is False
    assert https.records == []


def test_ca_bundle_delivers(harness: Harness, https: TLSFakeOpenObserve, certs: Certs, spans: SpanMaker) -> None:
    exporter = exporter_from(harness, env_for(https, O2_AUDIT_PASSWORD=PASSWORD, O2_AUDIT_CA_BUNDLE=str(certs.ca)))
    records = records_of(exporter, spans.requests(3))
    counters = Counters()
    report = exporter.export_records(records)
    assert report.ok, report.reason
    assert counters["published"] == 3
    stored = https.records_for()
    assert [r["event_id"] for r in stored] == [r["event_id"] for r in records]
    (request,) = https.ingestion_requests()
    assert request.headers["authorization"] == basic(USER, PASSWORD)
    assert https.failures() == []


def test_ca_bundle_end_to_end_through_install(harness: Harness, https: TLSFakeOpenObserve, certs: Certs,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Zero-code-style environment, code-setup install(): O2_AUDIT_CA_BUNDLE read from os.environ."""
    from fastapi.testclient import TestClient
    from inproc import make_app

    for name, value in env_for(https, O2_AUDIT_PASSWORD=PASSWORD, O2_AUDIT_CA_BUNDLE=str(certs.ca)).items():
        monkeypatch.setenv(name, value)
    provider = harness.provider()
    processor = harness.track(otel_o2audit.install(provider, **FAST))
    with TestClient(make_app(provider, native=False, mount=False)) as client:
        for i in range(3):
            assert client.get(f"/api/acme/things/{i}").status_code == 200
    assert processor.force_flush(5000) is True
    assert [r["http_path"] for r in https.records_for()] == [f"/api/acme/things/{i}" for i in range(3)]


def test_requests_ca_bundle_does_not_override_ours(harness: Harness, https: TLSFakeOpenObserve, certs: Certs,
                                                   spans: SpanMaker, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(certs.other_ca))
    monkeypatch.setenv("CURL_CA_BUNDLE", str(certs.other_ca))
    # Sanity: requests itself honours the variable (so the test would notice if we did too).
    with pytest.raises(requests.exceptions.SSLError):
        requests.post(https.ingest_url(), data=b"[]", timeout=5)
    exporter = exporter_from(harness, env_for(https, O2_AUDIT_PASSWORD=PASSWORD, O2_AUDIT_CA_BUNDLE=str(certs.ca)))
    report = exporter.export_records(records_of(exporter, spans.requests(2)))
    assert report.ok, report.reason
    assert len(https.records_for()) == 2


def test_ca_bundle_of_another_ca_is_refused(harness: Harness, https: TLSFakeOpenObserve, certs: Certs,
                                           spans: SpanMaker, monkeypatch: pytest.MonkeyPatch) -> None:
    """O2_AUDIT_CA_BUNDLE is the trust store: REQUESTS_CA_BUNDLE naming the right CA does not widen it."""
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(certs.ca))
    exporter = exporter_from(harness, env_for(https, O2_AUDIT_PASSWORD=PASSWORD,
                                              O2_AUDIT_CA_BUNDLE=str(certs.other_ca)))
    report = exporter.export_records(records_of(exporter, spans.requests(1)))
    assert report.lost == 1
    assert https.records == []


def test_ca_bundle_must_be_a_readable_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    with pytest.raises(ConfigError, match="O2_AUDIT_CA_BUNDLE"):
        O2AuditConfig.from_env({"O2_AUDIT_ENDPOINT": "https://127.0.0.1:1", "O2_AUDIT_USER": USER,
                                "O2_AUDIT_PASSWORD": PASSWORD, "O2_AUDIT_CA_BUNDLE": str(missing)})


# -------------------------------------------------------------------------------------------------- mTLS
def test_mtls_without_a_client_certificate_fails(harness: Harness, mtls: TLSFakeOpenObserve, certs: Certs,
                                                 spans: SpanMaker, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    exporter = exporter_from(harness, env_for(mtls, O2_AUDIT_PASSWORD=PASSWORD, O2_AUDIT_CA_BUNDLE=str(certs.ca)))
    counters = Counters()
    report = exporter.export_records(records_of(exporter, spans.requests(2)))
    assert report.lost == 2
    assert counters["lost"] == 2
    assert mtls.records == []
    assert mtls.failures(), "the server refused the handshake without a client certificate"
    secrets_absent(log_text(caplog))


@pytest.mark.parametrize("combined", [False, True], ids=["cert-and-key", "combined-pem"])
def test_mtls_with_a_client_certificate_delivers(harness: Harness, mtls: TLSFakeOpenObserve, certs: Certs,
                                                 spans: SpanMaker, combined: bool) -> None:
    extra = ({"O2_AUDIT_CLIENT_CERT": str(certs.client_combined)} if combined else
             {"O2_AUDIT_CLIENT_CERT": str(certs.client), "O2_AUDIT_CLIENT_KEY": str(certs.client_key)})
    exporter = exporter_from(harness, env_for(mtls, O2_AUDIT_PASSWORD=PASSWORD, O2_AUDIT_CA_BUNDLE=str(certs.ca),
                                              **extra))
    report = exporter.export_records(records_of(exporter, spans.requests(2)))
    assert report.ok, report.reason
    assert len(mtls.records_for()) == 2
    subjects = [dict(part for rdn in p["subject"] for part in rdn) for p in mtls.peers()]
    assert subjects
    assert all(s.get("commonName") == "o2audit-client" for s in subjects), subjects


def test_client_key_without_cert_is_a_config_error(certs: Certs) -> None:
    with pytest.raises(ConfigError, match="O2_AUDIT_CLIENT_KEY is set without O2_AUDIT_CLIENT_CERT"):
        O2AuditConfig.from_env({"O2_AUDIT_ENDPOINT": "https://127.0.0.1:1", "O2_AUDIT_USER": USER,
                                "O2_AUDIT_PASSWORD": PASSWORD, "O2_AUDIT_CLIENT_KEY": str(certs.client_key)})


# ----------------------------------------------------------------------------------------- password files
@pytest.mark.parametrize("ending", ["\n", "\r\n", ""], ids=["LF", "CRLF", "none"])
def test_password_file_with_trailing_newline(harness: Harness, https: TLSFakeOpenObserve, certs: Certs,
                                             spans: SpanMaker, tmp_path: Path, ending: str,
                                             caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    secret_file = tmp_path / "password"
    secret_file.write_bytes((PASSWORD + ending).encode())
    exporter = exporter_from(harness, env_for(https, O2_AUDIT_PASSWORD_FILE=str(secret_file),
                                              O2_AUDIT_CA_BUNDLE=str(certs.ca)))
    assert exporter.config.password is not None
    assert exporter.config.password.reveal() == PASSWORD
    report = exporter.export_records(records_of(exporter, spans.requests(1)))
    assert report.ok, report.reason
    (request,) = https.ingestion_requests()
    assert request.headers["authorization"] == basic(USER, PASSWORD)
    assert request.status == 200
    secrets_absent(log_text(caplog) + repr(exporter.config) + str(exporter.config.describe()))


def test_password_and_password_file_together_is_an_error_naming_both(tmp_path: Path) -> None:
    secret_file = tmp_path / "password"
    file_secret = "File-Held#Secret-9"
    secret_file.write_text(file_secret + "\n")
    with pytest.raises(ConfigError) as caught:
        O2AuditConfig.from_env({"O2_AUDIT_ENDPOINT": "https://127.0.0.1:1", "O2_AUDIT_USER": USER,
                                "O2_AUDIT_PASSWORD": PASSWORD, "O2_AUDIT_PASSWORD_FILE": str(secret_file)})
    message = str(caught.value)
    assert "O2_AUDIT_PASSWORD_FILE" in message
    assert re.search(r"\bO2_AUDIT_PASSWORD\b(?!_FILE)", message), message
    assert PASSWORD not in message
    assert file_secret not in message
    assert PASSWORD not in repr(caught.value)


def test_password_keyword_and_password_file_together_is_an_error(tmp_path: Path) -> None:
    secret_file = tmp_path / "password"
    secret_file.write_text("from-the-file\n")
    with pytest.raises(ConfigError, match="O2_AUDIT_PASSWORD_FILE") as caught:
        O2AuditConfig.from_env({"O2_AUDIT_ENDPOINT": "https://127.0.0.1:1", "O2_AUDIT_USER": USER,
                                "O2_AUDIT_PASSWORD_FILE": str(secret_file)}, password=PASSWORD)
    assert PASSWORD not in str(caught.value)
    assert "from-the-file" not in str(caught.value)


@pytest.mark.parametrize("content", [b"", b"\n", b"\r\n"], ids=["empty", "LF-only", "CRLF-only"])
def test_empty_password_file_is_an_error(tmp_path: Path, content: bytes) -> None:
    secret_file = tmp_path / "password"
    secret_file.write_bytes(content)
    with pytest.raises(ConfigError, match="O2_AUDIT_PASSWORD_FILE") as caught:
        O2AuditConfig.from_env({"O2_AUDIT_ENDPOINT": "https://127.0.0.1:1", "O2_AUDIT_USER": USER,
                                "O2_AUDIT_PASSWORD_FILE": str(secret_file)})
    assert "empty" in str(caught.value)


def test_missing_password_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="O2_AUDIT_PASSWORD_FILE"):
        O2AuditConfig.from_env({"O2_AUDIT_ENDPOINT": "https://127.0.0.1:1", "O2_AUDIT_USER": USER,
                                "O2_AUDIT_PASSWORD_FILE": str(tmp_path / "absent")})


# ------------------------------------------------------------------------------------- plain-http warning
def plain_http_warnings(caplog: pytest.LogCaptureFixture) -> List[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == LOGGER and r.levelno == logging.WARNING and "plain http" in r.getMessage()]


def test_plain_http_to_a_remote_host_warns_once(harness: Harness, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    host = f"o2-{uuid.uuid4().hex[:12]}.example.invalid"  # never resolved: nothing is sent
    environ = {"O2_AUDIT_ENDPOINT": f"http://{host}:5080", "O2_AUDIT_USER": USER, "O2_AUDIT_PASSWORD": PASSWORD}
    config = O2AuditConfig.from_env(environ, **FAST)
    HttpSink(config)
    exporter = exporter_from(harness, environ)
    provider = harness.provider()
    harness.track(otel_o2audit.install(provider, config=config))
    warnings = plain_http_warnings(caplog)
    assert len(warnings) == 1, warnings
    assert host in warnings[0]
    assert "https" in warnings[0]
    secrets_absent(log_text(caplog))
    assert exporter.describe() == f"http://{host}:5080/api/_meta/audit/_json"


@pytest.mark.parametrize("endpoint", ["http://127.0.0.1:5080", "http://localhost:5080", "http://[::1]:5080",
                                      "http://127.8.9.10:5080"])
def test_plain_http_to_loopback_does_not_warn(endpoint: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    HttpSink(O2AuditConfig.from_env({"O2_AUDIT_ENDPOINT": endpoint, "O2_AUDIT_USER": USER,
                                     "O2_AUDIT_PASSWORD": PASSWORD}))
    assert plain_http_warnings(caplog) == []


def test_https_to_a_remote_host_does_not_warn(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    host = f"o2-{uuid.uuid4().hex[:12]}.example.invalid"
    HttpSink(O2AuditConfig.from_env({"O2_AUDIT_ENDPOINT": f"https://{host}:5080", "O2_AUDIT_USER": USER,
                                     "O2_AUDIT_PASSWORD": PASSWORD}))
    assert plain_http_warnings(caplog) == []


# ------------------------------------------------------------------------------------------------- netrc
@pytest.mark.parametrize("scheme", ["http", "https"])
def test_netrc_does_not_replace_our_credentials(harness: Harness, plain: FakeOpenObserve,
                                                https: TLSFakeOpenObserve, certs: Certs, spans: SpanMaker,
                                                tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scheme: str) -> None:
    fake: FakeOpenObserve = plain if scheme == "http" else https
    home = tmp_path / "home"
    home.mkdir()
    netrc = home / ".netrc"
    netrc.write_text("machine 127.0.0.1\n  login intruder@example.com\n  password netrc-password\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("HOME", str(home))
    # Sanity: requests reads this ~/.netrc when it is given no credentials of its own.
    verify: Any = str(certs.ca) if scheme == "https" else True
    sniff = requests.post(fake.ingest_url(), data=b"[]", timeout=5, verify=verify)
    assert sniff.status_code == 401
    assert fake.requests_log[-1].headers.get("authorization") == basic("intruder@example.com", "netrc-password")

    extra = {"O2_AUDIT_CA_BUNDLE": str(certs.ca)} if scheme == "https" else {}
    exporter = exporter_from(harness, env_for(fake, O2_AUDIT_PASSWORD=PASSWORD, **extra))
    report = exporter.export_records(records_of(exporter, spans.requests(2)))
    assert report.ok, report.reason
    ours = [r for r in fake.ingestion_requests() if r.records]
    assert ours
    assert all(r.headers["authorization"] == basic(USER, PASSWORD) for r in ours)
    assert len(fake.records_for()) == 2


# ------------------------------------------------------------------------------------- the fake's sanity
def test_the_https_fake_speaks_tls_only(https: TLSFakeOpenObserve, certs: Certs) -> None:
    """Positive control for the fake itself: a verified client with our CA gets OpenObserve's answers."""
    answer = requests.post(https.ingest_url(), data=b'[{"a":1}]', auth=(USER, PASSWORD), timeout=5,
                           verify=str(certs.ca), headers={"Content-Type": "application/json"})
    assert answer.status_code == 200
    assert answer.json()["status"][0]["successful"] == 1
    with socket.create_connection(("127.0.0.1", https.port), timeout=5) as raw:
        raw.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        raw.settimeout(5)
        deadline = time.monotonic() + 5
        data = b""
        while time.monotonic() < deadline:
            try:
                chunk = raw.recv(4096)
            except OSError:
                break
            if not chunk:
                break
            data += chunk
    assert b"HTTP/1.1 200" not in data, "plain HTTP must not be answered on the TLS port"
