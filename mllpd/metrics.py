"""Metrics: a Prometheus scrape endpoint served by the reactor, and OTLP export.

Counting costs nothing extra on the receive path: the protocol factory and
the outbox already keep their counters, and a collector reads them when a
scrape (or an OTLP export) asks. Only the two latency-style histograms are
observed per event, into :class:`Buckets` (a list increment). Labels are the
connector, the ACK code, the message type (MSH-9 first component only) and
the pod: never anything from a message's content.

Every metric is one row of :data:`METRICS` (name, kind, help, labels,
buckets); the Prometheus collector and the OTLP instruments are both built
from that table, so the two show the same metrics with the same help text.

The delivery relay feeds its metrics through :meth:`Metrics.delivery`,
:meth:`Metrics.dead_letter` and :meth:`Metrics.set_depth`.
"""

from __future__ import annotations

import re
import threading
import time
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

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
    "METRICS",
    "Buckets",
    "MetricDef",
    "Metrics",
    "metrics_site",
    "otlp_enabled",
    "otlp_instruments",
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
MSG_TYPE = re.compile(r"[A-Z0-9]{3}")
MAX_MSG_TYPES = 64
OTHER = "other"


class MessageTypes:
    """The message-type label of each reply count, decided where the counts
    are kept: MSH-9.1 when it is three capitals or digits and one of the
    first MAX_MSG_TYPES such codes seen, else ``other``. A sender cycling
    through every code cannot grow the counts (or a scrape) past that."""

    def __init__(self, limit: int = MAX_MSG_TYPES) -> None:
        self.limit = limit
        self.seen: set[str] = set()

    def label(self, msg_type: str) -> str:
        code = msg_type.split("^", 1)[0]
        if code in self.seen:
            return code
        if len(self.seen) >= self.limit or not MSG_TYPE.fullmatch(code):
            return OTHER
        self.seen.add(code)
        return code


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
        self.ack_latency = _buckets("mllp_ack_latency_seconds")
        self.commit_latency = _buckets("mllp_commit_latency_seconds")
        self.commit_batch = _buckets("mllp_commit_batch_size")
        self.deliveries: Counter[tuple[str, str]] = Counter()
        self.dead_letters: Counter[str] = Counter()
        self.depth: dict[str, tuple[int, float]] = {}
        self.leases: dict[str, int] = {}
        self._connections: _Source | None = None
        self._tls_reloads: Mapping[str, int] | None = None
        self._tls_closed: Mapping[str, int] | None = None
        self._wal: _Wal | None = None
        self.checkpoint_latency = {
            mode: _buckets("mllp_outbox_checkpoint_seconds") for mode in CHECKPOINT_MODES
        }
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))  # type: ignore[arg-type]

    # -- wiring -------------------------------------------------------------

    def watch_connections(self, source: _Source) -> None:
        """Read connection, frame and ACK counts from the protocol factory."""
        self._connections = source

    def watch_tls_reloads(
        self, reloads: Mapping[str, int], closed: Mapping[str, int] | None = None
    ) -> None:
        """Reload results, and connections a reload closed by reason."""
        self._tls_reloads = reloads
        self._tls_closed = closed

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
        return {
            "open": src.open_connections if src is not None else 0,
            "stats": stats,
            # Already labels (MessageTypes), at most MAX_MSG_TYPES + 1 of them.
            "messages": acks,
            "tls_reloads": dict(self._tls_reloads or {}),
            "tls_closed": dict(self._tls_closed or {}),
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
    ("buffer_refused", "frames_buffer_refused"),
)

Samples = dict[str, Any]  # what Metrics.samples() returns
Points = Iterable[tuple[tuple[str, ...], float]]  # (label values, value)
Series = Iterable[tuple[tuple[str, ...], Buckets]]  # (label values, histogram)


@dataclass(frozen=True)
class MetricDef:
    """One metric, as both exporters show it.

    ``kind``: ``counter``, ``gauge``, ``updown`` (a gauge that OTLP sends
    as an up-down counter) or ``histogram``. Counters and gauges are read
    from :meth:`Metrics.samples` by ``read``; histograms are the
    :class:`Buckets` that ``series`` lists. ``when``: the metric is left out
    of a scrape (and of an export) while it says False.
    """

    name: str  # Prometheus family name (counters get _total on the page)
    otlp: str  # OpenTelemetry instrument name
    kind: Literal["counter", "gauge", "updown", "histogram"]
    help: str
    labels: tuple[str, ...] = ()
    unit: str = ""  # OTLP unit (UCUM); Prometheus names carry theirs
    buckets: tuple[float, ...] = ()
    read: Callable[[Samples], Points] | None = None
    series: Callable[[Metrics], Series] | None = None
    when: Callable[[Samples], bool] | None = None


def _stat(key: str) -> Callable[[Samples], Points]:
    return lambda s: [((), s["stats"].get(key, 0))]


