"""mTLS: a verified client certificate names a principal row by its SPIFFE id; CRL and server
certificate reload on SIGHUP without a restart or a dropped call."""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clipstore.auth import create_principal
from clipstore.config import Config
from clipstore.server import ClipstoreServer, running_server
from clipstore.tls import Issuer, cert_pem, client_sans, issue, key_pem, load_issuer, new_ca, revoke, write_dev_certs
from clipstore.v1 import clip_pb2, clip_pb2_grpc
from tests.clip_helpers import metadata, put_requests, trailer
from tests.conftest import FakeClock, make_config
from tests.grpc_helpers import error_info


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    out = tmp_path / "certs"
    write_dev_certs(out, [("asr", "ingest"), ("asr2", "ingest"), ("alice", "reviewer"), ("bob", "ingest")])
    ca = load_issuer(out / "ca.pem", out / "ca.key")
    (out / "crl.pem").write_bytes(revoke(ca, []))
    return out


def _tls_config(tmp_path: Path, certs: Path, **overrides: object) -> Config:
    return make_config(tmp_path / "data", **{"tls.cert_file": str(certs / "server.pem"),
                                             "tls.key_file": str(certs / "server.key"),
                                             "tls.client_ca_file": str(certs / "ca.pem"),
                                             "tls.crl_file": str(certs / "crl.pem"), **overrides})


def _enrol(server: ClipstoreServer, role: str, name: str, trust_domain: str = "clipstore") -> str:
    principal, key = create_principal(server.app.principals, server.app.audit, role=role, name=name,
                                      spiffe_id=f"spiffe://{trust_domain}/{role}/{name}")
    assert key is None  # a certificate principal has no API key
    return principal.id


@pytest.fixture
def tls_server(tmp_path: Path, certs: Path, clock: FakeClock, log_stream: io.StringIO
               ) -> Iterator[ClipstoreServer]:
    with running_server(_tls_config(tmp_path, certs), clock=clock) as srv:
        yield srv


def _channel(server: ClipstoreServer, roots: bytes, key: bytes | None = None, chain: bytes | None = None
             ) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(root_certificates=roots, private_key=key, certificate_chain=chain)
    # A local subchannel pool: every channel makes its own connection (and TLS handshake).
    return grpc.secure_channel(f"localhost:{server.port}", creds, options=[("grpc.use_local_subchannel_pool", 1)])


def _as(server: ClipstoreServer, certs: Path, stem: str | None) -> grpc.Channel:
    pair = ((certs / f"{stem}.key").read_bytes(), (certs / f"{stem}.pem").read_bytes()) if stem else (None, None)
    return _channel(server, (certs / "ca.pem").read_bytes(), *pair)


def _with(server: ClipstoreServer, certs: Path, pair: Issuer) -> grpc.Channel:
    return _channel(server, (certs / "ca.pem").read_bytes(), key_pem(pair.key), cert_pem(pair.cert))


def _list(channel: grpc.Channel) -> clip_pb2.ListClipsResponse:
    return clip_pb2_grpc.ClipServiceStub(channel).ListClips(clip_pb2.ListClipsRequest(account_id="acct-1"),
                                                            timeout=10)


def _refused(channel: grpc.Channel) -> grpc.RpcError:
    with channel, pytest.raises(grpc.RpcError) as caught:
        _list(channel)
    return caught.value


def _denials(server: ClipstoreServer) -> list[dict]:
    return [e for e in map(json.loads, server.app.audit.reader.entries(0, 10_000)) if e["action"] == "auth.deny"]


