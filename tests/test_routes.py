"""Route patterns (configuration.md) and the default ingestion/exclude tables (openobserve.md)."""

from __future__ import annotations

from typing import Sequence

import pytest

from otel_o2audit.routes import (
    DEFAULT_EXCLUDE_ROUTES,
    DEFAULT_INGESTION_ROUTES,
    RoutePattern,
    RouteTable,
    parse_pattern,
    parse_patterns,
)


def table(*patterns: str) -> RouteTable:
    return RouteTable(parse_pattern(p) for p in patterns)


DEFAULT_SKIP = RouteTable(parse_patterns(DEFAULT_INGESTION_ROUTES, ()))
DEFAULT_EXCLUDE = RouteTable(parse_patterns(DEFAULT_EXCLUDE_ROUTES, ()))


# --------------------------------------------------------------------------------------------- parsing


def test_parse_plain_path_has_no_method() -> None:
    pattern = parse_pattern("/healthz")
    assert isinstance(pattern, RoutePattern)
    assert pattern.method is None
    assert pattern.text == "/healthz"


@pytest.mark.parametrize("text", ["post /x", "Post /x", "POST /x", "pOsT /x"])
def test_method_prefix_is_upper_cased_whatever_its_case(text: str) -> None:
    pattern = parse_pattern(text)
    assert pattern.method == "POST"
    assert pattern.matches("POST", "/x")
    assert not pattern.matches("GET", "/x")


def test_surrounding_whitespace_is_ignored() -> None:
    pattern = parse_pattern("  GET   /status  ")
    assert pattern.method == "GET"
    assert pattern.text == "GET   /status"
    assert pattern.matches("GET", "/status")


@pytest.mark.parametrize(
    "text",
    [
        "",  # empty
        "healthz",  # path does not start with '/'
        "GET healthz",  # same, after a method
        "*/x",  # same
        "/a/**/b",  # '**' not the last segment
        "/**/x",
        "/a/b**",  # '**' glued to a literal
        "/a/**x",
        "/a/{b",  # '{' not closed
        "/a/{b/c}",  # '{' closed only in the next segment
        "/a/}b",  # '}' without '{'
        "/a/{}",  # empty placeholder
        "/a/{{b}}",  # nested braces
        "G3T /x",  # not a plain method token
        "GET/POST /x",
        "* /x",
        "GET, /x",
        "/a b",  # a space inside the path
    ],
)
def test_invalid_patterns_raise_value_error(text: str) -> None:
    with pytest.raises(ValueError, match=r"\S"):
        parse_pattern(text)


def test_parse_patterns_skips_blank_entries_and_expands_default() -> None:
    patterns = parse_patterns(["", "  ", "/a", "default", "/b"], ("/d1", "POST /d2"))
    assert [p.text for p in patterns] == ["/a", "/d1", "POST /d2", "/b"]


@pytest.mark.parametrize("keyword", ["default", "DEFAULT", "Default", " default "])
def test_default_keyword_is_case_insensitive(keyword: str) -> None:
    patterns = parse_patterns([keyword], ("/d1",))
    assert [p.text for p in patterns] == ["/d1"]


def test_parse_patterns_propagates_invalid_entries() -> None:
    with pytest.raises(ValueError, match="nope"):
        parse_patterns(["/ok", "nope"], ())


# --------------------------------------------------------------------------------------------- matching


