"""Where delivery time goes: the relay and outbox alone, the connector alone,
and both together.

Fills a fresh SQLite outbox (a temp dir) with N 1 KB messages queued for one
connector, then drains that queue with a real relay ``Worker`` and prints
messages per second for:

- ``null``: a connector that answers Delivered at once, so the rate is the
  relay's and the outbox's own cost per delivery (queue reads, state marks
  in the group commit, Deferred plumbing);
- ``mllp``: the real mllp connector to ``bench/sinks.py --kind mllp``;
- ``http``: the real http connector to ``bench/sinks.py --kind http``;
- ``mllp-direct`` / ``http-direct``: the same connectors called back to back
  without relay or outbox (as ``bench/connector_rate.py`` does).

The sinks run in their own processes, as upstreams do. ``--delay`` makes
them answer each message that many milliseconds late (a slow upstream) and
``--lanes`` sets the connector's lanes; messages carry 1,000 order keys
(patients), so lanes have keys to spread over. With a delay, each run
delivers about three seconds' worth at the expected rate (at most
``--messages``).

    python bench/relay_rate.py --messages 5000 --backlog 0,20000
    python bench/relay_rate.py --kinds mllp,http --delay 0,2,20 --lanes 1,8,32
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import loadgen  # noqa: E402
from common import Server  # noqa: E402
from twisted.internet import task  # noqa: E402
from twisted.internet.defer import Deferred, succeed  # noqa: E402
from zope.interface import implementer  # noqa: E402

from mllpd.connectors import ConnectorSpec, Delivered, Delivery, IConnector, Outcome  # noqa: E402
from mllpd.connectors import http as http_connector  # noqa: E402
from mllpd.connectors import mllp as mllp_connector  # noqa: E402
from mllpd.outbox import Envelope  # noqa: E402
from mllpd.outbox.sqlite import SQLiteOutbox  # noqa: E402
from mllpd.pipeline import RetryPolicy  # noqa: E402
from mllpd.relay import Worker  # noqa: E402
from mllpd.rules import lane_key  # noqa: E402

NAME = "bench"


@implementer(IConnector)
class NullConnector:
    """Delivered at once: measures everything but the upstream."""

    name = NAME

    def start(self) -> None:
        pass

    def deliver(self, delivery: Delivery) -> Deferred[Outcome]:
        return succeed(Delivered())

    def stop(self) -> Deferred[None]:
        return succeed(None)


KEYS = [lane_key(f"LOADGEN\x1fP{k}") for k in range(1000)]


def envelopes(n: int, tag: str) -> list[Envelope]:
    prefix, suffix = loadgen.build_template(1024, "20260101120000")
    now = time.time()
    out = []
    for i in range(n):
        control_id = f"{tag}{i:0{loadgen.CTRL_ID_LEN - len(tag)}d}"
        payload = prefix + control_id.encode() + suffix
        out.append(Envelope(
            uuid.uuid4().hex, now, "127.0.0.1:1", control_id, "ADT^A01", "LOADGEN",
            "BENCH", "2.5", None, uuid.uuid4().hex, "AA", payload,
            routes=(NAME,), lanes=(KEYS[i % len(KEYS)],),
        ))
    return out


fill_cpu = [0.0]


async def fill(outbox: SQLiteOutbox, n: int, tag: str) -> None:
    c0 = cpu_s()
    items = envelopes(n, tag)
    for i in range(0, n, 2000):
        await Deferred.fromCoroutine(_store_all(outbox, items[i : i + 2000]))
    fill_cpu[0] = cpu_s() - c0


async def _store_all(outbox: SQLiteOutbox, items: list[Envelope]) -> None:
    ds = [outbox.store(e) for e in items]
    for d in ds:
        await d


async def drain(reactor: Any, connector: IConnector, db: str, n: int,
                backlog: int, lanes: int = 1) -> tuple[float, float, float]:
    """Queue ``backlog`` + ``n`` messages, deliver them with a Worker and
    return (msgs/s over the last n, msgs/s over the first backlog, outbox
    commits per delivery)."""
    outbox = SQLiteOutbox(db, reactor, dedup_window=0)
    outbox.start()
    worker = Worker(connector, outbox, RetryPolicy(), reactor, lanes=lanes)
    try:
        await fill(outbox, backlog + n, "B")
        commits0 = outbox.commits
        t0 = time.perf_counter()
        worker.start()
        mid = t0
        deadline = t0 + 300
        while worker.delivered < backlog + n:
            if backlog and worker.delivered >= backlog and mid == t0:
                mid = time.perf_counter()
            if worker.retried or worker.dead or time.perf_counter() > deadline:
                raise SystemExit(f"{connector.name}: retried {worker.retried}, dead "
                                 f"{worker.dead}, delivered {worker.delivered}")
            await task.deferLater(reactor, 0.002, lambda: None)
        t1 = time.perf_counter()
        await outbox.mark_in_flight(-1, 0)  # the last marks are committed
        per = (outbox.commits - commits0) / (backlog + n)
    finally:
        await worker.stop()
        await outbox.close()
    if backlog:
        return n / (t1 - mid), backlog / (mid - t0), per
    return n / (t1 - t0), 0.0, per


async def direct(connector: IConnector, n: int) -> float:
    items = envelopes(n, "D")
    start = time.perf_counter()
    for e in items:
        d = Delivery(e.message_id, NAME, e.payload, None, "iso8859-1", e.control_id,
                     e.msg_type, 1, e.received_at)
        outcome = await connector.deliver(d)
        if not isinstance(outcome, Delivered):
            raise SystemExit(f"not delivered: {outcome}")
    return n / (time.perf_counter() - start)


def cpu_s() -> float:
    """CPU seconds of this process (all threads) so far."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def build(kind: str, reactor: Any, port: int, lanes: int = 1) -> IConnector:
    if kind == "null":
        return NullConnector()
    if kind == "mllp":
        spec = ConnectorSpec(NAME, "mllp", None, {"address": f"tcp:127.0.0.1:{port}"}, lanes)
        return mllp_connector.build(spec, reactor, {})
    spec = ConnectorSpec(NAME, "http", None, {"url": f"http://127.0.0.1:{port}/"}, lanes)
    return http_connector.build(spec, reactor, {})


