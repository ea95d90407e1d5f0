"""ACK and NAK building (SPEC section 5), cross-checked with hl7apy."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from hl7apy.parser import parse_message as hl7apy_parse
from twisted.trial.unittest import SynchronousTestCase

from mllpd.ack import (
    ACCEPT,
    ERROR,
    REJECT,
    AckError,
    ack_code,
    build_ack,
    encode_ack,
    should_send,
    version_tuple,
)
from mllpd.hl7 import Header, Message, parse_message, unescape

VERSIONS = ["2.1", "2.2", "2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6", "2.7", "2.8"]
NOW = datetime(2024, 3, 5, 14, 7, 9, tzinfo=timezone(timedelta(hours=1)))
ACK_ID = "MLLPD000001"
RULE_ERROR = AckError("101", "rule pid-name: PID-5 required", "PID", 5)


def received(version: str, msh15: str = "", charset: str = "8859/1") -> Header:
    """The header of an ADT^A01 as a lab system would send it."""
    text = (
        "MSH|^~\\&|LAB^1.2.3^ISO|HOSP^2.16.840.1^ISO|GW^9.9^ISO|DEST^1.1^ISO|20240305140000||"
        f"ADT^A01^ADT_A01|CTRL123|P|{version}|||{msh15}|||{charset}\rPID|1||12345||Doe^John\r"
    )
    return parse_message(text.encode("ascii")).header


def ack(header: Header | None, outcome: str, error: AckError | None = None) -> str:
    return build_ack(header, outcome, now=NOW, ack_id=ACK_ID, error=error)


def at_least(version: str, floor: tuple[int, ...]) -> bool:
    parsed = version_tuple(version)
    assert parsed is not None
    return parsed >= floor


def read_back(text: str) -> Message:
    """Parse an ACK with our own reader."""
    return parse_message(text.encode("utf-8"), "UNICODE UTF-8")


# The AE for RULE_ERROR in each version, written out by hand from the standard.
GOLDEN_AE: dict[str, str] = {
    "2.1": (
        "MSH|^~\\&|GW^9.9^ISO|DEST^1.1^ISO|LAB^1.2.3^ISO|HOSP^2.16.840.1^ISO|20240305140709+0100||ACK|MLLPD000001|P|2.1||||||8859/1\r"
        "MSA|AE|CTRL123|rule pid-name: PID-5 required\r"
        "ERR|PID^1^5^101&rule pid-name: PID-5 required&HL70357\r"
    ),
    "2.2": (
        "MSH|^~\\&|GW^9.9^ISO|DEST^1.1^ISO|LAB^1.2.3^ISO|HOSP^2.16.840.1^ISO|20240305140709+0100||ACK|MLLPD000001|P|2.2||||||8859/1\r"
        "MSA|AE|CTRL123|rule pid-name: PID-5 required\r"
        "ERR|PID^1^5^101&rule pid-name: PID-5 required&HL70357\r"
    ),
    "2.3": (
        "MSH|^~\\&|GW^9.9^ISO|DEST^1.1^ISO|LAB^1.2.3^ISO|HOSP^2.16.840.1^ISO|20240305140709+0100||ACK^A01|MLLPD000001|P|2.3||||||8859/1\r"
        "MSA|AE|CTRL123|rule pid-name: PID-5 required\r"
        "ERR|PID^1^5^101&rule pid-name: PID-5 required&HL70357\r"
    ),
    "2.3.1": (
        "MSH|^~\\&|GW^9.9^ISO|DEST^1.1^ISO|LAB^1.2.3^ISO|HOSP^2.16.840.1^ISO|20240305140709+0100||ACK^A01|MLLPD000001|P|2.3.1||||||8859/1\r"
        "MSA|AE|CTRL123|rule pid-name: PID-5 required\r"
        "ERR|PID^1^5^101&rule pid-name: PID-5 required&HL70357\r"
    ),
    "2.4": (
        "MSH|^~\\&|GW^9.9^ISO|DEST^1.1^ISO|LAB^1.2.3^ISO|HOSP^2.16.840.1^ISO|20240305140709+0100||ACK^A01^ACK|MLLPD000001|P|2.4||||||8859/1\r"
        "MSA|AE|CTRL123|rule pid-name: PID-5 required\r"
        "ERR|PID^1^5^101&rule pid-name: PID-5 required&HL70357\r"
    ),
    "2.5": (
        "MSH|^~\\&|GW^9.9^ISO|DEST^1.1^ISO|LAB^1.2.3^ISO|HOSP^2.16.840.1^ISO|20240305140709+0100||ACK^A01^ACK|MLLPD000001|P|2.5||||||8859/1\r"
        "MSA|AE|CTRL123|rule pid-name: PID-5 required\r"
        "ERR||PID^1^5|101^Required field missing^HL70357|E||||rule pid-name: PID-5 required\r"
    ),
    "2.5.1": (
        "MSH|^~\\&|GW^9.9^ISO|DEST^1.1^ISO|LAB^1.2.3^ISO|HOSP^2.16.840.1^ISO|20240305140709+0100||ACK^A01^ACK|MLLPD000001|P|2.5.1||||||8859/1\r"
        "MSA|AE|CTRL123|rule pid-name: PID-5 required\r"
        "ERR||PID^1^5|101^Required field missing^HL70357|E||||rule pid-name: PID-5 required\r"
    ),
    "2.6": (
        "MSH|^~\\&|GW^9.9^ISO|DEST^1.1^ISO|LAB^1.2.3^ISO|HOSP^2.16.840.1^ISO|20240305140709+0100||ACK^A01^ACK|MLLPD000001|P|2.6||||||8859/1\r"
        "MSA|AE|CTRL123|rule pid-name: PID-5 required\r"
        "ERR||PID^1^5|101^Required field missing^HL70357|E||||rule pid-name: PID-5 required\r"
    ),
    "2.7": (
        "MSH|^~\\&|GW^9.9^ISO|DEST^1.1^ISO|LAB^1.2.3^ISO|HOSP^2.16.840.1^ISO|20240305140709+0100||ACK^A01^ACK|MLLPD000001|P|2.7||||||8859/1\r"
        "MSA|AE|CTRL123\r"
        "ERR||PID^1^5|101^Required field missing^HL70357|E||||rule pid-name: PID-5 required\r"
    ),
    "2.8": (
        "MSH|^~\\&|GW^9.9^ISO|DEST^1.1^ISO|LAB^1.2.3^ISO|HOSP^2.16.840.1^ISO|20240305140709+0100||ACK^A01^ACK|MLLPD000001|P|2.8||||||8859/1\r"
        "MSA|AE|CTRL123\r"
        "ERR||PID^1^5|101^Required field missing^HL70357|E||||rule pid-name: PID-5 required\r"
    ),
}


class GoldenAckTests(SynchronousTestCase):
    """Exact ACKs for every supported HL7 version."""

    def test_golden_ae(self) -> None:
        """An AE for a failed rule matches the hand-written ACK for every version."""
        for version in VERSIONS:
            self.assertEqual(ack(received(version), ERROR, RULE_ERROR), GOLDEN_AE[version], version)

    def test_golden_aa(self) -> None:
        """An AA has the same MSH as the golden AE, then MSA|AA|<MSH-10> and nothing else."""
        for version in VERSIONS:
            msh = GOLDEN_AE[version].split("\r")[0]
            self.assertEqual(ack(received(version), ACCEPT), f"{msh}\rMSA|AA|CTRL123\r", version)

    def test_golden_ar(self) -> None:
        """An AR carries MSA-1 AR and an ERR with its table 0357 code."""
        error = AckError("207", "outbox full; resend later")
        for version in VERSIONS:
            segments = ack(received(version), REJECT, error).split("\r")
            self.assertEqual(segments[1].split("|")[:3], ["MSA", "AR", "CTRL123"], version)
            self.assertTrue(segments[2].startswith("ERR|"), version)
            self.assertIn("207", segments[2], version)
            self.assertEqual(segments[3:], [""], version)

    def test_msh9_by_version(self) -> None:
        """MSH-9 is ACK before 2.3, ACK^<trigger> in 2.3/2.3.1 and ACK^<trigger>^ACK from 2.4."""
        expected = {
            "2.1": "ACK", "2.2": "ACK", "2.3": "ACK^A01", "2.3.1": "ACK^A01",
            "2.4": "ACK^A01^ACK", "2.5": "ACK^A01^ACK", "2.5.1": "ACK^A01^ACK",
            "2.6": "ACK^A01^ACK", "2.7": "ACK^A01^ACK", "2.8": "ACK^A01^ACK",
        }
        for version in VERSIONS:
            m = read_back(ack(received(version), ACCEPT))
            self.assertEqual(m.header.field(9), expected[version], version)


class HeaderEchoTests(SynchronousTestCase):
    """The ACK header swaps sender and receiver and echoes what the sender needs."""

    def test_sender_and_receiver_swapped_whole(self) -> None:
        """MSH-3/4 come from MSH-5/6 and MSH-5/6 from MSH-3/4, with all their components."""
        h = read_back(ack(received("2.5"), ACCEPT)).header
        self.assertEqual(h.field(3), "GW^9.9^ISO")
        self.assertEqual(h.field(4), "DEST^1.1^ISO")
        self.assertEqual(h.field(5), "LAB^1.2.3^ISO")
        self.assertEqual(h.field(6), "HOSP^2.16.840.1^ISO")

    def test_msh7_is_given_time(self) -> None:
        """MSH-7 is the given time with its UTC offset."""
        self.assertEqual(read_back(ack(received("2.5"), ACCEPT)).header.field(7), "20240305140709+0100")
        west = build_ack(
            received("2.5"), ACCEPT, ack_id="x",
            now=datetime(2023, 12, 31, 23, 59, 58, tzinfo=timezone(timedelta(hours=-5))),
        )
        self.assertEqual(read_back(west).header.field(7), "20231231235958-0500")
        utc = build_ack(received("2.5"), ACCEPT, ack_id="x", now=datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC))
        self.assertEqual(read_back(utc).header.field(7), "20240102030405+0000")

    def test_msh10_is_given_id_and_msa2_is_received_id(self) -> None:
        """MSH-10 is the new ACK id; MSA-2 is the received MSH-10."""
        m = read_back(ack(received("2.5"), ACCEPT))
        self.assertEqual(m.header.control_id, ACK_ID)
        self.assertEqual(m.get("MSA", 2), "CTRL123")

    def test_msh11_12_18_echoed(self) -> None:
        """MSH-11, MSH-12 and MSH-18 are echoed whole, components and repetitions included."""
        text = (
            "MSH|^~\\&|A|B|C|D|20240101||ORU^R01^ORU_R01|X1|T^A|2.5.1^USA^HL7|||||DEU|"
            "UNICODE UTF-8~ISO IR87\r"
        )
        h = read_back(ack(parse_message(text.encode()).header, ACCEPT)).header
        self.assertEqual(h.field(11), "T^A")
        self.assertEqual(h.field(12), "2.5.1^USA^HL7")
        self.assertEqual(h.field(18), "UNICODE UTF-8~ISO IR87")
        self.assertEqual(h.field(9), "ACK^R01^ACK")

    def test_no_msh18_when_none_received(self) -> None:
        """Without a received MSH-18 the ACK's MSH ends at MSH-12."""
        text = ack(received("2.5", charset=""), ACCEPT)
        msh = text.split("\r")[0]
        self.assertEqual(len(msh.split("|")), 12)
        self.assertTrue(msh.endswith("|P|2.5"))

    def test_missing_version_and_processing_id(self) -> None:
        """A message without MSH-11/12 gets a 2.5 ACK with processing id P."""
        text = "MSH|^~\\&|A|B|C|D|20240101||ADT^A04|X1\r"
        h = read_back(ack(parse_message(text.encode()).header, ACCEPT)).header
        self.assertEqual((h.field(9), h.field(11), h.field(12)), ("ACK^A04^ACK", "P", "2.5"))

    def test_nak_without_header(self) -> None:
        """A NAK for a payload with no usable MSH uses standard delimiters, 2.5 and an ERR."""
        text = ack(None, REJECT, AckError("100", "payload is not HL7 (no MSH segment)"))
        self.assertTrue(text.startswith("MSH|^~\\&|"))
        m = read_back(text)
        self.assertEqual(m.header.version, "2.5")
        self.assertEqual(m.get("MSA", 1), "AR")
        self.assertEqual(m.get("MSA", 2), "")
        self.assertEqual(m.get("ERR", 3, 1), "100")
        self.assertEqual(m.get("ERR", 8), "payload is not HL7 (no MSH segment)")


