"""PROXY protocol (v1/v2) in front of the MLLP listener (MLLP_PROXY_PROTOCOL).

Twisted's ``haproxy:`` wrapper (``twisted.protocols.haproxy``) parses the
header, but connects the wrapped protocol as soon as TCP connects, before the
header has arrived: the connection would be opened, logged and counted under
the load balancer's address. Here the wrapped protocol (TLS or MLLP) is
connected only once the header is read, so logs, the audit peer and the
connection limit all see the real client.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IDelayedCall,
    IListeningPort,
    IProtocolFactory,
    IReactorTime,
    IStreamServerEndpoint,
)
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.haproxy._wrapper import HAProxyProtocolWrapper, HAProxyWrappingFactory
from twisted.python.failure import Failure
from zope.interface import directlyProvides, implementer, providedBy

__all__ = ["HEADER_TIMEOUT", "proxy_endpoint"]

log = Logger(namespace="mllpd.proxy")

# A load balancer sends the header at once; a connection without one is not
# from the load balancer.
HEADER_TIMEOUT = 10.0


class _HeaderFirst(HAProxyProtocolWrapper):
    factory: _HeaderFirstFactory
    transport: Any

    def makeConnection(self, transport: Any) -> None:
        # ProtocolWrapper.makeConnection without connecting the wrapped side.
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)
        self._inner_connected = False
        self._timer: IDelayedCall | None = self.factory.clock.callLater(
            HEADER_TIMEOUT, self._no_header
        )

    def _no_header(self) -> None:
        self._timer = None
        log.warn(
            "no PROXY header within {seconds}s from {address}", event="proxy_header_timeout",
            seconds=HEADER_TIMEOUT, address=str(self.transport.getPeer()),
        )
        self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        if self._inner_connected:
            self.wrappedProtocol.dataReceived(data)
            return
        inner = self.wrappedProtocol
        held: list[bytes] = []
        # Let the parser run; collect what follows the header until the inner
        # protocol is connected.
        self.wrappedProtocol = _Hold(held)  # type: ignore[assignment]
        try:
            HAProxyProtocolWrapper.dataReceived(self, data)
        finally:
            self.wrappedProtocol = inner
        if self._proxyInfo is None:
            if self.disconnecting:
                log.warn("invalid PROXY header from {address}", event="proxy_header_invalid",
                         address=str(self.transport.getPeer()))
            return
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._inner_connected = True
        inner.makeConnection(self)  # type: ignore[arg-type]
        for chunk in held:
            if not self._inner_connected:
                break
            inner.dataReceived(chunk)

    def connectionLost(self, reason: Failure | None = None) -> None:  # type: ignore[override]
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self.factory.unregisterProtocol(self)
        if self._inner_connected:
            self._inner_connected = False
            self.wrappedProtocol.connectionLost(reason)  # type: ignore[arg-type]


class _Hold:
    def __init__(self, into: list[bytes]) -> None:
        self.into = into

    def dataReceived(self, data: bytes) -> None:
        self.into.append(data)


class _HeaderFirstFactory(HAProxyWrappingFactory):
    protocol = _HeaderFirst  # type: ignore[assignment]

    def __init__(self, wrappedFactory: IProtocolFactory, clock: IReactorTime) -> None:
        super().__init__(wrappedFactory)  # type: ignore[arg-type]
        self.clock = clock


@implementer(IStreamServerEndpoint)
class _ProxyEndpoint:
    def __init__(self, endpoint: IStreamServerEndpoint, clock: IReactorTime) -> None:
        self.endpoint = endpoint
        self.clock = clock

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        return self.endpoint.listen(_HeaderFirstFactory(protocolFactory, self.clock))


def proxy_endpoint(endpoint: IStreamServerEndpoint, clock: IReactorTime) -> IStreamServerEndpoint:
    """``endpoint`` expecting a PROXY v1/v2 header on every connection."""
    return _ProxyEndpoint(endpoint, clock)
