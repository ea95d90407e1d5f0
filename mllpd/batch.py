"""HL7 v2 batches (chapter 2, batch protocol): split a frame, build the reply.

A batch is ``[FHS] {BHS {MSH ...} BTS} [FTS]`` in one frame. Splitting works
on bytes, so each contained message keeps exactly the bytes it was sent
with; only the envelope segments (FHS, BHS, BTS, FTS) are read as text.
Nothing here touches I/O or the reactor.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime

from mllpd.ack import _hl7_timestamp
from mllpd.hl7 import (
    DEFAULT_MAX_LENGTH,
    MSH_MAX_LENGTH,
    Header,
    bad_encoding_characters,
    bad_field_separator,
    escape,
    first_line_bytes,
    framing_safe,
    strip_lead,
)

__all__ = [
    "ONE_MESSAGE_PER_FRAME",
    "Batch",
    "BatchError",
    "Envelope",
    "SubBatch",
    "build_batch_ack",
    "forward_payload",
    "head_error",
    "has_several_messages",
    "is_batch",
    "parse_batch",
    "reject_header",
]

_BLANK = b"\r\n\t "
_SEGMENT_END = re.compile(rb"\r\n|\r|\n")
_ENVELOPE_IDS = (b"FHS", b"BHS", b"BTS", b"FTS")

ONE_MESSAGE_PER_FRAME = (
    "more than one MSH in one frame: send one message per frame, "
    "or several in an HL7 batch (BHS ... BTS)"
)


def is_batch(payload: bytes) -> bool:
    """Whether the frame starts with a file or batch header (FHS or BHS)."""
    body, _ = strip_lead(payload[:64])
    return body[:3] in (b"FHS", b"BHS")


def has_several_messages(payload: bytes) -> bool:
    """Whether an MSH segment starts anywhere after the first one."""
    # One scan on the hot path: "MSH" rarely occurs again at all.
    at = payload.find(b"MSH", payload.find(b"MSH") + 3)
    while at > 0:
        if payload[at - 1] in (0x0D, 0x0A):
            return True
        at = payload.find(b"MSH", at + 3)
    return False


class Envelope:
    """An FHS, BHS, BTS or FTS segment, read by position: ``field(n)`` is XXX-n."""

    __slots__ = ("fields",)

    def __init__(self, fields: tuple[str, ...]) -> None:
        self.fields = fields

    def field(self, n: int) -> str:
        return self.fields[n] if n < len(self.fields) else ""

    def __repr__(self) -> str:
        return f"Envelope({self.fields[0]}, control_id={self.field(11)!r})"


@dataclass(frozen=True)
class SubBatch:
    """One BHS ... BTS: its header, its messages' exact bytes, its trailer.

    ``header`` is None for a file's messages sent without BHS (``FHS {MSH}
    FTS``, one implicit batch); ``trailer`` is None when BTS was left out.
    """

    header: Envelope | None
    messages: tuple[bytes, ...]
    trailer: Envelope | None
    control_id: str  # BHS-11; FHS-11 for the implicit batch


@dataclass(frozen=True)
class Batch:
    """A whole frame's batches, with the file header and trailer when sent."""

    file_header: Envelope | None
    batches: tuple[SubBatch, ...]
    file_trailer: Envelope | None
    bom: bool
    codec: str  # the envelope segments' text: utf-8 after a BOM, else byte for byte

    def messages(self) -> Iterator[tuple[str, int, bytes]]:
        """(BHS-11, 1-based position in its batch, exact bytes) of each message."""
        for sub in self.batches:
            for position, raw in enumerate(sub.messages, 1):
                yield sub.control_id, position, raw

    @property
    def count(self) -> int:
        return sum(len(sub.messages) for sub in self.batches)


class BatchError(ValueError):
    """The batch is malformed; nothing in it may be stored.

    Carries what was read of the envelope, so the reject can still name the
    batch (BHS-11) and answer with the sender's delimiters.
    """

    def __init__(
        self,
        text: str,
        *,
        file_header: Envelope | None = None,
        batch_header: Envelope | None = None,
        first_msh: bytes = b"",
        codec: str = "latin-1",
    ) -> None:
        super().__init__(text)
        self.file_header = file_header
        self.batch_header = batch_header
        self.first_msh = first_msh
        self.codec = codec

    @property
    def control_id(self) -> str:
        """The batch's BHS-11; the file's FHS-11 when no BHS was read."""
        envelope = self.batch_header or self.file_header
        return envelope.field(11) if envelope is not None else ""


