"""The SQLite outbox on real files: durability, group commit, duplicates, failures."""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import stat
import tempfile
import uuid
from typing import Any

from twisted.internet import defer
from twisted.internet import reactor as _reactor
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mllpd.hl7 import parse_message
from mllpd.outbox import AuditRecord, Backlog, Envelope, OutboxError
from mllpd.outbox.common import BACKLOG_INTERVAL
from mllpd.outbox.sqlite import (
    SQLiteOutbox,
    _statements,
    open_database,
    prune_interval,
    schema_files,
)
from mllpd.rules import default_lane, lane_key

reactor: Any = _reactor


def envelope(control_id: str, payload: bytes | None = None, received_at: float = 1000.0) -> Envelope:
    body = payload if payload is not None else f"MSH|^~\\&|A|B|C|D|||ADT^A01|{control_id}|P|2.5\r".encode()
    return Envelope(
        message_id=uuid.uuid4().hex,
        received_at=received_at,
        peer="127.0.0.1:5000",
        control_id=control_id,
        msg_type="ADT^A01",
        sending_app="A",
        sending_fac="B",
        version="2.5",
        charset=None,
        sha256=hashlib.sha256(body).hexdigest(),
        ack_code="AA",
        payload=body,
    )


def temp_db(case: SynchronousTestCase) -> str:
    folder = tempfile.mkdtemp(prefix="mllpd-outbox-")
    case.addCleanup(_rmtree, folder)
    return os.path.join(folder, "outbox.db")


def _rmtree(folder: str) -> None:
    for name in os.listdir(folder):
        os.remove(os.path.join(folder, name))
    os.rmdir(folder)


