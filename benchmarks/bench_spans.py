"""Realistic finished HTTP SERVER spans, built once with a real ``TracerProvider``.

The attributes are the ones ``opentelemetry-instrumentation-fastapi`` (ASGI, old HTTP semantic conventions,
the default) sets on a request's SERVER span: ``http.scheme``, ``http.host``, ``net.host.port``,
``http.flavor``, ``http.target`` (path only), ``http.url`` (with the query string), ``http.method``,
``http.server_name``, ``http.user_agent``, ``net.peer.ip``, ``net.peer.port``, ``http.route`` and
``http.status_code``; failed requests carry an ``exception`` event and an ERROR status, as the
instrumentation records them. No request goes to an excluded or ingestion route, so every span becomes
exactly one audit record and both exporters send the same number of items.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, TypeVar

from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.trace import SpanKind, Status, StatusCode

__all__ = [
    "INSTRUMENTATION_SCOPE",
    "RESOURCE",
    "ServerSpans",
    "batches",
    "build_server_spans",
    "request_attributes",
]

T = TypeVar("T")
INSTRUMENTATION_SCOPE = "opentelemetry.instrumentation.asgi"
RESOURCE = Resource.create(
    {
        "service.name": "shop-api",
        "service.version": "1.4.2",
        "deployment.environment": "production",
        "host.name": "shop-api-7d9f8c-x2k4p",
    }
)

# (method, route, path template, query template, status)
_REQUESTS: Tuple[Tuple[str, str, str, str, int], ...] = (
    ("GET", "/api/{org_id}/items/{item_id}", "/api/{org}/items/{n}", "page={n}&per_page=50", 200),
    ("GET", "/api/{org_id}/items", "/api/{org}/items", "q=blue+shirt&sort=price&token=abc{n}", 200),
    ("POST", "/api/{org_id}/orders", "/api/{org}/orders", "", 201),
    ("GET", "/api/{org_id}/orders/{order_id}", "/api/{org}/orders/{n}", "", 200),
    ("PUT", "/api/{org_id}/items/{item_id}", "/api/{org}/items/{n}", "", 200),
    ("DELETE", "/api/{org_id}/items/{item_id}", "/api/{org}/items/{n}", "", 404),
    ("GET", "/users/me", "/users/me", "", 200),
    ("POST", "/auth/login", "/auth/login", "next=%2Fdashboard", 401),
    ("GET", "/api/{org_id}/reports/{report_id}", "/api/{org}/reports/{n}", "format=csv", 500),
)
_ORGS = ("acme", "globex", "initech", "umbrella", "hooli")
_USER_AGENTS = (
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.5 Safari/605",
    "python-requests/2.32.3",
    "curl/8.7.1",
)


@dataclass(frozen=True)
class ServerSpans:
    """The same requests twice: the live SDK spans (what ``on_start`` gets) and their finished read-only
    copies (what ``on_end`` gets), index for index."""

    live: List[Span]
    finished: List[ReadableSpan]


class _Capture(SpanProcessor):
    """Keeps the read-only copy the SDK hands to ``on_end``."""

    def __init__(self) -> None:
        self.finished: List[ReadableSpan] = []

    def on_end(self, span: ReadableSpan) -> None:
        self.finished.append(span)


def request_attributes(index: int, rng: random.Random) -> Tuple[str, Dict[str, Any], int, bool]:
    """Span name, start attributes, status code and "failed with an exception" of request ``index``."""
    method, route, path_tpl, query_tpl, status = _REQUESTS[index % len(_REQUESTS)]
    number = rng.randint(1, 99_999)
    path = path_tpl.format(org=_ORGS[index % len(_ORGS)], n=number)
    query = query_tpl.format(n=number)
    url = f"https://shop.example.com{path}" + (f"?{query}" if query else "")
    attributes: Dict[str, Any] = {
        "http.scheme": "https",
        "http.host": "shop.example.com",
        "net.host.port": 443,
        "http.flavor": "1.1",
        "http.target": path,
        "http.url": url,
        "http.method": method,
        "http.server_name": "shop.example.com",
        "http.user_agent": _USER_AGENTS[index % len(_USER_AGENTS)],
        "net.peer.ip": f"10.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}",
        "net.peer.port": rng.randint(30_000, 60_000),
        "http.route": route,
    }
    return f"{method} {route}", attributes, status, status >= 500


def build_server_spans(count: int, seed: int = 7, provider: Optional[TracerProvider] = None) -> ServerSpans:
    """Start and end ``count`` SERVER spans the way the FastAPI instrumentation does; keep both views."""
    rng = random.Random(seed)
    capture = _Capture()
    own = provider is None
    if provider is None:
        provider = TracerProvider(resource=RESOURCE)
    provider.add_span_processor(capture)
    tracer = provider.get_tracer(INSTRUMENTATION_SCOPE, "0.66b2")
    live: List[Span] = []
    for index in range(count):
        name, attributes, status, failed = request_attributes(index, rng)
        # Each request is a root span in its own (empty) context, as in a server.
        span = tracer.start_span(name, context=Context(), kind=SpanKind.SERVER, attributes=attributes)
        span.set_attribute("http.status_code", status)
        if failed:
            span.record_exception(RuntimeError("report backend unavailable"))
            span.set_status(Status(StatusCode.ERROR, "RuntimeError: report backend unavailable"))
        span.end()
        assert isinstance(span, Span)
        live.append(span)
    if own:
        provider.shutdown()
    return ServerSpans(live=live, finished=capture.finished)


def batches(items: Sequence[T], size: int) -> List[Sequence[T]]:
    """``items`` cut into consecutive batches of at most ``size``."""
    return [items[start : start + size] for start in range(0, len(items), size)]
