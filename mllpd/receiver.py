"""From payload to acknowledgement: parse, check, store, build the ACK."""

from __future__ import annotations

import hashlib
import itertools
import os
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import NamedTuple

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from mllpd import ack
from mllpd.ack import ACCEPT, ERROR, REJECT, AckError
from mllpd.hl7 import (
    DecodeError,
    Header,
    Message,
    NotHL7Error,
    UnknownCharsetError,
    parse_message,
)
from mllpd.identities import ClientIdentities
from mllpd.outbox import (
    AuditRecord,
    Envelope,
    IOutbox,
    OutboxError,
    StoreResult,
    over_limit,
)
from mllpd.rules import RuleError, RuleSet

__all__ = ["Receiver", "Reply"]

SUPPORTED_MAJOR = 2


class Reply(NamedTuple):
    """The outcome of one message and the bytes to send back (None: send none)."""

    outcome: str
    code: str
    ack: bytes | None
    control_id: str
    msg_type: str
    size: int
    error: AckError | None = None
    duplicate: bool = False
    rule: str | None = None  # the rule that refused the message


_ACK_PREFIX = os.urandom(5).hex()
_ack_counter = itertools.count(int.from_bytes(os.urandom(4), "big"))


def new_ack_id() -> str:
    """20 characters, fitting MSH-10 in every version (ST 20 in 2.3): a
    per-process random prefix and a counter, unique without a syscall each.
    """
    return f"{_ACK_PREFIX}{next(_ack_counter) & 0xFFFFFFFFFF:010x}"


def new_message_id() -> str:
    """32 hex digits: nanosecond time, then 64 random bits.

    Time first keeps ids in arrival order, so the outbox's unique index on
    them grows at one edge instead of touching a random page per insert
    (which cost a WAL page write per message in every commit).
    """
    return f"{time.time_ns():016x}{random.getrandbits(64):016x}"


StructureValidator = Callable[[Message], "Deferred[AckError | None]"]


