"""The PostgreSQL outbox on a real server: storage, cross-replica duplicates,
commit-order reads, cluster-wide duties, delivery leases and outages.

Two outbox (or lease) objects on one database stand for two replicas.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
import uuid
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict
from twisted.internet import defer
from twisted.internet import reactor as _reactor
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, globalLogPublisher
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from mllpd.connectors import Delivered, Delivery, Retry
from mllpd.outbox import AuditRecord, Envelope, OutboxError
from mllpd.outbox.common import BACKLOG_INTERVAL, schema_files
from mllpd.outbox.leases import FENCE, LEASE_INTERVAL, Leases
from mllpd.outbox.postgres import PostgresOutbox, migrate, outbox_url
from mllpd.relay import Worker
from tests.pgdb import fresh_database
from tests.serverproc import spawn_server
from tests.upstreams import until

reactor: Any = _reactor


def envelope(
    control_id: str, routes: tuple[str, ...] = ("ehr",), received_at: float = 1000.0,
    payload: bytes | None = None,
) -> Envelope:
    body = payload if payload is not None else (
        f"MSH|^~\\&|A|B|C|D|||ADT^A01|{control_id}|P|2.5\r".encode()
    )
    return Envelope(
        message_id=uuid.uuid4().hex, received_at=received_at, peer="127.0.0.1:5000",
        control_id=control_id, msg_type="ADT^A01", sending_app="A", sending_fac="B",
        version="2.5", charset=None, sha256=hashlib.sha256(body).hexdigest(),
        ack_code="AA", payload=body, routes=routes,
    )


def select(url: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(sql, params).fetchall()  # type: ignore[arg-type]


class _PG(TestCase):
    def setUp(self) -> None:
        self.url = fresh_database(self)

    def open(self, url: str | None = None, **kw: Any) -> PostgresOutbox:
        kw.setdefault("wall_clock", lambda: 1000.0)
        outbox = PostgresOutbox(url or self.url, reactor, **kw)
        outbox.start()
        self.addCleanup(outbox.close)
        return outbox


class StoreTests(_PG):
    async def test_stored_message_is_one_row_with_its_audit_record(self) -> None:
        """A stored message is one messages row holding its exact bytes, pod and routes, plus one queue row per route; no audit row."""
        outbox = self.open(pod="mllpd-0")
        payload = b"MSH|^~\\&|A|B|C|D|||ADT^A01|X1|P|2.5\rPID|1||\xe9\x00\xff\r"
        result = await outbox.store(envelope("X1", ("ehr", "lake"), payload=payload))
        self.assertFalse(result.duplicate)
        self.assertEqual(
            select(self.url, "SELECT payload, pod, connectors FROM messages"),
            [(payload, "mllpd-0", "ehr,lake")],
        )
        self.assertEqual(
            select(self.url, "SELECT connector, state FROM deliveries ORDER BY connector"),
            [("ehr", "pending"), ("lake", "pending")],
        )
        self.assertEqual(select(self.url, "SELECT count(*) FROM audit_log"), [(0,)])

    async def test_group_commit(self) -> None:
        """Messages arriving during a commit share the next one: 200 stores, far fewer commits."""
        outbox = self.open()
        await defer.gatherResults([outbox.store(envelope(f"G{i}")) for i in range(200)])
        self.assertEqual(select(self.url, "SELECT count(*) FROM messages"), [(200,)])
        self.assertLess(outbox.commits, 20)

    async def test_sessions_commit_synchronously(self) -> None:
        """The outbox's sessions run with synchronous_commit on even where the server default is off."""
        outbox = self.open()
        with outbox._writer.use() as conn:
            setting = conn.execute("SHOW synchronous_commit").fetchone()
        self.assertEqual(setting, ("on",))

    async def test_refused_and_duplicate_messages_audited(self) -> None:
        """Refused messages and duplicates get an audit row with the pod; a duplicate names the stored original."""
        outbox = self.open(pod="mllpd-1")
        first = await outbox.store(envelope("D1"))
        outbox.audit(AuditRecord(1000.0, "peer", None, "R1", "ADT^A01", 10, "ab", "AE", "rule-x"))
        again = await outbox.store(envelope("D1"))
        self.assertTrue(again.duplicate)
        self.assertEqual(again.message_id, first.message_id)
        self.assertEqual(
            sorted(select(self.url, "SELECT control_id, ack_code, rule, message_id, pod FROM audit_log")),
            [("D1", "AA", None, first.message_id, "mllpd-1"), ("R1", "AE", "rule-x", None, "mllpd-1")],
        )

    async def test_batch_stored_whole_or_not_at_all(self) -> None:
        """An HL7 batch is one transaction: every message stored, in order, or none."""
        outbox = self.open()
        batch = [envelope(f"B{i}")._replace(batch_control_id="BATCH-1", batch_position=i + 1)
                 for i in range(3)]
        results = await outbox.store_batch(batch)
        self.assertEqual([r.message_id for r in results], [e.message_id for e in batch])
        self.assertEqual(
            select(self.url, "SELECT control_id, batch_control_id, batch_position FROM messages"
                             " ORDER BY batch_position"),
            [("B0", "BATCH-1", 1), ("B1", "BATCH-1", 2), ("B2", "BATCH-1", 3)],
        )
        broken = [envelope("X0"), envelope("X1")]
        broken[1] = broken[1]._replace(message_id=broken[0].message_id)  # cannot be stored
        with self.assertRaises(OutboxError):
            await outbox.store_batch(broken)
        self.assertEqual(select(self.url, "SELECT count(*) FROM messages WHERE control_id LIKE 'X%%'"), [(0,)])

    async def test_same_message_on_two_replicas_at_once_stored_once(self) -> None:
        """Two replicas storing the same message in the same moment store it once and both confirm it."""
        a, b = self.open(), self.open()
        for round_ in range(5):
            results = await defer.gatherResults([
                a.store(envelope(f"S{round_}")), b.store(envelope(f"S{round_}")),
            ])
            self.assertEqual(len({r.message_id for r in results}), 1, results)
            self.assertEqual(sorted(r.duplicate for r in results), [False, True])
        self.assertEqual(select(self.url, "SELECT count(*) FROM messages"), [(5,)])
        self.assertEqual(select(self.url, "SELECT count(*) FROM deliveries"), [(5,)])

    async def test_resend_after_window_is_stored_again(self) -> None:
        """A resend past MLLP_DEDUP_WINDOW is a new message; the old row gives up its key."""
        now = [1000.0]
        outbox = self.open(wall_clock=lambda: now[0], dedup_window=60.0)
        first = await outbox.store(envelope("W1", received_at=1000.0))
        now[0] = 1100.0
        second = await outbox.store(envelope("W1", received_at=1100.0))
        self.assertFalse(second.duplicate)
        self.assertNotEqual(first.message_id, second.message_id)
        self.assertEqual(select(self.url, "SELECT count(*) FROM messages"), [(2,)])

    async def test_migrates_once(self) -> None:
        """Replicas opening one database together apply each schema script once."""
        opened = await defer.gatherResults([
            defer.Deferred.fromCoroutine(self._open_on_thread()) for _ in range(3)
        ])
        self.assertEqual(len(opened), 3)
        versions = [v for (v,) in select(self.url, "SELECT version FROM schema_version")]
        self.assertEqual(versions, [v for v, _ in schema_files("postgres")])

    async def _open_on_thread(self) -> int:
        from twisted.internet.threads import deferToThread

        def run() -> int:
            with psycopg.connect(self.url, autocommit=True) as conn:
                return migrate(conn)

        result: int = await deferToThread(run)
        return result


