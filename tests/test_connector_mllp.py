"""The mllp connector: unit tests on a fake clock and StringTransport, then a
real scripted MLLP upstream on 127.0.0.1 over TCP and TLS."""

from __future__ import annotations

import os
import socket
import tempfile
from typing import Any, cast

import trustme
from twisted.application.internet import backoffPolicy
from twisted.internet import reactor as _reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import clientFromString
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, PrivateCertificate
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from mllpd.config import ConfigError
from mllpd.connectors import ConnectorSpec, Dead, Delivered, Delivery, Outcome, Retry
from mllpd.connectors.mllp import (
    CLOSE_TIMEOUT,
    MLLPClientProtocol,
    MLLPConnector,
    build,
    default_retry_policy,
    endpoint_description,
)
from mllpd.framing import Frame, Framer
from tests.upstreams import until

reactor: Any = _reactor

SB, EB = b"\x0b", b"\x1c\x0d"


def hl7(control_id: str, *, name: str = "DOE^JANE", charset: str = "") -> bytes:
    """An ADT^A01 with a patient name that must never reach a log."""
    msh18 = f"||||||{charset}" if charset else ""
    text = (
        f"MSH|^~\\&|LAB|HOSP|EHR|HOSP|20260101120000||ADT^A01^ADT_A01|{control_id}|P|2.5"
        f"{msh18}\rPID|1||4711^^^HOSP^MR||{name}||19800101|F\rPV1|1|I\r"
    )
    return text.encode("iso8859-1" if "8859" in charset else "utf-8")


def delivery(control_id: str, payload: bytes | None = None, *, charset: str | None = None,
             codec: str = "iso8859-1", attempt: int = 1) -> Delivery:
    return Delivery(
        message_id=f"msg-{control_id}", connector="ehr",
        payload=payload if payload is not None else hl7(control_id),
        charset=charset, codec=codec, control_id=control_id, msg_type="ADT^A01",
        attempt=attempt,
    )


def ack_text(control_id: str, code: str = "AA", *, version: str = "2.5", extra: str = "") -> str:
    return (
        f"MSH|^~\\&|EHR|HOSP|LAB|HOSP|20260101120001||ACK^A01^ACK|ACK-{control_id}|P|{version}\r"
        f"MSA|{code}|{control_id}\r{extra}"
    )


def ack(control_id: str, code: str = "AA", **kw: str) -> bytes:
    """An upstream ACK, framed by hand (not by the code under test)."""
    return SB + ack_text(control_id, code, **kw).encode() + EB


ERR_25 = "ERR||PID^1^3|101^Required field missing^HL70357|E||||Patient id missing\r"


# Unit tests: fake endpoint, StringTransport, task.Clock


class Link:
    """One fake connection handed to ClientService."""

    def __init__(self, factory: IProtocolFactory) -> None:
        peer = IPv4Address("TCP", "192.0.2.7", 2575)
        self.wrapper = cast(Any, factory.buildProtocol(peer))
        self.proto: MLLPClientProtocol = self.wrapper._protocol
        self.transport = StringTransport(peerAddress=peer)
        self.wrapper.makeConnection(self.transport)

    def feed(self, data: bytes) -> None:
        self.proto.dataReceived(data)

    def lose(self) -> None:
        self.wrapper.connectionLost(Failure(ConnectionDone()))


