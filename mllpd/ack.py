"""ACK and NAK building (pure: the time and the new control id are passed in)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache

from mllpd.hl7 import Header, escape, framing_safe, max_length

__all__ = [
    "ACCEPT",
    "DEFAULT_HEADER",
    "ERROR",
    "REJECT",
    "AckError",
    "ack_code",
    "build_ack",
    "encode_ack",
    "should_send",
    "version_tuple",
]

# Outcomes, independent of the acknowledgement mode.
ACCEPT = "A"
ERROR = "E"
REJECT = "R"

# HL7 table 0357, message error condition codes.
TABLE_0357 = {
    "0": "Message accepted",
    "100": "Segment sequence error",
    "101": "Required field missing",
    "102": "Data type error",
    "103": "Table value not found",
    "200": "Unsupported message type",
    "201": "Unsupported event code",
    "202": "Unsupported processing id",
    "203": "Unsupported version id",
    "204": "Unknown key identifier",
    "205": "Duplicate key identifier",
    "206": "Application record locked",
    "207": "Application internal error",
}

# What a payload without a usable MSH is answered with.
DEFAULT_HEADER = Header(fields=("MSH", "|", "^~\\&", "", "", "", "", "", "", "", "", "P", "2.5"))


@dataclass(frozen=True)
class AckError:
    """Why a message was not accepted: a table 0357 code and a short text.

    The text names the failing rule or field; it must never carry message
    content.
    """

    code: str
    text: str
    segment: str = ""
    position: int = 0


_VERSION = re.compile(r"(\d+)(?:\.(\d+))?(?:\.(\d+))?")


@lru_cache(maxsize=64)
def version_tuple(version: str) -> tuple[int, ...] | None:
    """``"2.3.1"`` -> (2, 3, 1); None when it is not a version number."""
    m = _VERSION.fullmatch(version.strip())
    if m is None:
        return None
    return tuple(int(g) for g in m.groups() if g is not None)


def ack_code(outcome: str, header: Header | None) -> str:
    """AA/AE/AR in original mode, CA/CE/CR when MSH-15 is valued."""
    enhanced = header is not None and bool(header.accept_ack_type)
    return ("C" if enhanced else "A") + outcome


def should_send(outcome: str, header: Header | None) -> bool:
    """Whether MSH-15 (AL, NE, ER, SU) asks for this commit acknowledgement."""
    mode = header.accept_ack_type if header is not None else ""
    if mode == "NE":
        return False
    if mode == "ER":
        return outcome != ACCEPT
    if mode == "SU":
        return outcome == ACCEPT
    return True


def _escaped_prefix(text: str, header: Header, limit: int) -> str:
    """The longest escaped prefix of ``text`` that fits ``limit``, never half a sequence."""
    out = ""
    for char in text:
        piece = escape(char, header)
        if len(out) + len(piece) > limit:
            break
        out += piece
    return out


@lru_cache(maxsize=8)
def _hl7_timestamp(now: datetime) -> str:
    stamp = now.strftime("%Y%m%d%H%M%S")
    offset = now.strftime("%z")
    return stamp + (offset or "+0000")


def _ack_type(header: Header, version: tuple[int, ...]) -> str:
    cs = header.component_sep
    trigger = framing_safe(header.trigger[: max_length(9)], header.escape_char)
    if version >= (2, 4):
        return f"ACK{cs}{trigger}{cs}ACK"
    if version >= (2, 3) and trigger:
        return f"ACK{cs}{trigger}"
    return "ACK"


def _err_segment(header: Header, version: tuple[int, ...], error: AckError) -> str:
    fs, cs, ss = header.field_sep, header.component_sep, header.subcomponent_sep
    code = error.code
    name = escape(TABLE_0357.get(code, "Application internal error"), header)
    text = escape(error.text, header)
    position = str(error.position) if error.position else ""
    if version >= (2, 5):
        location = (
            f"{error.segment}{cs}1{cs}{position}" if error.segment else ""
        )
        fields = ["ERR", "", location, f"{code}{cs}{name}{cs}HL70357", "E", "", "", "", text]
        return fs.join(fields)
    # 2.1-2.4: ERR-1 is ELD, whose fourth component is a CE in subcomponents.
    eld = cs.join(
        [error.segment, "1" if error.segment else "", position, f"{code}{ss}{text}{ss}HL70357"]
    )
    return f"ERR{fs}{eld}"


def build_ack(
    header: Header | None,
    outcome: str,
    *,
    now: datetime,
    ack_id: str,
    error: AckError | None = None,
) -> str:
    """Build the acknowledgement for a message as text, segments ending in CR.

    ``header`` is the received MSH, or None when none could be read: the NAK
    then uses standard delimiters and version 2.5.
    """
    h = header if header is not None else DEFAULT_HEADER
    if outcome != ACCEPT and error is None:
        # AE/AR always carry an ERR segment (HL7 v2 chapter 2).
        error = AckError("207", TABLE_0357["207"])
    fs = h.field_sep
    version = version_tuple(h.version) or (2, 5)
    code = ack_code(outcome, header)
    def echo(n: int) -> str:
        # Never whole when overlong; never a byte that ends the sender's frame.
        return framing_safe(h.bounded(n), h.escape_char)

    msh = [
        "MSH",
        h.encoding_chars,
        echo(5),
        echo(6),
        echo(3),
        echo(4),
        _hl7_timestamp(now),
        "",
        _ack_type(h, version),
        ack_id,
        echo(11) or "P",
        echo(12) or "2.5",
    ]
    if h.field(18):
        msh += ["", "", "", "", "", echo(18)]
    msa = ["MSA", code, echo(10)]
    if error is not None and version < (2, 7):
        msa.append(_escaped_prefix(error.text, h, 80))
    segments = [fs.join(msh), fs.join(msa)]
    if error is not None:
        segments.append(_err_segment(h, version, error))
    return "".join(s + "\r" for s in segments)


def encode_ack(text: str, codec: str) -> bytes:
    """Encode an ACK in the message's charset; unmappable characters become '?'."""
    return text.encode(codec, errors="replace")
