"""The outbox: durable storage of accepted messages.

Backends implement :class:`IOutbox`. A Deferred returned by ``store`` fires
only once the message is durable; any failure means the message was not
stored and the sender must get AR.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection
from typing import NamedTuple

from twisted.internet.defer import Deferred
from zope.interface import Interface

__all__ = [
    "AuditRecord",
    "Backlog",
    "Envelope",
    "IDeliveryQueue",
    "IOutbox",
    "OutboxError",
    "QueuedDelivery",
    "StoreResult",
    "dedup_key",
    "over_limit",
]


class OutboxError(Exception):
    """The outbox could not store or open; nothing was committed."""


class Envelope(NamedTuple):
    """A message ready to be stored, with what is known about it.

    A NamedTuple, not a frozen dataclass: one is built per message and a
    frozen dataclass's __init__ costs several times more.
    """

    message_id: str
    received_at: float
    peer: str
    control_id: str
    msg_type: str
    sending_app: str
    sending_fac: str
    version: str
    charset: str | None
    sha256: str
    ack_code: str
    payload: bytes
    # The TLS client certificate's subject, when the sender presented one.
    client_subject: str | None = None
    # Connectors whose filter matched: one queue row each, in the same commit.
    routes: tuple[str, ...] = ()
    # The message's order key for each route (same order; empty: all 0).
    lanes: tuple[int, ...] = ()

    @property
    def size(self) -> int:
        return len(self.payload)


class StoreResult(NamedTuple):
    """What became of an envelope: stored, or a duplicate of ``message_id``."""

    message_id: str
    duplicate: bool


class AuditRecord(NamedTuple):
    """What became of a message that was not stored (a NAK): the audit trail
    of stored messages is written from their envelope in the same commit."""

    received_at: float
    peer: str
    client_subject: str | None
    control_id: str
    msg_type: str
    size: int
    sha256: str
    ack_code: str
    rule: str | None = None


class QueuedDelivery(NamedTuple):
    """One row of a connector's queue, with its message."""

    seq: int
    message_id: str
    connector: str
    attempts: int
    next_attempt: float
    received_at: float
    control_id: str
    msg_type: str
    charset: str | None
    payload: bytes
    # The order key: rows with the same one are delivered strictly in order.
    lane: int = 0


class Backlog(NamedTuple):
    """Messages still to deliver (pending or in flight on any connector)."""

    messages: int
    size: int


def dedup_key(control_id: str, sending_app: str, sending_fac: str, sha256: str) -> int:
    """The one integer a duplicate is looked up by: the first 8 bytes (signed,
    as SQLite and PostgreSQL store a 64-bit integer) of a hash of MSH-10,
    MSH-3, MSH-4 and the payload's SHA-256. A lookup still compares the
    fields themselves, so a collision can only cost a second row read."""
    digest = hashlib.blake2b(
        "\x00".join((control_id, sending_app, sending_fac, sha256)).encode("utf-8", "surrogatepass"),
        digest_size=8,
    ).digest()
    return int.from_bytes(digest, "big", signed=True)


def over_limit(backlog: Backlog, max_messages: int | None, max_bytes: int | None) -> bool:
    """Past MLLP_MAX_OUTBOX (a message count, a size, or neither)."""
    return (max_messages is not None and backlog.messages >= max_messages) or (
        max_bytes is not None and backlog.size >= max_bytes
    )


class IOutbox(Interface):
    """Durable message storage and the per-connector delivery queues."""

    def store(envelope: Envelope) -> Deferred[StoreResult]:
        """Store durably, with one queue row per route and an audit record;
        fires once committed, fails with OutboxError."""

    def audit(record: AuditRecord) -> None:
        """Record a message that was not stored; written with the next commit."""

    def backlog() -> Backlog:
        """The undelivered messages, as of the last count plus stores since."""

    def close() -> Deferred[None]:
        """Finish commits in progress, then release the storage."""


class IDeliveryQueue(Interface):
    """The per-connector FIFO queues the relay works from."""

    def fetch(
        connector: str,
        after: int,
        limit: int,
        skip_lanes: Collection[int] = (),
        skip_seqs: Collection[int] = (),
    ) -> Deferred[list[QueuedDelivery]]:
        """The next pending or in-flight rows of a queue with seq > after, in
        order, leaving out rows of ``skip_lanes`` and the rows ``skip_seqs``
        (the relay's lanes already busy, and rows it finished whose state
        change may not be committed yet)."""

    def mark_in_flight(seq: int, now: float) -> Deferred[None]:
        """A delivery attempt starts."""

    def mark_delivered(seq: int, now: float) -> Deferred[None]:
        """Upstream took it."""

    def mark_retry(seq: int, attempts: int, error: str, next_attempt: float, now: float) -> Deferred[None]:
        """It failed; back to pending, to be tried at ``next_attempt``."""

    def mark_dead(seq: int, attempts: int, error: str, now: float) -> Deferred[None]:
        """Into the dead-letter queue."""