@pytest.mark.parametrize(
    ("pattern", "path", "expected"),
    [
        # literals
        ("/healthz", "/healthz", True),
        ("/healthz", "/healthz/x", False),
        ("/healthz", "/health", False),
        ("/healthz", "/healthzz", False),
        ("/api/v1/x", "/api/v1/x", True),
        ("/api/v1/x", "/api/v1", False),
        # regex metacharacters are literals
        ("/a.b", "/a.b", True),
        ("/a.b", "/aXb", False),
        ("/a+(b)", "/a+(b)", True),
        ("/a+(b)", "/aa(b)", False),
        ("/$x^", "/$x^", True),
        # '*' is exactly one non-empty segment
        ("/a/*/c", "/a/b/c", True),
        ("/a/*/c", "/a/c", False),
        ("/a/*/c", "/a//c", False),
        ("/a/*/c", "/a/b/x/c", False),
        ("/a/*", "/a/anything-at-all", True),
        ("/a/*", "/a", False),
        # '{name}' is exactly one segment, also inside a segment
        ("/api/{org}/x", "/api/acme/x", True),
        ("/api/{org}/x", "/api/acme/more/x", False),
        ("/api/{org}/x", "/api/x", False),
        ("/files/{name}.json", "/files/a.json", True),
        ("/files/{name}.json", "/files/a.txt", False),
        ("/files/v{n}", "/files/v2", True),
        # a final '**' matches zero or more segments
        ("/static/**", "/static", True),
        ("/static/**", "/static/", True),
        ("/static/**", "/static/a", True),
        ("/static/**", "/static/a/b/c", True),
        ("/static/**", "/staticx", False),
        ("/static/**", "/stat", False),
        ("/static/**", "/other/static/a", False),
        ("/**", "/", True),
        ("/**", "/anything/at/all", True),
        # trailing slash ignored on both sides
        ("/x", "/x/", True),
        ("/x/", "/x", True),
        ("/x/", "/x/", True),
        ("/a/{id}", "/a/7/", True),
        # root
        ("/", "/", True),
        ("/", "/x", False),
        # case-sensitive path
        ("/healthz", "/Healthz", False),
        ("/Healthz", "/healthz", False),
        ("/api/{org}/_json", "/api/acme/_JSON", False),
    ],
)
def test_path_matching(pattern: str, path: str, expected: bool) -> None:
    assert table(pattern).matches("GET", path) is expected
    assert parse_pattern(pattern).matches("GET", path) is expected


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "PURGE"])
def test_pattern_without_method_matches_any_method(method: str) -> None:
    assert table("/healthz").matches(method, "/healthz")


def test_pattern_with_method_matches_only_that_method() -> None:
    t = table("GET /status/**")
    assert t.matches("GET", "/status")
    assert t.matches("GET", "/status/db")
    assert not t.matches("POST", "/status/db")
    assert not t.matches("HEAD", "/status")


def test_table_matches_if_any_pattern_matches() -> None:
    t = table("/healthz", "/metrics", "GET /status/**", "POST /api/{org}/{stream}/_json")
    assert t.matches("GET", "/metrics")
    assert t.matches("GET", "/status/x")
    assert t.matches("POST", "/api/acme/logs/_json")
    assert not t.matches("GET", "/api/acme/logs/_json")
    assert not t.matches("GET", "/other")


def test_empty_table_matches_nothing() -> None:
    t = RouteTable(())
    assert not t.matches("GET", "/")
    assert not t.matches("GET", "/healthz")
    assert t.patterns == ()


def test_table_repr_lists_pattern_texts() -> None:
    assert repr(table("/a", "GET /b")) == "RouteTable(['/a', 'GET /b'])"


def test_paths_with_spaces_or_regex_text_do_not_confuse_the_table() -> None:
    t = table("/a")
    assert not t.matches("GET", "/a /a")
    assert not t.matches("GET /a", "")
    assert not t.matches("GET", ".*")


# ------------------------------------------------------------------------------ default ingestion table

UNDER_API = [
    "acme/_bulk",
    "acme/logs/_multi",
    "acme/logs/_json",
    "acme/_hec",
    "acme/loki/api/v1/push",
    "acme/v1/logs",
    "acme/v1/metrics",
    "acme/v1/traces",
    "acme/traces",
    "acme/otel/v1/traces",
    "acme/ingest/metrics/_json",
    "acme/prometheus/api/v1/write",
]
OUTSIDE_API = [
    "/aws/acme/logs/_kinesis_firehose",
    "/gcp/acme/logs/_sub",
    "/rum/v1/acme/logs",
    "/rum/v1/acme/replay",
    "/rum/v1/acme/rum",
    "/v1/logs",
    "/v1/metrics",
    "/v1/traces",
]
INGESTION_PATHS = [f"/api/{p}" for p in UNDER_API] + [f"/api/v2/{p}" for p in UNDER_API] + OUTSIDE_API


