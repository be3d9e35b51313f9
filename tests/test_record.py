"""Span to audit record (audit-record.md), with real SDK spans shaped like opentelemetry.md's table."""

from __future__ import annotations

import contextvars
import re
from typing import Any, Dict, Iterator, Mapping, Optional

import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer

from otel_o2audit.config import O2AuditConfig
from otel_o2audit.record import RecordBuilder, request_method, request_path
from otel_o2audit.redact import Redactor
from otel_o2audit.routes import RouteTable
from otel_o2audit.scope import RequestScope, open_scope, set_user

START_NS = 1_767_225_600_123_456_789  # 2026-01-01T00:00:00.123456789Z
END_NS = START_NS + 12_345_678  # 12.345678 ms later
SERVICE = "billing-api"

# ---------------------------------------------------------------- attribute sets, as instrumentations make them

# FastAPI/ASGI, default (old) semantic conventions.
OLD_SEMCONV: Dict[str, Any] = {
    "http.scheme": "http",
    "http.host": "api.example.com:8000",
    "net.host.port": 8000,
    "http.flavor": "1.1",
    "http.target": "/api/acme/dashboards/7",
    "http.url": "http://api.example.com:8000/api/acme/dashboards/7?access_token=abc&page=2",
    "http.method": "GET",
    "http.server_name": "api.example.com",
    "http.user_agent": "curl/8.5.0",
    "net.peer.ip": "203.0.113.9",
    "net.peer.port": 50000,
    "http.route": "/api/{org_id}/dashboards/{id}",
    "http.status_code": 200,
}

# OTEL_SEMCONV_STABILITY_OPT_IN=http
STABLE_SEMCONV: Dict[str, Any] = {
    "url.scheme": "http",
    "server.address": "api.example.com",
    "server.port": 8000,
    "network.protocol.version": "1.1",
    "url.path": "/api/acme/dashboards/7",
    "url.query": "access%5Ftoken=abc&page=2",
    "http.request.method": "GET",
    "user_agent.original": "curl/8.5.0",
    "client.address": "203.0.113.9",
    "client.port": 50000,
    "http.route": "/api/{org_id}/dashboards/{id}",
    "http.response.status_code": 200,
}

# OTEL_SEMCONV_STABILITY_OPT_IN=http/dup: both sets.
DUP_SEMCONV: Dict[str, Any] = {**OLD_SEMCONV, **STABLE_SEMCONV}

# WSGI behind gunicorn/uwsgi (RAW_URI): http.target carries the query, no route.
WSGI_RAW_URI: Dict[str, Any] = {
    "http.method": "POST",
    "http.server_name": "api.example.com",
    "http.scheme": "http",
    "net.host.port": 8000,
    "http.host": "api.example.com:8000",
    "http.target": "/api/acme/alerts?token=t0k&dry_run=1",
    "net.peer.ip": "198.51.100.4",
    "http.user_agent": "python-requests/2.32",
    "http.flavor": "1.1",
    "http.status_code": 201,
}

# WSGI with only http.url.
WSGI_URL_ONLY: Dict[str, Any] = {
    "http.method": "DELETE",
    "http.url": "http://api.example.com/api/v2/acme/things/9?password=pw&force=true",
    "http.status_code": 204,
}

# WSGI with nothing but the method: only the span name is left.
WSGI_NAME_ONLY: Dict[str, Any] = {"http.method": "PUT", "http.status_code": 200}

KEY_RE = re.compile(r"^[a-z0-9_]+$")
HEX32 = re.compile(r"^[0-9a-f]{32}$")
HEX16 = re.compile(r"^[0-9a-f]{16}$")

CORE_TYPES = {
    "_timestamp": int,
    "user_email": str,
    "org_id": str,
    "protocol": str,
    "http_method": str,
    "http_path": str,
    "http_query_params": str,
    "http_body": str,
    "http_response_code": int,
    "trace_id": str,
}
EXTENSION_TYPES = {
    "error_msg": str,
    "event_id": str,
    "span_id": str,
    "http_route": str,
    "client_ip": str,
    "user_agent": str,
    "duration_ms": float,
    "service_name": str,
    "read_only": bool,
}


