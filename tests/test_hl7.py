"""The ER7 reader: MSH positions, delimiters, segment separators, charsets, escapes."""

from __future__ import annotations

import codecs
import string

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mllpd.hl7 import (
    DecodeError,
    Header,
    Message,
    NotHL7Error,
    WideCharsetError,
    codec_for_charset,
    escape,
    first_segment,
    parse_message,
    pick,
    unescape,
)

MSH = (
    "MSH|^~\\&|LAB^1.2.3^ISO|HOSP^2.16.840.1^ISO|GW^9.9^ISO|DEST^1.1^ISO|"
    "20240305140709||ADT^A01^ADT_A01|CTRL123|P|2.5.1|||AL|NE|USA|{charset}"
)
PID = "PID|1||12345^^^HOSP^MR~67890^^^SSA^SS||{name}^John^Q||19700101|M"
PV1 = "PV1|1|I|W1^R2^B3"


def message_text(name: str = "Doe", charset: str = "", sep: str = "\r") -> str:
    return sep.join([MSH.format(charset=charset), PID.format(name=name), PV1]) + sep


def parse_text(text: str, codec: str = "ascii", default: str | None = None) -> Message:
    return parse_message(text.encode(codec), default)


class HeaderPositionTests(SynchronousTestCase):
    """MSH fields are numbered as in the standard: MSH-1 is the separator itself."""

    def setUp(self) -> None:
        self.msg = parse_text(message_text())
        self.h = self.msg.header

    def test_msh1_is_field_separator(self) -> None:
        """MSH-1 is the field separator character."""
        self.assertEqual(self.h.field(1), "|")
        self.assertEqual(self.h.field_sep, "|")

    def test_msh2_is_encoding_characters(self) -> None:
        """MSH-2 is the encoding characters, and they set the other delimiters."""
        self.assertEqual(self.h.field(2), "^~\\&")
        self.assertEqual(
            (self.h.component_sep, self.h.repetition_sep, self.h.escape_char, self.h.subcomponent_sep),
            ("^", "~", "\\", "&"),
        )

    def test_msh_fields_by_position(self) -> None:
        """MSH-3 onwards are read at their standard positions."""
        h = self.h
        self.assertEqual(h.field(3), "LAB^1.2.3^ISO")
        self.assertEqual(h.field(4), "HOSP^2.16.840.1^ISO")
        self.assertEqual(h.field(5), "GW^9.9^ISO")
        self.assertEqual(h.field(6), "DEST^1.1^ISO")
        self.assertEqual(h.field(7), "20240305140709")
        self.assertEqual(h.field(8), "")
        self.assertEqual(h.field(9), "ADT^A01^ADT_A01")
        self.assertEqual(h.field(10), "CTRL123")
        self.assertEqual(h.field(11), "P")
        self.assertEqual(h.field(12), "2.5.1")
        self.assertEqual(h.field(15), "AL")
        self.assertEqual(h.field(16), "NE")
        self.assertEqual(h.field(17), "USA")
        self.assertEqual(h.field(40), "")

    def test_named_header_values(self) -> None:
        """Type, trigger, control id, version and accept-ack type come from MSH-9/10/12/15."""
        h = self.h
        self.assertEqual((h.msg_type, h.trigger, h.control_id), ("ADT", "A01", "CTRL123"))
        self.assertEqual(h.version, "2.5.1")
        self.assertEqual(h.accept_ack_type, "AL")
        self.assertEqual(h.type_label, "ADT^A01")
        self.assertEqual(h.component(3, 2), "1.2.3")
        self.assertEqual(h.component(3, 9), "")

    def test_get_msh_separator_fields(self) -> None:
        """Message.get reads MSH-1 and MSH-2 whole, like every other MSH field."""
        self.assertEqual(self.msg.get("MSH", 1), "|")
        self.assertEqual(self.msg.get("MSH", 2), "^~\\&")

    def test_get_msh_components(self) -> None:
        """Message.get reads MSH components at standard positions."""
        self.assertEqual(self.msg.get("MSH", 9, 1), "ADT")
        self.assertEqual(self.msg.get("MSH", 9, 2), "A01")
        self.assertEqual(self.msg.get("MSH", 4, 2), "2.16.840.1")
        self.assertEqual(self.msg.get("MSH", 10), "CTRL123")

    def test_get_other_segments(self) -> None:
        """Fields, components and repetitions of other segments are read by position."""
        m = self.msg
        self.assertEqual(m.get("PID", 3, 1), "12345")
        self.assertEqual(m.get("PID", 3, 1, rep=2), "67890")
        self.assertEqual(m.get("PID", 3, 5, rep=2), "SS")
        self.assertEqual(m.get("PID", 5, 1), "Doe")
        self.assertEqual(m.get("PID", 5, 2), "John")
        self.assertEqual(m.get("PID", 8), "M")
        self.assertEqual(m.get("PV1", 3, 3), "B3")
        self.assertEqual(m.get("PID", 99), "")
        self.assertEqual(m.get("OBX", 5), "")
        self.assertEqual(m.segment_ids, ["MSH", "PID", "PV1"])

    def test_get_subcomponent_and_escapes(self) -> None:
        """Subcomponents are split and escape sequences resolved in returned values."""
        text = message_text() + "OBX|1|ST|A&B&C^x||a\\F\\b\\S\\c\\T\\d\\R\\e\\E\\f\\X41\\\r"
        m = parse_text(text)
        self.assertEqual(m.get("OBX", 3, 1, 2), "B")
        self.assertEqual(m.get("OBX", 5), "a|b^c&d~e\\fA")

    def test_raw_bytes_kept_exactly(self) -> None:
        """The message keeps the exact received bytes, including leading line breaks."""
        payload = b"\r\n" + message_text().encode()
        m = parse_message(payload)
        self.assertEqual(m.raw, payload)
        self.assertEqual(m.header.control_id, "CTRL123")


