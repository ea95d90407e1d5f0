"""PostgreSQL outbox: the shared storage of a cluster of replicas.

The group commit, backlog accounting and listeners are
:class:`~mllpd.outbox.common.GroupCommitOutbox`'s; this module has the SQL
and the connections. The writer and the reader each own one connection on a
thread of their own and reconnect on the next use after a failure. Every
session sets ``synchronous_commit = on`` whatever the server's default, so
a COMMIT that returned is durable (and on a synchronous standby if the
server has one).

Cluster-wide duties use advisory locks and the one-row ``cluster_state``
table: schema migration under ``pg_advisory_xact_lock``, the backlog count
and the retention sweep by whichever replica finds them due first.
Delivery leases live in :mod:`mllpd.outbox.leases`.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple, Unpack

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from mllpd.endpoints import is_loopback
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
    BACKLOG_INTERVAL,
    PRUNE_BATCH,
    QUEUE_COLUMNS,
    QUEUE_DEPTHS,
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

__all__ = [
    "PostgresOutbox",
    "abort_socket",
    "advisory_key",
    "close_quietly",
    "connect",
    "describe_error",
    "migrate",
    "server_name",
]

log = Logger(namespace="mllpd.outbox")

# Seconds to wait for a connection before the store fails (and gets AR).
CONNECT_TIMEOUT = 5
# Rows per INSERT statement (psycopg allows 65535 parameters).
ROWS_PER_STATEMENT = 1000
# Attempts at inserting a batch whose dedup keys another transaction holds.
DEDUP_ROUNDS = 4
# Where commits announce the connectors they queued for.
NOTIFY_CHANNEL = "mllpd_queued"
# Seconds between looks at the stop flag while listening, and between
# attempts to listen again after the session failed.
LISTEN_STEP = 0.25
RELISTEN = 2.0

# Seconds a session may be busy with one piece of work before it counts as
# hung (a database or network that stopped answering without closing the
# connection): its socket is shut, the work fails (stores get AR) and the
# next use connects again.
STALL_TIMEOUT = 10.0


def advisory_key(name: str) -> int:
    """A 64-bit advisory lock key for a name (a connector, a duty)."""
    digest = hashlib.sha256(b"mllpd\0" + name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


MIGRATE_KEY = advisory_key("migrate")


def describe_error(exc: BaseException) -> str:
    """One line for a database error (the outbox's, its leases' and the
    postgres connector's): SQLSTATE and primary message only, since the
    DETAIL of e.g. a constraint violation quotes the row, which is PHI; or
    the connection failure."""
    sqlstate = getattr(exc, "sqlstate", None)
    if sqlstate:
        primary = exc.diag.message_primary if isinstance(exc, psycopg.Error) else None
        return f"{type(exc).__name__} ({sqlstate}): {primary or ''}".rstrip(": ")
    text = " ".join(str(exc).split())
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def server_name(url: str) -> str:
    """Where the database is, for logs: never the password or whole URL."""
    try:
        params = conninfo_to_dict(url)
    except psycopg.Error:
        return "(invalid connection string)"
    return "{}:{}/{}".format(
        params.get("host") or params.get("hostaddr") or "local",
        params.get("port") or "5432",
        params.get("dbname") or params.get("user") or "",
    )


# libpq modes that may send in the clear or to a server whose name is unchecked.
UNVERIFIED_SSLMODES = frozenset({"allow", "prefer", "require", "verify-ca"})


class Transport(NamedTuple):
    """How a libpq connection string reaches its server (:func:`transport`)."""

    conninfo: str  # with sslmode=verify-full added when the server is remote and no mode is set
    remote: str  # the hosts that are not local, comma-separated ("" if none)
    weakness: str | None  # None, "plaintext" or "sslmode=<mode>" (unverified TLS)


def transport(conninfo: str, environ: Mapping[str, str]) -> Transport:
    """The policy for every PostgreSQL connection that carries messages.

    A Unix socket or loopback server is used as given: the traffic never
    leaves the host. For any other, libpq's default ``sslmode=prefer`` (which
    falls back to plaintext and never checks the certificate) becomes
    ``verify-full``; an explicit weaker mode is returned as a ``weakness``
    for the caller to refuse, or to warn about when the user opted in.
    """
    params = conninfo_to_dict(conninfo)
    targets = str(params.get("hostaddr") or params.get("host") or environ.get("PGHOST") or "")
    remote = [
        h for h in targets.split(",")
        if h.strip() and not h.strip().startswith(("/", "@")) and not is_loopback(h)
    ]
    if not remote:
        return Transport(conninfo, "", None)
    host = ",".join(remote)
    sslmode = str(params.get("sslmode") or environ.get("PGSSLMODE") or "").strip().lower()
    if not sslmode:
        return Transport(make_conninfo(conninfo, sslmode="verify-full"), host, None)
    if sslmode == "disable":
        return Transport(conninfo, host, "plaintext")
    if sslmode in UNVERIFIED_SSLMODES:
        return Transport(conninfo, host, f"sslmode={sslmode}")
    return Transport(conninfo, host, None)


def outbox_url(url: str, environ: Mapping[str, str], insecure: bool) -> str:
    """MLLP_DB_URL under :func:`transport`'s policy: unverified TLS to a
    remote server is refused (ValueError, never echoing the URL) unless
    ``insecure`` (MLLP_DB_INSECURE); plaintext or, with ``insecure``,
    unverified TLS is warned at startup."""
    try:
        t = transport(url, environ)
    except psycopg.Error:
        raise ValueError("not a PostgreSQL connection string") from None
    if t.weakness == "plaintext":
        log.warn(
            "outbox messages to {host} are sent without TLS (sslmode=disable); they are readable on the network",
            event="outbox_plaintext", host=t.remote,
        )
    elif t.weakness is not None:
        if not insecure:
            raise ValueError(
                f"{t.weakness} does not verify the server's certificate and name; use "
                "sslmode=verify-full (the default for a server that is not local), "
                "or set MLLP_DB_INSECURE=true to accept that"
            )
        log.warn(
            "MLLP_DB_INSECURE: {what} for {host}; a machine in the path can read every message",
            event="outbox_tls_unverified", host=t.remote, what=t.weakness,
        )
    return t.conninfo


def connect(
    url: str, application: str = "mllpd", *, keepalive: float = 10.0
) -> psycopg.Connection[Any]:
    """A session for mllpd: autocommit (transactions are explicit),
    ``synchronous_commit = on``, TCP keepalives so a dead peer is noticed
    within ``keepalive`` seconds."""
    given = conninfo_to_dict(url)
    args: dict[str, Any] = {
        "connect_timeout": CONNECT_TIMEOUT,
        "keepalives": 1,
        "keepalives_idle": max(1, int(keepalive / 3)),
        "keepalives_interval": max(1, int(keepalive / 6)),
        "keepalives_count": 3,
        "tcp_user_timeout": int(keepalive * 1000),
        "application_name": application,
    }
    args = {k: v for k, v in args.items() if k not in given}
    conn = psycopg.connect(url, autocommit=True, **args)
    try:
        conn.execute("SET synchronous_commit = on")
    except BaseException:
        conn.close()
        raise
    return conn


def migrate(conn: psycopg.Connection[Any]) -> int:
    """Apply the schema scripts not yet applied; returns the version.

    One transaction under an advisory lock: of N replicas starting at once,
    the first migrates and the others wait for it, then find nothing to do.
    """
    scripts = schema_files("postgres")
    newest = scripts[-1][0] if scripts else 0
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATE_KEY,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_version (version integer NOT NULL)"
        )
        row = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
        current = (row[0] if row else None) or 0
        check_schema_version(current, newest)
        for version, script in scripts:
            if version > current:
                conn.execute(script.encode("utf-8"))
                conn.execute("INSERT INTO schema_version VALUES (%s)", (version,))
    return newest


_MESSAGE_COLUMNS = (
    "message_id, dedup_key, received_at, peer, client_subject, pod, control_id,"
    " msg_type, sending_app, sending_fac, version, charset, size, sha256, ack_code,"
    " connectors, payload, batch_control_id, batch_position"
)
_MESSAGE_MARKS = "(" + ", ".join(["%s"] * 19) + ")"
_AUDIT_MARKS = "(" + ", ".join(["%s"] * 13) + ")"
_QUEUE_MARKS = "(%s, %s, 'pending', 0, %s, %s, %s)"

# The head of a queue by state, in seq order. Not "seq > the last row
# seen": a row whose transaction commits after a higher-numbered one was
# already read would be skipped for ever. Rows of the relay's busy lanes
# and the rows it finished (whose state change may not be committed yet)
# are left out, so the limit counts only rows it can use.
_FETCH = (
    "SELECT d.seq, d.message_id, d.connector, d.attempts, d.next_attempt,"
    " m.received_at, m.control_id, m.msg_type, m.charset, m.payload,"
    " m.batch_control_id, m.batch_position, d.lane"
    " FROM deliveries d JOIN messages m ON m.message_id = d.message_id"
    " WHERE d.connector = %(connector)s AND d.state IN ('pending', 'in_flight')"
    " AND d.lane <> ALL(%(lanes)s::bigint[]) AND d.seq <> ALL(%(seqs)s::bigint[])"
    " ORDER BY d.seq LIMIT %(limit)s"
)
_PRUNE_MESSAGES = (
    "DELETE FROM messages WHERE message_id IN (SELECT m.message_id FROM messages m"
    " WHERE m.received_at < %(cutoff)s AND NOT EXISTS (SELECT 1 FROM deliveries d"
    " WHERE d.message_id = m.message_id"
    " AND (d.state <> 'delivered' OR d.updated_at >= %(cutoff)s))"
    " LIMIT %(batch)s)"
)
_PRUNE_AUDIT = (
    "DELETE FROM audit_log WHERE id IN (SELECT a.id FROM audit_log a"
    " WHERE a.received_at < %(cutoff)s AND (a.message_id IS NULL OR NOT EXISTS"
    " (SELECT 1 FROM messages m WHERE m.message_id = a.message_id))"
    " ORDER BY a.id LIMIT %(batch)s)"
)


def _message_row(e: Envelope, key: int | None, pod: str | None) -> tuple[object, ...]:
    return (
        e.message_id, key, e.received_at, e.peer, e.client_subject, pod, e.control_id,
        e.msg_type, e.sending_app, e.sending_fac, e.version, e.charset, e.size,
        e.sha256, e.ack_code, ",".join(e.routes), e.payload, e.batch_control_id,
        e.batch_position,
    )


def _insert(
    cur: psycopg.Cursor[Any], table: str, columns: str, marks: str,
    rows: Sequence[tuple[object, ...]], suffix: str = "",
) -> list[tuple[Any, ...]]:
    returned: list[tuple[Any, ...]] = []
    for i in range(0, len(rows), ROWS_PER_STATEMENT):
        chunk = rows[i : i + ROWS_PER_STATEMENT]
        values = ", ".join([marks] * len(chunk))
        cur.execute(
            f"INSERT INTO {table} ({columns}) VALUES {values}{suffix}",  # type: ignore[arg-type]
            [v for r in chunk for v in r],
        )
        if suffix:
            returned.extend(cur.fetchall())
    return returned


def close_quietly(conn: psycopg.Connection[Any] | None) -> None:
    """Close a session that may already be broken; its error says nothing new."""
    if conn is not None:
        try:
            conn.close()
        except psycopg.Error:
            pass


def abort_socket(conn: psycopg.Connection[Any] | None) -> None:
    """Shut a session's socket down from another thread: the thread blocked
    on it (a database that stopped answering) gets an error at once."""
    if conn is None:
        return
    try:
        sock = socket.socket(fileno=socket.dup(conn.pgconn.socket))
    except (OSError, psycopg.Error):
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        sock.close()


class _Session:
    """One connection, used from one thread, opened again after a failure."""

    def __init__(self, url: str, application: str) -> None:
        self.url = url
        self.application = application
        self.conn: psycopg.Connection[Any] | None = None
        # The server process of the current connection (0 before the first).
        self.pid = 0
        # time.monotonic() when the work in progress began, else None.
        self.busy_since: float | None = None

    @contextmanager
    def use(self) -> Iterator[psycopg.Connection[Any]]:
        """The connection; any database error closes it and becomes an
        OutboxError with one line."""
        self.busy_since = time.monotonic()
        try:
            if self.conn is None or self.conn.closed:
                self.conn = connect(self.url, self.application)
                self.pid = self.conn.info.backend_pid
            yield self.conn
        except psycopg.Error as e:
            if self.conn is not None and (self.conn.broken or isinstance(e, psycopg.OperationalError)):
                self.close()
            raise OutboxError(describe_error(e)) from None
        finally:
            self.busy_since = None

    def stalled(self, now: float) -> bool:
        return self.busy_since is not None and now - self.busy_since > STALL_TIMEOUT

    def close(self) -> None:
        conn, self.conn = self.conn, None
        close_quietly(conn)


class _Notices:
    """LISTENs on a session and thread of its own for the connectors other
    replicas' commits queued for, and tells ``noticed`` on the reactor.
    Notices from ``own`` (this replica's writer) are left out: its commits
    tell the listeners themselves."""

    def __init__(
        self, url: str, application: str, reactor: IReactorThreads,
        noticed: Callable[[set[str]], None], own: _Session,
    ) -> None:
        self._session = _Session(url, application)
        self._reactor = reactor
        self._noticed = noticed
        self._own = own
        self._stopping = threading.Event()
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name="mllpd-outbox-notices")

    def start(self) -> None:
        self._pool.start()
        self._pool.callInThread(self._listen)

    def stop(self) -> None:
        """Stop listening: the thread ends within LISTEN_STEP (or a connect
        attempt's timeout), joined off the reactor thread."""
        self._stopping.set()
        if self._pool.started:
            self._reactor.callInThread(self._pool.stop)  # type: ignore[attr-defined]

    def _listen(self) -> None:
        while not self._stopping.is_set():
            try:
                with self._session.use() as conn:
                    conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    while not self._stopping.is_set():
                        names: set[str] = set()
                        for notice in conn.notifies(timeout=LISTEN_STEP):
                            if notice.pid == self._own.pid:
                                continue
                            names.update(n for n in notice.payload.split(",") if n)
                            break  # deliver it now; the next ones come in the next turn
                        if names:
                            self._reactor.callFromThread(self._noticed, names)  # type: ignore[attr-defined]
            except OutboxError:
                # Workers still poll; listen again in a while.
                self._session.close()
                self._stopping.wait(RELISTEN)
        self._session.close()


@implementer(IOutbox, IDeliveryQueue)
class PostgresOutbox(GroupCommitOutbox):
    """The outbox in a PostgreSQL database shared by every replica."""

    # psycopg's parameters are %s.
    OP_SQL = {
        name: sql.replace("?", "%s") for name, sql in GroupCommitOutbox.OP_SQL.items()
    }

    def __init__(
        self,
        url: str,
        reactor: IReactorThreads,
        **options: Unpack[OutboxOptions],
    ) -> None:
        super().__init__(reactor, thread_name="mllpd-outbox", **options)
        self.url = url
        self.server = server_name(url)
        name = f"mllpd-{self.pod}" if self.pod else "mllpd"
        self._writer = _Session(url, name[:63])
        self._reader = _Session(url, f"{name}-reader"[:63])
        # Migrate now, on this thread: a database that cannot be reached or
        # migrated at startup fails the start with one line.
        with self._writer.use() as conn:
            migrate(conn)
            row = conn.execute(BACKLOG).fetchone()
        assert row is not None
        self._backlog = Backlog(int(row[0]), int(row[1]))
        self._reader_pool = ThreadPool(minthreads=1, maxthreads=1, name="mllpd-outbox-reader")
        # None until the first commit; then whether the last one succeeded.
        self._up: bool | None = None
        self._watchdog = LoopingCall(self._watch)
        self._watchdog.clock = reactor  # type: ignore[assignment]
        self._notices = _Notices(
            url, f"{name}-notices"[:63], reactor, self._noticed, self._writer
        )

    def start(self) -> None:
        super().start()
        self._watchdog.start(1.0, now=False)
        self._notices.start()

    def _noticed(self, connectors: set[str]) -> None:
        """Another replica queued messages for ``connectors``."""
        for listener in self._listeners:
            listener(connectors)

    def _watch(self) -> None:
        now = time.monotonic()
        for session in (self._writer, self._reader):
            if session.stalled(now):
                log.warn(
                    "outbox session {application} to {server} hung for {seconds:.0f}s:"
                    " closing it", event="outbox_session_hung",
                    application=session.application, server=self.server,
                    seconds=now - (session.busy_since or now),
                )
                session.busy_since = None  # once per hang
                abort_socket(session.conn)

    # -- health: one log line per change, not one per failed batch ---------

    def _commit_failed(self, count: int, reason: str) -> None:
        if self._up is not False:
            log.error(
                "outbox database {server} unavailable, new messages get AR: {reason}",
                event="outbox_db_down", server=self.server, reason=reason,
            )
        self._up = False

    def _commit_succeeded(self) -> None:
        if self._up is False:
            log.info(
                "outbox database {server} available again", event="outbox_db_up",
                server=self.server,
            )
        self._up = True

    # -- writer thread -----------------------------------------------------

    def _write(
        self, envelopes: list[Envelope], ops: list[Op], audits: list[AuditRecord]
    ) -> list[StoreResult]:
        pod = self.pod
        with self._writer.use() as conn, conn.transaction(), conn.cursor() as cur:
            results = self._store_messages(cur, envelopes) if envelopes else []
            trail: list[tuple[object, ...]] = []
            queued: list[tuple[object, ...]] = []
            for e, stored in zip(envelopes, results, strict=True):
                if stored.duplicate:
                    trail.append(resend_audit_row(e, stored.message_id, pod))
                else:
                    queued.extend(queue_rows(e))
            trail.extend(audit_row(a, pod) for a in audits)
            _insert(cur, "deliveries", QUEUE_COLUMNS, _QUEUE_MARKS, queued)
            if queued:
                # Sent at COMMIT: the replica delivering for these
                # connectors reads its queue at once, not at its next poll.
                routed = sorted({str(row[1]) for row in queued})
                cur.execute("SELECT pg_notify(%s, %s)", (NOTIFY_CHANNEL, ",".join(routed)))
            _insert(cur, "audit_log", AUDIT_COLUMNS, _AUDIT_MARKS, trail)
            for sql, params, _ in ops:
                cur.execute(sql, params)  # type: ignore[arg-type]
        return results

    def _store_messages(
        self, cur: psycopg.Cursor[Any], envelopes: list[Envelope]
    ) -> list[StoreResult]:
        """Insert a batch; a message whose key another (possibly concurrent)
        transaction stored within the window is a duplicate of that one."""
        pod = self.pod
        dedup = self.dedup_window > 0
        results: list[StoreResult | None] = [None] * len(envelopes)
        keys: list[int | None] = [
            dedup_key(e.sha256) if dedup else None
            for e in envelopes
        ]
        # A resend within the batch: settled after its first occurrence.
        first: dict[tuple[str, str, str, str], int] = {}
        todo: list[int] = []
        for i, e in enumerate(envelopes):
            if dedup:
                same = (e.sending_app, e.sending_fac, e.control_id, e.sha256)
                if same in first:
                    continue
                first[same] = i
            todo.append(i)
        since = self._wall_clock() - self.dedup_window
        for _ in range(DEDUP_ROUNDS):
            if not todo:
                break
            # In key order: two replicas inserting overlapping batches take
            # the unique index's entries in the same order, so neither waits
            # for the other in a cycle.
            todo.sort(key=lambda i: (keys[i] is None, keys[i] or 0))
            rows = [_message_row(envelopes[i], keys[i], pod) for i in todo]
            inserted = {
                mid for (mid,) in _insert(
                    cur, "messages", _MESSAGE_COLUMNS, _MESSAGE_MARKS, rows,
                    " ON CONFLICT (dedup_key) DO NOTHING RETURNING message_id",
                )
            }
            clashes: list[int] = []
            for i in todo:
                if envelopes[i].message_id in inserted:
                    results[i] = StoreResult(envelopes[i].message_id, False)
                else:
                    clashes.append(i)
            todo = []
            if not clashes:
                break
            cur.execute(
                "SELECT dedup_key, message_id, received_at, sending_app, sending_fac,"
                " control_id, sha256 FROM messages WHERE dedup_key = ANY(%s)",
                ([keys[i] for i in clashes],),
            )
            holders = {row[0]: row[1:] for row in cur.fetchall()}
            retire: list[str] = []
            for i in clashes:
                e = envelopes[i]
                held = holders.get(keys[i])
                if held is None:
                    todo.append(i)  # its holder was retired meanwhile: insert again
                    continue
                mid, received_at, app, fac, control_id, sha = held
                if (app, fac, control_id, sha) == (e.sending_app, e.sending_fac, e.control_id, e.sha256) \
                        and received_at >= since:
                    results[i] = StoreResult(mid, True)
                else:
                    # Past the window, or another message with the same
                    # 64-bit key: the older row gives up its key.
                    retire.append(mid)
                    todo.append(i)
            if retire:
                cur.execute(
                    "UPDATE messages SET dedup_key = NULL WHERE message_id = ANY(%s)", (retire,)
                )
        if todo:
            raise OutboxError("could not settle duplicate keys; try again")
        for i, e in enumerate(envelopes):
            if results[i] is None:
                original = results[first[(e.sending_app, e.sending_fac, e.control_id, e.sha256)]]
                assert original is not None
                results[i] = StoreResult(original.message_id, True)
        return [r for r in results if r is not None]

    def _prune(self) -> int:
        now = self._wall_clock()
        interval = prune_interval(self.retention)
        with self._writer.use() as conn:
            with conn.transaction():
                # Once per interval for the whole cluster: the replica that
                # finds the sweep due claims it; the others skip it.
                claimed = conn.execute(
                    "UPDATE cluster_state SET pruned_at = %s"
                    " WHERE id = 1 AND pruned_at <= %s RETURNING id",
                    (now, now - interval * 0.9),
                ).fetchone()
            if claimed is None:
                return 0
            params = {"cutoff": now - self.retention, "batch": PRUNE_BATCH}
            deleted = 0
            while True:
                with conn.transaction():
                    n = conn.execute(_PRUNE_MESSAGES, params).rowcount  # type: ignore[arg-type]
                    audited = conn.execute(_PRUNE_AUDIT, params).rowcount  # type: ignore[arg-type]
                deleted += n
                if n < PRUNE_BATCH and audited < PRUNE_BATCH:
                    return deleted

    # -- reader thread -----------------------------------------------------

    def _fetch(
        self, connector: str, after: int, limit: int,
        skip_lanes: Collection[int], skip_seqs: Collection[int],
    ) -> list[QueuedDelivery]:
        params = {
            "connector": connector, "limit": limit,
            "lanes": list(skip_lanes), "seqs": list(skip_seqs),
        }
        with self._reader.use() as conn:
            rows = conn.execute(_FETCH, params).fetchall()
        return [QueuedDelivery(*row) for row in rows]

    def _read_counts(self) -> tuple[Backlog, dict[str, QueueDepth]]:
        now = self._wall_clock()
        with self._reader.use() as conn, conn.transaction():
            # Counted once per interval for the whole cluster: the replica
            # that locks the row when a count is due counts; the others
            # read what it stored last.
            row = conn.execute(
                "SELECT messages, size, depths, counted_at FROM cluster_state"
                " WHERE id = 1 FOR UPDATE SKIP LOCKED"
            ).fetchone()
            if row is None or row[3] > now - BACKLOG_INTERVAL * 0.9:
                if row is None:
                    row = conn.execute(
                        "SELECT messages, size, depths, counted_at FROM cluster_state WHERE id = 1"
                    ).fetchone()
                assert row is not None
                messages, size, depths = int(row[0]), int(row[1]), row[2]
            else:
                counted = conn.execute(BACKLOG).fetchone()
                assert counted is not None
                messages, size = int(counted[0]), int(counted[1])
                depths = [list(r) for r in conn.execute(QUEUE_DEPTHS).fetchall()]
                conn.execute(
                    "UPDATE cluster_state SET messages = %s, size = %s, depths = %s,"
                    " counted_at = %s WHERE id = 1",
                    (messages, size, json.dumps(depths), now),
                )
        return Backlog(messages, size), depths_from([tuple(r) for r in depths])  # type: ignore[misc]

    # -- closing -----------------------------------------------------------

    def _shut(self) -> Deferred[None]:
        if self._watchdog.running:
            self._watchdog.stop()
        self._notices.stop()
        if not self._pool.started:
            self._writer.close()
            self._reader.close()
            return succeed(None)
        d = deferToThreadPool(self._reactor, self._pool, self._writer.close)
        reader_pool = self._reader_pool

        def close_reader(_: object) -> Deferred[None] | None:
            if not reader_pool.started:
                self._reader.close()
                return None
            closing = deferToThreadPool(self._reactor, reader_pool, self._reader.close)
            return closing.addBoth(lambda _: reader_pool.stop())

        return d.addBoth(close_reader).addBoth(lambda _: None)