# --------------------------------------------------------------------------------------------- helpers


class Spans:
    """A real SDK pipeline: TracerProvider -> SimpleSpanProcessor -> InMemorySpanExporter."""

    def __init__(self, resource: Resource) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider(resource=resource)
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.tracer: Tracer = self.provider.get_tracer("tests.record")

    def make(
        self,
        attributes: Mapping[str, Any],
        name: Optional[str] = None,
        kind: SpanKind = SpanKind.SERVER,
        status: Optional[Status] = None,
        exception: Optional[BaseException] = None,
        start: int = START_NS,
        end: int = END_NS,
    ) -> ReadableSpan:
        if name is None:
            method = attributes.get("http.request.method") or attributes.get("http.method") or "GET"
            route = attributes.get("http.route")
            name = f"{method} {route}" if route else str(method)
        span = self.tracer.start_span(name, kind=kind, attributes=dict(attributes), start_time=start)
        if exception is not None:
            span.record_exception(exception)
        if status is not None:
            span.set_status(status)
        span.end(end_time=end)
        return self.last()

    def last(self) -> ReadableSpan:
        finished = self.exporter.get_finished_spans()
        assert finished
        return finished[-1]


@pytest.fixture
def spans() -> Iterator[Spans]:
    pipeline = Spans(Resource({"service.name": SERVICE, "service.version": "1.2.3"}))
    yield pipeline
    pipeline.provider.shutdown()


def builder(skip: Optional[RouteTable] = None) -> RecordBuilder:
    return RecordBuilder(skip if skip is not None else RouteTable(()), Redactor())


def build(
    span: ReadableSpan, scope: Optional[RequestScope] = None, skip: Optional[RouteTable] = None
) -> Dict[str, Any]:
    record = builder(skip).build(span, scope)
    assert record is not None
    check_shape(record)
    return record


def check_shape(record: Mapping[str, Any]) -> None:
    for key, value in record.items():
        assert KEY_RE.match(key), key
        assert value is not None, key
    for key, kind in CORE_TYPES.items():
        assert key in record, key
        assert type(record[key]) is kind, (key, type(record[key]))
    for key, value in record.items():
        if key not in CORE_TYPES:
            assert key in EXTENSION_TYPES, f"undocumented key {key}"
            assert type(value) is EXTENSION_TYPES[key], (key, type(value))
    assert record["protocol"] == "http"
    assert record["http_body"] == ""
    assert HEX32.match(record["trace_id"])
    assert HEX16.match(record["span_id"])


# ------------------------------------------------------------------------------- the four attribute sets


@pytest.mark.parametrize(
    ("attributes", "query"),
    [
        (OLD_SEMCONV, "access_token=[REDACTED]&page=2"),
        (STABLE_SEMCONV, "access%5Ftoken=[REDACTED]&page=2"),
        (DUP_SEMCONV, "access%5Ftoken=[REDACTED]&page=2"),
    ],
    ids=["old", "stable", "dup"],
)
def test_fastapi_spans_in_every_semconv(spans: Spans, attributes: Dict[str, Any], query: str) -> None:
    span = spans.make(attributes)
    record = build(span)
    assert record["_timestamp"] == END_NS // 1000
    assert record["user_email"] == ""
    assert record["org_id"] == "acme"
    assert record["protocol"] == "http"
    assert record["http_method"] == "GET"
    assert record["http_path"] == "/api/acme/dashboards/7"
    assert record["http_query_params"] == query
    assert record["http_body"] == ""
    assert record["http_response_code"] == 200
    assert "error_msg" not in record
    assert record["trace_id"] == f"{span.context.trace_id:032x}"
    assert record["span_id"] == f"{span.context.span_id:016x}"
    assert record["http_route"] == "/api/{org_id}/dashboards/{id}"
    assert record["client_ip"] == "203.0.113.9"
    assert record["user_agent"] == "curl/8.5.0"
    assert record["duration_ms"] == pytest.approx(12.345678, abs=0.001)
    assert record["service_name"] == SERVICE
    assert record["read_only"] is True
    assert "abc" not in repr(record)


