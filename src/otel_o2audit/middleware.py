"""The library's own ASGI and WSGI middleware: request facts that spans do not (and must not) carry.

OpenTelemetry's spans carry neither the credentials nor the body of a request, and they must not: traces
are widely readable. What an audit record needs from them is gathered here, on the request path, into a
:class:`~otel_o2audit.scope.RequestFacts` object bound to a context variable; the audit processor links it
into the request's scope when the server span starts, and reads it when it builds the record:

* the socket peer, and ``X-Forwarded-For`` (kept only when ``O2_AUDIT_TRUSTED_PROXIES`` is set);
* the query string as received, still percent-encoded (the ASGI instrumentation reports it decoded, where
  ``token=a%26b`` and ``token=a&b`` look alike and the second half of a token would escape redaction);
* the value of ``O2_AUDIT_USER_HEADER`` (kept only when trusted proxies are set; honoured only when the
  peer is one of them);
* the username of HTTP Basic authentication: the ``Authorization`` header is decoded here and reduced to
  the username at once (the password, and every other scheme such as Bearer tokens, is never decoded,
  kept, logged or put on a span). A header without a ``:`` or with an empty password yields nothing:
  its value may be an API key (``Authorization: Basic base64(<key>:)``);
* the request body, only when ``O2_AUDIT_CAPTURE_BODY`` is on: ``receive`` (ASGI) or ``wsgi.input`` (WSGI)
  is wrapped to copy at most ``O2_AUDIT_MAX_BODY_BYTES`` of what the application reads, passing every chunk
  on unchanged. Requests without a body are not wrapped.

Place the middleware OUTSIDE OpenTelemetry's: ``O2AuditASGIMiddleware(app)`` around a FastAPI/Starlette app
that ``FastAPIInstrumentor.instrument_app`` instrumented (the instrumentation's middleware lives inside the
app), ``O2AuditWSGIMiddleware(OpenTelemetryMiddleware(flask_app.wsgi_app))`` for WSGI. Placed inside, it
still works: it links its facts into the scope the server span already opened. Nested copies (an explicit
middleware plus :func:`patch_frameworks`, mounted sub-applications) step aside for the outermost one.

Zero-code setup calls :func:`patch_frameworks`, which makes every Starlette/FastAPI and Flask application
wrap itself (class-level ``__call__``), outside whatever middleware the instrumentations added.
"""

from __future__ import annotations

import base64
import binascii
import functools
import logging
import threading
from typing import Any, Awaitable, Callable, Dict, Iterable, List, MutableMapping, Optional, Set, Tuple

from .body import BodyCapture, parse_content_length
from .config import O2AuditConfig
from .proxies import Network
from .redact import Redactor
from .scope import RequestFacts, bind_facts, current_facts, release_facts

__all__ = ["O2AuditASGIMiddleware", "O2AuditWSGIMiddleware", "patch_frameworks", "startup_warnings",
           "unpatch_frameworks"]

_logger = logging.getLogger("otel_o2audit")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
StartResponse = Callable[..., Any]
WSGIApp = Callable[[Dict[str, Any], StartResponse], Iterable[bytes]]

#: An Authorization header longer than this is not decoded (no real Basic credential is that long).
_MAX_AUTHORIZATION = 4096
#: A user header value longer than this is ignored.
_MAX_USER_HEADER = 1024
_BODYLESS_VERSIONS = ("1.0", "1.1")
_CREDENTIAL_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "set-cookie"})


class _Settings:
    """What the middleware needs from the configuration, prepared once."""

    __slots__ = ("capture_body", "max_body_bytes", "trusted", "user_header", "user_header_environ")

    def __init__(self, config: O2AuditConfig) -> None:
        self.trusted: Tuple[Network, ...] = tuple(config.trusted_proxies)
        # The user header only counts from a trusted proxy: without any, it is never read. A credential
        # header is never an identity.
        header = config.user_header if self.trusted else None
        if header is not None and header.lower() in _CREDENTIAL_HEADERS:
            header = None
        self.user_header: Optional[bytes] = header.lower().encode("latin-1") if header else None
        self.user_header_environ: Optional[str] = (
            "HTTP_" + header.upper().replace("-", "_") if header else None
        )
        self.capture_body = bool(config.capture_body)
        self.max_body_bytes = int(config.max_body_bytes)


