"""Per-message CPU cost of mllpd's receive path, without network or disk.

Feeds N framed 1 KB ADT^A01 messages (the load generator's) through
MLLPServerProtocol over StringTransport with an outbox that stores nothing,
and prints microseconds per message: framing, parsing, checks, envelope,
hashing and ACK building, i.e. what the reactor thread spends per message on
top of Twisted's I/O.

    python bench/receive_path.py [--messages 20000] [--profile] [--metrics] [--batch N]

``--metrics`` turns on the metrics collectors (as MLLP_METRICS_ADDR does).
``--batch N`` sends the messages as HL7 batches (BHS ... BTS) of N per frame.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time
from collections.abc import Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import loadgen  # noqa: E402
from twisted.internet.address import IPv4Address  # noqa: E402
from twisted.internet.defer import Deferred, succeed  # noqa: E402
from twisted.internet.task import Clock  # noqa: E402
from twisted.internet.testing import StringTransport  # noqa: E402

from mllpd.framing import frame  # noqa: E402
from mllpd.outbox import Envelope, StoreResult  # noqa: E402
from mllpd.protocol import MLLPServerFactory  # noqa: E402
from mllpd.receiver import Receiver  # noqa: E402
from mllpd.testing import MemoryOutbox  # noqa: E402


class NullOutbox(MemoryOutbox):
    """Accepts everything at once and keeps nothing."""

    def store(self, envelope: Envelope) -> Deferred[StoreResult]:
        return succeed(StoreResult(envelope.message_id, False))

    def store_batch(self, envelopes: Sequence[Envelope]) -> Deferred[list[StoreResult]]:
        return succeed([StoreResult(e.message_id, False) for e in envelopes])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--metrics", action="store_true", help="with the metrics collectors on")
    parser.add_argument("--batch", type=int, default=0, help="messages per HL7 batch frame")
    args = parser.parse_args()
    prefix, suffix = loadgen.build_template(1024, "20260101120000")
    messages = [
        prefix + f"{i:0{loadgen.CTRL_ID_LEN}d}".encode() + suffix for i in range(args.messages)
    ]
    if args.batch:
        frames = [
            frame(b"BHS|^~\\&|LOADGEN|FAC|||20260101120000||||B%d\r" % i
                  + b"".join(messages[i : i + args.batch])
                  + b"BTS|%d\r" % len(messages[i : i + args.batch]))
            for i in range(0, len(messages), args.batch)
        ]
    else:
        frames = [frame(m) for m in messages]
    clock = Clock()
    clock.advance(1.8e9)
    metrics = None
    if args.metrics:
        from mllpd.metrics import Metrics

        metrics = Metrics()
    factory = MLLPServerFactory(Receiver(NullOutbox(), clock), clock, metrics=metrics)
    if metrics is not None:
        metrics.watch_connections(factory)
    proto = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5000))
    assert proto is not None
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5000))
    proto.makeConnection(transport)

    def run() -> None:
        for data in frames:
            proto.dataReceived(data)
            transport.clear()

    start = time.perf_counter()
    run()
    elapsed = time.perf_counter() - start
    acks = factory.acks
    assert sum(acks.values()) == len(messages), acks
    print(f"{elapsed / len(messages) * 1e6:.1f} us per message ({len(messages)} messages"
          f" in {len(frames)} frames, {dict(acks)})")
    if args.profile:
        profiler = cProfile.Profile()
        profiler.runcall(run)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(20)


if __name__ == "__main__":
    main()
