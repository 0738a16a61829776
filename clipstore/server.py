"""The gRPC server: services, health, reflection, interceptors, graceful stop."""

from __future__ import annotations

import gc
import signal
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent import futures
from contextlib import contextmanager
from typing import Any, cast

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from clipstore.app import App
from clipstore.auth import authenticate, authenticate_certificate
from clipstore.clock import Clock
from clipstore.config import Config, ConfigError, is_loopback
from clipstore.denials import DenialLedger
from clipstore.dependencies import (
    DependencyMonitor,
    audit_log_probe,
    check_at_start,
    database_probe,
    root_key_probe,
)
from clipstore.errors import ClipstoreError
from clipstore.interceptors import STREAM_CUT_GRACE_S, ClipstoreInterceptor
from clipstore.logs import get_logger
from clipstore.metrics import Metrics
from clipstore.rows import Principal
from clipstore.servicers.accounts import AccountServicer
from clipstore.servicers.audit import AuditServicer
from clipstore.servicers.clips import PUT_CLIP_METHOD, ClipServicer, parse_put_clip_request
from clipstore.servicers.enrolment import EnrolmentServicer, Presenter, ReviewerAdminServicer
from clipstore.servicers.principals import PrincipalAdminServicer
from clipstore.servicers.review import ReviewServicer
from clipstore.servicers.safety import SafetyServicer
from clipstore.tls import ServerTls
from clipstore.v1 import (
    account_pb2_grpc,
    audit_pb2_grpc,
    clip_pb2_grpc,
    enrolment_pb2_grpc,
    principal_admin_pb2_grpc,
    review_pb2_grpc,
    reviewer_admin_pb2_grpc,
    safety_pb2_grpc,
)

PUBLIC_WORKERS = 8  # health and reflection: their own threads, so holding them starves no role RPC
log = get_logger("clipstore.server")

# (full service name, add_*_to_server, base servicer answering UNIMPLEMENTED)
_SERVICES: list[tuple[str, Callable[[Any, grpc.Server], None], type]] = [
    ("clipstore.v1.ClipService", clip_pb2_grpc.add_ClipServiceServicer_to_server,
     clip_pb2_grpc.ClipServiceServicer),
    ("clipstore.v1.AccountService", account_pb2_grpc.add_AccountServiceServicer_to_server,
     account_pb2_grpc.AccountServiceServicer),
    ("clipstore.v1.ReviewerAdminService", reviewer_admin_pb2_grpc.add_ReviewerAdminServiceServicer_to_server,
     reviewer_admin_pb2_grpc.ReviewerAdminServiceServicer),
    ("clipstore.v1.PrincipalAdminService", principal_admin_pb2_grpc.add_PrincipalAdminServiceServicer_to_server,
     principal_admin_pb2_grpc.PrincipalAdminServiceServicer),
    ("clipstore.v1.EnrolmentService", enrolment_pb2_grpc.add_EnrolmentServiceServicer_to_server,
     enrolment_pb2_grpc.EnrolmentServiceServicer),
    ("clipstore.v1.ReviewService", review_pb2_grpc.add_ReviewServiceServicer_to_server,
     review_pb2_grpc.ReviewServiceServicer),
    ("clipstore.v1.SafetyService", safety_pb2_grpc.add_SafetyServiceServicer_to_server,
     safety_pb2_grpc.SafetyServiceServicer),
    ("clipstore.v1.AuditService", audit_pb2_grpc.add_AuditServiceServicer_to_server,
     audit_pb2_grpc.AuditServiceServicer),
]
SERVICE_NAMES = tuple(name for name, _, _ in _SERVICES)
AUDIT_SERVICE = "clipstore.v1.AuditService"