def test_default_ingestion_parses() -> None:
    assert len(parse_patterns(DEFAULT_INGESTION_ROUTES, ())) == len(DEFAULT_INGESTION_ROUTES)
    assert all(p.method == "POST" for p in parse_patterns(DEFAULT_INGESTION_ROUTES, ()))


@pytest.mark.parametrize("path", INGESTION_PATHS)
def test_every_openobserve_ingestion_route_is_ingestion_for_post(path: str) -> None:
    assert DEFAULT_SKIP.matches("POST", path)
    assert DEFAULT_SKIP.matches("POST", path + "/")


@pytest.mark.parametrize("path", INGESTION_PATHS)
@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"])
def test_ingestion_routes_are_post_only(method: str, path: str) -> None:
    assert not DEFAULT_SKIP.matches(method, path)


def test_get_on_json_ingestion_path_is_not_ingestion() -> None:
    assert not DEFAULT_SKIP.matches("GET", "/api/acme/logs/_json")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/acme/dashboards"),
        ("POST", "/api/acme/dashboards"),
        ("GET", "/api/acme/dashboards/7"),
        ("PUT", "/api/acme/dashboards/7"),
        ("DELETE", "/api/acme/dashboards/7"),
        ("POST", "/api/acme/_search"),
        ("POST", "/api/acme/streams"),
        ("POST", "/api/acme/alerts"),
        ("POST", "/api/acme/users"),
        ("POST", "/auth/login"),
        ("POST", "/api/acme/logs/_json/extra"),  # deeper than the route
        ("POST", "/api/_json"),  # org and stream missing
        ("POST", "/api/acme/LOGS/_JSON"),  # case-sensitive
        ("POST", "/v1/logs/extra"),
        ("POST", "/v2/traces"),
        ("POST", "/rum/v1/acme/other"),
        ("POST", "/aws/acme/_kinesis_firehose"),  # stream missing
        ("POST", "/gcp/acme/logs/_pub"),
    ],
)
def test_ordinary_api_calls_are_not_ingestion(method: str, path: str) -> None:
    assert not DEFAULT_SKIP.matches(method, path)


# -------------------------------------------------------------------------------- default exclude table


def test_default_exclude_routes_are_the_documented_ones() -> None:
    assert DEFAULT_EXCLUDE_ROUTES == ("/healthz", "/health", "/livez", "/readyz", "/ready", "/metrics")


@pytest.mark.parametrize("path", ["/healthz", "/health", "/livez", "/readyz", "/ready", "/metrics"])
@pytest.mark.parametrize("method", ["GET", "HEAD", "POST", "OPTIONS"])
@pytest.mark.parametrize("slash", ["", "/"])
def test_default_excludes_match_any_method_and_trailing_slash(method: str, path: str, slash: str) -> None:
    assert DEFAULT_EXCLUDE.matches(method, path + slash)


@pytest.mark.parametrize(
    "path", ["/healthz/deep", "/Healthz", "/api/healthz", "/metrics/x", "/healthcheck", "/", "/api/acme/metrics"]
)
def test_default_excludes_do_not_reach_further(path: str) -> None:
    assert not DEFAULT_EXCLUDE.matches("GET", path)


def _texts(patterns: Sequence[RoutePattern]) -> list[str]:
    return [p.text for p in patterns]


def test_default_keyword_extends_the_defaults() -> None:
    patterns = parse_patterns(["default", "GET /internal/**"], DEFAULT_EXCLUDE_ROUTES)
    assert _texts(patterns) == [*DEFAULT_EXCLUDE_ROUTES, "GET /internal/**"]
    t = RouteTable(patterns)
    assert t.matches("GET", "/healthz")
    assert t.matches("GET", "/internal/a/b")
    assert not t.matches("POST", "/internal/a/b")