def test_wsgi_raw_uri_target_with_query(spans: Spans) -> None:
    record = build(spans.make(WSGI_RAW_URI, name="POST"))
    assert record["http_method"] == "POST"
    assert record["http_path"] == "/api/acme/alerts"
    assert record["http_query_params"] == "token=[REDACTED]&dry_run=1"
    assert record["http_response_code"] == 201
    assert record["org_id"] == "acme"
    assert "http_route" not in record
    assert record["client_ip"] == "198.51.100.4"
    assert record["user_agent"] == "python-requests/2.32"
    assert record["read_only"] is False


def test_wsgi_url_only(spans: Spans) -> None:
    record = build(spans.make(WSGI_URL_ONLY, name="DELETE"))
    assert record["http_method"] == "DELETE"
    assert record["http_path"] == "/api/v2/acme/things/9"
    assert record["http_query_params"] == "password=[REDACTED]&force=true"
    assert record["http_response_code"] == 204
    assert record["org_id"] == "acme"
    assert "http_route" not in record
    assert "client_ip" not in record
    assert "user_agent" not in record
    assert record["read_only"] is False


def test_wsgi_span_name_only(spans: Spans) -> None:
    record = build(spans.make(WSGI_NAME_ONLY, name="PUT /api/acme/things/3"))
    assert record["http_method"] == "PUT"
    assert record["http_path"] == "/api/acme/things/3"
    assert record["http_query_params"] == ""
    assert record["org_id"] == "acme"
    assert "http_route" not in record


def test_span_name_without_a_path_gives_empty_path(spans: Spans) -> None:
    record = build(spans.make(WSGI_NAME_ONLY, name="PUT"))
    assert record["http_path"] == ""
    assert record["org_id"] == ""


def test_route_is_the_last_path_fallback_before_the_name(spans: Spans) -> None:
    record = build(spans.make({"http.method": "GET", "http.route": "/things/{id}"}, name="GET /things/{id}"))
    assert record["http_path"] == "/things/{id}"
    assert record["http_route"] == "/things/{id}"


def test_path_precedence() -> None:
    full = {
        "url.path": "/a",
        "http.target": "/b?x=1",
        "http.url": "http://h/c?y=2",
        "http.route": "/d",
    }
    assert request_path(full, "GET /e") == "/a"
    assert request_path({k: v for k, v in full.items() if k != "url.path"}, "GET /e") == "/b"
    assert request_path({"http.url": "http://h/c?y=2", "http.route": "/d"}, "GET /e") == "/c"
    assert request_path({"http.route": "/d"}, "GET /e") == "/d"
    assert request_path({}, "GET /e") == "/e"
    assert request_path({}, "GET") == ""
    assert request_path({}, "") == ""


def test_stable_query_wins_over_old_url(spans: Spans) -> None:
    attributes = {**DUP_SEMCONV, "url.query": "sort=asc", "http.url": "http://h/x?sort=desc"}
    assert build(spans.make(attributes))["http_query_params"] == "sort=asc"


def test_no_query_gives_empty_string(spans: Spans) -> None:
    attributes = {k: v for k, v in STABLE_SEMCONV.items() if k != "url.query"}
    assert build(spans.make(attributes))["http_query_params"] == ""
    attributes = {**OLD_SEMCONV, "http.url": "http://api.example.com/api/acme/dashboards/7"}
    assert build(spans.make(attributes))["http_query_params"] == ""


# ------------------------------------------------------------------------------------- ids and timing


def test_timestamp_is_span_end_in_microseconds(spans: Spans) -> None:
    span = spans.make(STABLE_SEMCONV, start=START_NS, end=START_NS + 999)
    record = build(span)
    assert span.end_time is not None
    assert record["_timestamp"] == span.end_time // 1000 == START_NS // 1000 + (START_NS % 1000 + 999) // 1000
    assert isinstance(record["_timestamp"], int)
    assert record["duration_ms"] == pytest.approx(0.001, abs=0.001)


