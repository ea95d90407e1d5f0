"""Delivery leases: for each connector, one replica of a cluster delivers.

A lease is a session advisory lock (``pg_try_advisory_lock`` on a key
derived from the connector's name) held on a database session of its own.
Every replica tries the connectors it does not hold every LEASE_INTERVAL
seconds, and a lease whose holder died is taken over.

Sharing: a replica holds at most ceil(connectors / live replicas) leases,
live replicas being the lease sessions on the database (by
application_name). One holding more, once more replicas are live, lets the
extras go after their deliveries in progress end; the others take them at
their next try. A connector's lease so moves only between deliveries.

Bounds (SPEC section 9: another replica delivers within 15 s):

- The server ends a session that sent nothing for SESSION_TIMEOUT seconds
  (``idle_session_timeout``; the holder queries every LEASE_INTERVAL), and
  one whose peer vanished through TCP keepalives and ``tcp_user_timeout``:
  a killed, hung or partitioned holder's locks go within SESSION_TIMEOUT.
- Fencing: a holder starts a delivery only while its last successful check
  was sent less than FENCE seconds ago, and a replica that wins a lease
  starts delivering FENCE seconds after the answer came. A holder whose
  session the server ended (pg_terminate_backend, idle_session_timeout
  after a stalled reactor) checked last before the end, so it has stopped
  starting deliveries before the winner starts; only deliveries already in
  flight can overlap.
- A holder that has had no answer for LEASE_GRACE seconds drops the session
  and starts again.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import psycopg
from twisted.internet.defer import Deferred, maybeDeferred, succeed
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

__all__ = ["FENCE", "LEASE_GRACE", "LEASE_INTERVAL", "SESSION_TIMEOUT", "Leases"]

log = Logger(namespace="mllpd.outbox")

LEASE_INTERVAL = 1.0
# Well over LEASE_INTERVAL plus a check's round trip on a busy machine, so
# that a healthy holder does not pause; SESSION_TIMEOUT + LEASE_INTERVAL +
# FENCE < 15 s.
FENCE = 4.0
LEASE_GRACE = 5.0
SESSION_TIMEOUT = 6.0
# Lease sessions are named APP_NAME or APP_NAME-<pod>; live replicas are
# counted by that name.
APP_NAME = "mllpd-leases"


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
        drain: Callable[[str], Deferred[None]] | None = None,
    ) -> None:
        self.url = url
        self.server = server_name(url)
        self.pod = pod
        self.keys = {name: advisory_key("connector\0" + name) for name in names}
        self.held: set[str] = set()
        # Live replicas at the last check (this one included).
        self.replicas = 1
        self._on_change = on_change
        self._drain = drain or (lambda name: succeed(None))
        # Leases let go for sharing, until their deliveries ended and the
        # lock is released: not tried again meanwhile.
        self._releasing: set[str] = set()
        self._won_at: dict[str, float] = {}
        self._reactor = reactor
        self._clock: IReactorTime = clock or reactor  # type: ignore[assignment]
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name="mllpd-leases")
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self._clock  # type: ignore[assignment]
        self._conn: psycopg.Connection[Any] | None = None  # the pool thread's
        self._checking = False
        self._last_ok = 0.0  # when the last successful check was sent
        self._up: bool | None = None
        self._stopped = False

    def start(self) -> None:
        self._pool.start()
        self._last_ok = self._clock.seconds()
        self._loop.start(LEASE_INTERVAL, now=True)

    def wait(self, name: str) -> float | None:
        """Seconds before this replica may start a delivery for ``name``
        (0: now); None while it does not hold the lease."""
        if name not in self.held:
            return None
        now = self._clock.seconds()
        if now - self._last_ok >= FENCE:
            # The lease may be gone: wait for the next check's answer.
            return LEASE_INTERVAL / 4
        return max(0.0, self._won_at.get(name, now) + FENCE - now)

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
        sent = self._clock.seconds()
        wanted = [
            self.keys[n] for n in sorted(self.keys)
            if n not in self.held and n not in self._releasing
        ]
        holding = len(self.held) + len(self._releasing)
        d = deferToThreadPool(self._reactor, self._pool, self._check, wanted, holding)
        d.addCallbacks(self._checked, self._failed, callbackArgs=(sent,))

    def _quota(self, replicas: int | None = None) -> int:
        """The most leases this replica keeps with ``replicas`` (default:
        as many as last counted) live; pure, so the lease thread uses it too."""
        return math.ceil(len(self.keys) / max(self.replicas if replicas is None else replicas, 1))

    def _checked(self, result: tuple[list[int], int], sent: float) -> None:
        self._checking = False
        if self._stopped:
            return
        won, self.replicas = result
        now = self._clock.seconds()
        self._last_ok = sent
        if self._up is False:
            log.info("lease session to {server} is back", event="lease_session_up",
                     server=self.server)
        self._up = True
        by_key = {key: name for name, key in self.keys.items()}
        for key in won:
            name = by_key[key]
            if name not in self.held:
                self.held.add(name)
                self._won_at[name] = now
                log.info(
                    "this replica ({pod}) now delivers for {connector}",
                    event="lease_acquired", connector=name, pod=self.pod or "",
                )
                self._on_change(name, True)
        extra = len(self.held) - self._quota()
        for name in sorted(self.held, reverse=True)[:max(extra, 0)]:
            self._release(name)

    def _release(self, name: str) -> None:
        """Let ``name``'s lease go to another replica, once this one's
        deliveries in progress for it have ended."""
        self.held.discard(name)
        self._releasing.add(name)
        self._on_change(name, False)
        log.info(
            "this replica ({pod}) hands {connector} over ({replicas} replicas share "
            "{connectors} connectors)", event="lease_released", connector=name,
            pod=self.pod or "", replicas=self.replicas, connectors=len(self.keys),
        )
        key = self.keys[name]
        d = maybeDeferred(self._drain, name)
        d.addCallback(lambda _: None if self._stopped else deferToThreadPool(
            self._reactor, self._pool, self._unlock, key))
        d.addBoth(lambda _: self._releasing.discard(name))

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

    def _check(self, wanted: list[int], holding: int) -> tuple[list[int], int]:
        """The keys of ``wanted`` won (no more than this replica's share),
        and the count of live replicas."""
        try:
            conn = self._conn
            if conn is None or conn.closed:
                conn = self._conn = self._open()
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND (application_name = %s OR application_name LIKE %s)",
                (APP_NAME, APP_NAME + "-%"),
            ).fetchone()
            replicas = max(int(row[0]) if row else 1, 1)
            room = self._quota(replicas) - holding
            won: list[int] = []
            for key in wanted:
                if len(won) >= room:
                    break
                locked = conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()
                if locked and locked[0]:
                    won.append(key)
            return won, replicas
        except BaseException:
            self._close()
            raise

    def _unlock(self, key: int) -> None:
        conn = self._conn
        if conn is None or conn.closed:
            return  # the session, and with it the lock, is gone already
        try:
            conn.execute("SELECT pg_advisory_unlock(%s)", (key,))
        except psycopg.Error:
            self._close()  # closing the session releases its locks

    def _open(self) -> psycopg.Connection[Any]:
        name = f"{APP_NAME}-{self.pod}" if self.pod else APP_NAME
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
