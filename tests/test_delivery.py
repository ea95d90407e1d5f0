"""Delivery end to end: the real ``twistd -n mllp`` process, routing to real
upstreams of the test's own (an MLLP server and a twisted.web server on
127.0.0.1, both in the test reactor) and to a real PostgreSQL.

Blocking work (the MLLP sender, the server process, mllp-cli) runs in
threads so the upstreams keep answering; every wait is a bounded poll.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor as _reactor
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from tests.serverproc import (
    LOOPBACK,
    REPO,
    Ack,
    MLLPClient,
    ServerProcess,
    frame,
    hl7_message,
    make_workdir,
    query,
    spawn_server,
)
from tests.upstreams import until

reactor: Any = _reactor

# Short backoff so outages cost the tests fractions of a second.
FAST_RETRY = "retry: {initial: 100ms, max: 500ms, multiplier: 2, jitter: 0.1, max_attempts: 1000}"
PG_DSN = os.environ.get("MLLPD_TEST_POSTGRES_DSN")


def control_id(payload: bytes) -> str:
    return payload.split(b"\r", 1)[0].split(b"|")[9].decode("ascii")


def upstream_ack(payload: bytes, code: str = "AA", msa2: str | None = None) -> bytes:
    """An ACK as an upstream engine sends it (MSA-2 = the message's MSH-10 unless given)."""
    cid = control_id(payload) if msa2 is None else msa2
    return (
        f"MSH|^~\\&|UPSTREAM|UPFAC|MLLPD|HOSP|20240101120000||ACK^A01^ACK|U-{cid}|P|2.5\r"
        f"MSA|{code}|{cid}\r"
    ).encode("ascii")


# -- the MLLP upstream ------------------------------------------------------------

Answer = Callable[[bytes, int], "bytes | None"]


class _UpstreamProtocol(Protocol):
    def __init__(self, upstream: MLLPUpstream) -> None:
        self.upstream = upstream
        self.buffer = b""

    def connectionMade(self) -> None:
        self.upstream.connections.add(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.upstream.connections.discard(self)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\x1c\x0d")
            if end < 0:
                return
            start = self.buffer.find(b"\x0b")
            payload = self.buffer[start + 1 : end]
            self.buffer = self.buffer[end + 2 :]
            self.upstream.received.append(payload)
            reply = self.upstream.answer(payload, len(self.upstream.received) - 1)
            if reply is None:
                self.upstream.held.append((self, payload))
            else:
                self.transport.write(frame(reply))  # type: ignore[union-attr]


class _Port:
    """The port of an upstream: reserved (connections refused), listening, or
    down with every open connection cut."""

    port = 0
    _listening: Any = None
    _reserved: socket.socket | None = None

    def reserve(self) -> int:
        """Take a port without listening: connections to it are refused."""
        sock = socket.socket()
        sock.bind((LOOPBACK, 0))
        self._reserved = sock
        self.port = sock.getsockname()[1]
        return self.port

    def _listen(self, factory: Any) -> int:
        """Listen on the reserved (or the last) port, or a new one."""
        if self._reserved is not None:
            self._reserved.close()
            self._reserved = None
        self._listening = reactor.listenTCP(self.port, factory, interface=LOOPBACK)
        self.port = self._listening.getHost().port
        return self.port

    def _open_transports(self) -> list[Any]:
        raise NotImplementedError

    async def close(self) -> None:
        """Go down: stop listening and cut every open connection (the
        connector's kept-alive ones too)."""
        if self._reserved is not None:
            self._reserved.close()
            self._reserved = None
        listening, self._listening = self._listening, None
        for transport in self._open_transports():
            transport.abortConnection()
        if listening is not None:
            await listening.stopListening()


class MLLPUpstream(_Port):
    """An MLLP server on 127.0.0.1 that records every frame it gets and
    answers each with ``answer(payload, index)`` (None: hold the answer)."""

    def __init__(self, case: TestCase, answer: Answer | None = None) -> None:
        self.answer: Answer = answer or (lambda payload, n: upstream_ack(payload))
        self.received: list[bytes] = []
        self.held: list[tuple[_UpstreamProtocol, bytes]] = []
        self.connections: set[_UpstreamProtocol] = set()
        case.addCleanup(self.close)

    def listen(self) -> int:
        """Listen on the reserved (or the last) port, or a new one."""
        factory = Factory.forProtocol(lambda: _UpstreamProtocol(self))
        factory.noisy = False
        return self._listen(factory)

    def release(self) -> None:
        """Answer every held message with an AA."""
        held, self.held = self.held, []
        for proto, payload in held:
            if proto.transport is not None:
                proto.transport.write(frame(upstream_ack(payload)))

    def _open_transports(self) -> list[Any]:
        return [p.transport for p in self.connections if p.transport is not None]

    def control_ids(self) -> list[str]:
        return [control_id(p) for p in self.received]


# -- the HTTP upstream ----------------------------------------------------------------


class Posted(NamedTuple):
    body: bytes
    key: str | None
    content_type: str | None
    at: float  # time.monotonic() when it arrived


Status = Callable[[bytes, int], "tuple[int, dict[str, str]]"]


class _TrackingSite(Site):
    """A Site that knows its open connections (to cut them) and logs nothing."""

    def __init__(self, upstream: HTTPUpstream) -> None:
        super().__init__(upstream)
        self.upstream = upstream

    def buildProtocol(self, addr: Any) -> Any:
        proto = super().buildProtocol(addr)
        connections = self.upstream.connections
        make, lost = proto.makeConnection, proto.connectionLost

        def make_connection(transport: Any) -> None:
            connections.add(transport)
            proto.connectionLost = lambda reason=connectionDone: (
                connections.discard(transport), lost(reason)
            )
            make(transport)

        proto.makeConnection = make_connection
        return proto

    def log(self, request: Request) -> None:
        pass


class HTTPUpstream(_Port, Resource):
    """A twisted.web server that records every POST and answers with
    ``status(body, index) -> (code, headers)``."""

    isLeaf = True

    def __init__(self, case: TestCase, status: Status | None = None) -> None:
        super().__init__()
        self.status: Status = status or (lambda body, n: (200, {}))
        self.posts: list[Posted] = []
        self.codes: list[int] = []
        self.connections: set[Any] = set()
        self._site = _TrackingSite(self)
        case.addCleanup(self.close)

    def render_POST(self, request: Request) -> bytes:
        assert request.content is not None
        body = request.content.read()
        self.posts.append(Posted(
            body, request.getHeader("idempotency-key"), request.getHeader("content-type"),
            time.monotonic(),
        ))
        code, headers = self.status(body, len(self.posts) - 1)
        self.codes.append(code)
        request.setResponseCode(code)
        for name, value in headers.items():
            request.setHeader(name, value)
        return b""

    def listen(self) -> int:
        return self._listen(self._site)

    def _open_transports(self) -> list[Any]:
        return list(self.connections)

    def control_ids(self) -> list[str]:
        return [control_id(p.body) for p in self.posts]

    def delivered_ids(self) -> list[str]:
        return [control_id(p.body) for p, c in zip(self.posts, self.codes, strict=True) if 200 <= c < 300]


# -- helpers ----------------------------------------------------------------------------


def outbox_depth(metrics_port: int, connector: str) -> tuple[float, float]:
    """(queue depth, oldest age) of ``connector`` on the server's metrics
    page: both change at each recount of the backlog."""
    with urllib.request.urlopen(f"http://{LOOPBACK}:{metrics_port}/metrics", timeout=10) as page:
        text = page.read().decode()
    got = {s.name: s.value for family in text_string_to_metric_families(text)
           for s in family.samples if s.labels.get("connector") == connector}
    return got.get("mllp_outbox_depth", -1.0), got.get("mllp_outbox_oldest_age_seconds", -1.0)


def send_all(port: int, payloads: Sequence[bytes], timeout: float = 30.0) -> list[Ack]:
    """Write every frame at once on one connection, then read every ACK."""
    with MLLPClient(port, timeout=timeout) as client:
        client.send(*payloads)
        return [client.read_ack(timeout) for _ in payloads]


async def send(server: ServerProcess, payloads: Sequence[bytes]) -> list[Ack]:
    assert server.port is not None
    acks: list[Ack] = await deferToThread(send_all, server.port, payloads)
    return acks


async def run_server(
    case: TestCase,
    config: str,
    *,
    env: dict[str, str] | None = None,
    workdir: str | None = None,
) -> ServerProcess:
    """The real server with ``config`` as MLLP_CONFIG, listening."""
    workdir = workdir or make_workdir(case)
    path = os.path.join(workdir, "mllp.yaml")
    with open(path, "w", encoding="utf-8") as f:
        f.write(config)
    server = spawn_server(
        case, env={"MLLP_CONFIG": path, **(env or {})}, workdir=workdir
    )
    await deferToThread(server.wait_listening)
    return server


def states(server: ServerProcess, connector: str) -> list[tuple[str, str, int, str | None]]:
    """(control id, state, attempts, last error) of a connector's queue rows, in queue order."""
    return [
        (cid, state, attempts, error)
        for cid, state, attempts, error in query(
            server.db_path,
            "SELECT m.control_id, d.state, d.attempts, d.last_error FROM deliveries d"
            " JOIN messages m ON m.message_id = d.message_id WHERE d.connector = ?"
            " ORDER BY d.seq",
            (connector,),
        )
    ]


def all_delivered(server: ServerProcess, connector: str, count: int) -> bool:
    rows = states(server, connector)
    return len(rows) == count and all(r[1] == "delivered" for r in rows)


def mllp_connector(name: str, port: int, extra: str = "") -> str:
    return (
        f"  - name: {name}\n    type: mllp\n    address: tcp:{LOOPBACK}:{port}\n"
        f"    ack_timeout: 5s\n    connect_timeout: 2s\n{extra}"
    )


def http_connector(name: str, port: int, extra: str = "") -> str:
    return (
        f"  - name: {name}\n    type: http\n    url: http://{LOOPBACK}:{port}/hl7\n"
        f"    timeout: 5s\n{extra}"
    )


def messages(prefix: str, count: int, **kw: Any) -> list[bytes]:
    return [
        hl7_message(f"{prefix}-{n:04d}", pid=f"PID|1||{n}^^^HOSP^MR||DOE^J{n}", **kw)
        for n in range(count)
    ]


# -- the tests ------------------------------------------------------------------------


class RoutingTests(TestCase):
    """Rules decide the ACK, filters decide where a message goes."""

    async def test_routed_messages_reach_their_upstreams_once_in_order(self) -> None:
        """Routed messages reach each of their upstreams once, exact and in order; filtered and AE'd ones do not; all are audited."""
        ehr, lake = MLLPUpstream(self), HTTPUpstream(self)
        ehr.listen()
        lake.listen()
        config = (
            "rules:\n  - name: patient-id-required\n"
            '    expr: has(pid.id) && pid.id != ""\n    message: PID-3 is required\n'
            "connectors:\n" + mllp_connector("ehr", ehr.port)
            + http_connector("lake", lake.port, '    filter: msh.msg_type == "ADT"\n')
            + FAST_RETRY + "\n"
        )
        server = await run_server(self, config)
        sent: list[bytes] = []
        for n in range(12):
            if n % 4 == 1:
                sent.append(hl7_message(f"ORU-{n}", msg_type="ORU^R01",
                                        pid=f"PID|1||{n}^^^HOSP^MR"))
            elif n % 4 == 3:
                sent.append(hl7_message(f"NOPID-{n}", pid="PID|1||||DOE^JOHN"))
            else:
                sent.append(hl7_message(f"ADT-{n}", pid=f"PID|1||{n}^^^HOSP^MR"))
        acks = await send(server, sent)

        codes = {a.control_id: a.code for a in acks}
        refused = [control_id(p) for p in sent if control_id(p).startswith("NOPID")]
        accepted = [p for p in sent if control_id(p) not in refused]
        adt = [p for p in accepted if control_id(p).startswith("ADT")]
        self.assertEqual({codes[c] for c in refused}, {"AE"})
        self.assertEqual({codes[control_id(p)] for p in accepted}, {"AA"})
        for a in acks:
            if a.code == "AE":
                self.assertTrue(a.has_err)
                self.assertIn(b"patient-id-required", a.raw)

        await until(
            lambda: all_delivered(server, "ehr", len(accepted))
            and all_delivered(server, "lake", len(adt)),
            timeout=20, what=lambda: f"ehr {states(server, 'ehr')} lake {states(server, 'lake')}",
        )
        self.assertEqual(ehr.received, accepted)
        self.assertEqual([p.body for p in lake.posts], adt)
        self.assertEqual(lake.codes, [200] * len(adt))
        self.assertTrue(all(p.key for p in lake.posts))
        self.assertTrue(
            all(p.content_type and p.content_type.startswith("x-application/hl7-v2+er7")
                for p in lake.posts)
        )

        def audit() -> dict[str, tuple[str, str | None, str, str | None]]:
            return {
                cid: (code, rule, connectors, mid)
                for cid, code, rule, connectors, mid in query(
                    server.db_path,
                    "SELECT control_id, ack_code, rule, connectors, message_id FROM audit",
                )
            }

        await until(lambda: len(audit()) == len(sent), timeout=10, what=lambda: str(audit()))
        trail = audit()
        for p in sent:
            cid = control_id(p)
            code, rule, connectors, mid = trail[cid]
            if cid in refused:
                self.assertEqual((code, rule, connectors, mid), ("AE", "patient-id-required", "", None))
            elif cid.startswith("ADT"):
                self.assertEqual((code, rule, connectors), ("AA", None, "ehr,lake"))
                self.assertIsNotNone(mid)
            else:
                self.assertEqual((code, rule, connectors), ("AA", None, "ehr"))
        stored = {cid for (cid,) in query(server.db_path, "SELECT control_id FROM messages")}
        self.assertEqual(stored, {control_id(p) for p in accepted})


class OutageTests(TestCase):
    """Upstreams that go away and come back, or misbehave."""

    async def test_upstreams_down_then_back_on_the_same_port(self) -> None:
        """Messages accepted while both upstreams are down arrive once each, in order, when they return on the same ports."""
        ehr, lake = MLLPUpstream(self), HTTPUpstream(self)
        ehr.listen()
        lake.listen()
        config = (
            "connectors:\n" + mllp_connector("ehr", ehr.port)
            + http_connector("lake", lake.port) + FAST_RETRY + "\n"
        )
        server = await run_server(self, config)
        before = messages("UP", 5)
        self.assertEqual({a.code for a in await send(server, before)}, {"AA"})
        await until(
            lambda: all_delivered(server, "ehr", 5) and all_delivered(server, "lake", 5),
            timeout=20, what=lambda: f"{states(server, 'ehr')} {states(server, 'lake')}",
        )
        ports = (ehr.port, lake.port)
        await ehr.close()
        await lake.close()
        during = messages("DOWN", 10)
        self.assertEqual({a.code for a in await send(server, during)}, {"AA"})

        def retried(connector: str) -> bool:
            return any(s == "pending" and a >= 1 and e for _, s, a, e in states(server, connector))

        # Both connectors have failed at least once against the closed ports.
        await until(
            lambda: retried("ehr") and retried("lake"), timeout=20,
            what=lambda: f"{states(server, 'ehr')} {states(server, 'lake')}",
        )
        self.assertEqual(len(ehr.received), 5)
        self.assertEqual(len(lake.posts), 5)
        ehr.listen()
        lake.listen()
        self.assertEqual((ehr.port, lake.port), ports)
        await until(
            lambda: all_delivered(server, "ehr", 15) and all_delivered(server, "lake", 15),
            timeout=30, what=lambda: f"{states(server, 'ehr')} {states(server, 'lake')}",
        )
        self.assertEqual(ehr.received, before + during)
        self.assertEqual([p.body for p in lake.posts], before + during)

    async def test_retry_after_honoured_and_dead_letter_replayed(self) -> None:
        """A 503 waits out Retry-After; a 400 is dead-lettered without stalling the queue and mllp-cli replay delivers it."""
        refuse = {"BAD-0001": True}

        def status(body: bytes, n: int) -> tuple[int, dict[str, str]]:
            cid = control_id(body)
            if cid == "SLOW-0000" and lake.control_ids().count(cid) == 1:
                return 503, {"Retry-After": "1"}
            if refuse.get(cid):
                return 400, {}
            return 200, {}

        lake = HTTPUpstream(self, status)
        lake.listen()
        config = (
            "connectors:\n" + http_connector("lake", lake.port)
            + "retry: {initial: 100ms, max: 5s, multiplier: 2, jitter: 0.1, max_attempts: 50}\n"
        )
        server = await run_server(self, config)
        sent = [hl7_message("SLOW-0000"), hl7_message("BAD-0001"), hl7_message("NEXT-0002")]
        self.assertEqual({a.code for a in await send(server, sent)}, {"AA"})
        await until(
            lambda: [s for _, s, _, _ in states(server, "lake")] == ["delivered", "dead", "delivered"],
            timeout=20, what=lambda: str(states(server, "lake")),
        )
        slow = [p.at for p in lake.posts if control_id(p.body) == "SLOW-0000"]
        self.assertEqual(len(slow), 2)
        self.assertGreaterEqual(slow[1] - slow[0], 1.0 - 0.01, "retried before Retry-After")
        self.assertEqual(lake.control_ids(), ["SLOW-0000", "SLOW-0000", "BAD-0001", "NEXT-0002"])
        dead = states(server, "lake")[1]
        self.assertEqual((dead[0], dead[1], dead[2]), ("BAD-0001", "dead", 1))
        self.assertIn("400", dead[3] or "")

        refuse.clear()
        cli = await deferToThread(
            subprocess.run,
            [sys.executable, "-m", "mllpd.cli", "--db", server.db_path,
             "replay", "--connector", "lake", "--all", "--yes"],
            capture_output=True, timeout=60, cwd=str(REPO),
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        self.assertEqual(cli.returncode, 0, cli.stderr)
        await until(
            lambda: lake.delivered_ids().count("BAD-0001") == 1
            and all(s == "delivered" for _, s, _, _ in states(server, "lake")),
            timeout=20, what=lambda: f"{states(server, 'lake')} {lake.control_ids()}",
        )
        self.assertEqual(lake.posts[-1].body, sent[1])
        self.assertEqual(len({p.key for p in lake.posts if control_id(p.body) == "BAD-0001"}), 1)

    async def test_stale_ack_does_not_mark_the_message_delivered(self) -> None:
        """An ACK whose MSA-2 names another message does not deliver it: it is sent again and the matching ACK does."""

        def answer(payload: bytes, n: int) -> bytes | None:
            if n == 0:
                return upstream_ack(payload, msa2="OLD-9999")
            if n == 1:
                return None  # held until the test has looked at the queue
            return upstream_ack(payload)

        ehr = MLLPUpstream(self, answer)
        ehr.listen()
        server = await run_server(self, "connectors:\n" + mllp_connector("ehr", ehr.port) + FAST_RETRY + "\n")
        sent = [hl7_message("ONE-0001"), hl7_message("TWO-0002")]
        self.assertEqual({a.code for a in await send(server, sent)}, {"AA"})
        await until(lambda: len(ehr.held) == 1, timeout=20, what=lambda: str(ehr.control_ids()))
        first = states(server, "ehr")[0]
        self.assertEqual(first[0], "ONE-0001")
        self.assertNotEqual(first[1], "delivered")
        # The first attempt was retried because of the stale ACK (the row's last
        # error may since be a slow reconnect's, on a busy machine).
        retries = [
            (e.get("control_id"), e.get("attempt"), e.get("reason", ""))
            for e in server.events() if e.get("event") == "delivery_retry"
        ]
        self.assertIn("OLD-9999", retries[0][2] if retries else "", str(retries))
        self.assertEqual(retries[0][:2], ("ONE-0001", 1))
        ehr.release()
        await until(lambda: all_delivered(server, "ehr", 2), timeout=20, what=lambda: str(states(server, "ehr")))
        self.assertEqual(ehr.control_ids(), ["ONE-0001", "ONE-0001", "TWO-0002"])
        self.assertEqual(ehr.received[0], ehr.received[1])
        # Delivered by a later attempt (a slow reconnect may take one more), never the first.
        attempts = [a for _, _, a, _ in states(server, "ehr")]
        self.assertGreaterEqual(attempts[0], 2)
        self.assertEqual(attempts[1], 1)


class CrashTests(TestCase):
    """kill -9 in the middle of delivery."""

    timeout = 180

    async def test_kill_during_delivery_loses_nothing(self) -> None:
        """After kill -9 mid-queue and a restart every AA'd message reaches both upstreams in queue order; resends are identical."""
        ehr, lake = MLLPUpstream(self), HTTPUpstream(self)
        ehr.listen()
        lake.listen()
        config = (
            "connectors:\n" + mllp_connector("ehr", ehr.port)
            + http_connector("lake", lake.port) + FAST_RETRY + "\n"
        )
        workdir = make_workdir(self)
        server = await run_server(self, config, workdir=workdir)
        assert server.port is not None
        batches = [messages(f"K{c}", 600) for c in range(4)]
        results = await deferToThread(
            lambda: [r.result() for r in _parallel(server.port, batches)]  # type: ignore[arg-type]
        )
        acks = [a for batch in results for a in batch]
        self.assertEqual(len(acks), 2400)
        self.assertEqual({a.code for a in acks}, {"AA"})
        await until(
            lambda: len(ehr.received) >= 300 and len(lake.posts) >= 300, timeout=30,
            what=lambda: f"ehr {len(ehr.received)} lake {len(lake.posts)}",
        )
        server.process.kill()
        await deferToThread(server.wait)
        at_kill = (len(ehr.received), len(lake.posts))
        self.assertLess(max(at_kill), 2400, "the kill came after a queue had drained")

        restarted = spawn_server(
            self, env={"MLLP_CONFIG": os.path.join(workdir, "mllp.yaml")}, workdir=workdir
        )
        await deferToThread(restarted.wait_listening)
        await until(
            lambda: all_delivered(restarted, "ehr", 2400) and all_delivered(restarted, "lake", 2400),
            timeout=90, what=lambda: f"ehr {len(ehr.received)} lake {len(lake.posts)}",
        )
        queue_order = {c: [cid for cid, *_ in states(restarted, c)] for c in ("ehr", "lake")}
        everything = {control_id(p) for batch in batches for p in batch}
        self.assertEqual(set(queue_order["ehr"]), everything)
        for batch in batches:
            ids = [control_id(p) for p in batch]
            # Each connection's messages are queued in the order it sent them.
            self.assertEqual([c for c in queue_order["ehr"] if c in set(ids)], ids)
        by_id = {control_id(p): p for batch in batches for p in batch}

        self.assertEqual(_first_arrivals(ehr.control_ids()), queue_order["ehr"])
        self.assertEqual(_first_arrivals(lake.control_ids()), queue_order["lake"])
        for payload in ehr.received:
            self.assertEqual(payload, by_id[control_id(payload)])
        keys: dict[str, set[str | None]] = {}
        for post in lake.posts:
            self.assertEqual(post.body, by_id[control_id(post.body)])
            keys.setdefault(control_id(post.body), set()).add(post.key)
        self.assertEqual({cid for cid, k in keys.items() if len(k) != 1 or None in k}, set())


    async def test_kill_with_lanes_in_flight_keeps_each_key_in_order(self) -> None:
        """kill -9 with lanes in flight: after a restart every AA'd message arrives, each patient's in queue order, and a key resumes at or before where it stopped."""
        ehr, lake = MLLPUpstream(self), HTTPUpstream(self)
        ehr.listen()
        lake.listen()
        lanes = "    lanes: 4\n"
        config = (
            "connectors:\n" + mllp_connector("ehr", ehr.port, lanes)
            + http_connector("lake", lake.port, lanes) + FAST_RETRY + "\n"
        )
        workdir = make_workdir(self)
        server = await run_server(self, config, workdir=workdir)
        assert server.port is not None
        patient = {}
        batches = []
        for c in range(4):
            batch = []
            for n in range(400):
                cid = f"L{c}-{n:04d}"
                patient[cid] = str(n % 16)
                batch.append(hl7_message(cid, pid=f"PID|1||{n % 16}^^^HOSP^MR||DOE^J"))
            batches.append(batch)
        results = await deferToThread(
            lambda: [r.result() for r in _parallel(server.port, batches)]  # type: ignore[arg-type]
        )
        self.assertEqual({a.code for batch in results for a in batch}, {"AA"})
        await until(
            lambda: len(ehr.received) >= 200 and len(lake.posts) >= 200, timeout=30,
            what=lambda: f"ehr {len(ehr.received)} lake {len(lake.posts)}",
        )
        server.process.kill()
        await deferToThread(server.wait)
        at_kill = {"ehr": len(ehr.received), "lake": len(lake.posts)}
        self.assertLess(max(at_kill.values()), 1600, "the kill came after a queue had drained")

        restarted = spawn_server(
            self, env={"MLLP_CONFIG": os.path.join(workdir, "mllp.yaml")}, workdir=workdir
        )
        await deferToThread(restarted.wait_listening)
        await until(
            lambda: all_delivered(restarted, "ehr", 1600) and all_delivered(restarted, "lake", 1600),
            timeout=90, what=lambda: f"ehr {len(ehr.received)} lake {len(lake.posts)}",
        )
        arrivals = {
            "ehr": ehr.control_ids(),
            "lake": [control_id(post.body) for post in lake.posts],
        }
        for name, seen in arrivals.items():
            queued = [cid for cid, *_ in states(restarted, name)]
            self.assertEqual(sorted(set(seen)), sorted(queued), name)
            for key in set(patient.values()):
                order = [cid for cid in queued if patient[cid] == key]
                before = [cid for cid in seen[: at_kill[name]] if patient[cid] == key]
                after = [cid for cid in seen[at_kill[name] :] if patient[cid] == key]
                # Each key in queue order before the kill, and after it from
                # a message at or before the first one it had not received.
                self.assertEqual(before, order[: len(before)], f"{name} key {key}")
                resumed = order.index(after[0]) if after else len(order)
                self.assertLessEqual(resumed, len(before), f"{name} key {key}")
                self.assertEqual(after, order[resumed:], f"{name} key {key}")


def _parallel(port: int, batches: list[list[bytes]]) -> list[Any]:
    """Send each batch on its own connection at the same time."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=len(batches))
    try:
        futures = [pool.submit(send_all, port, batch, 60.0) for batch in batches]
        for f in futures:
            f.result(timeout=120)
        return futures
    finally:
        pool.shutdown(wait=True)


def _first_arrivals(ids: list[str]) -> list[str]:
    seen: set[str] = set()
    out: list[str] = []
    for cid in ids:
        if cid not in seen:
            seen.add(cid)
            out.append(cid)
    return out


class BackPressureTests(TestCase):
    """MLLP_MAX_OUTBOX: AR while the backlog is full, never a false AA."""

    async def test_full_outbox_refuses_until_the_backlog_drains(self) -> None:
        """With MLLP_MAX_OUTBOX=5 and the upstream down, new messages get AR 207 (never AA) until the backlog drains."""
        ehr = MLLPUpstream(self)
        ehr.reserve()
        server = await run_server(
            self, "connectors:\n" + mllp_connector("ehr", ehr.port) + FAST_RETRY + "\n",
            env={"MLLP_MAX_OUTBOX": "5", "MLLP_METRICS_ADDR": f"tcp:0:interface={LOOPBACK}"},
        )
        [metrics_port] = await until(
            lambda: [e["port"] for e in server.events() if e.get("event") == "metrics_listening"],
            what="the metrics_listening event",
        )
        first = await send(server, messages("BP", 5))
        self.assertEqual({a.code for a in first}, {"AA"})
        refused = await send(server, messages("OVER", 3))
        self.assertEqual([a.code for a in refused], ["AR"] * 3)
        for a in refused:
            self.assertTrue(a.has_err)
            self.assertIn(b"207", a.raw)
        # Still full a recount later (the backlog is recounted every second).
        before = await deferToThread(outbox_depth, metrics_port, "ehr")
        await until(lambda: deferToThread(outbox_depth, metrics_port, "ehr"),
                    lambda now: now[0] == 5 and now[1] > before[1], what="a recount after the refusals")
        self.assertEqual([a.code for a in await send(server, messages("STILL", 1))], ["AR"])

        ehr.listen()
        await until(lambda: all_delivered(server, "ehr", 5), timeout=30, what=lambda: str(states(server, "ehr")))
        codes: list[str] = []

        async def accepted() -> bool:
            codes.extend(a.code for a in await send(server, [hl7_message(f"AGAIN-{len(codes)}")]))
            return codes[-1] == "AA"

        await until(accepted, timeout=10, what=lambda: f"still refused: {codes}")
        self.assertEqual(set(codes[:-1]), {"AR"} if codes[:-1] else set())
        stored = sorted(cid for (cid,) in query(server.db_path, "SELECT control_id FROM messages"))
        self.assertEqual(stored, sorted([f"BP-{n:04d}" for n in range(5)] + [f"AGAIN-{len(codes) - 1}"]))


class PostgresTests(TestCase):
    """The postgres connector against a real server."""

    async def test_rows_in_the_table_byte_identical_and_idempotent(self) -> None:
        """Messages become byte-identical rows in the configured table; delivering them again adds no second row."""
        if not PG_DSN:
            raise self.skipTest(
                "MLLPD_TEST_POSTGRES_DSN is not set (.ci/run starts a throwaway PostgreSQL: "
                'eval "$(.ci/postgres.sh start)")'
            )
        import psycopg

        table = f"deliv_{uuid.uuid4().hex[:12]}"

        def drop() -> None:
            with psycopg.connect(PG_DSN, autocommit=True) as conn:
                conn.execute(f"DROP TABLE IF EXISTS {table}")

        self.addCleanup(deferToThread, drop)

        def rows() -> list[tuple[str, str, bytes]]:
            with psycopg.connect(PG_DSN) as conn:
                try:
                    found = conn.execute(
                        f"SELECT message_id, control_id, payload FROM {table} ORDER BY control_id"
                    ).fetchall()
                except psycopg.errors.UndefinedTable:
                    return []
            return [(m, c, bytes(p)) for m, c, p in found]

        config = (
            "connectors:\n  - name: archive\n    type: postgres\n    dsn_env: ARCHIVE_DSN\n"
            f"    table: {table}\n    timeout: 5s\n" + FAST_RETRY + "\n"
        )
        workdir = make_workdir(self)
        env = {"ARCHIVE_DSN": PG_DSN}
        server = await run_server(self, config, env=env, workdir=workdir)
        sent = messages("PG", 5)
        # Latin-1 bytes that are not UTF-8: stored and forwarded as received.
        sent.append(
            hl7_message("PG-0005")
            .replace(b"DOE^JANE", b"M\xdcLLER^J\xd6RG")
            .replace(b"|2.5\r", b"|2.5||||||8859/1\r", 1)
        )
        self.assertEqual({a.code for a in await send(server, sent)}, {"AA"})
        await until(lambda: all_delivered(server, "archive", 6), timeout=30,
                    what=lambda: str(states(server, "archive")))
        ids = dict(query(server.db_path, "SELECT control_id, message_id FROM messages"))
        found = await deferToThread(rows)
        self.assertEqual(found, [(ids[control_id(p)], control_id(p), p) for p in sent])

        # Lose the delivered marks, as a crash before they were durable would.
        self.assertEqual(await deferToThread(server.stop), 0)
        conn = sqlite3.connect(server.db_path)
        conn.execute("UPDATE deliveries SET state = 'pending', attempts = 0")
        conn.commit()
        conn.close()
        again = spawn_server(self, env={"MLLP_CONFIG": os.path.join(workdir, "mllp.yaml"), **env},
                             workdir=workdir)
        await deferToThread(again.wait_listening)
        await until(lambda: all_delivered(again, "archive", 6), timeout=30,
                    what=lambda: str(states(again, "archive")))
        self.assertEqual([a for *_, a, _ in states(again, "archive")], [1] * 6)
        self.assertEqual(await deferToThread(rows), found)


class RetentionTests(TestCase):
    """MLLP_RETENTION: delivered messages go, undelivered ones stay."""

    async def test_delivered_messages_pruned_after_retention(self) -> None:
        """With MLLP_RETENTION=1s delivered messages are deleted within seconds; one still waiting for its upstream stays."""
        lake, ehr = HTTPUpstream(self), MLLPUpstream(self)
        lake.listen()
        ehr.reserve()  # down for the whole test
        config = (
            "connectors:\n" + http_connector("lake", lake.port, '    filter: msh.msg_type == "ADT"\n')
            + mllp_connector("ehr", ehr.port, '    filter: msh.msg_type == "ORU"\n')
            + FAST_RETRY + "\n"
        )
        server = await run_server(self, config, env={"MLLP_RETENTION": "1s"})
        sent = messages("RET", 3) + [hl7_message("WAIT-0001", msg_type="ORU^R01")]
        self.assertEqual({a.code for a in await send(server, sent)}, {"AA"})
        await until(lambda: len(lake.posts) == 3, timeout=20, what=lambda: str(lake.control_ids()))

        def stored() -> list[str]:
            return sorted(cid for (cid,) in query(server.db_path, "SELECT control_id FROM messages"))

        await until(lambda: stored() == ["WAIT-0001"], timeout=15, what=lambda: str(stored()))
        self.assertEqual(query(server.db_path, "SELECT COUNT(*) FROM deliveries WHERE connector = 'lake'"),
                         [(0,)])
        self.assertIn(states(server, "ehr")[0][1], ("pending", "in_flight"))
        self.assertEqual(lake.control_ids(), [control_id(p) for p in sent[:3]])