class ErrorSegmentTests(SynchronousTestCase):
    """ERR segments: table 0357 codes, the right shape per version, escaped text."""

    def test_err3_cwe_from_25(self) -> None:
        """From 2.5 the code is in ERR-3 as code^text^HL70357, location in ERR-2, text in ERR-8."""
        for version in ("2.5", "2.5.1", "2.6", "2.7", "2.8"):
            m = read_back(ack(received(version), ERROR, RULE_ERROR))
            self.assertEqual(m.get("ERR", 3, 1), "101", version)
            self.assertEqual(m.get("ERR", 3, 3), "HL70357", version)
            self.assertEqual(m.get("ERR", 2, 1), "PID", version)
            self.assertEqual(m.get("ERR", 2, 3), "5", version)
            self.assertEqual(m.get("ERR", 4), "E", version)
            self.assertEqual(m.get("ERR", 8), RULE_ERROR.text, version)
            self.assertEqual(m.get("ERR", 1), "", version)

    def test_err1_eld_before_25(self) -> None:
        """Before 2.5 the code is in ERR-1 (ELD), its fourth component code&text&HL70357."""
        for version in ("2.1", "2.2", "2.3", "2.3.1", "2.4"):
            m = read_back(ack(received(version), ERROR, RULE_ERROR))
            self.assertEqual(m.get("ERR", 1, 1), "PID", version)
            self.assertEqual(m.get("ERR", 1, 3), "5", version)
            self.assertEqual(m.get("ERR", 1, 4, 1), "101", version)
            self.assertEqual(m.get("ERR", 1, 4, 2), RULE_ERROR.text, version)
            self.assertEqual(m.get("ERR", 1, 4, 3), "HL70357", version)

    def test_error_without_location(self) -> None:
        """An error that names no segment leaves the location empty but keeps the code."""
        error = AckError("207", "outbox unavailable")
        m25 = read_back(ack(received("2.5"), REJECT, error))
        self.assertEqual(m25.get("ERR", 2), "")
        self.assertEqual(m25.get("ERR", 3, 1), "207")
        m24 = read_back(ack(received("2.4"), REJECT, error))
        self.assertEqual(m24.get("ERR", 1, 1), "")
        self.assertEqual(m24.get("ERR", 1, 4, 1), "207")

    def test_error_text_delimiters_escaped(self) -> None:
        """Error text holding | ^ ~ \\ & is escaped, and reads back exactly in every version."""
        error = AckError("101", "rule a|b: PID-5^1 ~ x\\y & z", "PID", 5)
        for version in VERSIONS:
            text = ack(received(version), ERROR, error)
            self.assertEqual(len(text.split("\r")), 4, version)
            m = read_back(text)
            self.assertEqual(m.segment_ids, ["MSH", "MSA", "ERR"], version)
            if at_least(version, (2, 5)):
                self.assertEqual(m.get("ERR", 8), error.text, version)
            else:
                self.assertEqual(m.get("ERR", 1, 4, 2), error.text, version)
            if not at_least(version, (2, 7)):
                self.assertEqual(m.get("MSA", 3), error.text, version)

    def test_error_text_line_breaks_do_not_split_segments(self) -> None:
        """A line break in error text never starts a new segment in the ACK."""
        error = AckError("207", "first line\rsecond line\nthird")
        for version in ("2.4", "2.5"):
            self.assertEqual(read_back(ack(received(version), ERROR, error)).segment_ids, ["MSH", "MSA", "ERR"])

    def test_msa3_never_cuts_an_escape_sequence(self) -> None:
        """MSA-3 is cut to 80 characters without leaving half an escape sequence."""
        error = AckError("101", "x" * 79 + "|tail")
        text = ack(received("2.5"), ERROR, error)
        raw = text.split("\r")[1].split("|")[3]
        self.assertLessEqual(len(raw), 80)
        self.assertEqual(raw.count("\\") % 2, 0, raw)
        self.assertTrue(error.text.startswith(unescape(raw, received("2.5"))))


