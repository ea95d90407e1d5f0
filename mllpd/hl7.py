"""A small, exact ER7 reader for the receive path.

hl7apy builds a full tree and takes milliseconds per message; the hot path
only needs the MSH header (and a few fields for rules), so it reads fields by
position with the message's own delimiters. Nothing here touches I/O.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass, field
from functools import cached_property, lru_cache

__all__ = [
    "DecodeError",
    "Header",
    "Message",
    "MSH_MAX_LENGTH",
    "NotHL7Error",
    "UnknownCharsetError",
    "WideCharsetError",
    "codec_for_charset",
    "framing_safe",
    "escape",
    "first_segment",
    "max_length",
    "parse_message",
    "pick",
    "split_segments",
    "unescape",
]

# HL7 table 0211 (MSH-18) to Python codecs. Names are matched without regard
# to case or repeated spaces; a few common non-table spellings are accepted.
_TABLE_0211: dict[str, str] = {
    "ASCII": "ascii",
    "ISO IR6": "ascii",
    "8859/1": "iso8859-1",
    "8859/2": "iso8859-2",
    "8859/3": "iso8859-3",
    "8859/4": "iso8859-4",
    "8859/5": "iso8859-5",
    "8859/6": "iso8859-6",
    "8859/7": "iso8859-7",
    "8859/8": "iso8859-8",
    "8859/9": "iso8859-9",
    "8859/15": "iso8859-15",
    "ISO IR14": "iso2022_jp",
    "ISO IR87": "iso2022_jp",
    "ISO IR159": "iso2022_jp_2",
    "GB 18030-2000": "gb18030",
    "KS X 1001": "euc_kr",
    "BIG-5": "big5",
    "UNICODE": "utf-16",
    "UNICODE UTF-8": "utf-8",
    "UNICODE UTF-16": "utf-16",
    "UNICODE UTF-32": "utf-32",
    # Spellings seen in the field, outside the table.
    "UTF-8": "utf-8",
    "UTF8": "utf-8",
    "ISO-8859-1": "iso8859-1",
    "LATIN1": "iso8859-1",
}
_SPACES = re.compile(r"\s+")


def codec_for_charset(name: str) -> str | None:
    """Map an HL7 character set name (table 0211) to a Python codec name."""
    key = _SPACES.sub(" ", name.strip().upper())
    codec = _TABLE_0211.get(key)
    if codec is None:
        return None
    return codecs.lookup(codec).name


class NotHL7Error(ValueError):
    """The payload is not an HL7 v2 message (no MSH segment at its start)."""


class DecodeError(ValueError):
    """The payload cannot be decoded in its declared character set."""

    def __init__(self, message: str, header: Header | None = None) -> None:
        super().__init__(message)
        self.header = header


class UnknownCharsetError(DecodeError):
    """MSH-18 names a character set that is not in HL7 table 0211."""


class WideCharsetError(DecodeError):
    """UTF-16 or UTF-32: a character can hold the bytes 0x1C 0x0D, so MLLP
    may have cut the message short without anyone noticing."""


WIDE_CHARSET_TEXT = "UTF-16 and UTF-32 cannot be framed safely by MLLP; send UTF-8"


def is_wide(codec: str) -> bool:
    """Whether a Python codec is UTF-16 or UTF-32 (in any byte order)."""
    return codec.startswith(("utf-16", "utf-32", "utf_16", "utf_32"))


# Bytes that would end or restart the sender's MLLP frame, or a segment.
_FRAMING = ("\x0b", "\x1c", "\r", "\n")


def framing_safe(value: str, escape_char: str) -> str:
    """``value`` with 0x0B, 0x1C, CR and LF as hex escapes (\\X0B\\ ...), so
    an echoed field can never break the sender's framing."""
    for char in _FRAMING:
        if char in value:
            value = value.replace(char, f"{escape_char}X{ord(char):02X}{escape_char}")
    return value


_SEGMENT_SPLIT = re.compile(r"\r\n|\r|\n")