def test_event_id_is_stable_and_distinct(spans: Spans) -> None:
    first = spans.make(STABLE_SEMCONV)
    second = spans.make(STABLE_SEMCONV)
    a1, a2, b = build(first), build(first), build(second)
    assert a1["event_id"] == a2["event_id"]
    assert a1 == a2  # the whole record is reproducible
    assert a1["event_id"] != b["event_id"]
    assert a1["trace_id"] in a1["event_id"] or a1["span_id"] in a1["event_id"]
    assert KEY_RE.match(a1["event_id"])


def test_event_id_distinct_for_spans_of_one_trace(spans: Spans) -> None:
    # Two SERVER spans of the same trace (e.g. a service calling itself) are two requests.
    with spans.tracer.start_as_current_span("parent"):
        outer = spans.make(STABLE_SEMCONV)
        inner = spans.make(STABLE_SEMCONV)
    assert outer.context.trace_id == inner.context.trace_id
    a, b = build(outer), build(inner)
    assert a["trace_id"] == b["trace_id"]
    assert a["event_id"] != b["event_id"]


# --------------------------------------------------------------------------------------------- errors


def test_exception_gives_type_and_message(spans: Spans) -> None:
    span = spans.make(
        {**STABLE_SEMCONV, "http.response.status_code": 500, "error.type": "500"},
        exception=ValueError("bad input"),
        status=Status(StatusCode.ERROR),
    )
    record = build(span)
    assert record["error_msg"] == "ValueError: bad input"
    assert record["http_response_code"] == 500


def test_exception_raised_through_start_as_current_span(spans: Spans) -> None:
    class QuotaExceeded(Exception):
        pass

    with (
        pytest.raises(QuotaExceeded),
        spans.tracer.start_as_current_span("GET /x", kind=SpanKind.SERVER, attributes=OLD_SEMCONV),
    ):
        raise QuotaExceeded("org acme is over quota")
    record = build(spans.last())
    assert record["error_msg"].endswith("QuotaExceeded: org acme is over quota")


def test_exception_without_message(spans: Spans) -> None:
    record = build(spans.make({**OLD_SEMCONV, "http.status_code": 500}, exception=KeyError()))
    assert record["error_msg"] == "KeyError"


def test_exception_counts_even_on_a_4xx(spans: Spans) -> None:
    record = build(spans.make({**OLD_SEMCONV, "http.status_code": 400}, exception=ValueError("nope")))
    assert record["error_msg"] == "ValueError: nope"


def test_5xx_without_exception_uses_status_description(spans: Spans) -> None:
    span = spans.make({**OLD_SEMCONV, "http.status_code": 502}, status=Status(StatusCode.ERROR, "upstream refused"))
    assert build(span)["error_msg"] == "upstream refused"


@pytest.mark.parametrize("code", [500, 502, 503, 504])
def test_5xx_without_exception_or_description_has_fallback(spans: Spans, code: int) -> None:
    stable = {**STABLE_SEMCONV, "http.response.status_code": code, "error.type": str(code)}
    for attributes, status in [
        (stable, Status(StatusCode.ERROR)),
        ({**OLD_SEMCONV, "http.status_code": code}, Status(StatusCode.ERROR)),
        ({**OLD_SEMCONV, "http.status_code": code}, None),  # status left UNSET
    ]:
        record = build(spans.make(attributes, status=status))
        assert record["http_response_code"] == code
        assert isinstance(record["error_msg"], str)
        assert str(code) in record["error_msg"]


def test_5xx_with_error_type_class(spans: Spans) -> None:
    attributes = {**STABLE_SEMCONV, "http.response.status_code": 504, "error.type": "TimeoutError"}
    record = build(spans.make(attributes, status=Status(StatusCode.ERROR)))
    assert "TimeoutError" in record["error_msg"]


@pytest.mark.parametrize("code", [400, 401, 403, 404, 409, 422, 429])
def test_4xx_without_exception_has_no_error(spans: Spans, code: int) -> None:
    for attributes in (
        {**OLD_SEMCONV, "http.status_code": code},
        {**STABLE_SEMCONV, "http.response.status_code": code},
    ):
        record = build(spans.make(attributes))
        assert record["http_response_code"] == code
        assert "error_msg" not in record