def _wal(key: str) -> Callable[[Samples], Points]:
    return lambda s: [((), s["wal"][key])]


def _has_wal(s: Samples) -> bool:
    return s["wal"] is not None


METRICS: tuple[MetricDef, ...] = (
    MetricDef(
        "mllp_connections_open", "mllp.connections.open", "updown",
        "MLLP connections open now.", read=lambda s: [((), s["open"])]),
    MetricDef(
        "mllp_connections_accepted", "mllp.connections.accepted", "counter",
        "MLLP connections accepted.", read=_stat("connections_accepted")),
    MetricDef(
        "mllp_connections_refused", "mllp.connections.refused", "counter",
        "MLLP connections closed at once by MLLP_MAX_CONNECTIONS.",
        read=_stat("connections_refused")),
    MetricDef(
        "mllp_frames", "mllp.frames", "counter", "MLLP frames by result.", ("result",),
        read=lambda s: [((r,), s["stats"].get(k, 0)) for r, k in _FRAME_RESULTS]),
    MetricDef(
        "mllp_junk_bytes", "mllp.junk_bytes", "counter", "Bytes discarded outside any frame.",
        unit="By", read=_stat("junk_bytes")),
    MetricDef(
        "mllp_buffer_full", "mllp.buffer_full", "counter",
        "Times MLLP_MAX_BUFFER was reached and reading paused on all connections.",
        read=_stat("buffer_full")),
    MetricDef(
        "mllp_proxy_headers_invalid", "mllp.proxy_headers.invalid", "counter",
        "Connections closed for a malformed or oversized PROXY header.",
        read=_stat("proxy_headers_invalid")),
    MetricDef(
        "mllp_connection_timeouts", "mllp.connection.timeouts", "counter",
        "Connections closed by a timeout, by kind.", ("kind",),
        read=lambda s: [((k,), s["stats"].get(f"{k}_timeouts", 0)) for k in ("idle", "write")]),
    MetricDef(
        "mllp_messages", "mllp.messages", "counter",
        "Messages answered, by message type (MSH-9.1) and ACK code.", ("msg_type", "code"),
        read=lambda s: [((t, c), n) for (t, c), n in sorted(s["messages"].items())]),
    MetricDef(
        "mllp_ack_latency_seconds", "mllp.ack.latency", "histogram",
        "Seconds from a frame's arrival to its ACK being written.",
        unit="s", buckets=LATENCY_BUCKETS, series=lambda m: [((), m.ack_latency)]),
    MetricDef(
        "mllp_commit_latency_seconds", "mllp.commit.latency", "histogram",
        "Seconds per outbox commit.",
        unit="s", buckets=LATENCY_BUCKETS, series=lambda m: [((), m.commit_latency)]),
    MetricDef(
        "mllp_commit_batch_size", "mllp.commit.batch_size", "histogram",
        "Messages per outbox commit.", buckets=BATCH_BUCKETS,
        series=lambda m: [((), m.commit_batch)]),
    MetricDef(
        "mllp_tls_handshake_failures", "mllp.tls.handshake_failures", "counter",
        "TLS handshakes that failed or timed out.", read=_stat("tls_handshake_failures")),
    MetricDef(
        "mllp_tls_reloads", "mllp.tls.reloads", "counter",
        "TLS certificate reloads by result.", ("result",),
        read=lambda s: [((r,), s["tls_reloads"].get(r, 0)) for r in ("ok", "failed")]),
    MetricDef(
        "mllp_tls_connections_closed", "mllp.tls.connections_closed", "counter",
        "Open TLS connections closed by a reload: client certificate revoked or no longer mapped.",
        ("reason",),
        read=lambda s: [((r,), s["tls_closed"].get(r, 0)) for r in ("revoked", "unmapped")]),
    MetricDef(
        "mllp_outbox_depth", "mllp.outbox.depth", "gauge",
        "Messages waiting for delivery, per connector.", ("connector",),
        read=lambda s: [((c,), n) for c, (n, _) in sorted(s["depth"].items())]),
    MetricDef(
        "mllp_outbox_oldest_age_seconds", "mllp.outbox.oldest_age", "gauge",
        "Age of the oldest message waiting, per connector.", ("connector",), unit="s",
        read=lambda s: [((c,), age) for c, (_, age) in sorted(s["depth"].items())]),
    MetricDef(
        "mllp_connector_lease", "mllp.connector.lease", "gauge",
        "1 while this replica delivers for the connector (PostgreSQL outbox).", ("connector",),
        read=lambda s: [((c,), held) for c, held in sorted(s["leases"].items())],
        when=lambda s: bool(s["leases"])),
    MetricDef(
        "mllp_deliveries", "mllp.deliveries", "counter",
        "Delivery attempts by connector and result.", ("connector", "result"),
        read=lambda s: [((c, r), n) for (c, r), n in sorted(s["deliveries"].items())]),
    MetricDef(
        "mllp_dead_letters", "mllp.dead_letters", "counter",
        "Messages dead-lettered, per connector.", ("connector",),
        read=lambda s: [((c,), n) for c, n in sorted(s["dead_letters"].items())]),
    MetricDef(
        "mllp_outbox_wal_bytes", "mllp.outbox.wal.bytes", "gauge",
        "Bytes in the outbox's SQLite WAL at the last checkpoint.", unit="By",
        read=_wal("bytes"), when=_has_wal),
    MetricDef(
        "mllp_outbox_wal_file_bytes", "mllp.outbox.wal.file_bytes", "gauge",
        "Size of the outbox's SQLite WAL file.", unit="By",
        read=_wal("file_bytes"), when=_has_wal),
    MetricDef(
        "mllp_outbox_wal_written_bytes", "mllp.outbox.wal.written", "counter",
        "Bytes written to the outbox's SQLite WAL.", unit="By",
        read=_wal("written_bytes"), when=_has_wal),
    MetricDef(
        "mllp_outbox_checkpoints", "mllp.outbox.checkpoints", "counter",
        "WAL checkpoints by mode and result.", ("mode", "result"),
        read=lambda s: [
            ((mode, result), s["wal"]["checkpoints"].get((mode, result), 0))
            for mode in CHECKPOINT_MODES for result in ("ok", "busy", "failed")
        ],
        when=_has_wal),
    MetricDef(
        "mllp_outbox_checkpoint_seconds", "mllp.outbox.checkpoint.duration", "histogram",
        "Seconds per WAL checkpoint; a restart holds the writer (and ACKs) that long.",
        ("mode",), unit="s", buckets=LATENCY_BUCKETS,
        series=lambda m: [((mode,), b) for mode, b in m.checkpoint_latency.items()],
        when=_has_wal),
)


