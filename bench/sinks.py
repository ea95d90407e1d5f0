"""Upstream sinks for the delivery benchmark: an MLLP server and an HTTP server.

``--kind mllp`` frames MLLP and answers every message with an AA whose MSA-2
is the message's MSH-10 (``bench/responder.py``'s code); ``--kind http`` is a
twisted.web server answering every POST with 200 and an empty body. Both
listen on 127.0.0.1, print ``{"event": "listening", "port": N}`` and then,
every ``--report-every`` seconds, a line

    {"event": "count", "t": <CLOCK_MONOTONIC s>, "n": <messages>, "unique": <ids>}

where ``unique`` counts distinct MSH-10 (mllp) or X-MLLP-Message-Id (http)
values, so a redelivery shows as ``n > unique``. ``--delay 20`` answers each
message 20 ms after it arrived, as a slow upstream does (each connection
still answers in order). CLOCK_MONOTONIC is
system-wide on Linux, so the benchmark can place these counts on its own
timeline.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from responder import Responder, build_ack
from twisted.internet import endpoints, protocol, reactor, task
from twisted.internet.interfaces import IListeningPort
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site


class Counter:
    """Messages seen, and the distinct ids among them."""

    def __init__(self) -> None:
        self.n = 0
        self.ids: set[bytes] = set()

    def seen(self, ident: bytes) -> None:
        self.n += 1
        self.ids.add(ident)

    def report(self) -> None:
        line = {"event": "count", "t": time.monotonic(), "n": self.n, "unique": len(self.ids)}
        sys.stdout.write(json.dumps(line) + "\n")
        sys.stdout.flush()


COUNTER = Counter()


def _control_id(msg: bytes) -> bytes:
    msh = msg.split(b"\r", 1)[0]
    fields = msh.split(msh[3:4]) if len(msh) > 3 else []
    return fields[9] if len(fields) > 9 else b""


class CountingResponder(Responder):
    """The minimal responder, counting each message by its MSH-10."""

    @staticmethod
    def answer(msg: bytes) -> bytes:
        COUNTER.seen(_control_id(msg))
        return build_ack(msg)


class DelayedResponder(CountingResponder):
    """Writes each ACK ``DELAY`` seconds after its message arrived."""

    def dataReceived(self, data: bytes) -> None:
        transport = self.transport
        assert transport is not None
        real_write = transport.write
        transport.write = lambda ack: reactor.callLater(  # type: ignore[method-assign]
            DELAY[0], real_write, ack
        )
        try:
            super().dataReceived(data)
        finally:
            transport.write = real_write  # type: ignore[method-assign]


DELAY = [0.0]


class HTTPSink(Resource):
    """200 and an empty body for every POST (after DELAY seconds)."""

    isLeaf = True

    def render_POST(self, request: Request) -> bytes | int:
        assert request.content is not None
        request.content.read()
        COUNTER.seen(request.getHeader(b"x-mllp-message-id") or b"")
        if DELAY[0] > 0:
            reactor.callLater(DELAY[0], request.finish)  # type: ignore[attr-defined]
            return NOT_DONE_YET
        return b""


class QuietSite(Site):
    """No access log: one line per request would cost more than the answer."""

    def log(self, request: Request) -> None:
        pass


def main(argv: list[str] | None = None) -> None:
    """Listen, announce the port, report counts until SIGINT/SIGTERM."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kind", choices=("mllp", "http"), required=True)
    p.add_argument("--port", type=int, default=0, help="TCP port, 0 = pick one")
    p.add_argument("--report-every", type=float, default=0.05, help="seconds between count lines")
    p.add_argument("--delay", type=float, default=0.0, help="milliseconds before each answer")
    args = p.parse_args(argv)
    DELAY[0] = args.delay / 1000.0
    factory: protocol.Factory
    if args.kind == "mllp":
        factory = protocol.Factory.forProtocol(
            DelayedResponder if DELAY[0] > 0 else CountingResponder
        )
    else:
        factory = QuietSite(HTTPSink())
    ep = endpoints.TCP4ServerEndpoint(reactor, args.port, backlog=128, interface="127.0.0.1")

    def listening(port: IListeningPort) -> None:
        line = {"event": "listening", "kind": args.kind, "port": port.getHost().port}  # type: ignore[attr-defined]
        sys.stdout.write(json.dumps(line) + "\n")
        sys.stdout.flush()
        task.LoopingCall(COUNTER.report).start(args.report_every)

    def failed(err: object) -> None:
        sys.stderr.write(f"listen failed: {err}\n")
        reactor.stop()  # type: ignore[attr-defined]

    ep.listen(factory).addCallbacks(listening, failed)
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
