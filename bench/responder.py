"""Minimal Twisted MLLP responder: ACKs every HL7 message, stores nothing.

It is the baseline the real gateway is compared against: framing on
``0x0B ... 0x1C 0x0D``, a trivial ``|`` split of MSH to echo MSH-10 into
MSA-2, one write per ACK. Prints ``{"event": "listening", "port": N}`` on
stdout once listening on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from typing import cast

from twisted.internet import endpoints, protocol, reactor
from twisted.internet.interfaces import IListeningPort, ITCPTransport

SB = b"\x0b"
EB_CR = b"\x1c\x0d"
MAX_FRAME = 16 << 20  # drop connections with an unterminated frame > 16 MiB

_ids = itertools.count(1)
_ts_cache: tuple[int, bytes] = (0, b"")


def _timestamp() -> bytes:
    """HL7 DTM for now, recomputed at most once per second."""
    global _ts_cache
    sec = int(time.time())
    if _ts_cache[0] != sec:
        _ts_cache = (sec, time.strftime("%Y%m%d%H%M%S", time.localtime(sec)).encode())
    return _ts_cache[1]


def build_ack(msg: bytes) -> bytes:
    """Framed original-mode AA for ``msg`` (AR if there is no MSH)."""
    msh = msg.split(b"\r", 1)[0]
    if not msh.startswith(b"MSH") or len(msh) < 8:
        f: list[bytes] = []
        code = b"AR"
    else:
        f = msh.split(msh[3:4])
        code = b"AA"

    def fld(n: int) -> bytes:  # MSH-n; f[0] is "MSH", f[1] is MSH-2
        return f[n - 1] if len(f) >= n else b""

    trigger = fld(9).split(b"^")[1:2]
    ack_type = b"ACK^" + trigger[0] + b"^ACK" if trigger else b"ACK"
    return b"".join((
        SB, b"MSH|^~\\&|", fld(5), b"|", fld(6), b"|", fld(3), b"|", fld(4), b"|",
        _timestamp(), b"||", ack_type, b"|R", str(next(_ids)).encode(), b"|P|2.5\r",
        b"MSA|", code, b"|", fld(10), b"\r", EB_CR,
    ))


class Responder(protocol.Protocol):
    """Frame MLLP messages and answer each with an AA."""

    answer = staticmethod(build_ack)  # payload -> framed ACK; sinks.py counts here

    def __init__(self) -> None:
        self._parts: list[bytes] = []  # chunks of an unterminated frame
        self._size = 0

    def connectionMade(self) -> None:
        cast(ITCPTransport, self.transport).setTcpNoDelay(True)

    def dataReceived(self, data: bytes) -> None:
        transport = self.transport
        assert transport is not None
        if self._parts:
            # Only the new bytes (and one before, for a split 0x1C 0x0D) can
            # hold the terminator: no rescanning, no re-joining big frames.
            if (self._parts[-1][-1:] + data).find(EB_CR) < 0:
                self._parts.append(data)
                self._size += len(data)
                if self._size > MAX_FRAME:
                    transport.loseConnection()
                    self._parts, self._size = [], 0
                return
            self._parts.append(data)
            buf = b"".join(self._parts)
            self._parts, self._size = [], 0
        else:
            buf = data
        out = []
        while True:
            end = buf.find(EB_CR)
            if end < 0:
                break
            start = buf.find(SB, 0, end)
            if start >= 0:
                out.append(self.answer(buf[start + 1 : end]))
            buf = buf[end + 2 :]
        if out:
            transport.write(b"".join(out))
        if buf:
            self._parts, self._size = [buf], len(buf)


def main(argv: list[str] | None = None) -> None:
    """Listen, announce the port as JSON, and run until SIGINT/SIGTERM."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, default=0, help="TCP port, 0 = pick one")
    args = p.parse_args(argv)
    factory = protocol.Factory.forProtocol(Responder)
    ep = endpoints.TCP4ServerEndpoint(reactor, args.port, backlog=1024, interface="127.0.0.1")

    def listening(port: IListeningPort) -> None:
        addr = port.getHost()
        line = {"event": "listening", "host": addr.host, "port": addr.port}  # type: ignore[attr-defined]
        sys.stdout.write(json.dumps(line) + "\n")
        sys.stdout.flush()

    def failed(err: object) -> None:
        sys.stderr.write(f"listen failed: {err}\n")
        reactor.stop()  # type: ignore[attr-defined]

    ep.listen(factory).addCallbacks(listening, failed)
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