class EnhancedModeTests(SynchronousTestCase):
    """MSH-15 valued: commit ACKs CA/CE/CR, sent as AL/NE/ER/SU ask."""

    def test_original_mode_codes(self) -> None:
        """Without MSH-15 the codes are AA, AE and AR."""
        h = received("2.5")
        self.assertEqual([ack_code(o, h) for o in (ACCEPT, ERROR, REJECT)], ["AA", "AE", "AR"])
        self.assertEqual(ack_code(REJECT, None), "AR")

    def test_enhanced_mode_codes(self) -> None:
        """With MSH-15 valued the codes are CA, CE and CR, in MSA-1 of the ACK."""
        for mode in ("AL", "NE", "ER", "SU"):
            h = received("2.5", msh15=mode)
            self.assertEqual([ack_code(o, h) for o in (ACCEPT, ERROR, REJECT)], ["CA", "CE", "CR"])
            self.assertEqual(read_back(ack(h, ACCEPT)).get("MSA", 1), "CA")
            self.assertEqual(read_back(ack(h, ERROR, RULE_ERROR)).get("MSA", 1), "CE")
            self.assertEqual(read_back(ack(h, REJECT, RULE_ERROR)).get("MSA", 1), "CR")

    def test_should_send(self) -> None:
        """AL and empty send always, NE never, ER only on errors, SU only on success."""
        expected = {
            "": (True, True, True),
            "AL": (True, True, True),
            "NE": (False, False, False),
            "ER": (False, True, True),
            "SU": (True, False, False),
        }
        for mode, wanted in expected.items():
            h = received("2.5", msh15=mode)
            got = tuple(should_send(o, h) for o in (ACCEPT, ERROR, REJECT))
            self.assertEqual(got, wanted, mode)
        self.assertTrue(should_send(REJECT, None))

    def test_should_send_case_and_space(self) -> None:
        """MSH-15 is matched without regard to case or surrounding spaces."""
        self.assertFalse(should_send(ACCEPT, received("2.5", msh15=" ne ")))
        self.assertFalse(should_send(ACCEPT, received("2.5", msh15="er")))


