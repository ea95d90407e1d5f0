"""Delivery workers: one per connector, strictly in queue order.

A worker reads the head of its connector's queue, hands one message at a
time to the connector and records the outcome: delivered, retried later with
exponential backoff and jitter (the same message stays at the head, so order
holds), or moved to the dead-letter queue once upstream refuses it for good
or the attempts run out.

State changes go into the outbox's group commit without the worker waiting
for them: a crash before they are durable only means the message is
delivered again, with the same message id as its idempotency key.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from mllpd.connectors import (
    Dead,
    Delivered,
    Delivery,
    IBatchConnector,
    IConnector,
    Outcome,
    Retry,
)
from mllpd.hl7 import codec_for_charset
from mllpd.outbox import IDeliveryQueue, QueuedDelivery

__all__ = ["Relay", "Worker"]

log = Logger(namespace="mllpd.relay")

# Rows read from a queue at a time, and how often an idle worker looks
# again on its own (new stores wake it at once; this catches replays that
# mllp-cli writes from another process).
FETCH_LIMIT = 32
# Rows read at once to gather an HL7 batch a connector forwards whole; the
# batch itself was bounded by MLLP_MAX_BATCH_MESSAGES and the frame size.
BATCH_FETCH_LIMIT = 10_000
POLL_INTERVAL = 1.0
# Seconds a stopping worker waits for the delivery in progress, then for its
# connector to close: together well inside the 2 s that the shutdown bound
# (PRE_SHUTDOWN_DELAY + SHUTDOWN_TIMEOUT + 2 s) leaves after the drain.
STOP_TIMEOUT = 1.0
CLOSE_TIMEOUT = 0.5


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


class RetryPolicy(Protocol):
    max_attempts: int
    max: float

    def delay(self, attempt: int, rand: Callable[[], float]) -> float: ...


class Leases(Protocol):
    def start(self) -> None: ...

    def stop(self) -> Deferred[None]: ...


class DeliveryMetrics(Protocol):
    def delivery(self, connector: str, result: str) -> None: ...

    def dead_letter(self, connector: str) -> None: ...


def _loggable(reason: str) -> str:
    """The kind of a failure without upstream's free text (an upstream ERR
    text may quote patient data); the whole reason is in the queue row."""
    return reason.split(":", 1)[0][:120]


class Worker:
    """Delivers one connector's queue."""

    def __init__(
        self,
        connector: IConnector,
        queue: IDeliveryQueue,
        retry: RetryPolicy,
        clock: IReactorTime,
        *,
        wall_clock: Callable[[], float] | None = None,
        rand: Callable[[], float] = random.random,
        metrics: DeliveryMetrics | None = None,
    ) -> None:
        self.connector = connector
        self.name: str = connector.name
        self.queue = queue
        self.retry = retry
        self.clock = clock
        self._now = wall_clock or clock.seconds
        self.rand = rand
        self.metrics = metrics
        self.forward_batches = bool(
            IBatchConnector.providedBy(connector) and connector.forward_batches
        )
        self.cursor = 0
        # Rows this worker finished, as a queue read by state (PostgreSQL)
        # may still show them pending: seq -> None until the state change
        # committed, then how many reads had started by then. A read that
        # started later sees the change, and ends the entry.
        self._finishing: dict[int, int | None] = {}
        self._reads = 0
        # False while another replica holds this connector's lease.
        self.active = True
        self._reads_ok = True
        self._buffer: list[QueuedDelivery] = []
        self._stale = False
        self._running = False
        self._notified = False
        self._wake: Deferred[None] | None = None
        self._timer: IDelayedCall | None = None
        self._done: Deferred[None] | None = None
        self.delivered = 0
        self.retried = 0
        self.dead = 0

    def start(self) -> None:
        self._running = True
        self.connector.start()
        self._done = Deferred.fromCoroutine(self._run())
        self._done.addErrback(self._crashed)

    def notify(self) -> None:
        """New rows were committed to this queue."""
        # Remembered, so a notice that arrives during a read is not lost.
        self._notified = True
        self._fire_wake()

    def stop(self, timeout: float = STOP_TIMEOUT) -> Deferred[None]:
        """Start no other delivery; let the one in progress finish for up to
        ``timeout`` seconds, then close the connector, waiting for that at
        most CLOSE_TIMEOUT more. An unfinished delivery's row stays in its
        queue and is delivered again later (same message id)."""
        self._running = False
        self._fire_wake()
        finished = self._done if self._done is not None else succeed(None)
        d = _within(finished, timeout, self.clock)
        return d.addCallback(
            lambda _: _within(maybeDeferred(self.connector.stop), CLOSE_TIMEOUT, self.clock)
        )

    def pause(self) -> None:
        """Start no other delivery (the lease is lost) until resume(); the
        one in progress, if any, finishes."""
        self.active = False
        self._buffer = []
        self._fire_wake()

    def resume(self) -> None:
        """Deliver again (the lease is ours), from the queue as it is now."""
        self.active = True
        self._buffer = []
        self._fire_wake()

    def _fire_wake(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        wake, self._wake = self._wake, None
        if wake is not None:
            wake.callback(None)

    def _sleep(self, seconds: float) -> Deferred[None]:
        """Wait ``seconds`` or until notified, whichever is first."""
        wake: Deferred[None] = Deferred()
        self._wake = wake
        self._timer = self.clock.callLater(max(seconds, 0.0), self._fire_wake)
        return wake

    async def _run(self) -> None:
        while self._running:
            if not self.active:
                await self._sleep(POLL_INTERVAL)
                continue
            if not self._buffer or self._stale:
                self._notified = False
                self._stale = False
                self._reads += 1
                read = self._reads
                try:
                    fetched = await self.queue.fetch(self.name, self.cursor, FETCH_LIMIT)
                except Exception as e:  # noqa: BLE001 - storage trouble: try again later
                    if self._reads_ok:  # once per outage, not once per poll
                        log.error(
                            "reading queue of {connector} failed: {reason}",
                            event="queue_read_failed", connector=self.name, reason=str(e),
                        )
                    self._reads_ok = False
                else:
                    if not self._reads_ok:
                        log.info("reading queue of {connector} works again",
                                 event="queue_read_recovered", connector=self.name)
                    self._reads_ok = True
                    self._buffer = self._merge(fetched)
                    finishing = self._finishing
                    for seq in [s for s, at in finishing.items() if at is not None and at < read]:
                        del finishing[seq]
                if not self._buffer:
                    if self._running and not self._notified:
                        await self._sleep(POLL_INTERVAL)
                    continue
            if not self.active or not self._buffer:
                continue  # paused during the read
            head = self._buffer[0]
            wait = head.next_attempt - self._now()
            if wait > 0:
                await self._sleep(wait)
                if self._now() >= head.next_attempt:
                    # During the backoff mllp-cli may have deleted or purged
                    # the rows in hand: read the queue again rather than
                    # retry a removed message forever (and deliver it once
                    # upstream is back). Once per retry, not on every wake.
                    self._stale = True
                continue
            if self.forward_batches and head.batch_control_id is not None:
                group = await self._batch_group()
                if len(group) > 1:
                    await self._attempt_batch(group)
                    continue
            await self._attempt(head)

    def _merge(self, fetched: list[QueuedDelivery]) -> list[QueuedDelivery]:
        """A new head of the queue. Rows already in hand keep their attempts
        and backoff as this worker knows them (its own marks may not be
        committed yet); rows it finished stay out."""
        known = {row.seq: row for row in self._buffer}
        finishing = self._finishing
        return [known.get(row.seq, row) for row in fetched if row.seq not in finishing]

    async def _batch_group(self) -> list[QueuedDelivery]:
        """The rows at the head of the buffer that came in the head's batch:
        the same batch control id, positions rising, all due."""
        group = _leading_batch(self._buffer, self._now())
        if len(group) == len(self._buffer) and len(self._buffer) < BATCH_FETCH_LIMIT:
            # The batch may go on past the rows in hand.
            try:
                fetched = await self.queue.fetch(self.name, self.cursor, BATCH_FETCH_LIMIT)
            except Exception:  # noqa: BLE001 - deliver what is in hand
                return group
            self._buffer = self._merge(fetched)
            group = _leading_batch(self._buffer, self._now())
        return group

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

    async def _attempt_batch(self, rows: list[QueuedDelivery]) -> None:
        """Forward a batch whole. Outcomes are taken in order: once one
        message must be retried, it and every later one are retried
        together, so the queue's order holds (at least once, as ever)."""
        now = self._now()
        for row in rows:
            self._record(self.queue.mark_in_flight(row.seq, now))
        deliveries = [self._delivery(row, row.attempts + 1) for row in rows]
        connector: Any = self.connector
        try:
            outcomes: list[Outcome] = await maybeDeferred(
                connector.deliver_batch, deliveries, rows[0].batch_control_id
            )
        except Exception as e:  # noqa: BLE001 - a connector bug must not stop the queue
            log.failure(
                "connector {connector} raised", Failure(), event="connector_error",
                connector=self.name, control_id=rows[0].control_id,
            )
            outcomes = [Retry(f"internal error: {type(e).__name__}")] * len(rows)
        retry: Retry | None = None
        position = 0  # the row's index in the buffer: finished rows leave it
        retry_at: float | None = None
        for row, outcome in zip(rows, outcomes, strict=True):
            if retry is None and isinstance(outcome, Retry):
                retry = outcome
            kept = self._settle(row, row.attempts + 1, retry or outcome, position, retry_at)
            if kept is not None:
                position += 1
                retry_at = kept

    async def _attempt(self, row: QueuedDelivery) -> None:
        attempt = row.attempts + 1
        now = self._now()
        self._record(self.queue.mark_in_flight(row.seq, now))
        delivery = self._delivery(row, attempt)
        try:
            outcome: Outcome = await maybeDeferred(self.connector.deliver, delivery)
        except Exception as e:  # noqa: BLE001 - a connector bug must not stop the queue
            log.failure(
                "connector {connector} raised", Failure(), event="connector_error",
                connector=self.name, control_id=row.control_id,
            )
            outcome = Retry(f"internal error: {type(e).__name__}")
        self._settle(row, attempt, outcome)

    def _settle(
        self,
        row: QueuedDelivery,
        attempt: int,
        outcome: Outcome,
        position: int = 0,
        retry_at: float | None = None,
    ) -> float | None:
        """Record an outcome for the row at ``position`` in the buffer;
        returns its next attempt's time when it stays queued. A row behind
        another that stays queued is never dead-lettered past it, and is
        retried at ``retry_at`` with it."""
        now = self._now()
        fields: dict[str, Any] = dict(
            connector=self.name, message_id=row.message_id, control_id=row.control_id,
            msg_type=row.msg_type, attempt=attempt,
        )
        if isinstance(outcome, Delivered):
            self._finish(row, self.queue.mark_delivered(row.seq, now))
            self.delivered += 1
            self._count("delivered")
            log.debug("delivered to {connector}", event="delivered", **fields)
            return None
        if isinstance(outcome, Dead) or (attempt >= self.retry.max_attempts and position == 0):
            reason = outcome.reason
            if not isinstance(outcome, Dead):
                reason = f"gave up after {attempt} attempts: {reason}"
            self._finish(row, self.queue.mark_dead(row.seq, attempt, reason, now))
            self.dead += 1
            self._count("dead")
            if self.metrics is not None:
                self.metrics.dead_letter(self.name)
            log.warn(
                "dead-lettered for {connector}: {reason}", event="dead_letter",
                reason=_loggable(reason), **fields,
            )
            return None
        if retry_at is not None:
            next_attempt = retry_at
        elif outcome.after is not None:
            # Upstream's Retry-After, but never longer than the policy allows.
            next_attempt = now + min(max(outcome.after, 0.0), self.retry.max)
        else:
            next_attempt = now + self.retry.delay(attempt, self.rand)
        delay = next_attempt - now
        if position < len(self._buffer) and self._buffer[position].seq == row.seq:
            # (Not after a pause: the buffer was dropped.)
            self._buffer[position] = row._replace(attempts=attempt, next_attempt=next_attempt)
        self._record(self.queue.mark_retry(row.seq, attempt, outcome.reason, next_attempt, now))
        self.retried += 1
        self._count("retry")
        log.info(
            "delivery to {connector} failed, retry in {delay:.1f}s: {reason}",
            event="delivery_retry", delay=delay, reason=_loggable(outcome.reason),
            **fields,
        )
        return next_attempt

    def _finish(self, row: QueuedDelivery, marked: Deferred[None]) -> None:
        if self._buffer and self._buffer[0].seq == row.seq:
            self._buffer.pop(0)
        self.cursor = max(self.cursor, row.seq)
        self._finishing[row.seq] = None

        def settled(result: object) -> object:
            if isinstance(result, Failure):
                # Not recorded: the row stays pending and is delivered again.
                self._finishing.pop(row.seq, None)
            elif row.seq in self._finishing:
                self._finishing[row.seq] = self._reads
            return result

        self._record(marked.addBoth(settled))

    def _count(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.delivery(self.name, result)

    def _record(self, d: Deferred[None]) -> None:
        d.addErrback(self._record_failed)

    def _record_failed(self, failure: Failure) -> None:
        # Not fatal: the row keeps its last durable state and is delivered
        # again after a restart (at least once).
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