class QueueTests(_PG):
    async def test_worker_delivers_a_row_that_commits_after_a_later_one(self) -> None:
        """A queue row whose transaction commits after a higher-numbered row was delivered is delivered too, not skipped."""
        outbox = self.open()
        delivered: list[str] = []

        class Recorder:
            name = "ehr"

            def start(self) -> None:
                pass

            def stop(self) -> None:
                pass

            def deliver(self, d: Delivery) -> Delivered:
                delivered.append(d.control_id)
                return Delivered()

        early = envelope("EARLY")
        # Another replica's transaction takes a seq and stays open...
        slow = psycopg.connect(self.url)
        self.addCleanup(slow.close)
        cols = (
            "message_id, received_at, peer, control_id, msg_type, sending_app, sending_fac,"
            " version, size, sha256, ack_code, connectors, payload"
        )
        slow.execute(
            f"INSERT INTO messages ({cols}) VALUES (%s, 1000, 'p', %s, 'ADT^A01', 'A', 'B',"
            " '2.5', %s, %s, 'AA', 'ehr', %s)",
            (early.message_id, early.control_id, early.size, early.sha256, early.payload),
        )
        slow.execute(
            "INSERT INTO deliveries (message_id, connector, updated_at) VALUES (%s, 'ehr', 1000)",
            (early.message_id,),
        )
        # ... while a later one (a higher seq) commits and is delivered.
        await outbox.store(envelope("LATE"))
        worker = Worker(Recorder(), outbox, _NoRetry(), reactor)  # type: ignore[arg-type]
        outbox.add_listener(lambda names: worker.notify())
        worker.start()
        self.addCleanup(worker.stop)
        await until(lambda: delivered == ["LATE"], timeout=10, what=lambda: str(delivered))
        slow.commit()
        worker.notify()
        await until(lambda: delivered == ["LATE", "EARLY"], timeout=10, what=lambda: str(delivered))
        await until(lambda: select(self.url, "SELECT count(*) FROM deliveries WHERE state = 'delivered'")
            == [(2,)], timeout=10, what=lambda: "marks")

    async def test_other_replicas_hear_of_queued_messages(self) -> None:
        """A commit on one replica wakes the others' workers for the connectors it queued for, without waiting for their poll."""
        a, b = self.open(), self.open()
        heard: list[set[str]] = []
        b.add_listener(heard.append)
        await until(lambda: b._notices._session.conn is not None, timeout=10, what=lambda: "listening")
        await a.store(envelope("N1", ("ehr", "lab")))
        await until(lambda: {"ehr", "lab"} in heard, timeout=10, what=lambda: str(heard))

    async def test_backlog_counted_once_for_the_cluster(self) -> None:
        """One replica counts the backlog per interval; the other reads its count."""
        now = [1000.0]
        clock = Clock()
        a = self.open(wall_clock=lambda: now[0], count_clock=clock)
        b = self.open(wall_clock=lambda: now[0], count_clock=clock)
        await defer.gatherResults([a.store(envelope(f"B{i}")) for i in range(3)])
        now[0] = 2000.0  # a count is due

        def recounted() -> bool:
            # One more recount round on both replicas per poll: a replica
            # that read the shared count before the other wrote it reads it
            # again. (A recount that overlapped the commits may count them
            # twice, erring towards AR, until the next one.)
            clock.advance(BACKLOG_INTERVAL)
            return (b.depths.get("ehr") is not None and b.depths["ehr"].pending == 3
                and a.depths.get("ehr") is not None and a.depths["ehr"].pending == 3
                and (a.backlog().messages, b.backlog().messages) == (3, 3))

        await until(recounted, timeout=10, what=lambda: f"{a.depths} {b.depths} {a.backlog()} {b.backlog()}")
        # Counted once at 2000 by one of them; the other read that count.
        self.assertEqual(select(self.url, "SELECT counted_at FROM cluster_state"), [(2000.0,)])

    async def test_retention_sweep_runs_once_per_interval(self) -> None:
        """Delivered messages past the retention go, swept by one replica per interval."""
        now = [1000.0]
        a = self.open(wall_clock=lambda: now[0], retention=100.0)
        b = self.open(wall_clock=lambda: now[0], retention=100.0)
        stored = await a.store(envelope("P1"))
        await a.store(envelope("P2"))
        seq = select(self.url, "SELECT seq FROM deliveries WHERE message_id = %s", (stored.message_id,))[0][0]
        await a.mark_delivered(seq, 1001.0)
        now[0] = 1200.0
        self.assertEqual(await a.prune(), 1)
        self.assertEqual(await b.prune(), 0)  # already done for the cluster
        self.assertEqual([c for (c,) in select(self.url, "SELECT control_id FROM messages")], ["P2"])