def _implemented_servicers(app: App, tls: ServerTls | None) -> dict[str, Any]:
    """Servicers whose issue has landed; the rest answer UNIMPLEMENTED."""
    loop = app.publishing
    published = (lambda: loop.latest) if loop is not None else (lambda: None)
    return {"clipstore.v1.AuditService": AuditServicer(app.audit, published),
            "clipstore.v1.ClipService": ClipServicer(app.clips),
            "clipstore.v1.AccountService": AccountServicer(app.accounts, app.access_reports),
            "clipstore.v1.ReviewService": ReviewServicer(app.review),
            "clipstore.v1.ReviewerAdminService": ReviewerAdminServicer(app.enrolment, app.lifecycle),
            "clipstore.v1.PrincipalAdminService": PrincipalAdminServicer(app.lifecycle),
            "clipstore.v1.EnrolmentService": EnrolmentServicer(app.enrolment, _presenter(app, tls)),
            "clipstore.v1.SafetyService": SafetyServicer(
                app.review, app.forensics, max_identify_calls=app.config.serving.max_identify_leak_calls)}


def server_tls(config: Config) -> ServerTls | None:
    if config.tls is None:
        if not is_loopback(config.listen):
            raise ConfigError("listen", f"{config.listen} is not a loopback address and TLS is not "
                                        "configured; set tls.cert_file and tls.key_file or bind 127.0.0.1")
        return None
    return ServerTls(config.tls)


def _principal(app: App, tls: ServerTls | None, metadata: Mapping[str, str],
               context: grpc.ServicerContext) -> Principal:
    """A verified client certificate names the principal (mTLS); else the bearer API key does."""
    pem = _peer_certificates(context)
    if pem and tls is not None:
        return authenticate_certificate(app.principals, pem[0], trust_domain=app.config.trust_domain,
                                        revoked=tls.revoked, now=app.clock.now())
    return authenticate(app.principals, metadata, now=app.clock.now())


REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


