"""Span to audit record: one flat JSON object per request, keys as ``audit-record.md`` defines them.

Both HTTP semantic conventions are read (old, stable and ``http/dup``), with the fallbacks WSGI servers need
when path or route attributes are missing. Everything here runs on the processor's worker thread, never on
the request path.

Who (``user_email``), first found wins:

1. the identity application code named with :func:`otel_o2audit.set_user`;
2. span attributes ``enduser.id``, ``user.email``, ``user.id``, ``user.name``;
3. the ``O2_AUDIT_USER_HEADER`` header, only when the socket peer is a trusted proxy
   (``O2_AUDIT_TRUSTED_PROXIES``);
4. the username of HTTP Basic authentication, whatever the outcome of the login.

Items 3 and 4, the client address behind trusted proxies and the request body come from the facts the
library's middleware gathered (:class:`~otel_o2audit.scope.RequestFacts`); without the middleware the record
falls back to what the span says.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, Mapping, Optional, Tuple
from urllib.parse import urlsplit

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind, StatusCode

from .body import RenderedBody, render_body, truncate_utf8
from .proxies import peer_is_trusted, resolve_client_ip
from .redact import Redactor
from .routes import RouteTable
from .scope import RequestFacts, RequestScope, clean_user

__all__ = ["AuditRecord", "RecordBuilder", "request_method", "request_path"]

#: One audit record: a flat JSON object with ``[a-z0-9_]`` keys.
AuditRecord = Dict[str, Any]

_logger = logging.getLogger("otel_o2audit")
_READ_ONLY_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_USER_ATTRIBUTES = ("enduser.id", "user.email", "user.id", "user.name")
_MAX_USER_AGENT_BYTES = 1024
_MAX_ERROR_CHARS = 4096


def _first(attributes: Mapping[str, Any], *keys: str) -> Any:
    for key in keys:
        value = attributes.get(key)
        if value is not None and value != "":
            return value
    return None


def request_method(attributes: Mapping[str, Any]) -> Optional[str]:
    """The request method, upper-case, from either semantic convention; None when not an HTTP span."""
    method = _first(attributes, "http.request.method", "http.method")
    if method is None:
        return None
    if method == "_OTHER":
        method = _first(attributes, "http.request.method_original") or method
    return str(method).upper()


def _split_target(target: str) -> Tuple[str, str]:
    path, _, query = target.partition("?")
    return path, query


def request_path(attributes: Mapping[str, Any], span_name: str = "") -> str:
    """The request path without query: ``url.path``, ``http.target``, ``http.url``, route, span name."""
    path = attributes.get("url.path")
    if path:
        return str(path)
    target = attributes.get("http.target")
    if target:
        return _split_target(str(target))[0]
    url = attributes.get("http.url") or attributes.get("url.full")
    if url:
        try:
            found = urlsplit(str(url)).path
        except ValueError:
            found = ""
        if found:
            return found
    route = attributes.get("http.route")
    if route:
        return str(route)
    _, _, rest = span_name.partition(" ")
    return rest if rest.startswith("/") else ""


def _request_query(attributes: Mapping[str, Any]) -> str:
    query = attributes.get("url.query")
    if query is not None:
        return str(query)
    target = attributes.get("http.target")
    if target and "?" in str(target):
        return _split_target(str(target))[1]
    url = attributes.get("http.url") or attributes.get("url.full")
    if url:
        # Not urlsplit: the old semconv's http.url is unquoted, so an encoded '#' in the query would
        # otherwise cut everything after it from the audit record.
        return str(url).partition("?")[2]
    return ""


def _status_code(attributes: Mapping[str, Any]) -> int:
    value = _first(attributes, "http.response.status_code", "http.status_code")
    try:
        return int(value) if value is not None else 0
    except (TypeError, ValueError, OverflowError):
        return 0


def _error_message(span: ReadableSpan, status: int) -> Optional[str]:
    for event in span.events:
        if event.name == "exception" and event.attributes:
            kind = event.attributes.get("exception.type")
            message = event.attributes.get("exception.message")
            text = ": ".join(str(p) for p in (kind, message) if p not in (None, ""))
            if text:
                return text[:_MAX_ERROR_CHARS]
    failed = span.status.status_code is StatusCode.ERROR
    # A 4xx is the caller's mistake, not a failure of the call: audit-record.md gives it no error_msg.
    if status < 500 and not (status == 0 and failed):
        return None
    description = span.status.description
    if description:
        return description[:_MAX_ERROR_CHARS]
    error_type = span.attributes.get("error.type") if span.attributes else None
    if error_type and str(error_type) != str(status):
        return f"{error_type} (HTTP {status})" if status else str(error_type)
    return f"HTTP {status}" if status else "request failed"


def _org_from_route(route: str, path: str) -> Optional[str]:
    if "{org_id" not in route and "{org" not in route:
        return None
    route_parts = route.strip("/").split("/")
    path_parts = path.strip("/").split("/")
    for index, part in enumerate(route_parts):
        if part.startswith("{") and part.endswith("}"):
            name = part[1:-1].split(":", 1)[0]
            if name in ("org_id", "org") and index < len(path_parts):
                return path_parts[index]
        elif part.startswith("{") and ":path}" in part:
            return None  # a path converter swallows segments: positions no longer line up
    return None


def _org_by_convention(path: str) -> str:
    parts = path.split("/")
    # ["", "api", "<org>", ...] or ["", "api", "v2", "<org>", ...]
    if len(parts) > 2 and parts[1] == "api":
        index = 3 if parts[2] == "v2" else 2
        if index < len(parts):
            return parts[index]
    return ""


def _join_routes(outer: Optional[str], inner: Optional[str]) -> Optional[str]:
    # A mounted sub-application reports its route relative to the mount point.
    if not inner:
        return outer
    if not outer or inner.startswith(outer.rstrip("/") + "/") or inner == outer:
        return inner
    return outer.rstrip("/") + inner


def _resolve_user(scope: Optional[RequestScope], attributes: Mapping[str, Any],
                  facts: Optional[RequestFacts]) -> Tuple[str, Optional[str]]:
    """(user_email, source): the first identity found, in the documented order; source is ``app``,
    ``span``, ``proxy_header``, ``basic_auth`` or None."""
    if scope is not None and scope.user is not None:
        # An explicit set_user() wins, even set_user("") (the application says: nobody).
        return scope.user, ("app" if scope.user else None)
    found = _first(attributes, *_USER_ATTRIBUTES)
    if found is not None:
        user = clean_user(found)
        if user:
            return user, "span"
    if facts is not None:
        if facts.forwarded_user and peer_is_trusted(facts.peer, facts.trusted):
            user = clean_user(facts.forwarded_user)
            if user:
                return user, "proxy_header"
        if facts.basic_user:
            user = clean_user(facts.basic_user)
            if user:
                return user, "basic_auth"
    return "", None


def _make_encodable(record: AuditRecord) -> None:
    # A header that is not valid UTF-8 reaches span attributes with lone surrogates; one such value must not
    # make the whole batch unencodable.
    for key, value in record.items():
        if isinstance(value, str) and not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                record[key] = value.encode("utf-8", "replace").decode("utf-8")


class RecordBuilder:
    """Turns finished SERVER spans into audit records, or None for spans that are not audited."""

    __slots__ = ("_redactor", "_skip")

    def __init__(self, skip: RouteTable, redactor: Redactor) -> None:
        self._skip = skip
        self._redactor = redactor

    def build(self, span: ReadableSpan, scope: Optional[RequestScope] = None) -> Optional[AuditRecord]:
        """Return the record for ``span``; None when it is not an HTTP server span or not audited."""
        if span.kind is not SpanKind.SERVER:
            return None
        # One copy into a plain dict: the SDK's attribute mapping makes every lookup a slow Python call.
        attributes: Mapping[str, Any] = dict(span.attributes) if span.attributes else {}
        method = request_method(attributes)
        if method is None:
            return None
        path = request_path(attributes, span.name)
        if self._skip.matches(method, path):
            return None
        status = _status_code(attributes)
        route = attributes.get("http.route")
        route = str(route) if route else None
        if scope is not None:
            route = _join_routes(route, scope.inner_route)
        context = span.context
        trace_id = f"{context.trace_id:032x}" if context else ""
        span_id = f"{context.span_id:016x}" if context else ""
        end = span.end_time or 0
        facts = scope.facts if scope is not None else None
        user, _source = _resolve_user(scope, attributes, facts)
        record: AuditRecord = {
            "_timestamp": end // 1000,
            "user_email": user,
            "org_id": (_org_from_route(route, path) if route else None) or _org_by_convention(path),
            "protocol": "http",
            "http_method": method,
            "http_path": path,
            "http_query_params": self._redactor.redact_query(
                facts.query if facts is not None and facts.query is not None else _request_query(attributes)),
            "http_body": "",
            "http_response_code": status,
            "trace_id": trace_id,
            "event_id": f"{trace_id}{span_id}",
            "span_id": span_id,
        }
        error = _error_message(span, status)
        if error is not None:
            record["error_msg"] = error
        if route:
            record["http_route"] = route
        client: Any = None
        if facts is not None:
            client = resolve_client_ip(facts.peer, facts.forwarded_for, facts.trusted)
        if client is None:
            client = _first(attributes, "client.address", "net.peer.ip", "net.sock.peer.addr")
        if client is not None:
            record["client_ip"] = str(client)
        if facts is not None and facts.body is not None:
            try:
                body = render_body(facts.body, self._redactor)
            except Exception:  # a body must never cost the request its record
                _logger.exception("otel-o2audit: could not render a request body; stored as a marker")
                body = RenderedBody("[body not recorded: internal error]", False, facts.body.size, None)
            if body is not None:
                record["http_body"] = body.text
                if body.truncated:
                    record["http_body_truncated"] = True
                record["http_body_size"] = body.size
                if body.content_type:
                    record["http_content_type"] = body.content_type
        agent = _first(attributes, "user_agent.original", "http.user_agent")
        if agent is not None:
            record["user_agent"] = truncate_utf8(str(agent), _MAX_USER_AGENT_BYTES)[0]
        if span.start_time and span.end_time:
            record["duration_ms"] = round((span.end_time - span.start_time) / 1e6, 3)
        service = span.resource.attributes.get("service.name") if span.resource else None
        if service:
            record["service_name"] = str(service)
        record["read_only"] = method in _READ_ONLY_METHODS
        _make_encodable(record)
        return record

    def is_skipped(self, method: str, path: str) -> bool:
        """Tell whether a request to ``method path`` is ingestion or excluded."""
        return self._skip.matches(method, path)