async def main(reactor: Any, args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="mllpd-relay-", dir=args.tmp_dir))
    try:
        for delay in args.delays:
            await one_delay(reactor, args, tmp, delay)
    finally:
        if not args.keep_tmp:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)


async def one_delay(reactor: Any, args: argparse.Namespace, tmp: Path, delay: float) -> None:
    sinks: dict[str, Server] = {}
    try:
        for kind in ("mllp", "http"):
            d = tmp / f"sink-{kind}-{delay:g}"
            d.mkdir()
            sinks[kind] = Server(f"sink-{kind}", [sys.executable, str(HERE / "sinks.py"),
                                                  "--kind", kind, "--report-every", "1",
                                                  "--delay", str(delay)],
                                 d, dict(os.environ))
            sinks[kind].start(30.0)
        for kind in args.kinds.split(","):
            base = kind.removesuffix("-direct")
            port = sinks[base].port if base in sinks else 0
            if kind.endswith("-direct"):
                connector = build(base, reactor, port)
                connector.start()
                await direct(connector, min(200, args.messages))  # connect, warm up
                c0 = cpu_s()
                rate = await direct(connector, args.messages)
                cpu = (cpu_s() - c0) / args.messages
                await connector.stop()
                print(f"{kind:12s} backlog {'-':>6s}  {rate:7.0f} msgs/s  "
                      f"{1e6 / rate:6.0f} us/msg  CPU {cpu * 1e6:4.0f} us/msg", flush=True)
                continue
            for lanes in args.lanes:
                n = args.messages
                if delay > 0:
                    n = min(n, max(100, int(3.0 * lanes * 1000 / delay)))
                for backlog in args.backlogs:
                    connector = build(kind, reactor, port, lanes)
                    db = str(tmp / f"{kind}-{backlog}-{uuid.uuid4().hex[:6]}.db")
                    c0 = cpu_s()
                    rate, early, commits = await drain(
                        reactor, connector, db, n, backlog, lanes
                    )
                    # Filling the queue is not counted: its cost is measured on its own.
                    cpu = (cpu_s() - c0 - fill_cpu[0]) / (n + backlog)
                    extra = f"  (first {backlog}: {early:.0f} msgs/s)" if backlog else ""
                    print(f"{kind:12s} delay {delay:4g} ms  lanes {lanes:3d}  "
                          f"backlog {backlog:6d}  {rate:7.0f} msgs/s  "
                          f"{1e6 / rate:6.0f} us/msg  CPU {cpu * 1e6:4.0f} us/msg  "
                          f"commits/msg {commits:.2f}{extra}", flush=True)
    finally:
        for s in sinks.values():
            s.stop(5.0)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=5000,
                        help="messages timed (after the backlog)")
    parser.add_argument("--backlog", default="0",
                        help="comma-separated: messages queued ahead of the timed ones")
    parser.add_argument("--kinds", default="null,mllp,http,mllp-direct,http-direct")
    parser.add_argument("--delay", default="0",
                        help="comma-separated: sink answer delays in milliseconds")
    parser.add_argument("--lanes", default="1", help="comma-separated: connector lanes")
    parser.add_argument("--tmp-dir", default=None)
    parser.add_argument("--keep-tmp", action="store_true")
    arguments = parser.parse_args()
    arguments.backlogs = [int(x) for x in arguments.backlog.split(",")]
    arguments.delays = [float(x) for x in arguments.delay.split(",")]
    arguments.lanes = [int(x) for x in arguments.lanes.split(",")]
    task.react(lambda reactor: Deferred.fromCoroutine(main(reactor, arguments)))
