"""SQLite outbox: WAL, synchronous=FULL, group commit on one dedicated thread."""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Collection
from typing import Unpack

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from mllpd.outbox import (
    AuditRecord,
    Backlog,
    Envelope,
    IDeliveryQueue,
    IOutbox,
    OutboxError,
    QueuedDelivery,
    StoreResult,
    dedup_key,
)
from mllpd.outbox.common import (
    AUDIT_COLUMNS,
    BACKLOG,
    PRUNE_BATCH,
    QUEUE_COLUMNS,
    QUEUE_DEPTHS,
    STATE_HOLD,
    GroupCommitOutbox,
    Op,
    OutboxOptions,
    QueueDepth,
    audit_row,
    check_schema_version,
    depths_from,
    prune_interval,
    queue_rows,
    resend_audit_row,
    schema_files,
)
from mllpd.outbox.wal import (
    CHECKPOINT_INTERVAL,
    DEFAULT_WAL_LIMIT,
    WRITER_BUSY_MS,
    WalGuard,
    restart_threshold,
)

__all__ = [
    "STATE_HOLD",
    "QueueDepth",
    "SQLiteOutbox",
    "open_database",
    "prune_interval",
    "schema_files",
]

log = Logger(namespace="mllpd.outbox")

# Past every message id: SQLite's largest integer.
_MAX_ID = 2**63 - 1


# Page size of a new outbox. Every page a commit touches is written whole
# to the WAL and fsync'd before AA: at 1,000 msgs/s a commit carries one or
# two messages and touches three B-trees, so smaller pages mean less to
# write per message (about 11 KB of WAL instead of 13 KB for a 1 KB message,
# measured by bench/soak.py).
# SQLite keeps an existing database's page size.
PAGE_SIZE = 2048


def open_database(path: str, *, wal_limit: int = DEFAULT_WAL_LIMIT) -> sqlite3.Connection:
    """Open (creating if needed) and migrate an outbox database.

    Raises :class:`OutboxError` with a one-line reason when the file cannot
    be opened, written or migrated.
    """
    _private_files(path)
    try:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {WRITER_BUSY_MS}")
        conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if path != ":memory:" and mode.lower() != "wal":
            raise OutboxError(f"cannot switch {path} to WAL mode (got {mode})")
        conn.execute("PRAGMA synchronous = FULL")
        # When the log restarts, its file is cut back to this size.
        conn.execute(f"PRAGMA journal_size_limit = {restart_threshold(wal_limit)}")
        conn.create_function("mllp_dedup_key", 1, dedup_key, deterministic=True)
        conn.create_function("mllp_default_lane", 2, _sql_default_lane, deterministic=True)
        # Off while migrating: a migration that rebuilds a table must not
        # cascade its DROP into the queues.
        conn.execute("PRAGMA foreign_keys = OFF")
        _migrate(conn)
        conn.execute("PRAGMA foreign_keys = ON")
    except sqlite3.Error as e:
        raise OutboxError(f"cannot open outbox {path}: {e}") from None
    return conn


def _private_files(path: str) -> None:
    """Create the outbox 0600 and take group and other access off existing files.

    The outbox holds PHI. SQLite gives ``-wal`` and ``-shm`` the mode of the
    database file, so creating that one private (whatever the umask) keeps
    all three private; files left by an older version are tightened here.
    """
    if path == ":memory:" or path.startswith("file:"):
        return
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise OutboxError(f"cannot open outbox {path}: {e.strerror or e}") from None
    os.close(fd)
    for name in (path, path + "-wal", path + "-shm"):
        try:
            mode = os.stat(name).st_mode & 0o777
            if mode & 0o077:
                os.chmod(name, mode & 0o700)
        except FileNotFoundError:
            continue
        except OSError as e:
            log.warn(
                "cannot make {path} private ({reason}); it stays readable by others",
                event="outbox_permissions", path=name, reason=e.strerror or str(e),
            )


def _migrate(conn: sqlite3.Connection) -> None:
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)"
        )
        row = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
        current = row[0] or 0
        scripts = schema_files("sqlite")
        newest = scripts[-1][0] if scripts else 0
        check_schema_version(current, newest)
        for version, script in scripts:
            if version > current:
                for statement in _statements(script):
                    conn.execute(statement)
                conn.execute("INSERT INTO schema_version VALUES (?)", (version,))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _statements(script: str) -> list[str]:
    """Split a schema script into statements (triggers included).

    executescript() would commit our transaction, so statements run one by
    one; sqlite3.complete_statement knows where a trigger body ends.
    """
    statements: list[str] = []
    current = ""
    for line in script.splitlines():
        line = line.split("--", 1)[0].rstrip()
        if not line:
            continue
        current += line + "\n"
        if sqlite3.complete_statement(current):
            statements.append(current.strip())
            current = ""
    if current.strip():
        statements.append(current.strip())
    return statements


