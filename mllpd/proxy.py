"""PROXY protocol (v1/v2) in front of the MLLP listener (MLLP_PROXY_PROTOCOL).

Twisted's ``haproxy:`` wrapper (``twisted.protocols.haproxy``) parses the
header, but connects the wrapped protocol as soon as TCP connects, before the
header has arrived: the connection would be opened, logged and counted under
the load balancer's address. Here the wrapped protocol (TLS or MLLP) is
connected only once the header is read, so logs, the audit peer and the
connection limit all see the real client.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any
from typing import Protocol as Interface

from twisted.internet.interfaces import (
    IProtocolFactory,
    IReactorTime,
    IStreamServerEndpoint,
)
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser
from twisted.protocols.haproxy._wrapper import HAProxyProtocolWrapper, HAProxyWrappingFactory
from twisted.python.failure import Failure
from zope.interface import directlyProvides, providedBy

from mllpd.endpoints import WrappingEndpoint
from mllpd.timer import Timer

__all__ = ["HEADER_TIMEOUT", "V1_MAX", "V2_MAX", "proxy_endpoint"]

log = Logger(namespace="mllpd.proxy")

# A load balancer sends the header at once; a connection without one is not
# from the load balancer.
HEADER_TIMEOUT = 10.0

# The v1 header's longest form, CRLF included (the PROXY protocol spec).
V1_MAX = 107
# Enough bytes to tell a v2 signature (12 bytes + version + family + length).
_SNIFF = 16
# The longest v2 address block (addresses and TLVs) accepted. The format
# allows 65,535 bytes, buffered per connection until the header timeout; real
# ones are far smaller: 12 (IPv4) or 36 (IPv6) bytes of addresses, 216 for
# UNIX sockets, plus TLVs such as AWS NLB's VPC endpoint id (about 25 bytes),
# GCP's PSC connection id, or HAProxy's ALPN, authority and SSL fields.
V2_MAX = 4096
_V1_LINE = re.compile(
    rb"PROXY (?:UNKNOWN(?: [\x21-\x7e ]*)?|(TCP[46]) ([0-9A-Fa-f.:]+) ([0-9A-Fa-f.:]+)"
    rb" (0|[1-9][0-9]{0,4}) (0|[1-9][0-9]{0,4}))"
)


class ConnectionGate(Interface):
    """What counts connections against MLLP_MAX_CONNECTIONS (the MLLP factory)."""

    def admit(self, peer: str) -> bool: ...

    def header_done(self) -> None: ...

    def header_invalid(self) -> None: ...


def valid_v1(line: bytes) -> bool:
    """Whether a v1 header line (without CRLF) has real addresses and ports."""
    m = _V1_LINE.fullmatch(line)
    if m is None:
        return False
    if m.group(1) is None:
        return True  # UNKNOWN: the connection's own addresses are used
    version = 4 if m.group(1) == b"TCP4" else 6
    try:
        addresses = [ipaddress.ip_address(m.group(i).decode("ascii")) for i in (2, 3)]
    except ValueError:
        return False
    ports = [int(m.group(i)) for i in (4, 5)]
    return all(a.version == version for a in addresses) and all(p <= 65535 for p in ports)


class _HeaderFirst(HAProxyProtocolWrapper):
    factory: _HeaderFirstFactory
    transport: Any

    def makeConnection(self, transport: Any) -> None:
        # ProtocolWrapper.makeConnection without connecting the wrapped side.
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)
        self._inner_connected = False
        self._sniffed = b""
        # Runs while the header is awaited; once stopped, no header bytes are read.
        self._timer = Timer(self.factory.clock, self._no_header, HEADER_TIMEOUT)
        gate = self.factory.gate
        self._gated = gate is not None
        if gate is not None and not gate.admit(str(transport.getPeer())):
            self._gated = False
            self.transport.loseConnection()
            return
        self._timer.start()

    def _header_done(self) -> None:
        if self._gated:
            self._gated = False
            gate = self.factory.gate
            assert gate is not None
            gate.header_done()

    def _invalid(self, why: str) -> None:
        self._timer.cancel()  # reads nothing more
        if self.factory.gate is not None:
            self.factory.gate.header_invalid()
        log.warn("invalid PROXY header from {address}: {why}", event="proxy_header_invalid",
                 address=str(self.transport.getPeer()), why=why)
        self.transport.abortConnection()

    def _no_header(self) -> None:
        log.warn(
            "no PROXY header within {seconds}s from {address}", event="proxy_header_timeout",
            seconds=HEADER_TIMEOUT, address=str(self.transport.getPeer()),
        )
        self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        if self._inner_connected:
            self.wrappedProtocol.dataReceived(data)
            return
        if self.disconnecting or not self._timer.running:
            return  # refused or already found invalid: read nothing more
        if self._parser is None:
            # Twisted's wrapper decides v1 or v2 from the first read: wait
            # until there are enough bytes to tell.
            data = self._sniffed + data
            if len(data) < _SNIFF and (
                V2Parser.PREFIX.startswith(data[:12]) or V1Parser.PROXYSTR.startswith(data[:5])
            ) and not (data.startswith(V1Parser.PROXYSTR) and len(data) >= 8):
                self._sniffed = data
                return
            self._sniffed = b""
            if data.startswith(V2Parser.PREFIX):
                length = int.from_bytes(data[14:16], "big")
                if length > V2_MAX:
                    self._invalid(f"v2 address block of {length} bytes, over {V2_MAX}")
                    return
        if isinstance(self._parser, V1Parser) or (
            self._parser is None and data.startswith(V1Parser.PROXYSTR)
        ):
            seen = (self._parser.buffer if self._parser is not None else b"") + data
            end = seen.find(V1Parser.NEWLINE)
            if end < 0 and len(seen) > V1_MAX or end + 2 > V1_MAX:
                self._invalid(f"v1 header longer than {V1_MAX} bytes")
                return
            if end >= 0 and not valid_v1(seen[:end]):
                self._invalid("malformed v1 header")
                return
        inner = self.wrappedProtocol
        held: list[bytes] = []
        # Let the parser run; collect what follows the header until the inner
        # protocol is connected.
        self.wrappedProtocol = _Hold(held)  # type: ignore[assignment]
        try:
            HAProxyProtocolWrapper.dataReceived(self, data)
        except Exception as e:  # noqa: BLE001 - sender's bytes never raise past here
            self._proxyInfo = None
            self._invalid(type(e).__name__)
            return
        finally:
            self.wrappedProtocol = inner
        if self._proxyInfo is None:
            if self.disconnecting:
                self._invalid("not a PROXY header")
            return
        self._timer.cancel()
        self._inner_connected = True
        self._header_done()
        inner.makeConnection(self)  # type: ignore[arg-type]
        for chunk in held:
            if not self._inner_connected:
                break
            inner.dataReceived(chunk)

    def connectionLost(self, reason: Failure | None = None) -> None:  # type: ignore[override]
        self._timer.cancel()
        self._header_done()
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

    def __init__(
        self, wrappedFactory: IProtocolFactory, clock: IReactorTime,
        gate: ConnectionGate | None = None,
    ) -> None:
        super().__init__(wrappedFactory)  # type: ignore[arg-type]
        self.clock = clock
        self.gate = gate


def proxy_endpoint(
    endpoint: IStreamServerEndpoint, clock: IReactorTime, gate: ConnectionGate | None = None
) -> IStreamServerEndpoint:
    """``endpoint`` expecting a PROXY v1/v2 header on every connection;
    connections still waiting for theirs count against ``gate``."""
    return WrappingEndpoint(endpoint, lambda factory: _HeaderFirstFactory(factory, clock, gate))