class DelimiterTests(SynchronousTestCase):
    """Messages with non-default delimiters are read with their own delimiters."""

    def test_star_field_separator(self) -> None:
        """MSH*^~\\&* uses '*' as the field separator throughout."""
        text = "MSH*^~\\&*LAB^1*HOSP*GW*DEST*20240101**ORU^R01*C9*P*2.4\rOBX*1*ST*K^Potassium**4|1\r"
        m = parse_text(text)
        self.assertEqual(m.header.field(1), "*")
        self.assertEqual(m.header.field(2), "^~\\&")
        self.assertEqual(m.header.control_id, "C9")
        self.assertEqual(m.header.type_label, "ORU^R01")
        self.assertEqual(m.get("OBX", 3, 2), "Potassium")
        self.assertEqual(m.get("OBX", 5), "4|1")

    def test_hash_component_separator(self) -> None:
        """MSH|#~\\&| uses '#' between components and '^' is plain text."""
        text = "MSH|#~\\&|LAB#1.2#ISO|HOSP|GW|DEST|20240101||ADT#A08|C1|P|2.3\rPID|1||7||Doe^x#Jane\r"
        m = parse_text(text)
        self.assertEqual(m.header.component_sep, "#")
        self.assertEqual(m.header.msg_type, "ADT")
        self.assertEqual(m.header.trigger, "A08")
        self.assertEqual(m.header.component(3, 2), "1.2")
        self.assertEqual(m.get("PID", 5, 1), "Doe^x")
        self.assertEqual(m.get("PID", 5, 2), "Jane")

    def test_all_unusual_delimiters(self) -> None:
        """Every delimiter position can be changed: MSH!@#$%."""
        text = "MSH!@#$%!LAB!HOSP!GW!DEST!20240101!!ADT@A01!C1!P!2.5\rPID!1!!1#2!!A%B@C$F$D\r"
        m = parse_text(text)
        h = m.header
        self.assertEqual(
            (h.field_sep, h.component_sep, h.repetition_sep, h.escape_char, h.subcomponent_sep),
            ("!", "@", "#", "$", "%"),
        )
        self.assertEqual(m.get("PID", 3, rep=2), "2")
        self.assertEqual(m.get("PID", 5, 1, 2), "B")
        self.assertEqual(m.get("PID", 5, 2), "C!D")

    def test_truncation_character(self) -> None:
        """The 2.7 truncation character (MSH-2 ^~\\&#) is kept and \\P\\ resolves to it."""
        text = "MSH|^~\\&#|LAB|HOSP|GW|DEST|20240101||ADT^A01^ADT_A01|C1|P|2.7\rPID|1||7||Lo\\P\\ng#\r"
        m = parse_text(text)
        self.assertEqual(m.header.field(2), "^~\\&#")
        self.assertEqual(m.header.subcomponent_sep, "&")
        self.assertEqual(m.header.control_id, "C1")
        self.assertEqual(m.get("PID", 5), "Lo#ng#")

    def test_short_encoding_characters(self) -> None:
        """MSH-2 with only component and repetition separators is accepted."""
        m = parse_text("MSH|^~|LAB|HOSP|GW|DEST|20240101||ADT^A01|C1|P|2.3\r")
        self.assertEqual(m.header.field(2), "^~")
        self.assertEqual(m.header.control_id, "C1")