_COLUMNS = (
    "message_id, received_at, peer, client_subject, pod, control_id, msg_type,"
    " sending_app, sending_fac, version, charset, size, sha256, ack_code, connectors,"
    " dedup_key, payload, batch_control_id, batch_position"
)
_ROW = "(" + ", ".join("?" * 19) + ")"
# Rows per INSERT statement: 19 parameters each, far below SQLite's limit.
_ROWS_PER_STATEMENT = 500


def _row(e: Envelope, pod: str | None, key: int) -> tuple[object, ...]:
    # The stored message's audit record is this row: no audit_log row.
    return (
        e.message_id, e.received_at, e.peer, e.client_subject, pod, e.control_id,
        e.msg_type, e.sending_app, e.sending_fac, e.version, e.charset, e.size,
        e.sha256, e.ack_code, ",".join(e.routes), key, e.payload, e.batch_control_id,
        e.batch_position,
    )


def _insert(
    conn: sqlite3.Connection, table: str, columns: str, row: str, rows: list[tuple[object, ...]]
) -> None:
    for i in range(0, len(rows), _ROWS_PER_STATEMENT):
        chunk = rows[i : i + _ROWS_PER_STATEMENT]
        values = ", ".join([row] * len(chunk))
        conn.execute(
            f"INSERT INTO {table} ({columns}) VALUES {values}",
            [v for r in chunk for v in r],
        )


DedupKey = tuple[str, str, str, str]


def _key(e: Envelope) -> DedupKey:
    return (e.control_id, e.sending_app, e.sending_fac, e.sha256)


def _sql_default_lane(payload: bytes, charset: str | None) -> int:
    """The default order key of a stored message (for migration 005)."""
    from mllpd.hl7 import parse_message
    from mllpd.rules import default_lane

    try:
        return default_lane(parse_message(bytes(payload), charset))
    except Exception:  # noqa: BLE001 - it was stored, so it parsed once; one lane then
        return 1


_AUDIT_ROW = "(" + ", ".join("?" * 13) + ")"
_QUEUE_ROW = "(?, ?, 'pending', 0, ?, ?, ?)"

# The head of a queue: one ordered index range per state, each stopping after
# `limit` rows, merged. With `state IN (...)` SQLite read, joined and sorted
# every queued row (payloads included) to return the first 32: a read cost
# that grew with the backlog (2.5 ms at 5,000 queued, 0.17 ms now).
#
# Rows of busy lanes and rows just finished are left out on the index alone
# (it holds seq and lane): a lane in backoff with thousands of rows queued
# costs the read a step per row passed over, never a row read or a payload.
_SKIP = (
    " AND lane NOT IN (SELECT value FROM json_each(:lanes))"
    " AND seq NOT IN (SELECT value FROM json_each(:seqs))"
)
_FETCH = (
    "SELECT d.seq, d.message_id, d.connector, d.attempts, d.next_attempt,"
    " m.received_at, m.control_id, m.msg_type, m.charset, m.payload,"
    " m.batch_control_id, m.batch_position, d.lane"
    " FROM (SELECT * FROM (SELECT seq FROM deliveries WHERE connector = :connector"
    f" AND state = 'pending' AND seq > :after{_SKIP} ORDER BY seq LIMIT :limit)"
    " UNION ALL SELECT * FROM (SELECT seq FROM deliveries WHERE connector = :connector"
    f" AND state = 'in_flight' AND seq > :after{_SKIP} ORDER BY seq LIMIT :limit)) head"
    " JOIN deliveries d ON d.seq = head.seq"
    " JOIN messages m ON m.message_id = d.message_id"
    " ORDER BY d.seq LIMIT :limit"
)
# In flight when the process stopped (or stops): back to the queue, in the
# same place (seq unchanged), for whoever opens the outbox next.
_BACK_TO_QUEUE = "UPDATE deliveries SET state = 'pending' WHERE state = 'in_flight'"
# A message goes once every queue row of it was delivered before the cutoff
# (or it was routed nowhere) and it arrived before the cutoff.
#
# Messages have no received_at index (one B-tree less per commit): ids are
# arrival order, so the sweep stops at the first message inside the window.
_PRUNE_BOUNDARY = (
    "SELECT id FROM messages WHERE received_at >= :cutoff ORDER BY id LIMIT 1"
)
_PRUNE_MESSAGES = (
    "DELETE FROM messages WHERE id IN (SELECT id FROM messages m"
    " WHERE m.id < :boundary AND m.received_at < :cutoff"
    " AND NOT EXISTS (SELECT 1 FROM deliveries d"
    " WHERE d.message_id = m.message_id"
    " AND (d.state != 'delivered' OR d.updated_at >= :cutoff))"
    " ORDER BY m.id LIMIT :batch)"
)
# An audit record outlives the retention as long as its message is still
# in the outbox (waiting for a connector, or dead-lettered).
_PRUNE_AUDIT = (
    "DELETE FROM audit_log WHERE id IN (SELECT a.id FROM audit_log a"
    " WHERE a.received_at < :cutoff AND (a.message_id IS NULL OR NOT EXISTS"
    " (SELECT 1 FROM messages m WHERE m.message_id = a.message_id))"
    " ORDER BY a.id LIMIT :batch)"
)


