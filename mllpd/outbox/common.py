"""What both outbox backends share: group commit on one writer thread,
backlog accounting, commit listeners, the recount and retention loops.

A backend subclasses :class:`GroupCommitOutbox` and supplies only its SQL
and connection handling: ``_write`` (one transaction for a batch, on the
writer thread), ``_read_counts`` and ``_fetch`` (on the reader thread),
``_prune`` (on the writer thread, between commits) and ``_shut`` (release connections once the last commit is done).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Sequence
from importlib import resources
from typing import ClassVar, NamedTuple, TypedDict

from twisted.internet.defer import Deferred, FirstError, gatherResults
from twisted.internet.interfaces import IDelayedCall, IReactorThreads, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from mllpd.outbox import (
    AuditRecord,
    Backlog,
    Envelope,
    OutboxError,
    QueuedDelivery,
    StoreResult,
    bounded_audit,
    over_limit,
)

__all__ = [
    "BACKLOG_INTERVAL",
    "GroupCommitOutbox",
    "MIN_PRUNE_INTERVAL",
    "Op",
    "OutboxOptions",
    "PRUNE_BATCH",
    "PRUNE_INTERVAL",
    "QueueDepth",
    "STATE_HOLD",
    "QUEUE_DEPTHS",
    "check_schema_version",
    "prune_interval",
    "schema_files",
]

log = Logger(namespace="mllpd.outbox")

# Seconds between recounts of the backlog (for MLLP_MAX_OUTBOX and metrics).
BACKLOG_INTERVAL = 1.0
# Seconds between retention sweeps, and rows deleted per sweep statement, so
# a sweep never holds the write lock long enough to delay ACKs noticeably.
PRUNE_INTERVAL = 60.0
PRUNE_BATCH = 1000
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


def check_schema_version(current: int, newest: int) -> None:
    """Refuse an outbox a newer mllpd has migrated past what this one knows."""
    if current > newest:
        raise OutboxError(
            f"outbox schema version {current} is newer than this mllpd "
            f"knows ({newest}); upgrade mllpd"
        )


# Messages and bytes waiting for delivery (MLLP_MAX_OUTBOX), in both dialects.
BACKLOG = (
    "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM messages WHERE message_id IN"
    " (SELECT message_id FROM deliveries WHERE state IN ('pending', 'in_flight'))"
)
# Queue depth, dead letters and oldest arrival per connector and state: the
# same SQL on either backend (read by depths_from).
QUEUE_DEPTHS = (
    "SELECT d.connector, d.state, COUNT(*), MIN(m.received_at)"
    " FROM deliveries d JOIN messages m ON m.message_id = d.message_id"
    " WHERE d.state IN ('pending', 'in_flight', 'dead') GROUP BY d.connector, d.state"
)


class QueueDepth(NamedTuple):
    """One connector's queue as of the last count."""

    pending: int  # pending or in flight
    dead: int
    oldest: float | None  # received_at of the oldest pending message


# A delivery-state change: the backend's SQL, its parameters, and who waits.
Op = tuple[str, tuple[object, ...], "Deferred[None]"]


def plus(backlog: Backlog, envelope: Envelope, sign: int = 1) -> Backlog:
    return Backlog(
        backlog.messages + sign, backlog.size + sign * len(envelope.payload)
    )


def depths_from(rows: list[tuple[str, str, int, float | None]]) -> dict[str, QueueDepth]:
    """Per-connector depths from (connector, state, count, oldest) rows."""
    depths: dict[str, list[object]] = {}
    for connector, state, n, oldest in rows:
        entry = depths.setdefault(connector, [0, 0, None])
        if state == "dead":
            entry[1] = n
        else:
            entry[0] = int(entry[0]) + n  # type: ignore[call-overload]
            if entry[2] is None or (oldest is not None and oldest < entry[2]):  # type: ignore[operator]
                entry[2] = oldest
    return {name: QueueDepth(*values) for name, values in depths.items()}  # type: ignore[arg-type]