@pytest.mark.parametrize("code", [200, 201, 204, 301, 304])
def test_success_has_no_error(spans: Spans, code: int) -> None:
    record = build(spans.make({**OLD_SEMCONV, "http.status_code": code}))
    assert "error_msg" not in record


def test_long_exception_message_is_bounded(spans: Spans) -> None:
    record = build(spans.make({**OLD_SEMCONV, "http.status_code": 500}, exception=RuntimeError("x" * 100_000)))
    assert record["error_msg"].startswith("RuntimeError: xxx")
    assert len(record["error_msg"]) < 100_000


# --------------------------------------------------------------------------------------------- routes


def test_404_has_no_route(spans: Spans) -> None:
    attributes = {k: v for k, v in STABLE_SEMCONV.items() if k != "http.route"}
    attributes.update({"url.path": "/nope", "http.response.status_code": 404})
    record = build(spans.make(attributes, name="GET"))
    assert "http_route" not in record
    assert record["http_path"] == "/nope"
    assert record["org_id"] == ""


@pytest.mark.parametrize(
    ("outer", "inner", "expected"),
    [
        ("/sub", "/things/{tid}", "/sub/things/{tid}"),
        ("/sub/", "/things/{tid}", "/sub/things/{tid}"),
        ("/sub", "/sub/things/{tid}", "/sub/things/{tid}"),  # inner already absolute
        ("/sub", None, "/sub"),
    ],
)
def test_inner_route_of_a_mounted_sub_app(spans: Spans, outer: str, inner: Optional[str], expected: str) -> None:
    attributes = {**STABLE_SEMCONV, "url.path": "/sub/things/3", "http.route": outer}
    with spans.tracer.start_as_current_span("GET /sub", kind=SpanKind.SERVER, attributes=attributes) as live:
        scope = RequestScope(live)
        scope.inner_route = inner
    record = build(spans.last(), scope)
    assert record["http_route"] == expected
    assert record["http_path"] == "/sub/things/3"


def test_inner_route_without_outer_route(spans: Spans) -> None:
    attributes = {k: v for k, v in STABLE_SEMCONV.items() if k != "http.route"}
    with spans.tracer.start_as_current_span("GET", kind=SpanKind.SERVER, attributes=attributes) as live:
        scope = RequestScope(live)
        scope.inner_route = "/things/{tid}"
    assert build(spans.last(), scope)["http_route"] == "/things/{tid}"


def test_org_from_merged_inner_route(spans: Spans) -> None:
    attributes = {**STABLE_SEMCONV, "url.path": "/tenants/globex/things/3", "http.route": "/tenants"}
    with spans.tracer.start_as_current_span("GET", kind=SpanKind.SERVER, attributes=attributes) as live:
        scope = RequestScope(live)
        scope.inner_route = "/{org_id}/things/{tid}"
    record = build(spans.last(), scope)
    assert record["http_route"] == "/tenants/{org_id}/things/{tid}"
    assert record["org_id"] == "globex"


# --------------------------------------------------------------------------------------------- org_id


@pytest.mark.parametrize(
    ("route", "path", "org"),
    [
        ("/api/{org_id}/dashboards/{id}", "/api/acme/dashboards/7", "acme"),
        ("/orgs/{org}/members", "/orgs/acme/members", "acme"),
        ("/orgs/{org_id}", "/orgs/acme", "acme"),
        ("/v1/{org}/x", "/v1/zeta/x", "zeta"),
        ("/api/{org_id}/x", "/api/acme/x/", "acme"),
        # no org placeholder: the /api/<org>/ convention
        ("/api/{tenant}/things", "/api/acme/things", "acme"),
        (None, "/api/acme/dashboards", "acme"),
        (None, "/api/v2/acme/dashboards", "acme"),
        (None, "/api/acme", "acme"),
        (None, "/api/v2/acme", "acme"),
        # nothing to go on
        (None, "/other/acme", ""),
        (None, "/", ""),
        (None, "/api", ""),
        (None, "/api/", ""),
        (None, "/api/v2", ""),
        (None, "/apix/acme", ""),
        ("/things/{id}", "/things/3", ""),
        ("/orgs/{organization}", "/orgs/acme", ""),
    ],
)
def test_org_id(spans: Spans, route: Optional[str], path: str, org: str) -> None:
    attributes = {"http.request.method": "GET", "url.path": path, "http.response.status_code": 200}
    if route is not None:
        attributes["http.route"] = route
    assert build(spans.make(attributes))["org_id"] == org


