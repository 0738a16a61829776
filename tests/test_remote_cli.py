"""The CLI against a remote server: admin and audit commands over the API, no database or KMS, keys never in argv."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from clipstore.auth import create_principal
from clipstore.server import ClipstoreServer, running_server
from clipstore.tls import write_dev_certs
from clipstore.v1 import audit_pb2, audit_pb2_grpc
from tests.conftest import bearer, make_config, new_key


def _fields(line: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in line.split())


class Cli:
    """`python -m clipstore` in a fresh HOME: no data dir, no root key, no database to fall back on."""

    def __init__(self, home: Path, server: str, **env: str) -> None:
        self.home, self.server = home, server
        base = {k: v for k, v in os.environ.items() if not k.startswith(("CLIPSTORE_", "XDG_"))}
        self.env = {**base, "HOME": str(home), "CLIPSTORE_SERVER": server, **env}

    def __call__(self, *args: str, stdin: str = "", **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "clipstore", *args], env={**self.env, **env}, input=stdin,
                              capture_output=True, text=True, timeout=60)

    def ok(self, *args: str, **env: str) -> list[dict[str, str]]:
        result = self(*args, **env)
        assert result.returncode == 0, result.stderr
        return [_fields(line) for line in result.stdout.splitlines()]


@pytest.fixture
def srv(tmp_path: Path, log_stream: io.StringIO) -> Iterator[ClipstoreServer]:
    with running_server(make_config(tmp_path / "server-data")) as server:
        yield server


@pytest.fixture
def cli(tmp_path: Path, srv: ClipstoreServer) -> Iterator[Cli]:
    home = tmp_path / "home"
    home.mkdir()
    yield Cli(home, f"127.0.0.1:{srv.port}", CLIPSTORE_API_KEY=new_key(srv.app, "admin", "root"))
    assert not (home / ".local").exists(), "an admin command touched a local data dir"


def _works(server: ClipstoreServer, key: str) -> bool:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        try:
            audit_pb2_grpc.AuditServiceStub(channel).GetCheckpoint(audit_pb2.GetCheckpointRequest(),
                                                                    metadata=bearer(key), timeout=10)
        except grpc.RpcError:
            return False
    return True


def test_principal_lifecycle_from_the_cli_over_the_api(srv: ClipstoreServer, cli: Cli) -> None:
    [created, key_line] = cli.ok("principals", "create", "--server", cli.server, "--role", "auditor",
                                 "--name", "secteam")
    pid, key = created["principal_id"], key_line["api_key"]
    assert created["role"] == "auditor" and _works(srv, key)
    listed = cli.ok("principals", "list", "--role", "auditor")
    assert [p["principal_id"] for p in listed] == [pid] and listed[0]["usable_keys"] == "1"
    [rotated, retire] = cli.ok("principals", "rotate-key", pid, "--overlap-s", "0")
    assert not _works(srv, key) and _works(srv, rotated["api_key"]) and "previous_keys_retire_at" in retire
    assert cli.ok("principals", "disable", pid)[0]["disabled"] == "true"
    assert not _works(srv, rotated["api_key"])
    assert cli.ok("principals", "enable", pid)[0]["disabled"] == "false"
    assert cli.ok("principals", "set-expiry", pid, "--expires-at", "2000-01-01T00:00:00Z")[0]["expires_at"] \
        == "2000-01-01T00:00:00Z"
    assert not _works(srv, rotated["api_key"])
    assert cli.ok("principals", "set-expiry", pid, "--never")[0]["expires_at"] == "never"
    assert _works(srv, rotated["api_key"])
    entries = [json.loads(e) for e in srv.app.audit.reader.entries(0, 1000)]
    assert {"principal.create", "principal.key_rotate", "principal.disable", "principal.enable",
            "principal.expiry"} <= {e["action"] for e in entries if e["target"]["principal_id"] == pid}


def test_reviewer_enrolment_from_the_cli_the_admin_sees_only_a_code(srv: ClipstoreServer, cli: Cli) -> None:
    result = cli("reviewers", "create", "--name", "Jane Doe", "--locale", "en-US")
    assert result.returncode == 0, result.stderr
    [offer] = [_fields(line) for line in result.stdout.splitlines()]
    assert set(offer) == {"reviewer_id", "enrolment_code", "expires_at"}
    redeemed = cli("reviewers", "redeem", "--reviewer-id", offer["reviewer_id"], stdin=offer["enrolment_code"] + "\n",
                   CLIPSTORE_API_KEY="")  # the reviewer has no credential but the code
    assert redeemed.returncode == 0, redeemed.stderr
    factors = {k: v for line in redeemed.stdout.splitlines() for k, v in [line.split("=", 1)]}
    assert set(factors) == {"api_key", "totp_secret", "provisioning_uri"}
    assert "# the factors above are yours alone and are shown only once: store them now" in redeemed.stderr
    assert all(v not in result.stdout + result.stderr for v in factors.values())
    again = cli("reviewers", "redeem", "--reviewer-id", offer["reviewer_id"], CLIPSTORE_API_KEY="",
                CLIPSTORE_ENROLMENT_CODE=offer["enrolment_code"])
    assert again.returncode == 1 and "UNAUTHENTICATED ENROLMENT_CODE_USED" in again.stderr
    [rotation] = cli.ok("reviewers", "issue-code", offer["reviewer_id"], "--purpose", "rotate-totp")
    assert rotation["enrolment_code"] != offer["enrolment_code"]


def test_the_api_key_never_comes_from_argv(srv: ClipstoreServer, cli: Cli, tmp_path: Path) -> None:
    key = cli.env["CLIPSTORE_API_KEY"]
    refused = cli("principals", "list", "--api-key", key)
    assert refused.returncode == 2 and "unrecognized arguments" in refused.stderr
    key_file = tmp_path / "admin.key"
    key_file.write_text(key + "\n")
    key_file.chmod(0o644)
    loose = cli("principals", "list", "--api-key-file", str(key_file), CLIPSTORE_API_KEY="")
    assert loose.returncode == 2 and "chmod 600" in loose.stderr
    key_file.chmod(0o600)
    assert cli.ok("principals", "list", "--api-key-file", str(key_file), CLIPSTORE_API_KEY="")
    none = cli("principals", "list", CLIPSTORE_API_KEY="")
    assert none.returncode == 2 and "CLIPSTORE_API_KEY" in none.stderr


def test_credentials_never_cross_the_network_in_clear(cli: Cli) -> None:
    result = cli("principals", "list", "--server", "192.0.2.10:50051")
    assert result.returncode == 2 and "not a loopback address: use TLS" in result.stderr


def test_a_refusal_is_reported_with_its_status(cli: Cli) -> None:
    result = cli("principals", "disable", "p_nobody")
    assert result.returncode == 1 and "NOT_FOUND PRINCIPAL_NOT_FOUND" in result.stderr


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    out = tmp_path / "certs"
    write_dev_certs(out, [("secteam", "auditor"), ("root", "admin")])
    return out


@pytest.fixture
def tls_srv(tmp_path: Path, certs: Path, log_stream: io.StringIO) -> Iterator[ClipstoreServer]:
    config = make_config(tmp_path / "tls-data", **{"tls.cert_file": str(certs / "server.pem"),
                                                   "tls.key_file": str(certs / "server.key"),
                                                   "tls.client_ca_file": str(certs / "ca.pem")})
    with running_server(config) as server:
        for role, name in (("auditor", "secteam"), ("admin", "root")):
            create_principal(server.app.principals, server.app.audit, role=role, name=name,
                             spiffe_id=f"spiffe://clipstore/{role}/{name}")
        yield server


def test_audit_verify_against_an_mtls_server(tls_srv: ClipstoreServer, certs: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    cli = Cli(home, f"localhost:{tls_srv.port}")
    vkey = tls_srv.app.audit.signer.verifier.key_string()
    tls = ("--ca-file", str(certs / "ca.pem"), "--client-cert", str(certs / "client-secteam.pem"),
           "--client-key", str(certs / "client-secteam.key"))
    result = cli("audit", "verify", *tls, "--key", vkey)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("OK size=")
    exported = cli("audit", "export", *tls, "--server", cli.server, "--out", str(tmp_path / "x"))
    assert exported.returncode == 0, exported.stderr
    assert (tmp_path / "x" / "entries.jsonl").read_bytes()
    wrong = cli("audit", "verify", "--ca-file", str(certs / "ca.pem"), "--client-cert",
                str(certs / "client-root.pem"), "--client-key", str(certs / "client-root.key"), "--key", vkey)
    assert wrong.returncode == 2 and "PERMISSION_DENIED WRONG_ROLE" in wrong.stderr  # an admin is not an auditor
    admin_tls = ("--ca-file", str(certs / "ca.pem"), "--client-cert", str(certs / "client-root.pem"),
                 "--client-key", str(certs / "client-root.key"))
    assert cli.ok("principals", "list", *admin_tls)  # admin commands under mTLS need no key at all
    assert not (home / ".local").exists()


def test_local_bootstrap_creates_the_first_admin_by_spiffe_id(tmp_path: Path) -> None:
    cli = Cli(tmp_path, "127.0.0.1:1")
    [created] = cli.ok("principals", "create", "--role", "admin", "--name", "root", "--spiffe-id",
                       "spiffe://clipstore/admin/root", "--data-dir", str(tmp_path / "d"))
    assert created["spiffe_id"] == "spiffe://clipstore/admin/root" and "api_key" not in created
    wrong = cli("principals", "create", "--role", "admin", "--name", "x", "--spiffe-id",
                "spiffe://elsewhere/admin/x", "--data-dir", str(tmp_path / "d"))
    assert wrong.returncode == 1 and "trust domain" in wrong.stderr
