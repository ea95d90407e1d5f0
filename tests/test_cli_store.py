"""mllpd.cli.store on real outbox files: counts, lists, one message with
named fields, replay, delete and purge, and living next to a writer."""

from __future__ import annotations

import os
import sqlite3

from twisted.trial.unittest import SynchronousTestCase

from mllpd.cli.fields import field_names, reference_version
from mllpd.cli.store import PURGE_BATCH, REPLAY_BATCH, ConnectorStats, Store, StoreError
from mllpd.outbox.sqlite import schema_files
from tests.outboxrows import add_delivery, add_message, connect, new_outbox
from tests.serverproc import hl7_message

NOW = 1_800_000_000.0


def queue_rows(path: str, connector: str) -> list[tuple[int, str, str, int, str | None, float]]:
    """(seq, message_id, state, attempts, last_error, updated_at) of a connector."""
    conn = connect(path)
    try:
        return list(conn.execute(
            "SELECT seq, message_id, state, attempts, last_error, updated_at FROM deliveries"
            " WHERE connector = ? ORDER BY seq",
            (connector,),
        ))
    finally:
        conn.close()


def message_ids(path: str) -> set[str]:
    conn = connect(path)
    try:
        return {mid for (mid,) in conn.execute("SELECT message_id FROM messages")}
    finally:
        conn.close()


class Fixture(SynchronousTestCase):
    """An outbox with two connectors in every state.

    ehr: C0 dead, C1 pending, C2 in_flight, C3 pending, C4 delivered, C5 dead
    lake: C0 delivered, C1 dead
    C6 was routed nowhere.
    """

    def setUp(self) -> None:
        self.path = new_outbox(self)
        conn = connect(self.path)
        self.addCleanup(conn.close)
        self.ids = [
            add_message(conn, f"C{i}", received_at=NOW - 1000 + i * 10) for i in range(7)
        ]
        ids = self.ids
        add_delivery(conn, ids[0], "ehr", "dead", updated_at=NOW - 500, attempts=20,
                     last_error="AE: unknown patient")
        add_delivery(conn, ids[1], "ehr", "pending", updated_at=NOW - 400, attempts=2,
                     last_error="connection refused")
        add_delivery(conn, ids[2], "ehr", "in_flight", updated_at=NOW - 300, attempts=1)
        add_delivery(conn, ids[3], "ehr", "pending", updated_at=NOW - 200)
        add_delivery(conn, ids[4], "ehr", "delivered", updated_at=NOW - 7200)
        add_delivery(conn, ids[5], "ehr", "dead", updated_at=NOW - 100, attempts=20,
                     last_error="AE: bad PID")
        add_delivery(conn, ids[0], "lake", "delivered", updated_at=NOW - 60)
        add_delivery(conn, ids[1], "lake", "dead", updated_at=NOW - 50, attempts=3,
                     last_error="HTTP 400")
        self.store = Store(self.path)
        self.addCleanup(self.store.close)

    def audit_count(self) -> int:
        conn = connect(self.path)
        try:
            return int(conn.execute("SELECT COUNT(*) FROM audit").fetchone()[0])
        finally:
            conn.close()


class StatsTests(Fixture):
    def test_counts_per_connector(self) -> None:
        """Each connector shows its pending, in-flight, delivered and dead
        counts, how long its oldest queued message has waited, and how many
        lanes wait out a retry."""
        self.assertEqual(
            self.store.stats(NOW),
            [
                # Oldest queued on ehr: C1 (C0 is dead), received NOW - 990;
                # C1 failed twice and waits for its retry.
                ConnectorStats("ehr", pending=2, in_flight=1, delivered=1, dead=2,
                               oldest_pending_age=990.0, retrying=1),
                ConnectorStats("lake", pending=0, in_flight=0, delivered=1, dead=1,
                               oldest_pending_age=None),
            ],
        )

    def test_empty_outbox(self) -> None:
        """An outbox with no queue rows has no connectors to show."""
        with Store(new_outbox(self)) as store:
            self.assertEqual(store.stats(NOW), [])