def _refused_and_audited(server: ClipstoreServer, err: grpc.RpcError, reason: str, principal_id: str = "") -> None:
    """A refusal naming a principal is its own entry; one naming no principal is counted into the peer's
    `auth.deny_summary` (written every audit.denial_summary_s; flushed here)."""
    assert (err.code(), error_info(err).reason) == (grpc.StatusCode.UNAUTHENTICATED, reason), err.details()
    if not principal_id:
        server.denials.flush()
        summaries = [e for e in map(json.loads, server.app.audit.reader.entries(0, 10_000))
                     if e["action"] == "auth.deny_summary"]
        assert summaries[-1]["outcome"]["reason"] == \
            f"count=1 peer={server.app.peer_pseudonyms.of('127.0.0.1')} {reason}=1"
        return
    last = _denials(server)[-1]
    assert last["outcome"] == {"result": "denied", "reason": reason}
    assert last["target"]["principal_id"] == principal_id


def test_a_client_certificate_acts_as_the_principal_enrolled_under_its_spiffe_id(
        tls_server: ClipstoreServer, certs: Path) -> None:
    pid = _enrol(tls_server, "ingest", "asr")
    with _as(tls_server, certs, "client-asr") as channel:
        clip_pb2_grpc.ClipServiceStub(channel).PutClip(put_requests(metadata(), b"a" * 100), timeout=10)
    assert _denials(tls_server) == []
    entries = list(map(json.loads, tls_server.app.audit.reader.entries(0, 100)))
    assert [e["actor"] for e in entries if e["action"] == "clip.ingest"] == [{"id": pid, "role": "ingest"}]


def test_a_certificate_whose_spiffe_id_is_not_enrolled_is_refused_and_audited(
        tls_server: ClipstoreServer, certs: Path) -> None:
    _refused_and_audited(tls_server, _refused(_as(tls_server, certs, "client-bob")), "UNKNOWN_SPIFFE_ID")


def test_a_certificate_from_another_trust_domain_is_refused_and_audited(
        tls_server: ClipstoreServer, certs: Path) -> None:
    _enrol(tls_server, "ingest", "asr")
    ca = load_issuer(certs / "ca.pem", certs / "ca.key")
    foreign = issue(ca, common_name="asr", server=False, sans=client_sans("ingest", "asr", "other.example"))
    _refused_and_audited(tls_server, _refused(_with(tls_server, certs, foreign)), "WRONG_TRUST_DOMAIN")


def test_a_disabled_certificate_principal_is_refused_and_audited(tls_server: ClipstoreServer, certs: Path) -> None:
    pid = _enrol(tls_server, "ingest", "asr")
    tls_server.app.principals.set_disabled(pid, True)
    _refused_and_audited(tls_server, _refused(_as(tls_server, certs, "client-asr")), "PRINCIPAL_DISABLED", pid)


def test_an_expired_certificate_principal_is_refused_and_audited(tls_server: ClipstoreServer, certs: Path,
                                                                 clock: FakeClock) -> None:
    pid = _enrol(tls_server, "ingest", "asr")
    tls_server.app.principals.set_expiry(pid, clock.now() + 60)
    with _as(tls_server, certs, "client-asr") as channel:
        _list(channel)
    clock.advance(60)
    _refused_and_audited(tls_server, _refused(_as(tls_server, certs, "client-asr")), "PRINCIPAL_EXPIRED", pid)


def test_a_revoked_certificate_is_refused_and_audited(tmp_path: Path, certs: Path, log_stream: io.StringIO) -> None:
    ca = load_issuer(certs / "ca.pem", certs / "ca.key")
    serial = x509.load_pem_x509_certificate((certs / "client-asr.pem").read_bytes()).serial_number
    (certs / "crl.pem").write_bytes(revoke(ca, [serial]))
    with running_server(_tls_config(tmp_path, certs)) as srv:
        pid = _enrol(srv, "ingest", "asr")
        _refused_and_audited(srv, _refused(_as(srv, certs, "client-asr")), "CERT_REVOKED", pid)
        _enrol(srv, "ingest", "asr2")
        with _as(srv, certs, "client-asr2") as channel:  # the same CA's other certificates still work
            _list(channel)


