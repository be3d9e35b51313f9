"""The caller's address behind proxies: ``O2_AUDIT_TRUSTED_PROXIES`` and ``X-Forwarded-For``.

The rule (:func:`resolve_client_ip`):

* without trusted proxies, or when the socket peer is not one of them, the client is the socket peer and
  ``X-Forwarded-For`` is ignored: any caller can write that header;
* when the peer is a trusted proxy, ``X-Forwarded-For`` is walked from the right (each proxy appends the
  address it received the request from): the first address that is not a trusted proxy is the client;
  when every address is trusted, the left-most one is;
* an entry that is not an IP address (``unknown``, a host name, garbage, an empty entry) stops the walk:
  only a proxy we trust could have written that position, and a trusted proxy writes the address it saw,
  so the entry was not written by one. The client is then the nearest hop we could verify: the trusted
  proxy that forwarded the request (the socket peer, or the last trusted address before the garbage).
  A caller can never get a value of its choosing recorded this way;
* at most :data:`MAX_HOPS` entries and the last :data:`MAX_HEADER_CHARS` characters of the header are
  examined; beyond that the walk stops as it does for garbage.

Entries may carry a port (``203.0.113.7:4711``, ``[2001:db8::1]:443``) or brackets; IPv4-mapped IPv6
addresses (``::ffff:10.0.0.1``) count as their IPv4 address. Addresses are reported in their canonical
text form.

uvicorn (and gunicorn's ``UvicornWorker``) rewrite the ASGI ``client`` from ``X-Forwarded-For`` BEFORE any
middleware runs when the peer is in their ``--forwarded-allow-ips`` (default ``127.0.0.1``): the "socket
peer" seen here is then already the address uvicorn picked, and this rule applies on top of it.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Optional, Sequence, Union

__all__ = ["MAX_HEADER_CHARS", "MAX_HOPS", "Network", "clean_peer", "is_trusted", "parse_address", "peer_is_trusted",
           "resolve_client_ip"]

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

#: How many ``X-Forwarded-For`` entries are examined, from the right.
MAX_HOPS = 32
#: How much of the ``X-Forwarded-For`` header is examined, from the right.
MAX_HEADER_CHARS = 4096
#: A peer that is not an IP address (a unix socket path, ``testclient``) is stored cleaned and capped.
_MAX_PEER_CHARS = 256

_PORT = re.compile(r"[0-9]{1,5}")
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def parse_address(text: str) -> Optional[Address]:
    """The IP address in a peer or ``X-Forwarded-For`` entry, or None when it is not one.

    Accepts a bare address, ``IPv4:port``, ``[IPv6]`` and ``[IPv6]:port``; maps IPv4-mapped IPv6 to IPv4.
    """
    text = text.strip()
    if not text or len(text) > 64:
        return None
    if text.startswith("["):
        end = text.find("]")
        if end == -1:
            return None
        rest = text[end + 1 :]
        if rest and not (rest.startswith(":") and _PORT.fullmatch(rest[1:])):
            return None
        text = text[1:end]
    elif text.count(":") == 1:
        host, port = text.split(":")
        if not _PORT.fullmatch(port):
            return None
        text = host
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def is_trusted(address: Address, trusted: Sequence[Network]) -> bool:
    """True when ``address`` lies in one of the ``trusted`` networks."""
    return any(address in network for network in trusted)


def peer_is_trusted(peer: Optional[str], trusted: Sequence[Network]) -> bool:
    """True when the socket peer ``peer`` is an IP address inside ``trusted``."""
    if not peer or not trusted:
        return False
    address = parse_address(peer)
    return address is not None and is_trusted(address, trusted)


def clean_peer(peer: str) -> str:
    """A peer that is not an IP address, made safe to store (one line, capped)."""
    if _UNSAFE.search(peer):
        peer = " ".join(_UNSAFE.sub(" ", peer).split())
    return peer[:_MAX_PEER_CHARS]


def resolve_client_ip(peer: Optional[str], forwarded_for: Optional[str], trusted: Sequence[Network]) -> Optional[str]:
    """The client address of a request whose socket peer is ``peer`` (see the module docstring).

    ``forwarded_for`` is the ``X-Forwarded-For`` value (several occurrences joined by ``,``), or None.
    Returns None only when ``peer`` is None.
    """
    if peer is None:
        return None
    peer_address = parse_address(peer)
    if peer_address is None:
        return clean_peer(peer)
    current = str(peer_address)
    if not trusted or not forwarded_for or not is_trusted(peer_address, trusted):
        return current
    text = forwarded_for
    if len(text) > MAX_HEADER_CHARS:
        # Keep the right-most part; its first entry may be cut in half, so it goes too.
        text = text[-MAX_HEADER_CHARS:].partition(",")[2]
    for hops, entry in enumerate(reversed(text.split(","))):
        if hops >= MAX_HOPS:
            break
        address = parse_address(entry)
        if address is None:
            break  # not written by a trusted proxy: keep the nearest verified hop
        current = str(address)
        if not is_trusted(address, trusted):
            return current
    return current
