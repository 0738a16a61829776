"""Errors of the audio package (no numpy needed to import them)."""

from __future__ import annotations


class UnsupportedAudio(Exception):
    """The plaintext is not audio the fetch boundary can decode (or re-encode) as its content type says.
    The message names formats only, never audio content."""