class DelimiterTests(SynchronousTestCase):
    """ACKs use the received message's own delimiters."""

    def test_odd_delimiters_survive(self) -> None:
        """An ACK for MSH*#~$%* uses those delimiters and escapes text with '$'."""
        text = "MSH*#~$%*LAB#1*HOSP*GW*DEST*20240101**ADT#A01*C1*P*2.5\r"
        h = parse_message(text.encode()).header
        error = AckError("101", "a*b#c%d")
        out = ack(h, ERROR, error)
        self.assertEqual(
            out,
            "MSH*#~$%*GW*DEST*LAB#1*HOSP*20240305140709+0100**ACK#A01#ACK*MLLPD000001*P*2.5\r"
            "MSA*AE*C1*a$F$b$S$c$T$d\r"
            "ERR***101#Required field missing#HL70357*E****a$F$b$S$c$T$d\r",
        )
        m = read_back(out)
        self.assertEqual(m.get("ERR", 8), error.text)
        self.assertEqual(m.get("MSH", 9, 2), "A01")

    def test_odd_delimiters_before_25(self) -> None:
        """A 2.3 ACK with unusual delimiters builds its ELD with the message's subcomponent mark."""
        text = "MSH!@#$%!LAB!HOSP!GW!DEST!20240101!!ADT@A01!C1!P!2.3\r"
        out = ack(parse_message(text.encode()).header, ERROR, AckError("101", "bad", "PID", 3))
        self.assertEqual(out.split("\r")[2], "ERR!PID@1@3@101%bad%HL70357")
        self.assertEqual(out.split("\r")[0].split("!")[8], "ACK@A01")

    def test_truncation_character(self) -> None:
        """A 2.7 ACK keeps MSH-2 ^~\\&# and escapes '#' in text as \\P\\."""
        text = "MSH|^~\\&#|LAB|HOSP|GW|DEST|20240101||ADT^A01^ADT_A01|C1|P|2.7\r"
        h = parse_message(text.encode()).header
        out = ack(h, ERROR, AckError("101", "rule #3 failed"))
        self.assertTrue(out.startswith("MSH|^~\\&#|GW|DEST|LAB|HOSP|"))
        self.assertIn("|rule \\P\\3 failed\r", out)
        self.assertEqual(read_back(out).get("ERR", 8), "rule #3 failed")