@implementer(IStreamClientEndpoint)
class ScriptedEndpoint:
    """Connection attempts wait until the test accepts or refuses them."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.attempts: list[tuple[IProtocolFactory, Deferred[IProtocol]]] = []
        self.attempt_times: list[float] = []

    def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        d: Deferred[IProtocol] = Deferred()
        self.attempts.append((factory, d))
        self.attempt_times.append(self.clock.seconds())
        return d

    def accept(self) -> Link:
        factory, d = self.attempts[-1]
        link = Link(factory)
        d.callback(link.wrapper)
        return link

    def refuse(self) -> None:
        _, d = self.attempts[-1]
        d.errback(ConnectionRefusedError("Connection refused"))


class ConnectorUnitTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.endpoint = ScriptedEndpoint(self.clock)
        self.connector = MLLPConnector(
            "ehr", self.endpoint, clock=self.clock, ack_timeout=30.0, connect_timeout=10.0,
            retry_policy=backoffPolicy(initialDelay=1.0, maxDelay=8.0, factor=2.0, jitter=lambda: 0),
            address="tcp:192.0.2.7:2575",
        )
        self.connector.start()

    def outcome(self, d: Deferred[Outcome]) -> Outcome:
        return self.successResultOf(d)

    def test_payload_sent_byte_identical_and_aa_delivered(self) -> None:
        """The upstream receives the stored bytes in MLLP framing; AA means delivered."""
        link = self.endpoint.accept()
        payload = hl7("C1", name="MÜLLER^JÖRG", charset="8859/1")
        d = self.connector.deliver(delivery("C1", payload))
        self.assertEqual(link.transport.value(), SB + payload + EB)
        self.assertNoResult(d)
        link.feed(ack("C1"))
        self.assertEqual(self.outcome(d), Delivered("AA"))
        self.assertFalse(link.transport.disconnecting)

    def test_ack_timeout_retries_and_drops_connection(self) -> None:
        """No ACK within ack_timeout: Retry, and the connection is closed."""
        link = self.endpoint.accept()
        d = self.connector.deliver(delivery("C1"))
        self.clock.advance(29.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        outcome = self.outcome(d)
        assert isinstance(outcome, Retry)
        self.assertIn("no ACK within 30s", outcome.reason)
        self.assertTrue(link.transport.disconnecting)

    def test_stale_ack_after_timeout_never_answers_next_message(self) -> None:
        """After a timeout the next message goes on a new connection; the late ACK is ignored."""
        old = self.endpoint.accept()
        d1 = self.connector.deliver(delivery("C1"))
        self.clock.advance(30)
        self.assertIsInstance(self.outcome(d1), Retry)
        d2 = self.connector.deliver(delivery("C2"))
        # The late ACK arrives before the dropped connection is reported lost.
        old.feed(ack("C1"))
        old.feed(ack("C2"))
        self.assertNoResult(d2)
        self.assertEqual(old.transport.value(), SB + hl7("C1") + EB)
        old.lose()
        self.clock.advance(2.0)  # backoff before the reconnect
        new = self.endpoint.accept()
        self.assertEqual(new.transport.value(), SB + hl7("C2") + EB)
        new.feed(ack("C1"))
        outcome = self.outcome(d2)
        assert isinstance(outcome, Retry)
        self.assertIn("MSA-2 'C1'", outcome.reason)

    def test_reconnect_backoff_grows_to_its_cap(self) -> None:
        """Refused connections are retried after growing delays, capped by the policy."""
        for _ in range(5):
            self.endpoint.refuse()
            attempts = len(self.endpoint.attempts)
            while len(self.endpoint.attempts) == attempts and self.clock.seconds() < 100:
                self.clock.advance(0.5)
        self.assertEqual(self.endpoint.attempt_times, [0.0, 2.0, 6.0, 14.0, 22.0, 30.0])

    def test_default_reconnect_backoff_capped_near_30s(self) -> None:
        """Without a policy, reconnects start near 1.5s and never wait more than 31s."""
        policy = default_retry_policy()
        self.assertTrue(1.5 <= policy(1) < 2.5)
        self.assertTrue(30.0 <= policy(50) <= 31.0)

    def test_refused_gives_retry_at_once(self) -> None:
        """A delivery waiting for a connection gets Retry as soon as the attempt is refused."""
        d = self.connector.deliver(delivery("C1"))
        self.assertNoResult(d)
        self.endpoint.refuse()
        outcome = self.outcome(d)
        assert isinstance(outcome, Retry)
        self.assertIn("refused", outcome.reason)

    def test_connect_timeout(self) -> None:
        """A connection that does not come within connect_timeout gives Retry."""
        d = self.connector.deliver(delivery("C1"))
        self.clock.advance(9.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        self.assertEqual(self.outcome(d), Retry("not connected within 10s"))

    def test_ack_codes_on_one_connection(self) -> None:
        """AA/CA delivered, AE/CE dead with the ERR reason, AR/CR retried; none drops the link."""
        link = self.endpoint.accept()
        cases = [
            ("AA", Delivered, ""),
            ("AR", Retry, ""),
            ("CA", Delivered, ""),
            ("CR", Retry, ""),
            ("AE", Dead, ERR_25),
            ("CE", Dead, ERR_25),
        ]
        for n, (code, kind, extra) in enumerate(cases):
            cid = f"C{n}"
            d = self.connector.deliver(delivery(cid))
            link.feed(ack(cid, code, extra=extra))
            outcome = self.outcome(d)
            self.assertIsInstance(outcome, kind, code)
            if kind is Dead:
                self.assertEqual(
                    outcome, Dead(f"upstream {code} (ERR 101): Patient id missing")
                )
        self.assertFalse(link.transport.disconnecting)
        self.assertEqual(len(self.endpoint.attempts), 1)

    def test_ae_reason_from_older_versions(self) -> None:
        """A 2.3 AE names its ERR-1 code and MSA-3 text in the dead-letter reason."""
        link = self.endpoint.accept()
        d = self.connector.deliver(delivery("C1"))
        text = (
            "MSH|^~\\&|EHR|HOSP|LAB|HOSP|20260101||ACK^A01|A1|P|2.3\r"
            "MSA|AE|C1|Unknown ward\rERR|PV1^1^3^103&Table value not found&HL70357\r"
        )
        link.feed(SB + text.encode() + EB)
        self.assertEqual(self.outcome(d), Dead("upstream AE (ERR 103): Unknown ward"))

    def test_ack_decoded_with_the_message_charset(self) -> None:
        """An ACK without MSH-18 is read in the delivered message's character set."""
        link = self.endpoint.accept()
        payload = hl7("C1", charset="UNICODE UTF-8")
        d = self.connector.deliver(
            delivery("C1", payload, charset="UNICODE UTF-8", codec="utf-8")
        )
        err = "ERR||PID^1^7|102^Data type error^HL70357|E||||Geburtsdatum ungültig\r"
        link.feed(SB + ack_text("C1", "AE", extra=err).encode("utf-8") + EB)
        self.assertEqual(self.outcome(d), Dead("upstream AE (ERR 102): Geburtsdatum ungültig"))

    def test_wrong_msa2_drops_connection(self) -> None:
        """An ACK for another control id is never taken as delivery: Retry and the link drops."""
        link = self.endpoint.accept()
        d = self.connector.deliver(delivery("C2"))
        link.feed(ack("C1"))
        outcome = self.outcome(d)
        assert isinstance(outcome, Retry)
        self.assertIn("is not the message's MSH-10 'C2'", outcome.reason)
        self.assertTrue(link.transport.disconnecting)

    def test_garbage_instead_of_ack_drops_connection(self) -> None:
        """Bytes outside any frame where an ACK belongs: Retry and the link drops."""
        link = self.endpoint.accept()
        d = self.connector.deliver(delivery("C1"))
        link.feed(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        outcome = self.outcome(d)
        assert isinstance(outcome, Retry)
        self.assertIn("outside any frame", outcome.reason)
        self.assertTrue(link.transport.disconnecting)

    def test_frame_that_is_not_hl7_drops_connection(self) -> None:
        """A frame without an MSH, or without MSA, is not an ACK: Retry and the link drops."""
        for body in (b"hello", ack_text("C1").split("MSA")[0].encode()):
            link = self.endpoint.accept()
            d = self.connector.deliver(delivery("C1"))
            link.feed(SB + body + EB)
            self.assertIsInstance(self.outcome(d), Retry)
            self.assertTrue(link.transport.disconnecting)
            link.lose()
            self.clock.advance(2)

    def test_ack_in_pieces_and_trailing_newlines(self) -> None:
        """An ACK split over reads and followed by CR/LF noise is read; the link stays up."""
        link = self.endpoint.accept()
        d = self.connector.deliver(delivery("C1"))
        data = ack("C1") + b"\r\n"
        for piece in (data[:1], data[1:30], data[30:-4], data[-4:]):
            link.feed(piece)
        self.assertEqual(self.outcome(d), Delivered("AA"))
        d = self.connector.deliver(delivery("C2"))
        link.feed(b"\n" + ack("C2"))
        self.assertEqual(self.outcome(d), Delivered("AA"))
        self.assertFalse(link.transport.disconnecting)

    def test_unsolicited_frame_drops_connection(self) -> None:
        """A frame while no message is in flight drops the link; the next message waits for a new one."""
        old = self.endpoint.accept()
        old.feed(ack("C0"))
        self.assertTrue(old.transport.disconnecting)
        d = self.connector.deliver(delivery("C1"))
        self.assertEqual(old.transport.value(), b"")
        old.lose()
        self.clock.advance(2)
        new = self.endpoint.accept()
        new.feed(ack("C1"))
        self.assertEqual(self.outcome(d), Delivered("AA"))

    def test_connection_lost_before_ack(self) -> None:
        """The upstream closing halfway through its ACK gives Retry."""
        link = self.endpoint.accept()
        d = self.connector.deliver(delivery("C1"))
        link.feed(ack("C1")[:20])
        link.lose()
        outcome = self.outcome(d)
        assert isinstance(outcome, Retry)
        self.assertIn("connection lost before the ACK", outcome.reason)

    def test_stop_lets_delivery_in_progress_finish(self) -> None:
        """stop() waits for the ACK in flight, refuses new messages, then closes the link."""
        link = self.endpoint.accept()
        d = self.connector.deliver(delivery("C1"))
        stopped = self.connector.stop()
        self.assertNoResult(stopped)
        self.assertEqual(self.outcome(self.connector.deliver(delivery("C2"))),
                         Retry("connector is stopping"))
        self.assertFalse(link.transport.disconnecting)
        link.feed(ack("C1"))
        self.assertEqual(self.outcome(d), Delivered("AA"))
        self.assertTrue(link.transport.disconnecting)
        self.assertNoResult(stopped)
        link.lose()
        self.successResultOf(stopped)

    def test_stop_bounded_by_ack_timeout(self) -> None:
        """stop() with an ACK that never comes finishes after ack_timeout."""
        link = self.endpoint.accept()
        d = self.connector.deliver(delivery("C1"))
        stopped = self.connector.stop()
        self.clock.advance(30)
        self.assertIsInstance(self.outcome(d), Retry)
        link.lose()
        self.successResultOf(stopped)

    def test_stop_while_waiting_for_connection(self) -> None:
        """stop() does not sit out the connect timeout: the waiting delivery gets Retry now."""
        d = self.connector.deliver(delivery("C1"))
        stopped = self.connector.stop()
        self.assertEqual(self.outcome(d), Retry("connector is stopping"))
        self.successResultOf(stopped)

    def test_stop_aborts_a_connection_that_will_not_close(self) -> None:
        """A peer that never completes the close is aborted after CLOSE_TIMEOUT."""
        link = self.endpoint.accept()
        stopped = self.connector.stop()
        self.assertTrue(link.transport.disconnecting)
        self.assertFalse(link.transport.disconnected)
        self.clock.advance(CLOSE_TIMEOUT)
        self.assertTrue(link.transport.disconnected)
        link.lose()
        self.successResultOf(stopped)

    def test_logs_name_the_message_but_never_its_content(self) -> None:
        """Log events carry connector, control id and type, and no payload or ERR text."""
        with capturedLogs() as events:
            link = self.endpoint.accept()
            d = self.connector.deliver(delivery("C1"))
            link.feed(ack("C1", "AE", extra=ERR_25))
            self.outcome(d)
            d = self.connector.deliver(delivery("C2"))
            link.feed(ack("C2", "AR", extra=ERR_25))
            self.assertEqual(self.outcome(d), Retry("upstream AR (ERR 101): Patient id missing"))
            d = self.connector.deliver(delivery("C3"))
            link.feed(b"garbage")
            self.outcome(d)
        ours = [e for e in events if e.get("log_namespace") == "mllpd.connectors.mllp"]
        self.assertTrue(ours)
        dead = [e for e in ours if e.get("event") == "delivery_dead"]
        self.assertEqual(
            [(e["connector"], e["control_id"], e["msg_type"], e["code"]) for e in dead],
            [("ehr", "C1", "ADT^A01", "AE")],
        )
        retried = [e["control_id"] for e in ours if e.get("event") == "delivery_retry"]
        self.assertEqual(retried, ["C2", "C3"])
        text = repr(ours)
        for secret in ("DOE", "JANE", "4711", "Patient id missing"):
            self.assertNotIn(secret, text)


# Configuration


class BuildTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="mllpd-conn-")
        self.addCleanup(_rmtree, self.dir)

    def error(self, **options: Any) -> str:
        spec = ConnectorSpec("ehr", "mllp", None, options)
        with self.assertRaises(ConfigError) as cm:
            build(spec, reactor, {})
        message = str(cm.exception)
        self.assertNotIn("\n", message)
        return message

    def test_one_line_per_bad_option(self) -> None:
        """Each bad option stops startup with one line naming connectors.<name>.<option>."""
        empty = os.path.join(self.dir, "empty")
        os.mkdir(empty)
        not_pem = os.path.join(self.dir, "cert.pem")
        with open(not_pem, "w") as f:
            f.write("not a certificate\n")
        ok = "tcp:127.0.0.1:2575"
        cases: list[tuple[dict[str, Any], str]] = [
            ({"address": ok, "retries": 3}, "connectors.ehr.retries: unknown option for a mllp connector"),
            ({}, "connectors.ehr.address: required"),
            ({"address": 2575}, "connectors.ehr.address: must be a non-empty string"),
            ({"address": "ehr.hospital"}, "connectors.ehr.address: Unknown endpoint type"),
            ({"address": "tcp:ehr.hospital"}, "connectors.ehr.address: host and port are required"),
            ({"address": "tcp:h:2575:colour=red"}, "connectors.ehr.address: unknown endpoint parameter"),
            ({"address": "h:99999"}, "connectors.ehr.address: port 99999 out of range"),
            ({"address": f"tls:h:1:trustRoots={empty}"}, "holds no *.pem file"),
            ({"address": f"tls:h:1:trustRoots={not_pem}"}, "trustRoots must be a readable directory"),
            ({"address": f"tls:h:1:certificate={self.dir}/none.pem"}, "cannot read"),
            ({"address": f"tls:h:1:certificate={not_pem}"}, "not a valid PEM"),
            ({"address": ok, "ack_timeout": "soon"}, "connectors.ehr.ack_timeout: invalid duration 'soon'"),
            ({"address": ok, "ack_timeout": 30}, "connectors.ehr.ack_timeout: expected a duration such as 30s"),
            ({"address": ok, "ack_timeout": "0s"}, "connectors.ehr.ack_timeout: must be greater than 0"),
            ({"address": ok, "connect_timeout": "5 s"}, "connectors.ehr.connect_timeout: invalid duration '5 s'"),
        ]
        for options, expected in cases:
            message = self.error(**options)
            self.assertTrue(message.startswith("MLLP_CONFIG: connectors.ehr."), message)
            self.assertIn(expected, message)

    def test_good_options(self) -> None:
        """Durations are read in Go syntax; defaults are 30s and 10s."""
        connector = build(
            ConnectorSpec("ehr", "mllp", None, {"address": "ehr.hospital:2575"}), reactor, {}
        )
        assert isinstance(connector, MLLPConnector)
        self.assertEqual((connector.ack_timeout, connector.connect_timeout), (30.0, 10.0))
        connector = build(
            ConnectorSpec("ehr", "mllp", None, {
                "address": "tcp:ehr:2575", "ack_timeout": "1m30s", "connect_timeout": "500ms",
            }), reactor, {},
        )
        assert isinstance(connector, MLLPConnector)
        self.assertEqual((connector.ack_timeout, connector.connect_timeout), (90.0, 0.5))

    def test_unverified_tls_refused_unless_insecure(self) -> None:
        """ssl: without hostname= (no name check) stops startup unless the connector says insecure: true."""
        ca_dir = os.path.join(self.dir, "ca")
        os.mkdir(ca_dir)
        trustme.CA().cert_pem.write_to_path(os.path.join(ca_dir, "ca.pem"))
        for address in ("ssl:ehr.hospital:2575", f"ssl:ehr.hospital:2575:caCertsDir={ca_dir}"):
            message = self.error(address=address)
            self.assertTrue(message.startswith("MLLP_CONFIG: connectors.ehr.address: ssl: without hostname="), message)
            self.assertIn("insecure: true", message)
            for value in ("true", "yes", 1):
                self.assertIn("connectors.ehr.insecure: expected true or false", self.error(address=address, insecure=value))
            self.assertIn("does not verify", self.error(address=address, insecure=False))
        for address in ("ssl:ehr.hospital:2575", f"ssl:host=ehr.hospital:port=2575:hostname=ehr.hospital:caCertsDir={ca_dir}"):
            options: dict[str, Any] = {"address": address}
            if "hostname=" not in address:
                options["insecure"] = True
            self.assertIsInstance(build(ConnectorSpec("ehr", "mllp", None, options), reactor, {}), MLLPConnector)

    def test_startup_warnings_for_plaintext_and_insecure(self) -> None:
        """A plaintext upstream off loopback, or insecure: true, gets one startup warning naming the connector."""
        cases: list[tuple[dict[str, Any], list[str]]] = [
            ({"address": "tcp:ehr.hospital:2575"}, ["upstream_plaintext"]),
            ({"address": "10.1.2.3:2575"}, ["upstream_plaintext"]),
            ({"address": "ssl:ehr.hospital:2575", "insecure": True}, ["upstream_tls_unverified"]),
            ({"address": "tcp:127.0.0.1:2575"}, []),
            ({"address": "localhost:2575"}, []),
            ({"address": "tcp:\\:\\:1:2575"}, []),
            ({"address": "tls:ehr.hospital:2575"}, []),
        ]
        for options, expected in cases:
            with capturedLogs() as events:
                build(ConnectorSpec("ehr", "mllp", None, options), reactor, {})
            ours = [e for e in events if e.get("event", "").startswith("upstream_")]
            self.assertEqual([e["event"] for e in ours], expected, options)
            for e in ours:
                self.assertEqual((e["log_level"].name, e["connector"]), ("warn", "ehr"))

    def test_address_forms(self) -> None:
        """host:port means TCP; each connect attempt is bounded by connect_timeout unless set."""
        self.assertEqual(endpoint_description("ehr.hospital:2575", 10), "tcp:ehr.hospital:2575:timeout=10")
        self.assertEqual(endpoint_description(" tcp:ehr:2575 ", 2.5), "tcp:ehr:2575:timeout=3")
        self.assertEqual(endpoint_description("tcp:ehr:2575:timeout=4", 10), "tcp:ehr:2575:timeout=4")
        self.assertEqual(endpoint_description("tls:ehr:2575", 0.2), "tls:ehr:2575:timeout=1")