def _config_from_env() -> O2AuditConfig:
    return O2AuditConfig.from_env(require_endpoint=False)


# ------------------------------------------------------------------------------------------ warnings
_warned: Set[str] = set()
_warned_lock = threading.Lock()


def startup_warnings(config: O2AuditConfig) -> List[str]:
    """Configuration that works but probably not as intended, as messages (nothing secret in them)."""
    messages = []
    if config.user_header and not config.trusted_proxies:
        messages.append(
            f"O2_AUDIT_USER_HEADER={config.user_header} is set but O2_AUDIT_TRUSTED_PROXIES is empty: the header "
            "is never honoured (any caller could send it); list the proxies that set it in O2_AUDIT_TRUSTED_PROXIES"
        )
    if config.user_header and config.user_header.lower() in _CREDENTIAL_HEADERS:
        messages.append(
            f"O2_AUDIT_USER_HEADER={config.user_header} names a credential header: it is never used as an identity; "
            "name the header your authenticating proxy sets (e.g. X-Forwarded-Email)"
        )
    everyone = [str(n) for n in config.trusted_proxies if n.prefixlen == 0]
    if everyone:
        messages.append(
            f"O2_AUDIT_TRUSTED_PROXIES contains {', '.join(everyone)}: every caller is trusted, so any caller can "
            "choose the recorded client address" + (" and identity" if config.user_header else "")
        )
    if config.capture_body and config.max_body_bytes > 1024 * 1024:
        messages.append(
            f"O2_AUDIT_MAX_BODY_BYTES={config.max_body_bytes}: each request in flight may hold that much memory "
            "and each record that much text"
        )
    return messages


def _log_startup_warnings(config: O2AuditConfig) -> None:
    for message in startup_warnings(config):
        with _warned_lock:
            if message in _warned:
                continue
            _warned.add(message)
        _logger.warning("otel-o2audit: %s", message)


