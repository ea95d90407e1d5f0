"""The outbox: durable storage of accepted messages.

Backends implement :class:`IOutbox`. A Deferred returned by ``store`` fires
only once the message is durable; any failure means the message was not
stored and the sender must get AR.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Sequence
from typing import NamedTuple

from twisted.internet.defer import Deferred
from zope.interface import Interface

__all__ = [
    "AUDIT_LIMITS",
    "AuditRecord",
    "Backlog",
    "Envelope",
    "IDeliveryQueue",
    "IOutbox",
    "OutboxError",
    "QueuedDelivery",
    "StoreResult",
    "bounded",
    "bounded_audit",
    "dedup_key",
    "over_limit",
]

# Audit fields a sender controls (directly, or through its certificate or a
# PROXY header) are kept to these lengths: a NAK's record lives for
# MLLP_RETENTION, and a 2 MiB MSH-10 must not become 2 MiB of audit trail
# per frame. 199 is MSH-10's longest HL7 length (v2.7 on), 15 MSH-9's.
AUDIT_LIMITS = {"peer": 128, "client_subject": 1024, "control_id": 199, "msg_type": 15}


def bounded(value: str, limit: int) -> str:
    """``value``, or its first ``limit`` characters marked with the full length."""
    if len(value) <= limit:
        return value
    return f"{value[:limit]}…[{len(value)} chars]"


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
    # Set when the message came in an HL7 batch: its BHS-11 and 1-based position.
    batch_control_id: str | None = None
    batch_position: int | None = None
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
    # The BHS-11 of the batch it came in, if it came in one.
    batch_control_id: str | None = None


def bounded_audit(record: AuditRecord) -> AuditRecord:
    """The record with every sender-controlled field within AUDIT_LIMITS."""
    subject = record.client_subject
    return record._replace(
        peer=bounded(record.peer, AUDIT_LIMITS["peer"]),
        client_subject=None if subject is None else bounded(subject, AUDIT_LIMITS["client_subject"]),
        control_id=bounded(record.control_id, AUDIT_LIMITS["control_id"]),
        msg_type=bounded(record.msg_type, AUDIT_LIMITS["msg_type"]),
    )


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
    # BHS-11 and position when the message came in an HL7 batch.
    batch_control_id: str | None = None
    batch_position: int | None = None
    # The order key: rows with the same one are delivered strictly in order.
    lane: int = 0


class Backlog(NamedTuple):
    """Messages still to deliver (pending or in flight on any connector)."""

    messages: int
    size: int


def dedup_key(sha256: str) -> int:
    """The one integer a duplicate is looked up by: the first 8 bytes of the
    payload's SHA-256 (signed, as SQLite and PostgreSQL store 64 bits). The
    payload holds MSH-3, MSH-4 and MSH-10, so equal payloads mean an equal
    (MSH-3, MSH-4, MSH-10, hash); a lookup still compares those fields."""
    try:
        return int(sha256[:16], 16) - (1 << 63)
    except ValueError:  # not hex: only hand-made rows have such hashes
        digest = hashlib.blake2b(sha256.encode("utf-8", "replace"), digest_size=8).digest()
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

    def store_batch(envelopes: Sequence[Envelope]) -> Deferred[list[StoreResult]]:
        """Store every envelope of an HL7 batch in one transaction: all of
        them or none; fires with one result each, in order, or fails with
        OutboxError."""

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
        """The next pending or in-flight rows of a queue, in order, leaving
        out rows of ``skip_lanes`` and the rows ``skip_seqs`` (the relay's
        lanes already busy, and rows it finished whose state change may not
        be committed yet). A backend whose seq order is its commit order
        (SQLite) may skip rows with seq <= after; one where concurrent
        commits make seqs visible out of order (PostgreSQL) reads by state
        alone."""

    def mark_in_flight(seq: int, now: float) -> Deferred[None]:
        """A delivery attempt starts."""

    def mark_delivered(seq: int, now: float) -> Deferred[None]:
        """Upstream took it."""

    def mark_retry(seq: int, attempts: int, error: str, next_attempt: float, now: float) -> Deferred[None]:
        """It failed; back to pending, to be tried at ``next_attempt``."""

    def mark_dead(seq: int, attempts: int, error: str, now: float) -> Deferred[None]:
        """Into the dead-letter queue."""