class SegmentSeparatorTests(SynchronousTestCase):
    """CR is the standard segment terminator; LF and CRLF are read the same way."""

    def test_segment_separators(self) -> None:
        """Messages with \\r, \\n or \\r\\n between segments read identically."""
        for sep in ("\r", "\n", "\r\n"):
            m = parse_text(message_text(sep=sep))
            self.assertEqual(m.segment_ids, ["MSH", "PID", "PV1"], repr(sep))
            self.assertEqual(m.header.field(17), "USA", repr(sep))
            self.assertEqual(m.header.field(18), "", repr(sep))
            self.assertEqual(m.get("PID", 5, 1), "Doe", repr(sep))
            self.assertEqual(m.get("PV1", 3, 3), "B3", repr(sep))

    def test_no_trailing_separator(self) -> None:
        """A message without a final segment terminator is read whole."""
        m = parse_text(message_text().rstrip("\r"))
        self.assertEqual(m.get("PV1", 3, 3), "B3")

    def test_msh_only(self) -> None:
        """A message that is just an MSH line without terminator has its header read."""
        m = parse_text(MSH.format(charset="8859/1"))
        self.assertEqual(m.header.field(18), "8859/1")
        self.assertEqual(m.segment_ids, ["MSH"])


class FieldAccessTests(SynchronousTestCase):
    """The shortcuts rules read with agree with splitting the whole message."""

    @settings(deadline=None, max_examples=300)
    @given(
        lines=st.lists(
            st.sampled_from(["PID|1|A", "PID", "PIDX|2", "PV1|I", "ZPI|PID|x", "OBX|1", ""]),
            max_size=6,
        ),
        sep=st.sampled_from(["\r", "\n", "\r\n"]),
    )
    def test_first_segment(self, lines: list[str], sep: str) -> None:
        """first_segment finds the segment a walk over every segment finds first."""
        m = parse_text(sep.join([MSH.format(charset=""), *lines]))
        for sid in ("PID", "PV1", "OBX", "ZPI"):
            self.assertEqual(first_segment(m.text, sid, "|"), m.segment(sid))

    @settings(deadline=None, max_examples=500)
    @given(
        value=st.text(alphabet="ab^~&\\XFS0", max_size=16),
        c=st.integers(0, 3), s=st.integers(0, 3), rep=st.integers(1, 3),
    )
    def test_pick(self, value: str, c: int, s: int, rep: int) -> None:
        """pick gives the repetition, component and subcomponent that splitting on every delimiter gives."""
        h = parse_text(message_text()).header
        reps = value.split("~")
        want = reps[rep - 1] if rep <= len(reps) else ""
        if c:
            parts = want.split("^")
            want = parts[c - 1] if c <= len(parts) else ""
            if s:
                subs = want.split("&")
                want = subs[s - 1] if s <= len(subs) else ""
        self.assertEqual(pick(value, h, c, s, rep), unescape(want, h))


