"""Peer pseudonyms: a caller's network address never reaches the audit log or a log line.

An IP address is personal data (a reviewer working from home has their home's), and the audit log
is permanent and published. Where a refusal must name who made it but no credential does, the
address is replaced by `pp_` + the first `PEER_PSEUDONYM_CHARS` hex digits of

    HMAC-SHA256(peer pseudonym key, "clipstore peer pseudonym v1" ‖ 0x00 ‖ address)

where `address` is the host's canonical text without a port (`203.0.113.7`, `2001:db8::1`; an
IPv4-mapped IPv6 address as its IPv4 form, as gRPC reports it). The key is random per deployment,
kept wrapped by the KMS root: one host has one pseudonym across intervals, replicas and restarts, so
a repeated offender correlates, and without the key a pseudonym cannot be linked to an address.
Whoever holds the database and the root can check a suspected address:
`clipstore audit peer-pseudonym 203.0.113.7`.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
from urllib.parse import unquote

PEER_PSEUDONYM_KEY_NAME = "peer-pseudonym-hmac"
PEER_PSEUDONYM_CHARS = 20  # 80 bits of the HMAC: no two hosts of one deployment's callers share one
PEER_PSEUDONYM_PREFIX = "pp_"
_DOMAIN = b"clipstore peer pseudonym v1\x00"
_SCHEME = re.compile(r"^ipv[46]:", re.IGNORECASE)
_BRACKETED = re.compile(r"^\[([^\]]+)\](?::\d+)?$")  # [addr] or [addr]:port
_IPV4_WITH_PORT = re.compile(r"^([0-9.]+):\d+$")


def canonical_address(text: str) -> str:
    """The host of a gRPC peer string or a typed address, as gRPC reports it, without a port.

    Takes `ipv4:203.0.113.7:53122`, `ipv4:203.0.113.7`, `203.0.113.7`, `ipv6:%5B2001:db8::1%5D:53122`
    (gRPC percent-encodes the brackets), `ipv6:[2001:db8::1]`, `[2001:DB8::1]:443` and `2001:db8::1`;
    `ValueError` if what remains is no IP address."""
    host = unquote(_SCHEME.sub("", text.strip(), count=1))
    if (bracketed := _BRACKETED.match(host)) is not None:
        host = bracketed.group(1)
    elif (with_port := _IPV4_WITH_PORT.match(host)) is not None:
        host = with_port.group(1)
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"not an IPv4 or IPv6 address: {text!r}") from None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)  # gRPC reports a v4-mapped peer of a dual-stack listener as ipv4
    return str(address)


def peer_address(peer: str) -> str:
    """gRPC's peer string without the ephemeral port, as `canonical_address` (so one host is one peer);
    a peer that is no IP address (a Unix socket) as given."""
    try:
        return canonical_address(peer)
    except ValueError:
        return peer


def peer_pseudonym(key: bytes, address: str) -> str:
    """`pp_` + 20 hex digits: stable for one address under one key, unlinkable to it without the key."""
    mac = hmac.digest(key, _DOMAIN + address.encode("utf-8"), hashlib.sha256)
    return PEER_PSEUDONYM_PREFIX + mac.hex()[:PEER_PSEUDONYM_CHARS]


class PeerPseudonyms:
    """The deployment's peer pseudonyms, under its service key (`PEER_PSEUDONYM_KEY_NAME`)."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError(f"key: a peer pseudonym key has at least 16 bytes, got {len(key)}")
        self._key = key

    def __repr__(self) -> str:
        return "PeerPseudonyms(<key hidden>)"

    def of(self, peer: str) -> str:
        """The pseudonym of a gRPC peer string or an address in any form `canonical_address` takes."""
        return peer_pseudonym(self._key, peer_address(peer))