def _segments(body: bytes) -> Iterator[tuple[int, int, bytes]]:
    """(start, end including its terminator, segment id) of each non-empty segment."""
    start = 0
    n = len(body)
    while start < n:
        m = _SEGMENT_END.search(body, start)
        end = m.end() if m is not None else n
        text_end = m.start() if m is not None else n
        if text_end > start and body[start:text_end].strip(_BLANK):
            yield start, end, body[start : start + 3]
        start = end


# Bytes that would end or restart the sender's MLLP frame, or a segment.
def envelope_max_length(n: int) -> int:
    """The longest value FHS-n or BHS-n may hold: the sender and receiver
    (3-6) as their MSH fields, the control ids (11, 12) as MSH-10, others 200."""
    if 3 <= n <= 6:
        return MSH_MAX_LENGTH[n]
    if n in (13, 14):  # network addresses (2.8), as MSH-24 and MSH-25
        return MSH_MAX_LENGTH[24]
    if n in (11, 12):
        return MSH_MAX_LENGTH[10]
    return DEFAULT_MAX_LENGTH


def _envelope(line: bytes, codec: str) -> Envelope:
    """An FHS or BHS read by position; ValueError naming a bad delimiter or
    an overlong field (the message never carries the field's value)."""
    text = line.rstrip(b"\r\n").decode(codec, errors="replace")
    name = text[:3]
    if len(text) < 8:
        raise ValueError(f"{name} segment is too short")
    fs = text[3]
    if bad_field_separator(fs):
        raise ValueError(f"{name}-1 field separator is not a delimiter character")
    rest = text[4:].split(fs)
    if bad_encoding_characters(rest[0], fs):
        raise ValueError(f"{name}-2 encoding characters are missing or invalid")
    for n, value in enumerate(rest[1:], 3):
        limit = envelope_max_length(n)
        if len(value) > limit:
            # Refused, never echoed or stored whole: nothing of it goes back.
            raise ValueError(f"{name}-{n} is longer than {limit} characters")
    return Envelope((name, fs, *rest))


def _trailer(line: bytes, codec: str, fs: str) -> Envelope:
    text = line.rstrip(b"\r\n").decode(codec, errors="replace")
    return Envelope(tuple(text.split(fs)))


def _count_mismatch(trailer: Envelope, name: str, what: str, found: int) -> str | None:
    declared = trailer.field(1).strip()
    if not declared:
        return None
    if not declared.isdigit() or int(declared) != found:
        return f"{name}-1 says {declared[:20]} {what}, the frame has {found}"
    return None