def _enable_reflection(server: grpc.Server, services: tuple[str, ...]) -> None:
    """Serve reflection as v1 (what current tools ask first) and v1alpha. grpcio-reflection ships only
    v1alpha; v1 is the same protocol and messages under a new package, so one servicer answers both
    and the v1 file descriptor is the v1alpha one renamed."""
    servicer = reflection.ReflectionServicer((*services, reflection.SERVICE_NAME, REFLECTION_V1))
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    _add_reflection_v1_descriptor()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(REFLECTION_V1, {
        "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)}),))


def _add_reflection_v1_descriptor() -> None:
    pool = descriptor_pool.Default()
    try:
        pool.FindServiceByName(REFLECTION_V1)
        return  # already there (a later grpcio-reflection, or a second server in this process)
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    proto.name, proto.package = "grpc/reflection/v1/reflection.proto", "grpc.reflection.v1"
    proto.ClearField("options")
    old, new = ".grpc.reflection.v1alpha.", ".grpc.reflection.v1."
    for message in proto.message_type:
        for field in message.field:
            if field.HasField("type_name"):
                field.type_name = field.type_name.replace(old, new)
    for method in proto.service[0].method:
        method.input_type, method.output_type = (method.input_type.replace(old, new),
                                                 method.output_type.replace(old, new))
    pool.Add(proto)


def _peer_certificates(context: grpc.ServicerContext) -> Sequence[bytes] | None:
    """The verified client certificate chain (PEM); gRPC gives a list per key, which its stub calls bytes."""
    return cast("Sequence[bytes] | None", context.auth_context().get("x509_pem_cert"))


def _presenter(app: App, tls: ServerTls | None) -> Presenter:
    """Who the client certificate of a call names, for a public RPC (no certificate: None). A certificate that
    does not authenticate a principal in good standing names nobody (""): it can redeem nobody's code."""
    def presented_by(context: grpc.ServicerContext) -> str | None:
        pem = _peer_certificates(context)
        if not pem or tls is None:
            return None
        try:
            return authenticate_certificate(app.principals, pem[0], trust_domain=app.config.trust_domain,
                                            revoked=tls.revoked, now=app.clock.now()).id
        except ClipstoreError:
            return ""
    return presented_by


def _metrics(app: App) -> Metrics:
    metrics = Metrics()
    app.audit.on_record = metrics.observe_record
    app.audit.on_batch = metrics.observe_batch
    metrics.counter("clipstore_kms_root_calls", "calls to the KMS root key for account keys",
                    lambda: app.keyring.root_calls)
    metrics.counter("clipstore_key_cache_lookups", "account-key cache lookups", lambda: app.keyring.cache_lookups)
    metrics.counter("clipstore_key_cache_hits", "account-key cache lookups answered without the root",
                    lambda: app.keyring.cache_hits)
    metrics.gauge("clipstore_review_queue_clips", "clips waiting for review", app.review.queue_depth)
    metrics.gauge("clipstore_audit_log_entries", "entries in the audit log", app.audit.reader.size)
    metrics.counter("clipstore_db_commits", "committed read-write database transactions (each a durable write)",
                    lambda: app.db.commits)
    metrics.gauge("clipstore_audit_history_alert", "1 when the stored audit log is not an extension of what this "
                  "process wrote, read and signed: signing and every audited action stop (alert on it)",
                  lambda: 1 if app.audit.halted is not None else 0)
    return metrics


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


def _channel_options(config: Config) -> list[tuple[str, int]]:
    """Transport limits (gRPC core channel arguments) from `server.*` and `max_message_bytes`."""
    serving = config.serving
    return [("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.max_concurrent_streams", serving.max_streams_per_connection),
            ("grpc.keepalive_time_ms", _ms(serving.keepalive_s)),
            ("grpc.keepalive_timeout_ms", _ms(serving.keepalive_timeout_s)),
            ("grpc.max_connection_idle_ms", _ms(serving.max_connection_idle_s)),
            ("grpc.max_connection_age_ms", _ms(serving.max_connection_age_s)),
            # a call that began just before the age limit may run as long as any call may
            ("grpc.max_connection_age_grace_ms", _ms(serving.stream_max_s + STREAM_CUT_GRACE_S)),
            ("grpc.so_reuseport", 0)]


class ClipstoreServer:
    """A bound, not yet started server; `port` is the port actually bound."""

    def __init__(self, app: App) -> None:
        self.app = app
        config = app.config
        self.tls = server_tls(config)
        self.metrics = _metrics(app)
        self.metrics_port: int | None = None
        self.health = health.HealthServicer(experimental_non_blocking=True)
        self.denials = DenialLedger(app.audit, pseudonym=app.peer_pseudonyms.of, interval_s=config.denial_summary_s,
                                    per_principal=config.denials_per_principal, on_denial=self.metrics.observe_denial)
        app.audit.admit_denial = self.denials.admit  # the domain's refusals share each principal's budget
        serving = config.serving
        self._public_pool = futures.ThreadPoolExecutor(max_workers=PUBLIC_WORKERS, thread_name_prefix="rpc-public")
        self._interceptor = ClipstoreInterceptor(
            lambda md, context: _principal(app, self.tls, md, context), serving=serving,
            on_denied=lambda ctx, exc: self.denials.record(peer=ctx.peer, principal=ctx.principal, error=exc,
                                                           request_id=ctx.request_id),
            on_finished=self.metrics.observe_rpc, public_pool=self._public_pool,
            parsers={PUT_CLIP_METHOD: parse_put_clip_request})
        self.dependencies = DependencyMonitor({"database": database_probe(app.db.engine),
                                               "root_key": root_key_probe(app.root),
                                               "blob_store": app.blobs.check,
                                               "audit_log": audit_log_probe(app.audit)}, self.health, SERVICE_NAMES)
        self.metrics.gauges("clipstore_dependency_up", "1 while the dependency answered its last probe",
                            "dependency", self.dependencies.up)
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=serving.max_workers, thread_name_prefix="rpc"),
            interceptors=[self._interceptor], options=_channel_options(config))
        implemented = _implemented_servicers(app, self.tls)
        for name, add, base in _SERVICES:
            add(implemented.get(name) or base(), self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        _enable_reflection(self._server, (*SERVICE_NAMES, health.SERVICE_NAME))
        try:
            if self.tls is None:
                self.port = self._server.add_insecure_port(config.listen)
            else:
                self.port = self._server.add_secure_port(config.listen, self.tls.credentials())
        except RuntimeError as exc:
            raise ConfigError("listen", f"cannot bind {config.listen}: {exc}") from None
        self._stopped = threading.Event()
        self._retention = threading.Thread(target=self._retention_loop, name="retention", daemon=True)

    def _retention_loop(self) -> None:
        """Purge expired clips and sweep orphans every `purge_interval_s` until stopped."""
        while not self._stopped.wait(self.app.config.purge_interval_s):
            try:
                purged, swept = self.app.clips.purge_expired(), self.app.clips.sweep_orphans()
                self.app.clips.reseal_legacy()
                if purged or swept:
                    log.info("retention.ran", purged=purged, orphans_removed=swept)
            except Exception as exc:  # the next tick retries; the audit log says what was done
                log.error("retention.failed", exc_type=type(exc).__name__)

    def start(self) -> None:
        if self.app.config.metrics_listen:
            self.metrics_port = self.metrics.serve(self.app.config.metrics_listen)
        self.denials.start()
        self._server.start()
        self._retention.start()
        self.app.audit.on_halt = lambda exc: self._audit_not_serving()
        self.dependencies.check()  # SERVING only for what its dependencies allow (a halted log included)
        self.dependencies.start()
        log.info("server.started", listen=self.app.config.listen, port=self.port, metrics_port=self.metrics_port,
                 database="sqlite" if self.app.db.is_sqlite else "postgresql",
                 root_kms=type(self.app.root).__name__)

    def _audit_not_serving(self) -> None:
        """The log refuses to sign and record (a rewritten history): load balancers and operators see it."""
        self.health.set(AUDIT_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)

    def reload_tls(self) -> bool:
        """Swap in the certificate, key, client CA and CRL files as they are now (SIGHUP); new connections
        use them, calls in flight are undisturbed. False (and the old material kept) if any fails to load."""
        return self.tls.reload() if self.tls is not None else False

    def stop(self, grace_s: float | None = None) -> None:
        """Stop accepting, drain in-flight RPCs for up to `grace_s`, close stores."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        grace = self.app.config.shutdown_grace_s if grace_s is None else grace_s
        log.info("server.stopping", grace_s=grace)
        self.dependencies.stop()
        self.health.enter_graceful_shutdown()
        self._server.stop(grace).wait()
        if self._retention.is_alive():
            self._retention.join()
        self.denials.close()  # the last interval's counts reach the audit log before it closes
        self._interceptor.close()
        self._public_pool.shutdown(wait=False)
        self.metrics.close()
        self.app.close()
        log.info("server.stopped")


@contextmanager
def running_server(config: Config, *, clock: Clock | None = None) -> Iterator[ClipstoreServer]:
    """Start a server for `config` (use listen 127.0.0.1:0 for an ephemeral port); stop it on exit."""
    server = ClipstoreServer(App(config, clock=clock))
    server.start()
    try:
        yield server
    finally:
        server.stop(grace_s=1.0)


def freeze_heap() -> None:
    """What start-up built (modules, stubs, caches, stores) lives as long as the process: move it out of
    the collector's reach, so a full collection scans only what requests allocate, not the whole heap
    (full collections otherwise paused the server ~120 ms and set every p99)."""
    gc.collect()
    gc.freeze()


def serve(config: Config, *, on_ready: Callable[[ClipstoreServer], None] | None = None) -> int:
    """Check the dependencies, run until SIGTERM or SIGINT, then drain and exit 0; SIGHUP reloads the
    TLS files. A dependency that does not work as configured raises `DependencyError` before anything starts."""
    check_at_start(config)
    server = ClipstoreServer(App(config))
    stop_requested = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("server.signal", signal=signal.Signals(signum).name)
        stop_requested.set()

    def on_hangup(signum: int, _frame: Any) -> None:
        log.info("server.signal", signal=signal.Signals(signum).name)
        server.reload_tls()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, on_hangup)
    try:
        server.start()
        freeze_heap()
        if on_ready is not None:
            on_ready(server)
        stop_requested.wait()
        server.stop()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
