"""Metrics: a Prometheus scrape endpoint served by the reactor, and OTLP export.

Counting costs nothing extra on the receive path: the protocol factory and
the outbox already keep their counters, and a collector reads them when a
scrape (or an OTLP export) asks. Only the two latency-style histograms are
observed per event, into :class:`Buckets` (a list increment). Labels are the
connector, the ACK code, the message type (MSH-9 first component only) and
the pod: never anything from a message's content.

The delivery relay feeds its metrics through :meth:`Metrics.delivery`,
:meth:`Metrics.dead_letter` and :meth:`Metrics.set_depth`.
"""

from __future__ import annotations

import re
import threading
import time
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

__all__ = [
    "BATCH_BUCKETS",
    "LATENCY_BUCKETS",
    "Buckets",
    "Metrics",
    "metrics_site",
    "otlp_enabled",
    "start_otlp",
]

log = Logger(namespace="mllpd.metrics")

# Seconds: receive-to-ACK spans a group commit (about 1-10 ms) and, when the
# disk stalls, much more.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

# MSH-9 comes from the sender: only HL7-shaped codes become label values, and
# only so many, so a sender cannot grow the label set without bound.
_MSG_TYPE = re.compile(r"[A-Z][A-Z0-9]{2}")
MAX_MSG_TYPES = 64
OTHER = "other"


class Buckets:
    """A histogram that costs one bisect and two additions per observation.

    Not locked: observations happen on the reactor thread; a reader on
    another thread (OTLP export) may see a sum one observation off its
    counts, which a scrape cannot distinguish from timing.
    """

    __slots__ = ("bounds", "counts", "mirror", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        # Set while OTLP export is on: the SDK's histogram record().
        self.mirror: Callable[[float], None] | None = None

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        if self.mirror is not None:
            self.mirror(value)

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, float]]:
        """Prometheus buckets: (upper bound, cumulative count), +Inf last."""
        total = 0
        out: list[tuple[str, float]] = []
        for bound, n in zip((*map(_bound, self.bounds), "+Inf"), list(self.counts), strict=True):
            total += n
            out.append((bound, total))
        return out


def _bound(value: float) -> str:
    return repr(float(value))


class _Source(Protocol):
    @property
    def stats(self) -> Mapping[str, int]: ...
    @property
    def acks(self) -> Mapping[tuple[str, str], int]: ...
    @property
    def open_connections(self) -> int: ...


class _Wal(Protocol):
    @property
    def wal_bytes(self) -> int: ...
    @property
    def file_bytes(self) -> int: ...
    @property
    def written_bytes(self) -> int: ...
    @property
    def checkpoints(self) -> Mapping[tuple[str, str], int]: ...
    observer: Callable[[Any], None] | None


# Checkpoint modes of the SQLite outbox's WAL (mllpd.outbox.wal).
CHECKPOINT_MODES = ("passive", "restart")


