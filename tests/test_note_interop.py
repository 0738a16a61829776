"""Our signed-note and checkpoint parsers against answers produced by Go's golang.org/x/mod/sumdb
(tests/vectors/golang-sumdb-note-interop/SOURCE.txt): accept what Go accepts, reject what it rejects."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from auditlog.checkpoint import Checkpoint
from auditlog.errors import CheckpointError

VECTORS = json.loads((Path(__file__).parent / "vectors" / "golang-sumdb-note-interop" / "vectors.json").read_text())
ROOT_LINE = base64.b64encode(bytes(32)).decode()


@pytest.mark.parametrize("case", VECTORS["tree_size_lines"], ids=lambda c: repr(c["size_line"]))
def test_tree_size_line_is_read_as_go_reads_it(case: dict[str, Any]) -> None:
    """Only ASCII decimal without leading zeros: before, '²' raised ValueError (not CheckpointError) and
    '١٢' (Arabic-Indic digits) was read as 12."""
    body = f"example.com/log\n{case['size_line']}\n{ROOT_LINE}\n"
    if case["go_ok"]:
        assert Checkpoint.parse(body).size == int(case["size_line"])
    else:
        with pytest.raises(CheckpointError, match="line 2"):
            Checkpoint.parse(body)