# The audit_log and deliveries columns both backends insert.
AUDIT_COLUMNS = (
    "received_at, peer, client_subject, pod, message_id, control_id, msg_type,"
    " size, sha256, ack_code, rule, connectors, batch_control_id"
)
QUEUE_COLUMNS = "message_id, connector, state, attempts, next_attempt, updated_at, lane"


def audit_row(a: AuditRecord, pod: str | None, message_id: str | None = None) -> tuple[object, ...]:
    """An audit_log row (AUDIT_COLUMNS): a message not stored, or (with
    ``message_id``) a resend of a stored one."""
    return (
        a.received_at, a.peer, a.client_subject, pod, message_id, a.control_id, a.msg_type,
        a.size, a.sha256, a.ack_code, a.rule, "", a.batch_control_id,
    )


def resend_audit_row(e: Envelope, message_id: str, pod: str | None) -> tuple[object, ...]:
    """The audit_log row of ``e``, a resend of stored message ``message_id``,
    its sender-controlled fields within AUDIT_LIMITS."""
    a = bounded_audit(AuditRecord(
        e.received_at, e.peer, e.client_subject, e.control_id, e.msg_type, e.size, e.sha256,
        e.ack_code, batch_control_id=e.batch_control_id,
    ))
    return audit_row(a, pod, message_id)


def queue_rows(e: Envelope) -> list[tuple[object, ...]]:
    """The deliveries rows of a stored envelope (message_id, connector,
    next_attempt, updated_at, lane), one per route."""
    lanes = e.lanes or (0,) * len(e.routes)
    return [
        (e.message_id, connector, e.received_at, e.received_at, lane)
        for connector, lane in zip(e.routes, lanes, strict=True)
    ]


def _first_error(failure: Failure) -> Failure:
    failure.trap(FirstError)
    return failure.value.subFailure  # type: ignore[no-any-return]


class OutboxOptions(TypedDict, total=False):
    """What every outbox backend takes besides where it stores (the
    defaults are :class:`GroupCommitOutbox`'s)."""

    dedup_window: float
    wall_clock: Callable[[], float]
    retention: float
    max_count: int | None
    max_bytes: int | None
    pod: str | None
    hold_clock: IReactorTime | None
    count_clock: IReactorTime | None


