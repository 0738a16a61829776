"""mTLS: the principal and role come from a verified client certificate."""

from __future__ import annotations

import datetime as dt
import io
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from clipstore.config import Config
from clipstore.server import ClipstoreServer, running_server
from clipstore.tls import Issuer, cert_pem, client_sans, issue, key_pem, load_issuer, new_ca, write_dev_certs
from clipstore.v1 import clip_pb2, clip_pb2_grpc
from tests.conftest import make_config
from tests.grpc_helpers import error_info


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    out = tmp_path / "certs"
    write_dev_certs(out, [("asr", "ingest"), ("alice", "reviewer")])
    return out


@pytest.fixture
def tls_server(tmp_path: Path, certs: Path, log_stream: io.StringIO) -> Iterator[ClipstoreServer]:
    config: Config = make_config(tmp_path / "data", **{"tls.cert_file": str(certs / "server.pem"),
                                                       "tls.key_file": str(certs / "server.key"),
                                                       "tls.client_ca_file": str(certs / "ca.pem")})
    with running_server(config) as srv:
        yield srv


def _channel(server: ClipstoreServer, certs: Path, key: bytes | None = None, chain: bytes | None = None
             ) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(root_certificates=(certs / "ca.pem").read_bytes(), private_key=key,
                                         certificate_chain=chain)
    return grpc.secure_channel(f"localhost:{server.port}", creds)


def _list(channel: grpc.Channel) -> clip_pb2.ListClipsResponse:
    return clip_pb2_grpc.ClipServiceStub(channel).ListClips(clip_pb2.ListClipsRequest(account_id="acct-1"),
                                                            timeout=10)


def _as(cert_dir: Path, stem: str) -> tuple[bytes, bytes]:
    return (cert_dir / f"{stem}.key").read_bytes(), (cert_dir / f"{stem}.pem").read_bytes()


def _issuer_files(pair: Issuer) -> tuple[bytes, bytes]:
    return key_pem(pair.key), cert_pem(pair.cert)


def test_a_valid_client_certificate_authenticates_with_its_role(tls_server: ClipstoreServer, certs: Path) -> None:
    with _channel(tls_server, certs, *_as(certs, "client-asr")) as channel:
        assert list(_list(channel).clips) == []
    denials = [e for e in tls_server.app.audit.reader.entries(0, 100) if b"auth.deny" in e]
    assert denials == []


def test_no_client_certificate_is_refused(tls_server: ClipstoreServer, certs: Path) -> None:
    with _channel(tls_server, certs) as channel, pytest.raises(grpc.RpcError) as caught:
        _list(channel)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_certificate_from_another_ca_is_refused(tls_server: ClipstoreServer, certs: Path) -> None:
    stranger = issue(new_ca("someone else's CA"), common_name="asr", server=False, sans=client_sans("ingest", "asr"))
    with _channel(tls_server, certs, *_issuer_files(stranger)) as channel, pytest.raises(grpc.RpcError) as caught:
        _list(channel)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_an_expired_certificate_is_refused(tls_server: ClipstoreServer, certs: Path) -> None:
    ca = load_issuer(certs / "ca.pem", certs / "ca.key")
    now = dt.datetime.now(dt.UTC)
    expired = issue(ca, common_name="asr", server=False, sans=client_sans("ingest", "asr"),
                    not_before=now - dt.timedelta(days=30), not_after=now - dt.timedelta(days=1))
    with _channel(tls_server, certs, *_issuer_files(expired)) as channel, pytest.raises(grpc.RpcError) as caught:
        _list(channel)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_wrong_role_certificate_is_permission_denied_and_audited(tls_server: ClipstoreServer,
                                                                   certs: Path) -> None:
    with _channel(tls_server, certs, *_as(certs, "client-alice")) as channel, \
            pytest.raises(grpc.RpcError) as caught:
        _list(channel)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_info(caught.value).reason == "WRONG_ROLE"
    assert any(b'"auth.deny"' in e and b"cert:alice" in e for e in tls_server.app.audit.reader.entries(0, 100))


def test_a_certificate_naming_no_principal_is_unauthenticated(tls_server: ClipstoreServer, certs: Path) -> None:
    ca = load_issuer(certs / "ca.pem", certs / "ca.key")
    anonymous = issue(ca, common_name="nobody", server=False, sans=[x509.DNSName("nobody.example")])
    with _channel(tls_server, certs, *_issuer_files(anonymous)) as channel, pytest.raises(grpc.RpcError) as caught:
        _list(channel)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_info(caught.value).reason == "CERT_WITHOUT_PRINCIPAL"


def test_non_loopback_bind_is_allowed_only_with_tls(tmp_path: Path, certs: Path) -> None:
    from clipstore.config import ConfigError
    from clipstore.server import _credentials
    with pytest.raises(ConfigError, match="not a loopback address"):
        _credentials(make_config(tmp_path, listen="0.0.0.0:0"))
    assert _credentials(make_config(tmp_path, listen="0.0.0.0:0", **{
        "tls.cert_file": str(certs / "server.pem"), "tls.key_file": str(certs / "server.key")})) is not None
