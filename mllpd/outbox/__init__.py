"""The outbox: durable storage of accepted messages.

Backends implement :class:`IOutbox`. A Deferred returned by ``store`` fires
only once the message is durable; any failure means the message was not
stored and the sender must get AR.
"""

from __future__ import annotations

from typing import NamedTuple

from twisted.internet.defer import Deferred
from zope.interface import Interface

__all__ = ["Envelope", "IOutbox", "OutboxError", "StoreResult"]


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

    @property
    def size(self) -> int:
        return len(self.payload)


class StoreResult(NamedTuple):
    """What became of an envelope: stored, or a duplicate of ``message_id``."""

    message_id: str
    duplicate: bool


class IOutbox(Interface):
    """Durable message storage."""

    def store(envelope: Envelope) -> Deferred[StoreResult]:
        """Store durably; fires once committed, fails with OutboxError."""

    def close() -> Deferred[None]:
        """Finish commits in progress, then release the storage."""
