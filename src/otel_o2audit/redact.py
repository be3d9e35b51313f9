"""Redaction of sensitive values: the value goes, the name stays (``token=[REDACTED]&page=2``).

Names are compared case-insensitively after percent-decoding, with separators (``-``, ``_``, ``.``, spaces)
removed, so ``X-Api-Key``, ``api_key``, ``apiKey`` and ``api%5Fkey`` are one name. A sensitive word anywhere in
a name makes it sensitive (``access_token``, ``clientSecret``), with one deliberate exception: ``auth`` does not
match ``author`` (``?author=alice`` is a filter, not a credential), while ``authorization``, ``authorize``,
``oauth`` and ``authentication`` still match.

One policy covers every place a record can carry request data: the query string (:meth:`Redactor.redact_query`),
form bodies (the same method), JSON, multipart and text bodies (:mod:`otel_o2audit.body`, which asks
:meth:`Redactor.is_sensitive` for every field name). Records never carry request headers. To replace the
policy in code, subclass :class:`Redactor` and override :meth:`~Redactor.is_sensitive`: every path goes
through it.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Iterable, Pattern, Tuple
from urllib.parse import unquote_plus

__all__ = ["DEFAULT_SENSITIVE_NAMES", "REDACTED", "Redactor"]

#: What a redacted value becomes.
REDACTED = "[REDACTED]"

#: Words that make a parameter name sensitive wherever they appear in it.
DEFAULT_SENSITIVE_NAMES: Tuple[str, ...] = (
    "password",
    "passwd",
    "pwd",
    "secret",
    "token",
    "api_key",
    "apikey",
    "auth",
    "authorization",
    "credential",
    "session",
    "cookie",
    "signature",
    "private_key",
    "client_secret",
)

_SEPARATORS = re.compile(r"[\s\-_.]+")


def _compact(name: str) -> str:
    return _SEPARATORS.sub("", name.lower())


def _word_regex(word: str) -> str:
    compact = _compact(word)
    if compact == "auth":
        # "author", "authors", "author_id" are not credentials; "authorization"/"authorize" are.
        return r"auth(?!or(?!i[sz]))"
    return re.escape(compact)


class Redactor:
    """Decides which names are sensitive and redacts query strings; immutable and thread-safe."""

    __slots__ = ("_is_sensitive", "_regex", "names")

    def __init__(self, names: Iterable[str] = DEFAULT_SENSITIVE_NAMES) -> None:
        self.names: Tuple[str, ...] = tuple(dict.fromkeys(n.strip() for n in names if n.strip()))
        words = sorted({_word_regex(n) for n in self.names}, key=len, reverse=True)
        self._regex: Pattern[str] | None = re.compile("|".join(words)) if words else None
        # Parameter names repeat endlessly across requests: cache the verdict per raw name.
        self._is_sensitive = lru_cache(maxsize=4096)(self._check)

    def _check(self, raw_name: str) -> bool:
        if self._regex is None:
            return False
        return self._regex.search(_compact(unquote_plus(raw_name))) is not None

    def is_sensitive(self, name: str) -> bool:
        """Tell whether a parameter, field or header name is sensitive (``name`` may be percent-encoded)."""
        return bool(self._is_sensitive(name))

    def redact_query(self, query: str) -> str:
        """Return ``query`` (without ``?``) with the value of every sensitive parameter replaced."""
        if not query:
            return ""
        parts = query.split("&")
        changed = False
        for index, part in enumerate(parts):
            name, sep, _value = part.partition("=")
            if sep and self.is_sensitive(name):
                parts[index] = f"{name}={REDACTED}"
                changed = True
        return "&".join(parts) if changed else query

    def __repr__(self) -> str:
        return f"Redactor({len(self.names)} names)"
