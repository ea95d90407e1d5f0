"""A cluster: real ``twistd mllp`` replicas sharing one PostgreSQL outbox,
several MLLP senders, one MLLP upstream. Replicas die (kill -9) and the
database restarts under load; nothing acknowledged is lost, each sender's
messages arrive in the order it sent them, and delivery resumes within 15 s.
"""

from __future__ import annotations

import subprocess
import threading
import time
from typing import Any

from twisted.internet import defer
from twisted.internet.protocol import Factory, connectionDone
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from tests.pgdb import fresh_database, private_cluster
from tests.serverproc import REPO, ConnectionClosed, MLLPClient, ServerProcess, hl7_message
from tests.test_delivery import (
    FAST_RETRY,
    MLLPUpstream,
    _UpstreamProtocol,
    control_id,
    mllp_connector,
    run_server,
)
from tests.test_outbox_postgres import _Proxy
from tests.upstreams import until

# Messages per sender, and the pause between one's ACK and the next
# message: enough load to be in the middle of it when something breaks.
PER_SENDER = 120
SPACING = 0.02
# How long a sender keeps resending a message answered AR.
RESEND_FOR = 30.0


class Sender:
    """One MLLP connection sending its numbered messages one at a time,
    resending on AR as a real sender does; stops when its replica dies."""

    def __init__(self, port: int, name: str, count: int = PER_SENDER) -> None:
        self.port = port
        self.name = name
        self.count = count
        self.acked: list[str] = []
        self.refused = 0
        self.stop = threading.Event()

    def run(self) -> list[str]:
        try:
            with MLLPClient(self.port, timeout=15.0) as client:
                for n in range(self.count):
                    if self.stop.is_set():
                        break
                    cid = f"{self.name}-{n:04d}"
                    payload = hl7_message(cid, sending_app=self.name)
                    deadline = time.monotonic() + RESEND_FOR
                    for _ in range(10_000):
                        ack = client.request(payload, timeout=15.0)
                        if ack.code == "AA":
                            self.acked.append(cid)
                            break
                        self.refused += 1
                        if time.monotonic() > deadline:
                            raise AssertionError(f"{cid} refused for {RESEND_FOR}s: {ack.code}")
                        time.sleep(0.1)
                    time.sleep(SPACING)
        except (ConnectionClosed, OSError):
            pass  # its replica was killed: what it acknowledged must arrive
        return self.acked