def rows(path: str) -> list[tuple[str, bytes]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("SELECT control_id, payload FROM messages ORDER BY id").fetchall()
    finally:
        conn.close()


class OutboxTests(TestCase):
    def open(self, path: str, **kw: object) -> SQLiteOutbox:
        outbox = SQLiteOutbox(path, reactor, **kw)  # type: ignore[arg-type]
        outbox.start()
        self.addCleanup(outbox.close)
        return outbox

    async def test_stored_bytes_survive_reopen(self) -> None:
        """What the store confirmed is in the file, byte for byte, for a new reader."""
        path = temp_db(self)
        outbox = self.open(path)
        payload = b"MSH|^~\\&|A|B|C|D|||ADT^A01|X1|P|2.5\rPID|1||\xe9\x00\xff\r"
        result = await outbox.store(envelope("X1", payload))
        self.assertFalse(result.duplicate)
        self.assertEqual(rows(path), [("X1", payload)])

    async def test_group_commit(self) -> None:
        """Messages arriving during a commit share the next one: 200 stores, far fewer commits."""
        outbox = self.open(temp_db(self))
        results = await defer.gatherResults(
            [outbox.store(envelope(f"G{i}")) for i in range(200)]
        )
        self.assertEqual(len(results), 200)
        self.assertEqual(outbox.committed_messages, 200)
        self.assertLessEqual(outbox.commits, 2)

    async def test_duplicate_within_window(self) -> None:
        """The same MSH-3/4/10 and payload within the window is recognised, not stored twice."""
        now = [5000.0]
        path = temp_db(self)
        outbox = self.open(path, dedup_window=3600.0, wall_clock=lambda: now[0])
        first = await outbox.store(envelope("D1", received_at=now[0]))
        again = await outbox.store(envelope("D1", received_at=now[0]))
        self.assertTrue(again.duplicate)
        self.assertEqual(again.message_id, first.message_id)
        changed = await outbox.store(envelope("D1", b"MSH|^~\\&|A|B|C|D|||ADT^A01|D1|P|2.5\rPID|2\r"))
        self.assertFalse(changed.duplicate, "same control id, different content is a new message")
        now[0] += 3601
        late = await outbox.store(envelope("D1", received_at=now[0]))
        self.assertFalse(late.duplicate)
        self.assertEqual(len(rows(path)), 3)

    async def test_duplicate_off(self) -> None:
        """MLLP_DEDUP_WINDOW=0 stores every copy."""
        path = temp_db(self)
        outbox = self.open(path, dedup_window=0)
        await outbox.store(envelope("D1"))
        again = await outbox.store(envelope("D1"))
        self.assertFalse(again.duplicate)
        self.assertEqual(len(rows(path)), 2)

    async def test_disk_full_fails_store(self) -> None:
        """When the database cannot grow, stores fail (so the sender gets AR) and none is half-kept."""
        path = temp_db(self)
        outbox = self.open(path)
        await outbox.store(envelope("F0"))
        conn = sqlite3.connect(path)
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.close()
        # SQLite's own limit makes it answer SQLITE_FULL exactly as on a full disk.
        outbox._conn.execute(f"PRAGMA max_page_count = {pages}")
        big = b"MSH|^~\\&|A|B|C|D|||ADT^A01|F1|P|2.5\r" + b"x" * 200_000
        with capturedLogs() as events:
            for n in range(5):
                with self.assertRaises(OutboxError):
                    await outbox.store(envelope(f"F1-{n}", big + str(n).encode()))
            self.assertEqual([r[0] for r in rows(path)], ["F0"])
            outbox._conn.execute("PRAGMA max_page_count = 1073741823")
            stored = await outbox.store(envelope("F2"))
            self.assertFalse(stored.duplicate)
        # One line when commits start failing and one when they recover, not
        # one per refused message.
        commits = [e for e in events if e.get("event", "").startswith("commit_")]
        self.assertEqual([e["event"] for e in commits], ["commit_failed", "commit_recovered"])
        self.assertEqual(commits[1]["failed"], 5)

    async def test_fetch_returns_queue_head_in_order(self) -> None:
        """A queue read gives the connector's first rows after the cursor, pending and in-flight
        together in arrival order, without delivered or dead rows or other connectors' rows."""
        path = temp_db(self)
        outbox = self.open(path, dedup_window=0)
        await defer.gatherResults([
            outbox.store(envelope(f"Q{i}")._replace(routes=("up", "other")))
            for i in range(12)
        ])
        seqs = [s for s, in sqlite3.connect(path).execute(
            "SELECT seq FROM deliveries WHERE connector = 'up' ORDER BY seq")]
        states = {1: "in_flight", 2: "delivered", 4: "dead", 5: "in_flight", 9: "in_flight"}
        for i, state in states.items():
            await outbox._op("UPDATE deliveries SET state = ? WHERE seq = ?", (state, seqs[i]))
        head = await outbox.fetch("up", seqs[0], 5)
        self.assertEqual([d.control_id for d in head], ["Q1", "Q3", "Q5", "Q6", "Q7"])
        self.assertEqual({d.connector for d in head}, {"up"})
        rest = await outbox.fetch("up", head[-1].seq, 32)
        self.assertEqual([d.control_id for d in rest], ["Q8", "Q9", "Q10", "Q11"])
        self.assertEqual(await outbox.fetch("up", rest[-1].seq, 32), [])

    async def test_fetch_cost_does_not_grow_with_backlog(self) -> None:
        """Reading the head of a queue of 3,000 rows costs no more than of 40, so a
        backlog does not slow its own delivery down."""
        path = temp_db(self)
        outbox = self.open(path, dedup_window=0)

        async def steps_for_head() -> int:
            # SQLite's progress handler counts the virtual machine's steps:
            # a measure of work that does not depend on the machine's load.
            steps = [0]

            def count() -> int:
                steps[0] += 1
                return 0

            outbox._reader.set_progress_handler(count, 1)
            try:
                self.assertEqual(len(await outbox.fetch("up", 0, 32)), 32)
            finally:
                outbox._reader.set_progress_handler(None, 1)
            return steps[0]

        await defer.gatherResults([
            outbox.store(envelope(f"S{i}")._replace(routes=("up",))) for i in range(40)
        ])
        small = await steps_for_head()
        await defer.gatherResults([
            outbox.store(envelope(f"L{i}")._replace(routes=("up",))) for i in range(2960)
        ])
        large = await steps_for_head()
        self.assertLess(large, small * 1.5)

    async def test_close_waits_for_commit(self) -> None:
        """close() lets commits in progress finish; a store after close fails."""
        path = temp_db(self)
        outbox = SQLiteOutbox(path, reactor)
        outbox.start()
        pending = [outbox.store(envelope(f"C{i}")) for i in range(10)]
        await outbox.close()
        results = await defer.gatherResults(pending)
        self.assertEqual(len(results), 10)
        self.assertEqual(len(rows(path)), 10)
        with self.assertRaises(OutboxError):
            await outbox.store(envelope("late"))


class SchemaTests(SynchronousTestCase):
    def test_schema_versioned(self) -> None:
        """A new file records every schema version it applied; reopening applies none twice."""
        path = temp_db(self)
        open_database(path).close()
        open_database(path).close()
        conn = sqlite3.connect(path)
        versions = [r[0] for r in conn.execute("SELECT version FROM schema_version")]
        conn.close()
        self.assertEqual(versions, [v for v, _ in schema_files("sqlite")])

    def test_lanes_migration_keys_queued_rows(self) -> None:
        """Rows still queued when an outbox is upgraded to lanes get their message's default order key."""
        path = temp_db(self)
        conn = sqlite3.connect(path, isolation_level=None)
        conn.create_function("mllp_dedup_key", 1, lambda *a: 1)
        conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        # Up to batches (4), on the slim rows of 3: lanes is 5.
        for version, script in schema_files("sqlite"):
            if version <= 4:
                for statement in _statements(script):
                    conn.execute(statement)
                conn.execute("INSERT INTO schema_version VALUES (?)", (version,))
        payload = b"MSH|^~\\&|LAB|B|C|D|||ADT^A01|C1|P|2.5\rPID|1||MRN7\r"
        conn.execute(
            "INSERT INTO messages (message_id, received_at, peer, control_id, msg_type,"
            " sending_app, sending_fac, version, size, sha256, ack_code, dedup_key, payload)"
            " VALUES ('m1', 1, 'p', 'C1', 'ADT^A01', 'LAB', 'B', '2.5', 1, 's', 'AA', 1, ?)",
            (payload,),
        )
        for connector, state in (("a", "pending"), ("b", "delivered"), ("c", "dead")):
            conn.execute(
                "INSERT INTO deliveries (message_id, connector, state, updated_at)"
                " VALUES ('m1', ?, ?, 0)", (connector, state),
            )
        conn.close()
        open_database(path).close()
        conn = sqlite3.connect(path)
        lanes = conn.execute("SELECT connector, lane FROM deliveries ORDER BY connector").fetchall()
        conn.close()
        key = default_lane(parse_message(payload))
        self.assertEqual(key, lane_key("LAB\x1fMRN7"))
        self.assertEqual(lanes, [("a", key), ("b", 0), ("c", key)])

    def test_wal_and_full_sync(self) -> None:
        """The outbox runs in WAL mode with synchronous=FULL."""
        conn = open_database(temp_db(self))
        self.assertEqual(conn.execute("PRAGMA journal_mode").fetchone()[0], "wal")
        self.assertEqual(conn.execute("PRAGMA synchronous").fetchone()[0], 2)
        conn.close()

    def test_newer_schema_refused(self) -> None:
        """A file written by a newer mllpd is refused with a clear reason, not altered."""
        path = temp_db(self)
        open_database(path).close()
        conn = sqlite3.connect(path)
        conn.execute("INSERT INTO schema_version VALUES (999)")
        conn.commit()
        conn.close()
        with self.assertRaises(OutboxError) as ctx:
            open_database(path)
        self.assertIn("newer", str(ctx.exception))

    def test_files_private_whatever_the_umask(self) -> None:
        """Under umask 022 the outbox and its -wal and -shm are created 0600; an older 0644 outbox is made 0600."""
        old_umask = os.umask(0o022)
        self.addCleanup(os.umask, old_umask)
        path = temp_db(self)
        conn = open_database(path)
        conn.execute("INSERT INTO schema_version VALUES (0)")  # something in the WAL
        modes = {s: stat.S_IMODE(os.stat(path + s).st_mode) for s in ("", "-wal", "-shm")}
        conn.close()
        self.assertEqual(modes, {"": 0o600, "-wal": 0o600, "-shm": 0o600})
        older = os.path.join(os.path.dirname(path), "older.db")
        conn = sqlite3.connect(older)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("CREATE TABLE t (x)")
        self.assertEqual(stat.S_IMODE(os.stat(older + "-wal").st_mode), 0o644)
        open_database(older).close()
        modes = {s: stat.S_IMODE(os.stat(older + s).st_mode) for s in ("", "-wal", "-shm")}
        conn.close()
        self.assertEqual(modes, {"": 0o600, "-wal": 0o600, "-shm": 0o600})

    def test_unopenable_path(self) -> None:
        """A path in a missing directory fails with one line naming the file."""
        with self.assertRaises(OutboxError) as ctx:
            open_database("/nonexistent-dir/sub/outbox.db")
        self.assertIn("/nonexistent-dir/sub/outbox.db", str(ctx.exception))
        self.assertNotIn("\n", str(ctx.exception))


class CheckpointTests(TestCase):
    async def test_background_checkpoint_moves_wal_into_database(self) -> None:
        """Commits never checkpoint; the background checkpoint copies the WAL into the database file."""
        path = temp_db(self)
        # The timer would not wait for the assertions: this test runs it.
        outbox = SQLiteOutbox(path, reactor, checkpoint_interval=3600.0)
        outbox.start()
        self.addCleanup(outbox.close)
        self.assertEqual(outbox._conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0], 0)
        before = os.path.getsize(path)
        big = b"MSH|^~\\&|A|B|C|D|||ADT^A01|K|P|2.5\r" + b"x" * 50_000
        for i in range(20):
            await outbox.store(envelope(f"K{i}", big + str(i).encode()))
        self.assertEqual(os.path.getsize(path), before, "a commit must not have checkpointed")
        assert outbox.wal is not None
        await outbox.wal.run()
        self.assertGreater(os.path.getsize(path), before + 20 * 50_000)


