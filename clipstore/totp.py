"""RFC 6238 TOTP for reviewer MFA (SHA-1, 6 digits, 30 s), via `cryptography`."""

from __future__ import annotations

import base64
import secrets

from cryptography.hazmat.primitives.hashes import SHA1
from cryptography.hazmat.primitives.twofactor import InvalidToken
from cryptography.hazmat.primitives.twofactor.totp import TOTP

TOTP_DIGITS = 6
TOTP_STEP_S = 30
TOTP_DRIFT_STEPS = 1  # accept the previous and the next step too
SECRET_BYTES = 20  # 160 bits, as RFC 4226 recommends


def new_secret() -> bytes:
    return secrets.token_bytes(SECRET_BYTES)


def secret_base32(secret: bytes) -> str:
    return base64.b32encode(secret).decode().rstrip("=")


def _totp(secret: bytes, digits: int) -> TOTP:
    return TOTP(secret, digits, SHA1(), TOTP_STEP_S, enforce_key_length=False)  # noqa: S303 (RFC 6238 default)


def provisioning_uri(secret: bytes, *, account_name: str, issuer: str = "clipstore") -> str:
    return _totp(secret, TOTP_DIGITS).get_provisioning_uri(account_name, issuer)


def code_at(secret: bytes, t: float, *, digits: int = TOTP_DIGITS) -> str:
    return _totp(secret, digits).generate(t).decode()


def matching_step(secret: bytes, code: str, *, now: float, digits: int = TOTP_DIGITS) -> int | None:
    """The time step (±drift around `now`) whose code equals `code`, compared in constant time."""
    if len(code) != digits or not code.isascii() or not code.isdigit():
        return None
    totp, current, found = _totp(secret, digits), int(now // TOTP_STEP_S), None
    for step in range(current - TOTP_DRIFT_STEPS, current + TOTP_DRIFT_STEPS + 1):
        try:  # check every step, so timing does not tell which one matched
            totp.verify(code.encode(), step * TOTP_STEP_S)
            found = step
        except InvalidToken:
            pass
    return found
