"""SPIFFE ids that name principals: `spiffe://<trust domain>/<role>/<name>`.

A client certificate carries one as its single SAN URI (an X.509-SVID); the
server maps it to the principal row enrolled under exactly that id, so a
disabled or expired principal is refused whether it shows a key or a
certificate. The trust domain is configured (`auth.trust_domain`); an id from
any other trust domain names nobody here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cryptography import x509

# SPIFFE-ID spec §2.1 (trust domain) and §2.2 (path segments), narrowed to what a name needs.
_ID_RE = re.compile(r"^spiffe://(?P<td>[a-z0-9._-]{1,255})/(?P<role>[a-z]+)/(?P<name>[A-Za-z0-9._-]{1,64})$")


@dataclass(frozen=True, kw_only=True)
class SpiffeId:
    trust_domain: str
    role: str
    name: str

    def __str__(self) -> str:
        return f"spiffe://{self.trust_domain}/{self.role}/{self.name}"


def parse_spiffe_id(uri: str) -> SpiffeId | None:
    """The id `uri` spells, or None when it is not of the form `spiffe://<trust domain>/<role>/<name>`.
    (An id with a role nobody has is well-formed; it simply names no principal.)"""
    match = _ID_RE.match(uri)
    if match is None:
        return None
    return SpiffeId(trust_domain=match["td"], role=match["role"], name=match["name"])


def spiffe_ids(cert: x509.Certificate) -> list[str]:
    """Every SAN URI of the certificate that claims to be a SPIFFE id (well-formed or not)."""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [uri for uri in sans.get_values_for_type(x509.UniformResourceIdentifier) if uri.startswith("spiffe://")]
