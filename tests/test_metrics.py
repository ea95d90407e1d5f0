"""Metrics: the collectors in-process, the Prometheus endpoint of the real
``twistd -n mllp`` after a known traffic mix, and OTLP export received by an
OTLP/HTTP receiver in the test.
"""

from __future__ import annotations

import urllib.request
from collections import Counter
from typing import Any

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor as _reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from mllpd.framing import frame
from mllpd.metrics import (
    CHECKPOINT_MODES,
    MAX_MSG_TYPES,
    METRICS,
    Buckets,
    Metrics,
    otlp_enabled,
    otlp_instruments,
)
from tests.serverproc import (
    LOOPBACK,
    MLLPClient,
    ServerProcess,
    hl7_message,
    make_workdir,
    spawn_server,
    start_server,
)
from tests.upstreams import until, wait_until

reactor: Any = _reactor


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) -> value of a Prometheus text page."""
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


class FakeFactory:
    def __init__(self) -> None:
        self.stats: Counter[str] = Counter()
        self.acks: Counter[tuple[str, str]] = Counter()
        self.open_connections = 0


class FakeWal:
    def __init__(self) -> None:
        self.wal_bytes = 10
        self.file_bytes = 20
        self.written_bytes = 30
        self.checkpoints = {("passive", "ok"): 1}
        self.observer: Any = None


class Checkpoint:
    def __init__(self, mode: str, seconds: float) -> None:
        self.mode = mode
        self.seconds = seconds


class CollectorTests(SynchronousTestCase):
    """What a scrape shows, from the counters mllpd already keeps."""

    def test_values_and_labels(self) -> None:
        """Counters, histograms and delivery metrics appear with pod labels and the type labels the server keeps."""
        m = Metrics(pod="mllpd-0", namespace="healthcare")
        source = FakeFactory()
        m.watch_connections(source)
        source.stats.update(connections_accepted=5, frames_ok=7, frames_junk=1, tls_handshake_failures=2)
        source.open_connections = 3
        source.acks.update({("ADT", "AA"): 6, ("ORU", "AE"): 1, ("other", "AR"): 1})
        m.ack_latency.observe(0.003)
        m.ack_latency.observe(20.0)
        m.commit_done(12, 0.002)
        m.delivery("ehr", "delivered")
        m.delivery("ehr", "retry")
        m.dead_letter("lake")
        m.set_depth("ehr", 4, 12.5)
        got = samples(generate_latest(m.registry).decode())
        pod = (("namespace", "healthcare"), ("pod", "mllpd-0"))

        def v(name: str, **labels: str) -> float:
            return got[(name, tuple(sorted((*pod, *labels.items()))))]

        self.assertEqual(v("mllp_connections_open"), 3)
        self.assertEqual(v("mllp_connections_accepted_total"), 5)
        self.assertEqual(v("mllp_frames_total", result="ok"), 7)
        self.assertEqual(v("mllp_frames_total", result="junk"), 1)
        self.assertEqual(v("mllp_tls_handshake_failures_total"), 2)
        self.assertEqual(v("mllp_messages_total", msg_type="ADT", code="AA"), 6)
        self.assertEqual(v("mllp_messages_total", msg_type="other", code="AR"), 1)
        self.assertEqual(v("mllp_ack_latency_seconds_bucket", le="0.005"), 1)
        self.assertEqual(v("mllp_ack_latency_seconds_bucket", le="+Inf"), 2)
        self.assertEqual(v("mllp_ack_latency_seconds_count"), 2)
        self.assertEqual(v("mllp_commit_batch_size_bucket", le="16.0"), 1)
        self.assertEqual(v("mllp_commit_batch_size_bucket", le="8.0"), 0)
        self.assertEqual(v("mllp_deliveries_total", connector="ehr", result="retry"), 1)
        self.assertEqual(v("mllp_dead_letters_total", connector="lake"), 1)
        self.assertEqual(v("mllp_outbox_depth", connector="ehr"), 4)
        self.assertEqual(v("mllp_outbox_oldest_age_seconds", connector="ehr"), 12.5)

    def test_lease_gauge_says_which_pod_delivers(self) -> None:
        """With the PostgreSQL outbox, mllp_connector_lease is 1 for the connectors this pod delivers for, 0 for the others; absent otherwise."""
        m = Metrics(pod="mllpd-1")
        self.assertNotIn("mllp_connector_lease", generate_latest(m.registry).decode())
        m.set_lease("ehr", True)
        m.set_lease("lab", True)
        m.set_lease("lab", False)
        got = samples(generate_latest(m.registry).decode())
        self.assertEqual(got[("mllp_connector_lease", (("connector", "ehr"), ("pod", "mllpd-1")))], 1)
        self.assertEqual(got[("mllp_connector_lease", (("connector", "lab"), ("pod", "mllpd-1")))], 0)

    def test_message_types_bounded(self) -> None:
        """A sender cycling through message types leaves at most MAX_MSG_TYPES labels plus 'other', with every reply counted."""
        from tests.test_protocol import Harness

        h = Harness()
        m = Metrics()
        m.watch_connections(h.factory)
        proto, _ = h.connect()
        sent = 0
        for n in range(MAX_MSG_TYPES + 200):
            for version in ("2.5", "9.9"):  # AA, then AR (unsupported version)
                payload = f"MSH|^~\\&|A|B|C|D|||{n:03X}^A01|C{sent}|P|{version}\r".encode()
                proto.dataReceived(frame(payload))
                sent += 1
        messages = m.samples()["messages"]
        types = {msg_type for msg_type, _ in messages}
        self.assertEqual(len(types), MAX_MSG_TYPES + 1)
        self.assertIn("other", types)
        self.assertEqual(len(h.factory.acks), 2 * (MAX_MSG_TYPES + 1))
        self.assertEqual(sum(messages.values()), sent)
        self.assertEqual(messages[("other", "AR")], 200)

    def test_buckets(self) -> None:
        """An observation lands in the first bucket whose bound it does not exceed."""
        b = Buckets((1.0, 2.0))
        for value in (0.5, 1.0, 1.5, 3.0):
            b.observe(value)
        self.assertEqual(b.cumulative(), [("1.0", 2), ("2.0", 3), ("+Inf", 4)])
        self.assertEqual(b.sum, 6.0)

    def test_otlp_and_prometheus_show_the_same_metrics(self) -> None:
        """OTLP export and /metrics show every metric, each with the same description."""
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader

        m = Metrics(pod="mllpd-0")
        reader = InMemoryMetricReader()
        provider = MeterProvider(metric_readers=[reader])
        self.addCleanup(provider.shutdown)
        otlp_instruments(m, provider.get_meter("test"))
        source = FakeFactory()
        source.acks[("ADT", "AA")] += 1
        m.watch_connections(source)
        m.watch_tls_reloads({"ok": 1})
        wal = FakeWal()
        m.watch_wal(wal)
        for mode in CHECKPOINT_MODES:
            wal.observer(Checkpoint(mode, 0.01))
        m.ack_latency.observe(0.002)
        m.commit_done(3, 0.004)
        m.delivery("ehr", "delivered")
        m.dead_letter("ehr")
        m.set_depth("ehr", 1, 2.0)
        m.set_lease("ehr", True)
        scraped = {
            f.name: f.documentation
            for f in text_string_to_metric_families(generate_latest(m.registry).decode())
        }
        exported = {
            metric.name: metric.description
            for rm in reader.get_metrics_data().resource_metrics
            for sm in rm.scope_metrics
            for metric in sm.metrics
        }
        otlp_name = {d.name: d.otlp for d in METRICS}
        self.assertEqual(len(scraped), len(METRICS))
        self.assertEqual({otlp_name[name]: doc for name, doc in scraped.items()}, exported)

    def test_otlp_enabled_by_standard_variables(self) -> None:
        """OTLP export follows the OTEL_* variables."""
        self.assertFalse(otlp_enabled({}))
        self.assertTrue(otlp_enabled({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}))
        self.assertTrue(otlp_enabled({"OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://c:4318/v1/metrics"}))
        self.assertFalse(otlp_enabled({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c", "OTEL_METRICS_EXPORTER": "none"}))
        self.assertFalse(otlp_enabled({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c", "OTEL_SDK_DISABLED": "true"}))


def send_mix(port: int) -> None:
    """3 ADT AA, 1 ORU AA, 1 AE, 1 AR (version), 1 AR (not HL7), junk, an
    oversized frame, and one connection refused by MLLP_MAX_CONNECTIONS=2."""
    with MLLPClient(port) as client:
        for n in range(3):
            assert client.request(hl7_message(f"ADT-{n}")).code == "AA"
        assert client.request(hl7_message("ORU-1", msg_type="ORU^R01")).code == "AA"
        assert client.request(hl7_message("AE-1", msg_type="")).code == "AE"
        assert client.request(hl7_message("AR-1", version="3.0")).code == "AR"
        assert client.request(b"not hl7 at all").code == "AR"
        client.sock.sendall(b"junk\r\n")
        assert client.request(hl7_message("ADT-3")).code == "AA"
        with MLLPClient(port) as second, MLLPClient(port) as third:
            assert second.request(hl7_message("ADT-4")).code == "AA"
            assert third.wait_closed(timeout=10) == []
    with MLLPClient(port) as big:
        big.send(hl7_message("BIG-1", extra=["OBX|1|ST|X||" + "x" * 5000]))
        frames = big.wait_closed(timeout=10)
        assert [f.split(b"MSA|")[1][:2] for f in frames] == [b"AR"], frames


class PrometheusTests(SynchronousTestCase):
    """The scrape endpoint of the real process."""

    def test_scrape_after_traffic_mix(self) -> None:
        """After a known mix of traffic, /metrics shows exactly its counts."""
        server = spawn_server(self, env={
            "MLLP_METRICS_ADDR": f"tcp:0:interface={LOOPBACK}",
            "MLLP_MAX_CONNECTIONS": "2",
            "MLLP_MAX_FRAME_SIZE": "4KiB",
            "POD_NAME": "mllpd-0",
        })
        metrics_port = server.wait_for_event("metrics_listening")["port"]
        port = server.wait_listening()
        send_mix(port)
        url = f"http://{LOOPBACK}:{metrics_port}/metrics"
        # Three connections were served (one more refused): once all three
        # have closed, every count is final.
        for _ in range(3):
            server.wait_for_event("connection_closed", timeout=10)
        with urllib.request.urlopen(url, timeout=10) as response:
            self.assertTrue(response.headers["content-type"].startswith("text/plain"))
            got = samples(response.read().decode())

        def v(name: str, **labels: str) -> float:
            return got.get((name, tuple(sorted({"pod": "mllpd-0", **labels}.items()))), -1)

        self.assertEqual(v("mllp_connections_open"), 0)
        self.assertEqual(v("mllp_connections_accepted_total"), 4)
        self.assertEqual(v("mllp_connections_refused_total"), 1)
        self.assertEqual(v("mllp_frames_total", result="ok"), 9)
        self.assertEqual(v("mllp_frames_total", result="oversized"), 1)
        self.assertEqual(v("mllp_frames_total", result="junk"), 1)
        self.assertEqual(v("mllp_junk_bytes_total"), 6)
        self.assertEqual(v("mllp_messages_total", msg_type="ADT", code="AA"), 5)
        self.assertEqual(v("mllp_messages_total", msg_type="ORU", code="AA"), 1)
        self.assertEqual(v("mllp_messages_total", msg_type="ADT", code="AR"), 2)  # version, oversized
        self.assertEqual(v("mllp_messages_total", msg_type="other", code="AE"), 1)  # empty MSH-9
        self.assertEqual(v("mllp_messages_total", msg_type="other", code="AR"), 1)  # not HL7
        self.assertEqual(v("mllp_ack_latency_seconds_count"), 10)  # one per reply
        self.assertEqual(v("mllp_commit_batch_size_sum"), 6)  # six stored
        self.assertGreaterEqual(v("mllp_commit_latency_seconds_count"), 1)
        self.assertEqual(v("mllp_tls_handshake_failures_total"), 0)


    def test_delivery_metrics(self) -> None:
        """Deliveries, dead letters and queue depth per connector show on /metrics."""
        import http.server
        import os
        import socket
        import threading

        class Upstream(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                self.send_response(400 if b"|BAD-1|" in body else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        upstream = http.server.ThreadingHTTPServer((LOOPBACK, 0), Upstream)
        upstream.daemon_threads = True
        upstream.block_on_close = False  # type: ignore[attr-defined]
        threading.Thread(target=upstream.serve_forever, daemon=True).start()
        self.addCleanup(upstream.server_close)
        self.addCleanup(upstream.shutdown)
        closed = socket.socket()
        closed.bind((LOOPBACK, 0))  # bound, never listening: connections refused
        self.addCleanup(closed.close)
        workdir = make_workdir(self)
        config = os.path.join(workdir, "mllp.yaml")
        with open(config, "w") as f:
            f.write(
                "connectors:\n"
                f"  - {{name: lake, type: http, url: 'http://{LOOPBACK}:{upstream.server_port}/'}}\n"
                f"  - {{name: ehr, type: mllp, address: 'tcp:{LOOPBACK}:{closed.getsockname()[1]}',"
                " connect_timeout: 500ms}\n"
                "retry: {initial: 10s, max: 1m}\n"
            )
        server = spawn_server(self, workdir=workdir, env={
            "MLLP_METRICS_ADDR": f"tcp:0:interface={LOOPBACK}", "MLLP_CONFIG": config,
        })
        metrics_port = server.wait_for_event("metrics_listening")["port"]
        port = server.wait_listening()
        with MLLPClient(port) as client:
            for control_id in ("OK-1", "OK-2", "BAD-1", "OK-3"):
                self.assertEqual(client.request(hl7_message(control_id)).code, "AA")

        def v(got: dict[Any, float], name: str, **labels: str) -> float:
            return got.get((name, tuple(sorted(labels.items()))), -1)

        url = f"http://{LOOPBACK}:{metrics_port}/metrics"

        def scrape() -> dict[Any, float]:
            with urllib.request.urlopen(url, timeout=10) as response:
                return samples(response.read().decode())

        got = wait_until(scrape, lambda got: (
                v(got, "mllp_deliveries_total", connector="lake", result="delivered") == 3
                and v(got, "mllp_outbox_depth", connector="lake") == 0
                and v(got, "mllp_outbox_depth", connector="ehr") == 4
                and v(got, "mllp_deliveries_total", connector="ehr", result="retry") >= 1
            ), timeout=20, what="the deliveries and queue depths")
        self.assertEqual(v(got, "mllp_deliveries_total", connector="lake", result="delivered"), 3)
        self.assertEqual(v(got, "mllp_deliveries_total", connector="lake", result="dead"), 1)
        self.assertEqual(v(got, "mllp_dead_letters_total", connector="lake"), 1)
        self.assertEqual(v(got, "mllp_outbox_depth", connector="lake"), 0)
        self.assertEqual(v(got, "mllp_outbox_depth", connector="ehr"), 4)
        self.assertGreaterEqual(v(got, "mllp_deliveries_total", connector="ehr", result="retry"), 1)
        self.assertGreater(v(got, "mllp_outbox_oldest_age_seconds", connector="ehr"), 0)

    def test_scrape_during_shutdown(self) -> None:
        """Metrics stay scrapeable while the staged shutdown runs."""
        import signal

        server = spawn_server(self, env={
            "MLLP_METRICS_ADDR": f"tcp:0:interface={LOOPBACK}", "PRE_SHUTDOWN_DELAY": "1s",
        })
        metrics_port = server.wait_for_event("metrics_listening")["port"]
        server.wait_listening()
        server.send_signal(signal.SIGTERM)
        server.wait_for_event("shutdown_pre_delay", timeout=10)
        url = f"http://{LOOPBACK}:{metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            self.assertIn("mllp_connections_open", response.read().decode())
        self.assertEqual(server.wait(timeout=30), 0, server.output())


class OTLPReceiver(Resource):
    """Collects OTLP/HTTP protobuf export requests."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[ExportMetricsServiceRequest] = []

    def render_POST(self, request: Request) -> bytes:
        assert request.content is not None
        body = request.content.read()
        if request.getHeader("content-encoding") == "gzip":
            import gzip

            body = gzip.decompress(body)
        message = ExportMetricsServiceRequest()
        message.ParseFromString(body)
        self.requests.append(message)
        request.setHeader(b"content-type", b"application/x-protobuf")
        return b""

    def latest(self) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
        """metric name -> labels -> value (sum/gauge points; histogram count)."""
        out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
        for req in self.requests:
            for rm in req.resource_metrics:
                for sm in rm.scope_metrics:
                    for metric in sm.metrics:
                        kind = metric.WhichOneof("data")
                        points = getattr(metric, kind).data_points
                        values = out.setdefault(metric.name, {})
                        for p in points:
                            labels = tuple(sorted((a.key, a.value.string_value) for a in p.attributes))
                            if kind == "histogram":
                                values[labels] = p.count
                            else:
                                values[labels] = p.as_int if p.HasField("as_int") else p.as_double
        return out

    def resource(self) -> dict[str, str]:
        for req in self.requests:
            for rm in req.resource_metrics:
                return {a.key: a.value.string_value for a in rm.resource.attributes}
        return {}


