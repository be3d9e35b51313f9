"""The ``O2_AUDIT_*`` configuration contract (configuration.md)."""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping

import pytest

from otel_o2audit.config import ENV_VARS, ConfigError, O2AuditConfig, Secret
from otel_o2audit.routes import DEFAULT_EXCLUDE_ROUTES, DEFAULT_INGESTION_ROUTES

# A password distinctive enough that finding it anywhere is proof of a leak.
PASSWORD = "Pw-7f3Kq!zX9-not-for-logs"
USER = "auditor@example.com"
HTTP_ENV: Dict[str, str] = {
    "O2_AUDIT_ENDPOINT": "http://o2.example.com:5080",
    "O2_AUDIT_USER": USER,
    "O2_AUDIT_PASSWORD": PASSWORD,
}
FILE_ENV: Dict[str, str] = {"O2_AUDIT_ENDPOINT": "file:///var/log/audit.jsonl"}

DOCUMENTED_VARS = (
    "O2_AUDIT_ENABLED",
    "O2_AUDIT_BATCH_SIZE",
    "O2_AUDIT_PUBLISH_INTERVAL",
    "O2_AUDIT_ENDPOINT",
    "O2_AUDIT_ORG",
    "O2_AUDIT_STREAM",
    "O2_AUDIT_USER",
    "O2_AUDIT_PASSWORD",
    "O2_AUDIT_TIMEOUT",
    "O2_AUDIT_EXCLUDE_ROUTES",
    "O2_AUDIT_INGESTION_ROUTES",
    "O2_AUDIT_REQUIRED",
)


def load(env: Mapping[str, str], **overrides: Any) -> O2AuditConfig:
    return O2AuditConfig.from_env(dict(env), **overrides)


def error_for(env: Mapping[str, str], **overrides: Any) -> str:
    with pytest.raises(ConfigError) as info:
        O2AuditConfig.from_env(dict(env), **overrides)
    return str(info.value)


def http(**extra: str) -> Dict[str, str]:
    return {**HTTP_ENV, **extra}


def file_(**extra: str) -> Dict[str, str]:
    return {**FILE_ENV, **extra}


# ------------------------------------------------------------------------------------------- contract


def test_every_documented_variable_has_a_keyword_twin() -> None:
    assert set(DOCUMENTED_VARS) <= set(ENV_VARS.values())
    assert all(name.startswith("O2_AUDIT_") for name in ENV_VARS.values())
    field_names = {f.name for f in dataclasses.fields(O2AuditConfig)}
    assert set(ENV_VARS) == field_names


def test_defaults() -> None:
    config = O2AuditConfig.from_env({}, require_endpoint=False)
    assert config.enabled is False
    assert config.batch_size == 500
    assert config.publish_interval == 600.0
    assert config.endpoint is None
    assert config.org == "_meta"
    assert config.stream == "audit"
    assert config.user is None
    assert config.password is None
    assert config.timeout == 10.0
    assert [p.text for p in config.exclude_routes] == list(DEFAULT_EXCLUDE_ROUTES)
    assert [p.text for p in config.ingestion_routes] == list(DEFAULT_INGESTION_ROUTES)
    assert config.required is False
    assert config.redact == ()
    assert config.ingest_url() is None
    assert config.file_path() is None


def test_endpoint_is_required_unless_told_otherwise() -> None:
    message = error_for({})
    assert "O2_AUDIT_ENDPOINT" in message
    assert "not set" in message


def test_empty_or_blank_variables_mean_default() -> None:
    env = file_(
        O2_AUDIT_ENABLED="",
        O2_AUDIT_BATCH_SIZE="  ",
        O2_AUDIT_PUBLISH_INTERVAL="",
        O2_AUDIT_ORG=" ",
        O2_AUDIT_STREAM="",
        O2_AUDIT_EXCLUDE_ROUTES="",
    )
    config = load(env)
    assert config.enabled is False
    assert config.batch_size == 500
    assert config.publish_interval == 600.0
    assert config.org == "_meta"
    assert config.stream == "audit"
    assert [p.text for p in config.exclude_routes] == list(DEFAULT_EXCLUDE_ROUTES)


def test_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENV_VARS.values():
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("O2_AUDIT_ENDPOINT", "file:///tmp/a.jsonl")
    monkeypatch.setenv("O2_AUDIT_BATCH_SIZE", "7")
    config = O2AuditConfig.from_env()
    assert config.batch_size == 7
    assert config.file_path() == "/tmp/a.jsonl"


