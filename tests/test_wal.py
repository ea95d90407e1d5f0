"""The SQLite outbox's WAL stays bounded, and what it holds survives a crash."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.logger import capturedLogs
from twisted.trial.unittest import TestCase

from mllpd.outbox import dedup_key
from mllpd.outbox.sqlite import SQLiteOutbox, open_database, schema_files
from mllpd.outbox.wal import restart_threshold
from tests.test_outbox import envelope, routed, select, temp_db

reactor: Any = _reactor

LIMIT = 4 * 1024 * 1024
# About 1 KB, as the receive benchmarks send.
BODY = b"MSH|^~\\&|LAB|HOSP|EHR|HOSP|||ADT^A01|{}|P|2.5\rPID|1||123\rNTE|1||" + b"n" * 900


def wal_size(path: str) -> int:
    try:
        return os.path.getsize(path + "-wal")
    except FileNotFoundError:
        return 0


# Reads in short transactions until its stdin closes, then prints how many.
_READER = textwrap.dedent("""
    import sqlite3, sys, threading
    done = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
    conn = sqlite3.connect(sys.argv[1], isolation_level=None)
    print("reading", flush=True)
    n = 0
    while not done.is_set():
        conn.execute("SELECT COUNT(*) FROM deliveries WHERE state = 'pending'").fetchall()
        n += 1
    print(n, flush=True)
