"""Route patterns: which requests are ingestion or excluded, and therefore never audited.

A pattern is ``[METHOD ]PATH``. PATH segments are literals, ``*`` or ``{name}`` (one segment each) or a final
``**`` (any number of segments, none included). Matching is on the request path, case-sensitive, and ignores a
trailing slash. All patterns of a table are compiled into a single regular expression, so classifying a
request costs one ``re.match`` whatever the table's size.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Tuple

__all__ = [
    "DEFAULT_EXCLUDE_ROUTES",
    "DEFAULT_INGESTION_ROUTES",
    "RoutePattern",
    "RouteTable",
    "parse_pattern",
    "parse_patterns",
]

#: Health and metrics probes: high volume, no user activity.
DEFAULT_EXCLUDE_ROUTES: Tuple[str, ...] = ("/healthz", "/health", "/livez", "/readyz", "/ready", "/metrics")

# OpenObserve's ingestion table, paths relative to ``/api/`` (POST only).
_O2_INGESTION_UNDER_API = (
    "{org}/_bulk",
    "{org}/{stream}/_multi",
    "{org}/{stream}/_json",
    "{org}/_hec",
    "{org}/loki/api/v1/push",
    "{org}/v1/logs",
    "{org}/v1/metrics",
    "{org}/v1/traces",
    "{org}/traces",
    "{org}/otel/v1/traces",
    "{org}/ingest/metrics/_json",
    "{org}/prometheus/api/v1/write",
)

#: OpenObserve's ingestion routes (with and without ``v2/`` after ``/api/``) plus root-level OTLP/HTTP.
DEFAULT_INGESTION_ROUTES: Tuple[str, ...] = (
    *(f"POST /api/{p}" for p in _O2_INGESTION_UNDER_API),
    *(f"POST /api/v2/{p}" for p in _O2_INGESTION_UNDER_API),
    "POST /aws/{org}/{stream}/_kinesis_firehose",
    "POST /gcp/{org}/{stream}/_sub",
    "POST /rum/v1/{org}/logs",
    "POST /rum/v1/{org}/replay",
    "POST /rum/v1/{org}/rum",
    "POST /v1/logs",
    "POST /v1/metrics",
    "POST /v1/traces",
)

#: In a list of patterns, this entry stands for the default table, so users can extend rather than replace.
DEFAULT_KEYWORD = "default"

_METHOD_RE = re.compile(r"[A-Za-z]+")
_PLACEHOLDER_RE = re.compile(r"\{[^{}/]*\}")


@dataclass(frozen=True)
class RoutePattern:
    """One parsed route pattern: an optional upper-case method and the path regex it compiles to."""

    text: str
    method: Optional[str]
    regex: str

    def matches(self, method: str, path: str) -> bool:
        """Tell whether a request with this method and path matches the pattern."""
        return RouteTable((self,)).matches(method, path)


def _segment_regex(segment: str, pattern: str) -> str:
    if segment == "*":
        return "[^/]+"
    out = []
    pos = 0
    while pos < len(segment):
        char = segment[pos]
        if char == "{":
            end = segment.find("}", pos)
            if end < 0:
                raise ValueError(f"{pattern!r}: '{{' is not closed by '}}' within the segment {segment!r}")
            name = segment[pos + 1 : end]
            if not name or "{" in name:
                raise ValueError(f"{pattern!r}: {{{name}}} is not a valid placeholder")
            out.append("[^/]+")
            pos = end + 1
        elif char == "}":
            raise ValueError(f"{pattern!r}: '}}' without '{{' in the segment {segment!r}")
        else:
            out.append(re.escape(char))
            pos += 1
    return "".join(out)


def parse_pattern(text: str) -> RoutePattern:
    """Parse ``[METHOD ]PATH``; raise ``ValueError`` with a readable reason when it is not valid."""
    raw = text.strip()
    method: Optional[str] = None
    path = raw
    if " " in raw:
        head, _, path = raw.partition(" ")
        path = path.strip()
        if not _METHOD_RE.fullmatch(head):
            raise ValueError(f"{raw!r}: {head!r} is not a plain HTTP method")
        method = head.upper()
    if not path.startswith("/"):
        raise ValueError(f"{raw!r}: the path must start with '/'")
    if " " in path:
        raise ValueError(f"{raw!r}: the path must not contain spaces")
    segments = path.strip("/").split("/") if path.strip("/") else []
    parts = []
    for index, segment in enumerate(segments):
        if segment == "**":
            if index != len(segments) - 1:
                raise ValueError(f"{raw!r}: '**' may only be the last segment")
            parts.append("(?:/.*)?")
            continue
        if "**" in segment:
            raise ValueError(f"{raw!r}: '**' must be a whole segment")
        parts.append("/" + _segment_regex(segment, raw))
    regex = "".join(parts) if parts else ""
    return RoutePattern(text=raw, method=method, regex=regex)


def parse_patterns(value: Iterable[str], default: Sequence[str]) -> Tuple[RoutePattern, ...]:
    """Parse a list of patterns; the entry ``default`` expands to the ``default`` list."""
    patterns: list[RoutePattern] = []
    for entry in value:
        entry = entry.strip()
        if not entry:
            continue
        if entry.lower() == DEFAULT_KEYWORD:
            patterns.extend(parse_pattern(p) for p in default)
        else:
            patterns.append(parse_pattern(entry))
    return tuple(patterns)


class RouteTable:
    """A set of route patterns compiled into one regular expression over ``"METHOD /path"``."""

    __slots__ = ("_regex", "patterns")

    def __init__(self, patterns: Iterable[RoutePattern]) -> None:
        self.patterns: Tuple[RoutePattern, ...] = tuple(patterns)
        alternatives = [f"{re.escape(p.method) if p.method else '[^ ]*'} {p.regex}" for p in self.patterns]
        self._regex = (
            re.compile("(?:" + "|".join(f"(?:{a})" for a in alternatives) + ")/?") if alternatives else None
        )

    def matches(self, method: str, path: str) -> bool:
        """Tell whether any pattern matches; a trailing slash on ``path`` is ignored."""
        if self._regex is None:
            return False
        return self._regex.fullmatch(f"{method} {path}") is not None

    def __repr__(self) -> str:
        return f"RouteTable({[p.text for p in self.patterns]!r})"