def test_config_is_frozen() -> None:
    config = load(FILE_ENV)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.batch_size = 3  # type: ignore[misc]


# ------------------------------------------------------------------------------------------- booleans

TRUE_WORDS = ["true", "1", "yes", "on"]
FALSE_WORDS = ["false", "0", "no", "off"]


def _spellings(words: list[str]) -> list[str]:
    out = []
    for word in words:
        out += [word, word.upper(), word.capitalize(), f"  {word}  "]
        if len(word) > 1:
            out.append(word[0] + word[1:].upper())  # tRUE-like mixed case
    return sorted(set(out))


@pytest.mark.parametrize("var", ["O2_AUDIT_ENABLED", "O2_AUDIT_REQUIRED"])
@pytest.mark.parametrize("text", _spellings(TRUE_WORDS))
def test_boolean_true_spellings(var: str, text: str) -> None:
    config = load(file_(**{var: text}))
    assert getattr(config, var[len("O2_AUDIT_") :].lower()) is True


@pytest.mark.parametrize("var", ["O2_AUDIT_ENABLED", "O2_AUDIT_REQUIRED"])
@pytest.mark.parametrize("text", _spellings(FALSE_WORDS))
def test_boolean_false_spellings(var: str, text: str) -> None:
    config = load(file_(**{var: text}))
    assert getattr(config, var[len("O2_AUDIT_") :].lower()) is False


@pytest.mark.parametrize("var", ["O2_AUDIT_ENABLED", "O2_AUDIT_REQUIRED"])
@pytest.mark.parametrize("text", ["maybe", "2", "-1", "y", "n", "t", "f", "enable", "truee", "on off", "none"])
def test_boolean_other_values_are_errors(var: str, text: str) -> None:
    message = error_for(file_(**{var: text}))
    assert var in message
    assert repr(text) in message


@pytest.mark.parametrize("value", [True, False])
def test_boolean_keywords(value: bool) -> None:
    assert load(FILE_ENV, enabled=value).enabled is value
    assert load(FILE_ENV, required=value).required is value


# ------------------------------------------------------------------------------------ integer settings


@pytest.mark.parametrize(("text", "expected"), [("1", 1), ("42", 42), (" 100 ", 100), ("10000", 10000)])
def test_batch_size_valid(text: str, expected: int) -> None:
    assert load(file_(O2_AUDIT_BATCH_SIZE=text)).batch_size == expected


@pytest.mark.parametrize("text", ["abc", "1.5", "5e2", "ten", "0x10", "1,000"])
def test_batch_size_not_a_number(text: str) -> None:
    message = error_for(file_(O2_AUDIT_BATCH_SIZE=text))
    assert "O2_AUDIT_BATCH_SIZE" in message
    assert repr(text) in message
    assert "whole number" in message


@pytest.mark.parametrize("text", ["0", "-1", "-500"])
def test_batch_size_must_be_positive(text: str) -> None:
    message = error_for(file_(O2_AUDIT_BATCH_SIZE=text))
    assert "O2_AUDIT_BATCH_SIZE" in message
    assert "at least 1" in message


def test_max_queue_size_is_validated_like_batch_size() -> None:
    assert load(file_(O2_AUDIT_MAX_QUEUE_SIZE="20000")).max_queue_size == 20000
    assert "O2_AUDIT_MAX_QUEUE_SIZE" in error_for(file_(O2_AUDIT_MAX_QUEUE_SIZE="lots"))
    assert "O2_AUDIT_MAX_QUEUE_SIZE" in error_for(file_(O2_AUDIT_MAX_QUEUE_SIZE="0"))


def test_batch_size_above_max_queue_size() -> None:
    message = error_for(file_(O2_AUDIT_BATCH_SIZE="20001", O2_AUDIT_MAX_QUEUE_SIZE="20000"))
    assert "O2_AUDIT_BATCH_SIZE" in message
    assert "O2_AUDIT_MAX_QUEUE_SIZE" in message
    # with the default queue size too
    assert "O2_AUDIT_MAX_QUEUE_SIZE" in error_for(file_(O2_AUDIT_BATCH_SIZE="10001"))