# (MSH-18, a name in that character set) for every supported set.
CHARSET_SAMPLES: list[tuple[str, str]] = [
    ("ASCII", "Smith"),
    ("8859/1", "Müller"),
    ("8859/2", "Łukasz Żółć"),
    ("8859/3", "Ħamrun Ġużè"),
    ("8859/4", "Ģirts Ķēniņš"),
    ("8859/5", "Иванов"),
    ("8859/6", "محمد"),
    ("8859/7", "Παπαδόπουλος"),
    ("8859/8", "כהן"),
    ("8859/9", "Şahin Öztürk"),
    ("8859/15", "Œuvre 5€"),
    ("UNICODE UTF-8", "山田太郎 Ærø 😀"),
    ("GB 18030-2000", "张伟"),
    ("BIG-5", "陳大文"),
    ("KS X 1001", "김민준"),
]


class CharsetTests(SynchronousTestCase):
    """MSH-18 (HL7 table 0211) decides how the payload is decoded."""

    def test_declared_charsets(self) -> None:
        """A name in each supported MSH-18 charset is read back exactly."""
        for charset, name in CHARSET_SAMPLES:
            codec = codec_for_charset(charset)
            self.assertIsNotNone(codec, charset)
            assert codec is not None
            m = parse_text(message_text(name=name, charset=charset), codec)
            self.assertEqual(m.get("PID", 5, 1), name, charset)
            self.assertEqual(m.charset, charset)
            self.assertEqual(m.codec, codecs.lookup(codec).name)
            self.assertEqual(m.header.control_id, "CTRL123", charset)
            self.assertEqual(m.header.field(18), charset)

    def test_utf16_and_utf32_refused(self) -> None:
        """UTF-16/32 payloads (BOM, bare 'MSH' bytes, or only MSH-18) raise WideCharsetError, with the header when readable."""
        text = message_text(name="Ωmega 山田", charset="UNICODE UTF-16")
        for payload in (
            codecs.BOM_UTF16_LE + text.encode("utf-16-le"),
            codecs.BOM_UTF16_BE + text.encode("utf-16-be"),
            text.encode("utf-16-le"),
            text.encode("utf-16-be"),
            message_text(charset="UNICODE UTF-32").encode("utf-32"),
        ):
            with self.assertRaises(WideCharsetError) as ctx:
                parse_message(payload)
            assert ctx.exception.header is not None
            self.assertEqual(ctx.exception.header.control_id, "CTRL123")
        with self.assertRaises(WideCharsetError):
            parse_message(message_text(charset="UNICODE UTF-16").encode("ascii"))
        with self.assertRaises(WideCharsetError):
            parse_message(message_text().encode("ascii"), "UNICODE")

    def test_utf8_bom_skipped(self) -> None:
        """A UTF-8 byte order mark before MSH is skipped and means UTF-8; the raw bytes keep it."""
        payload = codecs.BOM_UTF8 + message_text(name="Müller").encode("utf-8")
        m = parse_message(payload)
        self.assertEqual(m.get("PID", 5, 1), "Müller")
        self.assertEqual(m.header.control_id, "CTRL123")
        self.assertEqual(m.codec, "utf-8")
        self.assertEqual(m.raw, payload)

    def test_utf8_bom_with_declared_charset(self) -> None:
        """MSH-18 still governs a message that starts with a UTF-8 BOM."""
        payload = codecs.BOM_UTF8 + message_text(name="Café", charset="8859/1").encode("latin-1")
        m = parse_message(payload)
        self.assertEqual(m.get("PID", 5, 1), "Café")
        self.assertEqual(m.charset, "8859/1")

    def test_multibyte_trail_bytes_in_fields(self) -> None:
        """Big-5 and GB 18030 characters whose second byte is '|' or '^' stay in one field."""
        # 四 is A5 7C in Big-5 ('|' as its second byte); 億 is 83 7C in GB 18030.
        for charset, codec, name in (("BIG-5", "big5", "四^十"), ("GB 18030-2000", "gb18030", "億")):
            self.assertIn(b"|", name.encode(codec))
            m = parse_text(message_text(name=name, charset=charset), codec)
            self.assertEqual(m.get("PID", 5, 1), name.split("^")[0], charset)
            self.assertEqual(m.get("PID", 5, 2), "十" if charset == "BIG-5" else "John")
            self.assertEqual(m.get("PID", 8), "M", charset)

    def test_multibyte_trail_bytes_in_msh(self) -> None:
        """A Big-5 sending facility whose bytes hold '|' does not shift MSH-10 or MSH-18."""
        # 四 is A5 7C and 院 is B0 7C in Big-5.
        for text in (
            message_text(name="陳大文", charset="BIG-5"),
            "MSH|^~\\&|LAB|HOSP|GW|DEST|20240101||ADT^A01|CTRL123|P|2.5||||||BIG-5\r"
            "PID|1||7||陳大文^John\r",
        ):
            text = text.replace("|HOSP^2.16.840.1^ISO|", "|HOSP|").replace("|HOSP|", "|台北四院|", 1)
            m = parse_text(text, "big5")
            self.assertEqual(m.codec, "big5")
            self.assertEqual(m.header.field(4), "台北四院")
            self.assertEqual(m.header.control_id, "CTRL123")
            self.assertEqual(m.get("PID", 5, 1), "陳大文")

    def test_iso2022_repetition_governs(self) -> None:
        """An ISO 2022 set in a later MSH-18 repetition decodes the whole message."""
        text = message_text(name="山田", charset="ASCII~ISO IR87")
        m = parse_message(text.encode("iso2022_jp"))
        self.assertEqual(m.get("PID", 5, 1), "山田")

    def test_charset_names_loosely_matched(self) -> None:
        """Charset names match regardless of case and repeated spaces."""
        self.assertEqual(codec_for_charset(" unicode  utf-8 "), "utf-8")
        self.assertEqual(codec_for_charset("8859/1"), "iso8859-1")
        self.assertEqual(codec_for_charset("big-5"), "big5")
        self.assertIsNone(codec_for_charset("EBCDIC"))
        self.assertIsNone(codec_for_charset(""))

    def test_default_charset_when_msh18_empty(self) -> None:
        """MLLP_DEFAULT_CHARSET decodes a message whose MSH-18 is empty."""
        payload = message_text(name="Müller").encode("utf-8")
        m = parse_message(payload, "UNICODE UTF-8")
        self.assertEqual(m.get("PID", 5, 1), "Müller")
        self.assertEqual(m.codec, "utf-8")
        self.assertEqual(m.charset, "UNICODE UTF-8")

    def test_msh18_beats_default_charset(self) -> None:
        """A valued MSH-18 wins over MLLP_DEFAULT_CHARSET."""
        payload = message_text(name="Müller", charset="8859/1").encode("iso8859-1")
        m = parse_message(payload, "UNICODE UTF-8")
        self.assertEqual(m.get("PID", 5, 1), "Müller")
        self.assertEqual(m.charset, "8859/1")

    def test_no_charset_at_all_never_rejects(self) -> None:
        """Without MSH-18 or a default, 8-bit bytes are still read (as Latin-1), not rejected."""
        payload = message_text(name="Müller").encode("iso8859-1")
        m = parse_message(payload)
        self.assertEqual(m.get("PID", 5, 1), "Müller")
        self.assertIsNone(m.charset)