def test_a_crl_not_signed_by_the_client_ca_is_a_config_error(tmp_path: Path, certs: Path) -> None:
    from clipstore.config import ConfigError
    (certs / "crl.pem").write_bytes(revoke(new_ca("someone else"), []))
    with pytest.raises(ConfigError, match="tls.crl_file: .* not signed by a client CA"), \
            running_server(_tls_config(tmp_path, certs)):
        pass


def test_a_certificate_with_two_spiffe_ids_is_refused(tls_server: ClipstoreServer, certs: Path) -> None:
    ca = load_issuer(certs / "ca.pem", certs / "ca.key")
    two = issue(ca, common_name="asr", server=False,
                sans=client_sans("ingest", "asr") + client_sans("admin", "root"))
    _refused_and_audited(tls_server, _refused(_with(tls_server, certs, two)), "CERT_WITHOUT_PRINCIPAL")


def test_the_trust_domain_is_configurable(tmp_path: Path, log_stream: io.StringIO) -> None:
    out = tmp_path / "certs"
    write_dev_certs(out, [("asr", "ingest")], trust_domain="prod.example")
    config = make_config(tmp_path / "data", **{"tls.cert_file": str(out / "server.pem"),
                                               "tls.key_file": str(out / "server.key"),
                                               "tls.client_ca_file": str(out / "ca.pem"),
                                               "auth.trust_domain": "prod.example"})
    with running_server(config) as srv:
        _enrol(srv, "ingest", "asr", "prod.example")
        with _as(srv, out, "client-asr") as channel:
            _list(channel)


def test_no_client_certificate_is_refused(tls_server: ClipstoreServer, certs: Path) -> None:
    assert _refused(_as(tls_server, certs, None)).code() == grpc.StatusCode.UNAVAILABLE


def test_a_certificate_from_another_ca_is_refused(tls_server: ClipstoreServer, certs: Path) -> None:
    _enrol(tls_server, "ingest", "asr")
    stranger = issue(new_ca("someone else's CA"), common_name="asr", server=False, sans=client_sans("ingest", "asr"))
    assert _refused(_with(tls_server, certs, stranger)).code() == grpc.StatusCode.UNAVAILABLE


def test_an_expired_certificate_is_refused(tls_server: ClipstoreServer, certs: Path) -> None:
    _enrol(tls_server, "ingest", "asr")
    ca = load_issuer(certs / "ca.pem", certs / "ca.key")
    now = dt.datetime.now(dt.UTC)
    expired = issue(ca, common_name="asr", server=False, sans=client_sans("ingest", "asr"),
                    not_before=now - dt.timedelta(days=30), not_after=now - dt.timedelta(days=1))
    assert _refused(_with(tls_server, certs, expired)).code() == grpc.StatusCode.UNAVAILABLE


def test_a_wrong_role_certificate_is_permission_denied_and_audited(tls_server: ClipstoreServer,
                                                                   certs: Path) -> None:
    pid = _enrol(tls_server, "reviewer", "alice")
    err = _refused(_as(tls_server, certs, "client-alice"))
    assert (err.code(), error_info(err).reason) == (grpc.StatusCode.PERMISSION_DENIED, "WRONG_ROLE")
    assert _denials(tls_server)[-1]["actor"] == {"id": pid, "role": "reviewer"}


def test_a_certificate_naming_no_principal_is_unauthenticated(tls_server: ClipstoreServer, certs: Path) -> None:
    ca = load_issuer(certs / "ca.pem", certs / "ca.key")
    anonymous = issue(ca, common_name="nobody", server=False, sans=[x509.DNSName("nobody.example")])
    _refused_and_audited(tls_server, _refused(_with(tls_server, certs, anonymous)), "CERT_WITHOUT_PRINCIPAL")