class ListTests(Fixture):
    def test_dead_letters_of_a_connector_in_queue_order(self) -> None:
        """A connector's dead letters come head first with attempts, error and age."""
        rows = self.store.messages(NOW, connector="ehr", state="dead")
        self.assertEqual([r.control_id for r in rows], ["C0", "C5"])
        first = rows[0]
        self.assertEqual(
            (first.message_id, first.msg_type, first.attempts, first.last_error, first.age),
            (self.ids[0], "ADT^A01", 20, "AE: unknown patient", 1000.0),
        )
        self.assertEqual(first.size, len(hl7_message("C0")))

    def test_preview_shows_first_segments_after_msh_cut_short(self) -> None:
        """The preview starts after MSH and is cut to 80 characters."""
        (row,) = self.store.messages(NOW, connector="lake", state="dead")
        self.assertTrue(row.preview.startswith("EVN|A01|20240101120000 ⏎ PID|1||4711"), row.preview)
        self.assertEqual(len(row.preview), 80)
        self.assertTrue(row.preview.endswith("…"))

    def test_filters_and_limit(self) -> None:
        """Without a state every row of the connector is listed, newest first;
        without a connector every connector; --limit caps the list."""
        everything = self.store.messages(NOW, connector="ehr")
        self.assertEqual([r.control_id for r in everything], ["C5", "C4", "C3", "C2", "C1", "C0"])
        pending = self.store.messages(NOW, state="pending")
        self.assertEqual([(r.connector, r.control_id) for r in pending],
                         [("ehr", "C1"), ("ehr", "C3")])
        self.assertEqual(len(self.store.messages(NOW, limit=3)), 3)
        self.assertEqual(len(self.store.messages(NOW)), 8)

    def test_unknown_state_is_refused(self) -> None:
        """A state that does not exist is an error naming the valid ones."""
        with self.assertRaises(StoreError) as e:
            self.store.messages(NOW, state="failed")
        self.assertIn("pending, in_flight, delivered, dead", str(e.exception))


class ShowTests(Fixture):
    def test_segments_with_hl7apy_field_names(self) -> None:
        """Every segment is a line; its non-empty fields carry hl7apy's names."""
        detail = self.store.message(self.ids[0])
        assert detail is not None
        segments = detail.segments()
        self.assertEqual([s.name for s in segments], ["MSH", "EVN", "PID", "PV1"])
        pid = {f.label(): f.value for f in segments[2].fields}
        self.assertEqual(pid["PID-5 (patient_name)"], "DOE^JANE")
        self.assertEqual(pid["PID-3 (patient_identifier_list)"], "4711^^^HOSP^MR")
        msh = {f.label(): f.value for f in segments[0].fields}
        self.assertEqual(msh["MSH-1 (field_separator)"], "|")
        self.assertEqual(msh["MSH-10 (message_control_id)"], "C0")
        self.assertEqual(
            [(d.connector, d.state, d.attempts) for d in detail.deliveries],
            [("ehr", "dead", 20), ("lake", "delivered", 0)],
        )

    def test_unknown_segment_fields_are_numbered_only(self) -> None:
        """A Z-segment's fields have numbers but no names."""
        conn = connect(self.path)
        self.addCleanup(conn.close)
        mid = add_message(conn, "Z1", received_at=NOW,
                          payload=hl7_message("Z1", extra=["ZPI|1|VIP"]))
        detail = self.store.message(mid)
        assert detail is not None
        zpi = detail.segments()[-1]
        self.assertEqual([(f.label(), f.value) for f in zpi.fields],
                         [("ZPI-1", "1"), ("ZPI-2", "VIP")])

    def test_payload_decoded_in_its_charset(self) -> None:
        """Latin-1 and UTF-8 payloads show their accented letters correctly."""
        conn = connect(self.path)
        self.addCleanup(conn.close)
        for charset, codec in (("8859/1", "latin-1"), ("UNICODE UTF-8", "utf-8")):
            text = (
                "MSH|^~\\&|A|B|C|D|20240101||ADT^A01|X1|P|2.5||||||" + charset + "\r"
                "PID|1||1||MÜLLER^JOSÉ\r"
            )
            mid = add_message(conn, "X1", received_at=NOW, payload=text.encode(codec),
                              charset=charset)
            detail = self.store.message(mid)
            assert detail is not None
            pid = {f.label(): f.value for f in detail.segments()[1].fields}
            self.assertEqual(pid["PID-5 (patient_name)"], "MÜLLER^JOSÉ", charset)

    def test_unknown_message(self) -> None:
        """Asking for a message that is not stored gives None."""
        self.assertIsNone(self.store.message("0" * 32))

    def test_field_names_for_versions(self) -> None:
        """Versions hl7apy lacks use the nearest tables it has."""
        self.assertEqual(reference_version("2.5.1"), "2.5.1")
        self.assertEqual(reference_version("2.3.1.5"), "2.3.1")
        self.assertEqual(reference_version("3.0"), "2.5")
        self.assertEqual(field_names("PV1", "2.3")[2], "patient_class")
        self.assertEqual(field_names("ZZZ", "2.5"), {})