def test_batch_size_equal_to_max_queue_size_is_fine() -> None:
    config = load(file_(O2_AUDIT_BATCH_SIZE="64", O2_AUDIT_MAX_QUEUE_SIZE="64"))
    assert config.batch_size == config.max_queue_size == 64


@pytest.mark.parametrize("value", [True, 2.5, "2.5", 0, -3])
def test_batch_size_keyword_invalid(value: Any) -> None:
    message = error_for(FILE_ENV, batch_size=value)
    assert "batch_size" in message


# ---------------------------------------------------------------------------------- seconds settings

SECONDS_VARS = [
    "O2_AUDIT_PUBLISH_INTERVAL",
    "O2_AUDIT_TIMEOUT",
    "O2_AUDIT_RETRY_MAX_ELAPSED",
    "O2_AUDIT_RETRY_INITIAL_BACKOFF",
    "O2_AUDIT_SHUTDOWN_TIMEOUT",
]


@pytest.mark.parametrize("var", SECONDS_VARS)
@pytest.mark.parametrize(("text", "expected"), [("0.5", 0.5), ("1", 1.0), (" 30 ", 30.0), ("1e-3", 0.001)])
def test_seconds_valid(var: str, text: str, expected: float) -> None:
    config = load(file_(**{var: text}))
    value = getattr(config, var[len("O2_AUDIT_") :].lower())
    assert isinstance(value, float)
    assert value == expected


@pytest.mark.parametrize("var", SECONDS_VARS)
@pytest.mark.parametrize("text", ["0", "0.0", "-1", "-0.5", "nan", "NaN", "inf", "-inf", "Infinity", "soon", "10s"])
def test_seconds_invalid(var: str, text: str) -> None:
    message = error_for(file_(**{var: text}))
    assert var in message
    assert repr(text) in message


def test_publish_interval_fraction() -> None:
    assert load(file_(O2_AUDIT_PUBLISH_INTERVAL="0.5")).publish_interval == 0.5


@pytest.mark.parametrize("value", [0, -1, 0.0, float("nan"), float("inf"), "abc", True])
def test_publish_interval_keyword_invalid(value: Any) -> None:
    assert "publish_interval" in error_for(FILE_ENV, publish_interval=value)


@pytest.mark.parametrize(("value", "expected"), [(0.25, 0.25), (3, 3.0), ("2.5", 2.5)])
def test_publish_interval_keyword_valid(value: Any, expected: float) -> None:
    config = load(FILE_ENV, publish_interval=value)
    assert config.publish_interval == expected
    assert isinstance(config.publish_interval, float)


# ---------------------------------------------------------------------------------------- org, stream


@pytest.mark.parametrize("var", ["O2_AUDIT_ORG", "O2_AUDIT_STREAM"])
@pytest.mark.parametrize("text", ["acme", "_meta", "team-1", "a.b", "ns:audit", "A_B"])
def test_names_valid(var: str, text: str) -> None:
    assert getattr(load(file_(**{var: text})), var[len("O2_AUDIT_") :].lower()) == text


@pytest.mark.parametrize("var", ["O2_AUDIT_ORG", "O2_AUDIT_STREAM"])
@pytest.mark.parametrize("text", ["my org", "a/b", "a?b", "a#b", "é"])
def test_names_invalid(var: str, text: str) -> None:
    assert var in error_for(file_(**{var: text}))


def test_empty_org_keyword_is_an_error() -> None:
    assert "org" in error_for(FILE_ENV, org="")


# ------------------------------------------------------------------------------------------- endpoint


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("http://o2.example.com:5080", "http://o2.example.com:5080"),
        ("http://o2.example.com:5080/", "http://o2.example.com:5080"),
        ("https://o2.example.com", "https://o2.example.com"),
        ("HTTPS://o2.example.com/", "https://o2.example.com"),
        ("http://o2.example.com:5080/openobserve", "http://o2.example.com:5080/openobserve"),
        ("http://o2.example.com:5080/openobserve/", "http://o2.example.com:5080/openobserve"),
        ("http://o2.example.com:5080/a/b//", "http://o2.example.com:5080/a/b"),
        ("  http://o2.example.com:5080  ", "http://o2.example.com:5080"),
        ("http://[::1]:5080/", "http://[::1]:5080"),
        ("http://127.0.0.1:5080", "http://127.0.0.1:5080"),
    ],
)
def test_http_endpoint_normalisation(text: str, expected: str) -> None:
    assert load(http(O2_AUDIT_ENDPOINT=text)).endpoint == expected


