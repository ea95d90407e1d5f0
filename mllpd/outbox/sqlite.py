"""SQLite outbox: WAL, synchronous=FULL, group commit on one dedicated thread."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from importlib import resources

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from mllpd.outbox import Envelope, IOutbox, OutboxError, StoreResult

__all__ = ["SQLiteOutbox", "open_database", "schema_files"]

log = Logger(namespace="mllpd.outbox")

# Seconds between background WAL checkpoints.
CHECKPOINT_INTERVAL = 1.0


def schema_files(dialect: str) -> list[tuple[int, str]]:
    """The numbered schema scripts for a dialect, in order."""
    folder = resources.files("mllpd.outbox").joinpath("schema", dialect)
    scripts = []
    for entry in folder.iterdir():
        name = entry.name
        if name.endswith(".sql"):
            scripts.append((int(name.split("_", 1)[0]), entry.read_text("utf-8")))
    return sorted(scripts)


def open_database(path: str) -> sqlite3.Connection:
    """Open (creating if needed) and migrate an outbox database.

    Raises :class:`OutboxError` with a one-line reason when the file cannot
    be opened, written or migrated.
    """
    try:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 5000")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if path != ":memory:" and mode.lower() != "wal":
            raise OutboxError(f"cannot switch {path} to WAL mode (got {mode})")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
        _migrate(conn)
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
    "message_id, received_at, peer, control_id, msg_type, sending_app, "
    "sending_fac, version, charset, size, sha256, ack_code, payload"
)
_ROW = "(" + ", ".join("?" * 13) + ")"
# Rows per INSERT statement: 13 parameters each, far below SQLite's limit.
_ROWS_PER_STATEMENT = 500


def _row(e: Envelope) -> tuple[object, ...]:
    return (
        e.message_id, e.received_at, e.peer, e.control_id, e.msg_type,
        e.sending_app, e.sending_fac, e.version, e.charset, e.size, e.sha256,
        e.ack_code, e.payload,
    )


DedupKey = tuple[str, str, str, str]


def _key(e: Envelope) -> DedupKey:
    return (e.control_id, e.sending_app, e.sending_fac, e.sha256)


@implementer(IOutbox)
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
    ) -> None:
        self.path = path
        self.dedup_window = dedup_window
        self._reactor = reactor
        self._wall_clock = wall_clock
        self._conn = open_database(path)
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name="mllpd-outbox")
        # Checkpoints copy the WAL into the database file and fsync it. Left
        # to SQLite they run inside a COMMIT every 1000 pages and stall the
        # ACKs of that batch; a second connection on its own thread does them
        # in the background instead (PASSIVE: never blocks the writer).
        self._checkpoints: _Checkpointer | None = None
        if path != ":memory:":
            self._conn.execute("PRAGMA wal_autocheckpoint = 0")
            self._checkpoints = _Checkpointer(path, reactor)
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
        if self._checkpoints is not None:
            self._checkpoints.start()

    def store(self, envelope: Envelope) -> Deferred[StoreResult]:
        d: Deferred[StoreResult] = Deferred()
        if self._closing:
            d.errback(OutboxError("outbox is closing"))
            return d
        self._pending.append((envelope, d))
        if not self._committing:
            # Start at the end of this reactor turn, not now: every frame read
            # in the same turn then shares the commit, instead of the first
            # one committing alone while the rest wait behind it.
            self._committing = True
            self._reactor.callLater(0, self._commit_next)  # type: ignore[attr-defined]
        return d

    def _commit_next(self) -> None:
        batch, self._pending = self._pending, []
        self._committing = True
        envelopes = [e for e, _ in batch]
        self._commit_started = time.perf_counter()
        d = deferToThreadPool(self._reactor, self._pool, self._write, envelopes)
        d.addBoth(self._committed, batch)

    def _write(self, envelopes: list[Envelope]) -> list[StoreResult]:
        # A whole batch is one SELECT and one INSERT per 500 rows: every
        # statement step releases and retakes the GIL, which the reactor
        # thread holds while it parses, so few steps keep commits short.
        conn = self._conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            known = self._known_duplicates(envelopes) if self.dedup_window > 0 else {}
            results: list[StoreResult] = []
            rows: list[tuple[object, ...]] = []
            for e in envelopes:
                key = _key(e)
                earlier = known.get(key)
                if earlier is not None:
                    results.append(StoreResult(earlier, True))
                    continue
                if self.dedup_window > 0:
                    known[key] = e.message_id
                rows.append(_row(e))
                results.append(StoreResult(e.message_id, False))
            for i in range(0, len(rows), _ROWS_PER_STATEMENT):
                chunk = rows[i : i + _ROWS_PER_STATEMENT]
                values = ", ".join([_ROW] * len(chunk))
                conn.execute(
                    f"INSERT INTO messages ({_COLUMNS}) VALUES {values}",
                    [v for row in chunk for v in row],
                )
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
        control_ids = sorted({e.control_id for e in envelopes})
        found: dict[DedupKey, str] = {}
        for i in range(0, len(control_ids), _ROWS_PER_STATEMENT):
            chunk = control_ids[i : i + _ROWS_PER_STATEMENT]
            marks = ", ".join("?" * len(chunk))
            cursor = self._conn.execute(
                "SELECT control_id, sending_app, sending_fac, sha256, message_id"
                f" FROM messages WHERE control_id IN ({marks}) AND received_at >= ?"
                " ORDER BY id DESC",
                [*chunk, since],
            )
            for control_id, app, fac, sha, message_id in cursor:
                found[(control_id, app, fac, sha)] = message_id
            cursor.close()
        return found

    def _committed(
        self,
        result: list[StoreResult] | Failure,
        batch: list[tuple[Envelope, Deferred[StoreResult]]],
    ) -> None:
        self._committing = False
        elapsed = time.perf_counter() - self._commit_started
        # Start the next commit before answering this one: the replies write
        # ACKs and parse newly arrived frames, which would otherwise delay it.
        if self._pending:
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
        else:
            self.commits += 1
            self.committed_messages += len(batch)
            if self.commit_observer is not None:
                self.commit_observer(len(batch), elapsed)
            for (_, d), stored in zip(batch, result, strict=True):
                d.callback(stored)
        if self._closing and not self._committing and not self._pending:
            self._finish_close()

    def close(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        if self._closed:
            d.callback(None)
            return d
        self._close_waiters.append(d)
        if not self._closing:
            self._closing = True
            if not self._committing:
                self._finish_close()
        return d

    def _finish_close(self) -> None:
        # Reentrant: a store's callback may call close() from inside _committed.
        if self._shutting:
            return
        self._shutting = True
        if not self._pool.started:
            # Never started (startup failed before the service ran).
            self._conn.close()
            d: Deferred[None] = succeed(None)
        else:
            d = deferToThreadPool(self._reactor, self._pool, self._conn.close)
        if self._checkpoints is not None:
            checkpoints = self._checkpoints
            d.addBoth(lambda result: checkpoints.stop().addCallback(lambda _: result))

        def closed(result: object) -> None:
            self._pool.stop()
            self._closed = True
            waiters, self._close_waiters = self._close_waiters, []
            for waiter in waiters:
                waiter.callback(None)

        d.addBoth(closed)


class _Checkpointer:
    """Runs ``PRAGMA wal_checkpoint(PASSIVE)`` every CHECKPOINT_INTERVAL on a
    connection and thread of its own."""

    def __init__(self, path: str, reactor: IReactorThreads) -> None:
        self._reactor = reactor
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name="mllpd-checkpoint")
        self._loop = LoopingCall(self._run)
        self._loop.clock = reactor  # type: ignore[assignment]
        self.checkpoints = 0

    def start(self) -> None:
        self._pool.start()
        self._loop.start(CHECKPOINT_INTERVAL, now=False)

    def _run(self) -> Deferred[None]:
        # LoopingCall waits for this Deferred, so runs never overlap.
        d = deferToThreadPool(self._reactor, self._pool, self._checkpoint)
        return d.addErrback(self._failed)

    def _checkpoint(self) -> None:
        self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        self.checkpoints += 1

    def _failed(self, failure: Failure) -> None:
        log.warn(
            "outbox checkpoint failed: {reason}", event="checkpoint_failed",
            reason=failure.getErrorMessage(),
        )

    def stop(self) -> Deferred[None]:
        """Stop the timer; close after a checkpoint in progress (same thread)."""
        if self._loop.running:
            self._loop.stop()
        if not self._pool.started:
            self._conn.close()
            return succeed(None)
        d = deferToThreadPool(self._reactor, self._pool, self._conn.close)
        return d.addBoth(lambda _: self._pool.stop())
