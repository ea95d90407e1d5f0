"""The http connector against a real twisted.web server on 127.0.0.1."""

from __future__ import annotations

import datetime
import os
import tempfile
import uuid
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import reactor as _reactor
from twisted.internet import ssl
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from mllpd.config import ConfigError
from mllpd.connectors import ConnectorSpec, Dead, Delivered, Delivery, Retry
from mllpd.connectors.http import HTTPConnector, build, mime_charset, parse_retry_after

reactor: Any = _reactor

# CR segment separators and a Latin-1 byte: what arrives upstream must be
# these bytes, not a re-encoding.
PAYLOAD = (
    b"MSH|^~\\&|LAB|HOSP|EHR|HOSP|20260101120000||ORU^R01^ORU_R01|C123|P|2.5|||||||8859/1\r"
    b"PID|1||4711^^^H||M\xfcLLER^J\xe9R\xd4ME\r"
    b"OBX|1|NM|GLU||5.4|mmol/L\r"
)


def delivery(payload: bytes = PAYLOAD, codec: str = "iso8859-1", charset: str | None = "8859/1") -> Delivery:
    return Delivery(
        message_id=uuid.uuid4().hex,
        connector="lake",
        payload=payload,
        charset=charset,
        codec=codec,
        control_id="C123",
        msg_type="ORU^R01",
        attempt=1,
    )


@dataclass
class Reply:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    hang: bool = False


@dataclass
class Received:
    method: bytes
    uri: bytes
    headers: dict[bytes, list[bytes]]
    body: bytes