def test_ingest_url_default_org_and_stream() -> None:
    config = load(http())
    assert config.ingest_url() == "http://o2.example.com:5080/api/_meta/audit/_json"
    assert config.file_path() is None


def test_ingest_url_keeps_the_prefix() -> None:
    config = load(http(O2_AUDIT_ENDPOINT="https://o2.example.com/openobserve/"))
    assert config.ingest_url() == "https://o2.example.com/openobserve/api/_meta/audit/_json"


def test_ingest_url_uses_org_and_stream_and_quotes_them() -> None:
    config = load(http(O2_AUDIT_ORG="acme", O2_AUDIT_STREAM="api-audit"))
    assert config.ingest_url() == "http://o2.example.com:5080/api/acme/api-audit/_json"
    config = load(http(O2_AUDIT_ORG="ns:acme", O2_AUDIT_STREAM="a:b"))
    assert config.ingest_url() == "http://o2.example.com:5080/api/ns%3Aacme/a%3Ab/_json"


@pytest.mark.parametrize(
    ("text", "path"),
    [
        ("file:///var/log/audit.jsonl", "/var/log/audit.jsonl"),
        ("file:///audit.jsonl", "/audit.jsonl"),
        ("FILE:///tmp/a.jsonl", "/tmp/a.jsonl"),
        ("file://localhost/tmp/a.jsonl", "/tmp/a.jsonl"),
    ],
)
def test_file_endpoint_forms(text: str, path: str) -> None:
    config = load({"O2_AUDIT_ENDPOINT": text})
    assert config.endpoint == f"file://{path}"
    assert config.file_path() == path
    assert config.ingest_url() is None


def test_file_endpoint_needs_no_credentials() -> None:
    config = load(FILE_ENV)
    assert config.user is None
    assert config.password is None


@pytest.mark.parametrize(
    "text",
    [
        "file://host/x.jsonl",  # a host
        "file://relative/x.jsonl",  # looks relative, is a host
        "file:relative/x.jsonl",  # relative
        "file:x.jsonl",
        "file:///tmp/dir/",  # a directory
        "file:///",
    ],
)
def test_file_endpoint_rejected(text: str) -> None:
    message = error_for({"O2_AUDIT_ENDPOINT": text})
    assert "O2_AUDIT_ENDPOINT" in message
    assert "file" in message


@pytest.mark.parametrize(
    "text",
    [
        "ftp://o2.example.com",
        "grpc://o2.example.com:5081",
        "ws://o2.example.com",
        "o2.example.com:5080",  # scheme forgotten
        "o2.example.com",
        "/var/log/audit.jsonl",  # a bare path
    ],
)
def test_unknown_scheme(text: str) -> None:
    message = error_for(http(O2_AUDIT_ENDPOINT=text))
    assert "O2_AUDIT_ENDPOINT" in message
    assert "scheme" in message


@pytest.mark.parametrize(
    "text",
    [
        "http://",  # no host
        "http:///path",
        "http://o2.example.com:notaport",
        "http://o2.example.com:99999",
        "http://o2.example.com:5080/?x=1",  # query
        "http://o2.example.com:5080/#frag",  # fragment
    ],
)
def test_malformed_http_endpoints(text: str) -> None:
    assert "O2_AUDIT_ENDPOINT" in error_for(http(O2_AUDIT_ENDPOINT=text))


ENDPOINT_SECRET = "Ep-9vR2!secret-in-url"


@pytest.mark.parametrize(
    "text",
    [
        f"https://alice:{ENDPOINT_SECRET}@o2.example.com",
        f"http://alice:{ENDPOINT_SECRET}@o2.example.com:5080/prefix/",
        f"http://:{ENDPOINT_SECRET}@o2.example.com",
        f"HTTPS://alice:{ENDPOINT_SECRET}@o2.example.com:notaport",
        f"ftp://alice:{ENDPOINT_SECRET}@o2.example.com",
        f"file://alice:{ENDPOINT_SECRET}@host/x.jsonl",
        # the scheme forgotten: still credentials, still never echoed
        f"alice:{ENDPOINT_SECRET}@o2.example.com:5080",
        f"alice@example.com:{ENDPOINT_SECRET}@o2.example.com:5080",
        f"//alice:{ENDPOINT_SECRET}@o2.example.com:5080",
        # a token put in the query string
        f"https://o2.example.com/?token={ENDPOINT_SECRET}",
    ],
)
def test_credentials_in_the_endpoint_are_rejected_without_echo(text: str) -> None:
    message = error_for(http(O2_AUDIT_ENDPOINT=text))
    assert "O2_AUDIT_ENDPOINT" in message
    assert ENDPOINT_SECRET not in message
    assert ENDPOINT_SECRET.split("!")[1] not in message


