"""The PROXY protocol wrapper against hostile headers: bounded, validated, counted."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.protocols.haproxy._v2parser import V2Parser
from twisted.trial.unittest import SynchronousTestCase

from mllpd.framing import frame
from mllpd.protocol import MLLPServerFactory
from mllpd.proxy import V1_MAX, V2_MAX, _HeaderFirstFactory, valid_v1
from mllpd.receiver import Receiver
from mllpd.testing import MemoryOutbox
from tests.serverproc import hl7_message


class Harness:
    def __init__(self, max_connections: int = 0) -> None:
        self.clock = Clock()
        self.outbox = MemoryOutbox()
        self.inner = MLLPServerFactory(
            Receiver(self.outbox, self.clock), self.clock, max_connections=max_connections
        )
        self.wrapper = _HeaderFirstFactory(self.inner, self.clock, self.inner)

    def connect(self, port: int = 1234) -> tuple[Any, StringTransport]:
        proto = self.wrapper.buildProtocol(IPv4Address("TCP", "10.0.0.1", port))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.1", port))
        proto.makeConnection(transport)
        return proto, transport


class ProxyHeaderTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.logged: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)

    def assert_refused(self, header: bytes) -> None:
        h = Harness()
        proto, t = h.connect()
        proto.dataReceived(header + frame(hl7_message("P1")))
        self.assertTrue(t.disconnecting, header[:60])
        self.assertEqual((h.inner.open_connections, h.outbox.stored), (0, []))
        self.assertNotIn(b"MSA", t.value())
        proto.connectionLost(None)
        self.assertEqual(h.inner.awaiting_header, 0)

    def test_bad_addresses_and_ports_refused(self) -> None:
        """Headers with control characters, non-numeric or out-of-range ports or wrong address families close the connection, without a traceback."""
        for header in (
            b"PROXY TCP4 1.2.3.4\x01 10.0.0.1 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 10.0.0.1 port 2575\r\n",
            b"PROXY TCP4 1.2.3.4 10.0.0.1 70000 2575\r\n",
            b"PROXY TCP4 1.2.3.999 10.0.0.1 1 2\r\n",
            b"PROXY TCP4 ::1 10.0.0.1 1 2\r\n",
            b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 10.0.0.1 01 2\r\n",
            b"PROXY TCP4  1.2.3.4 10.0.0.1 1 2\r\n",
        ):
            self.assert_refused(header)
        self.assertFalse([e for e in self.logged if e.get("log_failure") is not None])
        self.assertTrue(all(
            e.get("event") == "proxy_header_invalid" for e in self.logged
            if e.get("log_namespace") == "mllpd.proxy"
        ))

    def test_v1_header_longer_than_107_bytes_refused(self) -> None:
        """A v1 header past 107 bytes (CRLF included) is refused, whether or not its CRLF came."""
        self.assert_refused(b"PROXY UNKNOWN " + b"x" * 5000 + b"\r\n")
        self.assert_refused(b"PROXY UNKNOWN " + b"x" * 200)
        line = b"PROXY UNKNOWN " + b"x" * (V1_MAX - 16)
        self.assertEqual(len(line) + 2, V1_MAX)  # the longest allowed
        h = Harness()
        proto, t = h.connect()
        proto.dataReceived(line + b"\r\n" + frame(hl7_message("OK")))
        self.assertIn(b"MSA|AA|OK", t.value())

    def test_v2_address_block_capped(self) -> None:
        """A v2 header announcing an address block over V2_MAX is refused at once, logged and counted; one with TLVs as AWS NLB sends is read."""
        addresses = bytes([203, 0, 113, 7, 10, 0, 0, 2]) + (51234).to_bytes(2, "big") + (2575).to_bytes(2, "big")
        vpce = b"\x01" + b"vpce-0123456789abcdef0"  # PP2_SUBTYPE_AWS_VPCE_ID
        tlv = b"\xea" + len(vpce).to_bytes(2, "big") + vpce

        def v2(block: bytes, announced: int | None = None) -> bytes:
            n = len(block) if announced is None else announced
            return V2Parser.PREFIX + b"\x21\x11" + n.to_bytes(2, "big") + block

        h = Harness()
        proto, t = h.connect()
        proto.dataReceived(v2(addresses + tlv) + frame(hl7_message("NLB")))
        self.assertIn(b"MSA|AA|NLB", t.value())
        self.assertEqual([p.peer for p in h.inner.connections], ["203.0.113.7:51234"])

        h = Harness()
        proto, t = h.connect()
        # Only the first bytes of a 64 KiB header: it is refused before the rest is buffered.
        proto.dataReceived(v2(addresses, announced=V2_MAX + 1))
        self.assertTrue(t.disconnecting)
        self.assertEqual(h.inner.stats["proxy_headers_invalid"], 1)
        self.assertEqual(h.inner.open_connections, 0)
        proto.connectionLost(None)
        self.assertEqual(h.inner.awaiting_header, 0)
        self.assertEqual(
            [e.get("event") for e in self.logged if e.get("log_namespace") == "mllpd.proxy"],
            ["proxy_header_invalid"],
        )
        self.assert_refused(v2(addresses + b"\0" * 65_000, announced=65_000 + len(addresses)))

    def test_valid_headers(self) -> None:
        """Well-formed TCP4, TCP6 and UNKNOWN lines pass the check."""
        for line in (
            b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 2575",
            b"PROXY TCP6 2001:db8::1 ::1 0 65535",
            b"PROXY UNKNOWN",
            b"PROXY UNKNOWN ffff:f...f:ffff 65535 65535",
        ):
            self.assertTrue(valid_v1(line), line)

    def test_header_in_small_pieces(self) -> None:
        """A header arriving a few bytes at a time (v1 and v2) is read, not refused."""
        h = Harness()
        proto, t = h.connect()
        data = b"PROXY TCP4 203.0.113.7 10.0.0.2 51234 2575\r\n" + frame(hl7_message("SPLIT"))
        for i in range(0, len(data), 3):
            proto.dataReceived(data[i : i + 3])
        self.assertIn(b"MSA|AA|SPLIT", t.value())
        self.assertEqual([p.peer for p in h.inner.connections], ["203.0.113.7:51234"])

    def test_awaiting_header_counts_against_max_connections(self) -> None:
        """Connections still waiting for their header count against MLLP_MAX_CONNECTIONS; the slot frees when they go."""
        h = Harness(max_connections=2)
        p1, t1 = h.connect(1)
        p2, t2 = h.connect(2)
        p3, t3 = h.connect(3)
        self.assertEqual([t.disconnecting for t in (t1, t2, t3)], [False, False, True])
        self.assertEqual(h.inner.stats["connections_refused"], 1)
        p1.dataReceived(b"PROXY TCP4 203.0.113.7 10.0.0.2 51234 2575\r\n")
        self.assertEqual((h.inner.open_connections, h.inner.awaiting_header), (1, 1))
        p3.connectionLost(None)
        p2.connectionLost(None)
        self.assertEqual(h.inner.awaiting_header, 0)
        _, t4 = h.connect(4)
        self.assertFalse(t4.disconnecting)


class ProxyProcessTests(SynchronousTestCase):
    def test_hostile_headers_never_log_a_traceback(self) -> None:
        """The real process closes connections with bad PROXY headers, logs no traceback, and serves the next one."""
        from tests.serverproc import MLLPClient, start_server

        server = start_server(self, env={"MLLP_PROXY_PROTOCOL": "true"})
        assert server.port is not None
        for header in (
            b"PROXY TCP4 1.2.3.4 10.0.0.1 port 2575\r\n",
            b"PROXY TCP4 1.2.3.4\x07 10.0.0.1 1 2\r\n",
            b"PROXY UNKNOWN " + b"x" * 5000 + b"\r\n",
        ):
            with MLLPClient(server.port) as client:
                try:
                    client.sock.sendall(header)
                except (ConnectionResetError, BrokenPipeError):
                    pass  # aborted while the header was still being written
                self.assertEqual(client.wait_closed(timeout=10), [])
        with MLLPClient(server.port) as client:
            client.sock.sendall(b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 2575\r\n")
            self.assertEqual(client.request(hl7_message("AFTER")).code, "AA")
        server.wait_for_event("proxy_header_invalid")
        self.assertNotIn("Traceback", server.output())
        self.assertFalse([e for e in server.events() if e.get("level") == "critical"])


_V2_PREFIX = b"\r\n\r\n\x00\r\nQUIT\n"


class ProxyPropertyTests(SynchronousTestCase):
    @settings(max_examples=300, deadline=None)
    @given(
        start=st.sampled_from([b"", b"PROXY ", b"PROXY TCP4 ", b"PROXY TCP6 ", _V2_PREFIX + b"\x21\x11"]),
        chunks=st.lists(st.binary(max_size=80), max_size=6),
    )
    def test_any_bytes_never_raise(self, start: bytes, chunks: list[bytes]) -> None:
        """Any bytes after any header start neither raise nor leak a slot; a connection that gets through has a real address."""
        import ipaddress

        h = Harness(max_connections=5)
        proto, t = h.connect()
        for chunk in [start, *chunks]:
            proto.dataReceived(chunk)
        for p in h.inner.connections:
            host, _, port = p.peer.rpartition(":")
            ipaddress.ip_address(host.strip("[]"))
            self.assertLessEqual(int(port), 65535)
        proto.connectionLost(None)
        self.assertEqual((h.inner.awaiting_header, h.inner.open_connections), (0, 0))
