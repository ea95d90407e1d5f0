"""Delivery workers: one per connector, in order per order key (lane).

A worker reads the heads of its connector's queue, hands messages to the
connector and records each outcome: delivered, retried later with
exponential backoff and jitter (the same message stays at the head of its
lane, so order holds), or moved to the dead-letter queue once upstream
refuses it for good or the attempts run out.

With ``lanes: 1`` the whole queue is one FIFO: one message in flight. With
``lanes: N`` rows carry their message's order key; rows of one key go one
at a time in queue order, rows of different keys up to N at once, and a key
in backoff holds back only its own later rows.

A connector that forwards HL7 batches whole (``batch: forward``) gets the
rows of one batch at the head of a lane together, in one delivery.

State changes go into the outbox's group commit without the worker waiting
for them: a crash before they are durable only means the message is
delivered again, with the same message id as its idempotency key.
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from mllpd.connectors import (
    Dead,
    Delivered,
    Delivery,
    IConnector,
    Outcome,
    Retry,
    forwards_batches,
)
from mllpd.hl7 import codec_for_charset
from mllpd.outbox import IDeliveryQueue, QueuedDelivery

__all__ = ["Relay", "RetryPolicy", "Worker"]

log = Logger(namespace="mllpd.relay")

# Rows read from a queue at a time (at least two per lane), and how often
# an idle worker looks again on its own (new stores wake it at once; this
# catches replays that mllp-cli writes from another process).
FETCH_LIMIT = 32
POLL_INTERVAL = 1.0
# Rows read at once to gather an HL7 batch a connector forwards whole; the
# batch itself was bounded by MLLP_MAX_BATCH_MESSAGES and the frame size.
BATCH_FETCH_LIMIT = 10_000
# Order keys that may wait out a backoff at once. Past it no new key is
# started until one is retried: when upstream refuses everything, each key
# would otherwise get one attempt and a timer, however many keys are queued.
MAX_WAITING = 1000
# Seconds a stopping worker waits for the delivery in progress, then for its
# connector to close: together well inside the 2 s that the shutdown bound
# (PRE_SHUTDOWN_DELAY + SHUTDOWN_TIMEOUT + 2 s) leaves after the drain.
STOP_TIMEOUT = 1.0
CLOSE_TIMEOUT = 0.5
# Past every seq.
_END = 2**63 - 1


def _within(d: Deferred[Any], seconds: float, clock: IReactorTime) -> Deferred[None]:
    """Fires when ``d`` does or after ``seconds``, whichever is first; ``d``
    itself is left alone (its result or failure is consumed here)."""
    done: Deferred[None] = Deferred()

    def end(_: object = None) -> None:
        if timer.active():
            timer.cancel()
        if not done.called:
            done.callback(None)

    timer = clock.callLater(seconds, end)
    d.addBoth(end)
    return done


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter; after max_attempts, the dead letters."""

    initial: float = 1.0
    max: float = 300.0
    multiplier: float = 2.0
    jitter: float = 0.2
    max_attempts: int = 20

    def __post_init__(self) -> None:
        if not (self.initial > 0 and math.isfinite(self.initial)):
            raise ValueError("initial must be more than 0")
        if not (self.max >= self.initial and math.isfinite(self.max)):
            raise ValueError("max must be at least initial")
        if not (self.multiplier >= 1 and math.isfinite(self.multiplier)):
            raise ValueError("multiplier must be at least 1")
        if not 0 <= self.jitter < 1:
            raise ValueError("jitter must be at least 0 and less than 1")
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")

    def delay(self, attempt: int, rand: Callable[[], float]) -> float:
        """Seconds to wait before retry number ``attempt`` (1 = first retry).

        ``initial * multiplier**(attempt-1)``, capped at ``max``, then moved
        by up to ±jitter of itself (``rand()`` in [0, 1), 0.5 = no change),
        and capped at ``max`` again.
        """
        if attempt < 1:
            raise ValueError("attempt must be at least 1")
        try:
            base = min(self.max, self.initial * self.multiplier ** (attempt - 1))
        except OverflowError:
            base = self.max
        return min(self.max, base * (1.0 + self.jitter * (2.0 * rand() - 1.0)))


class Leases(Protocol):
    def start(self) -> None: ...

    def wait(self, name: str) -> float | None: ...

    def stop(self) -> Deferred[None]: ...