class Metrics:
    """Every mllpd metric, exposed through :attr:`registry`."""

    def __init__(self, *, pod: str | None = None, namespace: str | None = None) -> None:
        self.const_labels: dict[str, str] = {}
        if pod:
            self.const_labels["pod"] = pod
        if namespace:
            self.const_labels["namespace"] = namespace
        self.ack_latency = Buckets(LATENCY_BUCKETS)
        self.commit_latency = Buckets(LATENCY_BUCKETS)
        self.commit_batch = Buckets(BATCH_BUCKETS)
        self.deliveries: Counter[tuple[str, str]] = Counter()
        self.dead_letters: Counter[str] = Counter()
        self.depth: dict[str, tuple[int, float]] = {}
        self.leases: dict[str, int] = {}
        self._connections: _Source | None = None
        self._tls_reloads: Mapping[str, int] | None = None
        self._wal: _Wal | None = None
        self.checkpoint_latency = {mode: Buckets(LATENCY_BUCKETS) for mode in CHECKPOINT_MODES}
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))  # type: ignore[arg-type]

    # -- wiring -------------------------------------------------------------

    def watch_connections(self, source: _Source) -> None:
        """Read connection, frame and ACK counts from the protocol factory."""
        self._connections = source

    def watch_tls_reloads(self, reloads: Mapping[str, int]) -> None:
        self._tls_reloads = reloads

    def watch_wal(self, wal: _Wal) -> None:
        """Read the SQLite outbox's WAL figures; time its checkpoints."""
        self._wal = wal

        def checkpointed(checkpoint: Any) -> None:
            self.checkpoint_latency[checkpoint.mode].observe(checkpoint.seconds)

        wal.observer = checkpointed

    def commit_done(self, batch_size: int, seconds: float) -> None:
        """One outbox commit of ``batch_size`` messages took ``seconds``."""
        self.commit_latency.observe(seconds)
        self.commit_batch.observe(batch_size)

    # -- delivery (fed by the relay) -------------------------------------------

    def delivery(self, connector: str, result: str) -> None:
        """One delivery attempt to ``connector`` ended: delivered, retry or dead."""
        self.deliveries[(connector, result)] += 1

    def dead_letter(self, connector: str) -> None:
        """A message moved to ``connector``'s dead-letter queue."""
        self.dead_letters[connector] += 1

    def set_depth(self, connector: str, depth: int, oldest_age: float) -> None:
        """Messages pending for ``connector`` and the age (s) of the oldest."""
        self.depth[connector] = (depth, oldest_age)

    def set_lease(self, connector: str, held: bool) -> None:
        """This replica holds (or no longer holds) ``connector``'s delivery lease."""
        self.leases[connector] = int(held)

    # -- reading ------------------------------------------------------------

    def samples(self) -> dict[str, Any]:
        """A consistent-enough copy of every value, for the exporters."""
        src = self._connections
        stats: dict[str, int] = dict(src.stats) if src is not None else {}
        acks: dict[tuple[str, str], int] = dict(src.acks) if src is not None else {}
        messages: Counter[tuple[str, str]] = Counter()
        known: set[str] = set()
        for (msg_type, code), n in sorted(acks.items()):
            label = msg_type if _MSG_TYPE.fullmatch(msg_type) else OTHER
            if label != OTHER and label not in known:
                if len(known) >= MAX_MSG_TYPES:
                    label = OTHER
                else:
                    known.add(label)
            messages[(label, code)] += n
        return {
            "open": src.open_connections if src is not None else 0,
            "stats": stats,
            "messages": dict(messages),
            "tls_reloads": dict(self._tls_reloads or {}),
            "deliveries": dict(self.deliveries),
            "dead_letters": dict(self.dead_letters),
            "depth": dict(self.depth),
            "leases": dict(self.leases),
            "wal": None if self._wal is None else {
                "bytes": self._wal.wal_bytes,
                "file_bytes": self._wal.file_bytes,
                "written_bytes": self._wal.written_bytes,
                "checkpoints": dict(self._wal.checkpoints),
            },
        }


_FRAME_RESULTS = (
    ("ok", "frames_ok"),
    ("oversized", "frames_oversized"),
    ("timed_out", "frames_timed_out"),
    ("junk", "frames_junk"),
    ("restarted", "frame_restarts"),
)


