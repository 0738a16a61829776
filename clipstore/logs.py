"""structlog JSON logging. Callers log ids, codes and durations, never secrets;
the `redact_secrets` processor is a second line of defence for known keys."""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import MutableMapping
from typing import Any, TextIO, cast

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


LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
_handler: logging.Handler | None = None  # ours on the root logger, replaced on reconfiguration


def _exception_summary(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """A stdlib record's exception as its type and innermost place: an exception's message or a
    traceback's values can carry what a log must not (a DSN, a key), so neither is written."""
    exc_info = event.pop("exc_info", None)
    if exc_info and isinstance(exc_info, tuple) and exc_info[0] is not None:
        event["exc_type"] = exc_info[0].__name__
        tb = exc_info[2]
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        if tb is not None:
            event["exc_at"] = f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}"
    return event


class _CurrentStderr:
    """Whatever `sys.stderr` is when a line is written, not when logging was configured: a process
    (or a test harness) that replaces stderr later must not leave the logger on a closed stream."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure_logging(stream: TextIO | None = None, level: int | str = logging.INFO) -> None:
    """JSON lines to `stream` (stderr by default) at `level` (a name in LEVELS or a logging level).

    The standard library's loggers (gRPC's Python layer, botocore, SQLAlchemy, `warnings`) are
    rendered by the same processors, so nothing but JSON reaches the stream; they are held at
    WARNING or above whatever `level` says, because botocore logs request bodies (key material)
    at DEBUG."""
    global _handler
    level = LEVELS[level] if isinstance(level, str) else level
    stream = stream or cast(TextIO, _CurrentStderr())
    stamp = structlog.processors.TimeStamper(fmt="iso", utc=True)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            stamp,
            redact_secrets,
            structlog.processors.JSONRenderer(sort_keys=True),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_log_level, structlog.stdlib.add_logger_name, stamp,
                           structlog.stdlib.ExtraAdder()],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, _exception_summary, redact_secrets,
                    structlog.processors.JSONRenderer(sort_keys=True)]))
    handler.setLevel(max(level, logging.WARNING))  # also for loggers that set their own level (werkzeug)
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
    root.addHandler(handler)
    root.setLevel(max(level, logging.WARNING))
    _handler = handler
    logging.captureWarnings(True)


def route_uncaught_exceptions() -> None:
    """An exception nobody caught, in any thread, becomes one JSON line (type and place), not a traceback;
    so does one Python could not raise (in a destructor, or a C library's callback: `unraisable_exception`)."""
    log = get_logger("clipstore")

    def summary(exc_type: type[BaseException], exc: BaseException | None, tb: Any) -> dict[str, Any]:
        event: dict[str, Any] = {"exc_info": (exc_type, exc, tb)}
        _exception_summary(None, "", event)
        return event

    sys.excepthook = lambda t, e, tb: log.critical("uncaught_exception", thread="main", **summary(t, e, tb))
    threading.excepthook = lambda a: log.critical("uncaught_exception", thread=a.thread.name if a.thread else "?",
                                                  **summary(a.exc_type, a.exc_value, a.exc_traceback))
    sys.unraisablehook = lambda u: log.error("unraisable_exception",
                                             **summary(u.exc_type, u.exc_value, u.exc_traceback))


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