def split_segments(text: str) -> list[str]:
    """The message's segments (empty ones included), ended by CR, LF or CRLF."""
    # Splitting on CR alone is the common case and three times faster than
    # the regular expression; str.splitlines would also split on FF, NEL...
    return text.split("\r") if "\n" not in text else _SEGMENT_SPLIT.split(text)


def first_segment(text: str, sid: str, fs: str) -> list[str] | None:
    """The first segment with this id, split into fields, or None.

    Found with str.find, so the cost does not grow with the message: a rule
    on PID reads a 100 KB ORU as fast as a 1 KB ADT. The text starts with
    MSH, so every other segment follows a CR or an LF.
    """
    start = -1
    for sep in ("\r", "\n"):
        # Search only before a match already found: no scan of the whole text
        # for an LF that a CR-separated message does not have.
        limit = start if start >= 0 else len(text)
        i = text.find(sep + sid, 0, limit)
        while i >= 0:
            after = text[i + 4 : i + 5]
            if after == fs or after in ("\r", "\n", ""):
                start = i
                break
            i = text.find(sep + sid, i + 4, limit)
    if start < 0:
        return None
    start += 1
    end = len(text)
    for sep in ("\r", "\n"):
        j = text.find(sep, start, end)
        if j >= 0:
            end = j
    return text[start:end].split(fs)

# Byte signatures of the encodings whose MSH is not ASCII bytes.
_WIDE_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
    ("MSH".encode("utf-32-le"), "utf-32-le"),
    ("MSH".encode("utf-32-be"), "utf-32-be"),
    ("MSH".encode("utf-16-le"), "utf-16-le"),
    ("MSH".encode("utf-16-be"), "utf-16-be"),
)


# The longest value HL7 v2 allows in each MSH field (per repetition), taking
# the most generous version (MSH-10 is 20 characters in 2.5, 199 in 2.7);
# fields HL7 gives no maximum get 200. A longer field is refused, never
# echoed, stored or counted whole.
MSH_MAX_LENGTH: dict[int, int] = {
    3: 227, 4: 227, 5: 227, 6: 227, 7: 26, 8: 40, 9: 15, 10: 199, 11: 3, 12: 60,
    13: 15, 14: 180, 15: 2, 16: 2, 17: 3, 18: 16, 19: 250, 20: 20, 21: 427,
    22: 567, 23: 567, 24: 227, 25: 227,
}
DEFAULT_MAX_LENGTH = 200


# max_length(n) for the fields a header usually has: a tuple index is the
# cheapest lookup, and every message's every MSH field is looked up.
_LIMITS = tuple(MSH_MAX_LENGTH.get(n, DEFAULT_MAX_LENGTH) for n in range(32))


def max_length(n: int) -> int:
    """The longest value MSH-n may hold, per repetition."""
    return _LIMITS[n] if n < 32 else DEFAULT_MAX_LENGTH


