"""SQLite outbox: WAL, synchronous=FULL, group commit on one dedicated thread."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Collection
from importlib import resources
from typing import NamedTuple

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorThreads, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
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
    over_limit,
)
from mllpd.outbox.wal import (
    CHECKPOINT_INTERVAL,
    DEFAULT_WAL_LIMIT,
    WRITER_BUSY_MS,
    WalGuard,
    restart_threshold,
)

__all__ = ["SQLiteOutbox", "open_database", "prune_interval", "schema_files"]

log = Logger(namespace="mllpd.outbox")

# Seconds between recounts of the backlog (for MLLP_MAX_OUTBOX and metrics).
BACKLOG_INTERVAL = 1.0
# Seconds between retention sweeps, and rows deleted per sweep statement, so
# a sweep never holds the write lock long enough to delay ACKs noticeably.
PRUNE_INTERVAL = 60.0
PRUNE_BATCH = 1000
# Past every message id: SQLite's largest integer.
_MAX_ID = 2**63 - 1
# Seconds delivery-state changes may wait for a message commit to ride along.
STATE_HOLD = 0.01
# A sweep is a write transaction: never more often than this.
MIN_PRUNE_INTERVAL = 0.5


def prune_interval(retention: float) -> float:
    """Seconds between sweeps: PRUNE_INTERVAL, or half the retention when
    that is shorter, so a short retention (minutes) is kept to within half
    of itself instead of being overrun by a whole interval."""
    return max(MIN_PRUNE_INTERVAL, min(PRUNE_INTERVAL, retention / 2))


def schema_files(dialect: str) -> list[tuple[int, str]]:
    """The numbered schema scripts for a dialect, in order."""
    folder = resources.files("mllpd.outbox").joinpath("schema", dialect)
    scripts = []
    for entry in folder.iterdir():
        name = entry.name
        if name.endswith(".sql"):
            scripts.append((int(name.split("_", 1)[0]), entry.read_text("utf-8")))
    return sorted(scripts)


# Page size of a new outbox. Every page a commit touches is written whole
# to the WAL and fsync'd before AA: at 1,000 msgs/s a commit carries one or
# two messages and touches three B-trees, so smaller pages mean less to
# write per message (about 8 KB instead of 13 KB for a 1 KB message).
# SQLite keeps an existing database's page size.
PAGE_SIZE = 2048


def open_database(path: str, *, wal_limit: int = DEFAULT_WAL_LIMIT) -> sqlite3.Connection:
    """Open (creating if needed) and migrate an outbox database.

    Raises :class:`OutboxError` with a one-line reason when the file cannot
    be opened, written or migrated.
    """
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
        conn.create_function("mllp_dedup_key", 4, _sql_dedup_key, deterministic=True)
        conn.create_function("mllp_default_lane", 2, _sql_default_lane, deterministic=True)
        # Off while migrating: a migration that rebuilds a table must not
        # cascade its DROP into the queues.
        conn.execute("PRAGMA foreign_keys = OFF")
        _migrate(conn)
        conn.execute("PRAGMA foreign_keys = ON")
    except sqlite3.Error as e:
        raise OutboxError(f"cannot open outbox {path}: {e}") from None
    return conn


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
        if current > newest:
            raise OutboxError(
                f"outbox schema version {current} is newer than this mllpd "
                f"knows ({newest}); upgrade mllpd"
            )
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
    " dedup_key, payload"
)
_ROW = "(" + ", ".join("?" * 17) + ")"
# Rows per INSERT statement: 13 parameters each, far below SQLite's limit.
_ROWS_PER_STATEMENT = 500


def _row(e: Envelope, pod: str | None, key: int) -> tuple[object, ...]:
    # The stored message's audit record is this row: no audit_log row.
    return (
        e.message_id, e.received_at, e.peer, e.client_subject, pod, e.control_id,
        e.msg_type, e.sending_app, e.sending_fac, e.version, e.charset, e.size,
        e.sha256, e.ack_code, ",".join(e.routes), key, e.payload,
    )


def _audit_row(e: Envelope, message_id: str, pod: str | None, connectors: str) -> tuple[object, ...]:
    return (
        e.received_at, e.peer, e.client_subject, pod, message_id, e.control_id,
        e.msg_type, e.size, e.sha256, e.ack_code, None, connectors,
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


def _sql_dedup_key(control_id: str, sending_app: str, sending_fac: str, sha256: str) -> int:
    return dedup_key(control_id, sending_app, sending_fac, sha256)


def _sql_default_lane(payload: bytes, charset: str | None) -> int:
    """The default order key of a stored message (for migration 004)."""
    from mllpd.hl7 import parse_message
    from mllpd.rules import default_lane

    try:
        return default_lane(parse_message(bytes(payload), charset))
    except Exception:  # noqa: BLE001 - it was stored, so it parsed once; one lane then
        return 1


_AUDIT_COLUMNS = (
    "received_at, peer, client_subject, pod, message_id, control_id, msg_type, "
    "size, sha256, ack_code, rule, connectors"
)
_AUDIT_ROW = "(" + ", ".join("?" * 12) + ")"
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
    " m.received_at, m.control_id, m.msg_type, m.charset, m.payload, d.lane"
    " FROM (SELECT * FROM (SELECT seq FROM deliveries WHERE connector = :connector"
    f" AND state = 'pending' AND seq > :after{_SKIP} ORDER BY seq LIMIT :limit)"
    " UNION ALL SELECT * FROM (SELECT seq FROM deliveries WHERE connector = :connector"
    f" AND state = 'in_flight' AND seq > :after{_SKIP} ORDER BY seq LIMIT :limit)) head"
    " JOIN deliveries d ON d.seq = head.seq"
    " JOIN messages m ON m.message_id = d.message_id"
    " ORDER BY d.seq LIMIT :limit"
)
_BACKLOG = (
    "SELECT COUNT(*), TOTAL(size) FROM messages WHERE message_id IN"
    " (SELECT message_id FROM deliveries WHERE state IN ('pending', 'in_flight'))"
)
_DEPTHS = (
    "SELECT d.connector, d.state, COUNT(*), MIN(m.received_at)"
    " FROM deliveries d JOIN messages m ON m.message_id = d.message_id"
    " WHERE d.state IN ('pending', 'in_flight', 'dead') GROUP BY d.connector, d.state"
)
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


def _plus(backlog: Backlog, envelope: Envelope, sign: int = 1) -> Backlog:
    return Backlog(
        backlog.messages + sign, backlog.size + sign * len(envelope.payload)
    )


class QueueDepth(NamedTuple):
    """One connector's queue as of the last count."""

    pending: int  # pending or in flight
    dead: int
    oldest: float | None  # received_at of the oldest pending message


