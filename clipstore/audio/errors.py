"""Errors of the audio package (no numpy needed to import them)."""

from __future__ import annotations


class UnsupportedAudio(Exception):
    """The plaintext is not audio the fetch boundary can decode (or re-encode) as its content type says.
    The message names formats only, never audio content."""


class AudioTooLong(UnsupportedAudio):
    """The clip decodes (or its header says it would decode) to more audio than its declared duration or
    its stored size allows: a decode bomb, or a wrong duration_ms at ingest. Refused before the excess is
    decoded, so a small upload cannot buy a fetch's whole stream time in CPU."""