class _Collector:
    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def collect(self) -> Iterator[Metric]:
        m = self.m
        s = m.samples()
        stats = s["stats"]
        base = list(m.const_labels)
        base_values = list(m.const_labels.values())

        def gauge(name: str, doc: str, value: float) -> Metric:
            g = GaugeMetricFamily(name, doc, labels=base)
            g.add_metric(base_values, value)
            return g

        def counter(name: str, doc: str, value: float) -> Metric:
            c = CounterMetricFamily(name, doc, labels=base)
            c.add_metric(base_values, value)
            return c

        yield gauge("mllp_connections_open", "MLLP connections open now.", s["open"])
        yield counter("mllp_connections_accepted", "MLLP connections accepted.",
                      stats.get("connections_accepted", 0))
        yield counter("mllp_connections_refused",
                      "MLLP connections closed at once by MLLP_MAX_CONNECTIONS.",
                      stats.get("connections_refused", 0))
        frames = CounterMetricFamily("mllp_frames", "MLLP frames by result.",
                                     labels=[*base, "result"])
        for result, key in _FRAME_RESULTS:
            frames.add_metric([*base_values, result], stats.get(key, 0))
        yield frames
        yield counter("mllp_junk_bytes", "Bytes discarded outside any frame.",
                      stats.get("junk_bytes", 0))
        yield counter("mllp_buffer_full",
                      "Times MLLP_MAX_BUFFER was reached and reading paused on all connections.",
                      stats.get("buffer_full", 0))
        closes = CounterMetricFamily("mllp_connection_timeouts",
                                     "Connections closed by a timeout, by kind.",
                                     labels=[*base, "kind"])
        for kind in ("idle", "write"):
            closes.add_metric([*base_values, kind], stats.get(f"{kind}_timeouts", 0))
        yield closes
        messages = CounterMetricFamily(
            "mllp_messages", "Messages answered, by message type (MSH-9.1) and ACK code.",
            labels=[*base, "msg_type", "code"],
        )
        for (msg_type, code), n in sorted(s["messages"].items()):
            messages.add_metric([*base_values, msg_type, code], n)
        yield messages
        yield _histogram("mllp_ack_latency_seconds",
                         "Seconds from a frame's arrival to its ACK being written.",
                         m.ack_latency, base, base_values)
        yield _histogram("mllp_commit_latency_seconds", "Seconds per outbox commit.",
                         m.commit_latency, base, base_values)
        yield _histogram("mllp_commit_batch_size", "Messages per outbox commit.",
                         m.commit_batch, base, base_values)
        yield counter("mllp_tls_handshake_failures", "TLS handshakes that failed or timed out.",
                      stats.get("tls_handshake_failures", 0))
        reloads = CounterMetricFamily("mllp_tls_reloads", "TLS certificate reloads by result.",
                                      labels=[*base, "result"])
        for result in ("ok", "failed"):
            reloads.add_metric([*base_values, result], s["tls_reloads"].get(result, 0))
        yield reloads
        depth = GaugeMetricFamily("mllp_outbox_depth", "Messages waiting for delivery, per connector.",
                                  labels=[*base, "connector"])
        age = GaugeMetricFamily("mllp_outbox_oldest_age_seconds",
                                "Age of the oldest message waiting, per connector.",
                                labels=[*base, "connector"])
        for connector, (n, oldest) in sorted(s["depth"].items()):
            depth.add_metric([*base_values, connector], n)
            age.add_metric([*base_values, connector], oldest)
        yield depth
        yield age
        if s["leases"]:
            lease = GaugeMetricFamily(
                "mllp_connector_lease",
                "1 while this replica delivers for the connector (PostgreSQL outbox).",
                labels=[*base, "connector"],
            )
            for connector, held in sorted(s["leases"].items()):
                lease.add_metric([*base_values, connector], held)
            yield lease
        deliveries = CounterMetricFamily("mllp_deliveries", "Delivery attempts by connector and result.",
                                         labels=[*base, "connector", "result"])
        for (connector, result), n in sorted(s["deliveries"].items()):
            deliveries.add_metric([*base_values, connector, result], n)
        yield deliveries
        dead = CounterMetricFamily("mllp_dead_letters", "Messages dead-lettered, per connector.",
                                   labels=[*base, "connector"])
        for connector, n in sorted(s["dead_letters"].items()):
            dead.add_metric([*base_values, connector], n)
        yield dead
        wal = s["wal"]
        if wal is not None:
            yield gauge("mllp_outbox_wal_bytes",
                        "Bytes in the outbox's SQLite WAL at the last checkpoint.", wal["bytes"])
            yield gauge("mllp_outbox_wal_file_bytes",
                        "Size of the outbox's SQLite WAL file.", wal["file_bytes"])
            yield counter("mllp_outbox_wal_written_bytes",
                          "Bytes written to the outbox's SQLite WAL.", wal["written_bytes"])
            checkpoints = CounterMetricFamily(
                "mllp_outbox_checkpoints", "WAL checkpoints by mode and result.",
                labels=[*base, "mode", "result"])
            for mode in CHECKPOINT_MODES:
                for result in ("ok", "busy", "failed"):
                    checkpoints.add_metric([*base_values, mode, result],
                                           wal["checkpoints"].get((mode, result), 0))
            yield checkpoints
            seconds = HistogramMetricFamily(
                "mllp_outbox_checkpoint_seconds",
                "Seconds per WAL checkpoint; a restart holds the writer (and ACKs) that long.",
                labels=[*base, "mode"])
            for mode, buckets in m.checkpoint_latency.items():
                seconds.add_metric([*base_values, mode], buckets.cumulative(), buckets.sum)
            yield seconds