SECRET = "Zyxwvutsrq"


class DecodeErrorTests(SynchronousTestCase):
    """Undecodable payloads raise DecodeError, whose text never carries message content."""

    def assert_clean(self, error: DecodeError, *forbidden: str) -> None:
        text = str(error)
        for item in (SECRET, *forbidden):
            self.assertNotIn(item, text)

    def test_unknown_charset(self) -> None:
        """An unknown MSH-18 raises DecodeError that still carries the header for a NAK."""
        payload = message_text(name=SECRET, charset="KLINGON-8").encode()
        with self.assertRaises(DecodeError) as cm:
            parse_message(payload)
        self.assert_clean(cm.exception)
        self.assertIsNotNone(cm.exception.header)
        assert cm.exception.header is not None
        self.assertEqual(cm.exception.header.control_id, "CTRL123")

    def test_unknown_charset_in_later_repetition(self) -> None:
        """An unknown charset in any MSH-18 repetition raises DecodeError."""
        payload = message_text(charset="8859/1~NOPE").encode()
        self.assertRaises(DecodeError, parse_message, payload)

    def test_invalid_utf8(self) -> None:
        """Invalid UTF-8 raises DecodeError naming the offset, not the bytes."""
        payload = message_text(name=SECRET, charset="UNICODE UTF-8").encode() + b"\xff\xfe\xc3("
        with self.assertRaises(DecodeError) as cm:
            parse_message(payload)
        self.assert_clean(cm.exception, "\\xff", "\xff", "ÿ", "\\xc3")
        self.assertIsNotNone(cm.exception.header)

    def test_invalid_ascii(self) -> None:
        """An 8-bit byte in a message declared ASCII raises DecodeError."""
        payload = message_text(name=SECRET, charset="ASCII").encode() + b"\xe9"
        with self.assertRaises(DecodeError) as cm:
            parse_message(payload)
        self.assert_clean(cm.exception, "\\xe9", "é")

    def test_invalid_bytes_with_default_charset(self) -> None:
        """Bytes invalid in MLLP_DEFAULT_CHARSET raise DecodeError."""
        payload = message_text(name=SECRET + "\udcff").encode("utf-8", "surrogateescape")
        with self.assertRaises(DecodeError) as cm:
            parse_message(payload, "UNICODE UTF-8")
        self.assert_clean(cm.exception, "\\xff")

    def test_invalid_utf16(self) -> None:
        """A truncated UTF-16 payload raises DecodeError without its bytes."""
        payload = codecs.BOM_UTF16_LE + message_text(name=SECRET).encode("utf-16-le") + b"\x00"
        with self.assertRaises(DecodeError) as cm:
            parse_message(payload)
        self.assert_clean(cm.exception)


