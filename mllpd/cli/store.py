"""mllp-cli's view of the outbox: queue statistics, messages, replay, delete
and purge, on plain sqlite3 while the server keeps writing.

Reads are short WAL read transactions, which never block the server's
writer. Writes take the write lock at once (``BEGIN IMMEDIATE``) and wait up
to the busy timeout for the server's current group commit to finish, so a
change is either made whole or not at all. Business methods take ``now``
(unix seconds) as an argument.
"""

from __future__ import annotations

import os
import re
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from mllpd.cli.fields import field_names
from mllpd.config import parse_boolean
from mllpd.hl7 import DecodeError, NotHL7Error, codec_for_charset, parse_message
from mllpd.outbox import OutboxError
from mllpd.outbox.sqlite import schema_files

__all__ = [
    "STATES",
    "ConnectorStats",
    "Delivery",
    "FieldView",
    "MessageDetail",
    "MessageRow",
    "SegmentView",
    "Store",
    "StoreError",
    "PostgresStore",
    "decode_payload",
    "default_db_path",
    "open_store",
    "render_segments",
]

STATES = ("pending", "in_flight", "delivered", "dead")
# Bytes of each payload read for a list preview.
PREVIEW_BYTES = 1024
PREVIEW_CHARS = 80
PREVIEW_SEGMENTS = 3
# Queue rows changed per transaction by a purge or a replay.
PURGE_BATCH = 500
REPLAY_BATCH = 500
# Between batches the write lock stays free PACE_FACTOR times as long as a
# batch held it, and at least MIN_PACE seconds.
PACE_FACTOR = 1.0
MIN_PACE = 0.002

_SEGMENT_SPLIT = re.compile(r"\r\n|\r|\n")


class StoreError(Exception):
    """The outbox cannot be opened or changed; the text is one line."""


def default_db_path(environ: dict[str, str] | None = None) -> str:
    """Where the server keeps its outbox: ``$MLLP_DB_PATH`` or ``outbox.db``."""
    env = os.environ if environ is None else environ
    return env.get("MLLP_DB_PATH") or "outbox.db"


def open_store(
    path: str | None = None, url: str | None = None, environ: dict[str, str] | None = None,
) -> Store:
    """The outbox the server uses: PostgreSQL when a URL is given (or
    ``$MLLP_DB_URL`` is set and no path is given), else the SQLite file."""
    env = os.environ if environ is None else environ
    if url is None and path is None:
        url = env.get("MLLP_DB_URL") or None
    if url:
        from mllpd.outbox.postgres import outbox_url

        # The server's policy for the same database: verify-full unless local
        # or MLLP_DB_INSECURE=true accepts a weaker sslmode in the URL.
        try:
            insecure = parse_boolean(env.get("MLLP_DB_INSECURE", ""))
        except ValueError as e:
            raise StoreError(f"MLLP_DB_INSECURE: {e}") from None
        try:
            url = outbox_url(url, env, insecure)
        except ValueError as e:
            raise StoreError(f"MLLP_DB_URL: {e}") from None
        return PostgresStore(url)
    return Store(path or default_db_path(environ))


@dataclass(frozen=True)
class ConnectorStats:
    connector: str
    pending: int = 0
    in_flight: int = 0
    delivered: int = 0
    dead: int = 0
    # Seconds since the oldest message still queued (pending or in flight)
    # was received; None when the queue is empty.
    oldest_pending_age: float | None = None
    # Order keys (lanes) whose next message waits out a retry backoff; each
    # in-flight row is one lane in flight.
    retrying: int = 0


@dataclass(frozen=True)
class AuditRow:
    """One audit record: a received message and what was decided about it."""

    id: int | None  # None for a stored message (PostgreSQL keeps its record in its row)
    received_at: float
    peer: str
    client_subject: str | None
    pod: str | None
    message_id: str | None
    control_id: str
    msg_type: str
    size: int
    sha256: str
    ack_code: str
    rule: str | None
    connectors: str
    batch_control_id: str | None = None  # BHS-11, when it came in an HL7 batch


@dataclass(frozen=True)
class MessageRow:
    """One queue entry: a message as routed to one connector."""

    seq: int
    message_id: str
    connector: str
    state: str
    msg_type: str
    control_id: str
    size: int
    received_at: float
    age: float
    attempts: int
    last_error: str | None
    updated_at: float
    preview: str