class LaneQueueTests(_PG):
    """Ordered lanes on the PostgreSQL outbox: each queue row carries its key."""

    async def store_keyed(self, outbox: PostgresOutbox, *control_ids: str) -> None:
        """Store messages whose order key is the control id's letter: A1, A2 share a lane."""
        for c in control_ids:
            await outbox.store(envelope(c)._replace(lanes=(ord(c[0]),)))

    async def test_read_leaves_out_busy_lanes_and_finished_rows_without_skipping(self) -> None:
        """A queue read returns each row's key, leaves out busy keys and finished rows, and still returns a row of a free key that became visible after later ones."""
        outbox = self.open()
        # Another replica's transaction takes a seq for key A and stays open...
        slow = psycopg.connect(self.url)
        self.addCleanup(slow.close)
        early = envelope("A0")
        slow.execute(
            "INSERT INTO messages (message_id, received_at, peer, control_id, msg_type,"
            " sending_app, sending_fac, version, size, sha256, ack_code, connectors, payload)"
            " VALUES (%s, 1000, 'p', 'A0', 'ADT^A01', 'A', 'B', '2.5', %s, %s, 'AA', 'ehr', %s)",
            (early.message_id, early.size, early.sha256, early.payload),
        )
        slow.execute(
            "INSERT INTO deliveries (message_id, connector, updated_at, lane)"
            " VALUES (%s, 'ehr', 1000, %s)", (early.message_id, ord("A")),
        )
        # ... while later rows of keys A and B commit.
        await self.store_keyed(outbox, "A1", "B1", "A2", "B2")
        rows = await outbox.fetch("ehr", 0, 10)
        self.assertEqual([(r.control_id, r.lane) for r in rows],
                         [("A1", 65), ("B1", 66), ("A2", 65), ("B2", 66)])
        b1 = rows[1].seq
        rows = await outbox.fetch("ehr", 0, 10, [ord("B")], [rows[0].seq])
        self.assertEqual([r.control_id for r in rows], ["A2"])
        slow.commit()
        # Read by state, not after the last seq seen: A0 is not skipped.
        rows = await outbox.fetch("ehr", b1, 10, [ord("B")])
        self.assertEqual([r.control_id for r in rows], ["A0", "A1", "A2"])

    async def test_key_in_backoff_holds_back_only_its_own_messages(self) -> None:
        """With lanes: 2 on PostgreSQL, key B is delivered while key A waits out a backoff, and A's messages then go in order."""
        outbox = self.open()
        clock = Clock()
        seen: list[tuple[str, int]] = []

        class Flaky:
            name = "ehr"

            def start(self) -> None:
                pass

            def stop(self) -> None:
                pass

            def deliver(self, d: Delivery) -> Delivered | Retry:
                seen.append((d.control_id, d.attempt))
                if d.control_id == "A1" and d.attempt == 1:
                    return Retry("503 Service Unavailable")
                return Delivered()

        await self.store_keyed(outbox, "A1", "A2", "B1", "A3", "B2")
        worker = Worker(Flaky(), outbox, _NoRetry(), clock, lanes=2)  # type: ignore[arg-type]
        outbox.add_listener(lambda names: worker.notify())
        worker.start()
        self.addCleanup(worker.stop)
        await until(lambda: [c for c, _ in seen], lambda ids: ids == ["A1", "B1", "B2"],
                    timeout=10, what=lambda: str(seen))
        await until(
            lambda: select(self.url, "SELECT count(*) FROM deliveries WHERE state = 'delivered'"),
            lambda rows: rows == [(2,)], timeout=10, what="B's marks",
        )
        # Still in backoff: no read and no poll delivers A2 past A1.
        reads = worker._reads
        worker.notify()
        await until(lambda: worker._reads > reads and worker._wake is not None,
                    timeout=10, what="a read, then the worker idle")
        self.assertEqual([c for c, _ in seen], ["A1", "B1", "B2"])
        clock.advance(_NoRetry().delay(1, None) + 0.01)
        await until(lambda: len(seen), lambda n: n == 6, timeout=10, what=lambda: str(seen))
        self.assertEqual(seen, [("A1", 1), ("B1", 1), ("B2", 1), ("A1", 2), ("A2", 1), ("A3", 1)])
        await until(
            lambda: select(self.url, "SELECT count(*) FROM deliveries WHERE state = 'delivered'"),
            lambda rows: rows == [(5,)], timeout=10, what="every mark",
        )


