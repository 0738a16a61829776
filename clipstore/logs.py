"""structlog JSON logging. Callers log ids, codes and durations, never secrets;
the `redact_secrets` processor is a second line of defence for known keys."""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

# Event keys whose values must never reach a log line.
SECRET_KEYS = frozenset({
    "authorization", "api_key", "key", "token", "session_token", "grant", "totp_code", "code",
    "secret", "totp_secret", "password", "account_id", "device_serial", "audio",
})


def redact_secrets(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in SECRET_KEYS.intersection(event):
        event[key] = "[redacted]"
    return event


def configure_logging(stream: TextIO | None = None, level: int = logging.INFO) -> None:
    """JSON lines to `stream` (stderr by default)."""
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact_secrets,
            structlog.processors.JSONRenderer(sort_keys=True),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stderr),
        cache_logger_on_first_use=False,
    )


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
