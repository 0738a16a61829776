"""Boundary checks and conversions shared by the servicers."""

from __future__ import annotations

import base64
import binascii
import contextlib
import re

from google.protobuf.timestamp_pb2 import Timestamp

from clipstore.clock import MAX_INSTANT, MAX_TIMESTAMP_S, clamp_instant
from clipstore.errors import InvalidArgument

LOCALE_RE = re.compile(r"^[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8}){0,3}\Z")  # \Z: "$" also matches before a final newline
MAX_ID_CHARS = 256
MAX_SHORT_CHARS = 64
MAX_PAGE = 1000
DEFAULT_PAGE = 100


def text(field: str, value: str, *, max_chars: int, required: bool) -> str:
    """A printable string of bounded length; the error names the field."""
    if required and not value:
        raise InvalidArgument(field, "is required")
    if len(value) > max_chars:
        raise InvalidArgument(field, f"at most {max_chars} characters, got {len(value)}")
    if not value.isprintable():  # every character (str's own loop: a generator took ~20 us for a 300-character grant)
        raise InvalidArgument(field, "must not contain control characters")
    return value


def required_id(field: str, value: str) -> str:
    """A server-issued id the caller sends back (assignment, escalation, review clip)."""
    return text(field, value, max_chars=MAX_SHORT_CHARS, required=True)


def optional_instant(field: str, has: bool, value: Timestamp) -> float | None:
    """A Timestamp field as seconds, or None when unset. The wire does not enforce Timestamp's range:
    past year 9999 (or nanos outside [0, 1e9)) the value would fail later, in rfc3339, as INTERNAL. The
    last millisecond of year 9999 is kept as 23:59:59.999 (see MAX_INSTANT): as a float it rounded up
    into year 10000 and failed the same way, after the clip or principal carrying it was committed."""
    if not has:
        return None
    if not 0 <= value.seconds <= MAX_TIMESTAMP_S or not 0 <= value.nanos < 1_000_000_000:
        raise InvalidArgument(field, "must be a time from 1970 to 9999 (nanos in [0, 999999999])")
    return min(value.ToNanoseconds() / 1e9, MAX_INSTANT)


def timestamp(seconds: float) -> Timestamp:
    """A stored time as a Timestamp; one stored out of its range (before the boundary checked it) is
    shown clamped to the range (`clamp_instant`) rather than failing the call."""
    ts = Timestamp()
    ts.FromNanoseconds(int(clamp_instant(seconds) * 1e9))
    return ts


def page_limit(page_size: int) -> int:
    if page_size > MAX_PAGE:
        raise InvalidArgument("page_size", f"at most {MAX_PAGE}, got {page_size}")
    return page_size or DEFAULT_PAGE


def page_after(page_token: str) -> str:
    """The last id of the previous page, from an opaque token this service issued. Only a token
    `next_token` could have written passes: the id then reaches a query as a bound value, and a
    forged one (a NUL byte, megabytes) must be the caller's INVALID_ARGUMENT, not a database error."""
    if not page_token:
        return ""
    after: str | None = None
    if len(page_token) <= 4 * MAX_ID_CHARS:
        with contextlib.suppress(binascii.Error, UnicodeDecodeError):
            after = base64.urlsafe_b64decode(page_token.encode()).decode()
    if after is None or not after.isprintable() or next_token([after], 1) != page_token:
        raise InvalidArgument("page_token", "not a token this service issued; start without one")
    return after


def next_token(ids: list[str], limit: int) -> str:
    return base64.urlsafe_b64encode(ids[-1].encode()).decode() if len(ids) == limit else ""
