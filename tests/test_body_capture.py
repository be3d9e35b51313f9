"""With what: request bodies, off by default, capped, redacted (issue 4, item 3).

Through real applications (FastAPI + contrib instrumentation + our ASGI middleware, Flask + OpenTelemetry's
WSGI middleware + ours), each of which reports the SHA-256 of the body it received, so every test also shows
the application got the body unchanged. Hostile input: huge and streaming bodies, malformed JSON, invalid
UTF-8, gzip bombs, binary and multipart uploads.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import json
import tracemalloc
import zlib
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest
from apps_trust.harness import Audit, chunks, digest

from otel_o2audit import O2AuditConfig
from otel_o2audit.body import BodyCapture, redact_json_text, render_body
from otel_o2audit.middleware import _capturing_receive, _CapturingInput
from otel_o2audit.redact import REDACTED, Redactor

R = Redactor()
BIG = O2AuditConfig.from_env({}, require_endpoint=False, capture_body=True, max_body_bytes=4096)
SECRET = "hunter2-SECRET-VALUE"
CAP = 256


@pytest.fixture
def audit(tmp_path: Path) -> Iterator[Audit]:
    audit = Audit(tmp_path, capture_body=True, max_body_bytes=CAP)
    yield audit
    audit.close()


def post(audit: Audit, body: bytes, content_type: str = "application/json", path: str = "/api/acme/echo",
         **headers: str) -> Dict[str, Any]:
    client = audit.fastapi_client()
    response = client.post(path, content=body, headers={"Content-Type": content_type, **headers})
    assert response.status_code == 200, response.text
    if path.endswith("/echo"):
        assert response.json() == digest(body)  # the application received every byte unchanged
    return audit.one()


# ------------------------------------------------------------------------------------------ on/off
def test_off_by_default(tmp_path: Path) -> None:
    audit = Audit(tmp_path)
    try:
        record = post(audit, json.dumps({"note": "visible?"}).encode())
        assert record["http_body"] == ""
        assert not {"http_body_truncated", "http_body_size", "http_content_type"} & set(record)
        assert "visible?" not in audit.raw_text()
    finally:
        audit.close()


def test_requests_without_a_body_skip_capture(audit: Audit) -> None:
    client = audit.fastapi_client()
    assert client.get("/api/acme/whoami").status_code == 200
    assert client.post("/api/acme/echo", content=b"").status_code == 200
    for record in audit.new_records(2):
        assert record["http_body"] == ""
        assert "http_body_size" not in record
        assert "http_body_truncated" not in record


# ------------------------------------------------------------------------------------------ JSON, form, text
def test_json_is_redacted_at_any_depth(audit: Audit) -> None:
    document = {"user": "ann", "password": SECRET, "profile": {"api_key": SECRET, "tags": ["a", {"Secret": SECRET}]},
                "items": [{"clientSecret": {"nested": SECRET}}, {"page": 2}], "author": "ann"}
    record = post(audit, json.dumps(document).encode())
    assert SECRET not in audit.raw_text()
    stored = json.loads(record["http_body"])
    assert stored == {"user": "ann", "password": REDACTED,
                      "profile": {"api_key": REDACTED, "tags": ["a", {"Secret": REDACTED}]},
                      "items": [{"clientSecret": REDACTED}, {"page": 2}], "author": "ann"}
    assert record["http_content_type"] == "application/json"
    assert record["http_body_size"] == len(json.dumps(document).encode())
    assert "http_body_truncated" not in record


def test_json_names_with_escapes_are_decoded(audit: Audit) -> None:
    body = ('{"pass\\u0077ord": "' + SECRET + '", "ok": "\\u00e9"}').encode()
    record = post(audit, body)
    assert SECRET not in record["http_body"]
    assert json.loads(record["http_body"]) == {"password": REDACTED, "ok": "\u00e9"}


def test_vendor_json_and_json_lines(audit: Audit) -> None:
    record = post(audit, b'{"token": "' + SECRET.encode() + b'"}', "application/vnd.api+json; charset=utf-8")
    assert json.loads(record["http_body"]) == {"token": REDACTED}
    lines = b'{"a": 1, "secret": "' + SECRET.encode() + b'"}\n{"b": 2, "pwd": "' + SECRET.encode() + b'"}\n'
    record = post(audit, lines, "application/x-ndjson")
    assert SECRET not in record["http_body"]
    assert record["http_body"].count(REDACTED) == 2


def test_form_body(audit: Audit) -> None:
    body = f"user=ann&password={SECRET}&pass%77ord={SECRET}&api+key={SECRET}&page=2&author=ann".encode()
    record = post(audit, body, "application/x-www-form-urlencoded")
    assert record["http_body"] == (
        "user=ann&password=[REDACTED]&pass%77ord=[REDACTED]&api+key=[REDACTED]&page=2&author=ann")


def test_text_body_is_stored_with_best_effort_masking(audit: Audit) -> None:
    body = f"hello\npassword = {SECRET}\nAuthorization: Bearer {SECRET}\n<token>{SECRET}</token>\nbye".encode()
    record = post(audit, body, "text/plain; charset=utf-8")
    assert SECRET not in record["http_body"]
    assert record["http_body"].startswith("hello\npassword = [REDACTED]\n")
    assert record["http_body"].endswith("bye")


def test_xml_body(audit: Audit) -> None:
    body = (f'<login user="ann" password="{SECRET}"><pwd><![CDATA[{SECRET}]]></pwd><page>2</page></login>').encode()
    record = post(audit, body, "application/xml")
    assert SECRET not in record["http_body"]
    assert "<page>2</page>" in record["http_body"]


def test_malformed_json_drops_the_rest(audit: Audit) -> None:
    body = b'{"a": 1, "b": [1, 2}, "password": "' + SECRET.encode() + b'"}'
    record = post(audit, body)
    assert SECRET not in record["http_body"]
    assert record["http_body"].startswith('{"a": 1, "b": [1, 2')
    assert record["http_body"].endswith("[invalid JSON: rest dropped]")


@pytest.mark.parametrize(
    "body",
    [f"password={SECRET}&a=1", f"{{password: '{SECRET}'}}", f"{{'password': '{SECRET}'}}", f"[1, {SECRET}]",
     f'{{"a": 1}} password={SECRET}'],
)
def test_not_json_but_labelled_json(audit: Audit, body: str) -> None:
    record = post(audit, body.encode())
    assert SECRET not in record["http_body"]
    assert record["http_body"].endswith("[invalid JSON: rest dropped]")


def test_json_without_content_type_is_sniffed(audit: Audit) -> None:
    client = audit.fastapi_client()
    response = client.post("/api/acme/echo", content=b'{"password": "' + SECRET.encode() + b'"}')
    assert response.status_code == 200
    record = audit.one()
    assert json.loads(record["http_body"]) == {"password": REDACTED}
    assert "http_content_type" not in record


def test_invalid_utf8_is_replaced(audit: Audit) -> None:
    body = b'{"name": "caf\xc3\xa9 \xff\xfe \xed\xa0\x80", "password": "\xff' + SECRET.encode() + b'"}'
    record = post(audit, body)
    assert SECRET not in record["http_body"]
    assert "caf\u00e9 \ufffd\ufffd" in record["http_body"]
    json.dumps(record)  # the record stays valid JSON text


# ------------------------------------------------------------------------------------------ truncation
def test_truncated_json_inside_a_secret_value(audit: Audit) -> None:
    padding = "x" * (CAP - len('{"a": "", "password": "') - 15)  # the cut falls 15 bytes into the secret
    body = json.dumps({"a": padding, "password": SECRET * 10, "b": "tail"}).encode()
    assert len(body) > CAP
    record = post(audit, body)
    assert record["http_body_truncated"] is True
    assert record["http_body_size"] == len(body)
    assert len(record["http_body"].encode()) <= CAP
    assert SECRET[:5] not in record["http_body"]
    assert '"password": "[REDACTED]"' in record["http_body"]


@pytest.mark.parametrize("cap", [1, 7, 20, 33, 34, 35, 36, 40, 57, 64])
def test_every_cut_of_a_json_document_is_safe(cap: int) -> None:
    body = (b'{"ok": "yes", "pass\\u0077ord": "qqqqqqqqqq", "deep": {"token": ["qqqq", {"x": "qqq"}]}, '
            b'"n": 12}')
    capture = BodyCapture(cap, "application/json", None, len(body))
    capture.feed(body)
    rendered = render_body(capture, R)
    assert rendered is not None
    assert rendered.truncated is (cap < len(body))
    assert "q" not in rendered.text
    assert len(rendered.text.encode()) <= cap


def test_truncated_form_and_multibyte_cut(audit: Audit) -> None:
    body = ("name=" + "\u00e9" * ((CAP - 5) // 2) + "\u00e9" + "&password=" + SECRET).encode()
    record = post(audit, body, "application/x-www-form-urlencoded")
    assert record["http_body_truncated"] is True
    assert "\ufffd" not in record["http_body"]  # the cut character is dropped, not replaced
    assert SECRET not in record["http_body"]


def test_huge_streaming_body_is_passed_on_unchanged(audit: Audit) -> None:
    body = bytes(range(256)) * 40_000  # 10 MB, chunked (no Content-Length)
    client = audit.fastapi_client()
    response = client.post("/api/acme/stream", content=chunks(body, 65_536),
                           headers={"Content-Type": "application/octet-stream"})
    assert response.status_code == 200
    assert response.json() == digest(body)
    record = audit.one()
    assert record["http_body"] == f"[binary body: application/octet-stream, {len(body)} bytes]"
    assert record["http_body_size"] == len(body)


def test_asgi_capture_holds_at_most_the_cap() -> None:
    capture = BodyCapture(1000, "text/plain")
    sizes = [10, 5000, 0, 70_000, 3]
    messages: List[Dict[str, Any]] = [{"type": "http.request", "body": b"a" * n, "more_body": True} for n in sizes]
    messages.append({"type": "http.request", "body": b"z", "more_body": False})
    queue = list(messages)

    async def receive() -> Dict[str, Any]:
        return queue.pop(0)

    wrapped = _capturing_receive(receive, capture)

    async def drain() -> List[Dict[str, Any]]:
        return [await wrapped() for _ in messages]

    received = asyncio.run(drain())
    assert received == messages  # the very same messages, unchanged
    assert len(capture.data) == 1000
    assert capture.size == sum(sizes) + 1
    assert capture.complete


def test_wsgi_input_wrapper_is_transparent() -> None:
    body = b"line one\nline two\n" + bytes(range(256)) * 100 + b"\nlast line"
    for reader in ("read", "read-chunks", "readline", "readlines", "iterate", "readinto"):
        capture = BodyCapture(300, "application/octet-stream", None, len(body))
        stream = _CapturingInput(io.BytesIO(body), capture)
        if reader == "read":
            got = stream.read()
        elif reader == "read-chunks":
            got = b"".join(iter(lambda stream=stream: stream.read(777), b""))  # type: ignore[misc]
        elif reader == "readline":
            got = b"".join(iter(stream.readline, b""))
        elif reader == "readlines":
            got = b"".join(stream.readlines())
        elif reader == "iterate":
            got = b"".join(stream)
        else:
            buffer, parts = bytearray(500), []
            while True:
                count = stream.readinto(buffer)
                if not count:
                    break
                parts.append(bytes(buffer[:count]))
            got = b"".join(parts)
        assert got == body, reader
        assert bytes(capture.data) == body[:300], reader
        assert capture.size == len(body), reader
        assert capture.complete, reader


def test_application_that_never_reads_the_body(audit: Audit) -> None:
    record = post(audit, b'{"password": "' + SECRET.encode() + b'"}', path="/api/acme/ignore-body")
    assert record["http_body"] == ""
    assert record["http_body_truncated"] is True
    assert record["http_body_size"] == len(b'{"password": "') + len(SECRET) + 2


# ------------------------------------------------------------------------------------------ binary, multipart
def test_binary_is_never_stored(audit: Audit) -> None:
    png = b"\x89PNG\r\n\x1a\n" + SECRET.encode() + bytes(200)
    record = post(audit, png, "image/png")
    assert record["http_body"] == f"[binary body: image/png, {len(png)} bytes]"
    assert SECRET not in audit.raw_text()
    sniffed = post(audit, b"\x00\x01\x02" + SECRET.encode(), "")
    assert sniffed["http_body"].startswith("[binary body:")


def test_multipart_files_are_never_stored(audit: Audit) -> None:
    client = audit.fastapi_client(config=BIG)
    files = {"upload": ("report.pdf", b"%PDF-" + SECRET.encode(), "application/pdf"),
             "notes": ("notes.txt", SECRET.encode(), "text/plain")}
    response = client.post("/api/acme/echo", files=files, data={"title": "Q3", "password": SECRET})
    assert response.status_code == 200
    record = audit.one()
    assert SECRET not in audit.raw_text()
    stored = json.loads(record["http_body"])
    assert stored["title"] == "Q3"
    assert stored["password"] == REDACTED
    assert stored["upload"] == f"[file: report.pdf, application/pdf, {len(SECRET) + 5} bytes]"
    assert stored["notes"] == f"[file: notes.txt, text/plain, {len(SECRET)} bytes]"
    assert record["http_content_type"] == "multipart/form-data"


def test_multipart_cut_inside_a_secret_field() -> None:
    boundary = "XyZ"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"title\"\r\n\r\nQ3\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"api_key\"\r\n\r\n{SECRET}\r\n"
            f"--{boundary}--\r\n").encode()
    for cap in range(1, len(body) + 1):
        capture = BodyCapture(cap, f"multipart/form-data; boundary={boundary}", None, len(body))
        capture.feed(body)
        rendered = render_body(capture, R)
        assert rendered is not None
        assert SECRET[:3] not in rendered.text, cap


# ------------------------------------------------------------------------------------------ encodings
def test_gzip_json_is_inflated_and_redacted(audit: Audit) -> None:
    plain = json.dumps({"user": "ann", "password": SECRET}).encode()
    record = post(audit, gzip.compress(plain), **{"Content-Encoding": "gzip"})
    assert json.loads(record["http_body"]) == {"user": "ann", "password": REDACTED}
    assert record["http_body_size"] == len(gzip.compress(plain))


def test_deflate_and_unknown_encodings(audit: Audit) -> None:
    plain = json.dumps({"token": SECRET, "a": 1}).encode()
    record = post(audit, zlib.compress(plain), **{"Content-Encoding": "deflate"})
    assert json.loads(record["http_body"]) == {"token": REDACTED, "a": 1}
    raw = zlib.compressobj(wbits=-15)
    record = post(audit, raw.compress(plain) + raw.flush(), **{"Content-Encoding": "deflate"})
    assert json.loads(record["http_body"]) == {"token": REDACTED, "a": 1}
    record = post(audit, b"\x1b\x00" + plain, **{"Content-Encoding": "br"})
    assert record["http_body"] == f"[br-encoded body: application/json, {len(plain) + 2} bytes]"
    record = post(audit, b"not gzip at all " + SECRET.encode(), **{"Content-Encoding": "gzip"})
    assert record["http_body"].endswith("not decodable]")
    assert SECRET not in audit.raw_text()


def test_gzip_bomb(audit: Audit) -> None:
    bomb = gzip.compress(b'{"a": "' + b"0" * 50_000_000 + b'"}', compresslevel=9)
    assert len(bomb) < 100_000
    record = post(audit, bomb, **{"Content-Encoding": "gzip"})
    assert record["http_body_truncated"] is True
    assert record["http_body_size"] == len(bomb)
    assert len(record["http_body"].encode()) <= CAP
    assert record["http_body"].startswith('{"a": "000')


def test_gzip_bomb_allocates_no_more_than_the_cap() -> None:
    bomb = gzip.compress(b"\x00" * 200_000_000, compresslevel=9)
    capture = BodyCapture(8192, "text/plain", "gzip", len(bomb))
    capture.feed(bomb)
    tracemalloc.start()
    try:
        rendered = render_body(capture, R)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert rendered is not None
    assert rendered.truncated
    assert peak < 256 * 1024, peak


def test_many_gzip_members_stop_at_the_cap() -> None:
    members = gzip.compress(b"x" * 5000) * 50
    capture = BodyCapture(8192, "text/plain", "gzip", len(members))
    capture.feed(members)
    rendered = render_body(capture, R)
    assert rendered is not None
    assert rendered.truncated
    assert rendered.text == "x" * 8192


# ------------------------------------------------------------------------------------------ Flask
def test_flask_bodies(audit: Audit) -> None:
    client = audit.flask_client()
    document = {"user": "ann", "credentials": {"password": SECRET}, "list": [1, 2]}
    response = client.post("/api/acme/echo", data=json.dumps(document), content_type="application/json",
                           buffered=True)
    assert response.json == digest(json.dumps(document).encode())
    assert json.loads(audit.one()["http_body"]) == {"user": "ann", "credentials": REDACTED, "list": [1, 2]}
    big = b'{"a": "' + b"y" * 5000 + b'", "token": "' + SECRET.encode() + b'"}'
    response = client.post("/api/acme/stream", data=big, content_type="application/json", buffered=True)
    assert response.json == digest(big)
    record = audit.one()
    assert record["http_body_truncated"] is True
    assert record["http_body_size"] == len(big)
    form = client.post("/api/acme/echo", data={"password": SECRET, "page": "2"}, buffered=True)
    assert form.status_code == 200
    assert audit.one()["http_body"] == "password=[REDACTED]&page=2"
    bomb = gzip.compress(b"1" * 20_000_000)
    response = client.post("/api/acme/echo", data=bomb, headers={"Content-Encoding": "gzip"},
                           content_type="text/plain", buffered=True)
    assert response.json == digest(bomb)
    record = audit.one()
    assert record["http_body"] == "1" * CAP
    assert record["http_body_truncated"] is True
    assert SECRET not in audit.raw_text()


def test_flask_upload(audit: Audit) -> None:
    client = audit.flask_client(config=BIG)
    response = client.post("/api/acme/echo", data={"title": "Q3", "file": (io.BytesIO(SECRET.encode()), "a.bin")},
                           buffered=True)
    assert response.status_code == 200
    stored = json.loads(audit.one()["http_body"])
    assert stored["title"] == "Q3"
    assert stored["file"].startswith("[file: a.bin")
    assert SECRET not in audit.raw_text()


def test_redact_json_text_fast_and_tolerant_paths_agree() -> None:
    document = {"a": [1, {"secret": {"x": 1}}], "b": {"Api-Key": "k", "c": None}, "d": "e"}
    text = json.dumps(document)
    fast, _ = redact_json_text(text, R)
    tolerant, invalid = redact_json_text(text, R, truncated=True)
    assert not invalid
    assert json.loads(fast) == json.loads(tolerant) == {"a": [1, {"secret": REDACTED}],
                                                        "b": {"Api-Key": REDACTED, "c": None}, "d": "e"}
    deep = "[" * 50_000 + "]" * 50_000
    assert redact_json_text(deep, R)[0] == deep  # no recursion limit


def test_body_digest_helper() -> None:
    assert digest(b"abc")["sha256"] == hashlib.sha256(b"abc").hexdigest()