def _rmtree(path: str) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


# Integration: a scripted MLLP upstream on 127.0.0.1


class UpstreamConnection(Protocol):
    """Answers each frame as the factory's script says (AA when it runs out)."""

    factory: Upstream

    def __init__(self) -> None:
        self.raw = b""
        self.framer = Framer(16 * 1024 * 1024)
        self.held: list[bytes] = []
        self.lost: Deferred[None] = Deferred()
        self.peer_certificate: Any = None

    def connectionMade(self) -> None:
        self.factory.connections.append(self)

    def dataReceived(self, data: bytes) -> None:
        if self.peer_certificate is None and hasattr(self.transport, "getPeerCertificate"):
            self.peer_certificate = self.transport.getPeerCertificate()  # type: ignore[union-attr]
        self.raw += data
        if self.factory.cut_after is not None and len(self.raw) >= self.factory.cut_after:
            # Hang up in the middle of the message, once.
            self.factory.cut_after = None
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        for event in self.framer.feed(data):
            if isinstance(event, Frame):
                self.factory.received.append(event.payload)
                self.answer(event.payload)

    def answer(self, payload: bytes) -> None:
        write = self.transport.write  # type: ignore[union-attr]
        cid = payload.split(b"\r", 1)[0].split(b"|")[9].decode()
        action = self.factory.script.pop(0) if self.factory.script else "AA"
        # A held ACK goes out when the next frame arrives on this connection.
        for late in self.held:
            write(late)
        self.held.clear()
        if action in ("AA", "AE", "AR", "CA", "CE", "CR"):
            write(ack(cid, action, extra=ERR_25 if action[1] == "E" else ""))
        elif action == "wrong":
            write(ack("SOMEONE-ELSE"))
        elif action == "hold":
            self.held.append(ack(cid))
        elif action == "garbage":
            write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        elif action == "close-mid":
            write(ack(cid)[:25])
            self.transport.loseConnection()  # type: ignore[union-attr]
        elif action != "silent":
            raise AssertionError(f"unknown action {action}")

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        self.lost.callback(None)