def test_username_only_in_url_is_rejected_too() -> None:
    message = error_for(http(O2_AUDIT_ENDPOINT="https://alice@o2.example.com"))
    assert "credentials" in message
    assert "O2_AUDIT_USER" in message


# ---------------------------------------------------------------------------------------- credentials


@pytest.mark.parametrize(
    ("drop", "missing"),
    [
        (("O2_AUDIT_USER",), ["O2_AUDIT_USER"]),
        (("O2_AUDIT_PASSWORD",), ["O2_AUDIT_PASSWORD"]),
        (("O2_AUDIT_USER", "O2_AUDIT_PASSWORD"), ["O2_AUDIT_USER", "O2_AUDIT_PASSWORD"]),
    ],
)
@pytest.mark.parametrize("scheme", ["http", "https"])
def test_http_endpoint_needs_user_and_password(drop: tuple[str, ...], missing: list[str], scheme: str) -> None:
    env = {k: v for k, v in http(O2_AUDIT_ENDPOINT=f"{scheme}://o2:5080").items() if k not in drop}
    message = error_for(env)
    for name in missing:
        assert name in message
    for name in {"O2_AUDIT_USER", "O2_AUDIT_PASSWORD"} - set(missing):
        assert name not in message
    assert PASSWORD not in message


@pytest.mark.parametrize("blank", ["", "   "])
def test_blank_credentials_count_as_missing(blank: str) -> None:
    message = error_for(http(O2_AUDIT_USER=blank))
    assert "O2_AUDIT_USER" in message
    message = error_for(http(O2_AUDIT_PASSWORD=blank))
    assert "O2_AUDIT_PASSWORD" in message


def test_password_is_a_secret() -> None:
    config = load(http())
    assert isinstance(config.password, Secret)
    assert config.password.reveal() == PASSWORD
    assert config.user == USER


def test_password_keyword_accepts_str_and_secret() -> None:
    env = {k: v for k, v in HTTP_ENV.items() if k != "O2_AUDIT_PASSWORD"}
    assert load(env, password=PASSWORD).password == Secret(PASSWORD)
    assert load(env, password=Secret(PASSWORD)).password == Secret(PASSWORD)


def test_secret_hides_itself() -> None:
    secret = Secret(PASSWORD)
    assert PASSWORD not in repr(secret)
    assert PASSWORD not in str(secret)
    assert PASSWORD not in f"{secret}"
    assert PASSWORD not in repr([secret])
    assert bool(secret)
    assert not Secret("")
    assert secret == Secret(PASSWORD)
    assert secret != PASSWORD


def test_password_never_in_repr_str_or_describe() -> None:
    config = load(http(O2_AUDIT_ENABLED="true"))
    assert PASSWORD not in repr(config)
    assert PASSWORD not in str(config)
    described = config.describe()
    assert PASSWORD not in repr(described)
    assert described["password"] == "***"
    assert described["user"] == USER
    assert described["endpoint"] == "http://o2.example.com:5080"
    assert described["exclude_routes"] == list(DEFAULT_EXCLUDE_ROUTES)
    assert described["ingestion_routes"] == list(DEFAULT_INGESTION_ROUTES)
    assert described["batch_size"] == 500
    assert set(described) == {f.name for f in dataclasses.fields(O2AuditConfig)}


def test_describe_without_password() -> None:
    assert load(FILE_ENV).describe()["password"] is None


BAD_SETTINGS = [
    {"O2_AUDIT_ENABLED": "perhaps"},
    {"O2_AUDIT_BATCH_SIZE": "abc"},
    {"O2_AUDIT_PUBLISH_INTERVAL": "0"},
    {"O2_AUDIT_ENDPOINT": "gopher://o2"},
    {"O2_AUDIT_ORG": "bad org"},
    {"O2_AUDIT_USER": ""},
    {"O2_AUDIT_EXCLUDE_ROUTES": "healthz"},
    {"O2_AUDIT_BATCH_SIZE": "20000"},
]