# ------------------------------------------------------------------------------------------ user_email

USER_KEYS = ("enduser.id", "user.email", "user.id", "user.name")


@pytest.mark.parametrize("present", range(1, 16))
def test_user_precedence(spans: Spans, present: int) -> None:
    chosen = [key for bit, key in enumerate(USER_KEYS) if present & (1 << bit)]
    attributes = {**STABLE_SEMCONV, **{key: f"{key}-value" for key in chosen}}
    assert build(spans.make(attributes))["user_email"] == f"{chosen[0]}-value"


def test_empty_user_attribute_is_skipped(spans: Spans) -> None:
    attributes = {**STABLE_SEMCONV, "enduser.id": "", "user.email": "ann@example.com"}
    assert build(spans.make(attributes))["user_email"] == "ann@example.com"


def test_anonymous_user_is_empty_string(spans: Spans) -> None:
    assert build(spans.make(STABLE_SEMCONV))["user_email"] == ""


def test_scope_user_overrides_attributes(spans: Spans) -> None:
    attributes = {**STABLE_SEMCONV, "enduser.id": "from-span"}
    with spans.tracer.start_as_current_span("GET", kind=SpanKind.SERVER, attributes=attributes) as live:
        scope = RequestScope(live)
        scope.user = "bob@example.com"
    assert build(spans.last(), scope)["user_email"] == "bob@example.com"


def test_scope_without_user_falls_back_to_attributes(spans: Spans) -> None:
    attributes = {**STABLE_SEMCONV, "user.email": "carol@example.com"}
    with spans.tracer.start_as_current_span("GET", kind=SpanKind.SERVER, attributes=attributes) as live:
        scope = RequestScope(live)
    assert build(spans.last(), scope)["user_email"] == "carol@example.com"


def test_set_user_within_the_request_is_cleaned(spans: Spans) -> None:
    def request() -> RequestScope:
        with spans.tracer.start_as_current_span("GET", kind=SpanKind.SERVER, attributes=STABLE_SEMCONV) as live:
            scope = open_scope(live)
            assert scope is not None
            set_user("dave@example.com\r\nadmin=true")
            return scope

    scope = contextvars.copy_context().run(request)
    record = build(spans.last(), scope)
    assert record["user_email"] == "dave@example.com admin=true"


@pytest.mark.parametrize(
    "raw",
    ["alice\r\nFAKE entry", "alice\nbob", "alice\rbob", "alice\x00bob", "alice\tbob", "\r\nalice\n"],
)
def test_user_with_cr_lf_nul_is_cleaned(spans: Spans, raw: str) -> None:
    user = build(spans.make({**STABLE_SEMCONV, "enduser.id": raw}))["user_email"]
    assert not any(c in user for c in "\r\n\x00\t")
    assert "alice" in user