class EncodingTests(SynchronousTestCase):
    """The ACK is encoded in the received message's charset."""

    def test_latin1_round_trip(self) -> None:
        """An 8859/1 message's accented facility comes back in the ACK as the same bytes."""
        text = "MSH|^~\\&|LAB|Hôpital Général|GW|DEST|20240101||ADT^A01|C1|P|2.5||||||8859/1\r"
        msg = parse_message(text.encode("iso8859-1"))
        data = encode_ack(ack(msg.header, ERROR, AckError("101", "règle é")), msg.codec)
        self.assertIn("Hôpital Général".encode("iso8859-1"), data)
        self.assertIn(b"r\xe8gle \xe9", data)
        back = parse_message(data)
        self.assertEqual(back.header.field(6), "Hôpital Général")
        self.assertEqual(back.get("ERR", 8), "règle é")
        self.assertEqual(back.charset, "8859/1")

    def test_utf8_round_trip(self) -> None:
        """A UTF-8 message's facility names come back in the ACK as UTF-8."""
        text = "MSH|^~\\&|検査|東京病院|GW|DEST|20240101||ADT^A01|C1|P|2.5||||||UNICODE UTF-8\r"
        msg = parse_message(text.encode("utf-8"))
        data = encode_ack(ack(msg.header, ACCEPT), msg.codec)
        self.assertIn("東京病院".encode(), data)
        back = parse_message(data)
        self.assertEqual((back.header.field(5), back.header.field(6)), ("検査", "東京病院"))

    def test_framing_bytes_never_echoed(self) -> None:
        """0x0B, 0x1C, CR and LF in echoed fields become hex escapes; the ACK reads back to the sent values."""
        h = Header(fields=(
            "MSH", "|", "^~\\&", "A\x0bB", "F\x1c", "R\x1c\x0d", "X", "", "", "ADT^A\x1c",
            "X\x1c", "P", "2.5",
        ))
        for outcome in (ACCEPT, ERROR):
            text = ack(h, outcome, AckError("207", "bad\x1c\x0b"))
            data = encode_ack(text, "ascii")
            self.assertNotIn(b"\x0b", data)
            self.assertNotIn(b"\x1c", data)
            self.assertEqual(data.count(b"\r"), text.count("\r"))
            self.assertEqual(text.split("\r")[1].split("|")[2], "X\\X1C\\")
            back = parse_message(data)
            self.assertEqual(back.get("MSA", 2), "X\x1c")
            self.assertEqual(back.get("MSH", 5), "A\x0bB")

    def test_unmappable_characters_replaced(self) -> None:
        """Characters the charset cannot hold become '?' instead of failing the ACK."""
        text = "MSH|^~\\&|LAB|HOSP|GW|DEST|20240101||ADT^A01|C1|P|2.5||||||ASCII\r"
        msg = parse_message(text.encode("ascii"))
        data = encode_ack(ack(msg.header, ERROR, AckError("101", "règle 東")), msg.codec)
        self.assertIn(b"r?gle ?", data)
        self.assertEqual(parse_message(data).get("MSA", 2), "C1")


