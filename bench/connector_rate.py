"""Sequential delivery rate of the http and postgres connectors on loopback.

Delivers N 1 KB messages one at a time, as a relay worker does (each waits
for the previous outcome), and prints messages per second and latency
percentiles. http goes to a minimal twisted.web sink in the same process
(answering 200); postgres goes to the server named by
MLLPD_TEST_POSTGRES_DSN (e.g. from `eval "$(.ci/postgres.sh start)"`), into
a scratch table that is dropped afterwards.

    python bench/connector_rate.py [--messages 5000] [--only http|postgres]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import loadgen  # noqa: E402
import psycopg  # noqa: E402
from twisted.internet import task  # noqa: E402
from twisted.internet.defer import Deferred  # noqa: E402
from twisted.web.resource import Resource  # noqa: E402
from twisted.web.server import Request, Site  # noqa: E402

from mllpd.connectors import ConnectorSpec, Delivered, Delivery, IConnector  # noqa: E402
from mllpd.connectors import http as http_connector  # noqa: E402
from mllpd.connectors import postgres as postgres_connector  # noqa: E402


class Sink(Resource):
    isLeaf = True

    def render_POST(self, request: Request) -> bytes:
        assert request.content is not None
        request.content.read()
        return b""


def deliveries(n: int) -> list[Delivery]:
    prefix, suffix = loadgen.build_template(1024, "20260101120000")
    out = []
    for i in range(n):
        control_id = f"{i:0{loadgen.CTRL_ID_LEN}d}"
        payload = prefix + control_id.encode() + suffix
        out.append(Delivery(uuid.uuid4().hex, "bench", payload, None, "iso8859-1", control_id, "ADT^A01", 1, time.time()))
    return out


async def run(connector: IConnector, n: int) -> tuple[float, list[float]]:
    items = deliveries(n)
    for d in items[: min(200, n)]:  # warm-up: connection, table
        await connector.deliver(d._replace(message_id=uuid.uuid4().hex))
    latencies = []
    start = time.perf_counter()
    for d in items:
        t0 = time.perf_counter()
        outcome = await connector.deliver(d)
        latencies.append(time.perf_counter() - t0)
        if not isinstance(outcome, Delivered):
            raise SystemExit(f"not delivered: {outcome}")
    return n / (time.perf_counter() - start), sorted(latencies)


def report(name: str, rate: float, latencies: list[float]) -> None:
    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000

    print(f"{name:9s} {len(latencies):6d} msgs  {rate:8.0f} msgs/s  p50 {pct(0.5):.2f} ms  p99 {pct(0.99):.2f} ms")


async def main(reactor: Any, args: argparse.Namespace) -> None:
    if args.only in (None, "http"):
        port = reactor.listenTCP(0, Site(Sink()), interface="127.0.0.1")
        spec = ConnectorSpec("bench", "http", None, {"url": f"http://127.0.0.1:{port.getHost().port}/"})
        connector = http_connector.build(spec, reactor, {})
        connector.start()
        report("http", *await run(connector, args.messages))
        await connector.stop()
        await port.stopListening()
    dsn = os.environ.get("MLLPD_TEST_POSTGRES_DSN")
    if args.only in (None, "postgres"):
        if not dsn:
            print("postgres  skipped: MLLPD_TEST_POSTGRES_DSN is not set")
            return
        table = f"bench_{uuid.uuid4().hex[:8]}"
        spec = ConnectorSpec("bench", "postgres", None, {"dsn_env": "DSN", "table": table})
        pg = postgres_connector.build(spec, reactor, {"DSN": dsn})
        pg.start()
        try:
            report("postgres", *await run(pg, args.messages))
        finally:
            await pg.stop()
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute(f"DROP TABLE IF EXISTS {table}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--only", choices=("http", "postgres"))
    arguments = parser.parse_args()
    task.react(lambda reactor: Deferred.fromCoroutine(main(reactor, arguments)))