class _NoRetry:
    max_attempts = 5
    max = 1.0

    def delay(self, attempt: int, rand: Any) -> float:
        return 0.1


class _Proxy:
    """A TCP proxy to the database that can stop forwarding (a partition:
    connections stay open, nothing gets through) or cut every connection."""

    def __init__(self, case: TestCase, url: str) -> None:
        self.target_url = url
        params = psycopg.conninfo.conninfo_to_dict(url)
        self.target = (params["host"], int(params["port"]))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        params.update(host="127.0.0.1", port=str(self.port))
        self.url = psycopg.conninfo.make_conninfo(**params)
        self.forwarding = threading.Event()
        self.forwarding.set()
        self.refusing = False
        self.sockets: list[socket.socket] = []
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()
        case.addCleanup(self.close)

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.refusing:
                client.close()
                continue
            upstream = socket.create_connection(self.target)
            self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                self.forwarding.wait()
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        """Refuse new connections and reset every open one (a database down)."""
        self.refusing = True
        for s in self.sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.sockets = []

    def close(self) -> None:
        self._stop = True
        self.forwarding.set()
        self.cut()
        self.listener.close()


class OutageTests(_PG):
    async def test_database_down_gives_errors_then_recovers_with_two_log_lines(self) -> None:
        """While the database is unreachable stores fail (AR); they succeed again once it is back; the log says so once each way."""
        proxy = _Proxy(self, self.url)
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        outbox = self.open(proxy.url)
        await outbox.store(envelope("UP1"))
        proxy.cut()
        for i in range(5):
            with self.assertRaises(OutboxError):
                await outbox.store(envelope(f"DOWN{i}"))
            await outbox._count()  # the backlog count, as its timer runs it
        proxy.refusing = False
        stored = await outbox.store(envelope("UP2"))
        self.assertFalse(stored.duplicate)
        for _ in range(2):
            await outbox._count()
        names = [e.get("event") for e in events if e.get("event", "").startswith("outbox_db")]
        self.assertEqual(names, ["outbox_db_down", "outbox_db_up"])
        counts = [e.get("event") for e in events if e.get("event", "").startswith("count_")]
        self.assertEqual(counts, ["count_failed", "count_recovered"])
        self.assertEqual(
            sorted(c for (c,) in select(self.url, "SELECT control_id FROM messages")), ["UP1", "UP2"]
        )


