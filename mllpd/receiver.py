"""From payload to acknowledgement: parse, check, store, build the ACK."""

from __future__ import annotations

import hashlib
import secrets
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from mllpd import ack
from mllpd.ack import ACCEPT, ERROR, REJECT, AckError
from mllpd.hl7 import DecodeError, Header, Message, NotHL7Error, parse_message
from mllpd.outbox import Envelope, IOutbox, OutboxError

__all__ = ["Receiver", "Reply"]

SUPPORTED_MAJOR = 2


@dataclass(frozen=True)
class Reply:
    """The outcome of one message and the bytes to send back (None: send none)."""

    outcome: str
    code: str
    ack: bytes | None
    control_id: str
    msg_type: str
    size: int
    error: AckError | None = None
    duplicate: bool = False


def new_ack_id() -> str:
    """20 characters: fits MSH-10 in every version (ST 20 in 2.3)."""
    return secrets.token_hex(10)


def new_message_id() -> str:
    return uuid.uuid4().hex


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
    ) -> None:
        self.outbox = outbox
        self.clock = clock
        self.default_charset = default_charset
        self.validator = validator
        self._ack_id = ack_id
        self._message_id = message_id
        self.accepting = True

    async def receive(self, payload: bytes, peer: str) -> Reply:
        """Decide, store when acceptable, and build the reply.

        Never raises: every failure becomes a NAK.
        """
        try:
            message = parse_message(payload, self.default_charset)
        except NotHL7Error as e:
            return self._reply(None, "iso8859-1", REJECT, AckError("100", str(e)), payload)
        except DecodeError as e:
            code = "103" if "unknown character set" in str(e) else "102"
            error = AckError(code, str(e), "MSH", 18)
            return self._reply(e.header, "iso8859-1", ERROR, error, payload)
        header = message.header
        problem = self.check_header(header)
        if problem is not None:
            outcome, error = problem
            return self._reply(header, message.codec, outcome, error, payload)
        if self.validator is not None:
            invalid = await self.validator(message)
            if invalid is not None:
                return self._reply(header, message.codec, ERROR, invalid, payload)
        if not self.accepting:
            error = AckError("207", "server is shutting down; resend later")
            return self._reply(header, message.codec, REJECT, error, payload)
        code = ack.ack_code(ACCEPT, header)
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
            ack_code=code,
            payload=payload,
        )
        try:
            stored = await self.outbox.store(envelope)
        except OutboxError:
            error = AckError("207", "message could not be stored; resend later")
            return self._reply(header, message.codec, REJECT, error, payload)
        return self._reply(header, message.codec, ACCEPT, None, payload, stored.duplicate)

    @staticmethod
    def check_header(header: Header) -> tuple[str, AckError] | None:
        """Required MSH fields and a supported version."""
        for n, name in ((9, "message type"), (10, "message control id"), (12, "version id")):
            if not header.component(n, 1).strip():
                return ERROR, AckError("101", f"MSH-{n} ({name}) is required", "MSH", n)
        version = ack.version_tuple(header.version)
        if version is None or version[0] != SUPPORTED_MAJOR:
            return REJECT, AckError("203", "unsupported HL7 version in MSH-12", "MSH", 12)
        return None

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
            now = datetime.fromtimestamp(self.clock.seconds(), UTC)
            text = ack.build_ack(header, outcome, now=now, ack_id=self._ack_id(), error=error)
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