class ReplayTests(Fixture):
    def test_replay_moves_dead_letter_to_queue_tail(self) -> None:
        """A replayed dead letter is pending again with no attempts, behind
        everything else in the connector's queue; other queues are untouched."""
        before_lake = queue_rows(self.path, "lake")
        done = self.store.replay("ehr", [self.ids[0]], NOW)
        self.assertEqual(done, [self.ids[0]])
        rows = queue_rows(self.path, "ehr")
        tail = rows[-1]
        self.assertEqual(tail[1:], (self.ids[0], "pending", 0, None, NOW))
        self.assertEqual(tail[0], max(r[0] for r in rows))
        self.assertEqual([r[1] for r in rows if r[1] == self.ids[0]], [self.ids[0]])
        self.assertEqual([r[2] for r in rows if r[1] == self.ids[5]], ["dead"])
        self.assertEqual(queue_rows(self.path, "lake"), before_lake)

    def test_replay_all_keeps_dead_letter_order(self) -> None:
        """Replaying all dead letters queues them in their old order."""
        done = self.store.replay("ehr", None, NOW)
        self.assertEqual(done, [self.ids[0], self.ids[5]])
        pending = [r[1] for r in queue_rows(self.path, "ehr") if r[2] == "pending"]
        self.assertEqual(pending, [self.ids[1], self.ids[3], self.ids[0], self.ids[5]])
        self.assertEqual(self.store.count("ehr", "dead"), 0)

    def test_replay_larger_than_a_batch(self) -> None:
        """Replaying more dead letters than one transaction takes re-queues
        them all, in their old order."""
        conn = connect(self.path)
        self.addCleanup(conn.close)
        conn.execute("BEGIN")
        bulk = [add_message(conn, f"B{i}", received_at=NOW) for i in range(REPLAY_BATCH + 3)]
        for mid in bulk:
            add_delivery(conn, mid, "bulk", "dead", updated_at=NOW)
        conn.execute("COMMIT")
        self.assertEqual(self.store.replay("bulk", None, NOW), bulk)
        self.assertEqual(
            [(r[1], r[2]) for r in queue_rows(self.path, "bulk")],
            [(mid, "pending") for mid in bulk],
        )

    def test_only_dead_letters_of_that_connector(self) -> None:
        """Pending messages, other connectors' dead letters and unknown ids are
        left alone."""
        before = queue_rows(self.path, "ehr")
        done = self.store.replay("ehr", [self.ids[1], "f" * 32], NOW)
        self.assertEqual(done, [])
        self.assertEqual(queue_rows(self.path, "ehr"), before)
        self.assertEqual(self.store.replay("ehr", [self.ids[1]], NOW), [])
        self.assertEqual(self.store.replay("lake", [self.ids[0]], NOW), [])

    def test_busy_writer_leaves_everything_unchanged(self) -> None:
        """When another writer holds the outbox longer than the busy timeout,
        replay fails with a clear error and changes nothing."""
        before = queue_rows(self.path, "ehr")
        writer = sqlite3.connect(self.path, isolation_level=None)
        self.addCleanup(writer.close)
        writer.execute("BEGIN IMMEDIATE")
        self.addCleanup(writer.execute, "ROLLBACK")
        with Store(self.path, busy_timeout=0.1) as impatient:
            with self.assertRaises(StoreError) as e:
                impatient.replay("ehr", None, NOW)
        self.assertIn("busy", str(e.exception))
        self.assertEqual(queue_rows(self.path, "ehr"), before)


class DeleteTests(Fixture):
    def test_delete_removes_message_and_queue_rows_keeps_audit(self) -> None:
        """A deleted message leaves every queue; its audit record stays."""
        audits = self.audit_count()
        self.assertTrue(self.store.delete(self.ids[0]))
        self.assertNotIn(self.ids[0], message_ids(self.path))
        self.assertNotIn(self.ids[0], [r[1] for r in queue_rows(self.path, "ehr")])
        self.assertNotIn(self.ids[0], [r[1] for r in queue_rows(self.path, "lake")])
        self.assertEqual(self.audit_count(), audits)
        self.assertEqual(len(message_ids(self.path)), 6)

    def test_delete_unknown(self) -> None:
        """Deleting a message that is not there says so and changes nothing."""
        self.assertFalse(self.store.delete("f" * 32))
        self.assertEqual(len(message_ids(self.path)), 7)