class Upstream(Factory):
    protocol = UpstreamConnection
    noisy = False

    def __init__(self, script: list[str] | None = None) -> None:
        self.script = list(script or [])
        self.received: list[bytes] = []
        self.connections: list[UpstreamConnection] = []
        self.cut_after: int | None = None


class UpstreamBase(TestCase):
    timeout = 20

    def listen(self, upstream: Upstream, port: int = 0, tls: Any = None) -> int:
        if tls is None:
            listening = reactor.listenTCP(port, upstream, interface="127.0.0.1")
        else:
            listening = reactor.listenSSL(port, upstream, tls, interface="127.0.0.1")
        self.addCleanup(self.close_upstream, listening, upstream)
        return cast(int, listening.getHost().port)

    async def close_upstream(self, listening: Any, upstream: Upstream) -> None:
        await listening.stopListening()
        for conn in upstream.connections:
            if not conn.lost.called:
                conn.transport.abortConnection()  # type: ignore[union-attr]
                await conn.lost

    def connector(self, port: int) -> tuple[MLLPConnector, Clock]:
        """A connector on real sockets whose timers run on a clock the test advances."""
        clock = Clock()
        address = f"tcp:127.0.0.1:{port}"
        connector = MLLPConnector(
            "ehr", clientFromString(reactor, address), clock=clock, ack_timeout=30.0,
            connect_timeout=30.0, retry_policy=lambda attempt: 0.0, address=address,
        )
        connector.start()
        self.addCleanup(self.stop, connector, clock)
        return connector, clock

    def stop(self, connector: Any, clock: Clock | None = None) -> Deferred[None]:
        stopped = cast(Deferred[None], connector.stop())
        if clock is not None:
            clock.advance(60)  # ends an ACK wait left by a failing test
        return stopped

    async def settle(self, d: Deferred[Outcome], clock: Clock | None = None) -> Outcome:
        """Let the reactor run (and reconnects fire) until d has its outcome; bounded."""

        def called() -> bool:
            if clock is not None:
                clock.advance(0)
            return d.called

        await until(called, what="an outcome")
        return await d