@dataclass(frozen=True)
class Delivery:
    seq: int
    connector: str
    state: str
    attempts: int
    last_error: str | None
    next_attempt: float
    updated_at: float


@dataclass(frozen=True)
class FieldView:
    ref: str            # "PID-5"
    name: str | None    # "patient_name", None when hl7apy has no name
    value: str          # as received (ER7, escapes not resolved)

    def label(self) -> str:
        return f"{self.ref} ({self.name})" if self.name else self.ref


@dataclass(frozen=True)
class SegmentView:
    text: str
    fields: list[FieldView]

    @property
    def name(self) -> str:
        return self.text[:3]


@dataclass(frozen=True)
class MessageDetail:
    message_id: str
    received_at: float
    peer: str
    control_id: str
    msg_type: str
    sending_app: str
    sending_fac: str
    version: str
    charset: str | None
    size: int
    sha256: str
    ack_code: str
    payload: bytes
    deliveries: list[Delivery] = field(default_factory=list)
    # BHS-11 and 1-based position, when it came in an HL7 batch.
    batch_control_id: str | None = None
    batch_position: int | None = None

    @property
    def text(self) -> str:
        return decode_payload(self.payload, self.charset)

    def segments(self) -> list[SegmentView]:
        return render_segments(self.text, self.version)


def decode_payload(payload: bytes, charset: str | None) -> str:
    """The payload as text in its character set (MSH-18 or the default the
    server used); undecodable bytes are shown as U+FFFD, never refused."""
    try:
        return parse_message(payload, default_charset=charset).text
    except (DecodeError, NotHL7Error):
        pass
    codec = (codec_for_charset(charset) if charset else None) or "iso8859-1"
    return payload.decode(codec, errors="replace")


def render_segments(text: str, version: str) -> list[SegmentView]:
    """Each segment with its non-empty fields named from hl7apy's tables."""
    lines = [s for s in _SEGMENT_SPLIT.split(text) if s.strip()]
    if not lines:
        return []
    field_sep = lines[0][3:4] if lines[0].startswith("MSH") else "|"
    views: list[SegmentView] = []
    for line in lines:
        name = line[:3]
        names = field_names(name, version)
        parts = line.split(field_sep) if field_sep else [line]
        values: list[tuple[int, str]]
        if name == "MSH" and len(parts) > 1:
            # MSH-1 is the separator itself, so MSH-n is parts[n - 1].
            values = [(1, field_sep)] + [(i + 1, v) for i, v in enumerate(parts) if i >= 1]
        else:
            values = [(i, v) for i, v in enumerate(parts) if i >= 1]
        fields = [
            FieldView(f"{name}-{n}", names.get(n), value) for n, value in values if value
        ]
        views.append(SegmentView(line, fields))
    return views


def _preview(head: bytes, charset: str | None) -> str:
    """The first segments after MSH (type and control id have their own
    columns), joined and cut to PREVIEW_CHARS."""
    codec = (codec_for_charset(charset) if charset else None) or "iso8859-1"
    try:
        text = parse_message(head, default_charset=charset).text
    except (DecodeError, NotHL7Error):
        text = head.decode(codec, errors="replace")
    segments = [s for s in _SEGMENT_SPLIT.split(text) if s.strip()]
    if len(segments) > 1 and segments[0].startswith("MSH"):
        segments = segments[1:]
    joined = " ⏎ ".join(segments[:PREVIEW_SEGMENTS])
    if len(joined) > PREVIEW_CHARS:
        joined = joined[: PREVIEW_CHARS - 1] + "…"
    return joined


