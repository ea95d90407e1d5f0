"""Staged shutdown (SPEC section 7): each stage with a Clock, then the real
``twistd -n mllp`` process under SIGTERM while clients keep sending.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from mllpd.framing import frame
from mllpd.protocol import MLLPServerFactory, MLLPServerProtocol
from mllpd.receiver import Receiver
from mllpd.service import MLLPService
from mllpd.testing import MemoryOutbox
from tests.serverproc import (
    LOOPBACK,
    ConnectionClosed,
    MLLPClient,
    ServerProcess,
    hl7_message,
    make_workdir,
    query,
    start_server,
)

MESSAGE = b"MSH|^~\\&|LAB|HOSP|EHR|HOSP|20260101||ADT^A01^ADT_A01|S1|P|2.5\rPID|1||123\r"


class HalfCloseTransport(StringTransport):
    write_closed = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True


class FakePort:
    def __init__(self) -> None:
        self.listening = True

    def stopListening(self) -> Deferred[None]:
        self.listening = False
        return succeed(None)

    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", 2575)


@implementer()
class FakeEndpoint:
    def __init__(self) -> None:
        self.port = FakePort()

    def listen(self, factory: object) -> Deferred[FakePort]:
        return succeed(self.port)


class FakeRelay:
    """Delivery workers whose stop the test completes."""

    def __init__(self) -> None:
        self.workers = ["ehr", "lake"]
        self.stopping: Deferred[None] | None = None

    def stop(self) -> Deferred[None]:
        self.stopping = Deferred()
        return self.stopping


class Stages:
    def __init__(self, pre: float = 0.0, timeout: float = 30.0, relay: bool = True) -> None:
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.outbox = MemoryOutbox(hold=True)
        self.factory = MLLPServerFactory(Receiver(self.outbox, self.clock), self.clock)
        self.endpoint = FakeEndpoint()
        self.relay = FakeRelay() if relay else None
        self.service = MLLPService(
            self.endpoint, self.factory, self.outbox, self.clock,  # type: ignore[arg-type]
            address="tcp:2575", shutdown_timeout=timeout, pre_shutdown_delay=pre,
            relay=self.relay,
        )
        self.service.privilegedStartService()
        self.service.startService()

    def connect(self, port: int = 40000) -> tuple[MLLPServerProtocol, HalfCloseTransport]:
        proto = self.factory.buildProtocol(IPv4Address("TCP", "10.0.0.1", port))
        assert isinstance(proto, MLLPServerProtocol)
        transport = HalfCloseTransport(peerAddress=IPv4Address("TCP", "10.0.0.1", port))
        proto.makeConnection(transport)
        return proto, transport

    def busy(self, port: int = 40001) -> tuple[MLLPServerProtocol, HalfCloseTransport]:
        """A connection with half a frame received."""
        proto, t = self.connect(port)
        proto.dataReceived(frame(MESSAGE)[:20])
        return proto, t


def events(logs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {e["event"]: e for e in logs if isinstance(e.get("event"), str)}


class StageTests(SynchronousTestCase):
    """Each stage, in order, timed by a Clock."""

    def test_pre_delay_keeps_serving(self) -> None:
        """During PRE_SHUTDOWN_DELAY the port stays open and new connections are served; then it closes."""
        s = Stages(pre=5.0)
        with capturedLogs() as logs:
            d = s.service.stopService()
            s.clock.advance(4.9)
            self.assertTrue(s.endpoint.port.listening)
            proto, t = s.connect()
            proto.dataReceived(frame(MESSAGE))
            s.outbox.commit()
            self.assertIn(b"MSA|AA|S1", t.value())
            self.assertFalse(t.write_closed)
            s.clock.advance(0.2)
            self.assertFalse(s.endpoint.port.listening)
        self.assertTrue(t.write_closed)  # idle after its ACK: drained
        self.assertEqual(events(logs)["shutdown_pre_delay"]["delay"], 5.0)
        self.assertNoResult(d)

    def test_stages_in_order_with_counts(self) -> None:
        """Idle connections drain at once; the relay stops before the outbox closes; each stage is logged with counts."""
        s = Stages()
        proto, t = s.connect()
        with capturedLogs() as logs:
            d = s.service.stopService()
            self.assertTrue(t.write_closed)
            proto.connectionLost(None)
            assert s.relay is not None and s.relay.stopping is not None
            self.assertFalse(s.outbox.closed)
            self.assertNoResult(d)
            s.relay.stopping.callback(None)
            self.successResultOf(d)
        self.assertTrue(s.outbox.closed)
        names = [e["event"] for e in logs if str(e.get("event", "")).startswith("shutdown_")]
        self.assertEqual(names, [
            "shutdown_pre_delay", "shutdown_stop_listening", "shutdown_drain", "shutdown_abort",
            "shutdown_relay_stopped", "shutdown_outbox_closed",
        ])
        got = events(logs)
        self.assertEqual(got["shutdown_drain"]["count"], 1)
        self.assertEqual(got["shutdown_abort"]["count"], 0)
        self.assertEqual(got["shutdown_relay_stopped"]["count"], 2)

    def test_no_relay_logs_zero_workers(self) -> None:
        """Without a relay, the stop-delivery stage is logged with count 0."""
        s = Stages(relay=False)
        with capturedLogs() as logs:
            self.successResultOf(s.service.stopService())
        self.assertEqual(events(logs)["shutdown_relay_stopped"]["count"], 0)

    def test_busy_connection_finishes_within_timeout(self) -> None:
        """A frame in progress completes during the drain and gets its AA before the close."""
        s = Stages(timeout=10.0)
        proto, t = s.busy()
        d = s.service.stopService()
        s.clock.advance(5)
        proto.dataReceived(frame(MESSAGE)[20:])
        s.outbox.commit()
        self.assertIn(b"MSA|AA|S1", t.value())
        self.assertTrue(t.write_closed)
        self.assertFalse(t.disconnected)
        proto.connectionLost(None)
        assert s.relay is not None and s.relay.stopping is not None
        s.relay.stopping.callback(None)
        self.successResultOf(d)

    def test_abort_after_timeout(self) -> None:
        """A connection still mid-frame at SHUTDOWN_TIMEOUT is aborted without an ACK."""
        s = Stages(timeout=10.0)
        proto, t = s.busy()
        with capturedLogs() as logs:
            d = s.service.stopService()
            s.clock.advance(9.9)
            self.assertFalse(t.disconnected)
            s.clock.advance(0.2)
            self.assertTrue(t.disconnected)
            self.assertEqual(t.value(), b"")
            assert s.relay is not None and s.relay.stopping is not None
            s.relay.stopping.callback(None)
            self.successResultOf(d)
        abort = events(logs)["shutdown_abort"]
        self.assertEqual((abort["count"], abort["why"]), (1, "timeout"))
        self.assertEqual(s.outbox.stored, [])

    def test_hurry_in_pre_delay_aborts_at_once(self) -> None:
        """A second SIGTERM during the pre-delay stops listening and aborts busy connections without waiting."""
        s = Stages(pre=30.0, timeout=30.0, relay=False)
        _, t = s.busy()
        with capturedLogs() as logs:
            d = s.service.stopService()
            s.clock.advance(1)
            s.service.hurry()
            self.assertFalse(s.endpoint.port.listening)
            self.assertTrue(t.disconnected)
            self.successResultOf(d)
        self.assertEqual(events(logs)["shutdown_abort"]["why"], "hurried")
        self.assertTrue(s.outbox.closed)

    def test_hurry_in_drain_aborts_at_once(self) -> None:
        """A second SIGTERM during the drain aborts what remains without waiting for the timeout."""
        s = Stages(timeout=30.0, relay=False)
        proto, t = s.busy()
        d = s.service.stopService()
        s.clock.advance(2)
        self.assertFalse(t.disconnected)
        s.service.hurry()
        self.assertTrue(t.disconnected)
        self.successResultOf(d)
        proto.connectionLost(None)
        self.assertEqual(s.clock.getDelayedCalls(), [])  # the drain timer too


# -- the real process ---------------------------------------------------------------


def _port(server: ServerProcess) -> int:
    assert server.port is not None
    return server.port


class Sender(threading.Thread):
    """Sends message after message (each after the last ACK) until the server
    closes; records what got AA and how the connection ended."""

    def __init__(self, port: int, name: str) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.prefix = name
        self.acked: list[str] = []
        self.warm = threading.Event()  # set after 20 ACKs
        self.ended: str | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with MLLPClient(self.port, timeout=20) as client:
                for n in range(100_000):
                    cid = f"{self.prefix}-{n}"
                    try:
                        client.send(hl7_message(cid))
                    except (BrokenPipeError, ConnectionResetError) as e:
                        self.ended = type(e).__name__
                        return
                    try:
                        ack = client.read_ack(timeout=20)
                    except ConnectionClosed as e:
                        self.ended = "EOF" if str(e) == "EOF" else f"reset: {e}"
                        return
                    if ack.code != "AA" or ack.control_id != cid:
                        raise AssertionError(f"{cid}: {ack}")
                    self.acked.append(cid)
                    if len(self.acked) == 20:
                        self.warm.set()
        except BaseException as e:  # reported by the test
            self.error = e
        finally:
            self.warm.set()


class ProcessTests(SynchronousTestCase):
    """SIGTERM to ``twistd -n mllp`` with clients sending."""

    def test_sigterm_while_clients_send(self) -> None:
        """Senders through SIGTERM: new connections served in the pre-delay and refused after; every AA stored; EOF, never a reset; exit 0."""
        server = start_server(self, env={"PRE_SHUTDOWN_DELAY": "1500ms", "SHUTDOWN_TIMEOUT": "3s"})
        port = _port(server)
        senders = [Sender(port, f"S{i}") for i in range(4)]
        for sender in senders:
            sender.start()
        for sender in senders:
            self.assertTrue(sender.warm.wait(timeout=20))
        server.send_signal(signal.SIGTERM)
        server.wait_for_event("shutdown_pre_delay", timeout=5)
        # In the pre-delay: a new connection is still accepted and served.
        with MLLPClient(port) as late:
            self.assertEqual(late.request(hl7_message("LATE-1")).code, "AA")
        server.wait_for_event("shutdown_stop_listening", timeout=10)
        with self.assertRaises(ConnectionRefusedError):
            socket.create_connection((LOOPBACK, port), timeout=5).close()
        code = server.wait(timeout=30)
        for sender in senders:
            sender.join(timeout=30)
        self.assertEqual(code, 0, server.output())
        for sender in senders:
            self.assertIsNone(sender.error, sender.error)
            self.assertGreater(len(sender.acked), 20)
            self.assertEqual(sender.ended, "EOF", sender.prefix)
        stored = {row[0] for row in query(server.db_path, "SELECT control_id FROM messages")}
        acked = {cid for s in senders for cid in s.acked} | {"LATE-1"}
        self.assertEqual(acked - stored, set())
        self.assertNotIn("Traceback", server.output())

    def test_stalled_client_aborted_exit_in_time(self) -> None:
        """A sender stuck mid-frame is aborted at SHUTDOWN_TIMEOUT; exit 0; its half message is not stored."""
        server = start_server(self, env={"PRE_SHUTDOWN_DELAY": "500ms", "SHUTDOWN_TIMEOUT": "1s"})
        with MLLPClient(_port(server)) as client:
            self.assertEqual(client.request(hl7_message("DONE-1")).code, "AA")
            client.sock.sendall(frame(hl7_message("HALF-1"))[:40])
            server.send_signal(signal.SIGTERM)
            code = server.wait(timeout=30)
        self.assertEqual(code, 0, server.output())
        abort = [e for e in server.events() if e.get("event") == "shutdown_abort"]
        self.assertEqual([(e["count"], e["why"]) for e in abort], [(1, "timeout")])
        stored = {row[0] for row in query(server.db_path, "SELECT control_id FROM messages")}
        self.assertEqual(stored, {"DONE-1"})

    def test_second_sigterm_skips_to_abort(self) -> None:
        """A second SIGTERM ends a long pre-delay and drain at once, exit 0, without ReactorNotRunning noise."""
        server = start_server(self, env={"PRE_SHUTDOWN_DELAY": "30s", "SHUTDOWN_TIMEOUT": "30s"})
        with MLLPClient(_port(server)) as client:
            self.assertEqual(client.request(hl7_message("DONE-1")).code, "AA")
            client.sock.sendall(frame(hl7_message("HALF-1"))[:40])
            server.send_signal(signal.SIGTERM)
            server.wait_for_event("shutdown_pre_delay", timeout=10)
            server.send_signal(signal.SIGTERM)
            code = server.wait(timeout=30)
        self.assertEqual(code, 0, server.output())
        names = [e.get("event") for e in server.events()]
        self.assertIn("shutdown_hurried", names)
        abort = [e for e in server.events() if e.get("event") == "shutdown_abort"]
        self.assertEqual([(e["count"], e["why"]) for e in abort], [(1, "hurried")])
        self.assertNotIn("ReactorNotRunning", server.output())
        self.assertNotIn("Traceback", server.output())

    def held_delivery(self, control_id: str) -> tuple[ServerProcess, Any]:
        """A server whose one message is being delivered to an HTTP upstream
        that has not answered yet (SHUTDOWN_TIMEOUT 1s, no pre-delay; the
        connector's own timeout, 5m, is far past the tests' 30 s wait)."""
        from tests.upstreams import HTTPUpstream, wait_until, write_config

        upstream = HTTPUpstream.start(self)
        upstream.answering.clear()
        self.addCleanup(upstream.answering.set)
        workdir = make_workdir(self)
        config = write_config(os.path.join(workdir, "mllp.yaml"), [
            {"name": "lake", "type": "http", "url": upstream.url, "timeout": "5m"},
        ])
        server = start_server(self, workdir=workdir, env={
            "MLLP_CONFIG": config, "PRE_SHUTDOWN_DELAY": "0s", "SHUTDOWN_TIMEOUT": "1s",
        })
        with MLLPClient(_port(server)) as client:
            self.assertEqual(client.request(hl7_message(control_id)).code, "AA")
        wait_until(lambda: upstream.received, bool, timeout=20, what="the delivery to start")
        return server, upstream

    def test_delivery_in_flight_at_sigterm(self) -> None:
        """Stage 5 lets a delivery in flight finish: upstream's answer is recorded and the process still exits 0."""
        server, upstream = self.held_delivery("SLOW-1")
        server.send_signal(signal.SIGTERM)
        server.wait_for_event("shutdown_abort", timeout=10)
        upstream.answering.set()  # upstream answers while stage 5 waits
        code = server.wait(timeout=30)
        self.assertEqual(code, 0, server.output())
        stage = [e for e in server.events() if e.get("event") == "shutdown_relay_stopped"]
        self.assertEqual([e["count"] for e in stage], [1])
        rows = query(server.db_path, "SELECT state, attempts FROM deliveries")
        self.assertEqual(rows, [("delivered", 1)])

    def test_hung_delivery_does_not_hold_shutdown(self) -> None:
        """An upstream that never answers cannot hold the process past the bound; its message stays queued."""
        server, _ = self.held_delivery("HUNG-1")
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=30)
        self.assertEqual(code, 0, server.output())
        rows = query(server.db_path, "SELECT state FROM deliveries")
        self.assertEqual(rows, [("pending",)])

    def test_sigterm_right_after_listening(self) -> None:
        """A SIGTERM as soon as the server logs "listening" still gives an orderly stop and exit 0."""
        for _ in range(3):
            server = start_server(self)
            server.send_signal(signal.SIGTERM)
            self.assertEqual(server.wait(timeout=30), 0, server.output())
            self.assertIn("shutdown_outbox_closed", [e.get("event") for e in server.events()])