class OTLPTests(TestCase):
    """OTLP export from the real process to a receiver in the test."""

    timeout = 60

    async def test_otlp_export(self) -> None:
        """With OTEL_EXPORTER_OTLP_METRICS_ENDPOINT set, the counts arrive over OTLP/HTTP."""
        receiver = OTLPReceiver()
        listening = await TCP4ServerEndpoint(reactor, 0, interface=LOOPBACK).listen(Site(receiver))
        self.addCleanup(listening.stopListening)
        url = f"http://{LOOPBACK}:{listening.getHost().port}/v1/metrics"
        server: ServerProcess = start_server(self, env={
            "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": url,
            "OTEL_METRIC_EXPORT_INTERVAL": "200",
            "POD_NAME": "mllpd-1",
        })
        assert server.port is not None
        with MLLPClient(server.port) as client:
            for n in range(4):
                self.assertEqual(client.request(hl7_message(f"OT-{n}")).code, "AA")
            self.assertEqual(client.request(hl7_message("OT-AR", version="3.0")).code, "AR")
        got: dict[str, Any] = await until(
            receiver.latest,
            lambda got: got.get("mllp.messages", {}).get((("code", "AA"), ("msg_type", "ADT"))) == 4,
            what="the four AA messages over OTLP")
        self.assertEqual(got["mllp.messages"][(("code", "AA"), ("msg_type", "ADT"))], 4)
        self.assertEqual(got["mllp.messages"][(("code", "AR"), ("msg_type", "ADT"))], 1)
        self.assertEqual(got["mllp.connections.accepted"][()], 1)
        self.assertEqual(got["mllp.frames"][(("result", "ok"),)], 5)
        self.assertEqual(got["mllp.ack.latency"][()], 5)
        self.assertEqual(receiver.resource().get("k8s.pod.name"), "mllpd-1")
        self.assertEqual(receiver.resource().get("service.name"), "mllpd")
        code = server.stop()
        self.assertEqual(code, 0, server.output())