class Store:
    """The outbox file, at the schema version this mllpd writes; never migrated.

    A file the server has not created yet is refused rather than created, so
    a mistyped path does not silently show an empty outbox.
    """

    # Where audit records are: (table, id, rule, arrival order) of each.
    _AUDIT_SOURCES: tuple[tuple[str, str, str, str], ...] = (
        ("messages", "id", "NULL", "id"), ("audit_log", "id", "rule", "id"),
    )

    def __init__(
        self,
        path: str,
        *,
        busy_timeout: float = 10.0,
        sleep: Callable[[float], None] = time.sleep,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sleep = sleep
        self._monotonic = monotonic
        if path == ":memory:":
            raise StoreError("an in-memory outbox lives only inside the server process")
        if not os.path.exists(path):
            raise StoreError(f"no outbox at {path} (set --db or MLLP_DB_PATH)")
        self.path = path
        try:
            self._conn = self._open(path, busy_timeout)
        except (OutboxError, sqlite3.Error) as e:
            raise StoreError(str(e)) from None

    @staticmethod
    def _open(path: str, busy_timeout: float) -> sqlite3.Connection:
        # Read/write, never migrated from here: a newer mllp-cli must not
        # change the schema under an older server that is running on it
        # (the server migrates its own file when it starts).
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        newest = schema_files("sqlite")[-1][0]
        try:
            current = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()[0] or 0
        except sqlite3.OperationalError:
            current = 0
        if current > newest:
            conn.close()
            raise StoreError(
                f"outbox schema version {current} is newer than this mllpd knows "
                f"({newest}); use the mllp-cli of the mllpd that wrote it"
            )
        if current < newest:
            conn.close()
            raise StoreError(
                f"outbox schema version {current} is older than this mllp-cli needs ({newest}); "
                "it does not migrate the outbox: use the mllp-cli of the running mllpd, "
                "or start this version's mllpd, which migrates it"
            )
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA synchronous = FULL")
        return conn

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """One snapshot for several SELECTs."""
        conn = self._conn
        try:
            conn.execute("BEGIN")
            try:
                yield conn
            finally:
                if conn.in_transaction:
                    conn.execute("COMMIT")
        except sqlite3.Error as e:
            raise StoreError(f"cannot read outbox {self.path}: {e}") from None

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        conn = self._conn
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as e:
            raise StoreError(f"outbox {self.path} is busy: {e}") from None
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException as e:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if isinstance(e, sqlite3.Error):
                raise StoreError(f"cannot change outbox {self.path}: {e}") from None
            raise

    # -- reading -----------------------------------------------------------

    def stats(self, now: float) -> list[ConnectorStats]:
        """Per connector (every connector with a queue row), sorted by name."""
        counts: dict[str, dict[str, int]] = {}
        oldest: dict[str, float] = {}
        with self._read() as conn:
            for connector, state, n in conn.execute(
                "SELECT connector, state, COUNT(*) FROM deliveries GROUP BY connector, state"
            ):
                counts.setdefault(connector, {})[state] = n
            for connector, received_at in conn.execute(
                "SELECT d.connector, MIN(m.received_at) FROM deliveries d"
                " JOIN messages m ON m.message_id = d.message_id"
                " WHERE d.state IN ('pending', 'in_flight') GROUP BY d.connector"
            ):
                oldest[connector] = received_at
            retrying = dict(conn.execute(
                "SELECT connector, COUNT(DISTINCT lane) FROM deliveries"
                " WHERE state = 'pending' AND attempts > 0 GROUP BY connector"
            ).fetchall())
        return [
            ConnectorStats(
                connector,
                pending=c.get("pending", 0),
                in_flight=c.get("in_flight", 0),
                delivered=c.get("delivered", 0),
                dead=c.get("dead", 0),
                oldest_pending_age=(
                    max(0.0, now - oldest[connector]) if connector in oldest else None
                ),
                retrying=retrying.get(connector, 0),
            )
            for connector, c in sorted(counts.items())
        ]

    def messages(
        self,
        now: float,
        *,
        connector: str | None = None,
        state: str | None = None,
        limit: int = 50,
    ) -> list[MessageRow]:
        """Queue entries, filtered. Queues (pending, in flight, dead) are in
        delivery order, head first; delivered and unfiltered lists newest first.
        """
        if state is not None and state not in STATES:
            raise StoreError(f"unknown state {state!r}; expected one of {', '.join(STATES)}")
        where: list[str] = []
        params: list[object] = []
        if connector is not None:
            where.append("d.connector = ?")
            params.append(connector)
        if state is not None:
            where.append("d.state = ?")
            params.append(state)
        order = "ASC" if state in ("pending", "in_flight", "dead") else "DESC"
        sql = (
            "SELECT d.seq, d.message_id, d.connector, d.state, m.msg_type, m.control_id,"
            " m.size, m.received_at, d.attempts, d.last_error, d.updated_at, m.charset,"
            f" substr(m.payload, 1, {PREVIEW_BYTES})"
            " FROM deliveries d JOIN messages m ON m.message_id = d.message_id"
            + (" WHERE " + " AND ".join(where) if where else "")
            + f" ORDER BY d.seq {order} LIMIT ?"
        )
        params.append(max(0, limit))
        with self._read() as conn:
            rows = conn.execute(sql, params).fetchall()
        return [
            MessageRow(
                seq=seq, message_id=mid, connector=conn_name, state=st, msg_type=mtype,
                control_id=cid, size=size, received_at=received, age=max(0.0, now - received),
                attempts=attempts, last_error=error, updated_at=updated,
                preview=_preview(bytes(head), charset),
            )
            for (seq, mid, conn_name, st, mtype, cid, size, received, attempts, error,
                 updated, charset, head) in rows
        ]

    def message(self, message_id: str) -> MessageDetail | None:
        """One stored message with its queue entries, or None."""
        with self._read() as conn:
            row = conn.execute(
                "SELECT message_id, received_at, peer, control_id, msg_type, sending_app,"
                " sending_fac, version, charset, size, sha256, ack_code, payload,"
                " batch_control_id, batch_position FROM messages WHERE message_id = ?",
                (message_id,),
            ).fetchone()
            if row is None:
                return None
            deliveries = [
                Delivery(*d)
                for d in conn.execute(
                    "SELECT seq, connector, state, attempts, last_error, next_attempt,"
                    " updated_at FROM deliveries WHERE message_id = ? ORDER BY connector",
                    (message_id,),
                )
            ]
        (mid, received_at, peer, control_id, msg_type, sending_app, sending_fac, version,
         charset, size, sha256, ack_code, payload, batch_control_id, batch_position) = row
        return MessageDetail(
            mid, received_at, peer, control_id, msg_type, sending_app, sending_fac, version,
            charset, size, sha256, ack_code, bytes(payload), deliveries,
            batch_control_id, batch_position,
        )

    def audit(
        self,
        *,
        limit: int = 50,
        control_id: str | None = None,
        ack_code: str | None = None,
        peer: str | None = None,
        since: float | None = None,
    ) -> list[AuditRow]:
        """Audit records, newest first, optionally only those matching.

        A stored message's record is its row in ``messages``; the others
        are in ``audit_log``. Each is read newest first (by id, which is
        arrival order) and the two are merged.
        """
        where: list[str] = ["1 = 1"]
        params: list[object] = []
        for column, value in (("control_id", control_id), ("ack_code", ack_code), ("peer", peer)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        if since is not None:
            where.append("received_at >= ?")
            params.append(since)
        condition = " AND ".join(where)
        found: list[AuditRow] = []
        with self._read() as conn:
            for source, id_, rule, order in self._AUDIT_SOURCES:
                found.extend(
                    AuditRow(*row) for row in conn.execute(
                        f"SELECT {id_}, received_at, peer, client_subject, pod, message_id,"
                        f" control_id, msg_type, size, sha256, ack_code, {rule}, connectors,"
                        " batch_control_id"
                        f" FROM {source} WHERE {condition} ORDER BY {order} DESC LIMIT ?",
                        (*params, limit),
                    )
                )
        found.sort(key=lambda row: row.received_at, reverse=True)
        return found[:limit]

    def dead_letters(self, connector: str) -> list[str]:
        """Message ids in a connector's dead-letter queue, oldest first."""
        with self._read() as conn:
            return [
                mid for (mid,) in conn.execute(
                    "SELECT message_id FROM deliveries WHERE connector = ? AND state = 'dead'"
                    " ORDER BY seq",
                    (connector,),
                )
            ]

    def count(self, connector: str, state: str, *, updated_before: float | None = None) -> int:
        """Queue rows of a connector in a state (last changed before a time)."""
        sql = "SELECT COUNT(*) FROM deliveries WHERE connector = ? AND state = ?"
        params: list[object] = [connector, state]
        if updated_before is not None:
            sql += " AND updated_at < ?"
            params.append(updated_before)
        with self._read() as conn:
            return int(conn.execute(sql, params).fetchone()[0])

    # -- changing ----------------------------------------------------------

    def replay(
        self, connector: str, message_ids: Sequence[str] | None, now: float
    ) -> list[str]:
        """Put dead letters of ``connector`` back at the tail of its queue.

        Each dead row is deleted and a new pending row (attempts 0, a new
        seq) inserted in the same transaction, so a delivery worker sees the
        message either dead or queued, never both or neither; old queue
        order is kept. ``None`` replays every dead letter there is now.
        Returns the ids re-queued, in queue order; ids that are not dead
        letters of the connector are left alone.
        """
        with self._read() as conn:
            if message_ids is None:
                rows = conn.execute(
                    "SELECT seq, message_id, lane FROM deliveries"
                    " WHERE connector = ? AND state = 'dead' ORDER BY seq",
                    (connector,),
                ).fetchall()
            else:
                rows = []
                for mid in dict.fromkeys(message_ids):
                    rows.extend(conn.execute(
                        "SELECT seq, message_id, lane FROM deliveries"
                        " WHERE connector = ? AND state = 'dead' AND message_id = ?",
                        (connector, mid),
                    ))
                rows.sort()
        done: list[str] = []
        # Batches keep each write transaction short while the server runs;
        # the state is checked again under the write lock.
        started: float | None = None
        for i in range(0, len(rows), REPLAY_BATCH):
            if started is not None:
                self._pace(started)
            started = self._monotonic()
            with self._write() as conn:
                moved: list[str] = []
                for seq, mid, lane in rows[i : i + REPLAY_BATCH]:
                    gone = conn.execute(
                        "DELETE FROM deliveries WHERE seq = ? AND state = 'dead'", (seq,)
                    )
                    if gone.rowcount:
                        # Same lane: a replayed message stays in order with
                        # the rest of its order key.
                        conn.execute(
                            "INSERT INTO deliveries (message_id, connector, state, attempts,"
                            " last_error, next_attempt, updated_at, lane)"
                            " VALUES (?, ?, 'pending', 0, NULL, 0, ?, ?)",
                            (mid, connector, now, lane),
                        )
                        moved.append(mid)
            done.extend(moved)
        return done

    def _pace(self, batch_started: float) -> None:
        """Leave the write lock free for a while after a batch.

        The server waits for a busy lock in SQLite's busy handler, which
        sleeps in steps of up to 100 ms; a loop that takes the lock again at
        once would win every time and hold the server's ACKs back for the
        whole purge. Left free as long as it was held (PACE_FACTOR), the
        lock is taken by a waiting commit within a step or two.
        """
        held = self._monotonic() - batch_started
        self._sleep(max(held * PACE_FACTOR, MIN_PACE))

    def delete(self, message_id: str) -> bool:
        """Remove a message and all its queue entries; its audit record stays.
        False when there is no such message."""
        with self._write() as conn:
            conn.execute("DELETE FROM deliveries WHERE message_id = ?", (message_id,))
            _keep_audit(conn, "message_id = ?", (message_id,))
            gone = conn.execute("DELETE FROM messages WHERE message_id = ?", (message_id,))
            return gone.rowcount > 0

    def purge_dead(self, connector: str) -> int:
        """Drop a connector's dead-letter queue; returns how many rows went."""
        return self._purge(
            "connector = ? AND state = 'dead'", (connector,)
        )

    def purge_delivered(self, connector: str, before: float) -> int:
        """Drop a connector's delivered rows last changed before ``before``."""
        return self._purge(
            "connector = ? AND state = 'delivered' AND updated_at < ?", (connector, before)
        )

    def _purge(self, condition: str, params: tuple[object, ...]) -> int:
        # Batches of PURGE_BATCH rows, each its own short transaction: the
        # server's group commits get the write lock between them instead of
        # waiting (and holding back ACKs) for one long delete.
        #
        # A message whose last queue entry goes is deleted too: nothing will
        # ever deliver it again, and its content should not outlive its
        # purpose. Messages never routed anywhere have no entries and are not
        # touched; audit records always stay.
        removed = 0
        started: float | None = None
        for _ in range(1_000_000_000):
            if started is not None:
                self._pace(started)
            started = self._monotonic()
            with self._write() as conn:
                rows = conn.execute(
                    f"SELECT seq, message_id FROM deliveries WHERE {condition}"
                    " ORDER BY seq LIMIT ?",
                    (*params, PURGE_BATCH),
                ).fetchall()
                if not rows:
                    break
                seq_marks = ", ".join("?" * len(rows))
                conn.execute(
                    f"DELETE FROM deliveries WHERE seq IN ({seq_marks})", [r[0] for r in rows]
                )
                ids = sorted({r[1] for r in rows})
                id_marks = ", ".join("?" * len(ids))
                orphaned = (
                    f"message_id IN ({id_marks}) AND NOT EXISTS (SELECT 1 FROM deliveries d"
                    " WHERE d.message_id = messages.message_id)"
                )
                _keep_audit(conn, orphaned, ids)
                conn.execute(
                    f"DELETE FROM messages WHERE message_id IN ({id_marks})"
                    " AND NOT EXISTS (SELECT 1 FROM deliveries d"
                    " WHERE d.message_id = messages.message_id)",
                    ids,
                )
            removed += len(rows)
        return removed


def _keep_audit(conn: sqlite3.Connection, condition: str, params: Sequence[object]) -> None:
    """Move the audit records of the messages about to be deleted into
    ``audit_log``: a stored message's record is part of its row, and audit
    records outlive a deletion."""
    conn.execute(
        "INSERT INTO audit_log (received_at, peer, client_subject, pod, message_id,"
        " control_id, msg_type, size, sha256, ack_code, rule, connectors, batch_control_id)"
        " SELECT received_at, peer, client_subject, pod, message_id, control_id, msg_type,"
        f" size, sha256, ack_code, NULL, connectors, batch_control_id FROM messages"
        f" WHERE {condition}",
        params,
    )


class _Dialect:
    """A psycopg connection that takes the SQLite-style ``?`` placeholders
    the shared queries are written with."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    def execute(self, sql: str, params: Sequence[object] = ()) -> Any:
        return self.conn.execute(sql.replace("?", "%s"), params)


class PostgresStore(Store):
    """The PostgreSQL outbox of a cluster (``MLLP_DB_URL``), with the same
    queries. Reads and writes are short transactions; row locks, not a
    database-wide write lock, so the replicas keep committing meanwhile."""

    # A stored message's row has no id of its own; its arrival time orders it.
    _AUDIT_SOURCES = (
        ("messages", "NULL::bigint", "NULL::text", "received_at"),
        ("audit_log", "id", "rule", "id"),
    )

    def __init__(
        self,
        url: str,
        *,
        sleep: Callable[[float], None] = time.sleep,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        import psycopg

        from mllpd.outbox.postgres import connect, server_name

        self._sleep = sleep
        self._monotonic = monotonic
        self.path = server_name(url)
        self._errors: tuple[type[BaseException], ...] = (psycopg.Error,)
        try:
            conn = connect(url, "mllp-cli")
        except psycopg.Error as e:
            raise StoreError(f"cannot connect to outbox {self.path}: {_describe(e)}") from None
        # Never migrated from here, as the SQLite file: the replicas migrate
        # the database when they start.
        newest = schema_files("postgres")[-1][0]
        try:
            row = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
            current = (row[0] if row else None) or 0
        except psycopg.errors.UndefinedTable:
            current = 0
        except psycopg.Error as e:
            conn.close()
            raise StoreError(f"cannot open outbox {self.path}: {_describe(e)}") from None
        if current != newest:
            conn.close()
            if current == 0:
                raise StoreError(f"no outbox in {self.path} (start mllpd with MLLP_DB_URL first)")
            raise StoreError(
                f"outbox schema version {current} in {self.path}, this mllp-cli knows {newest};"
                " use the mllp-cli of the running mllpd"
            )
        self._pg = conn
        self._conn = _Dialect(conn)  # type: ignore[assignment]

    def close(self) -> None:
        self._pg.close()

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._transaction("read") as conn:
            yield conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._transaction("change") as conn:
            yield conn

    @contextmanager
    def _transaction(self, verb: str) -> Iterator[sqlite3.Connection]:
        """One transaction (reads and writes alike); a database error is a
        StoreError saying what could not be done."""
        try:
            with self._pg.transaction():
                yield self._conn
        except self._errors as e:
            raise StoreError(f"cannot {verb} outbox {self.path}: {_describe(e)}") from None


def _describe(e: BaseException) -> str:
    from mllpd.outbox.postgres import describe_error

    return describe_error(e)
