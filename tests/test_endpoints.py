"""Endpoint wrappers: TCP socket options on real accepted sockets, under TLS too."""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mllpd.endpoints import tcp_options_endpoint
from tests.certs import CertDir
from tests.serverproc import LOOPBACK, make_workdir

reactor: Any = _reactor


class Accepted(Protocol):
    """The server side of a connection; tells its factory when it is made and lost."""

    factory: AcceptingFactory

    def __init__(self) -> None:
        self.received = b""
        self.lost: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.factory.accepted.callback(self)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.lost.callback(None)


class AcceptingFactory(Factory):
    protocol = Accepted

    def __init__(self) -> None:
        self.accepted: Deferred[Accepted] = Deferred()


def _options(sock: socket.socket) -> dict[str, int]:
    return {
        "keepalive": sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
        "idle": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
        "interval": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
        "count": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
        "nodelay": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY),
    }


class TCPOptionsTests(TestCase):
    """tcp_options_endpoint on a real listening socket."""

    timeout = 15

    async def accept(self, endpoint: IStreamServerEndpoint) -> tuple[Accepted, socket.socket]:
        """Connect a client; return the server's protocol and the accepted socket."""
        factory = AcceptingFactory()
        port = await endpoint.listen(factory)
        self.addCleanup(port.stopListening)
        client = socket.create_connection((LOOPBACK, port.getHost().port), timeout=10)  # type: ignore[attr-defined]
        self.addCleanup(client.close)
        proto = await factory.accepted
        tcp = proto.transport
        while not isinstance(tcp.getHandle(), socket.socket):  # type: ignore[union-attr]
            tcp = tcp.transport  # type: ignore[union-attr]
        return proto, tcp.getHandle()  # type: ignore[union-attr]

    async def close(self, proto: Accepted) -> None:
        assert proto.transport is not None
        proto.transport.loseConnection()
        await proto.lost

    def listening(self, keepalive: float) -> IStreamServerEndpoint:
        return tcp_options_endpoint(TCP4ServerEndpoint(reactor, 0, interface=LOOPBACK), keepalive)

    async def test_keepalive_and_nodelay(self) -> None:
        """An accepted connection probes after the keepalive period, every period, three times, with no Nagle delay."""
        proto, sock = await self.accept(self.listening(45.0))
        self.assertEqual(
            _options(sock), {"keepalive": 1, "idle": 45, "interval": 45, "count": 3, "nodelay": 1}
        )
        await self.close(proto)

    async def test_keepalive_off(self) -> None:
        """A keepalive period of 0 turns probing off and still disables Nagle."""
        proto, sock = await self.accept(self.listening(0.0))
        options = _options(sock)
        self.assertEqual((options["keepalive"], options["nodelay"]), (0, 1))
        await self.close(proto)

    async def test_options_reach_the_socket_under_tls(self) -> None:
        """With TLS wrapped around it, the accepted TCP socket still gets the keepalive period."""
        from twisted.internet.task import Clock

        from mllpd.tls import ServerTLS, TLSFiles, tls_endpoint

        certs = CertDir(make_workdir(self))
        cert, key, _ = certs.server_pair()
        tls = ServerTLS(TLSFiles(cert, key), Clock())
        endpoint = tls_endpoint(self.listening(45.0), tls, handshake_timeout=0)
        proto, sock = await self.accept(endpoint)
        self.assertEqual((_options(sock)["keepalive"], _options(sock)["idle"]), (1, 45))
        proto.transport.abortConnection()  # type: ignore[union-attr]
        await proto.lost


class NotTCPTests(SynchronousTestCase):
    """A transport that is not TCP (a Unix socket) passes through untouched."""

    def test_non_tcp_transport_left_alone(self) -> None:
        """Over a non-TCP transport the wrapped protocol is connected and bytes pass both ways."""
        captured: list[Any] = []

        class Capture:
            def listen(self, factory: Any) -> None:
                captured.append(factory)

        tcp_options_endpoint(Capture(), 45.0).listen(AcceptingFactory())  # type: ignore[arg-type]
        wrapper = captured[0].buildProtocol(None)
        transport = StringTransport()
        wrapper.makeConnection(transport)
        inner = self.successResultOf(captured[0].wrappedFactory.accepted)
        wrapper.dataReceived(b"hello")
        inner.transport.write(b"world")
        self.assertEqual((inner.received, transport.value()), (b"hello", b"world"))
