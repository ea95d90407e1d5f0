"""In-package fakes for unit tests of the protocol and receiver."""

from __future__ import annotations

from collections.abc import Sequence

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from mllpd.outbox import AuditRecord, Backlog, Envelope, IOutbox, OutboxError, StoreResult

__all__ = ["MemoryOutbox"]


@implementer(IOutbox)
class MemoryOutbox:
    """An outbox in a list. With ``hold=True`` commits wait for the test to
    call :meth:`commit` or :meth:`fail`, so ordering can be exercised.
    """

    def __init__(self, hold: bool = False) -> None:
        self.hold = hold
        self.stored: list[Envelope] = []
        self.waiting: list[tuple[Envelope, Deferred[StoreResult]]] = []
        # Batches waiting for commit_batch() or fail_batch(), with hold=True.
        self.waiting_batches: list[tuple[list[Envelope], Deferred[list[StoreResult]]]] = []
        self.closed = False
        self.audits: list[AuditRecord] = []
        self.pending = Backlog(0, 0)

    def _key(self, e: Envelope) -> tuple[str, str, str, str]:
        return (e.control_id, e.sending_app, e.sending_fac, e.sha256)

    def _store_now(self, e: Envelope) -> StoreResult:
        for old in self.stored:
            if self._key(old) == self._key(e):
                return StoreResult(old.message_id, True)
        self.stored.append(e)
        return StoreResult(e.message_id, False)

    def store(self, envelope: Envelope) -> Deferred[StoreResult]:
        if self.closed:
            raise AssertionError("store after close")
        if not self.hold:
            return succeed(self._store_now(envelope))
        d: Deferred[StoreResult] = Deferred()
        self.waiting.append((envelope, d))
        return d

    def store_batch(self, envelopes: Sequence[Envelope]) -> Deferred[list[StoreResult]]:
        if self.closed:
            raise AssertionError("store after close")
        if not self.hold:
            return succeed([self._store_now(e) for e in envelopes])
        d: Deferred[list[StoreResult]] = Deferred()
        self.waiting_batches.append((list(envelopes), d))
        return d

    def commit_batch(self, index: int = 0) -> None:
        """Complete the waiting batch at ``index``: all its envelopes at once."""
        envelopes, d = self.waiting_batches.pop(index)
        d.callback([self._store_now(e) for e in envelopes])

    def fail_batch(self, index: int = 0) -> None:
        """Fail the waiting batch at ``index``: none of it is stored."""
        _, d = self.waiting_batches.pop(index)
        d.errback(OutboxError("database or disk is full"))

    def commit(self, index: int = 0) -> None:
        """Complete the waiting store at ``index``."""
        envelope, d = self.waiting.pop(index)
        d.callback(self._store_now(envelope))

    def fail(self, index: int = 0) -> None:
        """Fail the waiting store at ``index``, as a full disk would."""
        _, d = self.waiting.pop(index)
        d.errback(OutboxError("database or disk is full"))

    def audit(self, record: AuditRecord) -> None:
        self.audits.append(record)

    def backlog(self) -> Backlog:
        return self.pending

    def close(self) -> Deferred[None]:
        self.closed = True
        return succeed(None)
