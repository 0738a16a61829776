"""The error model: one list of reasons, one status table, no transport in the domain."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from clipstore.errors import ClipstoreError, Kind, NotFound, PermissionDenied, Reason
from clipstore.servicers.status import STATUS_BY_KIND, reason_table_markdown, status_code

REPO = Path(__file__).resolve().parent.parent
SOURCES = [p for top in ("clipstore", "kms") for p in (REPO / top).rglob("*.py") if "/v1/" not in str(p)]


def test_readme_error_table_is_generated_from_the_reason_list() -> None:
    readme = (REPO / "README.md").read_text()
    assert reason_table_markdown() in readme, \
        "README error table is stale: run python -m clipstore.servicers.status README.md"


def test_every_reason_literal_in_the_code_is_a_listed_reason() -> None:
    literals = {m for p in SOURCES for m in re.findall(r'reason\s*=\s*"([A-Z][A-Z_]+)"', p.read_text())}
    assert literals, "the scan found no reasons at all"
    assert literals <= set(Reason), f"unlisted reasons: {sorted(literals - set(Reason))}"


def test_every_kind_has_exactly_one_status() -> None:
    assert set(STATUS_BY_KIND) == set(Kind)
    assert status_code(PermissionDenied("x", reason="GRANT_EXPIRED")) is grpc.StatusCode.PERMISSION_DENIED


def test_an_unknown_or_misfiled_reason_fails_where_it_is_raised() -> None:
    with pytest.raises(ValueError, match="unknown reason"):
        NotFound("x", reason="NO_SUCH_REASON")
    with pytest.raises(ValueError, match="BAD_CODE is NOT_AUTHENTICATED"):
        NotFound("x", reason="BAD_CODE")


def test_reasons_are_plain_strings_on_the_wire() -> None:
    error = ClipstoreError("x")
    assert error.reason == "INTERNAL" and str(Reason.GRANT_REPLAYED) == "GRANT_REPLAYED"


@pytest.mark.parametrize("module", ["clipstore.errors", "clipstore.grants", "clipstore.envelope",
                                    "clipstore.identity", "clipstore.totp", "clipstore.review", "clipstore.clips",
                                    "clipstore.principals", "clipstore.enrolment", "clipstore.spiffe",
                                    "clipstore.accounts", "clipstore.audit", "kms", "auditlog"])
def test_domain_and_crypto_modules_do_not_load_grpc(module: str) -> None:
    code = f"import sys, {module}; sys.exit(1 if any(m == 'grpc' or m.startswith('grpc.') for m in sys.modules) else 0)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0, f"{module} imports grpc"
