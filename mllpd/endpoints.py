"""Server endpoint wrappers: transport concerns (TCP socket options, PROXY
header, TLS) as a wrapper around whatever endpoint the user named, each
wrapping the factory of every connection it accepts."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IStreamServerEndpoint,
    ITCPTransport,
    ITransport,
)
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from zope.interface import implementer

__all__ = ["WrappingEndpoint", "set_tcp_options", "tcp_options_endpoint"]


@implementer(IStreamServerEndpoint)
class WrappingEndpoint:
    """``endpoint``, listening with ``wrap(factory)`` instead of ``factory``."""

    def __init__(
        self,
        endpoint: IStreamServerEndpoint,
        wrap: Callable[[IProtocolFactory], IProtocolFactory],
    ) -> None:
        self.endpoint = endpoint
        self.wrap = wrap

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        return self.endpoint.listen(self.wrap(protocolFactory))


def set_tcp_options(transport: Any, keepalive: float) -> None:
    """No Nagle delay, and TCP keepalive probes after ``keepalive`` idle
    seconds (0: keepalive off), on a TCP transport; anything else (a Unix
    socket) is left alone."""
    if not ITCPTransport.providedBy(transport):
        return
    try:
        # An ACK is one small write the sender is waiting for: never let
        # Nagle hold it back for the sender's delayed ACK.
        transport.setTcpNoDelay(True)
        transport.setTcpKeepAlive(bool(keepalive))
        if keepalive and hasattr(socket, "TCP_KEEPIDLE"):
            sock = transport.getHandle()  # type: ignore[attr-defined]
            seconds = max(1, int(keepalive))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, seconds)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, seconds)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
    except (OSError, AttributeError):
        pass  # a socket the peer already reset, or a platform without the option


class _TCPOptions(ProtocolWrapper):
    factory: _TCPOptionsFactory

    def makeConnection(self, transport: ITransport) -> None:
        set_tcp_options(transport, self.factory.keepalive)
        super().makeConnection(transport)


class _TCPOptionsFactory(WrappingFactory):
    protocol = _TCPOptions

    def __init__(self, wrappedFactory: IProtocolFactory, keepalive: float) -> None:
        super().__init__(wrappedFactory)  # type: ignore[arg-type]
        self.keepalive = keepalive


def tcp_options_endpoint(endpoint: IStreamServerEndpoint, keepalive: float) -> IStreamServerEndpoint:
    """``endpoint`` with :func:`set_tcp_options` applied to every accepted
    connection. Wrap the user's endpoint with it first, so that the options
    reach the TCP socket beneath any PROXY or TLS layer."""
    return WrappingEndpoint(endpoint, lambda factory: _TCPOptionsFactory(factory, keepalive))


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses: traffic that never leaves the host."""
    name = host.strip().strip("[]").lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name.split("%", 1)[0]).is_loopback
    except ValueError:
        return False