class VersionTupleTests(SynchronousTestCase):
    """version_tuple reads MSH-12 version numbers."""

    def test_version_tuple(self) -> None:
        """Dotted versions become tuples; anything else is None."""
        self.assertEqual(version_tuple("2.3.1"), (2, 3, 1))
        self.assertEqual(version_tuple(" 2.5 "), (2, 5))
        self.assertEqual(version_tuple("2"), (2,))
        self.assertIsNone(version_tuple(""))
        self.assertIsNone(version_tuple("v2.5"))
        self.assertIsNone(version_tuple("2.5.1.9"))


def hl7apy_value(element: object) -> str:
    value = element.value  # type: ignore[attr-defined]
    return value if isinstance(value, str) else str(value)


class Hl7apyCrossCheckTests(SynchronousTestCase):
    """hl7apy, an independent parser, reads our ACKs as we meant them."""

    def check(self, text: str, version: str, code: str, control_id: str, msh9: str) -> None:
        parsed = hl7apy_parse(text)
        self.assertEqual(hl7apy_value(parsed.msa.msa_1), code, version)
        self.assertEqual(hl7apy_value(parsed.msa.msa_2), control_id, version)
        self.assertEqual(hl7apy_value(parsed.msh.msh_9), msh9, version)
        self.assertEqual(hl7apy_value(parsed.msh.msh_10), ACK_ID, version)

    def test_hl7apy_reads_acks(self) -> None:
        """For 2.1-2.8 hl7apy reads MSA-1, MSA-2, MSH-9 and MSH-10 as intended."""
        for version in VERSIONS:
            msh9 = read_back(ack(received(version), ACCEPT)).header.field(9)
            for outcome, error in ((ACCEPT, None), (ERROR, RULE_ERROR), (REJECT, AckError("207", "x|y"))):
                text = ack(received(version), outcome, error)
                self.check(text, version, "A" + outcome, "CTRL123", msh9)

    def test_hl7apy_reads_error_code(self) -> None:
        """hl7apy finds the table 0357 code in ERR-3 (2.5+) or in ERR-1 (before 2.5)."""
        for version in VERSIONS:
            parsed = hl7apy_parse(ack(received(version), ERROR, RULE_ERROR))
            if at_least(version, (2, 5)):
                self.assertEqual(hl7apy_value(parsed.err.err_3.children[0]), "101", version)
            else:
                self.assertTrue(hl7apy_value(parsed.err.err_1).startswith("PID^1^5^101&"), version)

    def test_hl7apy_reads_enhanced_acks(self) -> None:
        """hl7apy reads CA/CE/CR from enhanced-mode ACKs."""
        for version in ("2.3", "2.5", "2.8"):
            h = received(version, msh15="AL")
            msh9 = read_back(ack(h, ACCEPT)).header.field(9)
            for outcome in (ACCEPT, ERROR, REJECT):
                error = None if outcome == ACCEPT else RULE_ERROR
                self.check(ack(h, outcome, error), version, "C" + outcome, "CTRL123", msh9)

    def test_hl7apy_reads_odd_delimiters(self) -> None:
        """hl7apy reads an ACK built with delimiters MSH*#~$%."""
        h = parse_message(b"MSH*#~$%*LAB#1*HOSP*GW*DEST*20240101**ADT#A01*C1*P*2.5\r").header
        self.check(ack(h, ERROR, AckError("101", "a*b")), "2.5", "AE", "C1", "ACK#A01#ACK")

    def test_hl7apy_reads_headerless_nak(self) -> None:
        """hl7apy reads the NAK sent for a payload without MSH."""
        self.check(ack(None, REJECT, AckError("100", "not HL7")), "2.5", "AR", "", "ACK^^ACK")