def test_non_loopback_bind_is_allowed_only_with_tls(tmp_path: Path, certs: Path) -> None:
    from clipstore.config import ConfigError
    from clipstore.server import server_tls
    with pytest.raises(ConfigError, match="not a loopback address"):
        server_tls(make_config(tmp_path, listen="0.0.0.0:0"))
    assert server_tls(make_config(tmp_path, listen="0.0.0.0:0", **{
        "tls.cert_file": str(certs / "server.pem"), "tls.key_file": str(certs / "server.key")})) is not None


# -- reload -------------------------------------------------------------------------------------------

def _new_server_cert(certs: Path) -> bytes:
    """Replace the server's certificate and key with ones from a new CA; returns that CA (PEM)."""
    ca2 = new_ca("server CA, second generation")
    server2 = issue(ca2, common_name="localhost", server=True, sans=[x509.DNSName("localhost")])
    (certs / "server.key").write_bytes(key_pem(server2.key))
    (certs / "server.pem").write_bytes(cert_pem(server2.cert))
    return cert_pem(ca2.cert)


def test_reload_swaps_server_certificate_and_crl_without_dropping_a_call(tls_server: ClipstoreServer,
                                                                         certs: Path) -> None:
    revoked_pid = _enrol(tls_server, "ingest", "asr")
    _enrol(tls_server, "ingest", "asr2")
    ca1 = (certs / "ca.pem").read_bytes()
    client = ((certs / "client-asr2.key").read_bytes(), (certs / "client-asr2.pem").read_bytes())
    ca2 = _new_server_cert(certs)  # written now, but not in force until the reload
    ca = load_issuer(certs / "ca.pem", certs / "ca.key")
    serial = x509.load_pem_x509_certificate((certs / "client-asr.pem").read_bytes()).serial_number
    (certs / "crl.pem").write_bytes(revoke(ca, [serial]))
    assert _refused(_channel(tls_server, ca2, *client)).code() == grpc.StatusCode.UNAVAILABLE  # old cert still served
    with _as(tls_server, certs, "client-asr") as channel:
        _list(channel)  # not revoked yet

    failures: list[BaseException] = []
    calls = [0]
    stop = threading.Event()

    def hammer() -> None:  # a fresh connection per call, trusting either server CA
        while not stop.is_set():
            try:
                with _channel(tls_server, ca1 + ca2, *client) as ch:
                    _list(ch)
                calls[0] += 1
            except BaseException as exc:  # noqa: BLE001 - any failure is a dropped call
                failures.append(exc)

    release = threading.Event()

    def upload() -> Iterator[clip_pb2.PutClipRequest]:  # a call in flight across the reload
        yield clip_pb2.PutClipRequest(metadata=metadata())
        release.wait(10)
        yield clip_pb2.PutClipRequest(audio_chunk=b"a" * 1000)
        yield trailer(b"a" * 1000)

    with _channel(tls_server, ca1, *client) as long_lived:
        in_flight = clip_pb2_grpc.ClipServiceStub(long_lived).PutClip.future(upload(), timeout=30)
        thread = threading.Thread(target=hammer)
        thread.start()
        time.sleep(0.5)
        assert tls_server.reload_tls()
        time.sleep(0.5)
        release.set()
        stop.set()
        thread.join(30)
        assert in_flight.result().clip.size_bytes == 1000
        _list(long_lived)  # an open connection keeps working on the certificate it was made with
    assert failures == [] and calls[0] >= 2
    with _channel(tls_server, ca2, *client) as channel:
        _list(channel)  # new connections get the new server certificate
    revoked = ((certs / "client-asr.key").read_bytes(), (certs / "client-asr.pem").read_bytes())
    _refused_and_audited(tls_server, _refused(_channel(tls_server, ca2, *revoked)), "CERT_REVOKED", revoked_pid)