class UpstreamTests(UpstreamBase):
    """Delivery to a plain TCP upstream."""

    async def test_outcomes_and_exact_bytes(self) -> None:
        """AA, AE, AR, CA give delivered, dead, retry, delivered; the upstream got the exact bytes."""
        upstream = Upstream(["AA", "AE", "AR", "CA"])
        connector, clock = self.connector(self.listen(upstream))
        payloads = [
            hl7("C1", name="MÜLLER^JÖRG", charset="8859/1"),
            hl7("C2"),
            hl7("C3", name="Łukasz^Ż", charset="UNICODE UTF-8"),
            hl7("C4") + b"OBX|1|TX|||" + b"x" * 100_000 + b"\r",
        ]
        outcomes = []
        for n, payload in enumerate(payloads, 1):
            outcomes.append(await self.settle(connector.deliver(delivery(f"C{n}", payload)), clock))
        self.assertEqual(outcomes, [
            Delivered("AA"),
            Dead("upstream AE (ERR 101): Patient id missing"),
            Retry("upstream AR"),
            Delivered("CA"),
        ])
        self.assertEqual(upstream.received, payloads)
        self.assertEqual(upstream.connections[0].raw, b"".join(SB + p + EB for p in payloads))
        self.assertEqual(len(upstream.connections), 1)

    async def retried_on_new_connection(self, first: str) -> Upstream:
        """Upstream answers ``first``, then AA: Retry, the connection dropped,
        and the retry delivered over a second connection."""
        upstream = Upstream([first, "AA"])
        connector, clock = self.connector(self.listen(upstream))
        outcome = await self.settle(connector.deliver(delivery("C1")), clock)
        self.assertIsInstance(outcome, Retry)
        await upstream.connections[0].lost
        outcome = await self.settle(connector.deliver(delivery("C1", attempt=2)), clock)
        self.assertEqual(outcome, Delivered("AA"))
        self.assertEqual(len(upstream.connections), 2)
        return upstream

    async def test_wrong_msa2_then_delivered_on_new_connection(self) -> None:
        """A foreign ACK gives Retry and closes the connection; the retry is delivered on a new one."""
        upstream = await self.retried_on_new_connection("wrong")
        self.assertEqual(upstream.received, [hl7("C1"), hl7("C1")])

    async def test_stale_ack_after_timeout_cannot_deliver_next_message(self) -> None:
        """An ACK held past the timeout never reaches the next message: it goes on a new connection."""
        upstream = Upstream(["hold", "AA"])
        connector, clock = self.connector(self.listen(upstream))
        d = connector.deliver(delivery("C1"))
        await until(lambda: len(upstream.received) == 1, what="upstream got C1")
        clock.advance(30)
        self.assertEqual(await d, Retry("no ACK within 30s"))
        await upstream.connections[0].lost
        outcome = await self.settle(connector.deliver(delivery("C2")), clock)
        self.assertEqual(outcome, Delivered("AA"))
        self.assertEqual(len(upstream.connections), 2)
        self.assertEqual(upstream.connections[1].raw, SB + hl7("C2") + EB)

    async def test_garbage_then_delivered(self) -> None:
        """Garbage instead of an ACK gives Retry and a new connection for the retry."""
        await self.retried_on_new_connection("garbage")

    async def test_no_answer(self) -> None:
        """An upstream that never answers: Retry after ack_timeout and the connection is closed."""
        upstream = Upstream(["silent"])
        connector, clock = self.connector(self.listen(upstream))
        d = connector.deliver(delivery("C1"))
        await until(lambda: len(upstream.received) == 1, what="upstream got C1")
        clock.advance(29.9)
        self.assertFalse(d.called)
        clock.advance(0.1)
        self.assertEqual(await d, Retry("no ACK within 30s"))
        await upstream.connections[0].lost

    async def test_upstream_closes_mid_ack(self) -> None:
        """The upstream closing halfway through its ACK gives Retry; the retry is delivered."""
        upstream = Upstream(["close-mid", "AA"])
        connector, clock = self.connector(self.listen(upstream))
        outcome = await self.settle(connector.deliver(delivery("C1")), clock)
        assert isinstance(outcome, Retry)
        self.assertIn("connection lost before the ACK", outcome.reason)
        outcome = await self.settle(connector.deliver(delivery("C1", attempt=2)), clock)
        self.assertEqual(outcome, Delivered("AA"))

    async def test_upstream_closes_mid_message(self) -> None:
        """The upstream hanging up while a large message arrives gives Retry; the retry is delivered whole."""
        upstream = Upstream()
        upstream.cut_after = 1000
        connector, clock = self.connector(self.listen(upstream))
        payload = hl7("C1") + b"OBX|1|ED|PDF||" + b"A" * 500_000 + b"\r"
        outcome = await self.settle(connector.deliver(delivery("C1", payload)), clock)
        self.assertIsInstance(outcome, Retry)
        self.assertEqual(upstream.received, [])
        outcome = await self.settle(connector.deliver(delivery("C1", payload, attempt=2)), clock)
        self.assertEqual(outcome, Delivered("AA"))
        self.assertEqual(upstream.received, [payload])
        self.assertEqual(upstream.connections[1].raw, SB + payload + EB)

    async def test_upstream_down_then_up(self) -> None:
        """Connection refused gives Retry; once the upstream listens the message is delivered."""
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        connector, clock = self.connector(port)
        outcome = await self.settle(connector.deliver(delivery("C1")), clock)
        assert isinstance(outcome, Retry)
        self.assertIn("refused", outcome.reason)
        upstream = Upstream()
        self.listen(upstream, port)
        outcome = await self.settle(connector.deliver(delivery("C1", attempt=2)), clock)
        self.assertEqual(outcome, Delivered("AA"))
        self.assertEqual(upstream.received, [hl7("C1")])