class PurgeTests(Fixture):
    def test_purge_dead_letters(self) -> None:
        """Purging a connector's dead letters empties its dead-letter queue;
        a message no queue holds any more goes, one still queued elsewhere
        stays; audit records stay."""
        audits = self.audit_count()
        self.assertEqual(self.store.purge_dead("ehr"), 2)
        self.assertEqual(self.store.count("ehr", "dead"), 0)
        self.assertEqual(self.store.count("lake", "dead"), 1)
        remaining = message_ids(self.path)
        self.assertIn(self.ids[0], remaining)      # still delivered to lake
        self.assertNotIn(self.ids[5], remaining)   # only ever routed to ehr
        self.assertIn(self.ids[6], remaining)      # never routed: not a purge's business
        self.assertEqual(self.audit_count(), audits)

    def test_purge_larger_than_a_batch(self) -> None:
        """A purge of more rows than one transaction takes removes them all."""
        conn = connect(self.path)
        self.addCleanup(conn.close)
        count = PURGE_BATCH * 2 + 1
        conn.execute("BEGIN")
        for i in range(count):
            mid = add_message(conn, f"B{i}", received_at=NOW)
            add_delivery(conn, mid, "bulk", "dead", updated_at=NOW)
        conn.execute("COMMIT")
        self.assertEqual(self.store.purge_dead("bulk"), count)
        self.assertEqual(self.store.count("bulk", "dead"), 0)
        self.assertEqual(len(message_ids(self.path)), 7)

    def test_batches_leave_the_lock_free_for_the_server(self) -> None:
        """Between batches the write lock is left free as long as a batch
        held it, so the server's commits get in during a long purge."""
        conn = connect(self.path)
        self.addCleanup(conn.close)
        conn.execute("BEGIN")
        for i in range(PURGE_BATCH + 1):
            add_delivery(conn, add_message(conn, f"B{i}", received_at=NOW), "bulk", "dead",
                         updated_at=NOW)
        conn.execute("COMMIT")
        ticks = iter(range(1, 1000))
        pauses: list[float] = []
        # Each reading of the clock is 10 ms after the one before.
        with Store(self.path, sleep=pauses.append,
                   monotonic=lambda: next(ticks) / 100) as store:
            self.assertEqual(store.purge_dead("bulk"), PURGE_BATCH + 1)
        # Batches of 500, 1 and the empty one that finds nothing left.
        self.assertEqual([round(p, 6) for p in pauses], [0.01, 0.01])

    def test_purge_delivered_before(self) -> None:
        """Only delivered rows last changed before the cut-off go."""
        self.assertEqual(self.store.purge_delivered("lake", NOW - 3600), 0)
        self.assertEqual(self.store.purge_delivered("ehr", NOW - 3600), 1)
        self.assertNotIn(self.ids[4], message_ids(self.path))
        self.assertEqual(
            [r[2] for r in queue_rows(self.path, "ehr")],
            ["dead", "pending", "in_flight", "pending", "dead"],
        )


class OpenTests(SynchronousTestCase):
    def test_missing_file_is_not_created(self) -> None:
        """A mistyped path is refused instead of showing a new empty outbox."""
        folder = os.path.dirname(new_outbox(self))
        path = os.path.join(folder, "typo.db")
        with self.assertRaises(StoreError) as e:
            Store(path)
        self.assertIn(f"no outbox at {path}", str(e.exception))
        self.assertFalse(os.path.exists(path))

    def test_newer_schema_is_refused(self) -> None:
        """An outbox written by a newer mllpd is not touched."""
        path = new_outbox(self)
        conn = connect(path)
        conn.execute("INSERT INTO schema_version VALUES (99)")
        conn.close()
        with self.assertRaises(StoreError) as e:
            Store(path)
        self.assertIn("newer than this mllpd knows", str(e.exception))

    def test_older_schema_is_refused_not_migrated(self) -> None:
        """An outbox an older mllpd is still running on is refused and left exactly as it is."""
        path = os.path.join(os.path.dirname(new_outbox(self)), "older.db")
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        conn.executescript(schema_files("sqlite")[0][1])
        conn.execute("INSERT INTO schema_version VALUES (1)")
        tables = sorted(r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'"))
        conn.close()
        for _ in range(2):
            with self.assertRaises(StoreError) as e:
                Store(path)
            newest = schema_files("sqlite")[-1][0]
            self.assertIn(f"schema version 1 is older than this mllp-cli needs ({newest})", str(e.exception))
            self.assertNotIn("\n", str(e.exception))
        conn = sqlite3.connect(path)
        self.assertEqual([r[0] for r in conn.execute("SELECT version FROM schema_version")], [1])
        self.assertEqual(sorted(r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")),
                         tables)
        conn.close()

    def test_reads_do_not_wait_for_a_writer(self) -> None:
        """While another connection is in the middle of a write, counts come
        back at once and show only what was committed."""
        path = new_outbox(self)
        conn = connect(path)
        self.addCleanup(conn.close)
        mid = add_message(conn, "W1", received_at=NOW)
        add_delivery(conn, mid, "ehr", updated_at=NOW)
        conn.execute("BEGIN IMMEDIATE")
        self.addCleanup(conn.execute, "ROLLBACK")
        add_delivery(conn, mid, "lake", updated_at=NOW)
        with Store(path, busy_timeout=0) as store:
            self.assertEqual([(s.connector, s.pending) for s in store.stats(NOW)], [("ehr", 1)])
