"""The per-request scope: which server span is the request's audited one, and who the acting user is.

The processor opens a scope in ``on_start`` of the outermost SERVER span of a request and stores it in a
context variable. Anything that runs inside that request (FastAPI dependencies, sync handlers in the thread
pool, nested ASGI apps) sees the same scope object, because context copies share the object:

* :func:`set_user` writes the acting user into it (no span attribute, so the identity stays out of traces);
* a second SERVER span started inside the request (FastAPI's native span of a mounted sub-application, say)
  finds the scope already open and is folded into it instead of producing a second record.
"""

from __future__ import annotations

import contextvars
import logging
import re
from typing import Any, Optional

__all__ = ["RequestScope", "current_scope", "set_user"]

_logger = logging.getLogger("otel_o2audit")

# Identities are free text from application code: keep them a sane size and on one line.
_MAX_USER_CHARS = 256
# Control characters and every Unicode line or paragraph separator: an identity must stay on one line.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


class RequestScope:
    """Mutable facts about one request that the span alone does not carry."""

    __slots__ = ("inner_route", "span", "span_id", "user")

    def __init__(self, span: Any) -> None:
        # The live span (to know whether the request is still open) and its id: on_end receives a
        # read-only copy, so identity comparisons must use the id.
        self.span = span
        self.span_id: int = span.context.span_id
        self.user: Optional[str] = None
        self.inner_route: Optional[str] = None

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
    _CURRENT.set(scope)
    return scope


def clean_user(user: object) -> str:
    """Make an identity safe to store: a string, one line, at most 256 characters."""
    text = str(user)
    if _UNSAFE.search(text):
        text = " ".join(_UNSAFE.sub(" ", text).split())
    return text[:_MAX_USER_CHARS]


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
