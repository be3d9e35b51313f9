"""The per-request scope: which server span is the request's audited one, and who the acting user is.

The processor opens a scope in ``on_start`` of the outermost SERVER span of a request and stores it in a
context variable. Anything that runs inside that request (FastAPI dependencies, sync handlers in the thread
pool, nested ASGI apps) sees the same scope object, because context copies share the object:

* :func:`set_user` writes the acting user into it (no span attribute, so the identity stays out of traces);
* a second SERVER span started inside the request (FastAPI's native span of a mounted sub-application, say)
  finds the scope already open and is folded into it instead of producing a second record;
* the request facts that spans do not carry (socket peer, ``X-Forwarded-For``, a trusted proxy's user
  header, the Basic-auth username, the raw query string, the captured body) are gathered by the library's
  ASGI/WSGI middleware (:mod:`otel_o2audit.middleware`) into a :class:`RequestFacts` object, bound to a
  second context variable before the instrumentation's middleware starts the server span;
  :func:`open_scope` links it into the scope. None of it is ever put on a span attribute, so credentials
  and bodies stay out of traces.
"""

from __future__ import annotations

import contextvars
import logging
import re
from typing import TYPE_CHECKING, Any, Optional, Tuple

if TYPE_CHECKING:
    from .body import BodyCapture
    from .proxies import Network

__all__ = ["RequestFacts", "RequestScope", "current_facts", "current_scope", "set_user"]

_logger = logging.getLogger("otel_o2audit")

# Identities are free text from application code: keep them a sane size and on one line.
_MAX_USER_CHARS = 256
# Control characters and every Unicode line or paragraph separator: an identity must stay on one line.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


class RequestFacts:
    """What the library's middleware saw of one request before the instrumentation started its span.

    Filled on the request path (cheaply: a single pass over the headers), read on the processor's worker
    thread when the record is built. It never holds the Authorization header: that is reduced to the
    Basic-auth username on the spot (the password is dropped). The user header's value is kept only when
    a trusted proxy list is configured (whether the peer is trusted is decided when the record is built).
    The raw query string and the captured body may hold secrets, as the span's own URL attributes may:
    both are redacted when the record is built and never logged. Its ``repr`` shows no values.
    """

    __slots__ = ("active", "basic_user", "body", "forwarded_for", "forwarded_user", "peer", "query", "trusted")

    def __init__(self, peer: Optional[str], trusted: Tuple[Network, ...] = ()) -> None:
        #: True while the middleware's call is running; only active facts are linked into a new scope.
        self.active = True
        #: The socket peer as the server reported it (ASGI ``client``, WSGI ``REMOTE_ADDR``).
        self.peer: Optional[str] = peer
        #: The trusted proxy networks in force for this request (from the middleware's configuration).
        self.trusted: Tuple[Network, ...] = trusted
        #: ``X-Forwarded-For`` (all occurrences joined), kept only when ``trusted`` is not empty.
        self.forwarded_for: Optional[str] = None
        #: The value of the configured user header, kept only when ``trusted`` is not empty.
        self.forwarded_user: Optional[str] = None
        #: The username of HTTP Basic authentication (never the password).
        self.basic_user: Optional[str] = None
        #: The captured request body, when body capture is on and the request has one.
        self.body: Optional[BodyCapture] = None
        #: The query string exactly as received (still percent-encoded): the ASGI instrumentation reports it
        #: only percent-DECODED (``http.url``) under the default semantic conventions, which makes the
        #: boundaries between parameters ambiguous (``token=a%26b`` reads ``token=a&b``).
        self.query: Optional[str] = None

    def __repr__(self) -> str:
        return (f"RequestFacts(peer={'set' if self.peer else None}, forwarded_for="
                f"{'set' if self.forwarded_for else None}, forwarded_user={'set' if self.forwarded_user else None}, "
                f"basic_user={'set' if self.basic_user else None}, body={'captured' if self.body else None})")


_FACTS: contextvars.ContextVar[Optional[RequestFacts]] = contextvars.ContextVar(
    "otel_o2audit_request_facts", default=None
)


def current_facts() -> Optional[RequestFacts]:
    """The facts of the request the calling context is serving, if the library's middleware runs."""
    facts = _FACTS.get()
    if facts is not None and facts.active:
        return facts
    return None


def bind_facts(facts: RequestFacts) -> contextvars.Token[Optional[RequestFacts]]:
    """Make ``facts`` the current request's facts (the middleware calls this before the inner app).

    When a request scope is already open (the instrumentation's middleware runs OUTSIDE ours), the facts
    are linked into it right away.
    """
    token = _FACTS.set(facts)
    scope = current_scope()
    if scope is not None and scope.facts is None:
        scope.facts = facts
    return token


def release_facts(token: contextvars.Token[Optional[RequestFacts]], facts: RequestFacts) -> None:
    """Undo :func:`bind_facts` once the request's call returned (facts stay readable by their scope)."""
    facts.active = False
    try:
        _FACTS.reset(token)
    except ValueError:  # pragma: no cover - reset from another context: leave the (now inactive) value
        _FACTS.set(None)


class RequestScope:
    """Mutable facts about one request that the span alone does not carry."""

    __slots__ = ("facts", "inner_route", "span", "span_id", "user")

    def __init__(self, span: Any) -> None:
        # The live span (to know whether the request is still open) and its id: on_end receives a
        # read-only copy, so identity comparisons must use the id.
        self.span = span
        self.span_id: int = span.context.span_id
        self.user: Optional[str] = None
        self.inner_route: Optional[str] = None
        #: What the library's middleware gathered about this request; None without the middleware.
        self.facts: Optional[RequestFacts] = None

    def is_open(self) -> bool:
        """True while the scope's span has not ended."""
        return getattr(self.span, "end_time", 1) is None


_CURRENT: contextvars.ContextVar[Optional[RequestScope]] = contextvars.ContextVar(
    "otel_o2audit_request_scope", default=None
)


def current_scope() -> Optional[RequestScope]:
    """The open request scope of the calling context, if any."""
    scope = _CURRENT.get()
    if scope is not None and scope.is_open():
        return scope
    return None


def open_scope(span: Any) -> Optional[RequestScope]:
    """Open a scope for ``span`` unless one is already open; return the new scope, or None if nested."""
    outer = current_scope()
    if outer is not None:
        return None
    scope = RequestScope(span)
    scope.facts = current_facts()
    _CURRENT.set(scope)
    return scope


def one_line(text: str, limit: int) -> str:
    """``text`` without control characters or line separators, at most ``limit`` characters."""
    if _UNSAFE.search(text):
        text = " ".join(_UNSAFE.sub(" ", text).split())
    return text[:limit]


def clean_user(user: object) -> str:
    """Make an identity safe to store: a string, one line, at most 256 characters."""
    return one_line(str(user), _MAX_USER_CHARS)


def set_user(user: Optional[str]) -> None:
    """Name the acting user (e.g. an email) of the current request for its audit record.

    Call it where your application has authenticated the caller, for example in a FastAPI dependency.
    It overrides identities found in span attributes. Outside an audited request it does nothing; it never
    raises. Pass only an identity, never a credential.
    """
    try:
        scope = current_scope()
        if scope is None:
            _logger.debug("set_user() called outside an audited request; ignored")
            return
        scope.user = None if user is None else clean_user(user)
    except Exception:  # pragma: no cover - defensive: never raise into the application
        _logger.debug("set_user() failed", exc_info=True)