class NotHL7Tests(SynchronousTestCase):
    """Payloads without an MSH segment are refused with NotHL7Error."""

    def test_not_hl7(self) -> None:
        """Payloads that do not start with a usable MSH raise NotHL7Error."""
        for payload in (
            b"",
            b"hello",
            b"PID|1||123\rMSH|^~\\&|A\r",
            b"MSH",
            b"MSH|^~\\",
            b"MSHA^~\\&|LAB",
            b"MSH ^~\\&|LAB",
            b"MSH||LAB|HOSP",
            b"MSH|^~\\&#!|LAB",
            b'{"resourceType": "Patient"}',
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
        ):
            with self.assertRaises(NotHL7Error, msg=repr(payload)):
                parse_message(payload)

    def test_not_hl7_is_not_decode_error(self) -> None:
        """NotHL7Error and DecodeError are distinct, so each gets its own NAK."""
        self.assertFalse(issubclass(NotHL7Error, DecodeError))
        self.assertFalse(issubclass(DecodeError, NotHL7Error))


ENCODED_PREFIX = b"MSH|^~\\&|LAB|HOSP|GW|DEST|20240101||ADT^A01|C1|P|2.5"


class ParserPropertyTests(SynchronousTestCase):
    """Hypothesis: no input makes the parser raise anything but its two errors."""

    def exercise(self, payload: bytes, default: str | None = None) -> None:
        try:
            m = parse_message(payload, default)
        except (NotHL7Error, DecodeError):
            return
        h = m.header
        _ = (h.msg_type, h.trigger, h.control_id, h.version, h.accept_ack_type, h.type_label)
        for seg in set(m.segment_ids):
            for n in range(0, 8):
                m.get(seg, n)
                m.get(seg, n, 1)
                m.get(seg, n, 2, 1, rep=2)

    @settings(deadline=None, max_examples=500)
    @given(payload=st.binary(max_size=500))
    def test_arbitrary_bytes(self, payload: bytes) -> None:
        """Arbitrary bytes give a message, NotHL7Error or DecodeError, nothing else."""
        self.exercise(payload)

    @settings(deadline=None, max_examples=500)
    @given(
        tail=st.binary(max_size=300),
        charset=st.sampled_from(["", "ASCII", "8859/1", "UNICODE UTF-8", "BIG-5", "UNICODE UTF-16", "x"]),
        default=st.sampled_from([None, "UNICODE UTF-8", "8859/15"]),
    )
    def test_arbitrary_bytes_after_msh(self, tail: bytes, charset: str, default: str | None) -> None:
        """An MSH followed by arbitrary bytes never raises anything but the two errors."""
        self.exercise(ENCODED_PREFIX + b"|||||" + charset.encode() + tail, default)

    @settings(deadline=None, max_examples=300)
    @given(text=st.text(max_size=300))
    def test_arbitrary_utf8_text_after_msh(self, text: str) -> None:
        """An MSH declaring UTF-8 followed by any text never raises anything but the two errors."""
        self.exercise(ENCODED_PREFIX + b"|||||UNICODE UTF-8\r" + text.encode("utf-8", "surrogatepass"))


