"""Delivery leases: for each connector, one replica of a cluster delivers.

A lease is a session advisory lock (``pg_try_advisory_lock`` on a key
derived from the connector's name) held on a database session of its own.
Every replica tries the connectors it does not hold every LEASE_INTERVAL
seconds, so connectors spread over replicas and a lease whose holder died
is taken over.

Bounds (SPEC section 9: another replica delivers within 15 s):

- The server ends a session that sent nothing for SESSION_TIMEOUT seconds
  (``idle_session_timeout``; the holder queries every LEASE_INTERVAL), and
  one whose peer vanished through TCP keepalives and ``tcp_user_timeout``:
  a killed, hung or partitioned holder's locks go within SESSION_TIMEOUT.
- A holder stops delivering once it has had no answer for LEASE_GRACE
  seconds, before the server can give the lease to anyone else; then it
  drops the session and starts again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import psycopg
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorThreads, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from mllpd.outbox.postgres import (
    abort_socket,
    advisory_key,
    close_quietly,
    connect,
    describe_error,
    server_name,
)

__all__ = ["LEASE_GRACE", "LEASE_INTERVAL", "SESSION_TIMEOUT", "Leases"]

log = Logger(namespace="mllpd.outbox")

LEASE_INTERVAL = 2.0
LEASE_GRACE = 5.0
SESSION_TIMEOUT = 8.0


class Leases:
    """Acquires and keeps the delivery leases of ``names``; tells
    ``on_change(name, held)`` each time one is won or lost."""

    def __init__(
        self,
        url: str,
        reactor: IReactorThreads,
        names: Iterable[str],
        on_change: Callable[[str, bool], None],
        *,
        pod: str | None = None,
        clock: IReactorTime | None = None,
    ) -> None:
        self.url = url
        self.server = server_name(url)
        self.pod = pod
        self.keys = {name: advisory_key("connector\0" + name) for name in names}
        self.held: set[str] = set()
        self._on_change = on_change
        self._reactor = reactor
        self._clock: IReactorTime = clock or reactor  # type: ignore[assignment]
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name="mllpd-leases")
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self._clock  # type: ignore[assignment]
        self._conn: psycopg.Connection[Any] | None = None  # the pool thread's
        self._checking = False
        self._last_ok = 0.0
        self._up: bool | None = None
        self._stopped = False

    def start(self) -> None:
        self._pool.start()
        self._last_ok = self._clock.seconds()
        self._loop.start(LEASE_INTERVAL, now=True)

    def stop(self) -> Deferred[None]:
        """Give every lease up (closing the session releases the locks)."""
        self._stopped = True
        if self._loop.running:
            self._loop.stop()
        self._lose_all()
        if not self._pool.started:
            return succeed(None)
        pool = self._pool
        d = deferToThreadPool(self._reactor, pool, self._close)
        return d.addBoth(lambda _: pool.stop())

    # -- reactor thread ----------------------------------------------------

    def _tick(self) -> None:
        if self._checking:
            # The last check has not come back: past the grace period the
            # session counts as lost, whatever the socket says.
            if self.held and self._clock.seconds() - self._last_ok > LEASE_GRACE:
                self._lose_all("no answer from the database")
                self._abort_socket()
            return
        self._checking = True
        wanted = [self.keys[n] for n in self.keys if n not in self.held]
        d = deferToThreadPool(self._reactor, self._pool, self._check, wanted)
        d.addCallbacks(self._checked, self._failed)

    def _checked(self, won: list[int]) -> None:
        self._checking = False
        if self._stopped:
            return
        self._last_ok = self._clock.seconds()
        if self._up is False:
            log.info("lease session to {server} is back", event="lease_session_up",
                     server=self.server)
        self._up = True
        by_key = {key: name for name, key in self.keys.items()}
        for key in won:
            name = by_key[key]
            if name not in self.held:
                self.held.add(name)
                log.info(
                    "this replica ({pod}) now delivers for {connector}",
                    event="lease_acquired", connector=name, pod=self.pod or "",
                )
                self._on_change(name, True)

    def _failed(self, failure: Failure) -> None:
        self._checking = False
        reason = describe_error(failure.value)
        self._lose_all(reason)
        if self._up is not False and not self._stopped:
            log.warn(
                "lease session to {server} lost: {reason}", event="lease_session_down",
                server=self.server, reason=reason,
            )
        self._up = False

    def _lose_all(self, reason: str = "stopping") -> None:
        lost, self.held = self.held, set()
        for name in sorted(lost):
            # Stop delivering first, then say so.
            self._on_change(name, False)
            log.warn(
                "this replica ({pod}) stopped delivering for {connector}: {reason}",
                event="lease_lost", connector=name, pod=self.pod or "", reason=reason,
            )

    def _abort_socket(self) -> None:
        """Unblock the lease thread stuck on a hung session."""
        abort_socket(self._conn)

    # -- lease thread ------------------------------------------------------

    def _check(self, wanted: list[int]) -> list[int]:
        try:
            conn = self._conn
            if conn is None or conn.closed:
                conn = self._conn = self._open()
            if not wanted:
                conn.execute("SELECT 1")
                return []
            rows = conn.execute(
                "SELECT k FROM unnest(%s::bigint[]) AS k WHERE pg_try_advisory_lock(k)",
                (wanted,),
            ).fetchall()
            return [k for (k,) in rows]
        except BaseException:
            self._close()
            raise

    def _open(self) -> psycopg.Connection[Any]:
        name = f"mllpd-{self.pod}-leases" if self.pod else "mllpd-leases"
        conn = connect(self.url, name[:63], keepalive=SESSION_TIMEOUT)
        timeout = str(int(SESSION_TIMEOUT * 1000))
        for setting, value in (
            # The server ends a holder that went quiet, releasing its locks.
            ("idle_session_timeout", timeout),
            ("tcp_keepalives_idle", str(int(SESSION_TIMEOUT / 3))),
            ("tcp_keepalives_interval", str(int(SESSION_TIMEOUT / 6))),
            ("tcp_keepalives_count", "3"),
            ("tcp_user_timeout", timeout),
        ):
            try:
                conn.execute("SELECT set_config(%s, %s, false)", (setting, value))
            except psycopg.errors.UndefinedObject:
                pass  # an older server without the setting: keepalives remain
        return conn

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        close_quietly(conn)