class Header:
    """The MSH segment, read by position. ``fields[n]`` is MSH-n.

    The delimiters and the fields every message needs are read once, here:
    the receive path consults them several times per message.
    """

    __slots__ = (
        "fields", "field_sep", "encoding_chars", "component_sep", "repetition_sep",
        "escape_char", "subcomponent_sep", "msg_type", "trigger", "control_id",
        "version", "accept_ack_type", "_type_label", "_within",
    )

    def __init__(self, fields: tuple[str, ...]) -> None:
        self.fields = fields
        self.field_sep = fields[1]
        enc = self.encoding_chars = fields[2]
        self.component_sep = enc[0:1] or "^"
        self.repetition_sep = enc[1:2] or "~"
        self.escape_char = enc[2:3] or "\\"
        self.subcomponent_sep = enc[3:4] or "&"
        n = len(fields)
        if n > 9:
            parts = fields[9].split(self.repetition_sep, 1)[0].split(self.component_sep)
            self.msg_type = parts[0]
            self.trigger = parts[1] if len(parts) > 1 else ""
        else:
            self.msg_type = self.trigger = ""
        self.control_id = fields[10] if n > 10 else ""
        self.version = (
            fields[12].split(self.repetition_sep, 1)[0].split(self.component_sep, 1)[0]
            if n > 12 else ""
        )
        self.accept_ack_type = fields[15].strip().upper() if n > 15 else ""
        self._type_label: str | None = None
        # Set once overlong() found every field within HL7's lengths.
        self._within = False

    def __repr__(self) -> str:
        return f"Header(control_id={self.control_id!r}, type={self.msg_type!r})"

    def field(self, n: int) -> str:
        """MSH-n as raw text ('' when absent)."""
        return self.fields[n] if n < len(self.fields) else ""

    def overlong(self) -> int | None:
        """The first MSH field longer than HL7 allows (n of MSH-n), or None.

        The limit holds per repetition; a whole field, however repeated, is
        never longer than ten times its limit (and never than 2,000).
        """
        fields = self.fields
        for n in range(3, len(fields)):
            limit = _LIMITS[n] if n < 32 else DEFAULT_MAX_LENGTH
            if len(fields[n]) > limit and _overlong(fields[n], limit, self):
                return n
        self._within = True
        return None

    def bounded(self, n: int) -> str:
        """MSH-n for echoing: cut to HL7's maximum when it is longer."""
        value = self.field(n)
        if self._within:
            return value
        limit = max_length(n)
        return value[:limit] if _overlong(value, limit, self) else value

    def component(self, n: int, c: int = 1) -> str:
        """Component c of the first repetition of MSH-n, raw."""
        rep = self.field(n).split(self.repetition_sep, 1)[0]
        parts = rep.split(self.component_sep)
        return parts[c - 1] if c <= len(parts) else ""

    @property
    def charset_names(self) -> list[str]:
        return [r.strip() for r in self.field(18).split(self.repetition_sep)]

    @property
    def type_label(self) -> str:
        """``ADT^A01`` style label for logs and storage."""
        if self._type_label is None:
            limit = max_length(9)
            t = unescape(self.msg_type[:limit], self)
            trig = unescape(self.trigger[:limit], self)
            self._type_label = f"{t}^{trig}" if trig else t
        return self._type_label


def _overlong(value: str, limit: int, header: Header) -> bool:
    if len(value) <= limit:
        return False
    if len(value) > min(10 * limit, 2000):
        return True
    return any(len(r) > limit for r in value.split(header.repetition_sep))


def bad_field_separator(fs: str) -> bool:
    """Whether a header segment's (MSH, FHS, BHS) field separator cannot be one."""
    return fs.isalnum() or fs in " \t" or fs in _FRAMING


def bad_encoding_characters(enc: str, fs: str) -> bool:
    """Whether a header segment's encoding characters (XXX-2) are missing or unusable."""
    return not 1 <= len(enc) <= 5 or any(c.isalnum() or c == fs or c in _FRAMING for c in enc)


def _read_header(line: str) -> Header:
    if not line.startswith("MSH") or len(line) < 8:
        raise NotHL7Error("payload does not start with an MSH segment")
    fs = line[3]
    if bad_field_separator(fs):
        raise NotHL7Error("MSH field separator is not a delimiter character")
    rest = line[4:].split(fs)
    if bad_encoding_characters(rest[0], fs):
        raise NotHL7Error("MSH-2 encoding characters are missing or invalid")
    return Header(fields=("MSH", fs, *rest))


def _bytes_header(payload: bytes) -> Header:
    # latin-1 maps bytes one to one so delimiters are found wherever they are.
    raw = first_line_bytes(payload)
    header = _read_header(raw.decode("latin-1"))
    if not raw.isascii():
        # A Big-5 or GB 18030 trail byte can be '|' and shift every later
        # field: trust a double-byte reading whose own MSH-18 names it.
        for codec in ("big5", "gb18030"):
            try:
                candidate = _read_header(raw.decode(codec))
            except (UnicodeDecodeError, NotHL7Error):
                continue
            names = [n for n in candidate.charset_names if n]
            if names and codec_for_charset(names[0]) == codec:
                return candidate
    return header


