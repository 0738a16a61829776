"""Logs are JSON lines only, from our code and from the libraries', at the configured level."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from collections.abc import Iterator

import pytest

from clipstore.config import ConfigError, load_config
from clipstore.logs import configure_logging, get_logger


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    out = io.StringIO()
    yield out
    configure_logging()


def _events(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_library_log_records_and_warnings_are_json_lines_too() -> None:
    script = ("import logging, warnings\n"
              "from clipstore.logs import configure_logging\n"
              "configure_logging()\n"
              "logging.getLogger('grpc._server').error('Exception calling application: %s', 'GetClip')\n"
              "warnings.warn('an old API', DeprecationWarning, stacklevel=1)\n")
    done = subprocess.run([sys.executable, "-W", "always", "-c", script], capture_output=True, text=True,
                          timeout=60, check=True)
    grpc_line, warning_line = (json.loads(line) for line in done.stderr.splitlines())
    assert grpc_line["logger"] == "grpc._server" and grpc_line["level"] == "error"
    assert warning_line["logger"] == "py.warnings" and "an old API" in str(warning_line["event"])


def test_an_exception_python_cannot_raise_is_one_json_line_by_type_and_place() -> None:
    """A destructor's exception (or one inside a C library's callback) would print a traceback, message and
    all: `clipstore serve` routes it to the JSON log like an uncaught one."""
    script = ("from clipstore.logs import configure_logging, route_uncaught_exceptions\n"
              "configure_logging()\n"
              "route_uncaught_exceptions()\n"
              "class Leaky:\n"
              "    def __del__(self):\n"
              "        raise ConnectionError('postgresql://svc:hunter2@db refused')\n"
              "Leaky()\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    [line] = [json.loads(line) for line in done.stderr.splitlines()]
    assert line["event"] == "unraisable_exception" and line["exc_type"] == "ConnectionError"
    assert "hunter2" not in done.stderr


def test_an_exception_in_a_library_record_is_logged_by_type_and_place_never_by_message(
        stream: io.StringIO) -> None:
    configure_logging(stream)
    try:
        raise ConnectionError("postgresql://svc:hunter2@db/clipstore refused")
    except ConnectionError:
        logging.getLogger("sqlalchemy.pool").exception("connection failed")
    [event] = _events(stream)
    assert event["exc_type"] == "ConnectionError" and "test_logs.py:" in str(event["exc_at"])
    assert "hunter2" not in stream.getvalue()


def test_the_log_level_holds_back_lower_lines_and_library_debug_never_appears(stream: io.StringIO) -> None:
    configure_logging(stream, "warning")
    get_logger("clipstore.test").info("rpc")
    get_logger("clipstore.test").warning("dependency.down")
    configure_logging(stream, "debug")
    get_logger("clipstore.test").debug("probe")
    logging.getLogger("botocore.endpoint").debug("Making request with body: CiphertextBlob=…")
    assert [e["event"] for e in _events(stream)] == ["dependency.down", "probe"]


def test_log_level_is_a_setting_and_a_typo_names_it() -> None:
    assert load_config(env={"CLIPSTORE_LOG_LEVEL": "WARNING"}).log_level == "warning"
    with pytest.raises(ConfigError, match="log.level"):
        load_config(env={"CLIPSTORE_LOG_LEVEL": "verbose"})
