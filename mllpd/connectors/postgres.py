"""The ``postgres`` connector: insert each message into a table.

psycopg 3 runs on a thread pool of one thread, which owns the connection;
the reactor never blocks. With ``lanes: N`` the deliveries that arrive while
a transaction runs go together in the next one (one round trip and one
commit for up to N messages). The table is created if absent. The insert is
idempotent on the message id (``ON CONFLICT (message_id) DO NOTHING``), so a
redelivery after a crash leaves one row.

Outcomes: a value this one message carries that the table refuses (SQLSTATE
class 22, data exception, e.g. a NUL in a text column or a value longer than
a column the operator narrowed; or 23514, a CHECK constraint) is ``Dead``:
trying it again cannot succeed, and holding it would stall the queue. Every
other error (connection refused or lost, timeouts, a missing table or
column, permissions, a table without a unique message_id) is ``Retry``: it
affects every message alike and is fixed on the server side, after which
the queue drains in order. After any retried error the connection is closed
and the next attempt reconnects (and ensures the table again).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, NamedTuple

import psycopg
from psycopg import errors, sql
from psycopg.conninfo import conninfo_to_dict
from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

# One wording of database errors for the outbox and this connector: no
# DETAIL (PHI) ever reaches a log line or a queue row.
from mllpd.outbox.postgres import close_quietly, describe_error, transport

from . import ConnectorSpec, Dead, Delivered, Delivery, IConnector, Outcome, Retry
from ._common import (
    CurrentDelivery,
    bool_option,
    check_keys,
    duration_option,
    expand_env,
    option_error,
    string_option,
    warn_plaintext,
    warn_unverified,
)

__all__ = ["PostgresConnector", "build", "describe_error"]

_OPTIONS = ("dsn", "dsn_env", "table", "timeout", "insecure")
_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]{0,62}")

_CREATE = """\
CREATE TABLE IF NOT EXISTS {table} (
    message_id   text PRIMARY KEY,
    received_at  timestamptz,
    delivered_at timestamptz NOT NULL DEFAULT now(),
    control_id   text NOT NULL,
    msg_type     text NOT NULL,
    charset      text,
    codec        text NOT NULL,
    size         integer NOT NULL,
    payload      bytea NOT NULL
)"""
_INSERT = """\
INSERT INTO {table}
    (message_id, received_at, control_id, msg_type, charset, codec, size, payload)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (message_id) DO NOTHING"""


def _is_dead(exc: psycopg.Error) -> bool:
    if isinstance(exc, psycopg.DataError):
        return True
    return isinstance(exc, errors.CheckViolation)


class _Result(NamedTuple):
    outcome: Outcome
    connected: bool  # this attempt opened a new connection


@implementer(IConnector)
class PostgresConnector:
    """Inserts deliveries into one table over one connection, batched."""

    log = Logger()

    def __init__(
        self,
        name: str,
        conninfo: str,
        table: tuple[str, ...],
        timeout: float,
        reactor: Any,
    ) -> None:
        self.name = name
        self.table = ".".join(table)
        self.timeout = timeout
        self._conninfo = conninfo
        self._connect_args = _connect_args(conninfo, name, timeout)
        params = conninfo_to_dict(conninfo)
        self._statement_timeout = "statement_timeout" not in str(params.get("options") or "")
        # Where, for logs: never the password or the whole DSN.
        self.server = "{}:{}/{}".format(
            params.get("host") or params.get("hostaddr") or "local",
            params.get("port") or "5432",
            params.get("dbname") or params.get("user") or "",
        )
        identifier = sql.Identifier(*table)
        self._create = sql.SQL(_CREATE).format(table=identifier)
        self._insert = sql.SQL(_INSERT).format(table=identifier)
        self._insert_returning = sql.SQL(_INSERT + "\nRETURNING message_id").format(
            table=identifier
        )
        self._reactor = reactor
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name=f"mllpd-postgres-{name}")
        self._conn: psycopg.Connection[Any] | None = None  # used on the pool thread only
        self._current = CurrentDelivery()
        # Deliveries waiting for the transaction in progress to end.
        self._waiting: list[tuple[Delivery, Deferred[Outcome]]] = []
        self._writing = False
        self._stopping = False
        self._up: bool | None = None
        self._shutdown_trigger: Any = None

    # -- reactor thread ---------------------------------------------------

    def start(self) -> None:
        self._pool.start()
        # Pool threads are not daemons: if the reactor stops without stop()
        # having run, this keeps the process from hanging at exit.
        self._shutdown_trigger = self._reactor.addSystemEventTrigger(
            "after", "shutdown", self._stop_pool
        )
        # Connect (and create the table) now, so a bad DSN or a missing
        # server shows in the log at startup rather than at the first message.
        d = deferToThreadPool(self._reactor, self._pool, self._connect_now)
        d.addCallbacks(self._note, self._unexpected)

    def deliver(self, delivery: Delivery) -> Deferred[Outcome]:
        if self._stopping:
            return succeed(Retry("connector is stopping"))
        d: Deferred[Outcome] = Deferred()
        self._waiting.append((delivery, d))
        if not self._writing:
            # At the end of this reactor turn: every lane the relay starts
            # in the same turn shares the transaction.
            self._writing = True
            self._reactor.callLater(0, self._write_next)
        return self._current.track(d)

    def _write_next(self) -> None:
        batch, self._waiting = self._waiting, []
        if not batch:
            self._writing = False
            return
        d = deferToThreadPool(
            self._reactor, self._pool, self._store_batch, [item for item, _ in batch]
        )
        d.addBoth(self._written, batch)

    def _written(
        self, results: list[_Result] | Failure, batch: list[tuple[Delivery, Deferred[Outcome]]]
    ) -> None:
        # The next batch (deliveries that came meanwhile) goes first.
        self._write_next()
        for i, (_, d) in enumerate(batch):
            if isinstance(results, Failure):
                d.callback(self._unexpected(results))
            else:
                d.callback(self._note(results[i]))

    def stop(self) -> Deferred[None]:
        self._stopping = True
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        await self._current.finished()
        if self._pool.started:
            await deferToThreadPool(self._reactor, self._pool, self._close)
            self._stop_pool()

    def _stop_pool(self) -> None:
        if self._shutdown_trigger is not None:
            trigger, self._shutdown_trigger = self._shutdown_trigger, None
            try:
                self._reactor.removeSystemEventTrigger(trigger)
            except (ValueError, KeyError):
                pass  # already fired: the reactor is shutting down
        if self._pool.started:
            self._pool.stop()

    def _note(self, result: _Result) -> Outcome:
        outcome = result.outcome
        if result.connected:
            self._up = True
            self.log.info(
                "connector {connector} (postgres) connected to {server}, table {table}",
                event="upstream_connected", connector=self.name, server=self.server,
                table=self.table,
            )
        if isinstance(outcome, Retry):
            if self._up is not False:
                # Once per outage, not once per retry.
                self.log.warn(
                    "connector {connector} (postgres): {server} unavailable: {reason}",
                    event="upstream_unreachable", connector=self.name, server=self.server,
                    reason=outcome.reason,
                )
            self._up = False
        elif isinstance(outcome, Dead):
            self.log.warn(
                "connector {connector} (postgres): message refused by the table: {reason}",
                event="delivery_dead", connector=self.name, reason=outcome.reason,
            )
        return outcome

    def _unexpected(self, failure: Failure) -> Outcome:
        self.log.failure(
            "connector {connector} (postgres): unexpected error", failure,
            event="delivery_error", connector=self.name,
        )
        return Retry(describe_error(failure.value))

    # -- pool thread ------------------------------------------------------

    def _connection(self) -> tuple[psycopg.Connection[Any], bool]:
        if self._conn is not None and not self._conn.closed:
            return self._conn, False
        conn = psycopg.connect(self._conninfo, autocommit=True, **self._connect_args)
        try:
            if self._statement_timeout:
                # A server that stops answering must not hold the queue forever.
                conn.execute(
                    "SELECT set_config('statement_timeout', %s, false)",
                    (f"{int(self.timeout * 1000)}ms",),
                )
            conn.execute(self._create)
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return conn, True

    def _connect_now(self) -> _Result:
        try:
            _, connected = self._connection()
        except psycopg.Error as e:
            self._close()
            return _Result(Retry(describe_error(e)), False)
        return _Result(Delivered(), connected)

    def _store(self, delivery: Delivery) -> _Result:
        connected = False
        try:
            conn, connected = self._connection()
            cursor = conn.execute(self._insert, _row(delivery))
        except psycopg.Error as e:
            if _is_dead(e) and self._conn is not None and not self._conn.broken:
                return _Result(Dead(describe_error(e)), connected)
            self._close()
            return _Result(Retry(describe_error(e)), connected)
        detail = "inserted" if cursor.rowcount == 1 else "already stored"
        return _Result(Delivered(detail), connected)

    def _store_batch(self, deliveries: list[Delivery]) -> list[_Result]:
        """Several lanes' messages in one transaction; when it fails, each
        on its own, so that only a message the table refuses is Dead."""
        if len(deliveries) == 1:
            return [self._store(deliveries[0])]
        connected = False
        try:
            conn, connected = self._connection()
            with conn.transaction(), conn.cursor() as cursor:
                cursor.executemany(
                    self._insert_returning, [_row(d) for d in deliveries], returning=True
                )
                inserted = []
                while True:
                    inserted.append(cursor.fetchone() is not None)
                    if not cursor.nextset():
                        break
        except psycopg.Error:
            results = [self._store(d) for d in deliveries]
            if connected:
                results[0] = results[0]._replace(connected=True)
            return results
        return [
            _Result(Delivered("inserted" if new else "already stored"), connected and i == 0)
            for i, new in enumerate(inserted)
        ]

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        close_quietly(conn)


def _row(delivery: Delivery) -> tuple[object, ...]:
    received = (
        datetime.fromtimestamp(delivery.received_at, UTC)
        if delivery.received_at is not None else None
    )
    return (
        delivery.message_id, received, delivery.control_id, delivery.msg_type,
        delivery.charset, delivery.codec, len(delivery.payload), delivery.payload,
    )


def _connect_args(conninfo: str, name: str, timeout: float) -> dict[str, Any]:
    """Timeouts and a name for pg_stat_activity, unless the DSN sets them."""
    given = conninfo_to_dict(conninfo)
    defaults: dict[str, Any] = {
        "connect_timeout": max(1, round(timeout)),
        # A dead peer (no RST, e.g. a failed node) is noticed within the
        # timeout instead of the kernel's retransmission limit.
        "tcp_user_timeout": int(timeout * 1000),
        "keepalives": 1,
        "keepalives_idle": max(1, round(timeout)),
        "application_name": f"mllpd-{name}"[:63],
    }
    return {k: v for k, v in defaults.items() if k not in given}


def build(spec: ConnectorSpec, reactor: Any, environ: Mapping[str, str]) -> PostgresConnector:
    """Check a ``postgres`` connector's options and build it."""
    check_keys(spec, _OPTIONS)
    insecure = bool_option(spec, "insecure")
    conninfo = _transport(spec, _conninfo(spec, environ), environ, insecure)
    table = _table(spec)
    timeout = duration_option(spec, "timeout", "30s")
    return PostgresConnector(spec.name, conninfo, table, timeout, reactor)