# ------------------------------------------------------------------------------------------ facts
def basic_username(value: Any) -> Optional[str]:
    """The username of an ``Authorization: Basic`` value; None for any other scheme or a malformed value.

    The password is split off and dropped here. No username is returned when the password is empty or the
    ``:`` is missing: such a value is often an API key sent as the username.
    """
    raw = value if isinstance(value, bytes) else str(value).encode("latin-1", "replace")
    if len(raw) > _MAX_AUTHORIZATION:
        return None
    scheme, _, param = raw.strip().partition(b" ")
    if scheme.lower() != b"basic":
        return None
    param = param.strip()
    try:
        decoded = base64.b64decode(param + b"=" * (-len(param) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, sep, password = decoded.partition(b":")
    has_password = bool(password)
    del password, decoded
    if not sep or not has_password or not user:
        return None
    return _decode_header(user)


def _decode_header(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _body_capture(settings: _Settings, content_type: Optional[str], content_encoding: Optional[str],
                  content_length: Optional[str], chunked: bool, http_version: str) -> Optional[BodyCapture]:
    declared = parse_content_length(content_length)
    if declared == 0 or (declared is None and not chunked and http_version in _BODYLESS_VERSIONS):
        return None  # no body: nothing to wrap
    return BodyCapture(settings.max_body_bytes, content_type, content_encoding, declared)


def _asgi_facts(settings: _Settings, scope: Scope) -> RequestFacts:
    client = scope.get("client")
    peer = str(client[0]) if client else None
    facts = RequestFacts(peer, settings.trusted)
    query = scope.get("query_string")
    if isinstance(query, bytes):
        facts.query = query.decode("utf-8", "replace")
    forwarded: List[bytes] = []
    users: List[bytes] = []
    content_type = content_encoding = content_length = None
    chunked = False
    user_header = settings.user_header
    trusted = bool(settings.trusted)
    capture = settings.capture_body
    for name, value in scope.get("headers") or ():
        if name == b"authorization":
            facts.basic_user = basic_username(value)
        elif trusted and name == b"x-forwarded-for":
            forwarded.append(value)
        elif user_header is not None and name == user_header:
            users.append(value)
        elif capture:
            if name == b"content-type":
                content_type = value.decode("latin-1")
            elif name == b"content-encoding":
                content_encoding = value.decode("latin-1")
            elif name == b"content-length":
                content_length = value.decode("latin-1")
            elif name == b"transfer-encoding":
                chunked = True
    if forwarded:
        facts.forwarded_for = b",".join(forwarded).decode("latin-1")
    if len(users) == 1 and len(users[0]) <= _MAX_USER_HEADER:
        # Several copies of the identity header are ambiguous: none is used.
        facts.forwarded_user = _decode_header(users[0]).strip() or None
    if capture:
        facts.body = _body_capture(settings, content_type, content_encoding, content_length, chunked,
                                   str(scope.get("http_version", "1.1")))
    return facts


def _capturing_receive(receive: Receive, capture: BodyCapture) -> Receive:
    async def receive_and_copy() -> Message:
        message = await receive()
        try:
            if message.get("type") == "http.request":
                chunk = message.get("body", b"")
                if chunk:
                    capture.feed(chunk)
                if not message.get("more_body", False):
                    capture.complete = True
        except Exception:  # never disturb the application
            _logger.debug("otel-o2audit: body capture failed", exc_info=True)
        return message

    return receive_and_copy


async def _asgi_call(settings: _Settings, app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
    if scope.get("type") != "http" or current_facts() is not None:
        await app(scope, receive, send)
        return
    try:
        facts = _asgi_facts(settings, scope)
        if facts.body is not None:
            receive = _capturing_receive(receive, facts.body)
        token = bind_facts(facts)
    except Exception:
        _logger.debug("otel-o2audit: could not gather request facts", exc_info=True)
        await app(scope, receive, send)
        return
    try:
        await app(scope, receive, send)
    finally:
        release_facts(token, facts)


class O2AuditASGIMiddleware:
    """ASGI middleware that gathers the audit facts of each HTTP request (see the module docstring).

    ``config``: an :class:`~otel_o2audit.O2AuditConfig` (its trust and body settings are used); None reads
    ``O2_AUDIT_*`` from the environment (an invalid value raises :class:`~otel_o2audit.ConfigError`).
    Put it outside OpenTelemetry's middleware: ``app = O2AuditASGIMiddleware(fastapi_app)``.
    """

    def __init__(self, app: ASGIApp, config: Optional[O2AuditConfig] = None) -> None:
        self.app = app
        cfg = config if config is not None else _config_from_env()
        self._settings = _Settings(cfg)
        _log_startup_warnings(cfg)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _asgi_call(self._settings, self.app, scope, receive, send)


# ------------------------------------------------------------------------------------------ WSGI
class _CapturingInput:
    """A ``wsgi.input`` stand-in that copies what the application reads (up to the capture's limit)."""

    def __init__(self, stream: Any, capture: BodyCapture) -> None:
        self._stream = stream
        self._capture = capture

    def _seen(self, data: Any, asked: Optional[int] = None) -> Any:
        try:
            if data:
                self._capture.feed(data)
            elif asked is None or asked != 0:
                self._capture.complete = True  # an empty read: end of the body
        except Exception:  # never disturb the application
            _logger.debug("otel-o2audit: body capture failed", exc_info=True)
        return data

    def read(self, size: Optional[int] = -1) -> Any:
        if size is None or size < 0:
            data = self._stream.read()
            self._seen(data)
            if data:
                self._capture.complete = True
            return data
        return self._seen(self._stream.read(size), size)

    def readline(self, size: Optional[int] = -1) -> Any:
        if size is None or size < 0:
            return self._seen(self._stream.readline())
        return self._seen(self._stream.readline(size), size)

    def readlines(self, hint: Optional[int] = -1) -> List[Any]:
        lines: List[Any] = self._stream.readlines() if hint is None or hint < 0 else self._stream.readlines(hint)
        for line in lines:
            self._seen(line)
        if hint is None or hint < 0:
            self._capture.complete = True
        return lines

    def readinto(self, buffer: Any) -> Any:
        readinto = getattr(self._stream, "readinto", None)
        if readinto is None:
            data = self._stream.read(len(buffer))
            buffer[: len(data)] = data
            count = len(data)
        else:
            count = readinto(buffer)
        if count is not None:
            self._seen(memoryview(buffer)[:count], len(buffer))
        return count

    def __iter__(self) -> Any:
        return self

    def __next__(self) -> Any:
        line = self.readline()
        if not line:
            raise StopIteration
        return line

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _wsgi_facts(settings: _Settings, environ: Dict[str, Any]) -> RequestFacts:
    peer = environ.get("REMOTE_ADDR") or None
    facts = RequestFacts(str(peer) if peer is not None else None, settings.trusted)
    query = environ.get("QUERY_STRING")
    if isinstance(query, str):
        facts.query = query.encode("latin-1", "replace").decode("utf-8", "replace")
    authorization = environ.get("HTTP_AUTHORIZATION")
    if authorization:
        facts.basic_user = basic_username(str(authorization).encode("latin-1", "replace"))
    if settings.trusted:
        forwarded = environ.get("HTTP_X_FORWARDED_FOR")
        if forwarded:
            facts.forwarded_for = str(forwarded)
        if settings.user_header_environ is not None:
            user = environ.get(settings.user_header_environ)
            if user and len(user) <= _MAX_USER_HEADER:
                # PEP 3333 strings are bytes decoded as Latin-1: recover UTF-8 identities.
                facts.forwarded_user = _decode_header(str(user).encode("latin-1", "replace")).strip() or None
    if settings.capture_body:
        chunked = "chunked" in str(environ.get("HTTP_TRANSFER_ENCODING", "")).lower() or bool(
            environ.get("wsgi.input_terminated"))
        facts.body = _body_capture(settings, environ.get("CONTENT_TYPE") or None,
                                   environ.get("HTTP_CONTENT_ENCODING") or None,
                                   environ.get("CONTENT_LENGTH") or None, chunked,
                                   str(environ.get("SERVER_PROTOCOL", "HTTP/1.1")).rpartition("/")[2])
        if facts.body is not None and environ.get("wsgi.input") is not None:
            environ["wsgi.input"] = _CapturingInput(environ["wsgi.input"], facts.body)
    return facts


def _wsgi_call(settings: _Settings, app: WSGIApp, environ: Dict[str, Any],
               start_response: StartResponse) -> Iterable[bytes]:
    if current_facts() is not None:
        return app(environ, start_response)
    try:
        facts = _wsgi_facts(settings, environ)
        token = bind_facts(facts)
    except Exception:
        _logger.debug("otel-o2audit: could not gather request facts", exc_info=True)
        return app(environ, start_response)
    try:
        return app(environ, start_response)
    finally:
        # The server span has started (and linked the facts) inside this call; the body keeps being
        # captured through wsgi.input while the response is iterated.
        release_facts(token, facts)


class O2AuditWSGIMiddleware:
    """WSGI middleware that gathers the audit facts of each request (see the module docstring).

    ``config`` as for :class:`O2AuditASGIMiddleware`. Put it outside OpenTelemetry's WSGI middleware:
    ``flask_app.wsgi_app = O2AuditWSGIMiddleware(OpenTelemetryMiddleware(flask_app.wsgi_app))``.
    """

    def __init__(self, app: WSGIApp, config: Optional[O2AuditConfig] = None) -> None:
        self.app = app
        cfg = config if config is not None else _config_from_env()
        self._settings = _Settings(cfg)
        _log_startup_warnings(cfg)

    def __call__(self, environ: Dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        return _wsgi_call(self._settings, self.app, environ, start_response)


# ------------------------------------------------------------------------------------------ zero-code
_patch_lock = threading.Lock()
_zero_code: Dict[str, _Settings] = {}
_originals: List[Tuple[type, Any]] = []


def _patch_asgi_class(cls: type) -> None:
    original = cls.__dict__.get("__call__")
    if original is None or getattr(original, "_otel_o2audit", False):
        return

    @functools.wraps(original)
    async def __call__(self: Any, scope: Scope, receive: Receive, send: Send) -> None:
        settings = _zero_code.get("settings")
        if settings is None:
            await original(self, scope, receive, send)
            return
        await _asgi_call(settings, functools.partial(original, self), scope, receive, send)

    __call__._otel_o2audit = True  # type: ignore[attr-defined]
    _originals.append((cls, original))
    cls.__call__ = __call__  # type: ignore[method-assign]


def _patch_wsgi_class(cls: type) -> None:
    original = cls.__dict__.get("__call__")
    if original is None or getattr(original, "_otel_o2audit", False):
        return

    @functools.wraps(original)
    def __call__(self: Any, environ: Dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        settings = _zero_code.get("settings")
        if settings is None:
            result: Iterable[bytes] = original(self, environ, start_response)
            return result
        return _wsgi_call(settings, functools.partial(original, self), environ, start_response)

    __call__._otel_o2audit = True  # type: ignore[attr-defined]
    _originals.append((cls, original))
    cls.__call__ = __call__  # type: ignore[method-assign]


class _AccessLogRedaction(logging.Filter):
    """Redacts query strings in uvicorn's access log lines (``"GET /path?token=... HTTP/1.1" 200``)."""

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self._redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            args = record.args
            # uvicorn: ('%s - "%s %s HTTP/%s" %d', client, method, path_with_query, version, status)
            if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str) and "?" in args[2]:
                path, _, query = args[2].partition("?")
                record.args = (*args[:2], f"{path}?{self._redactor.redact_query(query)}", *args[3:])
        except Exception:  # a log filter must never break logging
            _logger.debug("otel-o2audit: could not redact an access log line", exc_info=True)
        return True


def _redact_access_log(config: O2AuditConfig) -> None:
    logger = logging.getLogger("uvicorn.access")
    for existing in list(logger.filters):
        if isinstance(existing, _AccessLogRedaction):
            logger.removeFilter(existing)
    logger.addFilter(_AccessLogRedaction(config.redactor()))


def patch_frameworks(config: O2AuditConfig) -> None:
    """Zero-code: make every Starlette/FastAPI and Flask application gather audit facts.

    Wraps ``__call__`` of ``starlette.applications.Starlette``, of FastAPI's own class (``fastapi.
    applications.FastAPI``, which FastAPIInstrumentor subclasses) and of ``flask.Flask``, so the facts are
    bound before any middleware of the application runs, OpenTelemetry's included. Applies to applications
    built before and after the call. Also masks sensitive query values in uvicorn's access log lines
    (``uvicorn.access``), which would otherwise print tokens sent in URLs. Idempotent (a later call replaces
    the settings); never raises; logs the :func:`startup_warnings` once.
    """
    try:
        settings = _Settings(config)
        _log_startup_warnings(config)
        _redact_access_log(config)
    except Exception:
        _logger.exception("otel-o2audit: invalid settings for the framework middleware; not installed")
        return
    with _patch_lock:
        _zero_code["settings"] = settings
        for module, names in (("starlette.applications", ("Starlette",)), ("fastapi.applications", ("FastAPI",))):
            _patch_classes(module, names, _patch_asgi_class)
        _patch_classes("flask.app", ("Flask",), _patch_wsgi_class)


def _patch_classes(module_name: str, names: Tuple[str, ...], patch: Callable[[type], None]) -> None:
    import importlib
    import importlib.util

    try:
        if importlib.util.find_spec(module_name.partition(".")[0]) is None:
            return
        module = importlib.import_module(module_name)
        for name in names:
            cls = getattr(module, name, None)
            if isinstance(cls, type):
                patch(cls)
    except Exception:
        _logger.warning("otel-o2audit: could not hook %s; its requests carry no Basic-auth identity, forwarded "
                        "address or body", module_name, exc_info=True)


def unpatch_frameworks() -> None:
    """Undo :func:`patch_frameworks` (for tests)."""
    logger = logging.getLogger("uvicorn.access")
    for existing in list(logger.filters):
        if isinstance(existing, _AccessLogRedaction):
            logger.removeFilter(existing)
    with _patch_lock:
        _zero_code.clear()
        while _originals:
            cls, original = _originals.pop()
            cls.__call__ = original  # type: ignore[method-assign]
