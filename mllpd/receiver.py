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
from mllpd.batch import (
    ONE_MESSAGE_PER_FRAME,
    Batch,
    BatchError,
    build_batch_ack,
    has_several_messages,
    head_error,
    is_batch,
    parse_batch,
    reject_header,
)
from mllpd.hl7 import (
    DecodeError,
    Header,
    Message,
    NotHL7Error,
    UnknownCharsetError,
    WideCharsetError,
    max_length,
    parse_message,
)
from mllpd.identities import ClientIdentities
from mllpd.outbox import (
    AuditRecord,
    Backlog,
    Envelope,
    IOutbox,
    OutboxError,
    StoreResult,
    over_limit,
)
from mllpd.rules import ModelLimitError, RuleError, RuleSet

__all__ = ["Receiver", "Reply"]

SUPPORTED_MAJOR = 2
# MLLP_MAX_BATCH_MESSAGES's default: messages one HL7 batch may hold.
MAX_BATCH_MESSAGES = 10_000


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
    # For an HL7 batch: one reply per contained message, in batch order.
    parts: tuple[Reply, ...] = ()


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
        max_batch_messages: int = MAX_BATCH_MESSAGES,
    ) -> None:
        self.outbox = outbox
        self.clock = clock
        self.default_charset = default_charset
        self.validator = validator
        # MLLP_CLIENT_IDENTITIES: which MSH-3/MSH-4 a client certificate may use.
        self.identities = identities
        self.rules = rules
        self.max_messages, self.max_bytes = max_outbox
        self.max_batch_messages = max_batch_messages
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
        if payload[:3] != b"MSH" and is_batch(payload):
            return Deferred.fromCoroutine(
                self._receive_batch(payload, peer, client_subject, client_names)
            )
        d = self._decide(payload, peer, client_subject, client_names)
        return d.addCallback(self._audit_nak, payload, peer, client_subject)

    def _audit_nak(
        self,
        reply: Reply,
        payload: bytes,
        peer: str,
        client_subject: str | None,
        batch_control_id: str | None = None,
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
                batch_control_id=batch_control_id,
            ))
        return reply

    def _decide(
        self,
        payload: bytes,
        peer: str,
        client_subject: str | None,
        client_names: frozenset[str],
    ) -> Deferred[Reply]:
        message = self._check(payload, client_names, self.default_charset)
        if isinstance(message, Reply):
            return succeed(message)
        if self.validator is not None:
            return self.validator(message).addCallback(
                self._validated, message, peer, client_subject
            )
        return self._store(message, peer, client_subject)

    def _check(
        self,
        payload: bytes,
        client_names: frozenset[str],
        default_charset: str | None,
        in_batch: bool = False,
    ) -> Reply | Message:
        """Parse and check the header and identity: the message, or its NAK."""
        try:
            message = parse_message(payload, default_charset)
        except NotHL7Error as e:
            return self._reply(
                None, "iso8859-1", REJECT, AckError("100", str(e)), payload, in_batch=in_batch
            )
        except DecodeError as e:
            too_long = overlong_field(e.header)
            if too_long is not None:
                return self._reply(
                    e.header, "iso8859-1", REJECT, too_long, payload, in_batch=in_batch
                )
            if isinstance(e, WideCharsetError):
                # The frame may have been cut inside a character: refuse it.
                error = AckError("103", str(e), "MSH", 18)
                return self._reply(
                    e.header, "iso8859-1", REJECT, error, payload, in_batch=in_batch
                )
            code = "103" if isinstance(e, UnknownCharsetError) else "102"
            error = AckError(code, str(e), "MSH", 18)
            return self._reply(e.header, "iso8859-1", ERROR, error, payload, in_batch=in_batch)
        if not in_batch and has_several_messages(payload):
            # Stored as one, the second message would be forwarded glued to
            # the first and its sender would never get its ACK.
            error = AckError("100", ONE_MESSAGE_PER_FRAME)
            return self._reply(
                message.header, message.codec, ERROR, error, payload, in_batch=in_batch
            )
        problem = self.check_header(message.header)
        if problem is not None:
            outcome, error = problem
            return self._reply(
                message.header, message.codec, outcome, error, payload, in_batch=in_batch
            )
        if self.identities is not None:
            problem = self.identities.check(client_names, message.header)
            if problem is not None:
                outcome, error = problem
                return self._reply(
                    message.header, message.codec, outcome, error, payload, in_batch=in_batch
                )
        return message

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
        envelope = self._admit(message, peer, client_subject)
        if isinstance(envelope, Reply):
            return succeed(envelope)
        d = self.outbox.store(envelope)
        return d.addCallbacks(
            self._stored,
            self._not_stored,
            callbackArgs=(message,),
            errbackArgs=(message,),
        )

    def _admit(
        self,
        message: Message,
        peer: str,
        client_subject: str | None,
        batch_control_id: str | None = None,
        batch_position: int | None = None,
        ahead: Backlog | None = None,
    ) -> Reply | Envelope:
        """Room, rules and routes: the envelope to store, or the NAK.

        ``ahead``: what the earlier members of the same batch will add to the
        backlog when their commit lands (nothing of a batch is counted before).
        """
        in_batch = batch_control_id is not None
        header = message.header
        payload = message.raw
        if not self.accepting:
            error = AckError("207", "server is shutting down; resend later")
            return self._reply(header, message.codec, REJECT, error, payload, in_batch=in_batch)
        limited = self.max_messages is not None or self.max_bytes is not None
        backlog = self.outbox.backlog() if limited else None
        if backlog is not None and ahead is not None:
            backlog = Backlog(backlog.messages + ahead.messages, backlog.size + ahead.size)
        if backlog is not None and over_limit(backlog, self.max_messages, self.max_bytes):
            error = AckError("207", "outbox is full (MLLP_MAX_OUTBOX); resend later")
            return self._reply(header, message.codec, REJECT, error, payload, in_batch=in_batch)
        routes: tuple[str, ...] = ()
        lanes: tuple[int, ...] = ()
        if self.rules is not None:
            try:
                model = self.rules.model(message)
            except ModelLimitError as e:
                error = AckError("207", f"message too large for rules: {e}")
                return self._reply(header, message.codec, ERROR, error, payload, in_batch=in_batch)
            violation = self.rules.check(model)
            if violation is not None:
                outcome = ERROR if violation.ack == "AE" and not violation.error else REJECT
                error = AckError("207", f"rule {violation.rule}: {violation.message}")
                reply = self._reply(
                    header, message.codec, outcome, error, payload, in_batch=in_batch
                )
                return reply._replace(rule=violation.rule)
            try:
                routes = self.rules.route(model)
            except RuleError as e:
                error = AckError("207", f"routing failed: {e}")
                return self._reply(
                    header, message.codec, REJECT, error, payload, in_batch=in_batch
                )
            if routes:
                lanes = self.rules.lanes(model, message, routes)
        return Envelope(
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
            batch_control_id=batch_control_id,
            batch_position=batch_position,
            lanes=lanes,
        )

    def _stored(self, stored: StoreResult, message: Message) -> Reply:
        return self._reply(
            message.header, message.codec, ACCEPT, None, message.raw, stored.duplicate
        )

    def _not_stored(self, failure: Failure, message: Message, in_batch: bool = False) -> Reply:
        failure.trap(OutboxError)
        error = AckError("207", "message could not be stored; resend later")
        return self._reply(
            message.header, message.codec, REJECT, error, message.raw, in_batch=in_batch
        )

    async def _receive_batch(
        self,
        payload: bytes,
        peer: str,
        client_subject: str | None,
        client_names: frozenset[str],
    ) -> Reply:
        """An HL7 batch: each message decided as if sent alone, the accepted
        ones stored in one transaction, one ACK each in a batch reply."""
        try:
            batch = parse_batch(payload, self.max_batch_messages)
        except BatchError as e:
            return self._batch_reject(e, payload, peer, client_subject)
        default_charset = "UNICODE UTF-8" if batch.bom else self.default_charset
        decided: list[Reply | tuple[Message, Envelope]] = []
        ahead = Backlog(0, 0)  # the members admitted so far, for MLLP_MAX_OUTBOX
        items = list(batch.messages())
        for batch_id, position, raw in items:
            checked = self._check(raw, client_names, default_charset, in_batch=True)
            if isinstance(checked, Reply):
                decided.append(checked)
                continue
            if self.validator is not None:
                invalid = await self.validator(checked)
                if invalid is not None:
                    decided.append(self._reply(
                        checked.header, checked.codec, ERROR, invalid, checked.raw,
                        in_batch=True,
                    ))
                    continue
            admitted = self._admit(checked, peer, client_subject, batch_id, position, ahead)
            if isinstance(admitted, Reply):
                decided.append(admitted)
                continue
            decided.append((checked, admitted))
            if admitted.routes:  # as the outbox counts its backlog
                ahead = Backlog(ahead.messages + 1, ahead.size + len(admitted.payload))
        envelopes = [d[1] for d in decided if not isinstance(d, Reply)]
        stored: list[StoreResult] | None = None
        if envelopes:
            try:
                stored = await self.outbox.store_batch(envelopes)
            except OutboxError:
                stored = None
        results = iter(stored or ())
        replies: list[Reply] = []
        for decision, (batch_id, _, raw) in zip(decided, items, strict=True):
            if not isinstance(decision, Reply):
                message = decision[0]
                if stored is None:
                    reply = self._not_stored(Failure(OutboxError()), message, in_batch=True)
                else:
                    reply = self._stored(next(results), message)
            else:
                reply = decision
            replies.append(
                self._audit_nak(reply, raw, peer, client_subject, batch_id)
            )
        return self._batch_reply(batch, replies, payload)

    def _batch_reply(self, batch: Batch, replies: list[Reply], payload: bytes) -> Reply:
        acks: list[list[bytes]] = []
        it = iter(replies)
        for sub in batch.batches:
            acks.append([r.ack for r in itertools.islice(it, len(sub.messages)) if r.ack is not None])
        data = build_batch_ack(batch, acks, now=self._now(), new_id=self._ack_id)
        worst = max((r.outcome for r in replies), key=_SEVERITY.__getitem__, default=ACCEPT)
        return Reply(
            outcome=worst,
            code=f"{len(replies)} messages",
            ack=data,
            control_id=batch.batches[0].control_id,
            msg_type="batch",
            size=len(payload),
            parts=tuple(replies),
        )

    def head_refusal(self, head: bytes, text: str) -> Reply:
        """The AR (CR in enhanced mode) for a frame the protocol will not
        read whole (oversized, timed out, over MLLP_MAX_BUFFER), built from
        what its head shows: its MSH, or an HL7 batch's BHS (and FHS) for a
        batch-level AR; no bytes to send when neither survives."""
        error = AckError("207", text)
        if head and is_batch(head):
            batch = head_error(head, text)
            data = None
            if batch.batch_header is not None or batch.file_header is not None:
                # Not audited here: the protocol logs and counts a frame it
                # refuses to read.
                data = self._batch_reject(
                    batch, head, "", None, REJECT, error, audit=False
                ).ack
            return Reply(REJECT, "AR", data, "", "", len(head), error)
        header: Header | None = None
        codec = "iso8859-1"
        if head:
            try:
                message = parse_message(head, self.default_charset)
                header, codec = message.header, message.codec
            except DecodeError as e:
                # The salvaged head may end inside a multibyte character.
                header = e.header
            except NotHL7Error:
                pass
        if header is None:
            return Reply(REJECT, "AR", None, "", "", len(head), error)
        return self.refusal(header, codec, error, len(head))

    def _batch_reject(
        self,
        error: BatchError,
        payload: bytes,
        peer: str,
        client_subject: str | None,
        outcome: str = ERROR,
        reason: AckError | None = None,
        audit: bool = True,
    ) -> Reply:
        """One reject for a malformed batch; nothing in it is stored."""
        header = reject_header(error)
        reason = reason or AckError("100", str(error))
        # Always sent: a batch ACK without it would say every message was accepted.
        reply = self._reply(header, error.codec, outcome, reason, payload, in_batch=True)
        assert reply.ack is not None
        acks = [[reply.ack]]
        data = build_batch_ack(
            error, acks, now=self._now(), new_id=self._ack_id, comment=str(error)
        )
        reply = reply._replace(ack=data, msg_type="batch")
        if not audit:
            return reply
        return self._audit_nak(reply, payload, peer, client_subject, error.control_id)

    @staticmethod
    def check_header(header: Header) -> tuple[str, AckError] | None:
        """Fields within HL7's lengths, required MSH fields and a supported version."""
        too_long = overlong_field(header)
        if too_long is not None:
            return REJECT, too_long
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

    def refusal(self, header: Header | None, codec: str, error: AckError, size: int) -> Reply:
        """The AR (CR in enhanced mode) for a frame the protocol will not
        pass on, or cannot: built here, as every reply is, with this
        receiver's clock and ACK ids."""
        return self._reply(header, codec, REJECT, error, b"")._replace(size=size)

    def _reply(
        self,
        header: Header | None,
        codec: str,
        outcome: str,
        error: AckError | None,
        payload: bytes,
        duplicate: bool = False,
        in_batch: bool = False,
    ) -> Reply:
        code = ack.ack_code(outcome, header)
        data: bytes | None = None
        # In a batch ACK a message left out counts as accepted (acknowledgement
        # by exception), so one that was not stored always has its ACK there,
        # whatever its MSH-15 asks.
        if (in_batch and outcome != ACCEPT) or ack.should_send(outcome, header):
            text = ack.build_ack(
                header, outcome, now=self._now(), ack_id=self._ack_id(), error=error
            )
            data = ack.encode_ack(text, codec)
        return Reply(
            outcome=outcome,
            code=code,
            ack=data,
            control_id=header.bounded(10) if header is not None else "",
            msg_type=header.type_label if header is not None else "",
            size=len(payload),
            error=error,
            duplicate=duplicate,
        )


_SEVERITY = {ACCEPT: 0, ERROR: 1, REJECT: 2}


def overlong_field(header: Header | None) -> AckError | None:
    """AR's reason when an MSH field is longer than HL7 allows."""
    n = header.overlong() if header is not None else None
    if n is None:
        return None
    return AckError("102", f"MSH-{n} is longer than {max_length(n)} characters", "MSH", n)