class BuiltConnectorTests(UpstreamBase):
    """A connector built from MLLP_CONFIG options, on the real reactor."""

    async def test_build_plain_host_port(self) -> None:
        """A connector built from config with host:port delivers over TCP."""
        upstream = Upstream()
        port = self.listen(upstream)
        spec = ConnectorSpec("ehr", "mllp", None, {"address": f"127.0.0.1:{port}", "ack_timeout": "5s"})
        connector = build(spec, reactor, {})
        connector.start()
        self.addCleanup(self.stop, connector)
        self.assertEqual(await self.settle(connector.deliver(delivery("C1"))), Delivered("AA"))
        self.assertEqual(upstream.received, [hl7("C1")])


    async def test_lanes_are_connections(self) -> None:
        """With lanes: 3, three deliveries at once travel over three connections, one message each."""
        upstream = Upstream()
        port = self.listen(upstream)
        spec = ConnectorSpec("ehr", "mllp", None, {"address": f"127.0.0.1:{port}"}, lanes=3)
        connector = build(spec, reactor, {})
        connector.start()
        self.addCleanup(self.stop, connector)
        outcomes = [connector.deliver(delivery(f"L{i}")) for i in range(3)]
        for d in outcomes:
            self.assertEqual(await self.settle(d), Delivered("AA"))
        self.assertEqual(sorted(upstream.received), [hl7(f"L{i}") for i in range(3)])
        self.assertEqual(len(upstream.connections), 3)
        self.assertEqual(
            sorted(conn.raw.count(b"\x0b") for conn in upstream.connections),
            [1, 1, 1],
        )