@implementer(IOutbox, IDeliveryQueue)
class SQLiteOutbox(GroupCommitOutbox):
    """Stores envelopes with group commit (see :class:`GroupCommitOutbox`):
    WAL with synchronous=FULL, so the WAL is fsync'd before COMMIT returns.
    """

    def __init__(
        self,
        path: str,
        reactor: IReactorThreads,
        *,
        wal_limit: int = DEFAULT_WAL_LIMIT,
        checkpoint_interval: float = CHECKPOINT_INTERVAL,
        **options: Unpack[OutboxOptions],
    ) -> None:
        super().__init__(reactor, thread_name="mllpd-outbox", **options)
        self.path = path
        self._conn = open_database(path, wal_limit=wal_limit)
        try:
            # Deliveries that were in flight when the last process stopped go
            # back to their queue; their position (seq) is unchanged.
            self._conn.execute(_BACK_TO_QUEUE)
            counted = self._conn.execute(BACKLOG).fetchone()
        except sqlite3.Error as e:
            self._conn.close()
            raise OutboxError(f"cannot open outbox {path}: {e}") from None
        self._backlog = Backlog(counted[0], int(counted[1]))
        # Queue reads and counts run on a connection and thread of their own:
        # a WAL reader never waits for the writer, nor the writer for it.
        if path == ":memory:":
            self._reader = self._conn
        else:
            self._reader = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._reader_pool = ThreadPool(minthreads=1, maxthreads=1, name="mllpd-outbox-reader")
        self._durable = True  # the connection's synchronous mode is FULL
        # Checkpoints copy the WAL into the database file and fsync it. Left
        # to SQLite they run inside a COMMIT every 1000 pages and stall the
        # ACKs of that batch; WalGuard does them in the background and has
        # the writer restart the log between transactions (see wal.py).
        self.wal: WalGuard | None = None
        if path != ":memory:":
            self._conn.execute("PRAGMA wal_autocheckpoint = 0")
            self.wal = WalGuard(path, reactor, limit=wal_limit, interval=checkpoint_interval)

    def start(self) -> None:
        super().start()
        if self.wal is not None:
            self.wal.start()

    def _read_counts(self) -> tuple[Backlog, dict[str, QueueDepth]]:
        conn = self._reader
        count, size = conn.execute(BACKLOG).fetchone()
        return Backlog(count, int(size)), depths_from(conn.execute(QUEUE_DEPTHS).fetchall())

    def _fetch(
        self, connector: str, after: int, limit: int,
        skip_lanes: Collection[int], skip_seqs: Collection[int],
    ) -> list[QueuedDelivery]:
        params = {
            "connector": connector, "after": after, "limit": limit,
            "lanes": json.dumps(list(skip_lanes)), "seqs": json.dumps(list(skip_seqs)),
        }
        cursor = self._reader.execute(_FETCH, params)
        try:
            return [QueuedDelivery(*row) for row in cursor]
        finally:
            cursor.close()

    def _prune(self) -> int:
        cutoff = self._wall_clock() - self.retention
        inside = self._conn.execute(_PRUNE_BOUNDARY, {"cutoff": cutoff}).fetchone()
        boundary = inside[0] if inside is not None else _MAX_ID
        params = {"cutoff": cutoff, "batch": PRUNE_BATCH, "boundary": boundary}
        deleted = 0
        while True:
            n = self._conn.execute(_PRUNE_MESSAGES, params).rowcount
            audited = self._conn.execute(_PRUNE_AUDIT, params).rowcount
            deleted += n
            if n < PRUNE_BATCH and audited < PRUNE_BATCH:
                return deleted

    def _write(
        self, envelopes: list[Envelope], ops: list[Op], audits: list[AuditRecord]
    ) -> list[StoreResult]:
        # A whole batch is one SELECT and one INSERT per 500 rows: every
        # statement step releases and retakes the GIL, which the reactor
        # thread holds while it parses, so few steps keep commits short.
        conn = self._conn
        if self.wal is not None:
            self.wal.before_write(conn)
        # Only a commit that stores messages must reach the disk before it
        # returns: their AA depends on it. One that only records delivery
        # states (and refused messages' audit rows) skips the fsync; the next
        # message commit's fsync of the WAL covers its frames too, and a
        # crash before that only means those deliveries are made again, with
        # the same message id. WAL stays consistent either way.
        durable = bool(envelopes)
        if durable != self._durable:
            conn.execute("PRAGMA synchronous = FULL" if durable else "PRAGMA synchronous = NORMAL")
            self._durable = durable
        try:
            conn.execute("BEGIN IMMEDIATE")
            known = self._known_duplicates(envelopes) if self.dedup_window > 0 else {}
            results: list[StoreResult] = []
            rows: list[tuple[object, ...]] = []
            queued: list[tuple[object, ...]] = []
            trail: list[tuple[object, ...]] = []
            pod = self.pod
            for e in envelopes:
                key = _key(e)
                earlier = known.get(key)
                if earlier is not None:
                    # A resend of a stored message: AA again, no second copy,
                    # no second delivery.
                    results.append(StoreResult(earlier, True))
                    trail.append(resend_audit_row(e, earlier, pod))
                    continue
                if self.dedup_window > 0:
                    known[key] = e.message_id
                rows.append(_row(e, pod, dedup_key(e.sha256)))
                queued.extend(queue_rows(e))
                results.append(StoreResult(e.message_id, False))
            trail.extend(audit_row(a, pod) for a in audits)
            _insert(conn, "messages", _COLUMNS, _ROW, rows)
            _insert(conn, "deliveries", QUEUE_COLUMNS, _QUEUE_ROW, queued)
            _insert(conn, "audit_log", AUDIT_COLUMNS, _AUDIT_ROW, trail)
            for sql, params, _ in ops:
                conn.execute(sql, params)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            raise
        return results

    def _known_duplicates(self, envelopes: list[Envelope]) -> dict[DedupKey, str]:
        """Stored messages within the window that share a batch member's key."""
        since = self._wall_clock() - self.dedup_window
        wanted = {_key(e) for e in envelopes}
        keys = sorted({dedup_key(k[3]) for k in wanted})
        found: dict[DedupKey, str] = {}
        for i in range(0, len(keys), _ROWS_PER_STATEMENT):
            chunk = keys[i : i + _ROWS_PER_STATEMENT]
            marks = ", ".join("?" * len(chunk))
            cursor = self._conn.execute(
                "SELECT control_id, sending_app, sending_fac, sha256, message_id"
                f" FROM messages WHERE dedup_key IN ({marks}) AND received_at >= ?"
                " ORDER BY id",
                [*chunk, since],
            )
            for control_id, app, fac, sha, message_id in cursor:
                # The hash narrowed the rows; the fields decide. The first
                # copy stored is the one a resend points at.
                if (control_id, app, fac, sha) in wanted:
                    found.setdefault((control_id, app, fac, sha), message_id)
            cursor.close()
        return found

    def _close_writer(self) -> None:
        # Deliveries interrupted by the shutdown wait in their queue, not
        # in flight, for whoever opens the outbox next (and for mllp-cli).
        try:
            self._conn.execute(_BACK_TO_QUEUE)
        finally:
            self._conn.close()

    def _shut(self) -> Deferred[None]:
        if not self._pool.started:
            # Never started (startup failed before the service ran).
            self._conn.close()
            d: Deferred[None] = succeed(None)
        else:
            d = deferToThreadPool(self._reactor, self._pool, self._close_writer)
        if self._reader_pool is not self._pool:
            reader_pool, reader = self._reader_pool, self._reader

            def close_reader(result: object) -> object:
                if not reader_pool.started:
                    reader.close()
                    return result
                closing = deferToThreadPool(self._reactor, reader_pool, reader.close)

                def stop_pool(_: object) -> object:
                    reader_pool.stop()
                    return result

                return closing.addBoth(stop_pool)

            d.addBoth(close_reader)
        if self.wal is not None:
            wal = self.wal
            d.addBoth(lambda result: wal.stop().addCallback(lambda _: result))
        return d.addBoth(lambda _: None)
