"""From where: client_ip is the socket peer unless that peer is a trusted proxy (issue 4, item 2).

Unit tests of the rule, then real applications (FastAPI + contrib instrumentation + our ASGI middleware,
Flask + OpenTelemetry's WSGI middleware + ours) with forged and legitimate forwarding headers, then uvicorn
subprocesses with its real proxy-header defaults and with ``--no-proxy-headers``.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

import pytest
from apps_trust.harness import Audit
from apps_trust.servers import Servers

from otel_o2audit.proxies import MAX_HEADER_CHARS, MAX_HOPS, parse_address, resolve_client_ip

TRUSTED = tuple(ipaddress.ip_network(n) for n in ("10.0.0.0/8", "192.168.1.1", "2001:db8:ffff::/48"))


# ------------------------------------------------------------------------------------------ the rule
@pytest.mark.parametrize(
    ("peer", "forwarded", "expected"),
    [
        # No forwarding header: the peer, trusted or not.
        ("203.0.113.7", None, "203.0.113.7"),
        ("10.0.0.1", None, "10.0.0.1"),
        # An untrusted peer's header is ignored, whatever it says.
        ("203.0.113.7", "1.1.1.1", "203.0.113.7"),
        ("203.0.113.7", "10.0.0.5, 1.1.1.1", "203.0.113.7"),
        # A trusted peer: the right-most untrusted address.
        ("10.0.0.1", "198.51.100.9", "198.51.100.9"),
        ("10.0.0.1", "6.6.6.6, 198.51.100.9", "198.51.100.9"),  # the left entry is the caller's forgery
        ("10.0.0.1", "6.6.6.6, 198.51.100.9, 10.9.9.9", "198.51.100.9"),  # through two trusted proxies
        ("10.0.0.1", "6.6.6.6,198.51.100.9 ,  192.168.1.1", "198.51.100.9"),
        # Every hop trusted: the left-most.
        ("10.0.0.1", "10.1.1.1, 10.2.2.2", "10.1.1.1"),
        # Ports and brackets.
        ("10.0.0.1", "198.51.100.9:4711", "198.51.100.9"),
        ("10.0.0.1", "[2001:db8::7]:443", "2001:db8::7"),
        ("10.0.0.1", "[2001:db8::7]", "2001:db8::7"),
        ("10.0.0.1", "2001:db8::7", "2001:db8::7"),
        ("10.0.0.1", "2001:DB8:0:0::7", "2001:db8::7"),  # canonical form
        # IPv6 peers and IPv4-mapped addresses.
        ("2001:db8:ffff::1", "198.51.100.9", "198.51.100.9"),
        ("::ffff:10.0.0.1", "198.51.100.9", "198.51.100.9"),
        ("10.0.0.1", "::ffff:198.51.100.9", "198.51.100.9"),
        ("::ffff:203.0.113.7", "198.51.100.9", "203.0.113.7"),
        # Garbage stops the walk at the nearest verified hop; a caller never gets its value recorded.
        ("10.0.0.1", "not-an-ip", "10.0.0.1"),
        ("10.0.0.1", "unknown", "10.0.0.1"),
        ("10.0.0.1", "198.51.100.9, garbage", "10.0.0.1"),
        ("10.0.0.1", "garbage, 10.2.2.2", "10.2.2.2"),
        ("10.0.0.1", "6.6.6.6, , 10.2.2.2", "10.2.2.2"),  # an empty entry is garbage too
        ("10.0.0.1", "6.6.6.6, 10.2.2.2,", "10.0.0.1"),
        ("10.0.0.1", "", "10.0.0.1"),
        ("10.0.0.1", "1.2.3.4:port", "10.0.0.1"),
        ("10.0.0.1", "[2001:db8::7", "10.0.0.1"),
        ("10.0.0.1", "[2001:db8::7]x", "10.0.0.1"),
        ("10.0.0.1", "010.1.2.3", "10.0.0.1"),  # leading zeros are ambiguous: not an address
        ("10.0.0.1", "198.51.100.9\r\nX-Injected: 1", "10.0.0.1"),
        ("10.0.0.1", "1.2.3.4\x00", "10.0.0.1"),
        # A peer that is not an IP address (unix socket, test client) is stored as given, cleaned.
        ("testclient", "1.1.1.1", "testclient"),
        ("evil\r\nhost", None, "evil host"),
    ],
)
def test_resolve_client_ip(peer: str, forwarded: Optional[str], expected: str) -> None:
    assert resolve_client_ip(peer, forwarded, TRUSTED) == expected


def test_without_trusted_proxies_the_header_never_counts() -> None:
    assert resolve_client_ip("10.0.0.1", "198.51.100.9", ()) == "10.0.0.1"
    assert resolve_client_ip("127.0.0.1", "198.51.100.9", ()) == "127.0.0.1"


def test_no_peer() -> None:
    assert resolve_client_ip(None, "198.51.100.9", TRUSTED) is None


def test_hop_limit() -> None:
    # More trusted hops than examined: the walk stops at the last examined one (never beyond).
    hops = [f"10.0.{i // 250}.{i % 250 + 1}" for i in range(MAX_HOPS + 10)]
    forwarded = ", ".join(["6.6.6.6", *hops])
    assert resolve_client_ip("10.0.0.1", forwarded, TRUSTED) == hops[-MAX_HOPS]


def test_huge_header_is_read_from_the_right_only() -> None:
    # A forged left part of any length does not matter; the right-most untrusted entry still wins.
    forwarded = "1.2.3.4, " * (MAX_HEADER_CHARS // 4) + "198.51.100.9, 10.0.0.2"
    assert len(forwarded) > MAX_HEADER_CHARS
    assert resolve_client_ip("10.0.0.1", forwarded, TRUSTED) == "198.51.100.9"
    # The cut entry at the left edge of the window is never read as an address.
    cut = "2001:db8::1234" + ", 10.0.0.2" * (MAX_HEADER_CHARS // 10)
    assert resolve_client_ip("10.0.0.1", cut, TRUSTED).startswith("10.")


@pytest.mark.parametrize("text", ["1.2.3.4", "1.2.3.4:80", "[::1]:80", "::1", "[::1]"])
def test_parse_address_accepts(text: str) -> None:
    assert parse_address(text) is not None


@pytest.mark.parametrize("text", ["", " ", "x", "1.2.3", "1.2.3.4:", "1.2.3.4:99999999", "[::1]:x", "::1:80:",
                                  "1.2.3.4:٨٠", "a" * 100])
def test_parse_address_rejects(text: str) -> None:
    assert parse_address(text) is None


# ------------------------------------------------------------------------------------------ real apps
@pytest.fixture
def audit(tmp_path: Path) -> Iterator[Audit]:
    audit = Audit(tmp_path, trusted_proxies="10.0.0.0/8, 2001:db8:ffff::/48")
    yield audit
    audit.close()


def _fastapi_client_ip(audit: Audit, peer: str, headers: Dict[str, str]) -> Dict[str, Any]:
    client = audit.fastapi_client(peer=peer)
    assert client.get("/api/acme/whoami", headers=headers).status_code == 200
    return audit.one()


def test_fastapi_forged_header_from_an_untrusted_peer_changes_nothing(audit: Audit) -> None:
    record = _fastapi_client_ip(audit, "203.0.113.66", {"X-Forwarded-For": "10.0.0.5, 198.51.100.1"})
    assert record["client_ip"] == "203.0.113.66"


def test_fastapi_trusted_proxy(audit: Audit) -> None:
    record = _fastapi_client_ip(audit, "10.1.1.1", {"X-Forwarded-For": "6.6.6.6, 198.51.100.9, 10.2.2.2"})
    assert record["client_ip"] == "198.51.100.9"


def test_fastapi_several_forwarding_headers_are_one_list(audit: Audit) -> None:
    client = audit.fastapi_client(peer="10.1.1.1")
    # Two header lines: the later one was appended by the nearer proxy.
    response = client.get("/api/acme/whoami", headers=[("X-Forwarded-For", "198.51.100.9"),
                                                       ("X-Forwarded-For", "10.3.3.3")])
    assert response.status_code == 200
    assert audit.one()["client_ip"] == "198.51.100.9"


def test_fastapi_trusted_ipv6_proxy(audit: Audit) -> None:
    record = _fastapi_client_ip(audit, "2001:db8:ffff::2", {"X-Forwarded-For": "[2001:db8:1::9]:5555"})
    assert record["client_ip"] == "2001:db8:1::9"


def test_fastapi_garbage_from_a_trusted_proxy(audit: Audit) -> None:
    record = _fastapi_client_ip(audit, "10.1.1.1", {"X-Forwarded-For": "<script>, 10.2.2.2"})
    assert record["client_ip"] == "10.2.2.2"


def test_fastapi_without_trusted_proxies_the_peer(tmp_path: Path) -> None:
    audit = Audit(tmp_path)
    try:
        record = _fastapi_client_ip(audit, "10.1.1.1", {"X-Forwarded-For": "198.51.100.9"})
        assert record["client_ip"] == "10.1.1.1"
    finally:
        audit.close()


def test_user_agent_is_capped_at_one_kib(audit: Audit) -> None:
    record = _fastapi_client_ip(audit, "203.0.113.1", {"User-Agent": "agent/" + "x" * 5000})
    assert record["user_agent"] == ("agent/" + "x" * 5000)[:1024]


def test_flask_client_ip(audit: Audit) -> None:
    client = audit.flask_client()
    forged = client.get("/api/acme/whoami", headers={"X-Forwarded-For": "10.0.0.5"},
                        environ_base={"REMOTE_ADDR": "203.0.113.66"}, buffered=True)
    assert forged.status_code == 200
    assert audit.one()["client_ip"] == "203.0.113.66"
    proxied = client.get("/api/acme/whoami", headers={"X-Forwarded-For": "6.6.6.6, 198.51.100.9"},
                         environ_base={"REMOTE_ADDR": "10.9.9.9"}, buffered=True)
    assert proxied.status_code == 200
    assert audit.one()["client_ip"] == "198.51.100.9"


# ------------------------------------------------------------------------------------------ uvicorn
@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Servers]:
    servers = Servers(tmp_path)
    yield servers
    servers.cleanup()


@pytest.mark.parametrize(
    ("flags", "trusted", "expected_client", "expected_user"),
    [
        # uvicorn's defaults (--proxy-headers, --forwarded-allow-ips 127.0.0.1): uvicorn rewrites the ASGI client
        # from X-Forwarded-For before any middleware runs; without trusted proxies we record what it chose.
        ((), "", "198.51.100.9", ""),
        # Same, with 127.0.0.1 trusted by us: the peer we see is already 198.51.100.9 (untrusted), so the client
        # is right and the identity header is NOT honoured (the request looks direct).
        ((), "127.0.0.1", "198.51.100.9", ""),
        # --no-proxy-headers: the socket peer; forwarding headers are ours to judge.
        (("--no-proxy-headers",), "", "127.0.0.1", ""),
        (("--no-proxy-headers",), "127.0.0.1", "198.51.100.9", "dana@example.com"),
    ],
)
def test_uvicorn_proxy_headers(servers: Servers, flags: Sequence[str], trusted: str, expected_client: str,
                               expected_user: str) -> None:
    env = {"O2_AUDIT_USER_HEADER": "X-Forwarded-Email"}
    if trusted:
        env["O2_AUDIT_TRUSTED_PROXIES"] = trusted
    server = servers.patched(*flags, **env)
    response = server.request("GET", "/api/acme/whoami",
                              headers={"X-Forwarded-For": "6.6.6.6, 198.51.100.9",
                                       "X-Forwarded-Email": "dana@example.com"})
    assert response.status_code == 200, server.tail()
    records = server.wait_records(1)
    assert records[0]["client_ip"] == expected_client, server.tail()
    assert records[0]["user_email"] == expected_user


def test_uvicorn_default_rewrite_takes_garbage_verbatim(servers: Servers) -> None:
    # What uvicorn's own rewrite does with a garbage entry from a 127.0.0.1 peer (documented in the README):
    # it becomes the ASGI client, and without trusted proxies of ours that is what the record says. With
    # --no-proxy-headers and 127.0.0.1 trusted, our rule stops at the garbage and records the proxy.
    server = servers.patched()
    server.request("GET", "/api/acme/whoami", headers={"X-Forwarded-For": "not-an-ip"})
    ours = servers.patched("--no-proxy-headers", O2_AUDIT_TRUSTED_PROXIES="127.0.0.1")
    ours.request("GET", "/api/acme/whoami", headers={"X-Forwarded-For": "not-an-ip"})
    assert server.wait_records(1)[0]["client_ip"] == "not-an-ip"
    assert ours.wait_records(1)[0]["client_ip"] == "127.0.0.1"


def test_records_carry_no_forged_value_when_nothing_is_trusted(servers: Servers) -> None:
    server = servers.patched("--no-proxy-headers")
    lines: List[str] = ["1.2.3.4", "10.0.0.1, 2.2.2.2", "garbage"]
    for line in lines:
        assert server.request("GET", "/api/acme/whoami", headers={"X-Forwarded-For": line}).status_code == 200
    assert {r["client_ip"] for r in server.wait_records(len(lines))} == {"127.0.0.1"}
