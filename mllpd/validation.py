"""Opt-in structure validation with hl7apy (MLLP_VALIDATE=structure).

hl7apy takes tens of milliseconds per message, so it runs on the reactor's
thread pool; the receive path without it never imports hl7apy.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool

from mllpd.ack import AckError
from mllpd.hl7 import Message

__all__ = ["check_structure", "structure_validator"]


def check_structure(text: str) -> AckError | None:
    """Validate strictly; an error names the failing element, never a value."""
    from hl7apy.consts import VALIDATION_LEVEL
    from hl7apy.exceptions import HL7apyException
    from hl7apy.parser import parse_message

    er7 = text.replace("\r\n", "\r").replace("\n", "\r")
    try:
        message = parse_message(er7, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
        message.validate()
    except (HL7apyException, ValueError, KeyError, IndexError, AttributeError) as e:
        # hl7apy raises plain errors on some malformed input. Only the error's
        # type is reported: hl7apy's texts can quote field values.
        return AckError("100", f"structure invalid: {type(e).__name__}")
    return None


def structure_validator(reactor: Any) -> Any:
    def validate(message: Message) -> Deferred[AckError | None]:
        return deferToThreadPool(reactor, reactor.getThreadPool(), check_structure, message.text)

    return validate