def _histogram(
    name: str, doc: str, buckets: Buckets, labels: list[str], values: list[str]
) -> Metric:
    h = HistogramMetricFamily(name, doc, labels=labels)
    h.add_metric(values, buckets.cumulative(), buckets.sum)
    return h


# -- Prometheus over twisted.web -------------------------------------------------


class _MetricsResource(Resource):
    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        return generate_latest(self.registry)


class _QuietSite(Site):
    def log(self, request: Any) -> None:
        pass  # one access line per scrape would drown the log stream


def metrics_site(metrics: Metrics) -> Site:
    """A site serving ``/metrics`` (and ``/``) on the reactor thread."""
    root = Resource()
    page = _MetricsResource(metrics.registry)
    root.putChild(b"metrics", page)
    root.putChild(b"", page)
    site = _QuietSite(root)
    site.noisy = False
    site.displayTracebacks = False
    return site


# -- OTLP -------------------------------------------------------------------------


def otlp_enabled(environ: Mapping[str, str]) -> bool:
    """OTLP export is on when an OTLP endpoint is configured (and the
    standard OTEL_METRICS_EXPORTER does not say otherwise)."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = environ.get("OTEL_METRICS_EXPORTER", "otlp").strip().lower()
    if exporter not in ("otlp", ""):
        return False
    return bool(
        environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")
    )


class OTLPExport:
    """The OpenTelemetry SDK's periodic OTLP/HTTP export of :class:`Metrics`."""

    def __init__(self, provider: Any) -> None:
        self.provider = provider

    def shutdown(self) -> None:
        """Export once more and stop the exporter thread (blocking, bounded)."""
        self.provider.shutdown(timeout_millis=5_000)