@pytest.mark.parametrize("bad", BAD_SETTINGS)
def test_password_never_in_config_errors(bad: Dict[str, str]) -> None:
    assert PASSWORD not in error_for({**HTTP_ENV, **bad})
    env = {k: v for k, v in {**HTTP_ENV, **bad}.items() if k != "O2_AUDIT_PASSWORD"}
    assert PASSWORD not in error_for(env, password=PASSWORD)


def test_password_never_in_config_error_chain() -> None:
    with pytest.raises(ConfigError) as info:
        O2AuditConfig.from_env(http(O2_AUDIT_BATCH_SIZE="abc", O2_AUDIT_ENDPOINT="gopher://x"))
    exc: BaseException | None = info.value
    while exc is not None:
        assert PASSWORD not in str(exc)
        assert PASSWORD not in repr(exc.args)
        exc = exc.__cause__ or exc.__context__


# --------------------------------------------------------------------------------------------- routes


def test_exclude_routes_replace_the_default() -> None:
    config = load(file_(O2_AUDIT_EXCLUDE_ROUTES="/internal/**, GET /status"))
    assert [p.text for p in config.exclude_routes] == ["/internal/**", "GET /status"]
    table = config.skip_table()
    assert table.matches("POST", "/internal/x")
    assert table.matches("GET", "/status/")
    assert not table.matches("GET", "/healthz")  # replaced, no longer excluded


def test_ingestion_routes_replace_the_default() -> None:
    config = load(file_(O2_AUDIT_INGESTION_ROUTES="POST /ingest/**"))
    table = config.skip_table()
    assert table.matches("POST", "/ingest/a")
    assert not table.matches("POST", "/api/acme/logs/_json")
    assert table.matches("GET", "/healthz")  # excludes untouched


@pytest.mark.parametrize("var", ["O2_AUDIT_EXCLUDE_ROUTES", "O2_AUDIT_INGESTION_ROUTES"])
def test_default_keyword_extends_the_defaults(var: str) -> None:
    config = load(file_(**{var: "default,POST /custom/{x}"}))
    field = var[len("O2_AUDIT_") :].lower()
    defaults = DEFAULT_EXCLUDE_ROUTES if field == "exclude_routes" else DEFAULT_INGESTION_ROUTES
    assert [p.text for p in getattr(config, field)] == [*defaults, "POST /custom/{x}"]


def test_skip_table_defaults() -> None:
    table = load(FILE_ENV).skip_table()
    assert table.matches("POST", "/api/acme/logs/_json")
    assert table.matches("GET", "/healthz")
    assert not table.matches("GET", "/api/acme/logs/_json")
    assert not table.matches("GET", "/api/acme/dashboards")


@pytest.mark.parametrize("var", ["O2_AUDIT_EXCLUDE_ROUTES", "O2_AUDIT_INGESTION_ROUTES"])
@pytest.mark.parametrize("bad", ["healthz", "/a/**/b", "/a/{b", "/a/{b/c}", "G3T /x", "/ok,/a/}", "default,no-slash"])
def test_invalid_route_patterns(var: str, bad: str) -> None:
    message = error_for(file_(**{var: bad}))
    assert var in message
    assert "route pattern" in message


def test_route_keywords_accept_lists() -> None:
    config = load(FILE_ENV, exclude_routes=["/a", " ", "GET /b"], ingestion_routes=("default", "POST /c"))
    assert [p.text for p in config.exclude_routes] == ["/a", "GET /b"]
    assert [p.text for p in config.ingestion_routes] == [*DEFAULT_INGESTION_ROUTES, "POST /c"]
    assert "exclude_routes" in error_for(FILE_ENV, exclude_routes=["nope"])


# ------------------------------------------------------------------------------------------ overrides


def test_keyword_overrides_win_over_the_environment() -> None:
    env = http(O2_AUDIT_BATCH_SIZE="100", O2_AUDIT_ORG="envorg", O2_AUDIT_ENABLED="false")
    config = load(env, batch_size=200, org="kworg", enabled=True, endpoint="file:///tmp/k.jsonl")
    assert config.batch_size == 200
    assert config.org == "kworg"
    assert config.enabled is True
    assert config.endpoint == "file:///tmp/k.jsonl"