def _conninfo(spec: ConnectorSpec, environ: Mapping[str, str]) -> str:
    has_dsn = spec.options.get("dsn") is not None
    has_env = spec.options.get("dsn_env") is not None
    if has_dsn == has_env:
        raise option_error(
            spec, "dsn_env",
            "set exactly one of dsn_env (the name of a variable holding the connection "
            "string) and dsn",
        )
    if has_env:
        variable = string_option(spec, "dsn_env")
        assert variable is not None
        value = environ.get(variable)
        if value is None:
            raise option_error(spec, "dsn_env", f"environment variable {variable} is not set")
        if not value.strip():
            raise option_error(spec, "dsn_env", f"environment variable {variable} is empty")
        where, conninfo = "dsn_env", value.strip()
        what = f"environment variable {variable}"
    else:
        text = string_option(spec, "dsn")
        assert text is not None
        where, conninfo = "dsn", expand_env(spec, "dsn", text, environ)
        what = "the value"
    try:
        conninfo_to_dict(conninfo)
    except psycopg.Error:
        # The DSN may hold a password: say where it is, not what it is.
        raise option_error(
            spec, where,
            f"{what} is not a PostgreSQL connection string "
            "(expected postgresql://user@host:port/db or 'host=... dbname=...')",
        ) from None
    return conninfo