def start_otlp(metrics: Metrics) -> OTLPExport:
    """Export every metric with the OpenTelemetry SDK, configured by the
    standard OTEL_* variables (endpoint, headers, interval, resource).

    Counters and gauges are observable instruments reading the same values as
    a scrape. The histograms are recorded as they happen (from here on), an
    extra cost per message paid only while OTLP export is on.
    """
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    from opentelemetry.metrics import CallbackOptions, Observation
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.resources import Resource as OTelResource

    attrs: dict[str, str] = {"service.name": "mllpd"}
    if "pod" in metrics.const_labels:
        attrs["k8s.pod.name"] = metrics.const_labels["pod"]
    if "namespace" in metrics.const_labels:
        attrs["k8s.namespace.name"] = metrics.const_labels["namespace"]
    # Resource.create lets OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES win.
    resource = OTelResource.create(attrs)
    reader = PeriodicExportingMetricReader(OTLPMetricExporter())
    provider = MeterProvider(resource=resource, metric_readers=[reader])
    meter = provider.get_meter("mllpd")
    lock = threading.Lock()
    cache: dict[str, Any] = {"at": -1.0}

    def snapshot() -> dict[str, Any]:
        # About one copy per export, shared by that export's callbacks.
        with lock:
            now = time.monotonic()
            if now - cache["at"] > 0.5:
                cache["at"], cache["s"] = now, metrics.samples()
            return cache["s"]

    def observe(read: Callable[[dict[str, Any]], list[tuple[float, dict[str, str]]]]) -> Any:
        def callback(options: CallbackOptions) -> list[Observation]:
            return [Observation(v, a) for v, a in read(snapshot())]
        return callback

    def stat(key: str) -> Callable[[dict[str, Any]], list[tuple[float, dict[str, str]]]]:
        return lambda s: [(s["stats"].get(key, 0), {})]

    meter.create_observable_up_down_counter(
        "mllp.connections.open", callbacks=[observe(lambda s: [(s["open"], {})])],
        description="MLLP connections open now.")
    meter.create_observable_counter(
        "mllp.connections.accepted", callbacks=[observe(stat("connections_accepted"))],
        description="MLLP connections accepted.")
    meter.create_observable_counter(
        "mllp.connections.refused", callbacks=[observe(stat("connections_refused"))],
        description="MLLP connections closed at once by MLLP_MAX_CONNECTIONS.")
    meter.create_observable_counter(
        "mllp.frames", callbacks=[observe(
            lambda s: [(s["stats"].get(k, 0), {"result": r}) for r, k in _FRAME_RESULTS])],
        description="MLLP frames by result.")
    meter.create_observable_counter(
        "mllp.messages", callbacks=[observe(
            lambda s: [(n, {"msg_type": t, "code": c}) for (t, c), n in s["messages"].items()])],
        description="Messages answered, by message type and ACK code.")
    meter.create_observable_counter(
        "mllp.tls.handshake_failures", callbacks=[observe(stat("tls_handshake_failures"))],
        description="TLS handshakes that failed or timed out.")
    meter.create_observable_gauge(
        "mllp.outbox.depth", callbacks=[observe(
            lambda s: [(d, {"connector": c}) for c, (d, _) in s["depth"].items()])],
        description="Messages waiting for delivery, per connector.")
    meter.create_observable_gauge(
        "mllp.outbox.oldest_age", unit="s", callbacks=[observe(
            lambda s: [(a, {"connector": c}) for c, (_, a) in s["depth"].items()])],
        description="Age of the oldest message waiting, per connector.")
    meter.create_observable_gauge(
        "mllp.connector.lease", callbacks=[observe(
            lambda s: [(h, {"connector": c}) for c, h in s["leases"].items()])],
        description="1 while this replica delivers for the connector.")
    meter.create_observable_counter(
        "mllp.deliveries", callbacks=[observe(
            lambda s: [(n, {"connector": c, "result": r}) for (c, r), n in s["deliveries"].items()])],
        description="Delivery attempts by connector and result.")
    meter.create_observable_counter(
        "mllp.dead_letters", callbacks=[observe(
            lambda s: [(n, {"connector": c}) for c, n in s["dead_letters"].items()])],
        description="Messages dead-lettered, per connector.")
    def wal(key: str) -> Callable[[dict[str, Any]], list[tuple[float, dict[str, str]]]]:
        return lambda s: [] if s["wal"] is None else [(s["wal"][key], {})]

    meter.create_observable_gauge(
        "mllp.outbox.wal.bytes", unit="By", callbacks=[observe(wal("bytes"))],
        description="Bytes in the outbox's SQLite WAL at the last checkpoint.")
    meter.create_observable_gauge(
        "mllp.outbox.wal.file_bytes", unit="By", callbacks=[observe(wal("file_bytes"))],
        description="Size of the outbox's SQLite WAL file.")
    meter.create_observable_counter(
        "mllp.outbox.wal.written", unit="By", callbacks=[observe(wal("written_bytes"))],
        description="Bytes written to the outbox's SQLite WAL.")
    meter.create_observable_counter(
        "mllp.outbox.checkpoints", callbacks=[observe(
            lambda s: [] if s["wal"] is None else [
                (n, {"mode": mode, "result": result})
                for (mode, result), n in s["wal"]["checkpoints"].items()])],
        description="WAL checkpoints by mode and result.")
    _mirror(metrics.ack_latency, meter.create_histogram(
        "mllp.ack.latency", unit="s", description="Seconds from a frame's arrival to its ACK.",
        explicit_bucket_boundaries_advisory=list(LATENCY_BUCKETS)))
    _mirror(metrics.commit_latency, meter.create_histogram(
        "mllp.commit.latency", unit="s", description="Seconds per outbox commit.",
        explicit_bucket_boundaries_advisory=list(LATENCY_BUCKETS)))
    _mirror(metrics.commit_batch, meter.create_histogram(
        "mllp.commit.batch_size", description="Messages per outbox commit.",
        explicit_bucket_boundaries_advisory=[float(b) for b in BATCH_BUCKETS]))
    log.info("exporting metrics over OTLP", event="otlp_export_started")
    return OTLPExport(provider)


def _mirror(buckets: Buckets, histogram: Any) -> None:
    buckets.mirror = histogram.record