class GroupCommitOutbox:
    """Stores envelopes with group commit.

    While one commit runs on the writer thread, new envelopes queue up; when
    it returns they all go into the next transaction together. Each store's
    Deferred fires only after its transaction's COMMIT returned.
    """

    # The delivery-state changes, with qmark parameters in the order the
    # mark_* methods pass them; a backend whose driver wants another style
    # converts them (see PostgresOutbox).
    OP_SQL: ClassVar[dict[str, str]] = {
        "in_flight": "UPDATE deliveries SET state = 'in_flight', updated_at = ? WHERE seq = ?",
        "delivered": (
            "UPDATE deliveries SET state = 'delivered', attempts = attempts + 1,"
            " last_error = NULL, updated_at = ? WHERE seq = ?"
        ),
        "retry": (
            "UPDATE deliveries SET state = 'pending', attempts = ?, last_error = ?,"
            " next_attempt = ?, updated_at = ? WHERE seq = ?"
        ),
        "dead": (
            "UPDATE deliveries SET state = 'dead', attempts = ?, last_error = ?,"
            " updated_at = ? WHERE seq = ?"
        ),
    }

    def __init__(
        self,
        reactor: IReactorThreads,
        *,
        thread_name: str,
        dedup_window: float = 24 * 3600.0,
        wall_clock: Callable[[], float] = time.time,
        retention: float = 168 * 3600.0,
        max_count: int | None = None,
        max_bytes: int | None = None,
        pod: str | None = None,
        hold_clock: IReactorTime | None = None,
        count_clock: IReactorTime | None = None,
    ) -> None:
        self.dedup_window = dedup_window
        self.retention = retention
        self.max_count = max_count
        self.max_bytes = max_bytes
        self.pod = pod
        self._reactor = reactor
        self._wall_clock = wall_clock
        self._backlog = Backlog(0, 0)
        # Routed stores whose commit has not returned yet, and those a
        # recount in progress may not see: a recount reads a snapshot on
        # another thread, so it adds these rather than forget them.
        self._uncommitted = Backlog(0, 0)
        self._unseen = Backlog(0, 0)
        self.depths: dict[str, QueueDepth] = {}
        self._counts_ok = True
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name=thread_name)
        # Reads run here; a backend with a reader connection of its own
        # replaces it with a pool of its own.
        self._reader_pool = self._pool
        self._counting = LoopingCall(self._count)
        # The recount's timer: the reactor, or a task.Clock in unit tests.
        self._counting.clock = count_clock or reactor  # type: ignore[assignment]
        self._pruning = LoopingCall(self.prune)
        self._pruning.clock = reactor  # type: ignore[assignment]
        self._ops: list[Op] = []
        self._audits: list[AuditRecord] = []
        self._held: IDelayedCall | None = None
        self._hold_clock: IReactorTime = hold_clock or reactor  # type: ignore[assignment]
        self._listeners: list[Callable[[set[str]], None]] = []
        # Called with every connector's queue depth after each recount.
        self.count_observer: Callable[[dict[str, QueueDepth]], None] | None = None
        self._pending: list[tuple[Envelope, Deferred[StoreResult]]] = []
        self._committing = False
        self._closing = False
        self._closed = False
        self._shutting = False
        self._close_waiters: list[Deferred[None]] = []
        self.commits = 0
        # The reason commits are failing, while they are, and how many did.
        self._failing: str | None = None
        self._failed_commits = 0
        self.committed_messages = 0
        # Told (batch size, seconds) after each successful commit: metrics.
        self.commit_observer: Callable[[int, float], None] | None = None
        self._commit_started = 0.0

    # -- backend hooks -----------------------------------------------------

    def _write(
        self, envelopes: list[Envelope], ops: list[Op], audits: list[AuditRecord]
    ) -> list[StoreResult]:
        """One transaction for a batch (writer thread); raises on failure."""
        raise NotImplementedError

    def _read_counts(self) -> tuple[Backlog, dict[str, QueueDepth]]:
        """The backlog and queue depths (reader thread)."""
        raise NotImplementedError

    def _fetch(
        self, connector: str, after: int, limit: int,
        skip_lanes: Collection[int], skip_seqs: Collection[int],
    ) -> list[QueuedDelivery]:
        """The head of a queue without the rows of ``skip_lanes`` and the
        rows ``skip_seqs`` (reader thread)."""
        raise NotImplementedError

    def _prune(self) -> int:
        """One retention sweep (writer thread); the messages deleted."""
        raise NotImplementedError

    def _shut(self) -> Deferred[None]:
        """Release the storage; the writer is idle and stays so."""
        raise NotImplementedError

    def _commit_failed(self, count: int, reason: str) -> None:
        # One line when commits start failing (or fail for another reason),
        # not one per commit: a full disk would otherwise log with every AR.
        self._failed_commits += 1
        if reason != self._failing:
            self._failing = reason
            log.error(
                "outbox commits fail, new messages get AR: {reason}",
                event="commit_failed", count=count, reason=reason,
            )

    def _commit_succeeded(self) -> None:
        """A commit returned: say so once after a run of failures."""
        if self._failing is not None:
            log.info(
                "outbox commits succeed again after {failed} failed",
                event="commit_recovered", failed=self._failed_commits,
            )
            self._failing = None
            self._failed_commits = 0

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        self._pool.start()
        if self._reader_pool is not self._pool:
            self._reader_pool.start()
        self._counting.start(BACKLOG_INTERVAL, now=True)
        self._pruning.start(prune_interval(self.retention), now=False)

    def add_listener(self, listener: Callable[[set[str]], None]) -> None:
        """Call ``listener(connectors)`` after each commit that queued
        messages for those connectors."""
        self._listeners.append(listener)

    # -- back-pressure -----------------------------------------------------

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

    def _counted(self, result: tuple[Backlog, dict[str, QueueDepth]]) -> None:
        if not self._counts_ok:
            log.info("outbox backlog count works again", event="count_recovered")
        self._counts_ok = True
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
        # Once per outage, not once a second.
        if self._counts_ok:
            log.warn(
                "outbox backlog count failed: {reason}", event="count_failed",
                reason=failure.getErrorMessage(),
            )
        self._counts_ok = False

    # -- queues ------------------------------------------------------------

    def fetch(
        self,
        connector: str,
        after: int,
        limit: int,
        skip_lanes: Collection[int] = (),
        skip_seqs: Collection[int] = (),
    ) -> Deferred[list[QueuedDelivery]]:
        # Copied here: the relay changes its sets while the read runs.
        return deferToThreadPool(
            self._reactor, self._reader_pool, self._fetch, connector, after, limit,
            tuple(skip_lanes), tuple(skip_seqs),
        )

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
        return self._op(self.OP_SQL["in_flight"], (now, seq))

    def mark_delivered(self, seq: int, now: float) -> Deferred[None]:
        return self._op(self.OP_SQL["delivered"], (now, seq))

    def mark_retry(
        self, seq: int, attempts: int, error: str, next_attempt: float, now: float
    ) -> Deferred[None]:
        return self._op(self.OP_SQL["retry"], (attempts, error, next_attempt, now, seq))

    def mark_dead(self, seq: int, attempts: int, error: str, now: float) -> Deferred[None]:
        return self._op(self.OP_SQL["dead"], (attempts, error, now, seq))

    def audit(self, record: AuditRecord) -> None:
        if self._closing:
            return
        # Bounded now: the record waits in memory for the next commit.
        self._audits.append(bounded_audit(record))
        self._schedule()

    # -- retention ---------------------------------------------------------

    def prune(self) -> Deferred[int]:
        """Delete delivered messages and audit records older than the
        retention, a batch at a time; fires with the messages deleted."""
        return deferToThreadPool(self._reactor, self._pool, self._prune).addErrback(
            self._prune_failed
        )

    def _prune_failed(self, failure: Failure) -> int:
        log.warn(
            "outbox retention sweep failed: {reason}", event="prune_failed",
            reason=failure.getErrorMessage(),
        )
        return 0

    # -- group commit ------------------------------------------------------

    def store(self, envelope: Envelope) -> Deferred[StoreResult]:
        d: Deferred[StoreResult] = Deferred()
        if self._closing:
            d.errback(OutboxError("outbox is closing"))
            return d
        self._pending.append((envelope, d))
        if envelope.routes:
            self._backlog = plus(self._backlog, envelope)
            self._uncommitted = plus(self._uncommitted, envelope)
            self._unseen = plus(self._unseen, envelope)
        self._schedule()
        return d

    def store_batch(self, envelopes: Sequence[Envelope]) -> Deferred[list[StoreResult]]:
        # Queued in one call, with no reactor turn between them, they all go
        # into the same group-commit transaction: stored together or not at all.
        stores = [self.store(e) for e in envelopes]
        return gatherResults(stores, consumeErrors=True).addErrback(_first_error)

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
                self._uncommitted = plus(self._uncommitted, envelope, -1)
        # Start the next commit before answering this one: the replies write
        # ACKs and parse newly arrived frames, which would otherwise delay it.
        if self._pending or self._ops or self._audits:
            self._commit_next()
        if isinstance(result, Failure):
            reason = result.getErrorMessage()
            self._commit_failed(len(batch), reason)
            for _, d in batch:
                d.errback(OutboxError(reason))
            for _, _, op in ops:
                op.errback(OutboxError(reason))
        else:
            self._commit_succeeded()
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

    # -- closing -----------------------------------------------------------

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

    def _finish_close(self) -> None:
        # Reentrant: a store's callback may call close() from inside _committed.
        if self._shutting:
            return
        self._shutting = True
        for loop in (self._counting, self._pruning):
            if loop.running:
                loop.stop()

        def closed(result: object) -> None:
            if self._pool.started:
                self._pool.stop()
            self._closed = True
            waiters, self._close_waiters = self._close_waiters, []
            for waiter in waiters:
                waiter.callback(None)

        self._shut().addBoth(closed)