class DeliveryMetrics(Protocol):
    def delivery(self, connector: str, result: str) -> None: ...

    def dead_letter(self, connector: str) -> None: ...


def _loggable(reason: str) -> str:
    """The kind of a failure without upstream's free text (an upstream ERR
    text may quote patient data); the whole reason is in the queue row."""
    return reason.split(":", 1)[0][:120]


class Worker:
    """Delivers one connector's queue, up to ``lanes`` messages at a time.

    What the worker knows of its queue, per order key ("lane"): the row in
    flight (``_busy``), the row waiting out a backoff (``_waiting``) and the
    next rows read but not yet started (``_runs``, in order). A lane with any
    of these is *tracked*. ``_scan_after`` is the seq up to which every
    untracked lane has no row left to deliver: a read starts after it and
    leaves tracked lanes out, so the first row it finds of a lane is that
    lane's head, and a lane whose head is stuck costs the read nothing but
    index steps. When a lane stops being tracked (its last known row is
    done, or its backoff ended and the row must be read again) the scan
    goes back to that row. A backend that reads by state (PostgreSQL,
    where seqs become visible out of order) ignores the scan position; the
    rows this worker finished (``skip_seqs``) keep such a read correct.
    """

    def __init__(
        self,
        connector: IConnector,
        queue: IDeliveryQueue,
        retry: RetryPolicy,
        clock: IReactorTime,
        *,
        lanes: int = 1,
        wall_clock: Callable[[], float] | None = None,
        rand: Callable[[], float] = random.random,
        metrics: DeliveryMetrics | None = None,
        max_waiting: int = MAX_WAITING,
    ) -> None:
        self.connector = connector
        self.name: str = connector.name
        self.queue = queue
        self.retry = retry
        self.clock = clock
        self.lanes = lanes
        self._now = wall_clock or clock.seconds
        self.rand = rand
        self.metrics = metrics
        self.max_waiting = max_waiting
        self.forward_batches = forwards_batches(connector)
        # Rows held in runs at most: enough to refill every lane twice.
        self.buffer_limit = max(FETCH_LIMIT, 2 * lanes)
        self._scan_after = 0
        # The lowest seq a lane untracked during a read asked to scan from.
        self._rescan_from = 0
        self._runs: dict[int, deque[QueuedDelivery]] = {}
        self._buffered = 0
        self._busy: dict[int, QueuedDelivery] = {}
        self._waiting: dict[int, QueuedDelivery] = {}
        # Rows whose backoff ended, read again before the retry (mllp-cli
        # may have deleted them meanwhile), by seq.
        self._recheck: dict[int, QueuedDelivery] = {}
        # Rows finished whose state change may not be visible to a read yet:
        # seq -> None until committed, then the count of reads started by then.
        self._finished: dict[int, int | None] = {}
        self._reads = 0
        self._more = True  # the queue may hold rows not read yet
        self._last_read = float("-inf")
        self._attempts: set[Deferred[None]] = set()
        self._running = False
        self._wake: Deferred[None] | None = None
        self._timer: IDelayedCall | None = None
        self._done: Deferred[None] | None = None
        # False while another replica holds this connector's lease.
        self.active = True
        # In a cluster: seconds before this replica may start a delivery
        # (0: now; None: it does not hold the lease), so that a holder whose
        # lease may be gone stops before another replica can start.
        self.fence: Callable[[], float | None] | None = None
        self._reads_ok = True
        self.delivered = 0
        self.retried = 0
        self.dead = 0

    @property
    def in_flight(self) -> int:
        """Deliveries in progress (one per lane)."""
        return len(self._busy)

    def start(self) -> None:
        self._running = True
        self.connector.start()
        self._done = Deferred.fromCoroutine(self._run())
        self._done.addErrback(self._crashed)

    def notify(self) -> None:
        """New rows were committed to this queue."""
        # Remembered, so a notice that arrives during a read is not lost.
        self._more = True
        self._fire_wake()

    def stop(self, timeout: float = STOP_TIMEOUT) -> Deferred[None]:
        """Start no other delivery; let those in progress finish for up to
        ``timeout`` seconds, then close the connector, waiting for that at
        most CLOSE_TIMEOUT more. An unfinished delivery's row stays in its
        queue and is delivered again later (same message id)."""
        self._running = False
        self._fire_wake()
        loop = self._done if self._done is not None else succeed(None)
        finished = DeferredList([loop, *self._attempts], consumeErrors=True)
        d = _within(finished, timeout, self.clock)
        return d.addCallback(
            lambda _: _within(maybeDeferred(self.connector.stop), CLOSE_TIMEOUT, self.clock)
        )

    def pause(self) -> None:
        """Start no other delivery (the lease is lost) until resume(); those
        in progress finish."""
        self.active = False
        self._forget()
        self._fire_wake()

    def resume(self) -> None:
        """Deliver again (the lease is ours), from the queue as it is now."""
        self.active = True
        self._forget()
        self._fire_wake()

    def _forget(self) -> None:
        """Drop what this worker knows of its queue but the deliveries in
        progress: another replica may have delivered or retried since."""
        self._runs.clear()
        self._buffered = 0
        self._waiting.clear()
        self._recheck.clear()
        self._scan_after = 0
        self._rescan_from = 0
        self._more = True

    def _fire_wake(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        wake, self._wake = self._wake, None
        if wake is not None:
            wake.callback(None)

    def _sleep(self, seconds: float | None) -> Deferred[None]:
        """Wait ``seconds`` (None: no limit) or until woken, whichever is first."""
        wake: Deferred[None] = Deferred()
        self._wake = wake
        if seconds is not None:
            self._timer = self.clock.callLater(max(seconds, 0.0), self._fire_wake)
        return wake

    def _lane(self, row: QueuedDelivery) -> int:
        # One lane: the whole queue is one FIFO, whatever keys rows carry.
        return row.lane if self.lanes > 1 else 0

    def _tracked(self, lane: int) -> bool:
        return lane in self._busy or lane in self._waiting or lane in self._runs

    def _untrack(self, lane: int, seq: int) -> None:
        """``lane`` is no longer tracked; its rows after ``seq`` may be
        behind the scan: look there again."""
        if not self._tracked(lane):
            self._scan_after = min(self._scan_after, seq)
            self._rescan_from = min(self._rescan_from, seq)
            self._more = True

    def _can_read(self) -> bool:
        """Whether a read could find a row to start."""
        if len(self._waiting) >= self.max_waiting:
            return False
        if self.lanes == 1:
            # A FIFO reads only once its head is done: while it is in
            # flight or in backoff, nothing behind it may start.
            return not self._tracked(0)
        return len(self._busy) < self.lanes

    def _ready(self) -> list[int]:
        """Lanes whose next row can start now, oldest head first."""
        ready = [
            lane for lane in self._runs
            if lane not in self._busy and lane not in self._waiting
        ]
        ready.sort(key=lambda lane: self._runs[lane][0].seq)
        return ready

    async def _run(self) -> None:
        while self._running:
            if not self.active:
                await self._sleep(POLL_INTERVAL)
                continue
            self._end_backoffs()
            if self._clock_now() - self._last_read >= POLL_INTERVAL:
                self._more = True
            free = self.lanes - len(self._busy)
            ready = self._ready()
            room = len(self._waiting) < self.max_waiting
            if free > len(ready) and self._more and self._can_read():
                await self._read()
                continue
            if free > 0 and ready and room:
                fenced = self._fenced()
                if fenced > 0:
                    await self._sleep(fenced)
                    continue
                for lane in ready[:free]:
                    if len(self._waiting) >= self.max_waiting:
                        break
                    self._start(lane)
                continue
            await self._sleep(self._idle_time())

    def _clock_now(self) -> float:
        return self.clock.seconds()

    def _fenced(self) -> float:
        """Seconds to wait before starting a delivery (0: go)."""
        if self.fence is None:
            return 0.0
        wait = self.fence()
        return POLL_INTERVAL if wait is None else wait

    def drained(self) -> Deferred[None]:
        """Fires once the deliveries in progress now have ended."""
        d = DeferredList(list(self._attempts), consumeErrors=True)
        return d.addCallback(lambda _: None)

    def _idle_time(self) -> float | None:
        """Seconds until the next thing this worker must do unprompted;
        None when only a delivery ending (which wakes it) can change that."""
        if self._can_read():
            # A lane is free: look for rows nobody announced (replays).
            wait = POLL_INTERVAL - (self._clock_now() - self._last_read)
        elif not self._waiting:
            return None
        else:
            wait = POLL_INTERVAL
        if self._waiting:
            soonest = min(row.next_attempt for row in self._waiting.values())
            wait = min(wait, soonest - self._now())
        return wait

    def _end_backoffs(self) -> None:
        """Lanes whose backoff is over: read their head again, then retry."""
        if not self._waiting:
            return
        now = self._now()
        for lane, row in list(self._waiting.items()):
            if row.next_attempt <= now:
                del self._waiting[lane]
                # During the backoff mllp-cli may have deleted or purged the
                # row: read the queue again rather than retry a removed
                # message forever. Once per retry, not on every wake.
                self._recheck[row.seq] = row
                self._untrack(lane, row.seq - 1)

    async def _read(self) -> None:
        self._reads += 1
        read = self._reads
        self._more = False
        self._last_read = self._clock_now()
        limit = self.buffer_limit - self._buffered
        if limit < self.lanes:
            # A few lanes' runs fill the buffer while lanes are free: keep
            # only each run's first row (the rest is read again once its
            # lane has no row in hand) so that other keys can be read.
            for run in self._runs.values():
                while len(run) > 1:
                    run.pop()
                    self._buffered -= 1
            limit = self.buffer_limit - self._buffered
        after = self._scan_after
        skip_lanes: list[int] = []
        if self.lanes > 1:
            skip_lanes = [*self._busy, *self._waiting, *self._runs]
        # All of them, not only those past the scan: a backend that reads by
        # state would return the earlier ones too.
        skip_seqs = list(self._finished)
        self._rescan_from = _END
        try:
            rows = await self.queue.fetch(self.name, after, limit, skip_lanes, skip_seqs)
        except Exception as e:  # noqa: BLE001 - storage trouble: try again later
            if self._reads_ok:  # once per outage, not once per poll
                log.error(
                    "reading queue of {connector} failed: {reason}",
                    event="queue_read_failed", connector=self.name, reason=str(e),
                )
            self._reads_ok = False
            return
        if not self._reads_ok:
            log.info("reading queue of {connector} works again",
                     event="queue_read_recovered", connector=self.name)
        self._reads_ok = True
        if not self.active:
            return  # paused during the read: what it found may be stale
        for seq, committed in list(self._finished.items()):
            if committed is not None and committed < read:
                del self._finished[seq]
        full = len(rows) >= limit
        if full:
            self._more = True
        # Read up to here (all of it, unless the read was full) for every
        # lane untracked when it started; a lane untracked during the read
        # was left out of it, so the scan goes back to that lane's row.
        covered = rows[-1].seq if full else None
        if rows:
            self._scan_after = min(rows[-1].seq, self._rescan_from)
        for row in rows:
            if row.seq in self._finished:
                continue  # finished meanwhile
            known = self._recheck.pop(row.seq, None)
            if known is not None:
                # Its attempts and backoff as this worker knows them: its own
                # marks may not be committed yet.
                row = known
            lane = self._lane(row)
            if lane in self._busy or lane in self._waiting:
                continue  # tracked lanes are left out of reads: never here
            self._runs.setdefault(lane, deque()).append(row)
            self._buffered += 1
        for seq in list(self._recheck):
            if covered is None or seq <= covered:
                del self._recheck[seq]  # deleted while it waited

    def _drop_run(self, lane: int) -> None:
        run = self._runs.pop(lane, None)
        if run is not None:
            self._buffered -= len(run)

    def _start(self, lane: int) -> None:
        run = self._runs[lane]
        row = run.popleft()
        self._buffered -= 1
        if not run:
            del self._runs[lane]
        self._busy[lane] = row
        if self.forward_batches and row.batch_control_id is not None:
            group = _leading_batch([row, *run], self._now())
            # One lane holds the whole queue: the batch may go on past the
            # rows in hand, and is read on before it is sent.
            more = self.lanes == 1 and len(group) == 1 + len(run)
            if len(group) > 1 or more:
                for _ in group[1:]:
                    run.popleft()
                    self._buffered -= 1
                if not run:
                    self._runs.pop(lane, None)
                self._track(self._attempt_batch(lane, group, more))
                return
        self._track(self._attempt(lane, row))

    def _track(self, attempt: Coroutine[Any, Any, None]) -> None:
        """Run one attempt, counted among those in progress until it ends."""
        d = Deferred.fromCoroutine(attempt)
        self._attempts.add(d)
        d.addErrback(self._crashed)
        d.addBoth(self._attempted, d)

    def _attempted(self, _: object, d: Deferred[None]) -> None:
        self._attempts.discard(d)
        self._fire_wake()

    def _delivery(self, row: QueuedDelivery, attempt: int) -> Delivery:
        return Delivery(
            message_id=row.message_id,
            connector=self.name,
            payload=row.payload,
            charset=row.charset,
            codec=(codec_for_charset(row.charset) if row.charset else None) or "iso8859-1",
            control_id=row.control_id,
            msg_type=row.msg_type,
            attempt=attempt,
            received_at=row.received_at,
        )

    async def _attempt(self, lane: int, row: QueuedDelivery) -> None:
        attempt = row.attempts + 1
        self._record(self.queue.mark_in_flight(row.seq, self._now()))
        delivery = self._delivery(row, attempt)
        outcome: Outcome = await self._call(row, self.connector.deliver, delivery)
        self._settle(lane, row, attempt, outcome)
        self._done_with(lane, row.seq)

    async def _call(self, row: QueuedDelivery, method: Callable[..., Any], *args: Any) -> Any:
        """What the connector's ``method`` fires with; a connector that
        raises is logged and answered Retry, never a stop of the queue."""
        try:
            return await maybeDeferred(method, *args)
        except Exception as e:  # noqa: BLE001 - a connector bug must not stop the queue
            log.failure(
                "connector {connector} raised", Failure(), event="connector_error",
                connector=self.name, control_id=row.control_id,
            )
            return Retry(f"internal error: {type(e).__name__}")

    async def _attempt_batch(self, lane: int, rows: list[QueuedDelivery], more: bool) -> None:
        """Forward a batch whole. Outcomes are taken in order: once one
        message must be retried, it and every later one are retried
        together, so the lane's order holds (at least once, as ever)."""
        if more and len(rows) < BATCH_FETCH_LIMIT:
            rows = await self._read_on(rows)
        if len(rows) == 1:
            await self._attempt(lane, rows[0])
            return
        now = self._now()
        for row in rows:
            self._record(self.queue.mark_in_flight(row.seq, now))
        deliveries = [self._delivery(row, row.attempts + 1) for row in rows]
        connector: Any = self.connector
        result = await self._call(
            rows[0], connector.deliver_batch, deliveries, rows[0].batch_control_id
        )
        # A connector that raised: every message of the batch is retried.
        outcomes: list[Outcome] = [result] * len(rows) if isinstance(result, Retry) else result
        retry: Retry | None = None
        retry_at: float | None = None
        for row, outcome in zip(rows, outcomes, strict=True):
            if retry is None and isinstance(outcome, Retry):
                retry = outcome
            retry_at = self._settle(lane, row, row.attempts + 1, retry or outcome, retry_at)
        self._done_with(lane, rows[-1].seq)

    def _done_with(self, lane: int, seq: int) -> None:
        """The lane's delivery up to ``seq`` ended (its rows finished, or
        the lane waits out a backoff)."""
        del self._busy[lane]
        self._untrack(lane, seq)

    async def _read_on(self, rows: list[QueuedDelivery]) -> list[QueuedDelivery]:
        """The batch at the head of a one-lane queue, read on past ``rows``."""
        last = rows[-1].seq
        try:
            fetched = await self.queue.fetch(
                self.name, last, BATCH_FETCH_LIMIT, (), list(self._finished)
            )
        except Exception:  # noqa: BLE001 - deliver what is in hand
            return rows
        later = [r for r in fetched if r.seq > last and r.seq not in self._finished]
        return _leading_batch([*rows, *later], self._now())

    def _settle(
        self,
        lane: int,
        row: QueuedDelivery,
        attempt: int,
        outcome: Outcome,
        retry_at: float | None = None,
    ) -> float | None:
        """Record an outcome; returns the row's next attempt's time when it
        stays queued. Once a row of the lane stays queued (``retry_at`` is
        set), a later one (given its Retry) is never dead-lettered past it:
        it is retried with it, at ``retry_at``."""
        now = self._now()
        fields: dict[str, Any] = dict(
            connector=self.name, message_id=row.message_id, control_id=row.control_id,
            msg_type=row.msg_type, attempt=attempt,
        )
        if isinstance(outcome, Delivered):
            self._finish(lane, row, self.queue.mark_delivered(row.seq, now))
            self.delivered += 1
            self._count("delivered")
            log.debug("delivered to {connector}", event="delivered", **fields)
            return None
        if isinstance(outcome, Dead) or (attempt >= self.retry.max_attempts and retry_at is None):
            reason = outcome.reason
            if not isinstance(outcome, Dead):
                reason = f"gave up after {attempt} attempts: {reason}"
            self._finish(lane, row, self.queue.mark_dead(row.seq, attempt, reason, now))
            self.dead += 1
            self._count("dead")
            if self.metrics is not None:
                self.metrics.dead_letter(self.name)
            log.warn(
                "dead-lettered for {connector}: {reason}", event="dead_letter",
                reason=_loggable(reason), **fields,
            )
            return None
        reason = outcome.reason
        if retry_at is not None:
            next_attempt = retry_at
        elif outcome.after is not None:
            # Upstream's Retry-After, but never longer than the policy allows.
            next_attempt = now + min(max(outcome.after, 0.0), self.retry.max)
        else:
            next_attempt = now + self.retry.delay(attempt, self.rand)
        delay = next_attempt - now
        if retry_at is None and self.active:
            # The lane's head waits; its later rows wait with it (they are
            # read again after the backoff) and other lanes take their places.
            self._waiting[lane] = row._replace(attempts=attempt, next_attempt=next_attempt)
            self._drop_run(lane)
        self._record(self.queue.mark_retry(row.seq, attempt, reason, next_attempt, now))
        self.retried += 1
        self._count("retry")
        log.info(
            "delivery to {connector} failed, retry in {delay:.1f}s: {reason}",
            event="delivery_retry", delay=delay, reason=_loggable(reason), **fields,
        )
        return next_attempt

    def _finish(self, lane: int, row: QueuedDelivery, marked: Deferred[None]) -> None:
        seq = row.seq
        self._finished[seq] = None

        def committed(_: object) -> None:
            if seq in self._finished:
                self._finished[seq] = self._reads

        def failed(failure: Failure) -> Failure:
            # Not durable: the row is still queued, and will be read again.
            self._finished.pop(seq, None)
            return failure

        marked.addCallbacks(committed, failed)
        self._record(marked)

    def _count(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.delivery(self.name, result)

    def _record(self, d: Deferred[None]) -> None:
        d.addErrback(self._record_failed)

    def _record_failed(self, failure: Failure) -> None:
        # Not fatal: the row keeps its last durable state and is delivered
        # again (at least once).
        log.warn(
            "recording delivery state for {connector} failed: {reason}",
            event="queue_write_failed", connector=self.name,
            reason=failure.getErrorMessage(),
        )

    def _crashed(self, failure: Failure) -> None:
        log.failure(
            "delivery worker for {connector} stopped", failure,
            event="worker_crashed", connector=self.name,
        )


def _leading_batch(rows: list[QueuedDelivery], now: float) -> list[QueuedDelivery]:
    """The first row and those after it from the same HL7 batch: the same
    batch control id, positions rising, due by ``now``."""
    if not rows:
        return []
    head = rows[0]
    group = [head]
    for row in rows[1:]:
        last = group[-1]
        if (
            row.batch_control_id != head.batch_control_id
            or row.batch_position is None
            or last.batch_position is None
            or row.batch_position <= last.batch_position
            or row.next_attempt > now
        ):
            break
        group.append(row)
    return group


class Relay:
    """All the delivery workers; the outbox wakes them after each commit."""

    def __init__(self, workers: list[Worker], *, leases: Leases | None = None) -> None:
        self.workers = {w.name: w for w in workers}
        self.leases = leases

    def start(self) -> None:
        for worker in self.workers.values():
            if self.leases is not None:
                worker.active = False  # until this replica holds the lease
            worker.start()
        if self.leases is not None:
            self.leases.start()

    def notify(self, connectors: set[str]) -> None:
        for name in connectors:
            worker = self.workers.get(name)
            if worker is not None:
                worker.notify()

    def stop(self) -> Deferred[None]:
        """Stop every worker; fires when all in-progress deliveries ended."""
        d = DeferredList([w.stop() for w in self.workers.values()], consumeErrors=True)
        leases = self.leases
        if leases is not None:
            # Released once the deliveries in progress ended, so the next
            # holder does not deliver them a second time.
            d.addCallback(lambda _: leases.stop())
        return d.addCallback(lambda _: None)