def _transport(
    spec: ConnectorSpec, conninfo: str, environ: Mapping[str, str], insecure: bool
) -> str:
    """The conninfo under the policy of every PostgreSQL connection
    (:func:`mllpd.outbox.postgres.transport`): ``sslmode=verify-full`` when
    the server is not local; a mode that checks less is refused unless the
    connector says ``insecure: true``; ``disable`` is plaintext, warned.
    """
    t = transport(conninfo, environ)
    if t.weakness == "plaintext":
        warn_plaintext(spec, t.remote)
    elif t.weakness is not None:
        if not insecure:
            raise option_error(
                spec, "dsn_env" if spec.options.get("dsn_env") is not None else "dsn",
                f"{t.weakness} does not verify the server's certificate and name; "
                "use sslmode=verify-full (the default for a server that is not local), "
                "or set insecure: true to accept that",
            )
        warn_unverified(spec, t.remote, t.weakness)
    return t.conninfo


def _table(spec: ConnectorSpec) -> tuple[str, ...]:
    text = string_option(spec, "table", "hl7_messages")
    assert text is not None
    parts = tuple(text.split("."))
    if len(parts) > 2 or not all(_IDENTIFIER.fullmatch(p) for p in parts):
        raise option_error(
            spec, "table",
            f"invalid table name {text!r}; expected name or schema.name in lower case "
            "letters, digits and _ (at most 63 each)",
        )
    return parts