class TLSUpstreamTests(UpstreamTests):
    """The same upstream behind TLS that requires a client certificate."""

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="mllpd-tls-")
        self.addCleanup(_rmtree, self.dir)
        self.ca = trustme.CA()
        server = self.ca.issue_cert("localhost", "127.0.0.1")
        self.client = self.ca.issue_cert("relay.mllpd.test", common_name="mllpd-relay")
        self.server_options = PrivateCertificate.loadPEM(
            server.private_key_and_cert_chain_pem.bytes()
        ).options(Certificate.loadPEM(self.ca.cert_pem.bytes()))
        os.mkdir(os.path.join(self.dir, "ca"))
        self.ca.cert_pem.write_to_path(os.path.join(self.dir, "ca", "ca.pem"))
        self.client.cert_chain_pems[0].write_to_path(os.path.join(self.dir, "client.pem"))
        self.client.private_key_pem.write_to_path(os.path.join(self.dir, "client.key"))

    def tls_address(self, port: int, *, client_cert: bool = True, ca_dir: str | None = None) -> str:
        address = f"tls:localhost:{port}:trustRoots={ca_dir or os.path.join(self.dir, 'ca')}"
        if client_cert:
            address += (
                f":certificate={os.path.join(self.dir, 'client.pem')}"
                f":privateKey={os.path.join(self.dir, 'client.key')}"
            )
        return address

    def listen(self, upstream: Upstream, port: int = 0, tls: Any = None) -> int:
        return super().listen(upstream, port, tls or self.server_options)

    def connector(self, port: int) -> tuple[MLLPConnector, Clock]:
        clock = Clock()
        address = self.tls_address(port)
        connector = MLLPConnector(
            "ehr", clientFromString(reactor, address), clock=clock, ack_timeout=30.0,
            connect_timeout=30.0, retry_policy=lambda attempt: 0.0, address=address,
        )
        connector.start()
        self.addCleanup(self.stop, connector, clock)
        return connector, clock

    async def built(self, address: str) -> Outcome:
        spec = ConnectorSpec("ehr", "mllp", None, {"address": address, "ack_timeout": "5s"})
        connector = build(spec, reactor, {})
        connector.start()
        self.addCleanup(self.stop, connector)
        return await self.settle(connector.deliver(delivery("C1")))

    async def test_build_tls_with_client_certificate(self) -> None:
        """A tls: address with trustRoots and a client certificate delivers; the upstream sees the certificate."""
        upstream = Upstream()
        port = self.listen(upstream)
        self.assertEqual(await self.built(self.tls_address(port)), Delivered("AA"))
        self.assertEqual(upstream.received, [hl7("C1")])
        subject = upstream.connections[0].peer_certificate.to_cryptography().subject
        self.assertIn("CN=mllpd-relay", subject.rfc4514_string())

    async def test_tls_without_client_certificate_is_not_delivered(self) -> None:
        """An upstream that requires a client certificate rejects one without: Retry, nothing received."""
        upstream = Upstream()
        port = self.listen(upstream)
        outcome = await self.built(self.tls_address(port, client_cert=False))
        assert isinstance(outcome, Retry)
        self.assertIn("certificate", outcome.reason)
        self.assertEqual(upstream.received, [])

    async def test_ssl_with_hostname_verifies_and_insecure_does_not(self) -> None:
        """ssl: with hostname= refuses an untrusted upstream; only insecure: true delivers to it."""
        other = os.path.join(self.dir, "other-ca")
        os.mkdir(other)
        trustme.CA().cert_pem.write_to_path(os.path.join(other, "ca.pem"))
        upstream = Upstream()
        port = self.listen(upstream)
        client = f"certKey={self.dir}/client.pem:privateKey={self.dir}/client.key"
        verified = f"ssl:host=127.0.0.1:port={port}:hostname=localhost:caCertsDir={other}:{client}"
        outcome = await self.built(verified)
        assert isinstance(outcome, Retry)
        self.assertIn("certificate", outcome.reason)
        self.assertEqual(upstream.received, [])
        spec = ConnectorSpec("ehr", "mllp", None, {
            "address": f"ssl:127.0.0.1:{port}:{client}", "ack_timeout": "5s", "insecure": True,
        })
        connector = build(spec, reactor, {})
        connector.start()
        self.addCleanup(self.stop, connector)
        self.assertEqual(await self.settle(connector.deliver(delivery("C1"))), Delivered("AA"))
        self.assertEqual(upstream.received, [hl7("C1")])

    async def test_tls_untrusted_upstream_is_not_delivered(self) -> None:
        """An upstream whose certificate is not signed by trustRoots gets nothing: Retry."""
        other = os.path.join(self.dir, "other-ca")
        os.mkdir(other)
        trustme.CA().cert_pem.write_to_path(os.path.join(other, "ca.pem"))
        upstream = Upstream()
        port = self.listen(upstream)
        outcome = await self.built(self.tls_address(port, ca_dir=other))
        assert isinstance(outcome, Retry)
        self.assertIn("certificate", outcome.reason)
        self.assertEqual(upstream.received, [])
