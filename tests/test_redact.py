"""Redaction of sensitive query values (audit-record.md, "Sensitive values")."""

from __future__ import annotations

import pytest

from otel_o2audit.config import O2AuditConfig
from otel_o2audit.redact import DEFAULT_SENSITIVE_NAMES, REDACTED, Redactor

R = Redactor()


def test_redacted_marker_is_exact() -> None:
    assert REDACTED == "[REDACTED]"


@pytest.mark.parametrize(
    "word",
    [
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
    ],
)
def test_default_list_covers_the_documented_words(word: str) -> None:
    assert word in DEFAULT_SENSITIVE_NAMES
    assert R.is_sensitive(word)
    assert R.is_sensitive(word.upper())
    assert R.is_sensitive(f"my_{word}_value")  # also as part of a longer name


@pytest.mark.parametrize(
    "name",
    [
        # must be redacted (audit-record.md)
        "access_token",
        "X-Api-Key",
        "clientSecret",
        "Password",
        "refresh-token",
        # more spellings of the same ideas
        "api-key",
        "apiKey",
        "API_KEY",
        "x.api.key",
        "private-key",
        "privateKey",
        "client_secret",
        "sessionid",
        "JSESSIONID",
        "set-cookie",
        "X-Amz-Signature",
        "db_passwd",
        "pass_word",
        "user-pwd",
        "credentials",
        "id_token",
        # auth family: redacted
        "auth",
        "Auth",
        "authorization",
        "Authorization",
        "authorize",
        "authorise",
        "oauth_token",
        "oauth",
        "authentication",
        "auth_code",
        "basic-auth",
    ],
)
def test_sensitive_names(name: str) -> None:
    assert R.is_sensitive(name)
    assert R.redact_query(f"{name}=s3cr3t&page=2") == f"{name}=[REDACTED]&page=2"


@pytest.mark.parametrize(
    "name",
    [
        # must NOT be redacted (audit-record.md)
        "page",
        "sort",
        "designer",
        "monkey",
        # documented decision: 'author' is a filter, not a credential
        "author",
        "Author",
        "authors",
        "author_id",
        "authorId",
        "co-author",
        # ordinary parameters
        "q",
        "limit",
        "offset",
        "org",
        "stream",
        "start_time",
        "key",
        "passenger",
        "sign",
    ],
)
def test_non_sensitive_names(name: str) -> None:
    assert not R.is_sensitive(name)
    query = f"{name}=visible&page=2"
    assert R.redact_query(query) == query


def test_documented_example() -> None:
    assert R.redact_query("token=abc&page=2") == "token=[REDACTED]&page=2"


def test_query_without_sensitive_names_is_returned_unchanged() -> None:
    query = "page=2&sort=desc&designer=ann&monkey=george&author=alice"
    assert R.redact_query(query) == query


def test_empty_query() -> None:
    assert R.redact_query("") == ""


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        # percent-encoded names are decoded for the comparison, the raw name is kept
        ("access%5Ftoken=abc&page=2", "access%5Ftoken=[REDACTED]&page=2"),
        ("%61uth=abc", "%61uth=[REDACTED]"),
        ("pass%77ord=abc", "pass%77ord=[REDACTED]"),
        ("X%2DApi%2DKey=abc", "X%2DApi%2DKey=[REDACTED]"),
        # '+' in names is a space
        ("api+key=abc&page=2", "api+key=[REDACTED]&page=2"),
        ("client+secret=abc", "client+secret=[REDACTED]"),
        # repeated keys are all redacted
        ("token=a&token=b&page=1&token=c", "token=[REDACTED]&token=[REDACTED]&page=1&token=[REDACTED]"),
        # a key without '=' has no value to hide
        ("token&page=2", "token&page=2"),
        ("debug&token=abc", "debug&token=[REDACTED]"),
        # empty values: a sensitive one is still marked, an ordinary one stays empty
        ("token=&page=", "token=[REDACTED]&page="),
        # values containing '=' are replaced whole
        ("token=a=b==&page=2", "token=[REDACTED]&page=2"),
        ("filter=a=b", "filter=a=b"),
        # percent-encoded values are replaced whole
        ("token=a%26b%3Dc&page=2", "token=[REDACTED]&page=2"),
        # empty parts are preserved
        ("a=1&&token=x&", "a=1&&token=[REDACTED]&"),
        # case of the name is kept
        ("PASSWORD=hunter2", "PASSWORD=[REDACTED]"),
    ],
)
def test_redact_query_forms(query: str, expected: str) -> None:
    assert R.redact_query(query) == expected


def test_redacted_value_never_survives() -> None:
    secret = "Zq9-very-distinctive-secret"
    query = f"page=1&access_token={secret}&X-Api-Key={secret}&clientSecret={secret}&sort=asc"
    out = R.redact_query(query)
    assert secret not in out
    assert out == "page=1&access_token=[REDACTED]&X-Api-Key=[REDACTED]&clientSecret=[REDACTED]&sort=asc"


def test_is_sensitive_accepts_percent_encoded_names() -> None:
    assert R.is_sensitive("access%5Ftoken")
    assert R.is_sensitive("x%2Dapi%2Dkey")
    assert not R.is_sensitive("page%5Fsize")


def test_extra_names_via_constructor() -> None:
    r = Redactor((*DEFAULT_SENSITIVE_NAMES, "ssn", "national-id"))
    assert r.redact_query("ssn=123&nationalId=9&token=t&page=1") == (
        "ssn=[REDACTED]&nationalId=[REDACTED]&token=[REDACTED]&page=1"
    )


def test_constructor_names_replace_the_defaults() -> None:
    r = Redactor(["ssn"])
    assert r.names == ("ssn",)
    assert r.is_sensitive("my_ssn")
    assert not r.is_sensitive("token")


def test_empty_redactor_redacts_nothing() -> None:
    r = Redactor(())
    assert r.redact_query("token=abc&password=x") == "token=abc&password=x"
    assert not r.is_sensitive("password")


def test_names_are_stripped_and_deduplicated() -> None:
    r = Redactor([" ssn ", "ssn", "", "  "])
    assert r.names == ("ssn",)


def test_user_supplied_auth_keeps_the_author_exception() -> None:
    r = Redactor(["AUTH"])
    assert r.is_sensitive("authorization")
    assert not r.is_sensitive("author")


def test_regex_metacharacters_in_extra_names_are_literal() -> None:
    r = Redactor(["a(b)*"])
    assert r.is_sensitive("xa(b)*y")
    assert not r.is_sensitive("ab")
    assert not r.is_sensitive("abbb")


def test_config_redact_extends_the_default_list() -> None:
    config = O2AuditConfig.from_env({"O2_AUDIT_REDACT": "ssn, iban"}, require_endpoint=False)
    redactor = config.redactor()
    assert redactor.redact_query("ssn=1&iban=DE00&token=t&page=2") == (
        "ssn=[REDACTED]&iban=[REDACTED]&token=[REDACTED]&page=2"
    )


def test_repr_does_not_list_names() -> None:
    assert repr(Redactor(["ssn"])) == "Redactor(1 names)"
