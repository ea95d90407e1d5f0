"""MLLPService in-process on real sockets: socket options, listening, drain on stop."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
from typing import Any, cast

from twisted.internet import defer
from twisted.internet import reactor as _reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, serverFromString
from twisted.internet.interfaces import _ISupportsExitSignalCapturing
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from mllpd.endpoints import tcp_options_endpoint
from mllpd.framing import frame
from mllpd.outbox.sqlite import SQLiteOutbox
from mllpd.protocol import MLLPServerFactory, MLLPServerProtocol
from mllpd.receiver import Receiver
from mllpd.service import IServiceReactor, ListenError, MLLPService, TopService
from tests.serverproc import make_workdir

reactor: Any = _reactor

MESSAGE = b"MSH|^~\\&|LAB|HOSP|EHR|HOSP|20260101||ADT^A01^ADT_A01|S1|P|2.5\rPID|1||123\r"


class Client(Protocol):
    """Collects what the server sends and notices when it closes."""

    def __init__(self) -> None:
        self.received = b""
        self.closed: defer.Deferred[None] = defer.Deferred()
        self.got_data: defer.Deferred[None] | None = None

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.got_data is not None and b"\x1c\r" in self.received:
            d, self.got_data = self.got_data, None
            d.callback(None)

    def connectionLost(self, reason: object = None) -> None:
        self.closed.callback(None)


class ServiceTests(TestCase):
    timeout = 15
    def make_service(self, **limits: object) -> tuple[MLLPService, str]:
        folder = make_workdir(self)
        path = os.path.join(folder, "outbox.db")
        outbox = SQLiteOutbox(path, reactor)
        keepalive = cast(float, limits.pop("keepalive_period", 60.0))
        factory = MLLPServerFactory(Receiver(outbox, reactor), reactor, **limits)  # type: ignore[arg-type]
        endpoint = tcp_options_endpoint(serverFromString(reactor, "tcp:0:interface=127.0.0.1"), keepalive)
        service = MLLPService(endpoint, factory, outbox, reactor, address="tcp:0", shutdown_timeout=5)
        service.privilegedStartService()
        service.startService()
        self.addCleanup(lambda: service.running and service.stopService())
        return service, path

    async def connect(self, service: MLLPService) -> tuple[Client, MLLPServerProtocol]:
        """Connect a client; return it with the server's side of the connection."""
        assert service.port is not None
        factory = service.factory
        accepted: defer.Deferred[MLLPServerProtocol] = defer.Deferred()
        build = factory.buildProtocol

        def watch(addr: object) -> MLLPServerProtocol:
            factory.buildProtocol = build  # type: ignore[method-assign,assignment]
            proto = build(addr)  # type: ignore[arg-type]
            # connectionMade runs right after buildProtocol returns.
            reactor.callLater(0, accepted.callback, proto)
            return proto  # type: ignore[return-value]

        factory.buildProtocol = watch  # type: ignore[method-assign,assignment]
        port: Any = service.port.getHost()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.port)
        client = cast(Client, await endpoint.connect(Factory.forProtocol(Client)))
        return client, await accepted

    async def test_socket_options(self) -> None:
        """Accepted sockets have TCP keepalive at MLLP_KEEPALIVE_PERIOD and no Nagle delay."""
        service, _ = self.make_service(keepalive_period=45.0)
        client, proto = await self.connect(service)
        sock = proto.transport.getHandle()
        self.assertEqual(sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE), 1)
        self.assertEqual(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE), 45)
        self.assertEqual(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), 1)
        client.transport.loseConnection()  # type: ignore[union-attr]
        await client.closed

    async def test_keepalive_off(self) -> None:
        """MLLP_KEEPALIVE_PERIOD=0 turns keepalive off."""
        service, _ = self.make_service(keepalive_period=0.0)
        client, proto = await self.connect(service)
        sock = proto.transport.getHandle()
        self.assertEqual(sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE), 0)
        client.transport.loseConnection()  # type: ignore[union-attr]
        await client.closed

    async def test_stop_finishes_frame_in_progress(self) -> None:
        """Stopping while a frame is half sent: the frame completes, gets AA, is stored; then the connection closes."""
        service, path = self.make_service()
        client, proto = await self.connect(service)
        data = frame(MESSAGE)
        arrived: defer.Deferred[None] = defer.Deferred()
        receive = proto.dataReceived

        def spy(chunk: bytes) -> None:
            receive(chunk)
            proto.dataReceived = receive  # type: ignore[method-assign]
            arrived.callback(None)

        proto.dataReceived = spy  # type: ignore[method-assign,assignment]
        client.transport.write(data[:20])  # type: ignore[union-attr]
        await arrived
        self.assertTrue(proto._framer is not None and proto._framer.in_frame)
        stopping = service.stopService()
        self.assertNoResult(stopping)
        client.got_data = defer.Deferred()
        client.transport.write(data[20:])  # type: ignore[union-attr]
        await client.got_data
        await client.closed
        await stopping
        self.assertIn(b"MSA|AA|S1\r", client.received)
        conn = sqlite3.connect(path)
        self.addCleanup(conn.close)
        self.assertEqual(conn.execute("SELECT control_id FROM messages").fetchall(), [("S1",)])

    def test_busy_port(self) -> None:
        """A port that is taken fails startup with a ListenError naming the address."""
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        folder = make_workdir(self)
        outbox = SQLiteOutbox(os.path.join(folder, "o.db"), reactor)
        self.addCleanup(outbox.close)
        factory = MLLPServerFactory(Receiver(outbox, reactor), reactor)
        endpoint = serverFromString(reactor, f"tcp:{port}:interface=127.0.0.1")
        service = MLLPService(endpoint, factory, outbox, reactor, address=f"127.0.0.1:{port}")
        with self.assertRaises(ListenError) as ctx:
            service.privilegedStartService()
        self.assertIn(f"127.0.0.1:{port}", str(ctx.exception))


@implementer(_ISupportsExitSignalCapturing)
class _SignalledReactor(MemoryReactorClock):
    """A reactor whose own SIGTERM handler caught the signal, as twistd's
    reactor does when SIGTERM comes during its startup."""

    _exitSignal: int | None = signal.SIGTERM


class TopServiceTests(SynchronousTestCase):
    def test_orderly_stop_exits_zero(self) -> None:
        """After a completed shutdown twistd sees no signal to re-raise, so the process exits 0, not 143."""
        reactor = _SignalledReactor()
        top = TopService(cast(IServiceReactor, reactor))
        self.successResultOf(top.stopService())
        self.assertIsNone(reactor._exitSignal)