class LeaseTests(_PG):
    def leases(self, url: str, names: list[str], clock: Clock, pod: str) -> tuple[Leases, dict[str, bool]]:
        held: dict[str, bool] = {}
        leases = Leases(url, reactor, names, lambda n, h: held.__setitem__(n, h), pod=pod, clock=clock)
        self.addCleanup(leases.stop)
        return leases, held

    async def tick(self, clock: Clock, *leases: Leases) -> None:
        clock.advance(LEASE_INTERVAL)
        await until(lambda: not any(lease._checking for lease in leases), timeout=10, what=lambda: "lease check")

    async def test_replicas_share_connectors_and_one_takes_all_when_the_other_goes(self) -> None:
        """Two replicas share two connectors, one lease each; when one goes, the other holds both."""
        clock = Clock()
        a, held_a = self.leases(self.url, ["ehr", "lab"], clock, "a")
        a.start()
        await until(lambda: not a._checking, timeout=10, what=lambda: "first check")
        self.assertEqual(held_a, {"ehr": True, "lab": True})
        b, held_b = self.leases(self.url, ["ehr", "lab"], clock, "b")
        b.start()
        # a lets one go at its next check; b takes it at one after that.
        for _ in range(5):
            await self.tick(clock, a, b)
            if held_b:
                break
        self.assertEqual(held_a, {"ehr": True, "lab": False})
        self.assertEqual(held_b, {"lab": True})
        await self.tick(clock, a, b)
        self.assertEqual((a.held, b.held), ({"ehr"}, {"lab"}))
        await a.stop()
        self.assertEqual(held_a, {"ehr": False, "lab": False})
        # The server frees a closed session's locks a moment after the
        # close: b may need another try.
        for _ in range(5):
            await self.tick(clock, b)
            if held_b == {"ehr": True, "lab": True}:
                break
        self.assertEqual(held_b, {"ehr": True, "lab": True})

    async def test_fence_new_holder_waits_and_unchecked_holder_pauses(self) -> None:
        """A replica that wins a lease delivers FENCE s later; a holder whose last check is FENCE s old starts nothing until the next answer."""
        clock = Clock()
        a, held_a = self.leases(self.url, ["ehr"], clock, "a")
        self.assertIsNone(a.wait("ehr"))
        a.start()
        await until(lambda: not a._checking, timeout=10, what=lambda: "first check")
        self.assertEqual(held_a, {"ehr": True})
        self.assertEqual(a.wait("ehr"), FENCE)
        for _ in range(int(FENCE / LEASE_INTERVAL)):
            await self.tick(clock, a)
        self.assertEqual(a.wait("ehr"), 0.0)
        a._loop.stop()  # no more checks: as if they hung
        clock.advance(FENCE)
        waited = a.wait("ehr")
        assert waited is not None
        self.assertGreater(waited, 0.0)

    async def test_hung_session_stops_delivery_then_lease_moves_within_15s(self) -> None:
        """A holder whose session hangs stops delivering first; another replica holds the lease within 15 s."""
        proxy = _Proxy(self, self.url)
        changes: list[tuple[str, bool, float]] = []

        def replica(url: str, pod: str) -> Leases:
            leases = Leases(
                url, reactor, ["ehr"],
                lambda name, held: changes.append((pod, held, time.monotonic())), pod=pod,
            )
            self.addCleanup(leases.stop)
            leases.start()
            return leases

        replica(proxy.url, "a")
        await until(lambda: changes, timeout=10, what=lambda: "a holds the lease")
        replica(self.url, "b")
        await until(lambda: not any(c[0] == "b" for c in changes) and len(changes) == 1, timeout=1, what=lambda: str(changes))
        proxy.forwarding.clear()  # a's packets go nowhere from now on
        hung = time.monotonic()
        await until(lambda: ("b", True) in [c[:2] for c in changes], timeout=15, what=lambda: str(changes))
        self.assertEqual([c[:2] for c in changes], [("a", True), ("a", False), ("b", True)])
        self.assertLess(changes[2][2] - hung, 15.0)


