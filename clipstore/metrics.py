"""Prometheus metrics on their own port (`metrics.listen`), one registry per server.

Shaped for standard dashboards: counters are counters (`_total`; rates and
ratios are the dashboard's job), names carry units (`_seconds`, `_bytes`,
`_entries`), the standard `process_*` and `python_*` families and a
`clipstore_build_info` are included. Labels never carry ids, keys or anything
a caller sent.
"""

from __future__ import annotations

import platform
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import grpc
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from clipstore import __version__
from clipstore.config import ConfigError
from clipstore.unit import AuditRecord

_REASON_CODE = re.compile(r"^[A-Z][A-Z0-9_]*$")

# `_created` series double every counter and no standard dashboard reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]

_LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.rpcs = Counter("clipstore_rpcs", "RPCs by method and status code", ["method", "code"], registry=r)
        self.rpc_seconds = Histogram("clipstore_rpc_duration_seconds", "RPC latency by method", ["method"],
                                     buckets=_LATENCY_BUCKETS_S, registry=r)
        self.audit_records = Counter("clipstore_audit_records", "audit records by action, outcome and reason code "
                                     "(grants issued/denied, fetches, purges, …; a refusal counted into a "
                                     "denial summary too)", ["action", "outcome", "reason"],
                                     registry=r)
        self.auth_denials = Counter("clipstore_auth_denials", "refused credentials and roles, by whether the "
                                    "credential named a principal ('principal') or not ('anonymous'), and reason",
                                    ["caller", "reason"], registry=r)
        self.audit_append_seconds = Histogram("clipstore_audit_commit_duration_seconds",
                                              "time to commit one group of audit entries",
                                              buckets=_LATENCY_BUCKETS_S, registry=r)
        self.audit_batch_entries = Histogram("clipstore_audit_batch_entries", "audit entries per durable commit",
                                             buckets=(1, 2, 4, 8, 16, 32, 64, 128, 512, 4096), registry=r)
        for standard in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):  # process_*, python_*
            r.register(standard)
        Info("clipstore_build", "the running build", registry=r).info(
            {"version": __version__, "python": platform.python_version(), "grpcio": grpc.__version__})
        self._server: Any = None

    def gauge(self, name: str, doc: str, read: Callable[[], float]) -> None:
        """A value read at scrape time (queue depth, log size)."""
        Gauge(name, doc, registry=self.registry).set_function(read)

    def counter(self, name: str, doc: str, read: Callable[[], float]) -> None:
        """A count another component keeps (the key ring's root calls), exposed as `name_total` at scrape time."""
        self.registry.register(_Scraped(lambda: [CounterMetricFamily(name, doc, value=read())]))

    def gauges(self, name: str, doc: str, label: str, read: Callable[[], Mapping[str, float]]) -> None:
        """One gauge per label value, read at scrape time (each dependency up or down)."""
        def families() -> list[Metric]:
            family = GaugeMetricFamily(name, doc, labels=[label])
            for value, reading in read().items():
                family.add_metric([value], reading)
            return [family]
        self.registry.register(_Scraped(families))

    def observe_rpc(self, method: str, code: str, seconds: float) -> None:
        self.rpcs.labels(method, code).inc()
        self.rpc_seconds.labels(method).observe(seconds)

    def observe_denial(self, identified: bool, reason: str) -> None:
        self.auth_denials.labels("principal" if identified else "anonymous", reason).inc()

    def observe_record(self, record: AuditRecord) -> None:
        # A label carries a reason code, never free text (a denial summary's reason holds counts).
        reason = record.reason if record.outcome != "ok" and _REASON_CODE.match(record.reason) else ""
        self.audit_records.labels(record.action, record.outcome, reason).inc()

    def observe_batch(self, entries: int, seconds: float) -> None:
        self.audit_batch_entries.observe(entries)
        self.audit_append_seconds.observe(seconds)

    def serve(self, listen: str) -> int:
        host, _, port = listen.rpartition(":")
        try:
            self._server, _ = start_http_server(int(port), addr=host.strip("[]"), registry=self.registry)
        except OSError as exc:
            raise ConfigError("metrics.listen", f"cannot bind {listen}: {exc.strerror}") from None
        return int(self._server.server_port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class _Scraped(Collector):
    def __init__(self, families: Callable[[], list[Metric]]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        yield from self._families()