# Delimiters a sender might choose: printable, not alphanumeric, not space.
_DELIMS = list(string.punctuation)


@st.composite
def headers(draw: st.DrawFn) -> Header:
    chars = draw(st.lists(st.sampled_from(_DELIMS), min_size=5, max_size=6, unique=True))
    fs, enc = chars[0], "".join(chars[1:])
    return Header(fields=("MSH", fs, enc))


class EscapeTests(SynchronousTestCase):
    """escape() makes any text safe inside one field; unescape() reverses it."""

    def test_standard_escapes(self) -> None:
        """Delimiters and the escape character become \\F\\ \\S\\ \\T\\ \\R\\ \\E\\."""
        h = parse_text(message_text()).header
        self.assertEqual(escape("a|b^c&d~e\\f", h), "a\\F\\b\\S\\c\\T\\d\\R\\e\\E\\f")
        self.assertEqual(unescape("a\\F\\b\\S\\c\\T\\d\\R\\e\\E\\f", h), "a|b^c&d~e\\f")

    def test_unknown_escape_left_alone(self) -> None:
        """Escape sequences that are not understood (e.g. highlighting) are kept as sent."""
        h = parse_text(message_text()).header
        self.assertEqual(unescape("\\H\\bold\\N\\", h), "\\H\\bold\\N\\")
        self.assertEqual(unescape("lone \\ escape", h), "lone \\ escape")

    def test_line_breaks_escaped(self) -> None:
        """CR and LF never appear raw in escaped text, so they cannot end a segment."""
        h = parse_text(message_text()).header
        out = escape("line one\rline two\nline three", h)
        self.assertNotIn("\r", out)
        self.assertNotIn("\n", out)

    def test_escape_pattern_cache_bounded(self) -> None:
        """Messages with thousands of different escape characters leave a bounded pattern cache."""
        from mllpd import hl7

        escapes = [c for c in map(chr, range(0x2000, 0x3000)) if not c.isalnum()][:500]
        for esc in escapes:
            h = Header(fields=("MSH", "|", f"^~{esc}&", "A"))
            self.assertEqual(unescape(f"a{esc}F{esc}b", h), "a|b")
        self.assertLessEqual(hl7._escape_pattern.cache_info().currsize, 16)

    @settings(deadline=None, max_examples=500)
    @given(header=headers(), value=st.text(max_size=200))
    def test_round_trip(self, header: Header, value: str) -> None:
        """Any text escaped for any delimiter set has no delimiters and unescapes to itself."""
        out = escape(value, header)
        for delim in (header.field_sep, *header.encoding_chars[:2], *header.encoding_chars[3:], "\r", "\n"):
            self.assertNotIn(delim, out)
        self.assertEqual(unescape(out, header), value)

    @settings(deadline=None, max_examples=300)
    @given(header=headers(), value=st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\r\n"), max_size=200))
    def test_round_trip_in_message(self, header: Header, value: str) -> None:
        """An escaped value placed in a field of a real message is read back unchanged."""
        fs, enc = header.field_sep, header.encoding_chars
        text = f"MSH{fs}{enc}{fs}LAB{fs}HOSP{fs}GW{fs}DEST{fs}20240101{fs}{fs}ADT{fs}C1{fs}P{fs}2.7\r"
        text += f"NTE{fs}1{fs}{fs}{escape(value, header)}\r"
        m = parse_message(text.encode("utf-8"), "UNICODE UTF-8")
        self.assertEqual(m.get("NTE", 3), value)
        self.assertEqual(m.segment_ids, ["MSH", "NTE"])
