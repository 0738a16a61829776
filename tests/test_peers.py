"""Peer pseudonyms: an anonymous denial summary names a caller by a keyed pseudonym, never by its address."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from clipstore.denials import MAX_PEERS_PER_INTERVAL, OTHER_PEERS, DenialLedger
from clipstore.errors import Unauthenticated
from clipstore.peers import PeerPseudonyms, canonical_address, peer_address, peer_pseudonym
from clipstore.unit import AuditRecord

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
PSEUDONYM = re.compile(r"^pp_[0-9a-f]{20}$")


@pytest.mark.parametrize(("given_as", "host"), [
    ("ipv4:203.0.113.7:53122", "203.0.113.7"),  # gRPC's peer string
    ("ipv4:203.0.113.7", "203.0.113.7"),
    ("203.0.113.7", "203.0.113.7"),
    ("203.0.113.7:443", "203.0.113.7"),
    (" 203.0.113.7\n", "203.0.113.7"),
    ("ipv6:%5B2001:db8::1%5D:53122", "2001:db8::1"),  # gRPC percent-encodes an IPv6 peer's brackets
    ("ipv6:[2001:db8::1]:53122", "2001:db8::1"),
    ("ipv6:[2001:db8::1]", "2001:db8::1"),
    ("[2001:DB8:0:0::1]:443", "2001:db8::1"),
    ("2001:0db8:0000:0000:0000:0000:0000:0001", "2001:db8::1"),
    ("::1", "::1"),
    ("ipv6:[::ffff:203.0.113.7]:1", "203.0.113.7"),  # v4-mapped: gRPC reports it as ipv4
    ("::ffff:203.0.113.7", "203.0.113.7"),
    ("ipv6:%5Bfe80::1%25eth0%5D:5", "fe80::1%eth0"),
])
def test_every_form_of_an_address_names_the_host_grpc_reports_without_its_port(given_as: str, host: str) -> None:
    assert canonical_address(given_as) == host
    assert PeerPseudonyms(KEY).of(given_as) == peer_pseudonym(KEY, host)


@pytest.mark.parametrize("text", ["", "localhost", "example.org", "203.0.113", "ipv4:999.1.1.1", "ipv6:[nope]",
                                  "unix:/run/clipstore.sock"])
def test_what_is_no_ip_address_is_refused_naming_it(text: str) -> None:
    with pytest.raises(ValueError, match="not an IPv4 or IPv6 address"):
        canonical_address(text)


def test_a_peer_that_is_no_ip_address_is_pseudonymised_whole() -> None:
    assert peer_address("unix:/run/clipstore.sock") == "unix:/run/clipstore.sock"
    assert PSEUDONYM.match(PeerPseudonyms(KEY).of("unix:/run/clipstore.sock"))


def test_the_pseudonym_is_the_specified_hmac_with_its_domain_separator() -> None:
    """A format-stability vector: a changed input or encoding would break correlation across releases."""
    mac = hmac.new(KEY, b"clipstore peer pseudonym v1\x00203.0.113.7", hashlib.sha256).hexdigest()
    assert peer_pseudonym(KEY, "203.0.113.7") == "pp_" + mac[:20] == "pp_d60dc51e69318f401ca5"


def test_one_address_has_one_pseudonym_across_ports_and_forms_and_no_other_address_shares_it() -> None:
    peers = PeerPseudonyms(KEY)
    one = {peers.of(p) for p in ("ipv4:203.0.113.7:1", "ipv4:203.0.113.7:65535", "203.0.113.7", "::ffff:203.0.113.7")}
    assert len(one) == 1
    [pseudonym] = one
    assert PSEUDONYM.match(pseudonym)
    others = {peers.of(f"ipv4:203.0.113.{i}:1") for i in range(256)}
    assert len(others) == 256


def test_another_deployments_key_gives_an_unrelated_pseudonym() -> None:
    assert PeerPseudonyms(KEY).of("203.0.113.7") != PeerPseudonyms(OTHER_KEY).of("203.0.113.7")


def test_the_key_never_shows_in_a_repr_and_a_short_key_is_refused() -> None:
    assert repr(PeerPseudonyms(KEY)) == "PeerPseudonyms(<key hidden>)"
    with pytest.raises(ValueError, match="key"):
        PeerPseudonyms(b"short")


@given(st.ip_addresses(), st.integers(min_value=0, max_value=65535))
def test_grpc_peer_strings_and_typed_addresses_meet_in_one_canonical_form(
        address: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> None:
    if isinstance(address, ipaddress.IPv6Address):
        grpc_peer = f"ipv6:%5B{address}%5D:{port}"
        typed = [address.exploded, f"[{address}]", f"ipv6:[{address.exploded.upper()}]"]
    else:
        grpc_peer = f"ipv4:{address}:{port}"
        typed = [str(address), f"ipv4:{address}", f"{address}:{port}"]
    host = canonical_address(grpc_peer)
    assert all(canonical_address(t) == host for t in typed)
    assert canonical_address(host) == host  # idempotent: the CLI's answer is the server's


# -- the ledger -----------------------------------------------------------------------------------------------


class _Log:
    def __init__(self) -> None:
        self.records: list[AuditRecord] = []

    def append(self, record: AuditRecord) -> None:
        self.records.append(record)


def _refuse(ledger: DenialLedger, peer: str, reason: str = "INVALID_CREDENTIALS") -> None:
    ledger.record(peer=peer, principal=None, error=Unauthenticated("no", reason=reason), request_id="r")


def test_an_anonymous_summary_names_each_host_by_its_pseudonym_and_never_its_address() -> None:
    log, peers = _Log(), PeerPseudonyms(KEY)
    ledger = DenialLedger(log, pseudonym=peers.of, interval_s=3600, per_principal=10)  # type: ignore[arg-type]
    for port in range(3):
        _refuse(ledger, f"ipv4:203.0.113.7:{40000 + port}")
    _refuse(ledger, "ipv6:%5B2001:db8::1%5D:40000", "MISSING_CREDENTIALS")
    _refuse(ledger, "ipv6:%5B2001:db8::1%5D:40001", "MISSING_CREDENTIALS")  # another connection, the same host
    assert ledger.flush() == 2
    assert sorted(r.reason for r in log.records) == sorted([
        f"count=3 peer={peers.of('203.0.113.7')} INVALID_CREDENTIALS=3",
        f"count=2 peer={peers.of('2001:db8::1')} MISSING_CREDENTIALS=2"])
    text = repr(log.records)
    assert "203.0.113" not in text and "2001:db8" not in text and "ipv" not in text


def test_past_the_peer_limit_the_rest_share_the_other_entry() -> None:
    log = _Log()
    ledger = DenialLedger(log, pseudonym=PeerPseudonyms(KEY).of, interval_s=3600,  # type: ignore[arg-type]
                          per_principal=10)
    for i in range(MAX_PEERS_PER_INTERVAL + 5):
        _refuse(ledger, f"ipv4:10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}:5000")
    assert ledger.flush() == MAX_PEERS_PER_INTERVAL + 1
    other = [r.reason for r in log.records if f"peer={OTHER_PEERS} " in r.reason]
    assert other == ["count=5 peer=other INVALID_CREDENTIALS=5"]
    assert all(re.search(r"peer=(pp_[0-9a-f]{20}|other) ", r.reason) for r in log.records)