Op = tuple[str, tuple[object, ...], "Deferred[None]"]


@implementer(IOutbox, IDeliveryQueue)
class SQLiteOutbox:
    """Stores envelopes with group commit.

    While one commit runs on the outbox thread, new envelopes queue up; when
    it returns they all go into the next transaction together. Each store's
    Deferred fires after its transaction's COMMIT returned (WAL with
    synchronous=FULL: the WAL is fsync'd before COMMIT returns).
    """

    def __init__(
        self,
        path: str,
        reactor: IReactorThreads,
        *,
        dedup_window: float = 24 * 3600.0,
        wall_clock: Callable[[], float] = time.time,
        retention: float = 168 * 3600.0,
        max_count: int | None = None,
        max_bytes: int | None = None,
        pod: str | None = None,
        hold_clock: IReactorTime | None = None,
        wal_limit: int = DEFAULT_WAL_LIMIT,
        checkpoint_interval: float = CHECKPOINT_INTERVAL,
    ) -> None:
        self.path = path
        self.dedup_window = dedup_window
        self.retention = retention
        self.max_count = max_count
        self.max_bytes = max_bytes
        self.pod = pod
        self._reactor = reactor
        self._wall_clock = wall_clock
        self._conn = open_database(path, wal_limit=wal_limit)
        try:
            # Deliveries that were in flight when the last process stopped go
            # back to their queue; their position (seq) is unchanged.
            self._conn.execute(
                "UPDATE deliveries SET state = 'pending' WHERE state = 'in_flight'"
            )
            counted = self._conn.execute(_BACKLOG).fetchone()
        except sqlite3.Error as e:
            self._conn.close()
            raise OutboxError(f"cannot open outbox {path}: {e}") from None
        self._backlog = Backlog(counted[0], int(counted[1]))
        # Routed stores whose commit has not returned yet, and those a
        # recount in progress may not see: a recount reads a snapshot on
        # another thread, so it adds these rather than forget them.
        self._uncommitted = Backlog(0, 0)
        self._unseen = Backlog(0, 0)
        self.depths: dict[str, QueueDepth] = {}
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name="mllpd-outbox")
        # Queue reads and counts run on a connection and thread of their own:
        # a WAL reader never waits for the writer, nor the writer for it.
        if path == ":memory:":
            self._reader, self._reader_pool = self._conn, self._pool
        else:
            self._reader = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._reader_pool = ThreadPool(minthreads=1, maxthreads=1, name="mllpd-outbox-reader")
        self._counting = LoopingCall(self._count)
        self._counting.clock = reactor  # type: ignore[assignment]
        self._pruning = LoopingCall(self.prune)
        self._pruning.clock = reactor  # type: ignore[assignment]
        self._ops: list[Op] = []
        self._audits: list[AuditRecord] = []
        self._durable = True  # the connection's synchronous mode is FULL
        self._held: IDelayedCall | None = None
        self._hold_clock: IReactorTime = hold_clock or reactor  # type: ignore[assignment]
        self._listeners: list[Callable[[set[str]], None]] = []
        # Called with every connector's queue depth after each recount.
        self.count_observer: Callable[[dict[str, QueueDepth]], None] | None = None
        # Checkpoints copy the WAL into the database file and fsync it. Left
        # to SQLite they run inside a COMMIT every 1000 pages and stall the
        # ACKs of that batch; WalGuard does them in the background and has
        # the writer restart the log between transactions (see wal.py).
        self.wal: WalGuard | None = None
        if path != ":memory:":
            self._conn.execute("PRAGMA wal_autocheckpoint = 0")
            self.wal = WalGuard(path, reactor, limit=wal_limit, interval=checkpoint_interval)
        self._pending: list[tuple[Envelope, Deferred[StoreResult]]] = []
        self._committing = False
        self._closing = False
        self._closed = False
        self._shutting = False
        self._close_waiters: list[Deferred[None]] = []
        self.commits = 0
        self.committed_messages = 0
        # Told (batch size, seconds) after each successful commit: metrics.
        self.commit_observer: Callable[[int, float], None] | None = None
        self._commit_started = 0.0

    def start(self) -> None:
        self._pool.start()
        if self._reader_pool is not self._pool:
            self._reader_pool.start()
        if self.wal is not None:
            self.wal.start()
        self._counting.start(BACKLOG_INTERVAL, now=True)
        self._pruning.start(prune_interval(self.retention), now=False)

    def add_listener(self, listener: Callable[[set[str]], None]) -> None:
        """Call ``listener(connectors)`` after each commit that queued
        messages for those connectors."""
        self._listeners.append(listener)

    # -- back-pressure ---------------------------------------------------

    def backlog(self) -> Backlog:
        return self._backlog

    @property
    def full(self) -> bool:
        """Past MLLP_MAX_OUTBOX: new messages must get AR."""
        return over_limit(self._backlog, self.max_count, self.max_bytes)

    def _count(self) -> Deferred[object]:
        # Commits that return during the read may be in its snapshot or
        # not; counting them twice until the next recount errs towards AR.
        self._unseen = self._uncommitted
        d = deferToThreadPool(self._reactor, self._reader_pool, self._read_counts)
        d.addCallback(self._counted)
        return d.addErrback(self._count_failed)

    def _read_counts(self) -> tuple[Backlog, dict[str, QueueDepth]]:
        conn = self._reader
        count, size = conn.execute(_BACKLOG).fetchone()
        depths: dict[str, list[object]] = {}
        for connector, state, n, oldest in conn.execute(_DEPTHS):
            entry = depths.setdefault(connector, [0, 0, None])
            if state == "dead":
                entry[1] = n
            else:
                entry[0] = int(entry[0]) + n  # type: ignore[call-overload]
                if entry[2] is None or oldest < entry[2]:  # type: ignore[operator]
                    entry[2] = oldest
        return Backlog(count, int(size)), {
            name: QueueDepth(*values) for name, values in depths.items()  # type: ignore[arg-type]
        }

    def _counted(self, result: tuple[Backlog, dict[str, QueueDepth]]) -> None:
        counted, depths = result
        self._backlog = Backlog(
            counted.messages + self._unseen.messages, counted.size + self._unseen.size
        )
        # Connectors whose queues emptied keep a zero entry.
        for name in self.depths:
            depths.setdefault(name, QueueDepth(0, 0, None))
        self.depths = depths
        if self.count_observer is not None:
            self.count_observer(depths)

    def _count_failed(self, failure: Failure) -> None:
        log.warn(
            "outbox backlog count failed: {reason}", event="count_failed",
            reason=failure.getErrorMessage(),
        )

    # -- queues ----------------------------------------------------------

    def fetch(
        self,
        connector: str,
        after: int,
        limit: int,
        skip_lanes: Collection[int] = (),
        skip_seqs: Collection[int] = (),
    ) -> Deferred[list[QueuedDelivery]]:
        params = {
            "connector": connector, "after": after, "limit": limit,
            "lanes": json.dumps(list(skip_lanes)), "seqs": json.dumps(list(skip_seqs)),
        }
        return deferToThreadPool(self._reactor, self._reader_pool, self._fetch, params)

    def _fetch(self, params: dict[str, object]) -> list[QueuedDelivery]:
        cursor = self._reader.execute(_FETCH, params)
        try:
            return [QueuedDelivery(*row) for row in cursor]
        finally:
            cursor.close()

    def _op(self, sql: str, params: tuple[object, ...]) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        if self._closing:
            d.errback(OutboxError("outbox is closing"))
            return d
        self._ops.append((sql, params, d))
        if not self._committing and self._held is None:
            # State changes alone wait a little for company: a message
            # commit or more changes. Nothing waits on them but the relay's
            # bookkeeping, and each commit costs the reactor a thread round
            # trip.
            self._held = self._hold_clock.callLater(STATE_HOLD, self._release_held)
        return d

    def _release_held(self) -> None:
        self._held = None
        self._schedule()

    def mark_in_flight(self, seq: int, now: float) -> Deferred[None]:
        return self._op(
            "UPDATE deliveries SET state = 'in_flight', updated_at = ? WHERE seq = ?",
            (now, seq),
        )

    def mark_delivered(self, seq: int, now: float) -> Deferred[None]:
        return self._op(
            "UPDATE deliveries SET state = 'delivered', attempts = attempts + 1,"
            " last_error = NULL, updated_at = ? WHERE seq = ?",
            (now, seq),
        )

    def mark_retry(
        self, seq: int, attempts: int, error: str, next_attempt: float, now: float
    ) -> Deferred[None]:
        return self._op(
            "UPDATE deliveries SET state = 'pending', attempts = ?, last_error = ?,"
            " next_attempt = ?, updated_at = ? WHERE seq = ?",
            (attempts, error, next_attempt, now, seq),
        )

    def mark_dead(self, seq: int, attempts: int, error: str, now: float) -> Deferred[None]:
        return self._op(
            "UPDATE deliveries SET state = 'dead', attempts = ?, last_error = ?,"
            " updated_at = ? WHERE seq = ?",
            (attempts, error, now, seq),
        )

    def audit(self, record: AuditRecord) -> None:
        if self._closing:
            return
        self._audits.append(record)
        self._schedule()

    def prune(self) -> Deferred[int]:
        """Delete delivered messages and audit records older than the
        retention, a batch at a time; fires with the messages deleted."""
        return deferToThreadPool(self._reactor, self._pool, self._prune).addErrback(
            self._prune_failed
        )

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

    def _prune_failed(self, failure: Failure) -> int:
        log.warn(
            "outbox retention sweep failed: {reason}", event="prune_failed",
            reason=failure.getErrorMessage(),
        )
        return 0

    def store(self, envelope: Envelope) -> Deferred[StoreResult]:
        d: Deferred[StoreResult] = Deferred()
        if self._closing:
            d.errback(OutboxError("outbox is closing"))
            return d
        self._pending.append((envelope, d))
        if envelope.routes:
            self._backlog = _plus(self._backlog, envelope)
            self._uncommitted = _plus(self._uncommitted, envelope)
            self._unseen = _plus(self._unseen, envelope)
        self._schedule()
        return d

    def _schedule(self) -> None:
        if self._held is not None:
            # Messages are waiting: held state changes go with them, now.
            self._held.cancel()
            self._held = None
        if not self._committing:
            # Start at the end of this reactor turn, not now: every frame read
            # in the same turn then shares the commit, instead of the first
            # one committing alone while the rest wait behind it.
            self._committing = True
            self._reactor.callLater(0, self._commit_next)  # type: ignore[attr-defined]

    def _commit_next(self) -> None:
        batch, self._pending = self._pending, []
        ops, self._ops = self._ops, []
        audits, self._audits = self._audits, []
        self._committing = True
        envelopes = [e for e, _ in batch]
        self._commit_started = time.perf_counter()
        d = deferToThreadPool(self._reactor, self._pool, self._write, envelopes, ops, audits)
        d.addBoth(self._committed, batch, ops)

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
                    trail.append(_audit_row(e, earlier, pod, ""))
                    continue
                if self.dedup_window > 0:
                    known[key] = e.message_id
                rows.append(_row(e, pod, dedup_key(*key)))
                lanes = e.lanes or (0,) * len(e.routes)
                for connector, lane in zip(e.routes, lanes, strict=True):
                    queued.append((e.message_id, connector, e.received_at, e.received_at, lane))
                results.append(StoreResult(e.message_id, False))
            for a in audits:
                trail.append((
                    a.received_at, a.peer, a.client_subject, pod, None, a.control_id,
                    a.msg_type, a.size, a.sha256, a.ack_code, a.rule, "",
                ))
            _insert(conn, "messages", _COLUMNS, _ROW, rows)
            _insert(
                conn, "deliveries",
                "message_id, connector, state, attempts, next_attempt, updated_at, lane",
                _QUEUE_ROW, queued,
            )
            _insert(conn, "audit_log", _AUDIT_COLUMNS, _AUDIT_ROW, trail)
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
        keys = sorted({dedup_key(*k) for k in wanted})
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

    def _committed(
        self,
        result: list[StoreResult] | Failure,
        batch: list[tuple[Envelope, Deferred[StoreResult]]],
        ops: list[Op],
    ) -> None:
        self._committing = False
        elapsed = time.perf_counter() - self._commit_started
        for envelope, _ in batch:
            if envelope.routes:
                self._uncommitted = _plus(self._uncommitted, envelope, -1)
        # Start the next commit before answering this one: the replies write
        # ACKs and parse newly arrived frames, which would otherwise delay it.
        if self._pending or self._ops or self._audits:
            self._commit_next()
        if isinstance(result, Failure):
            reason = result.getErrorMessage()
            log.error(
                "outbox commit of {count} messages failed: {reason}",
                event="commit_failed",
                count=len(batch),
                reason=reason,
            )
            for _, d in batch:
                d.errback(OutboxError(reason))
            for _, _, op in ops:
                op.errback(OutboxError(reason))
        else:
            self.commits += 1
            self.committed_messages += len(batch)
            if self.commit_observer is not None:
                self.commit_observer(len(batch), elapsed)
            routed: set[str] = set()
            for (envelope, d), stored in zip(batch, result, strict=True):
                if not stored.duplicate:
                    routed.update(envelope.routes)
                d.callback(stored)
            for _, _, op in ops:
                op.callback(None)
            if routed:
                for listener in self._listeners:
                    listener(routed)
        if self._closing and not self._committing and not (self._pending or self._ops):
            self._finish_close()

    def close(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        if self._closed:
            d.callback(None)
            return d
        self._close_waiters.append(d)
        if not self._closing:
            self._closing = True
            if self._held is not None:
                self._schedule()  # commit held state changes before closing
            elif not self._committing:
                self._finish_close()
        return d

    def _close_writer(self) -> None:
        # Deliveries interrupted by the shutdown wait in their queue, not
        # in flight, for whoever opens the outbox next (and for mllp-cli).
        try:
            self._conn.execute(
                "UPDATE deliveries SET state = 'pending' WHERE state = 'in_flight'"
            )
        finally:
            self._conn.close()

    def _finish_close(self) -> None:
        # Reentrant: a store's callback may call close() from inside _committed.
        if self._shutting:
            return
        self._shutting = True
        for loop in (self._counting, self._pruning):
            if loop.running:
                loop.stop()
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

        def closed(result: object) -> None:
            self._pool.stop()
            self._closed = True
            waiters, self._close_waiters = self._close_waiters, []
            for waiter in waiters:
                waiter.callback(None)

        d.addBoth(closed)