class TransportPolicyTests(SynchronousTestCase):
    """MLLP_DB_URL gets the postgres connectors' TLS policy: verify-full off the host."""

    def test_remote_outbox_verified_unless_insecure(self) -> None:
        """A remote MLLP_DB_URL defaults to sslmode=verify-full; weaker modes are refused unless MLLP_DB_INSECURE, then warned; local ones are left alone."""
        def sslmode(url: str, environ: dict[str, str] | None = None, insecure: bool = False) -> object:
            return conninfo_to_dict(outbox_url(url, environ or {}, insecure)).get("sslmode")

        self.assertEqual(sslmode("postgresql://mllpd:pw@db.example.org/mllpd"), "verify-full")
        self.assertEqual(sslmode("dbname=mllpd", {"PGHOST": "10.0.0.5"}), "verify-full")
        self.assertEqual(sslmode("host=db sslmode=verify-full"), "verify-full")
        local = ("postgresql://u@127.0.0.1:5432/db", "host=/run/postgresql dbname=db",
                 "postgresql://u@localhost/db", "dbname=db", "host=db hostaddr=127.0.0.1")
        for url in local:
            self.assertEqual(outbox_url(url, {}, False), url)
        for mode in ("prefer", "require", "verify-ca", "allow"):
            with self.assertRaises(ValueError) as ctx:
                outbox_url(f"postgresql://mllpd:hunter2@db.example.org/mllpd?sslmode={mode}", {}, False)
            self.assertEqual(
                str(ctx.exception),
                f"sslmode={mode} does not verify the server's certificate and name; use "
                "sslmode=verify-full (the default for a server that is not local), "
                "or set MLLP_DB_INSECURE=true to accept that",
            )
            with capturedLogs() as events:
                self.assertEqual(sslmode(f"host=db sslmode={mode}", insecure=True), mode)
            self.assertEqual([(e["event"], e["what"]) for e in events],
                             [("outbox_tls_unverified", f"sslmode={mode}")])
        with self.assertRaises(ValueError):
            outbox_url("host=db", {"PGSSLMODE": "prefer"}, False)
        with capturedLogs() as events:
            self.assertEqual(sslmode("host=db sslmode=disable"), "disable")
        self.assertEqual([(e["event"], e["host"]) for e in events], [("outbox_plaintext", "db")])

    def test_test_database_used_as_given(self) -> None:
        """The local test database's URL (loopback or a Unix socket) passes through unchanged."""
        url = os.environ.get("MLLPD_TEST_POSTGRES_DSN")
        if not url:
            raise SkipTest("MLLPD_TEST_POSTGRES_DSN is not set")
        self.assertEqual(outbox_url(url, os.environ, False), url)


class TransportStartupTests(TestCase):
    def test_unverified_outbox_fails_startup(self) -> None:
        """twistd mllp with a remote MLLP_DB_URL whose sslmode is prefer stops at startup with one line naming MLLP_DB_URL, without the password."""
        url = "postgresql://mllpd:hunter2@db.example.org:5432/mllpd?sslmode=prefer"
        server = spawn_server(self, env={"MLLP_DB_URL": url})
        self.assertNotEqual(server.wait(timeout=30), 0, server.output())
        self.assertEqual(len(server.stderr_lines), 1, server.output())
        line = server.stderr_lines[0]
        self.assertTrue(line.startswith("mllpd: MLLP_DB_URL: sslmode=prefer does not verify"), line)
        self.assertIn("MLLP_DB_INSECURE=true", line)
        self.assertNotIn("hunter2", server.output())