def parse_batch(payload: bytes, max_messages: int) -> Batch:
    """Split a batch frame into its messages.

    Raises :class:`BatchError` naming the problem when the envelope is
    malformed, a count disagrees, or there are more than ``max_messages``.
    """
    body, bom = strip_lead(payload)
    codec = "utf-8" if bom else "latin-1"
    file_header: Envelope | None = None
    file_trailer: Envelope | None = None
    batch_header: Envelope | None = None
    batches: list[SubBatch] = []
    messages: list[bytes] = []
    message_start: int | None = None
    first_msh = b""
    fs = "|"
    total = 0

    def fail(text: str) -> BatchError:
        return BatchError(
            text, file_header=file_header, batch_header=batch_header,
            first_msh=first_msh, codec=codec,
        )

    def close_message(at: int) -> None:
        nonlocal message_start
        if message_start is not None:
            messages.append(body[message_start:at])
            message_start = None

    # FHS {MSH} FTS: the file's messages without BHS are one implicit batch.
    implicit = False

    def close_batch(trailer: Envelope | None) -> None:
        nonlocal batch_header, messages, implicit
        if batch_header is not None:
            control_id = batch_header.field(11)
            batches.append(SubBatch(batch_header, tuple(messages), trailer, control_id))
        else:
            assert file_header is not None
            batches.append(SubBatch(None, tuple(messages), None, file_header.field(11)))
        batch_header = None
        implicit = False
        messages = []

    for start, end, seg_id in _segments(body):
        if file_trailer is not None:
            raise fail("segments after FTS")
        if seg_id == b"MSH":
            if not first_msh:
                first_msh = body[start:end]
            if batch_header is None and not implicit:
                if file_header is None or batches:
                    raise fail("MSH before BHS: messages of a batch follow its BHS")
                implicit = True
            close_message(start)
            total += 1
            if total > max_messages:
                raise fail(
                    f"batch has more than {max_messages} messages "
                    "(MLLP_MAX_BATCH_MESSAGES); send it in smaller batches"
                )
            message_start = start
            continue
        if seg_id not in _ENVELOPE_IDS:
            if message_start is None:
                name = seg_id.decode("latin-1", errors="replace")
                raise fail(f"{name!r} segment outside a message: each message starts with MSH")
            continue  # a segment of the message in progress
        close_message(start)
        line = body[start:end]
        try:
            if seg_id == b"FHS":
                if file_header is not None or batches or batch_header is not None:
                    raise fail("FHS must be the first segment, and only once")
                file_header = _envelope(line, codec)
                fs = file_header.field(1)
            elif seg_id == b"BHS":
                if batch_header is not None:
                    raise fail("BHS inside a batch: BTS missing")
                if implicit:
                    raise fail(
                        "BHS after messages without one: a file's messages are "
                        "all in batches (BHS ... BTS) or none is"
                    )
                if batches and file_header is None:
                    raise fail("several batches in one frame need FHS and FTS around them")
                batch_header = _envelope(line, codec)
                fs = batch_header.field(1)
            elif seg_id == b"BTS":
                if batch_header is None:
                    raise fail("BTS without BHS")
                trailer = _trailer(line, codec, fs)
                problem = _count_mismatch(trailer, "BTS", "messages", len(messages))
                if problem is not None:
                    raise fail(problem)
                close_batch(trailer)
            else:  # FTS
                if file_header is None:
                    raise fail("FTS without FHS")
                file_trailer = _trailer(line, codec, fs)
                if implicit:
                    # One implicit batch; a count of its messages is taken too.
                    found = len(messages)
                    if file_trailer.field(1).strip() != str(found):
                        problem = _count_mismatch(file_trailer, "FTS", "batches", 1)
                        if problem is not None:
                            raise fail(problem)
                    close_batch(None)
                else:
                    if batch_header is not None:
                        close_batch(None)  # BTS is optional ([BTS]): FTS ends the batch
                    problem = _count_mismatch(file_trailer, "FTS", "batches", len(batches))
                    if problem is not None:
                        raise fail(problem)
        except ValueError as e:
            if isinstance(e, BatchError):
                raise
            raise fail(str(e)) from None
    close_message(len(body))
    # BTS and FTS are optional ([BTS], [FTS]): the frame's end ends them.
    if batch_header is not None or implicit:
        close_batch(None)
    if not batches:
        raise fail("BHS missing: a batch starts with BHS")
    return Batch(file_header, tuple(batches), file_trailer, bom, codec)


def head_error(head: bytes, text: str) -> BatchError:
    """What a batch reject needs (FHS, BHS, first MSH) from the start of a
    batch frame that will not be read whole (oversized, timed out)."""
    body, bom = strip_lead(head)
    codec = "utf-8" if bom else "latin-1"
    found: dict[bytes, bytes] = {}
    for start, end, seg_id in _segments(body):
        if end == len(body) and not body.endswith((b"\r", b"\n")):
            break  # cut off: not a whole segment
        if seg_id in (b"FHS", b"BHS", b"MSH") and seg_id not in found:
            found[seg_id] = body[start:end]
        if b"MSH" in found:
            break

    def read(seg_id: bytes) -> Envelope | None:
        line = found.get(seg_id)
        if line is None:
            return None
        try:
            return _envelope(line, codec)
        except ValueError:
            return None

    return BatchError(
        text, file_header=read(b"FHS"), batch_header=read(b"BHS"),
        first_msh=found.get(b"MSH", b""), codec=codec,
    )


def _delimiters(envelope: Envelope) -> Header:
    """A header carrying only an envelope segment's delimiters, for escaping."""
    return Header(("MSH", envelope.field(1), envelope.field(2)))


def _header_segment(
    received: Envelope, now: datetime, control_id: str, comment: str = ""
) -> str:
    """FHS or BHS of the reply: sender and receiver swapped, XXX-12 naming
    the received XXX-11 (the reference file or batch control id)."""
    esc = received.field(2)[2:3] or "\\"

    def echo(n: int) -> str:
        # Never a byte that ends the sender's frame (lengths: _envelope).
        return framing_safe(received.field(n), esc)

    fields = [
        received.fields[0],
        received.field(2),
        echo(5),
        echo(6),
        echo(3),
        echo(4),
        _hl7_timestamp(now),
        "",
        "",
        escape(comment, _delimiters(received)) if comment else "",
        control_id,
        echo(11),
    ]
    return received.field(1).join(fields)