def test_user_is_one_line_whatever_the_line_separator(spans: Spans) -> None:
    # clean_user promises "one line": every boundary str.splitlines() knows must go, not only CR and LF.
    multi_line = []
    for separator in ["\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]:
        user = build(spans.make({**STABLE_SEMCONV, "enduser.id": f"alice{separator}FAKE entry"}))["user_email"]
        if len(user.splitlines()) != 1:
            multi_line.append(user)
    assert multi_line == []


def test_user_is_capped(spans: Spans) -> None:
    user = build(spans.make({**STABLE_SEMCONV, "enduser.id": "u" * 5000}))["user_email"]
    assert 0 < len(user) <= 256


def test_non_string_user_attribute(spans: Spans) -> None:
    assert build(spans.make({**STABLE_SEMCONV, "user.id": 42}))["user_email"] == "42"


# ------------------------------------------------------------------------------------ method, read_only


@pytest.mark.parametrize(
    ("method", "read_only"),
    [
        ("GET", True),
        ("HEAD", True),
        ("OPTIONS", True),
        ("POST", False),
        ("PUT", False),
        ("PATCH", False),
        ("DELETE", False),
        ("CONNECT", False),
        ("TRACE", False),
    ],
)
def test_read_only(spans: Spans, method: str, read_only: bool) -> None:
    for attributes in (
        {**STABLE_SEMCONV, "http.request.method": method},
        {**OLD_SEMCONV, "http.method": method},
    ):
        record = build(spans.make(attributes))
        assert record["http_method"] == method
        assert record["read_only"] is read_only


def test_method_is_upper_cased(spans: Spans) -> None:
    record = build(spans.make({**OLD_SEMCONV, "http.method": "get"}))
    assert record["http_method"] == "GET"
    assert record["read_only"] is True


def test_other_method_uses_the_original(spans: Spans) -> None:
    attributes = {**STABLE_SEMCONV, "http.request.method": "_OTHER", "http.request.method_original": "PURGE"}
    record = build(spans.make(attributes, name="HTTP"))
    assert record["http_method"] == "PURGE"
    assert record["read_only"] is False
    dup = {
        **DUP_SEMCONV,
        "http.method": "_OTHER",
        "http.request.method": "_OTHER",
        "http.request.method_original": "PROPFIND",
    }
    assert build(spans.make(dup, name="HTTP"))["http_method"] == "PROPFIND"


def test_request_method_helper() -> None:
    assert request_method({"http.request.method": "POST", "http.method": "GET"}) == "POST"
    assert request_method({"http.method": "delete"}) == "DELETE"
    assert request_method({"http.request.method": "", "http.method": "PUT"}) == "PUT"
    assert request_method({"url.path": "/x"}) is None
    assert request_method({}) is None


# ---------------------------------------------------------------------------------------- user agent


def test_user_agent_absent_when_none_sent(spans: Spans) -> None:
    attributes = {k: v for k, v in STABLE_SEMCONV.items() if k != "user_agent.original"}
    assert "user_agent" not in build(spans.make(attributes))


def test_user_agent_stable_wins(spans: Spans) -> None:
    attributes = {**DUP_SEMCONV, "user_agent.original": "new", "http.user_agent": "old"}
    assert build(spans.make(attributes))["user_agent"] == "new"


def test_user_agent_exactly_1024_bytes_is_kept(spans: Spans) -> None:
    agent = "a" * 1024
    assert build(spans.make({**STABLE_SEMCONV, "user_agent.original": agent}))["user_agent"] == agent


@pytest.mark.parametrize(
    "agent",
    [
        "a" * 5000,
        "é" * 600,  # 2 bytes each
        "a" + "é" * 600,  # the cut falls inside a character
        "ab" + "€" * 500,  # 3 bytes each
        "a" + "😀" * 400,  # 4 bytes each
        "abc" + "😀" * 400,
    ],
)
def test_user_agent_capped_at_1_kib_on_a_character_boundary(spans: Spans, agent: str) -> None:
    capped = build(spans.make({**STABLE_SEMCONV, "user_agent.original": agent}))["user_agent"]
    data = capped.encode("utf-8")  # raises if a surrogate or broken character slipped through
    assert 1024 - 3 <= len(data) <= 1024
    assert agent.startswith(capped)
    assert "\ufffd" not in capped


# ------------------------------------------------------------------------------ client, service, resource


def test_client_ip_sources(spans: Spans) -> None:
    assert build(spans.make(STABLE_SEMCONV))["client_ip"] == "203.0.113.9"
    assert build(spans.make(OLD_SEMCONV))["client_ip"] == "203.0.113.9"
    dup = {**DUP_SEMCONV, "client.address": "192.0.2.1", "net.peer.ip": "192.0.2.2"}
    assert build(spans.make(dup))["client_ip"] == "192.0.2.1"
    ipv6 = {**STABLE_SEMCONV, "client.address": "2001:db8::1"}
    assert build(spans.make(ipv6))["client_ip"] == "2001:db8::1"


def test_client_ip_absent_when_unknown(spans: Spans) -> None:
    attributes = {k: v for k, v in STABLE_SEMCONV.items() if k != "client.address"}
    assert "client_ip" not in build(spans.make(attributes))


def test_service_name_absent_without_one() -> None:
    pipeline = Spans(Resource({}))
    try:
        record = build(pipeline.make(STABLE_SEMCONV))
    finally:
        pipeline.provider.shutdown()
    assert "service_name" not in record


def test_status_code_as_string_is_converted(spans: Spans) -> None:
    record = build(spans.make({**OLD_SEMCONV, "http.status_code": "503"}))
    assert record["http_response_code"] == 503
    assert "error_msg" in record


# ------------------------------------------------------------------------------------- spans not audited


@pytest.mark.parametrize("kind", [SpanKind.INTERNAL, SpanKind.CLIENT, SpanKind.PRODUCER, SpanKind.CONSUMER])
def test_non_server_spans_give_none(spans: Spans, kind: SpanKind) -> None:
    assert builder().build(spans.make(STABLE_SEMCONV, kind=kind)) is None
    assert builder().build(spans.make(OLD_SEMCONV, kind=kind)) is None


def test_server_span_without_http_method_gives_none(spans: Spans) -> None:
    attributes = {k: v for k, v in DUP_SEMCONV.items() if k not in ("http.method", "http.request.method")}
    assert builder().build(spans.make(attributes, name="GET /api/acme/dashboards/7")) is None
    assert builder().build(spans.make({}, name="rpc")) is None


@pytest.fixture
def skip_table() -> RouteTable:
    return O2AuditConfig.from_env({}, require_endpoint=False).skip_table()


@pytest.mark.parametrize(
    "attributes",
    [
        {"http.request.method": "POST", "url.path": "/api/acme/logs/_json"},
        {"http.method": "POST", "http.target": "/api/v2/acme/_bulk"},
        {"http.method": "POST", "http.target": "/v1/traces?x=1"},
        {"http.method": "POST", "http.url": "http://h/api/acme/prometheus/api/v1/write"},
        {"http.request.method": "GET", "url.path": "/healthz"},
        {"http.request.method": "HEAD", "url.path": "/metrics/"},
    ],
)
def test_skipped_routes_give_none(spans: Spans, skip_table: RouteTable, attributes: Dict[str, Any]) -> None:
    b = builder(skip_table)
    assert b.build(spans.make({**attributes, "http.status_code": 200})) is None
    method = request_method(attributes)
    assert method is not None
    assert b.is_skipped(method, request_path(attributes))


def test_skipped_route_from_span_name_only(spans: Spans, skip_table: RouteTable) -> None:
    span = spans.make({"http.method": "POST"}, name="POST /api/acme/logs/_json")
    assert builder(skip_table).build(span) is None


@pytest.mark.parametrize(
    "attributes",
    [
        {"http.request.method": "GET", "url.path": "/api/acme/logs/_json"},  # ingestion is POST only
        {"http.request.method": "POST", "url.path": "/api/acme/dashboards"},
        {"http.request.method": "GET", "url.path": "/healthz/deep"},
    ],
)
def test_other_routes_are_audited(spans: Spans, skip_table: RouteTable, attributes: Dict[str, Any]) -> None:
    assert build(spans.make(attributes), skip=skip_table)["http_path"] == attributes["url.path"]


# --------------------------------------------------------------------------------------- shape, always


@pytest.mark.parametrize(
    "attributes",
    [OLD_SEMCONV, STABLE_SEMCONV, DUP_SEMCONV, WSGI_RAW_URI, WSGI_URL_ONLY, WSGI_NAME_ONLY],
    ids=["old", "stable", "dup", "wsgi-raw-uri", "wsgi-url", "wsgi-name"],
)
def test_every_record_has_the_documented_shape(spans: Spans, attributes: Dict[str, Any]) -> None:
    record = build(spans.make(attributes))
    assert set(CORE_TYPES) - {"error_msg"} <= set(record)
    assert {"event_id", "span_id", "read_only"} <= set(record)


def test_record_has_no_none_values_with_minimal_span(spans: Spans) -> None:
    record = build(spans.make({"http.method": "GET"}, name="GET"))
    assert record["http_response_code"] == 0  # unknown status
    assert all(value is not None for value in record.values())