def test_a_valid_keyword_hides_an_invalid_environment_value() -> None:
    config = load(http(O2_AUDIT_BATCH_SIZE="abc"), batch_size=5)
    assert config.batch_size == 5


def test_none_keyword_falls_back_to_the_environment() -> None:
    config = load(http(O2_AUDIT_BATCH_SIZE="9"), batch_size=None)
    assert config.batch_size == 9


@pytest.mark.parametrize(
    ("keyword", "value"),
    [
        ("enabled", "perhaps"),
        ("batch_size", "abc"),
        ("publish_interval", 0),
        ("endpoint", "gopher://x"),
        ("endpoint", "file://host/x"),
        ("org", "bad org"),
        ("timeout", -1),
        ("max_queue_size", 0),
        ("exclude_routes", "no-slash"),
        ("required", "sometimes"),
    ],
)
def test_keyword_overrides_are_validated(keyword: str, value: Any) -> None:
    message = error_for(http(), **{keyword: value})
    assert keyword in message


def test_keyword_endpoint_normalised_like_the_environment() -> None:
    assert load(http(), endpoint="https://o2.example.com/p/").endpoint == "https://o2.example.com/p"


def test_keyword_endpoint_with_credentials_not_echoed() -> None:
    message = error_for(http(), endpoint=f"https://bob:{ENDPOINT_SECRET}@o2.example.com")
    assert "endpoint" in message
    assert ENDPOINT_SECRET not in message


def test_unknown_keywords_raise_type_error() -> None:
    with pytest.raises(TypeError, match="batchsize"):
        O2AuditConfig.from_env({}, batchsize=5)
    with pytest.raises(TypeError, match="O2_AUDIT_BATCH_SIZE"):
        O2AuditConfig.from_env({}, O2_AUDIT_BATCH_SIZE=5)


def test_unknown_environment_variables_are_ignored() -> None:
    assert load(file_(O2_AUDIT_SOMETHING_NEW="x", OTHER="y")).batch_size == 500


# -------------------------------------------------------------------------- every problem in one error


def test_one_error_lists_every_invalid_variable() -> None:
    env = {
        "O2_AUDIT_ENABLED": "maybe",
        "O2_AUDIT_BATCH_SIZE": "abc",
        "O2_AUDIT_PUBLISH_INTERVAL": "-5",
        "O2_AUDIT_ENDPOINT": "gopher://o2",
        "O2_AUDIT_ORG": "bad org",
        "O2_AUDIT_STREAM": "bad/stream",
        "O2_AUDIT_TIMEOUT": "nan",
        "O2_AUDIT_EXCLUDE_ROUTES": "healthz",
        "O2_AUDIT_INGESTION_ROUTES": "/a/**/b",
        "O2_AUDIT_REQUIRED": "perhaps",
        "O2_AUDIT_PASSWORD": PASSWORD,
    }
    message = error_for(env)
    for name in env:
        if name != "O2_AUDIT_PASSWORD":
            assert name in message, name
    assert PASSWORD not in message
    assert message.count("\n  - ") == len(env) - 1


def test_one_error_also_lists_cross_checks_next_to_value_errors() -> None:
    # A user fixing the batch size must not learn only on the next start that credentials are missing.
    env = {"O2_AUDIT_ENDPOINT": "http://o2.example.com:5080", "O2_AUDIT_BATCH_SIZE": "abc"}
    message = error_for(env)
    assert "O2_AUDIT_BATCH_SIZE" in message
    assert "O2_AUDIT_USER" in message
    assert "O2_AUDIT_PASSWORD" in message


def test_one_error_lists_cross_checks_together() -> None:
    env = {"O2_AUDIT_ENDPOINT": "http://o2:5080", "O2_AUDIT_BATCH_SIZE": "20000"}
    message = error_for(env)
    assert "O2_AUDIT_USER" in message
    assert "O2_AUDIT_PASSWORD" in message
    assert "O2_AUDIT_MAX_QUEUE_SIZE" in message


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


def test_require_endpoint_false_accepts_no_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENV_VARS.values():
        monkeypatch.delenv(name, raising=False)
    config = O2AuditConfig.from_env(require_endpoint=False)
    assert config.endpoint is None
    assert config.enabled is False