def build_batch_ack(
    received: Batch | BatchError,
    acks: Sequence[Sequence[bytes]],
    *,
    now: datetime,
    new_id: Callable[[], str],
    comment: str = "",
) -> bytes:
    """The acknowledgement batch: [FHS] then, per received batch, BHS, its
    ACK messages (already built and encoded) and BTS with their count; [FTS].

    ``received`` is a BatchError for a batch-level reject: then ``acks`` is
    one batch holding the one reject ACK.
    """
    if isinstance(received, BatchError):
        file_header = received.file_header
        header = received.batch_header
        if header is None:
            # No BHS read: the file's sender and delimiters, no batch to refer to.
            header = Envelope(file_header.fields[:11]) if file_header else _DEFAULT_BHS
        headers: list[Envelope | None] = [header]
        codec = received.codec
    else:
        file_header = received.file_header
        headers = [sub.header for sub in received.batches]
        codec = received.codec
    out: list[bytes] = []

    def put(text: str) -> None:
        out.append((text + "\r").encode(codec, errors="replace"))

    if file_header is not None:
        put(_header_segment(file_header, now, new_id()))
    for header, messages in zip(headers, acks, strict=True):
        if header is None:
            # A file sent without BHS is answered in kind: FHS-12 names it,
            # and there is no batch control id for a BHS-12 to name.
            out.extend(messages)
            continue
        bhs = header if header.fields[0] == "BHS" else Envelope(("BHS", *header.fields[1:]))
        put(_header_segment(bhs, now, new_id(), comment))
        out.extend(messages)
        put(f"BTS{header.field(1)}{len(messages)}")
    if file_header is not None:
        put(f"FTS{file_header.field(1)}{len(headers)}")
    return b"".join(out)


_DEFAULT_BHS = Envelope(("BHS", "|", "^~\\&"))


def forward_payload(messages: Sequence[bytes], batch_control_id: str, now: datetime) -> bytes:
    """A batch of stored messages for an upstream: BHS (sender and
    receiver from the first MSH, BHS-11 the batch control id it came with),
    the messages exactly as stored, BTS with their count."""
    line = first_line_bytes(messages[0])
    # latin-1 is byte for byte: the header's bytes go back unchanged.
    fs = line[3:4].decode("latin-1") or "|"
    fields = line.decode("latin-1").split(fs)
    msh = [*fields, "", "", "", "", "", ""]  # msh[n - 1] is MSH-n from MSH-2 on
    esc = msh[1][2:3] or "\\"
    # From storage, as received: never a byte that would end the upstream's frame.
    names = [framing_safe(f, esc) for f in msh[2:6]]
    control_id = framing_safe(batch_control_id, esc)
    bhs = fs.join(["BHS", msh[1], *names, _hl7_timestamp(now), "", "", "", control_id])
    body = [m if m.endswith((b"\r", b"\n")) else m + b"\r" for m in messages]
    return (
        (bhs + "\r").encode("latin-1") + b"".join(body)
        + f"BTS{fs}{len(messages)}\r".encode("latin-1")
    )


def reject_header(error: BatchError) -> Header:
    """The MSH a batch-level reject ACK answers: the batch's sender and
    delimiters from BHS (or FHS), MSA-2 the batch control id, version and
    acknowledgement mode from the first MSH when one was read."""
    envelope = error.batch_header or error.file_header or _DEFAULT_BHS
    first: Header | None = None
    if error.first_msh:
        text = error.first_msh.rstrip(b"\r\n").decode(error.codec, errors="replace")
        fs = text[3:4]
        if fs and not fs.isalnum():
            first = Header(("MSH", fs, *text[4:].split(fs)))
    fs = envelope.field(1)
    cs = (envelope.field(2) or "^")[0]
    msg_type = first.field(9) if first is not None and first.field_sep == fs else ""
    return Header((
        "MSH", fs, envelope.field(2),
        envelope.field(3), envelope.field(4), envelope.field(5), envelope.field(6),
        "", "", msg_type or f"ACK{cs}{cs}ACK", error.control_id,
        (first.field(11) if first is not None else "") or "P",
        (first.version if first is not None else "") or "2.5",
        "", "", first.accept_ack_type if first is not None else "",
    ))