def test_a_reload_that_fails_keeps_everything_as_it_was(tls_server: ClipstoreServer, certs: Path,
                                                        log_stream: io.StringIO) -> None:
    _enrol(tls_server, "ingest", "asr")
    (certs / "crl.pem").write_bytes(b"-----BEGIN X509 CRL-----\nnot a crl\n-----END X509 CRL-----\n")
    _new_server_cert(certs)
    assert not tls_server.reload_tls()
    with _as(tls_server, certs, "client-asr") as channel:  # still the first server certificate
        _list(channel)
    assert any(json.loads(line)["event"] == "tls.reload_failed" for line in log_stream.getvalue().splitlines())


@pytest.mark.parametrize(("cert", "key", "problem"), [
    ("garbage", "server.key", "tls.cert_file: .* holds no PEM certificate"),
    ("server.pem", "garbage", "tls.key_file: .* holds no unencrypted PEM private key"),
    ("client-asr.pem", "server.key", "tls.key_file: .* is not the key of the certificate in"),
])
def test_a_reload_to_an_unusable_certificate_or_key_fails_and_keeps_the_old_one(
        tls_server: ClipstoreServer, certs: Path, log_stream: io.StringIO, cert: str, key: str, problem: str) -> None:
    """A certificate that is not PEM, or a key that is not the certificate's, used to be 'reloaded' (logged
    tls.reloaded) and handed to gRPC, which fails every later handshake with it; it is refused instead."""
    _enrol(tls_server, "ingest", "asr")
    (certs / "garbage").write_bytes(b"not PEM\n")
    for name, source in (("server.pem", cert), ("server.key", key)):
        if source != name:
            (certs / name).write_bytes((certs / source).read_bytes())
    assert not tls_server.reload_tls()
    [failed] = [e for e in map(json.loads, log_stream.getvalue().splitlines()) if e["event"] == "tls.reload_failed"]
    assert re.search(problem, failed["problem"])
    with _as(tls_server, certs, "client-asr") as channel:  # still the first server certificate
        _list(channel)


def test_an_unusable_server_certificate_is_a_config_error_naming_it_not_a_failure_to_bind(
        tmp_path: Path, certs: Path) -> None:
    from clipstore.config import ConfigError
    with pytest.raises(ConfigError, match="tls.key_file: .* is not the key of the certificate in"), \
            running_server(_tls_config(tmp_path, certs, **{"tls.cert_file": str(certs / "client-asr.pem")})):
        pass
    (certs / "garbage").write_bytes(b"not PEM\n")
    with pytest.raises(ConfigError, match="tls.client_ca_file: .* holds no PEM certificate"), \
            running_server(_tls_config(tmp_path, certs, **{"tls.client_ca_file": str(certs / "garbage"),
                                                           "tls.crl_file": None})):
        pass


def test_sighup_reloads_the_server_certificate_of_a_running_clipstore(tmp_path: Path, certs: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLIPSTORE_", "XDG_"))}
    env.update(HOME=str(tmp_path), CLIPSTORE_LISTEN="127.0.0.1:0")
    proc = subprocess.Popen([sys.executable, "-m", "clipstore", "serve", "--data-dir", str(tmp_path / "d"),
                             "--tls-cert", str(certs / "server.pem"), "--tls-key", str(certs / "server.key"),
                             "--client-ca", str(certs / "ca.pem")], env=env, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        port = next(json.loads(line)["port"] for line in proc.stderr if '"server.started"' in line)
        client = ((certs / "client-bob.key").read_bytes(), (certs / "client-bob.pem").read_bytes())

        def health(roots: bytes) -> grpc.StatusCode:
            creds = grpc.ssl_channel_credentials(root_certificates=roots, private_key=client[0],
                                                 certificate_chain=client[1])
            with grpc.secure_channel(f"localhost:{port}", creds,
                                     options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
                try:
                    health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
                except grpc.RpcError as err:
                    return err.code()
            return grpc.StatusCode.OK

        ca2 = _new_server_cert(certs)
        assert health(ca2) == grpc.StatusCode.UNAVAILABLE
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while health(ca2) != grpc.StatusCode.OK:
            assert time.monotonic() < deadline, "SIGHUP did not reload the server certificate"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        proc.wait()