class Receiver:
    """Turns received payloads into stored envelopes and ACK bytes."""

    def __init__(
        self,
        outbox: IOutbox,
        clock: IReactorTime,
        *,
        default_charset: str | None = None,
        validator: StructureValidator | None = None,
        ack_id: Callable[[], str] = new_ack_id,
        message_id: Callable[[], str] = new_message_id,
        identities: ClientIdentities | None = None,
        rules: RuleSet | None = None,
        max_outbox: tuple[int | None, int | None] = (None, None),
    ) -> None:
        self.outbox = outbox
        self.clock = clock
        self.default_charset = default_charset
        self.validator = validator
        # MLLP_CLIENT_IDENTITIES: which MSH-3/MSH-4 a client certificate may use.
        self.identities = identities
        self.rules = rules
        self.max_messages, self.max_bytes = max_outbox
        self._ack_id = ack_id
        self._message_id = message_id
        self.accepting = True
        self._second = -1
        self._second_dt = datetime.fromtimestamp(0, UTC)

    def receive(
        self,
        payload: bytes,
        peer: str,
        client_subject: str | None = None,
        client_names: frozenset[str] = frozenset(),
    ) -> Deferred[Reply]:
        """Decide, store when acceptable, and build the reply.

        ``client_subject`` and ``client_names`` (subject and SANs) come from
        the TLS client certificate, when the sender presented one.

        Every expected failure becomes a NAK; the Deferred fails only on a bug.
        Plain Deferreds rather than a coroutine: this runs once per message.
        """
        d = self._decide(payload, peer, client_subject, client_names)
        return d.addCallback(self._audit_nak, payload, peer, client_subject)

    def _audit_nak(
        self, reply: Reply, payload: bytes, peer: str, client_subject: str | None
    ) -> Reply:
        # A stored message's audit record is written in its own commit; a
        # refused one's here, with the next commit.
        if reply.outcome != ACCEPT:
            self.outbox.audit(AuditRecord(
                received_at=self.clock.seconds(),
                peer=peer,
                client_subject=client_subject,
                control_id=reply.control_id,
                msg_type=reply.msg_type,
                size=len(payload),
                sha256=hashlib.sha256(payload).hexdigest(),
                ack_code=reply.code,
                rule=reply.rule,
            ))
        return reply

    def _decide(
        self,
        payload: bytes,
        peer: str,
        client_subject: str | None,
        client_names: frozenset[str],
    ) -> Deferred[Reply]:
        try:
            message = parse_message(payload, self.default_charset)
        except NotHL7Error as e:
            return succeed(
                self._reply(None, "iso8859-1", REJECT, AckError("100", str(e)), payload)
            )
        except DecodeError as e:
            code = "103" if isinstance(e, UnknownCharsetError) else "102"
            error = AckError(code, str(e), "MSH", 18)
            return succeed(self._reply(e.header, "iso8859-1", ERROR, error, payload))
        problem = self.check_header(message.header)
        if problem is not None:
            outcome, error = problem
            return succeed(self._reply(message.header, message.codec, outcome, error, payload))
        if self.identities is not None:
            problem = self.identities.check(client_names, message.header)
            if problem is not None:
                outcome, error = problem
                return succeed(self._reply(message.header, message.codec, outcome, error, payload))
        if self.validator is not None:
            return self.validator(message).addCallback(
                self._validated, message, peer, client_subject
            )
        return self._store(message, peer, client_subject)

    def _validated(
        self,
        invalid: AckError | None,
        message: Message,
        peer: str,
        client_subject: str | None,
    ) -> Deferred[Reply] | Reply:
        if invalid is not None:
            return self._reply(message.header, message.codec, ERROR, invalid, message.raw)
        return self._store(message, peer, client_subject)

    def _store(
        self, message: Message, peer: str, client_subject: str | None
    ) -> Deferred[Reply]:
        header = message.header
        payload = message.raw
        if not self.accepting:
            error = AckError("207", "server is shutting down; resend later")
            return succeed(self._reply(header, message.codec, REJECT, error, payload))
        limited = self.max_messages is not None or self.max_bytes is not None
        if limited and over_limit(self.outbox.backlog(), self.max_messages, self.max_bytes):
            error = AckError("207", "outbox is full (MLLP_MAX_OUTBOX); resend later")
            return succeed(self._reply(header, message.codec, REJECT, error, payload))
        routes: tuple[str, ...] = ()
        lanes: tuple[int, ...] = ()
        if self.rules is not None:
            model = self.rules.model(message)
            violation = self.rules.check(model)
            if violation is not None:
                outcome = ERROR if violation.ack == "AE" and not violation.error else REJECT
                error = AckError("207", f"rule {violation.rule}: {violation.message}")
                reply = self._reply(header, message.codec, outcome, error, payload)
                return succeed(reply._replace(rule=violation.rule))
            try:
                routes = self.rules.route(model)
            except RuleError as e:
                error = AckError("207", f"routing failed: {e}")
                return succeed(self._reply(header, message.codec, REJECT, error, payload))
            if routes:
                lanes = self.rules.lanes(model, message, routes)
        envelope = Envelope(
            message_id=self._message_id(),
            received_at=self.clock.seconds(),
            peer=peer,
            control_id=header.control_id,
            msg_type=header.type_label,
            sending_app=header.field(3),
            sending_fac=header.field(4),
            version=header.version,
            charset=message.charset,
            sha256=hashlib.sha256(payload).hexdigest(),
            ack_code=ack.ack_code(ACCEPT, header),
            payload=payload,
            client_subject=client_subject,
            routes=routes,
            lanes=lanes,
        )
        d = self.outbox.store(envelope)
        return d.addCallbacks(
            self._stored,
            self._not_stored,
            callbackArgs=(message,),
            errbackArgs=(message,),
        )

    def _stored(self, stored: StoreResult, message: Message) -> Reply:
        return self._reply(
            message.header, message.codec, ACCEPT, None, message.raw, stored.duplicate
        )

    def _not_stored(self, failure: Failure, message: Message) -> Reply:
        failure.trap(OutboxError)
        error = AckError("207", "message could not be stored; resend later")
        return self._reply(message.header, message.codec, REJECT, error, message.raw)

    @staticmethod
    def check_header(header: Header) -> tuple[str, AckError] | None:
        """Required MSH fields and a supported version."""
        for n, name, value in (
            (9, "message type", header.msg_type),
            (10, "message control id", header.control_id),
            (12, "version id", header.version),
        ):
            if not value.strip():
                return ERROR, AckError("101", f"MSH-{n} ({name}) is required", "MSH", n)
        version = ack.version_tuple(header.version)
        if version is None or version[0] != SUPPORTED_MAJOR:
            return REJECT, AckError("203", "unsupported HL7 version in MSH-12", "MSH", 12)
        return None

    def _now(self) -> datetime:
        # MSH-7 has one-second precision; one datetime per second lets the
        # ACK builder reuse its formatted timestamp.
        second = int(self.clock.seconds())
        if second != self._second:
            self._second = second
            self._second_dt = datetime.fromtimestamp(second, UTC)
        return self._second_dt

    def _reply(
        self,
        header: Header | None,
        codec: str,
        outcome: str,
        error: AckError | None,
        payload: bytes,
        duplicate: bool = False,
    ) -> Reply:
        code = ack.ack_code(outcome, header)
        data: bytes | None = None
        if ack.should_send(outcome, header):
            text = ack.build_ack(
                header, outcome, now=self._now(), ack_id=self._ack_id(), error=error
            )
            data = ack.encode_ack(text, codec)
        return Reply(
            outcome=outcome,
            code=code,
            ack=data,
            control_id=header.control_id if header is not None else "",
            msg_type=header.type_label if header is not None else "",
            size=len(payload),
            error=error,
            duplicate=duplicate,
        )