""")


class BoundTests(TestCase):
    def open(self, path: str, limit: int = LIMIT) -> SQLiteOutbox:
        # The test runs the background checkpoint itself, between commits,
        # instead of waiting for its timer.
        outbox = SQLiteOutbox(path, reactor, wal_limit=limit, checkpoint_interval=3600.0)
        outbox.start()
        self.addCleanup(outbox.close)
        return outbox

    async def test_wal_stays_under_its_bound_while_a_reader_reads(self) -> None:
        """Thousands of commits back to back (two stores always in flight, as
        from two senders), with another process reading all the while, never
        grow the WAL file past MLLP_WAL_LIMIT."""
        path = temp_db(self)
        # A reader descheduled inside its read (2 cores, busy) makes restarts
        # wait and try again: the bound leaves room for that, as 64 MiB does.
        limit = 4 * LIMIT
        outbox = self.open(path, limit)
        wal = outbox.wal
        assert wal is not None
        # Another process (mllp-cli, a monitoring script) reading all the
        # while: short read transactions, one after another, until told to stop.
        reader = subprocess.Popen(
            [sys.executable, "-c", _READER, path],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )
        self.addCleanup(reader.wait, 60)
        self.addCleanup(reader.kill)
        assert reader.stdout is not None and reader.stdin is not None
        self.assertEqual(reader.stdout.readline(), b"reading\n")
        total, largest = 6000, 0
        checkpointing: list[Deferred[None]] = []
        finished: Deferred[None] = Deferred()
        counts = {"started": 0, "done": 0}

        def start_one() -> None:
            i = counts["started"]
            counts["started"] += 1
            body = BODY.replace(b"{}", str(i).encode())
            outbox.store(routed(f"W{i}", "ehr")._replace(payload=body)).addCallback(one_done)

        def one_done(_: object) -> None:
            nonlocal largest
            counts["done"] += 1
            done = counts["done"]
            largest = max(largest, wal_size(path))
            if done % 50 == 0 and not checkpointing:
                # The background checkpoint, while commits keep coming.
                checkpointing.append(wal.run())
                checkpointing[0].addBoth(lambda _: checkpointing.clear())
            if counts["started"] < total:
                start_one()
            elif done == total:
                finished.callback(None)

        for _ in range(2):
            start_one()
        await finished
        reader.stdin.close()
        reads = int(reader.stdout.read() or b"0")
        self.assertLessEqual(largest, limit)
        self.assertEqual(select(path, "SELECT COUNT(*) FROM messages"), [(total,)])
        self.assertGreaterEqual(outbox.commits, total // 2)
        self.assertGreater(reads, 0)
        self.assertGreater(wal.checkpoints[("restart", "ok")], 0)
        # Every commit's pages were counted as written, far more than the file holds.
        self.assertGreater(wal.written_bytes, 3 * restart_threshold(limit))

    async def test_wal_bounded_when_background_checkpoints_lag(self) -> None:
        """With no background checkpoint finishing at all (a slow disk under
        a large database), the writer still restarts the log once the file
        passes a quarter of MLLP_WAL_LIMIT, so it never passes the limit."""
        path = temp_db(self)
        outbox = self.open(path)
        wal = outbox.wal
        assert wal is not None
        largest = 0
        for i in range(2000):
            await outbox.store(envelope(f"L{i}", BODY.replace(b"{}", str(i).encode())))
            largest = max(largest, wal_size(path))
        self.assertLessEqual(largest, LIMIT)
        self.assertEqual(wal.checkpoints[("passive", "ok")], 0)
        self.assertGreater(wal.checkpoints[("restart", "ok")], 0)
        self.assertEqual(select(path, "SELECT COUNT(*) FROM messages"), [(2000,)])

    async def test_reader_holding_the_log_is_warned_about_then_released(self) -> None:
        """A reader that keeps a snapshot open stops the log from restarting:
        the WAL passes its bound with a warning, and once the reader lets go
        the log restarts and the file shrinks back under the bound."""
        path = temp_db(self)
        outbox = self.open(path)
        assert outbox.wal is not None
        await outbox.store(envelope("R0", BODY))
        reader = sqlite3.connect(path, isolation_level=None)
        self.addCleanup(reader.close)
        reader.execute("BEGIN")
        reader.execute("SELECT COUNT(*) FROM messages").fetchone()
        with capturedLogs() as events:
            i = 0
            while wal_size(path) <= LIMIT and i < 20_000:
                i += 1
                await outbox.store(envelope(f"R{i}", BODY.replace(b"{}", str(i).encode())))
                if i % 100 == 0:
                    await outbox.wal.run()
            await outbox.wal.run()
            self.assertGreater(wal_size(path), LIMIT)
            self.assertTrue(outbox.wal.over_limit)
            self.assertGreater(outbox.wal.checkpoints[("restart", "busy")], 0)
            reader.execute("COMMIT")
            for j in range(200):
                await outbox.store(envelope(f"S{j}", BODY.replace(b"{}", str(j).encode())))
                if j % 20 == 0:
                    await outbox.wal.run()
            await outbox.wal.run()
        self.assertLessEqual(wal_size(path), restart_threshold(LIMIT))
        self.assertFalse(outbox.wal.over_limit)
        names = [e.get("event") for e in events]
        self.assertEqual(names.count("wal_over_limit"), 1)
        self.assertEqual(names.count("wal_under_limit"), 1)


# Stores messages with no checkpoints at all (the WAL only grows), then kills
# its own process: the parent finds every message the child saw committed.
_CRASH = textwrap.dedent("""
    import hashlib, os, signal, sys
    from twisted.internet import reactor
    from twisted.internet.defer import ensureDeferred
    from mllpd.outbox import Envelope
    from mllpd.outbox.sqlite import SQLiteOutbox

    path, count = sys.argv[1], int(sys.argv[2])
    outbox = SQLiteOutbox(path, reactor, checkpoint_interval=3600.0)
    outbox.start()

    async def main():
        for i in range(count):
            body = b"MSH|^~\\\\&|A|B|C|D|||ADT^A01|C%d|P|2.5\\r" % i + b"x" * 2000
            await outbox.store(Envelope(
                message_id="m%08d" % i, received_at=1000.0 + i, peer="127.0.0.1:1",
                control_id="C%d" % i, msg_type="ADT^A01", sending_app="A",
                sending_fac="B", version="2.5", charset=None,
                sha256=hashlib.sha256(body).hexdigest(), ack_code="AA", payload=body,
                routes=("ehr",)))
            print(i, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    reactor.callWhenRunning(lambda: ensureDeferred(main()))
    reactor.run()
""")


class CrashTests(TestCase):
    def test_kill_with_a_large_wal_recovers_every_message(self) -> None:
        """kill -9 with tens of megabytes of WAL not yet checkpointed: the
        next open finds every committed message, byte for byte, still queued."""
        path = temp_db(self)
        count = 4000
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(Path(__file__).resolve().parent.parent), env.get("PYTHONPATH")) if p
        )
        child = subprocess.run(
            [sys.executable, "-c", _CRASH, path, str(count)],
            env=env, capture_output=True, timeout=300,
        )
        self.assertEqual(child.returncode, -signal.SIGKILL, child.stderr.decode()[-2000:])
        committed = len(child.stdout.split())
        self.assertEqual(committed, count)
        self.assertGreater(wal_size(path), 8 * 1024 * 1024)
        outbox = SQLiteOutbox(path, reactor)
        self.addCleanup(outbox.close)
        rows = select(path, "SELECT message_id, payload FROM messages ORDER BY id")
        self.assertEqual(len(rows), count)
        for i, (message_id, payload) in enumerate(rows):
            self.assertEqual(message_id, f"m{i:08d}")
            self.assertEqual(payload, b"MSH|^~\\&|A|B|C|D|||ADT^A01|C%d|P|2.5\r" % i + b"x" * 2000)
        self.assertEqual(
            select(path, "SELECT COUNT(*) FROM deliveries WHERE state = 'pending'"), [(count,)]
        )


class MigrationTests(TestCase):
    def old_outbox(self) -> str:
        """An outbox in the layout before schema 3, with a stored, routed
        message, its resend, a refused message and a delivered one."""
        path = temp_db(self)
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        for version, script in schema_files("sqlite")[:2]:
            conn.executescript(script)
            conn.execute("INSERT INTO schema_version VALUES (?)", (version,))
        for n, (mid, control) in enumerate((("m1", "C1"), ("m2", "C2"))):
            conn.execute(
                "INSERT INTO messages (message_id, received_at, peer, control_id, msg_type,"
                " sending_app, sending_fac, version, charset, size, sha256, ack_code, payload)"
                " VALUES (?, ?, '10.0.0.1:1', ?, 'ADT^A01', 'LAB', 'HOSP', '2.5', NULL, 3,"
                " 'ab', 'AA', X'010203')",
                (mid, 1000.0 + n, control),
            )
            conn.execute(
                "INSERT INTO audit (received_at, peer, client_subject, pod, message_id,"
                " control_id, msg_type, size, sha256, ack_code, rule, connectors)"
                " VALUES (?, '10.0.0.1:1', 'CN=lab', 'pod-0', ?, ?, 'ADT^A01', 3, 'ab', 'AA',"
                " NULL, 'ehr')",
                (1000.0 + n, mid, control),
            )
        conn.execute(
            "INSERT INTO deliveries (message_id, connector, state, updated_at)"
            " VALUES ('m1', 'ehr', 'pending', 1000), ('m2', 'ehr', 'delivered', 1001)"
        )
        # A resend of C1 and a refused message: records of messages not stored.
        conn.execute(
            "INSERT INTO audit (received_at, peer, client_subject, pod, message_id, control_id,"
            " msg_type, size, sha256, ack_code, rule, connectors) VALUES"
            " (1002, '10.0.0.1:1', NULL, 'pod-0', 'm1', 'C1', 'ADT^A01', 3, 'ab', 'AA', NULL, ''),"
            " (1003, '10.0.0.2:1', NULL, 'pod-0', NULL, 'X9', 'ORU^R01', 9, 'cd', 'AE', 'pid', '')"
        )
        conn.close()
        return path

    async def test_upgrade_keeps_messages_queues_and_the_whole_trail(self) -> None:
        """Opening an outbox written by the previous release keeps every
        message and queue row, shows the same four audit records, and still
        recognises a resend of a stored message."""
        path = self.old_outbox()
        outbox = SQLiteOutbox(path, reactor, wall_clock=lambda: 1500.0)
        outbox.start()
        self.addCleanup(outbox.close)
        self.assertEqual(
            select(path, "SELECT message_id, payload FROM messages ORDER BY id"),
            [("m1", b"\x01\x02\x03"), ("m2", b"\x01\x02\x03")],
        )
        self.assertEqual(
            select(path, "SELECT message_id, state FROM deliveries ORDER BY seq"),
            [("m1", "pending"), ("m2", "delivered")],
        )
        trail = select(
            path,
            "SELECT received_at, control_id, message_id, client_subject, pod, connectors, rule"
            " FROM audit ORDER BY received_at",
        )
        self.assertEqual(trail, [
            (1000.0, "C1", "m1", "CN=lab", "pod-0", "ehr", None),
            (1001.0, "C2", "m2", "CN=lab", "pod-0", "ehr", None),
            (1002.0, "C1", "m1", None, "pod-0", "", None),
            (1003.0, "X9", None, None, "pod-0", "", "pid"),
        ])
        self.assertEqual(
            select(path, "SELECT dedup_key FROM messages WHERE message_id = 'm1'"),
            [(dedup_key("ab"),)],
        )
        resend = routed("C1")._replace(sending_app="LAB", sending_fac="HOSP", sha256="ab",
                                       received_at=1500.0)
        self.assertEqual(await outbox.store(resend), ("m1", True))

    def test_new_outbox_uses_small_pages(self) -> None:
        """A new outbox is created with 2 KiB pages; an old one keeps its own."""
        new = temp_db(self)
        open_database(new).close()
        old = self.old_outbox()
        open_database(old).close()
        self.assertEqual(select(new, "PRAGMA page_size"), [(2048,)])
        self.assertEqual(select(old, "PRAGMA page_size"), [(4096,)])