def strip_lead(payload: bytes) -> tuple[bytes, bool]:
    """The payload from its first segment on, leading blank lines and a
    UTF-8 byte order mark skipped, and whether a byte order mark led it."""
    body = payload.lstrip(b"\r\n\t ")
    if body[:3] == codecs.BOM_UTF8:
        return body[3:].lstrip(b"\r\n\t "), True
    return body, False


def first_line_bytes(data: bytes) -> bytes:
    """The first segment (up to CR or LF), as bytes."""
    end = data.find(b"\r")
    lf = data.find(b"\n", 0, end if end >= 0 else len(data))
    if lf >= 0:
        end = lf
    return data[:end] if end >= 0 else data


def _first_line(text: str) -> str:
    ends = [i for i in (text.find("\r"), text.find("\n")) if i >= 0]
    return text[: min(ends)] if ends else text


def _choose_codec(header: Header, default_charset: str | None) -> tuple[str, str | None]:
    """Return (codec, charset name as declared) for a message."""
    names = [n for n in header.charset_names if n]
    for name in names:
        codec = codec_for_charset(name)
        if codec is None:
            raise UnknownCharsetError(f"unknown character set in MSH-18: {name[:40]!r}", header)
        # An ISO 2022 set in a later repetition governs the whole message.
        if codec.startswith("iso2022"):
            return codec, name
    if names:
        return codec_for_charset(names[0]) or "ascii", names[0]
    if default_charset:
        return codec_for_charset(default_charset) or "ascii", default_charset
    # HL7's default is ASCII; latin-1 accepts every byte so senders that put
    # accented letters in without MSH-18 are still read, never rejected.
    return "iso8859-1", None


@dataclass
class Message:
    """A decoded message: the exact received bytes and lazy field access."""

    raw: bytes
    text: str
    header: Header
    codec: str
    charset: str | None
    _segments: list[list[str]] | None = field(default=None, repr=False)

    @property
    def segments(self) -> list[list[str]]:
        """Every segment split into fields; ``seg[n]`` is field n (MSH aside)."""
        if self._segments is None:
            fs = self.header.field_sep
            self._segments = [s.split(fs) for s in split_segments(self.text) if s]
        return self._segments

    def segment(self, name: str) -> list[str] | None:
        """The first segment with this id, as a list of fields."""
        for seg in self.segments:
            if seg[0] == name:
                return seg
        return None

    def get(self, name: str, n: int, c: int = 0, s: int = 0, rep: int = 1) -> str:
        """Field, component or subcomponent value, unescaped ('' if absent)."""
        if name == "MSH":
            if n <= 2:
                # MSH-1 and MSH-2 are the delimiters themselves, never split.
                return self.header.field(n)
            value = self.header.field(n)
        else:
            seg = self.segment(name)
            value = seg[n] if seg is not None and n < len(seg) else ""
        return self.pick(value, c, s, rep)

    def pick(self, value: str, c: int = 0, s: int = 0, rep: int = 1) -> str:
        """:func:`pick` with this message's delimiters."""
        return pick(value, self.header, c, s, rep)

    @cached_property
    def segment_ids(self) -> list[str]:
        return [seg[0] for seg in self.segments]