class Upstream(Resource):
    """Answers each POST with the next scripted Reply and records what came."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.script: list[Reply] = []
        self.received: list[Received] = []
        self.waiting: list[Deferred[None]] = []

    def render_POST(self, request: Request) -> bytes | int:
        assert request.content is not None
        self.received.append(Received(
            request.method,
            request.uri,
            {k.lower(): list(v) for k, v in request.requestHeaders.getAllRawHeaders()},
            request.content.read(),
        ))
        waiting, self.waiting = self.waiting, []
        for d in waiting:
            d.callback(None)
        reply = self.script.pop(0) if self.script else Reply()
        if reply.hang:
            return NOT_DONE_YET
        request.setResponseCode(reply.status)
        for name, value in reply.headers.items():
            request.setHeader(name, value)
        return reply.body

    def request_arrived(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.waiting.append(d)
        return d


class _Tracked(ProtocolWrapper):
    def __init__(self, factory: WrappingFactory, wrapped: Any) -> None:
        super().__init__(factory, wrapped)
        self.lost: Deferred[None] = Deferred()

    def connectionLost(self, reason: Any) -> None:
        super().connectionLost(reason)
        self.lost.callback(None)


class Tracking(WrappingFactory):
    """Wraps a server factory so a test can count and drop its connections."""

    protocol = _Tracked

    def __init__(self, factory: Any) -> None:
        super().__init__(factory)
        self.connections: list[_Tracked] = []

    def buildProtocol(self, addr: Any) -> Any:
        protocol = super().buildProtocol(addr)
        self.connections.append(protocol)
        return protocol

    @property
    def accepted(self) -> int:
        return len(self.connections)

    async def close_all(self) -> None:
        for protocol in self.connections:
            if not protocol.lost.called:
                protocol.transport.abortConnection()
        await gatherResults([p.lost for p in self.connections])


def spec(**options: Any) -> ConnectorSpec:
    return ConnectorSpec("lake", "http", None, options)


class UpstreamCase(TestCase):
    """Starts scripted upstream servers and connectors, and cleans both up."""

    clock: Clock

    def serve(self, *replies: Reply, tls: Any = None) -> tuple[Upstream, Tracking, str]:
        upstream = Upstream()
        upstream.script.extend(replies)
        site = Tracking(Site(upstream))
        if tls is None:
            port = reactor.listenTCP(0, site, interface="127.0.0.1")
            scheme = "http"
        else:
            port = reactor.listenSSL(0, site, tls, interface="127.0.0.1")
            scheme = "https"

        async def close() -> None:
            await port.stopListening()
            await site.close_all()

        self.addCleanup(lambda: Deferred.fromCoroutine(close()))
        return upstream, site, f"{scheme}://127.0.0.1:{port.getHost().port}/hl7/in?src=mllpd"

    def connector(self, url: str, environ: dict[str, str] | None = None, **options: Any) -> HTTPConnector:
        connector = build(spec(url=url, **options), reactor, environ or {}, clock=self.clock)
        connector.start()
        self.addCleanup(connector.stop)
        return connector

class HTTPConnectorTests(UpstreamCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_800_000_000)

    async def test_exact_bytes_and_headers(self) -> None:
        """200 is delivered; upstream got the exact bytes, charset, and the message id as idempotency key."""
        upstream, _, url = self.serve(Reply(200))
        d = delivery()
        outcome = await self.connector(url).deliver(d)
        self.assertIsInstance(outcome, Delivered)
        [got] = upstream.received
        self.assertEqual(got.method, b"POST")
        self.assertEqual(got.uri, b"/hl7/in?src=mllpd")
        self.assertEqual(got.body, PAYLOAD)
        self.assertEqual(got.headers[b"content-type"], [b"x-application/hl7-v2+er7; charset=ISO-8859-1"])
        self.assertEqual(got.headers[b"idempotency-key"], [d.message_id.encode()])
        self.assertEqual(got.headers[b"x-mllp-message-id"], [d.message_id.encode()])

    async def test_charset_follows_the_codec(self) -> None:
        """A UTF-8 message is labelled charset=UTF-8 and its bytes pass unchanged."""
        upstream, _, url = self.serve(Reply(200))
        payload = "MSH|^~\\&|A|B|C|D|||ADT^A01|X|P|2.5|||||||UNICODE UTF-8\rPID|1||1||Ståhl^Åsa\r".encode()
        outcome = await self.connector(url).deliver(delivery(payload, "utf-8", "UNICODE UTF-8"))
        self.assertIsInstance(outcome, Delivered)
        self.assertEqual(upstream.received[0].body, payload)
        self.assertEqual(upstream.received[0].headers[b"content-type"], [b"x-application/hl7-v2+er7; charset=UTF-8"])

    async def test_large_payload(self) -> None:
        """A 2 MiB message with every byte value arrives byte for byte."""
        upstream, _, url = self.serve(Reply(200))
        payload = PAYLOAD + bytes(range(256)) * (2 * 1024 * 1024 // 256)
        self.assertIsInstance(await self.connector(url).deliver(delivery(payload)), Delivered)
        self.assertEqual(upstream.received[0].body, payload)
        self.assertEqual(upstream.received[0].headers[b"content-length"], [str(len(payload)).encode()])

    async def test_statuses(self) -> None:
        """2xx delivered; 408, 429, 5xx retried; 400 and 404 dead-lettered; 3xx retried, not followed."""
        cases: list[tuple[Reply, type, float | None]] = [
            (Reply(200), Delivered, None),
            (Reply(201), Delivered, None),
            (Reply(204), Delivered, None),
            (Reply(400, body=b"bad segment PID"), Dead, None),
            (Reply(404), Dead, None),
            (Reply(408), Retry, None),
            (Reply(429), Retry, None),
            (Reply(429, {"Retry-After": "120"}), Retry, 120.0),
            (Reply(500, body=b"oops"), Retry, None),
            (Reply(502), Retry, None),
            (Reply(503, {"Retry-After": "7"}), Retry, 7.0),
            (Reply(307, {"Location": "http://127.0.0.1:1/elsewhere"}), Retry, None),
        ]
        upstream, site, url = self.serve(*(reply for reply, _, _ in cases))
        connector = self.connector(url)
        for reply, kind, after in cases:
            outcome = await connector.deliver(delivery())
            self.assertIsInstance(outcome, kind, f"HTTP {reply.status}")
            if isinstance(outcome, Retry):
                self.assertEqual(outcome.after, after, f"HTTP {reply.status}")
            if not isinstance(outcome, Delivered):
                self.assertIn(f"HTTP {reply.status}", outcome.reason)
        # Every request went to the configured URL (the 307 was not followed).
        self.assertEqual(len(upstream.received), len(cases))
        self.assertEqual({r.uri for r in upstream.received}, {b"/hl7/in?src=mllpd"})
        # One persistent connection carried them all.
        self.assertEqual(site.accepted, 1)

    async def test_lanes_share_a_kept_alive_pool(self) -> None:
        """With lanes: 3, three requests at once open three connections, which the next three reuse."""
        upstream, site, url = self.serve()
        connector = build(spec(url=url)._replace(lanes=3), reactor, {}, clock=self.clock)
        connector.start()
        self.addCleanup(connector.stop)
        for _ in range(2):
            outcomes = await gatherResults([connector.deliver(delivery()) for _ in range(3)])
            self.assertTrue(all(isinstance(o, Delivered) for o in outcomes), outcomes)
        self.assertEqual(len(upstream.received), 6)
        self.assertEqual(site.accepted, 3)

    async def test_retry_after_http_date(self) -> None:
        """429 with an HTTP-date Retry-After waits until that date."""
        when = self.clock.seconds() + 90
        _, _, url = self.serve(Reply(429, {"Retry-After": formatdate(when, usegmt=True)}))
        outcome = await self.connector(url).deliver(delivery())
        self.assertEqual(outcome, Retry("HTTP 429 Too Many Requests", 90.0))

    async def test_unreadable_retry_after_uses_backoff(self) -> None:
        """A Retry-After that is neither seconds nor a date leaves the relay's backoff in charge."""
        _, _, url = self.serve(Reply(503, {"Retry-After": "soon"}))
        outcome = await self.connector(url).deliver(delivery())
        self.assertEqual(outcome, Retry("HTTP 503 Service Unavailable", None))

    async def test_hang_past_timeout(self) -> None:
        """No answer within the timeout: Retry, and the hung connection is closed."""
        upstream, site, url = self.serve(Reply(hang=True), Reply(200))
        connector = self.connector(url, timeout="2s")
        arrived = upstream.request_arrived()
        pending = connector.deliver(delivery())
        await arrived
        self.clock.advance(1.9)
        self.assertFalse(pending.called)
        self.clock.advance(0.2)
        outcome = await pending
        self.assertEqual(outcome, Retry("no response within 2s"))
        await site.connections[0].lost  # the server saw the connection go
        # The next delivery works on a new connection.
        self.assertIsInstance(await connector.deliver(delivery()), Delivered)

    async def test_closed_port(self) -> None:
        """Nobody listening: Retry saying the connection was refused."""
        port = reactor.listenTCP(0, Site(Resource()), interface="127.0.0.1")
        number = port.getHost().port
        await port.stopListening()
        outcome = await self.connector(f"http://127.0.0.1:{number}/").deliver(delivery())
        self.assertEqual(outcome, Retry("connection refused"))

    async def test_server_drops_connection(self) -> None:
        """The server closing the connection without answering is a Retry, not a failure."""
        class Drop(Protocol):
            def dataReceived(self, data: bytes) -> None:
                assert self.transport is not None
                self.transport.loseConnection()

        from twisted.internet.protocol import Factory

        port = reactor.listenTCP(0, Factory.forProtocol(Drop), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        outcome = await self.connector(f"http://127.0.0.1:{port.getHost().port}/").deliver(delivery())
        self.assertIsInstance(outcome, Retry)
        self.assertIn("ConnectionDone", outcome.reason)

    async def test_kept_alive_connection_closed_by_server(self) -> None:
        """A pooled connection the server closed is replaced at once: Delivered, not a Retry."""
        from twisted.internet.protocol import Factory

        class OneRequestPerConnection(Protocol):
            """Answers one request keep-alive, then drops the connection when
            the next request arrives on it (as servers with short keep-alive
            timeouts do)."""

            def connectionMade(self) -> None:
                self.buffer = b""
                self.answered = False

            def dataReceived(self, data: bytes) -> None:
                assert self.transport is not None
                if self.answered:
                    self.transport.loseConnection()
                    return
                self.buffer += data
                head, sep, body = self.buffer.partition(b"\r\n\r\n")
                if not sep:
                    return
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                if len(body) >= length:
                    self.answered = True
                    self.factory.bodies.append(body[:length])  # type: ignore[attr-defined]
                    self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

        factory = Factory.forProtocol(OneRequestPerConnection)
        factory.bodies = []  # type: ignore[attr-defined]
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        connector = self.connector(f"http://127.0.0.1:{port.getHost().port}/")
        first = await connector.deliver(delivery())
        second = await connector.deliver(delivery())
        self.assertIsInstance(first, Delivered)
        self.assertIsInstance(second, Delivered)
        self.assertEqual(len(factory.bodies), 2)  # type: ignore[attr-defined]

    async def test_env_expansion_in_headers(self) -> None:
        """Header values take ${VAR} from the environment; $${ stays literal."""
        upstream, _, url = self.serve(Reply(200))
        connector = self.connector(
            url,
            {"INGEST_TOKEN": "s3cr3t", "TENANT": "north"},
            headers={"Authorization": "Bearer ${INGEST_TOKEN}", "X-Tenant": "${TENANT}-$${x}", "X-Version": 2},
        )
        await connector.deliver(delivery())
        headers = upstream.received[0].headers
        self.assertEqual(headers[b"authorization"], [b"Bearer s3cr3t"])
        self.assertEqual(headers[b"x-tenant"], [b"north-${x}"])
        self.assertEqual(headers[b"x-version"], [b"2"])

    async def test_stop_waits_for_delivery_in_progress(self) -> None:
        """stop() lets the delivery in progress finish; later deliveries are retried, not sent."""
        upstream, _, url = self.serve(Reply(hang=True))
        connector = build(spec(url=url, timeout="5s"), reactor, {}, clock=self.clock)
        connector.start()
        arrived = upstream.request_arrived()
        pending = connector.deliver(delivery())
        await arrived
        stopped = connector.stop()
        self.assertFalse(stopped.called)
        self.clock.advance(5)
        self.assertEqual(await pending, Retry("no response within 5s"))
        await stopped
        self.assertEqual(await connector.deliver(delivery()), Retry("connector is stopping"))
        self.assertEqual(len(upstream.received), 1)

    async def test_logs_status_never_content(self) -> None:
        """Logs carry status codes and control ids, never the payload or the response body."""
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        _, _, url = self.serve(Reply(200, body=b"echo PID M\xfcLLER"), Reply(400, body=b"M\xfcLLER rejected"))
        connector = self.connector(url)
        await connector.deliver(delivery())
        await connector.deliver(delivery())
        text = "\n".join(formatEvent(e) + repr(e) for e in events if e.get("connector") == "lake")
        self.assertIn("HTTP 200", text)
        self.assertIn("HTTP 400", text)
        self.assertIn("C123", text)
        for secret in ("LLER", "J\xe9R", "GLU", "4711", "rejected"):
            self.assertNotIn(secret, text)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_pki(folder: str) -> dict[str, str]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files."""
    import ipaddress

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder().subject_name(_name("mllpd test CA")).issuer_name(_name("mllpd test CA"))
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    paths = {"ca": os.path.join(folder, "ca.pem")}
    with open(paths["ca"], "wb") as f:
        f.write(ca.public_bytes(serialization.Encoding.PEM))
    for role, san in (("server", x509.IPAddress(ipaddress.ip_address("127.0.0.1"))), ("client", x509.DNSName("mllpd"))):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder().subject_name(_name(f"mllpd test {role}")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([san]), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        paths[f"{role}_cert"] = os.path.join(folder, f"{role}.pem")
        paths[f"{role}_key"] = os.path.join(folder, f"{role}.key")
        with open(paths[f"{role}_cert"], "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
        with open(paths[f"{role}_key"], "wb") as f:
            f.write(key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ))
    return paths


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class HTTPSTests(UpstreamCase):
    def setUp(self) -> None:
        folder = tempfile.mkdtemp(prefix="mllpd-http-tls-")
        self.addCleanup(_rmtree, folder)
        self.pki = make_pki(folder)
        self.clock = Clock()

    def tls_server(self, require_client: bool) -> Any:
        server = ssl.PrivateCertificate.loadPEM(_read(self.pki["server_cert"]) + _read(self.pki["server_key"]))
        ca = ssl.Certificate.loadPEM(_read(self.pki["ca"]))
        if require_client:
            return server.options(ca)
        return server.options()

    async def test_ca_file(self) -> None:
        """https with ca_file trusts a server signed by that CA and delivers."""
        upstream, _, url = self.serve(Reply(200), tls=self.tls_server(False))
        outcome = await self.connector(url, ca_file=self.pki["ca"]).deliver(delivery())
        self.assertIsInstance(outcome, Delivered)
        self.assertEqual(upstream.received[0].body, PAYLOAD)

    async def test_untrusted_server_is_retried(self) -> None:
        """Without the CA the server's certificate is refused: Retry, nothing sent."""
        upstream, _, url = self.serve(Reply(200), tls=self.tls_server(False))
        outcome = await self.connector(url).deliver(delivery())
        self.assertIsInstance(outcome, Retry)
        self.assertIn("certificate verify failed", outcome.reason)
        self.assertEqual(upstream.received, [])

    async def test_client_certificate(self) -> None:
        """A server that requires client certificates accepts the configured one; without it, Retry."""
        upstream, _, url = self.serve(Reply(200), tls=self.tls_server(True))
        self.assertIsInstance(await self.connector(url, ca_file=self.pki["ca"]).deliver(delivery()), Retry)
        self.assertEqual(upstream.received, [])
        connector = self.connector(
            url, ca_file=self.pki["ca"], client_cert_file=self.pki["client_cert"],
            client_key_file=self.pki["client_key"],
        )
        self.assertIsInstance(await connector.deliver(delivery()), Delivered)
        self.assertEqual(len(upstream.received), 1)


def _rmtree(folder: str) -> None:
    for name in os.listdir(folder):
        os.remove(os.path.join(folder, name))
    os.rmdir(folder)


class BuildTests(SynchronousTestCase):
    def refused(self, environ: dict[str, str] | None = None, **options: Any) -> str:
        with self.assertRaises(ConfigError) as caught:
            build(spec(**options), reactor, environ or {})
        text = str(caught.exception)
        self.assertNotIn("\n", text)
        return text

    def test_url_required(self) -> None:
        """A connector without url stops startup naming connectors.<name>.url."""
        self.assertEqual(self.refused(), "MLLP_CONFIG: connectors.lake.url: is required")

    def test_url_scheme(self) -> None:
        """Only http and https URLs are accepted."""
        self.assertEqual(
            self.refused(url="ftp://example.org/x"),
            "MLLP_CONFIG: connectors.lake.url: expected an http:// or https:// URL",
        )
        self.assertEqual(
            self.refused(url="example.org/hl7"),
            "MLLP_CONFIG: connectors.lake.url: expected an http:// or https:// URL",
        )

    def test_url_bad_port_or_credentials(self) -> None:
        """A bad port and credentials in the URL are refused; the secret is not echoed."""
        self.assertIn("connectors.lake.url: invalid URL", self.refused(url="http://h:99999/"))
        text = self.refused(url="https://user:hunter2@h/")
        self.assertTrue(text.startswith("MLLP_CONFIG: connectors.lake.url: credentials in the URL"))
        self.assertNotIn("hunter2", text)

    def test_headers_must_be_a_map(self) -> None:
        """headers must be a map."""
        self.assertEqual(
            self.refused(url="http://h/", headers=["Authorization: x"]),
            "MLLP_CONFIG: connectors.lake.headers: expected a map of names to values",
        )

    def test_header_name_and_reserved(self) -> None:
        """Invalid header names and the connector's own headers are refused by name."""
        self.assertEqual(
            self.refused(url="http://h/", headers={"Bad Name": "x"}),
            "MLLP_CONFIG: connectors.lake.headers.Bad Name: invalid header name",
        )
        self.assertEqual(
            self.refused(url="http://h/", headers={"Content-Type": "text/plain"}),
            "MLLP_CONFIG: connectors.lake.headers.Content-Type: is set by the connector and cannot be configured",
        )
        self.assertEqual(
            self.refused(url="http://h/", headers={"X-A": None}),
            "MLLP_CONFIG: connectors.lake.headers.X-A: expected a string value",
        )

    def test_missing_env_var(self) -> None:
        """A header naming an unset or empty variable stops startup naming the variable."""
        self.assertEqual(
            self.refused(url="http://h/", headers={"Authorization": "Bearer ${INGEST_TOKEN}"}),
            "MLLP_CONFIG: connectors.lake.headers.Authorization: environment variable INGEST_TOKEN is not set",
        )
        self.assertEqual(
            self.refused({"INGEST_TOKEN": ""}, url="http://h/", headers={"Authorization": "Bearer ${INGEST_TOKEN}"}),
            "MLLP_CONFIG: connectors.lake.headers.Authorization: environment variable INGEST_TOKEN is empty",
        )

    def test_env_value_with_newline(self) -> None:
        """A secret with a line break would split the header: refused without echoing it."""
        text = self.refused({"T": "abc\r\nX-Evil: 1"}, url="http://h/", headers={"Authorization": "${T}"})
        self.assertEqual(
            text, "MLLP_CONFIG: connectors.lake.headers.Authorization: the value contains a line break or NUL"
        )

    def test_timeout(self) -> None:
        """timeout takes a Go duration greater than zero."""
        self.assertEqual(
            self.refused(url="http://h/", timeout="30"),
            "MLLP_CONFIG: connectors.lake.timeout: invalid duration '30'; expected a duration such as 30s, 500ms, 1m",
        )
        self.assertEqual(
            self.refused(url="http://h/", timeout="0"),
            "MLLP_CONFIG: connectors.lake.timeout: must be greater than 0",
        )
        self.assertEqual(build(spec(url="http://h/", timeout="1m30s"), reactor, {}).timeout, 90.0)
        self.assertEqual(build(spec(url="http://h/"), reactor, {}).timeout, 30.0)

    def test_tls_files(self) -> None:
        """TLS files apply to https only, must be readable, and come as cert and key together."""
        self.assertEqual(
            self.refused(url="http://h/", ca_file="/etc/ssl/ca.pem"),
            "MLLP_CONFIG: connectors.lake.ca_file: only applies to an https:// url",
        )
        self.assertIn(
            "MLLP_CONFIG: connectors.lake.ca_file: cannot read /nonexistent/ca.pem",
            self.refused(url="https://h/", ca_file="/nonexistent/ca.pem"),
        )
        folder = tempfile.mkdtemp(prefix="mllpd-http-tls-")
        self.addCleanup(_rmtree, folder)
        pki = make_pki(folder)
        self.assertEqual(
            self.refused(url="https://h/", ca_file=pki["server_key"]),
            "MLLP_CONFIG: connectors.lake.ca_file: no PEM certificate found",
        )
        self.assertEqual(
            self.refused(url="https://h/", client_cert_file=pki["client_cert"]),
            "MLLP_CONFIG: connectors.lake.client_key_file: is required with client_cert_file",
        )
        self.assertEqual(
            self.refused(url="https://h/", client_cert_file=pki["client_cert"], client_key_file=pki["server_key"]),
            "MLLP_CONFIG: connectors.lake.client_cert_file: cannot load the certificate and key as a PEM pair",
        )

    def test_unknown_option(self) -> None:
        """A misspelt option is refused rather than silently ignored."""
        self.assertEqual(
            self.refused(url="http://h/", timout="5s"),
            "MLLP_CONFIG: connectors.lake.timout: unknown option for a http connector; expected one of "
            "ca_file, client_cert_file, client_key_file, headers, timeout, url",
        )


class HelperTests(SynchronousTestCase):
    def test_mime_charset(self) -> None:
        """HL7 codecs map to the IANA names upstream parsers know."""
        self.assertEqual(mime_charset("iso8859-1"), "ISO-8859-1")
        self.assertEqual(mime_charset("latin-1"), "ISO-8859-1")
        self.assertEqual(mime_charset("iso8859-15"), "ISO-8859-15")
        self.assertEqual(mime_charset("ascii"), "US-ASCII")
        self.assertEqual(mime_charset("utf-8"), "UTF-8")
        self.assertEqual(mime_charset("utf-16"), "UTF-16")
        self.assertEqual(mime_charset("iso2022_jp"), "ISO-2022-JP")
        self.assertEqual(mime_charset("gb18030"), "GB18030")
        self.assertEqual(mime_charset("euc_kr"), "EUC-KR")
        self.assertEqual(mime_charset("big5"), "Big5")

    def test_parse_retry_after(self) -> None:
        """Retry-After in seconds or as an HTTP-date; a past date means now; junk means unknown."""
        now = 1_800_000_000.0
        self.assertEqual(parse_retry_after("30", now), 30.0)
        self.assertEqual(parse_retry_after(formatdate(now + 61, usegmt=True), now), 61.0)
        self.assertEqual(parse_retry_after(formatdate(now - 61, usegmt=True), now), 0.0)
        self.assertIsNone(parse_retry_after("-5", now))
        self.assertIsNone(parse_retry_after("later", now))