class _TracedProtocol(_UpstreamProtocol):
    upstream: TracingUpstream

    def connectionMade(self) -> None:
        super().connectionMade()
        self.number = len(self.upstream.opened)
        self.upstream.opened.append(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        self.upstream.closed[self.number] = len(self.upstream.received)

    def dataReceived(self, data: bytes) -> None:
        before = len(self.upstream.received)
        super().dataReceived(data)
        self.upstream.via.extend([self.number] * (len(self.upstream.received) - before))


class TracingUpstream(MLLPUpstream):
    """The MLLP upstream, knowing which connection (which replica) sent each
    message and how many messages it had when each connection closed."""

    def __init__(self, case: TestCase) -> None:
        super().__init__(case)
        self.opened: list[_TracedProtocol] = []
        self.via: list[int] = []  # connection number of each received message
        self.closed: dict[int, int] = {}  # connection number -> len(received) then

    def listen(self) -> int:
        factory = Factory.forProtocol(lambda: _TracedProtocol(self))
        factory.noisy = False
        return self._listen(factory)

    def last_sender(self) -> int:
        """The connection the latest message came on."""
        return self.via[-1]


def lease_holders(servers: list[ServerProcess], connector: str = "ehr") -> list[ServerProcess]:
    """Replicas whose last lease event says they deliver for ``connector``."""
    holders = []
    for server in servers:
        events = [
            e["event"] for e in server.events()
            if e.get("event") in ("lease_acquired", "lease_lost", "lease_released")
            and e.get("connector") == connector
        ]
        if events and events[-1] == "lease_acquired" and server.alive():
            holders.append(server)
    return holders


def first_arrivals(received: list[bytes]) -> list[str]:
    """Control ids in the order they first reached the upstream."""
    seen: dict[str, None] = {}
    for payload in received:
        seen.setdefault(control_id(payload), None)
    return list(seen)


class ClusterTests(TestCase):
    timeout = 120

    async def cluster(
        self, replicas: int, proxy: _Proxy | None = None, database: str | None = None,
        connectors: tuple[str, ...] = ("ehr",),
    ) -> tuple[str, TracingUpstream, list[ServerProcess]]:
        """Replicas started one by one (the first takes the lease) on
        ``database`` or a fresh one; the first reaches it through ``proxy``
        when one is given."""
        url = proxy.target_url if proxy is not None else database or fresh_database(self)
        upstream = TracingUpstream(self)
        upstream.listen()
        config = (
            "connectors:\n" + "".join(mllp_connector(n, upstream.port) for n in connectors)
            + FAST_RETRY + "\n"
        )
        servers = []
        for i in range(replicas):
            # One at a time: the first to start takes the lease.
            servers.append(await run_server(
                self, config,
                env={"MLLP_DB_URL": proxy.url if proxy is not None and i == 0 else url,
                     "POD_NAME": f"mllpd-{i}"},
            ))
        await until(lambda: all(len(lease_holders(servers, n)) == 1 for n in connectors), timeout=15, what=lambda: "one replica holds each connector")
        for server in servers:
            # MLLP_DB_PATH (set for every test server) is ignored, once said.
            said = [e for e in server.events() if e.get("event") == "outbox_postgres"]
            self.assertEqual(len(said), 1, server.output())
        return url, upstream, servers

    async def delivering(self, upstream: TracingUpstream, servers: list[ServerProcess]) -> None:
        """Wait until the lease holder delivers (a new holder first waits
        out the fence), so that the load to come is delivered as it arrives;
        then forget that warm-up message."""
        acks = await deferToThread(_send_each, servers[-1].port or 0, [hl7_message("WARM-UP")])
        self.assertEqual([a.code for a in acks], ["AA"])
        await until(lambda: upstream.received, timeout=15, what=lambda: "the warm-up message delivered")
        self.assertEqual(upstream.control_ids(), ["WARM-UP"])
        upstream.received.clear()
        upstream.via.clear()

    def check_delivered(self, upstream: MLLPUpstream, senders: list[Sender]) -> None:
        arrived = first_arrivals(upstream.received)
        position = {cid: i for i, cid in enumerate(arrived)}
        for sender in senders:
            self.assertTrue(sender.acked, sender.name)
            missing = [c for c in sender.acked if c not in position]
            self.assertEqual(missing, [], f"{sender.name}: AA'd but never delivered")
            order = [position[c] for c in sender.acked]
            self.assertEqual(order, sorted(order), f"{sender.name}: out of order")

    def explain(self, upstream: TracingUpstream, servers: list[ServerProcess], cids: set[str]) -> str:
        """Where each of ``cids`` arrived (index, connection) and who held what when."""
        arrivals = [(i, c, via) for i, (c, via) in enumerate(zip(upstream.control_ids(), upstream.via, strict=True)) if c in cids]
        leases = [
            (n, e.get("event"), e.get("connector"), e.get("reason", ""))
            for n, server in enumerate(servers) for e in server.events()
            if str(e.get("event", "")).startswith(("lease", "outbox_db", "queue_"))
        ]
        return f"{sorted(cids)}\narrivals {arrivals}\nclosed {upstream.closed}\nevents {leases}"

    async def test_kill_lease_holder_mid_load(self) -> None:
        """Kill -9 of the replica delivering mid-load: another delivers within 15 s; every AA'd message arrives, in each sender's order; only in-flight ones twice."""
        url, upstream, servers = await self.cluster(3)
        senders = [Sender(s.port or 0, f"S{i}") for i, s in enumerate(servers)]
        await self.delivering(upstream, servers)
        running = [deferToThread(s.run) for s in senders]
        await until(lambda: len(upstream.received) >= 40, timeout=30, what=lambda: f"{len(upstream.received)} delivered")
        holder = lease_holders(servers)[0]
        # Only the holder delivers: the latest message came on its connection.
        victim = upstream.last_sender()
        holder.kill()  # SIGKILL
        killed_at = time.monotonic()
        # Everything the dead replica sent has been read once the upstream
        # sees its connection close (TCP keeps the order).
        await until(lambda: victim in upstream.closed, timeout=10, what=lambda: "the killed replica's connection closed")
        at_kill = upstream.closed[victim]
        others = [s for s in servers if s is not holder]
        # Another replica delivers: a message on another connection.
        await until(lambda: any(c != victim for c in upstream.via[at_kill:]), timeout=15 - (time.monotonic() - killed_at), what=lambda: "a delivery by another replica after the kill")
        await until(lambda: lease_holders(others), timeout=10, what=lambda: "a new lease holder")
        await defer.gatherResults(running)
        acked = sum(len(s.acked) for s in senders)
        await until(lambda: len(set(first_arrivals(upstream.received))) >= acked, timeout=30, what=lambda: f"{len(set(first_arrivals(upstream.received)))} of {acked} delivered")
        self.check_delivered(upstream, senders)
        ids = [control_id(p) for p in upstream.received]
        twice = {c for c in ids if ids.count(c) > 1}
        # Redelivered: only what the dead replica had in flight, i.e. sent
        # without its delivered mark committed. Marks commit in delivery
        # order, so those are its last deliveries, each sent again once.
        by_victim = [c for c, via in zip(ids, upstream.via, strict=True) if via == victim]
        in_flight = set(by_victim[len(by_victim) - len(twice):]) if twice else set()
        self.assertEqual(twice, in_flight, self.explain(upstream, servers, twice ^ in_flight))
        self.assertEqual({ids.count(c) for c in twice} | {2}, {2}, self.explain(upstream, servers, twice))

    async def test_database_restart_under_load(self) -> None:
        """PostgreSQL restarting under load: AR (never AA) while it is away, service resumes by itself, nothing AA'd lost, one log line each way."""
        # A cluster of its own: tests running beside this one use the shared one.
        url, folder = private_cluster(self)
        url, upstream, servers = await self.cluster(2, database=url)
        senders = [Sender(s.port or 0, f"R{i}") for i, s in enumerate(servers)]
        await self.delivering(upstream, servers)
        running = [deferToThread(s.run) for s in senders]
        # Mid-load: senders are sending (a new lease holder may not deliver
        # yet, so count what they got AA for).
        await until(lambda: sum(len(s.acked) for s in senders) >= 30, timeout=30, what=lambda: f"{[len(s.acked) for s in senders]} acknowledged")
        restarted = await deferToThread(
            subprocess.run, [str(REPO / ".ci" / "postgres.sh"), "restart", folder],
            capture_output=True, timeout=60,
        )
        self.assertEqual(restarted.returncode, 0, restarted.stderr)
        await defer.gatherResults(running)
        self.assertEqual([len(s.acked) for s in senders], [PER_SENDER] * len(senders))
        await until(lambda: len(set(first_arrivals(upstream.received))) >= PER_SENDER * len(senders), timeout=30, what=lambda: f"{len(set(first_arrivals(upstream.received)))} delivered")
        self.check_delivered(upstream, senders)
        # There was an outage, and senders heard of it: AR, never AA.
        self.assertGreater(sum(s.refused for s in senders), 0)
        for server in servers:
            self.assertTrue(server.alive())
            # The log lines reach us through a pipe read on another thread.
            await until(lambda s=server: "outbox_db_up" in [e.get("event") for e in s.events()], timeout=10, what=server.output)
            events = [e.get("event") for e in server.events()]
            # One line per state change, not one per message.
            self.assertEqual(events.count("outbox_db_down"), 1, server.output())
            self.assertEqual(events.count("outbox_db_up"), 1, server.output())

    async def test_hung_database_session_moves_the_lease_within_15s(self) -> None:
        """The lease holder's database connections hang (a proxy stops forwarding): it answers AR, never AA, and another replica delivers within 15 s."""
        proxy = _Proxy(self, fresh_database(self))
        url, upstream, servers = await self.cluster(2, proxy)
        holder, other = servers
        self.assertEqual(lease_holders(servers), [holder])
        assert holder.port is not None and other.port is not None
        proxy.forwarding.clear()  # the holder's packets go nowhere from now on
        hung = time.monotonic()
        # The hung replica refuses rather than acknowledges (once its
        # commit counts as hung).
        refused = deferToThread(_send_each, holder.port, [hl7_message("H-LOST")], 30.0)
        sent = [hl7_message(f"H-{n}") for n in range(3)]
        acks = await deferToThread(_send_each, other.port, sent)
        self.assertEqual([a.code for a in acks], ["AA"] * 3)
        await until(lambda: {"H-0", "H-1", "H-2"} <= set(first_arrivals(upstream.received)), timeout=15 - (time.monotonic() - hung), what=lambda: str(upstream.control_ids()))
        # The log lines reach us through a pipe read on another thread, so
        # they may trail the delivery they announced by a moment.
        await until(lambda: lease_holders(servers) == [other], timeout=10, what=lambda: f"holders {[s.port for s in lease_holders(servers)]}")
        lost = [e for e in holder.events() if e.get("event") == "lease_lost"]
        self.assertEqual(len(lost), 1, holder.output())
        ack = await refused
        self.assertEqual(ack[0].code, "AR")
        self.assertNotIn("H-LOST", first_arrivals(upstream.received))


    async def test_holder_whose_lease_session_ends_stops_before_another_starts(self) -> None:
        """The server ends the holder's lease session mid-load, twice: each time it stops delivering before the new holder starts (no interleaving), nothing AA'd lost."""
        url, upstream, servers = await self.cluster(2)
        # Load for longer than the handovers take.
        senders = [Sender(s.port or 0, f"T{i}", count=5 * PER_SENDER) for i, s in enumerate(servers)]
        await self.delivering(upstream, servers)
        running = [deferToThread(s.run) for s in senders]
        await until(lambda: len(upstream.received) >= 30, timeout=30, what=lambda: f"{len(upstream.received)} delivered")
        moves = 0
        for _ in range(10):
            if moves == 2:
                break
            holder = lease_holders(servers)[0]
            previous = upstream.last_sender()
            lost = len([e for e in holder.events() if e.get("event") == "lease_lost"])
            # Ended on the server (as pg_terminate_backend or
            # idle_session_timeout do): the holder learns of it at its next
            # check, the other replica may win the lock at once.
            pod = f"mllpd-{servers.index(holder)}"
            ended = await deferToThread(_terminate, url, f"mllpd-leases-{pod}")
            self.assertEqual(ended, 1)
            await until(lambda n=lost, h=holder: len([e for e in h.events() if e.get("event") == "lease_lost"]) > n, timeout=10, what=holder.output)
            await until(lambda: lease_holders(servers), timeout=10, what=lambda: "a holder")
            if lease_holders(servers) != [holder]:
                moves += 1
                # The new holder delivers (after its fence) before the next end.
                await until(lambda last=previous: upstream.via[-1] != last, timeout=15, what=lambda: "a delivery by the new holder")
        self.assertEqual(moves, 2)
        await defer.gatherResults(running)
        acked = sum(len(s.acked) for s in senders)
        await until(lambda: len(set(first_arrivals(upstream.received))) >= acked, timeout=30, what=lambda: f"{len(set(first_arrivals(upstream.received)))} of {acked} delivered")
        self.check_delivered(upstream, senders)
        # Each change of the connection delivering needs a new lease
        # holder; deliveries of two holders interleaved would change it
        # back and forth.
        switches = sum(1 for a, b in zip(upstream.via, upstream.via[1:], strict=False) if a != b)
        won = sum(1 for server in servers for e in server.events() if e.get("event") == "lease_acquired")
        self.assertGreaterEqual(switches, 1)
        self.assertLessEqual(switches, won - 1, self.explain(upstream, servers, set()))

    async def test_replicas_share_connectors_and_one_takes_all_when_the_other_dies(self) -> None:
        """Two replicas and two connectors: each delivers for one; after kill -9 of one the other delivers for both within 15 s."""
        url, upstream, servers = await self.cluster(2, connectors=("ehr", "lab"))
        await until(lambda: all(len(lease_holders(servers, n)) == 1 for n in ("ehr", "lab")) and lease_holders(servers, "ehr") != lease_holders(servers, "lab"), timeout=15, what=lambda: [s.events() for s in servers])
        first, second = servers
        acks = await deferToThread(_send_each, first.port or 0, [hl7_message("F-0")])
        self.assertEqual([a.code for a in acks], ["AA"])
        await until(lambda: upstream.control_ids().count("F-0") == 2, timeout=15, what=upstream.control_ids)
        # Delivered by both replicas: one connection each.
        self.assertEqual(len(set(upstream.via)), 2)
        second.kill()
        killed = time.monotonic()
        await until(lambda: lease_holders(servers, "ehr") == lease_holders(servers, "lab") == [first], timeout=15, what=first.output)
        acks = await deferToThread(_send_each, first.port or 0, [hl7_message("F-1")])
        self.assertEqual([a.code for a in acks], ["AA"])
        await until(lambda: upstream.control_ids().count("F-1") == 2, timeout=15 - (time.monotonic() - killed), what=upstream.control_ids)


def _terminate(url: str, application_name: str) -> int:
    """Ends the sessions named ``application_name`` on this test's database
    from the server side (other tests' replicas share the server and names)."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = %s AND datname = current_database()",
            (application_name,),
        ).fetchall()
    return len(rows)


def _send_each(port: int, payloads: list[bytes], timeout: float = 15.0) -> list[Any]:
    with MLLPClient(port, timeout=timeout) as client:
        return [client.request(p, timeout=timeout) for p in payloads]