def _buckets(name: str) -> Buckets:
    """An empty histogram with the bounds METRICS gives ``name``."""
    (bounds,) = (d.buckets for d in METRICS if d.name == name)
    return Buckets(bounds)


class _Collector:
    """The Prometheus side: one family per row of METRICS."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def collect(self) -> Iterator[Metric]:
        m = self.m
        s = m.samples()
        base = list(m.const_labels)
        base_values = list(m.const_labels.values())
        for d in METRICS:
            if d.when is not None and not d.when(s):
                continue
            labels = [*base, *d.labels]
            if d.series is not None:
                h = HistogramMetricFamily(d.name, d.help, labels=labels)
                for values, buckets in d.series(m):
                    h.add_metric([*base_values, *values], buckets.cumulative(), buckets.sum)
                yield h
                continue
            assert d.read is not None
            family = (CounterMetricFamily if d.kind == "counter" else GaugeMetricFamily)(
                d.name, d.help, labels=labels
            )
            for values, value in d.read(s):
                family.add_metric([*base_values, *values], value)
            yield family


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
    """
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
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
    otlp_instruments(metrics, provider.get_meter("mllpd"))
    log.info("exporting metrics over OTLP", event="otlp_export_started")
    return OTLPExport(provider)


def otlp_instruments(metrics: Metrics, meter: Any) -> None:
    """One OpenTelemetry instrument per row of METRICS on ``meter``.

    Counters and gauges are observable instruments reading the same values as
    a scrape. The histograms are recorded as they happen (from here on), an
    extra cost per message paid only while OTLP export is on.
    """
    from opentelemetry.metrics import CallbackOptions, Observation

    lock = threading.Lock()
    cache: dict[str, Any] = {"at": -1.0}

    def snapshot() -> Samples:
        # About one copy per export, shared by that export's callbacks.
        with lock:
            now = time.monotonic()
            if now - cache["at"] > 0.5:
                cache["at"], cache["s"] = now, metrics.samples()
            return cache["s"]

    def observe(d: MetricDef) -> Callable[[CallbackOptions], list[Observation]]:
        assert d.read is not None
        read = d.read

        def callback(options: CallbackOptions) -> list[Observation]:
            s = snapshot()
            if d.when is not None and not d.when(s):
                return []
            return [Observation(v, dict(zip(d.labels, values, strict=True))) for values, v in read(s)]

        return callback

    create = {
        "counter": meter.create_observable_counter,
        "gauge": meter.create_observable_gauge,
        "updown": meter.create_observable_up_down_counter,
    }
    for d in METRICS:
        if d.series is None:
            create[d.kind](d.otlp, callbacks=[observe(d)], unit=d.unit, description=d.help)
            continue
        histogram = meter.create_histogram(
            d.otlp, unit=d.unit, description=d.help,
            explicit_bucket_boundaries_advisory=[float(b) for b in d.buckets],
        )
        for values, buckets in d.series(metrics):
            buckets.mirror = _recorder(histogram, dict(zip(d.labels, values, strict=True)))


def _recorder(histogram: Any, attributes: dict[str, str]) -> Callable[[float], None]:
    if not attributes:
        return histogram.record
    return lambda value: histogram.record(value, attributes)