def routed(control_id: str, *routes: str, received_at: float = 1000.0) -> Envelope:
    return envelope(control_id, received_at=received_at)._replace(routes=routes)


def select(path: str, sql: str, params: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


class _Opening(TestCase):
    def open(self, path: str, **kw: object) -> SQLiteOutbox:
        outbox = SQLiteOutbox(path, reactor, **kw)  # type: ignore[arg-type]
        outbox.start()
        self.addCleanup(outbox.close)
        return outbox


class AuditTests(_Opening):
    """One audit record per received message, and none can be changed."""

    async def test_audit_rows_for_stored_duplicate_and_refused(self) -> None:
        """A stored message, its resend and a refused message leave one audit record each; the resend queues nothing."""
        path = temp_db(self)
        outbox = self.open(path, pod="mllpd-0", wall_clock=lambda: 1000.0)
        first = await outbox.store(routed("A1", "ehr", "lake"))
        again = await outbox.store(routed("A1", "ehr", "lake"))
        self.assertEqual((again.duplicate, again.message_id), (True, first.message_id))
        outbox.audit(AuditRecord(
            received_at=1001.0, peer="10.0.0.9:4000", client_subject="CN=lab", control_id="A3",
            msg_type="ORU^R01", size=321, sha256="ab" * 32, ack_code="AE",
            rule="patient-id-required",
        ))
        # The refused message's record goes with the next commit.
        await outbox.store(routed("A4"))
        trail = select(
            path,
            "SELECT control_id, message_id, ack_code, rule, connectors, pod, peer,"
            " client_subject, size FROM audit",
        )
        size = len(routed("A1").payload)
        # The trail is a view over stored messages and the rest: one row each.
        stored, resent = sorted(
            (row for row in trail if row[0] == "A1"), key=lambda row: row[4], reverse=True
        )
        rest = [row for row in trail if row[0] != "A1"]
        self.assertEqual(
            stored,
            ("A1", first.message_id, "AA", None, "ehr,lake", "mllpd-0", "127.0.0.1:5000", None, size),
        )
        # The resend points at the stored copy and was routed nowhere again.
        self.assertEqual(
            resent,
            ("A1", first.message_id, "AA", None, "", "mllpd-0", "127.0.0.1:5000", None, size),
        )
        by_id = {row[0]: row for row in rest}
        self.assertEqual(sorted(by_id), ["A3", "A4"])
        self.assertEqual(
            by_id["A3"],
            ("A3", None, "AE", "patient-id-required", "", "mllpd-0", "10.0.0.9:4000", "CN=lab", 321),
        )
        self.assertEqual(by_id["A4"][2:5], ("AA", None, ""))
        queued = select(
            path, "SELECT connector FROM deliveries WHERE message_id = ? ORDER BY seq",
            (first.message_id,),
        )
        self.assertEqual(queued, [("ehr",), ("lake",)])
        self.assertEqual(select(path, "SELECT COUNT(*) FROM messages"), [(2,)])

    async def test_audit_fields_bounded(self) -> None:
        """A 2 MiB MSH-10 (and an oversized type, peer or subject) is stored cut to its limit with the full length marked."""
        path = temp_db(self)
        outbox = self.open(path)
        huge = "X" * (2 * 1024 * 1024)
        for n in range(20):
            outbox.audit(AuditRecord(
                received_at=1001.0, peer="p" * 500, client_subject="CN=" + "s" * 5000,
                control_id=f"{n:02d}{huge}", msg_type="T" * 1000, size=len(huge), sha256="ab" * 32,
                ack_code="AR",
            ))
        await outbox.store(routed("Y" * 300, "ehr"))
        # Refused messages' records; a stored message's record is its row,
        # whose header fields the receiver already bounds (overlong: AR).
        trail = select(path, "SELECT control_id, msg_type, peer, client_subject FROM audit_log")
        self.assertEqual(len(trail), 20)
        by_start = {r[0][:2]: r for r in trail}
        control_id, msg_type, peer, subject = by_start["00"]
        self.assertEqual(control_id, "00" + "X" * 197 + f"…[{2 * 1024 * 1024 + 2} chars]")
        self.assertEqual(msg_type, "T" * 15 + "…[1000 chars]")
        self.assertEqual(peer, "p" * 128 + "…[500 chars]")
        self.assertEqual(subject, "CN=" + "s" * 1021 + "…[5003 chars]")
        # The stored message itself keeps every byte.
        self.assertEqual(select(path, "SELECT length(control_id) FROM messages"), [(300,)])
        self.assertLess(sum(len(r[0]) for r in trail), 20 * 250)

    async def test_audit_records_cannot_be_updated(self) -> None:
        """An UPDATE of an audit record is refused by the database itself."""
        path = temp_db(self)
        outbox = self.open(path)
        await outbox.store(routed("U1", "ehr"))
        conn = sqlite3.connect(path)
        self.addCleanup(conn.close)
        with self.assertRaises(sqlite3.DatabaseError) as ctx:
            conn.execute("UPDATE audit SET ack_code = 'AR'")
        self.assertIn("immutable", str(ctx.exception))
        self.assertEqual(select(path, "SELECT ack_code FROM audit"), [("AA",)])


class Recounts:
    """The backlog seen after each recount of an outbox whose recount timer
    is a task.Clock: a test advances it rather than wait out the interval."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.seen: list[Backlog] = []
        self._waiting: list[defer.Deferred[None]] = []

    def counted(self, backlog: Backlog) -> None:
        self.seen.append(backlog)
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            # A reactor turn later: the recount's timer is set again by then.
            reactor.callLater(0, d.callback, None)

    def _next(self) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        self._waiting.append(d)
        # The count itself runs on the reader thread: a liveness bound.
        return d.addTimeout(10, reactor)

    async def first(self) -> None:
        """Until the recount that start() begins at once is counted."""
        if not self.seen:
            await self._next()

    async def next(self) -> None:
        """One recount interval passes; until that recount is counted."""
        await self.first()
        assert self.clock.getDelayedCalls(), "no recount is due"
        counted = self._next()
        self.clock.advance(BACKLOG_INTERVAL)
        await counted


class QueueTests(_Opening):
    """The backlog behind MLLP_MAX_OUTBOX, and the queues across a crash."""

    def counted(self, path: str, **kw: object) -> tuple[SQLiteOutbox, Recounts]:
        """An open outbox whose recounts run on a task.Clock, and the
        backlog seen after each of them."""
        recounts = Recounts()
        outbox = SQLiteOutbox(path, reactor, count_clock=recounts.clock, **kw)  # type: ignore[arg-type]
        outbox.count_observer = lambda depths: recounts.counted(outbox.backlog())
        outbox.start()
        self.addCleanup(outbox.close)
        return outbox, recounts

    async def test_backlog_counts_undelivered_messages(self) -> None:
        """backlog() counts routed undelivered messages on store and drops delivered ones at the recount; max_count makes it full."""
        outbox, recounts = self.counted(temp_db(self), max_count=3)
        await recounts.first()
        size = len(routed("B1").payload)
        await outbox.store(routed("B1", "ehr", "lake"))
        await outbox.store(routed("B2", "ehr"))
        await outbox.store(routed("B3"))  # routed nowhere: nothing to deliver
        self.assertEqual(outbox.backlog(), Backlog(2, 2 * size))
        self.assertFalse(outbox.full)
        await outbox.store(routed("B4", "lake"))
        self.assertEqual(outbox.backlog(), Backlog(3, 3 * size))
        self.assertTrue(outbox.full)
        ehr = await outbox.fetch("ehr", 0, 10)
        self.assertEqual([r.control_id for r in ehr], ["B1", "B2"])
        # B1 still waits for lake: only B2 leaves the backlog.
        await outbox.mark_delivered(ehr[0].seq, 1001.0)
        await outbox.mark_delivered(ehr[1].seq, 1001.0)
        await recounts.next()
        self.assertEqual(outbox.backlog(), Backlog(2, 2 * size))
        self.assertFalse(outbox.full)

    async def test_recount_during_commits_never_undercounts(self) -> None:
        """A recount that races commits never drops stored messages from the backlog; a quiet recount is exact."""
        outbox, recounts = self.counted(temp_db(self), max_count=20)
        # start() recounted at once, on another thread, while these commit.
        stored = await defer.gatherResults(
            [outbox.store(routed(f"R{n}", "ehr")) for n in range(20)]
        )
        self.assertEqual(len(stored), 20)
        self.assertTrue(outbox.full)
        await recounts.next()
        seen = recounts.seen
        self.assertEqual([b.messages >= 20 for b in seen], [True] * len(seen), str(seen))
        self.assertEqual(outbox.backlog().messages, 20)
        self.assertTrue(outbox.full)

    async def test_in_flight_rows_pending_again_after_reopen(self) -> None:
        """Rows in flight when the process died are pending again, in their old order, when the outbox is reopened."""
        path = temp_db(self)
        outbox = self.open(path)
        for n in range(3):
            await outbox.store(routed(f"F{n}", "ehr"))
        rows = await outbox.fetch("ehr", 0, 10)
        await outbox.mark_in_flight(rows[0].seq, 1001.0)
        await outbox.mark_in_flight(rows[1].seq, 1001.0)
        # A copy of the committed files is what a kill -9 leaves behind.
        crashed = temp_db(self)
        for suffix in ("", "-wal"):
            shutil.copyfile(path + suffix, crashed + suffix)
        self.assertEqual(
            select(crashed, "SELECT state FROM deliveries ORDER BY seq"),
            [("in_flight",), ("in_flight",), ("pending",)],
        )
        reopened = self.open(crashed)
        again = await reopened.fetch("ehr", 0, 10)
        self.assertEqual([(r.seq, r.control_id) for r in again], [(r.seq, r.control_id) for r in rows])
        self.assertEqual(
            select(crashed, "SELECT state FROM deliveries ORDER BY seq"), [("pending",)] * 3
        )


class RetentionTests(_Opening):
    """MLLP_RETENTION: what is pruned and when."""

    async def test_prune_deletes_only_delivered_messages_past_retention(self) -> None:
        """A message (and its audit record) is pruned once it arrived and was delivered everywhere longer ago than the retention, not before."""
        now = [1000.0]
        path = temp_db(self)
        outbox = self.open(path, retention=100.0, wall_clock=lambda: now[0])
        await outbox.store(routed("P-delivered", "ehr"))
        await outbox.store(routed("P-pending", "ehr"))
        await outbox.store(routed("P-nowhere"))
        rows = await outbox.fetch("ehr", 0, 10)
        await outbox.mark_delivered(rows[0].seq, 1010.0)

        def stored() -> list[str]:
            return [r[0] for r in select(path, "SELECT control_id FROM messages ORDER BY id")]

        now[0] = 1099.0
        self.assertEqual(await outbox.prune(), 0)
        self.assertEqual(stored(), ["P-delivered", "P-pending", "P-nowhere"])
        now[0] = 1105.0  # past retention since arrival, not yet since delivery
        self.assertEqual(await outbox.prune(), 1)
        self.assertEqual(stored(), ["P-delivered", "P-pending"])
        now[0] = 1111.0
        self.assertEqual(await outbox.prune(), 1)
        self.assertEqual(stored(), ["P-pending"])
        self.assertEqual(
            select(path, "SELECT state FROM deliveries"), [("pending",)],
        )
        # Audit records older than the retention go with their messages; the
        # record of a message still in the outbox stays.
        self.assertEqual(
            select(path, "SELECT control_id FROM audit"), [("P-pending",)],
        )

    def test_prune_interval_follows_short_retention(self) -> None:
        """Sweeps run every 60 s, or every half retention when that is shorter (at least 0.5 s)."""
        self.assertEqual(prune_interval(168 * 3600.0), 60.0)
        self.assertEqual(prune_interval(120.0), 60.0)
        self.assertEqual(prune_interval(30.0), 15.0)
        self.assertEqual(prune_interval(1.0), 0.5)
        self.assertEqual(prune_interval(0.01), 0.5)


class SynchronousModeTests(_Opening):
    """Every commit that stores a message is fsync'd (synchronous=FULL);
    commits of delivery states alone may skip the fsync."""

    async def test_message_commits_always_full(self) -> None:
        """Whatever the interleaving of stores and state changes, a message INSERT commits under synchronous=FULL."""
        path = temp_db(self)
        outbox = self.open(path)
        trace: list[str] = []
        outbox._conn.set_trace_callback(trace.append)
        await outbox.store(routed("S-1", "ehr"))
        [row] = await outbox.fetch("ehr", 0, 10)
        await outbox.mark_in_flight(row.seq, 1001.0)
        await outbox.mark_delivered(row.seq, 1002.0)
        await outbox.store(routed("S-2", "ehr"))
        await outbox.mark_in_flight(row.seq, 1003.0)

        mode = "FULL"  # as open_database leaves it
        modes_at_message_commit: list[str] = []
        modes_at_state_commit: list[str] = []
        stored = False
        for statement in trace:
            if statement.startswith("PRAGMA synchronous"):
                mode = statement.split("=")[1].strip()
            elif statement.startswith("INSERT INTO messages"):
                stored = True
            elif statement == "COMMIT":
                (modes_at_message_commit if stored else modes_at_state_commit).append(mode)
                stored = False
        self.assertEqual(modes_at_message_commit, ["FULL", "FULL"])
        self.assertEqual(modes_at_state_commit, ["NORMAL", "NORMAL", "NORMAL"])

    async def test_state_changes_ride_with_the_next_message(self) -> None:
        """A delivery-state change waits (up to STATE_HOLD) and goes out in the next message's commit: one commit, not two."""
        from twisted.internet.task import Clock, deferLater

        hold = Clock()
        outbox = self.open(temp_db(self), hold_clock=hold)
        await outbox.store(routed("R-1", "ehr"))
        [row] = await outbox.fetch("ehr", 0, 10)
        before = outbox.commits
        marked = outbox.mark_in_flight(row.seq, 1001.0)
        await deferLater(reactor, 0, lambda: None)  # a reactor turn: a commit would have started
        self.assertEqual(outbox.commits, before)  # held
        await outbox.store(routed("R-2", "ehr"))
        await marked
        self.assertEqual(outbox.commits - before, 1)

    async def test_state_changes_alone_are_committed(self) -> None:
        """With no message to ride with, a state change is committed once STATE_HOLD has passed."""
        from twisted.internet.task import Clock

        from mllpd.outbox.sqlite import STATE_HOLD

        hold = Clock()
        path = temp_db(self)
        outbox = self.open(path, hold_clock=hold)
        await outbox.store(routed("R-3", "ehr"))
        [row] = await outbox.fetch("ehr", 0, 10)
        delivered = outbox.mark_delivered(row.seq, 1001.0)
        hold.advance(STATE_HOLD)
        await delivered
        self.assertEqual(select(path, "SELECT state FROM deliveries"), [("delivered",)])