def parse_message(payload: bytes, default_charset: str | None = None) -> Message:
    """Read the header and decode the payload.

    Raises :class:`NotHL7Error` when there is no MSH at the start and
    :class:`DecodeError` when the declared charset is unknown or the bytes are
    not valid in it.
    """
    body, bom = (payload, False) if payload[:3] == b"MSH" else strip_lead(payload)
    if bom:
        # Windows senders prefix a UTF-8 byte order mark: skipped for
        # parsing (the stored bytes keep it); it says UTF-8 when MSH-18 is empty.
        default_charset = "UNICODE UTF-8"
    for signature, codec in _WIDE_SIGNATURES if body[:3] != b"MSH" else ():
        if body.startswith(signature):
            try:
                text = body.decode(codec)
            except UnicodeDecodeError:
                raise WideCharsetError(WIDE_CHARSET_TEXT) from None
            text = text.lstrip("\ufeff")
            header = _read_header(_first_line(text))
            raise WideCharsetError(WIDE_CHARSET_TEXT, header)
    header = _bytes_header(body)
    codec, charset = _choose_codec(header, default_charset)
    if is_wide(codec):
        raise WideCharsetError(WIDE_CHARSET_TEXT, header)
    try:
        text = body.decode(codec)
    except UnicodeDecodeError as e:
        # The message names only the offset, never the bytes.
        raise DecodeError(
            f"payload is not valid {charset or codec} at byte {e.start}", header
        ) from None
    if codec != "iso8859-1" and not first_line_bytes(body).isascii():
        # Non-ASCII header fields: read them again as real characters.
        header = _read_header(_first_line(text))
    return Message(payload, text, header, codec, charset)


@lru_cache(maxsize=16)
def _escape_pattern(esc: str) -> re.Pattern[str]:
    # Any character can be a sender's escape character: a bounded cache.
    e = re.escape(esc)
    return re.compile(f"{e}([^{e}]*){e}")


def unescape(value: str, header: Header) -> str:
    """Resolve HL7 escape sequences (\\F\\, \\S\\, \\T\\, \\R\\, \\E\\, \\Xhh\\, ...)."""
    esc = header.escape_char
    if esc not in value:
        return value
    pattern = _escape_pattern(esc)
    mapping = {
        "F": header.field_sep,
        "S": header.component_sep,
        "T": header.subcomponent_sep,
        "R": header.repetition_sep,
        "E": esc,
        "P": header.encoding_chars[4:5],
    }

    def repl(m: re.Match[str]) -> str:
        code = m.group(1)
        if code in mapping:
            return mapping[code]
        if code.startswith("X") and len(code) % 2 == 1:
            try:
                return bytes.fromhex(code[1:]).decode("latin-1")
            except ValueError:
                return m.group(0)
        if code == ".br":
            return "\n"
        return m.group(0)

    return pattern.sub(repl, value)


def pick(value: str, header: Header, c: int = 0, s: int = 0, rep: int = 1) -> str:
    """Repetition ``rep`` of a field's raw text, or its component ``c`` (and
    subcomponent ``s``; 0: all of it), unescaped ('' if absent)."""
    h = header
    # Split only where the delimiter is there: rules read a few fields of
    # every message, most of them plain values.
    if rep != 1 or h.repetition_sep in value:
        reps = value.split(h.repetition_sep)
        value = reps[rep - 1] if rep <= len(reps) else ""
    if c:
        if h.component_sep in value:
            parts = value.split(h.component_sep)
            value = parts[c - 1] if c <= len(parts) else ""
        elif c > 1:
            return ""
        if s:
            if h.subcomponent_sep in value:
                subs = value.split(h.subcomponent_sep)
                value = subs[s - 1] if s <= len(subs) else ""
            elif s > 1:
                return ""
    return unescape(value, h) if h.escape_char in value else value


def escape(value: str, header: Header) -> str:
    """Escape delimiters so ``value`` can stand in one field of this message."""
    esc = header.escape_char
    out = value.replace(esc, f"{esc}E{esc}")
    for char, code in (
        (header.field_sep, "F"),
        (header.component_sep, "S"),
        (header.subcomponent_sep, "T"),
        (header.repetition_sep, "R"),
    ):
        out = out.replace(char, f"{esc}{code}{esc}")
    trunc = header.encoding_chars[4:5]
    if trunc:
        out = out.replace(trunc, f"{esc}P{esc}")
    return framing_safe(out, esc)
