"""HL7 batches, one message per frame, and the UTF-8 BOM, as a sender sees them.

Batch acknowledgements are compared with golden files (tests/golden/batch_ack,
regenerate with MLLPD_UPDATE_GOLDEN=1 and review the diff) and read back
with hl7apy.
"""

from __future__ import annotations

import codecs
import os
import re
import sqlite3
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from mllpd.ack import AckError
from mllpd.batch import BatchError, has_several_messages, is_batch, parse_batch
from mllpd.connectors import Delivered, Delivery, IBatchConnector, Outcome, Retry
from mllpd.framing import frame
from mllpd.hl7 import Message
from mllpd.outbox import OutboxError
from mllpd.outbox.sqlite import SQLiteOutbox
from mllpd.receiver import Receiver, Reply
from mllpd.testing import MemoryOutbox
from tests.test_outbox import envelope, reactor, rows, temp_db

GOLDEN = Path(__file__).parent / "golden" / "batch_ack"
VERSIONS = ("2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6", "2.7", "2.8")
STANDARD = "|^~\\&"
CUSTOM = "#$*@!"  # field, component, repetition, escape, subcomponent


def msh(control_id: str, version: str = "2.5", delims: str = STANDARD, enhanced: bool = False,
        msg_type: str = "ADT^A01^ADT_A01", mode: str = "AL") -> str:
    fs, enc = delims[0], delims[1:]
    fields = ["MSH", enc, "LAB", "HOSP", "EHR", "HOSP", "20260101120000", "",
              msg_type.replace("^", enc[0]), control_id, "P", version]
    if enhanced:
        fields += ["", "", mode, "NE"]
    return fs.join(fields) + "\r"


def message(control_id: str, version: str = "2.5", delims: str = STANDARD,
            enhanced: bool = False, mode: str = "AL") -> str:
    fs = delims[0]
    return msh(control_id, version, delims, enhanced, mode=mode) + fs.join(
        ["PID", "1", "", f"{control_id}{delims[1]}{delims[1]}{delims[1]}HOSP{delims[1]}MR"]
    ) + "\r"


def batch(*messages: str, delims: str = STANDARD, batch_id: str = "B1", file_id: str | None = "F1",
          count: str | None = None) -> str:
    fs, enc = delims[0], delims[1:]
    head = fs.join(["BHS", enc, "LAB", "HOSP", "EHR", "HOSP", "20260101120000", "", "", "",
                    batch_id]) + "\r"
    tail = f"BTS{fs}{len(messages) if count is None else count}\r"
    text = head + "".join(messages) + tail
    if file_id is not None:
        fhs = fs.join(["FHS", enc, "LAB", "HOSP", "EHR", "HOSP", "20260101120000", "", "", "",
                       file_id]) + "\r"
        text = fhs + text + f"FTS{fs}1\r"
    return text


def segments(data: bytes) -> list[str]:
    return [s for s in data.decode("latin-1").split("\r") if s]


def msa(data: bytes, fs: str = "|") -> list[tuple[str, str]]:
    return [tuple(s.split(fs)[1:3]) for s in segments(data) if s.startswith("MSA")]  # type: ignore[misc]


class Harness(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.outbox = MemoryOutbox()
        self.ids = iter(range(1, 1_000_000))
        self.receiver = Receiver(self.outbox, self.clock, ack_id=self.next_id)

    def next_id(self) -> str:
        return f"ACK{next(self.ids):05d}"

    def receive(self, payload: bytes | str, receiver: Receiver | None = None) -> Reply:
        data = payload.encode("latin-1") if isinstance(payload, str) else payload
        return self.successResultOf((receiver or self.receiver).receive(data, "10.1.1.1:999"))


class SplitTests(SynchronousTestCase):
    """parse_batch: the envelope read, each message's exact bytes kept."""

    def test_messages_keep_their_bytes(self) -> None:
        """Each contained message is exactly its bytes in the frame, CR LF endings included."""
        one = message("C1").replace("\r", "\r\n").encode()
        two = message("C2").encode()
        text = b"BHS|^~\\&|LAB|HOSP|||||||B9\r\n" + one + two + b"BTS|2\r\n"
        parsed = parse_batch(text, 100)
        self.assertEqual([m for _, _, m in parsed.messages()], [one, two])
        self.assertEqual([(b, p) for b, p, _ in parsed.messages()], [("B9", 1), ("B9", 2)])

    def test_several_batches_in_a_file(self) -> None:
        """A file (FHS ... FTS) may hold several batches; positions restart in each."""
        text = ("FHS|^~\\&|LAB|HOSP|||||||F1\r"
                + batch(message("A1"), message("A2"), batch_id="X", file_id=None)
                + batch(message("B1"), batch_id="Y", file_id=None) + "FTS|2\r")
        parsed = parse_batch(text.encode(), 100)
        self.assertEqual([(b, p) for b, p, _ in parsed.messages()], [("X", 1), ("X", 2), ("Y", 1)])

    def test_malformed_batches(self) -> None:
        """Each malformed envelope raises BatchError naming the problem."""
        m = message("C1")
        cases = {
            batch(m, count="2"): "BTS-1 says 2 messages, the frame has 1",
            batch(m, count="two"): "BTS-1 says two",
            "BHS|^~\\&|A\r" + m + "BHS|^~\\&|B\r" + m + "BTS|1\r": "BHS inside a batch: BTS missing",
            batch(m).replace("FTS|1\r", "FTS|3\r"): "FTS-1 says 3 batches",
            batch(m, file_id=None) + "FTS|1\r": "FTS without FHS",
            batch(m, file_id=None) + "PID|1\r": "'PID' segment outside",
            "BHS|^~\\&|A\rPID|1\r" + m + "BTS|1\r": "'PID' segment outside a message",
            "FHS|^~\\&|A|B|||||||F\r" + m + "FTS|3\r": "FTS-1 says 3 batches, the frame has 1",
            "FHS|^~\\&|A\r" + batch(m, file_id=None) + m + "FTS|1\r": "MSH before BHS",
            "FHS|^~\\&|A\r" + m + batch(m, file_id=None) + "FTS|1\r": "BHS after messages without one",
            batch(m, file_id=None) + batch(m, file_id=None): "several batches in one frame need FHS",
            "BHS\rBTS|0\r": "BHS segment is too short",
            batch(m) + "BHS|^~\\&\r": "segments after FTS",
        }
        for text, problem in cases.items():
            with self.assertRaises(BatchError, msg=text) as ctx:
                parse_batch(text.encode(), 100)
            self.assertIn(problem, str(ctx.exception), text)

    def test_message_limit(self) -> None:
        """More messages than the limit is a BatchError naming MLLP_MAX_BATCH_MESSAGES."""
        text = batch(*(message(f"C{n}") for n in range(4)))
        self.assertEqual(parse_batch(text.encode(), 4).count, 4)
        with self.assertRaises(BatchError) as ctx:
            parse_batch(text.encode(), 3)
        self.assertIn("MLLP_MAX_BATCH_MESSAGES", str(ctx.exception))

    def test_detection(self) -> None:
        """Batches are told from messages by their first segment; several MSH by a segment start."""
        self.assertTrue(is_batch(codecs.BOM_UTF8 + b"\r\nBHS|^~\\&|"))
        self.assertTrue(is_batch(b"FHS|^~\\&|"))
        self.assertFalse(is_batch(message("C1").encode()))
        self.assertTrue(has_several_messages((message("C1") + message("C2")).encode()))
        self.assertFalse(has_several_messages(("\r\n" + message("C1")).encode()))
        self.assertFalse(has_several_messages(b"MSH|^~\\&|A\rNTE|1||MSH appears in text\r"))


class ReceiveTests(Harness):
    """What a batch sender gets back, and what is stored."""

    def test_batch_stored_in_order_with_one_ack_each(self) -> None:
        """Every message is stored on its own, in order, with its batch id and position; one ACK each."""
        sent = [message(f"C{n}") for n in range(5)]
        reply = self.receive(batch(*sent))
        assert reply.ack is not None
        self.assertEqual([e.payload for e in self.outbox.stored], [m.encode() for m in sent])
        self.assertEqual([(e.batch_control_id, e.batch_position) for e in self.outbox.stored],
                         [("B1", n) for n in range(1, 6)])
        self.assertEqual(msa(reply.ack), [("AA", f"C{n}") for n in range(5)])
        names = [s[:3] for s in segments(reply.ack)]
        self.assertEqual(names[:2], ["FHS", "BHS"])
        self.assertEqual(names[-2:], ["BTS", "FTS"])
        self.assertEqual(segments(reply.ack)[-2:], ["BTS|5", "FTS|1"])
        self.assertEqual(segments(reply.ack)[1].split("|")[11], "B1")  # BHS-12
        self.assertEqual(segments(reply.ack)[0].split("|")[11], "F1")  # FHS-12
        self.assertEqual([p.code for p in reply.parts], ["AA"] * 5)

    def test_each_message_decided_alone(self) -> None:
        """A bad message in a batch gets its own AE; the others are stored and get AA."""
        bad = "MSH|^~\\&|LAB|HOSP|EHR|HOSP|20260101||ADT^A01||P|2.5\r"
        reply = self.receive(batch(message("C1"), bad, message("C3")))
        assert reply.ack is not None
        self.assertEqual(msa(reply.ack), [("AA", "C1"), ("AE", ""), ("AA", "C3")])
        self.assertIn("ERR|", reply.ack.decode())
        self.assertEqual([e.control_id for e in self.outbox.stored], ["C1", "C3"])
        self.assertEqual([e.batch_position for e in self.outbox.stored], [1, 3])
        self.assertEqual([(a.control_id, a.ack_code, a.batch_control_id) for a in self.outbox.audits],
                         [("", "AE", "B1")])

    def test_malformed_batch_one_reject_nothing_stored(self) -> None:
        """A count that disagrees gets one batch-level AE whose ERR names it; nothing is stored."""
        reply = self.receive(batch(message("C1"), message("C2"), count="3"))
        assert reply.ack is not None
        self.assertEqual(self.outbox.stored, [])
        self.assertEqual(msa(reply.ack), [("AE", "B1")])
        text = reply.ack.decode()
        self.assertIn("BTS-1 says 3 messages, the frame has 2", text.split("ERR|", 1)[1])
        self.assertEqual(segments(reply.ack)[-2:], ["BTS|1", "FTS|1"])
        self.assertEqual([(a.control_id, a.ack_code, a.batch_control_id) for a in self.outbox.audits],
                         [("B1", "AE", "B1")])

    def test_store_failure_rejects_the_whole_batch(self) -> None:
        """When the batch's commit fails every accepted message gets AR and none is stored."""
        self.outbox.hold = True
        d = self.receiver.receive(batch(message("C1"), message("C2")).encode(), "p")
        self.assertEqual(len(self.outbox.waiting_batches), 1)
        self.outbox.fail_batch()
        reply = self.successResultOf(d)
        assert reply.ack is not None
        self.assertEqual(msa(reply.ack), [("AR", "C1"), ("AR", "C2")])
        self.assertEqual(self.outbox.stored, [])

    def test_duplicates_in_a_batch(self) -> None:
        """A resent batch is acknowledged again but stored once."""
        text = batch(message("C1"), message("C2"))
        self.receive(text)
        again = self.receive(text)
        self.assertEqual([p.duplicate for p in again.parts], [True, True])
        self.assertEqual(len(self.outbox.stored), 2)

    def test_too_many_messages(self) -> None:
        """A batch over MLLP_MAX_BATCH_MESSAGES gets one AE naming the setting; nothing is stored."""
        receiver = Receiver(self.outbox, self.clock, max_batch_messages=2)
        reply = self.receive(batch(*(message(f"C{n}") for n in range(3))), receiver)
        assert reply.ack is not None
        self.assertEqual(msa(reply.ack), [("AE", "B1")])
        self.assertIn(b"MLLP_MAX_BATCH_MESSAGES", reply.ack)
        self.assertEqual(self.outbox.stored, [])

    def test_shutting_down_rejects_every_message(self) -> None:
        """While shutting down every message of a batch gets AR, so the sender resends it whole."""
        self.receiver.accepting = False
        reply = self.receive(batch(message("C1"), message("C2")))
        assert reply.ack is not None
        self.assertEqual(msa(reply.ack), [("AR", "C1"), ("AR", "C2")])
        self.assertEqual(self.outbox.stored, [])

    def test_validator_runs_per_message(self) -> None:
        """The structure validator sees each contained message; its AE is that message's alone."""
        seen: list[str] = []

        def validate(m: Message) -> Deferred[AckError | None]:
            seen.append(m.header.control_id)
            bad = m.header.control_id == "C2"
            return succeed(AckError("100", "structure invalid") if bad else None)

        receiver = Receiver(self.outbox, self.clock, validator=validate)
        reply = self.receive(batch(message("C1"), message("C2"), message("C3")), receiver)
        assert reply.ack is not None
        self.assertEqual(seen, ["C1", "C2", "C3"])
        self.assertEqual(msa(reply.ack), [("AA", "C1"), ("AE", "C2"), ("AA", "C3")])

    def test_bom_batch(self) -> None:
        """A batch after a UTF-8 BOM is read as UTF-8 when MSH-18 is empty."""
        text = batch(message("C1").replace("PID|1|", "PID|1|Müller|"))
        reply = self.receive(codecs.BOM_UTF8 + text.encode("utf-8"))
        self.assertEqual(reply.parts[0].code, "AA")
        self.assertEqual(self.outbox.stored[0].charset, "UNICODE UTF-8")
        self.assertIn("Müller".encode(), self.outbox.stored[0].payload)


class OneMessagePerFrameTests(Harness):
    """Two messages glued in one frame are refused, not stored as one."""

    def test_several_messages_get_ae(self) -> None:
        """A frame with two MSH and no batch header gets AE saying what to send; nothing is stored."""
        reply = self.receive(message("C1") + message("C2"))
        self.assertEqual(reply.code, "AE")
        assert reply.ack is not None and reply.error is not None
        self.assertIn("one message per frame", reply.error.text)
        self.assertIn(b"ERR|", reply.ack)
        self.assertEqual(msa(reply.ack)[0], ("AE", "C1"))
        self.assertEqual(self.outbox.stored, [])
        self.assertEqual([a.ack_code for a in self.outbox.audits], ["AE"])

    def test_bom_message_stored_exactly(self) -> None:
        """A message after a UTF-8 BOM gets AA and is stored with the BOM, byte for byte."""
        payload = codecs.BOM_UTF8 + message("C1").replace("PID|1|", "PID|1|Müller|").encode()
        reply = self.receive(payload)
        self.assertEqual(reply.code, "AA")
        self.assertEqual(self.outbox.stored[0].payload, payload)
        self.assertEqual(self.outbox.stored[0].charset, "UNICODE UTF-8")


def _golden_batch(version: str, delims: str, enhanced: bool) -> str:
    sent = [message(cid, version, delims, enhanced) for cid in ("G1", "BAD", "G2")]
    return batch(*sent, delims=delims)


def _refuse_bad(m: Message) -> Deferred[AckError | None]:
    bad = m.header.control_id == "BAD"
    return succeed(AckError("101", "PID-5 is required", "PID", 5) if bad else None)


def _hl7apy_chars(delims: str) -> dict[str, str]:
    return {"FIELD": delims[0], "COMPONENT": delims[1], "REPETITION": delims[2],
            "ESCAPE": delims[3], "SUBCOMPONENT": delims[4], "GROUP": "\r", "SEGMENT": "\r"}


class GoldenAckTests(Harness):
    """Batch ACKs for 2.3 to 2.8, original and enhanced mode, standard and custom delimiters."""

    def check(self, version: str, delims: str, enhanced: bool) -> None:
        from hl7apy.consts import VALIDATION_LEVEL
        from hl7apy.parser import parse_message, parse_segment

        name = (f"{version}-{'enhanced' if enhanced else 'original'}-"
                f"{'custom' if delims != STANDARD else 'standard'}.er7")
        receiver = Receiver(self.outbox, self.clock, ack_id=self.next_id, validator=_refuse_bad)
        reply = self.receive(_golden_batch(version, delims, enhanced), receiver)
        assert reply.ack is not None
        text = reply.ack.decode("ascii").replace("\r", "\n")
        path = GOLDEN / name
        if os.environ.get("MLLPD_UPDATE_GOLDEN"):
            GOLDEN.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="ascii")
        self.assertEqual(text, path.read_text(encoding="ascii"), name)

        fs = delims[0]
        chars = _hl7apy_chars(delims)
        lines = [s for s in reply.ack.decode("ascii").split("\r") if s]
        # hl7apy reads BHS like an ordinary segment: its bhs_N is BHS-(N+1).
        bhs = parse_segment(lines[1], version=version, encoding_chars=chars)
        self.assertEqual(bhs.bhs_11.value, "B1", name)  # BHS-12, the reference batch control id
        fhs = parse_segment(lines[0], version=version, encoding_chars=chars)
        self.assertEqual(fhs.fhs_11.value, "F1", name)
        bts = parse_segment(lines[-2], version=version, encoding_chars=chars)
        self.assertEqual(bts.bts_1.value, "3", name)
        acks = re.split(f"(?=MSH{re.escape(fs)})", "\r".join(lines[2:-2]) + "\r")[1:]
        codes = []
        for ack_text in acks:
            # 2.3 and 2.3.1 ACKs name no message structure (MSH-9.3), which
            # hl7apy needs for strict validation.
            level = VALIDATION_LEVEL.TOLERANT if version < "2.4" else VALIDATION_LEVEL.STRICT
            parsed = parse_message(ack_text, validation_level=level, find_groups=False)
            if level == VALIDATION_LEVEL.STRICT:
                parsed.validate()
            self.assertEqual(parsed.msh.msh_12.to_er7().split(delims[1])[0], version)
            codes.append((parsed.msa.msa_1.value, parsed.msa.msa_2.value))
        prefix = "C" if enhanced else "A"
        self.assertEqual(codes, [(prefix + "A", "G1"), (prefix + "E", "BAD"), (prefix + "A", "G2")], name)

    def test_golden_batch_rejects(self) -> None:
        """Batch-level rejects match their golden files: AE naming the problem, MSA-2 the BHS-11, hl7apy reads them."""
        from hl7apy.consts import VALIDATION_LEVEL
        from hl7apy.parser import parse_message

        cases = {
            "reject-count-2.5-original-standard.er7": batch(message("R1"), count="2"),
            "reject-count-2.8-enhanced-custom.er7": batch(
                message("R1", "2.8", CUSTOM, enhanced=True), delims=CUSTOM, count="5"),
            "reject-no-bhs-2.5-original-standard.er7":
                "FHS|^~\\&|LAB|HOSP|EHR|HOSP|20260101120000||||F1\r" + message("R1") + "FTS|3\r",
            # MSH-15 NE: the reject is sent all the same (a batch ACK without
            # it would say every message was accepted).
            "reject-count-ne-2.5-enhanced-standard.er7": batch(
                message("R1", enhanced=True, mode="NE"), count="2"),
        }
        for name, text in cases.items():
            reply = self.receive(text)
            assert reply.ack is not None
            got = reply.ack.decode("ascii").replace("\r", "\n")
            path = GOLDEN / name
            if os.environ.get("MLLPD_UPDATE_GOLDEN"):
                path.write_text(got, encoding="ascii")
            self.assertEqual(got, path.read_text(encoding="ascii"), name)
            fs = got.split("\n")[0][3]
            lines = [s for s in reply.ack.decode("ascii").split("\r") if s]
            ack_text = "\r".join(s for s in lines if s[:3] in ("MSH", "MSA", "ERR")) + "\r"
            parsed = parse_message(ack_text, validation_level=VALIDATION_LEVEL.STRICT, find_groups=False)
            parsed.validate()
            self.assertIn(parsed.msa.msa_1.value, ("AE", "CE"), name)
            self.assertEqual(lines[-2 if lines[-1].startswith("FTS") else -1], f"BTS{fs}1", name)
        self.assertEqual(self.outbox.stored, [])

    def test_golden(self) -> None:
        """Each batch ACK matches its golden file and reads back in hl7apy: BHS-12, one MSA each, BTS count."""
        for version in VERSIONS:
            for delims in (STANDARD, CUSTOM):
                for enhanced in (False, True):
                    self.check(version, delims, enhanced)


_ids = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", min_size=1, max_size=20)


# Field text without delimiters, segment ends or escape characters.
_text = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="|^~\\&#$*@!\r\n\x1c\x0b"),
                max_size=30)
_segment_ids = st.sampled_from(["PID", "PV1", "OBX", "NTE", "ZXY", "EVN", "AL1"])


@st.composite
def _messages(draw: st.DrawFn, delims: str) -> tuple[str, str]:
    """(control id, message text): an MSH, then a few segments of arbitrary text."""
    cid = draw(_ids)
    enhanced = draw(st.booleans())
    version = draw(st.sampled_from(VERSIONS))
    head = msh(cid, version, delims, enhanced)
    body = "".join(
        delims[0].join([seg_id, *fields]) + "\r"
        for seg_id, fields in draw(st.lists(st.tuples(_segment_ids, st.lists(_text, max_size=6)),
                                            max_size=5))
    )
    return cid, head + body


class RoundTripProperty(SynchronousTestCase):
    """Any batch built from valid messages is split, stored and acknowledged one for one."""

    @settings(max_examples=80, deadline=None)
    @given(
        data=st.data(),
        delims=st.sampled_from([STANDARD, CUSTOM, "|^~\\&#"]),
        crlf=st.booleans(),
        with_file=st.booleans(),
        bom=st.booleans(),
    )
    def test_round_trip(self, data: st.DataObject, delims: str, crlf: bool, with_file: bool,
                        bom: bool) -> None:
        """Stored payloads are the sent messages exactly and in order; one ACK answers each, in order."""
        drawn = data.draw(st.lists(_messages(delims), max_size=25, unique_by=lambda m: m[0]))
        ids = [cid for cid, _ in drawn]
        sent = [text for _, text in drawn]
        clock = Clock()
        outbox = MemoryOutbox()
        receiver = Receiver(outbox, clock)
        text = batch(*sent, delims=delims, file_id="F" if with_file else None)
        if crlf:
            text = text.replace("\r", "\r\n")
            sent = [m.replace("\r", "\r\n") for m in sent]
        payload = (codecs.BOM_UTF8 if bom else b"") + text.encode("utf-8")
        reply = self.successResultOf(receiver.receive(payload, "p"))
        assert reply.ack is not None
        self.assertEqual([e.payload for e in outbox.stored], [m.encode("utf-8") for m in sent])
        self.assertEqual([e.batch_position for e in outbox.stored], list(range(1, len(ids) + 1)))
        acked = msa(reply.ack, delims[0])
        self.assertEqual([cid for _, cid in acked], ids)
        self.assertEqual({code for code, _ in acked} - {"AA", "CA"}, set())
        self.assertIn(f"BTS{delims[0]}{len(ids)}\r".encode(), reply.ack)


class SQLiteBatchTests(TestCase):
    """store_batch on a real SQLite file: one transaction for the whole batch."""

    def open(self, path: str) -> SQLiteOutbox:
        outbox = SQLiteOutbox(path, reactor)
        outbox.start()
        self.addCleanup(outbox.close)
        return outbox

    async def test_batch_stored_with_its_place(self) -> None:
        """A stored batch keeps its order, batch control id and positions, also in the audit trail."""
        path = temp_db(self)
        outbox = self.open(path)
        sent = [envelope(f"P{n}")._replace(batch_control_id="B7", batch_position=n)
                for n in range(1, 4)]
        results = await outbox.store_batch(sent)
        self.assertEqual([r.message_id for r in results], [e.message_id for e in sent])
        conn = sqlite3.connect(path)
        self.addCleanup(conn.close)
        self.assertEqual(
            conn.execute("SELECT control_id, batch_control_id, batch_position FROM messages"
                         " ORDER BY id").fetchall(),
            [("P1", "B7", 1), ("P2", "B7", 2), ("P3", "B7", 3)],
        )
        self.assertEqual(
            conn.execute("SELECT DISTINCT batch_control_id FROM audit").fetchall(), [("B7",)]
        )

    async def test_batch_all_or_nothing(self) -> None:
        """When one message of a batch cannot be written, none of the batch is stored."""
        path = temp_db(self)
        outbox = self.open(path)
        await outbox.store(envelope("F0"))
        conn = sqlite3.connect(path)
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.close()
        # SQLite's own limit makes it answer SQLITE_FULL exactly as on a full disk.
        outbox._conn.execute(f"PRAGMA max_page_count = {pages + 2}")
        big = b"MSH|^~\\&|A|B|C|D|||ADT^A01|F3|P|2.5\r" + b"x" * 200_000
        batch_ = [envelope("F1"), envelope("F2"), envelope("F3", big)]
        with self.assertRaises(OutboxError):
            await outbox.store_batch(batch_)
        self.assertEqual([r[0] for r in rows(path)], ["F0"])

    async def test_batch_during_a_commit_is_not_split(self) -> None:
        """A batch queued while another commit runs goes whole into one later commit."""
        outbox = self.open(temp_db(self))
        seen: list[int] = []
        outbox.commit_observer = lambda n, _: seen.append(n)
        first = outbox.store(envelope("S0"))
        await deferLater(reactor, 0, lambda: None)  # S0's commit is now running
        results = await outbox.store_batch([envelope(f"S{n}") for n in range(1, 301)])
        await first
        self.assertEqual(len(results), 300)
        self.assertEqual(seen, [1, 300])


class ProtocolTests(SynchronousTestCase):
    """A batch frame on a connection: one reply frame, counters per message."""

    def test_batch_frame_gets_one_reply_frame_in_order(self) -> None:
        """A batch between two single messages gets one batch ACK frame, in arrival order; counters count its messages."""
        from tests.test_protocol import Harness as ProtocolHarness
        from tests.test_protocol import acks

        h = ProtocolHarness(hold=True)
        proto, transport = h.connect()
        bad = "MSH|^~\\&|LAB|HOSP|EHR|HOSP|20260101||ADT^A01||P|2.5\r"
        proto.dataReceived(
            frame(message("S1").encode())
            + frame(batch(message("C1"), bad, message("C2")).encode())
            + frame(message("S2").encode())
        )
        h.outbox.commit_batch()
        self.assertEqual(acks(transport), [])  # S1 still waits for its commit
        h.outbox.commit()
        h.outbox.commit()
        replies = acks(transport)
        self.assertEqual(len(replies), 3)
        self.assertEqual(msa(replies[0].encode()), [("AA", "S1")])
        self.assertTrue(replies[1].startswith("FHS|"))
        self.assertEqual(msa(replies[1].encode()), [("AA", "C1"), ("AE", ""), ("AA", "C2")])
        self.assertEqual(msa(replies[2].encode()), [("AA", "S2")])
        self.assertEqual(h.factory.acks[("ADT", "AA")], 4)
        self.assertEqual(h.factory.acks[("ADT", "AE")], 1)


class CLITests(SynchronousTestCase):
    """mllp-cli and the TUI show which batch a message came in."""

    def setUp(self) -> None:
        import time

        from tests.outboxrows import add_message, connect, new_outbox

        self.path = new_outbox(self)
        conn = connect(self.path)
        self.addCleanup(conn.close)
        now = time.time()
        self.single = add_message(conn, "ALONE", received_at=now - 5)
        # A stored message's row is also its audit record.
        self.member = add_message(conn, "IN-BATCH", received_at=now - 4,
                                  batch_control_id="B42", batch_position=7)

    def test_show_names_the_batch(self) -> None:
        """``show`` (and the TUI's message screen, which renders the same lines) gives batch control id and position."""
        from tests.test_cli_commands import mllp_cli

        shown = mllp_cli(["--db", self.path, "show", self.member])
        self.assertEqual(shown.returncode, 0, shown.stderr)
        self.assertIn("batch       control id B42   position 7", shown.stdout.splitlines())
        alone = mllp_cli(["--db", self.path, "show", self.single])
        self.assertNotIn("batch ", alone.stdout)

    def test_tui_message_screen_names_the_batch(self) -> None:
        """In the TUI, viewing a message that came in a batch shows its batch control id and position."""
        from mllpd.cli.app import MessageScreen, OutboxApp
        from mllpd.cli.store import Store
        from tests.outboxrows import add_delivery, connect
        from tests.test_cli_app import run_scenario, settle

        conn = connect(self.path)
        self.addCleanup(conn.close)
        add_delivery(conn, self.member, "ehr", "dead", updated_at=1000.0)

        async def scenario() -> None:
            store = Store(self.path)
            app = OutboxApp(store, interval=0, clock=lambda: 2000.0)
            try:
                async with app.run_test(size=(200, 50)) as pilot:
                    await settle(app, pilot)
                    await pilot.press("v")
                    await settle(app, pilot)
                    screen = app.screen
                    assert isinstance(screen, MessageScreen)
                    self.assertIn("batch       control id B42   position 7", screen.lines)
            finally:
                store.close()

        run_scenario(scenario)

    def test_audit_names_the_batch(self) -> None:
        """``audit`` lists the batch control id of records that came in a batch."""
        import json

        from tests.test_cli_commands import mllp_cli

        result = mllp_cli(["--db", self.path, "audit", "--json"])
        self.assertEqual(result.returncode, 0, result.stderr)
        # Newest first: the batch member, then the message sent alone.
        self.assertEqual([r["batch_control_id"] for r in json.loads(result.stdout)], ["B42", None])
        table = mllp_cli(["--db", self.path, "audit"]).stdout.splitlines()
        self.assertEqual(table[0].split()[-1], "batch")
        self.assertEqual(table[1].split()[-1], "B42")


class ForwardingRelayTests(TestCase):
    """The relay hands a forwarding connector a batch's queued messages together."""

    timeout = 15

    def setUp(self) -> None:
        self.path = temp_db(self)
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.outbox = SQLiteOutbox(self.path, reactor, wall_clock=self.clock.seconds)
        self.outbox.start()
        self.addCleanup(self.outbox.close)

    def start(self, connector: Any) -> None:
        from mllpd.relay import Relay, Worker
        from tests.test_relay import Policy

        worker = Worker(connector, self.outbox, Policy(), self.clock, rand=lambda: 0.5)
        self.outbox.add_listener(Relay([worker]).notify)
        worker.start()
        self.addCleanup(worker.stop)

    async def store_batch(self, batch_id: str, *control_ids: str) -> None:
        await self.outbox.store_batch([
            envelope(cid, received_at=self.clock.seconds())._replace(
                routes=("up",), batch_control_id=batch_id, batch_position=n)
            for n, cid in enumerate(control_ids, 1)
        ])

    async def test_batches_go_together_and_retry_keeps_order(self) -> None:
        """Each batch goes as one call; an AR'd message and those after it are retried together after the backoff."""
        from tests.test_relay import queue_rows

        up = BatchConnector([[Delivered(), Retry("upstream AR"), Delivered()]])
        self.start(up)
        await self.store_batch("B1", "A", "B", "C")
        await self.outbox.store(envelope("ALONE", received_at=self.clock.seconds())._replace(routes=("up",)))
        await up.wait_for(1)
        await self.outbox.mark_in_flight(-1, 0)  # every state change so far is committed
        self.assertEqual(
            [(c, s, n) for c, s, n, _ in queue_rows(self.path, "up")],
            [("A", "delivered", 1), ("B", "pending", 1), ("C", "pending", 1), ("ALONE", "pending", 0)],
        )
        self.clock.advance(10.1)
        await up.wait_for(3)
        self.assertEqual(up.calls, [["A", "B", "C"], ["B", "C"], ["ALONE"]])
        self.assertEqual([d.attempt for d in up.seen[1]], [2, 2])


@implementer(IBatchConnector)
class BatchConnector:
    """Records each call (a batch or a single message) and answers a batch
    with the next scripted outcomes (all Delivered when none are left)."""

    forward_batches = True

    def __init__(self, script: list[list[Outcome]]) -> None:
        self.name = "up"
        self.script = script
        self.seen: list[list[Delivery]] = []
        self.waiters: list[tuple[int, Deferred[None]]] = []

    @property
    def calls(self) -> list[list[str]]:
        return [[d.control_id for d in call] for call in self.seen]

    def start(self) -> None:
        pass

    def stop(self) -> Deferred[None]:
        return succeed(None)

    def _called(self, deliveries: list[Delivery]) -> None:
        self.seen.append(deliveries)
        for n, d in list(self.waiters):
            if len(self.seen) >= n:
                self.waiters.remove((n, d))
                reactor.callLater(0, d.callback, None)

    def deliver(self, delivery: Delivery) -> Deferred[Outcome]:
        self._called([delivery])
        return succeed(Delivered())

    def deliver_batch(self, deliveries: list[Delivery], batch_control_id: str) -> Deferred[list[Outcome]]:
        self._called(list(deliveries))
        outcomes = self.script.pop(0) if self.script else [Delivered()] * len(deliveries)
        return succeed(outcomes)

    def wait_for(self, n: int) -> Deferred[None]:
        if len(self.seen) >= n:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self.waiters.append((n, d))
        return d


class ForwardOptionTests(SynchronousTestCase):
    """The mllp connector's ``batch`` option."""

    def test_batch_option(self) -> None:
        """``batch`` is per-message by default or forward; anything else fails naming the option."""
        from twisted.internet.task import Clock as FakeReactor

        from mllpd.config import ConfigError
        from mllpd.connectors import ConnectorSpec
        from mllpd.connectors.mllp import build

        def make(**options: str) -> Any:
            spec = ConnectorSpec("ehr", "mllp", None, {"address": "tcp:127.0.0.1:1", **options})
            return build(spec, FakeReactor(), {})

        self.assertFalse(make().forward_batches)
        self.assertTrue(make(batch="forward").forward_batches)
        with self.assertRaises(ConfigError) as ctx:
            make(batch="whole")
        self.assertIn("connectors.ehr.batch: 'whole'; expected per-message or forward", str(ctx.exception))


class OversizedBatchTests(SynchronousTestCase):
    """A batch counts against MLLP_MAX_FRAME_SIZE as one frame."""

    def test_oversized_batch_gets_batch_level_ar(self) -> None:
        """A batch frame over MLLP_MAX_FRAME_SIZE gets one batch-level AR naming its BHS-11, then the connection closes; nothing is stored."""
        from tests.test_protocol import Harness as ProtocolHarness
        from tests.test_protocol import acks

        h = ProtocolHarness(max_frame_size=2000)
        proto, transport = h.connect()
        text = batch(*(message(f"C{n}") for n in range(40)))
        proto.dataReceived(b"\x0b" + text.encode())
        [reply] = acks(transport)
        self.assertEqual(msa(reply.encode()), [("AR", "B1")])
        self.assertIn("BHS|^~\\&|EHR|HOSP|LAB|HOSP|", reply)
        self.assertIn("frame larger than 2000 bytes", reply)
        self.assertEqual(segments(reply.encode())[-2:], ["BTS|1", "FTS|1"])
        self.assertTrue(transport.write_closed)
        self.assertEqual(h.outbox.stored, [])

    def test_small_batch_fits(self) -> None:
        """The same limit takes a batch that fits: the frame's size is what counts."""
        from tests.test_protocol import Harness as ProtocolHarness
        from tests.test_protocol import acks

        h = ProtocolHarness(max_frame_size=2000)
        proto, transport = h.connect()
        proto.dataReceived(frame(batch(*(message(f"C{n}") for n in range(5))).encode()))
        [reply] = acks(transport)
        self.assertEqual([code for code, _ in msa(reply.encode())], ["AA"] * 5)


def ne_message(control_id: str) -> str:
    """An enhanced-mode message that asks for no accept acknowledgement (MSH-15 NE)."""
    return message(control_id, enhanced=True, mode="NE")


class NotStoredIsNeverSilentTests(Harness):
    """In a batch ACK a missing ACK means accepted: whatever is not stored is always listed."""

    def test_ne_messages_not_stored_are_listed(self) -> None:
        """While shutting down, NE and SU messages of a batch each get CR in the batch ACK, not an empty BTS|0."""
        self.receiver.accepting = False
        su = message("S1", enhanced=True, mode="SU")
        reply = self.receive(batch(ne_message("N1"), ne_message("N2"), su))
        assert reply.ack is not None
        self.assertEqual(msa(reply.ack), [("CR", "N1"), ("CR", "N2"), ("CR", "S1")])
        self.assertIn("BTS|3", segments(reply.ack))
        self.assertEqual(self.outbox.stored, [])

    def test_failed_commit_lists_ne_messages(self) -> None:
        """When the batch's commit fails, NE messages get CR in the batch ACK."""
        self.outbox.hold = True
        d = self.receiver.receive(batch(ne_message("N1"), ne_message("N2")).encode(), "p")
        self.outbox.fail_batch()
        reply = self.successResultOf(d)
        assert reply.ack is not None
        self.assertEqual(msa(reply.ack), [("CR", "N1"), ("CR", "N2")])

    def test_accepted_ne_messages_are_left_out(self) -> None:
        """Accepted NE messages get no ACK (BTS|0: all accepted); a refused one among them gets its CE."""
        bad = ne_message("BAD").replace("|P|2.5|", "|P||")  # MSH-12 missing
        reply = self.receive(batch(ne_message("N1"), bad, ne_message("N3")))
        assert reply.ack is not None
        self.assertEqual(msa(reply.ack), [("CE", "BAD")])
        self.assertIn("BTS|1", segments(reply.ack))
        self.assertEqual([e.control_id for e in self.outbox.stored], ["N1", "N3"])

    def test_batch_reject_sent_to_ne_sender(self) -> None:
        """A malformed batch whose first message says NE still gets its one batch-level CE."""
        reply = self.receive(batch(ne_message("N1"), count="4"))
        assert reply.ack is not None
        self.assertEqual(msa(reply.ack), [("CE", "B1")])
        self.assertIn("BTS|1", segments(reply.ack))
        self.assertEqual(self.outbox.stored, [])

    def test_oversized_ne_batch_gets_its_reject(self) -> None:
        """A batch frame over MLLP_MAX_FRAME_SIZE whose first message says NE gets the batch-level CR."""
        from tests.test_protocol import Harness as ProtocolHarness
        from tests.test_protocol import acks

        h = ProtocolHarness(max_frame_size=2000)
        proto, transport = h.connect()
        text = batch(*(ne_message(f"C{n}") for n in range(40)))
        proto.dataReceived(b"\x0b" + text.encode())
        [reply] = acks(transport)
        self.assertEqual(msa(reply.encode()), [("CR", "B1")])
        self.assertTrue(transport.write_closed)


class EnvelopeFieldTests(Harness):
    """FHS and BHS fields: never a framing byte echoed, never an overlong value echoed or stored."""

    def test_framing_byte_in_batch_control_id(self) -> None:
        """0x1C in BHS-11 comes back escaped in BHS-12, so the reply cannot end the sender's frame."""
        text = "BHS|^~\\&|LAB|HOSP|EHR|HOSP|20260101120000||||X\x1c\r" + message("C1") + "BTS|1\r"
        reply = self.receive(text)
        assert reply.ack is not None
        self.assertNotIn(b"\x1c", reply.ack)
        self.assertEqual(segments(reply.ack)[0].split("|")[11], "X\\X1C\\")
        self.assertEqual(msa(reply.ack), [("AA", "C1")])

    def test_framing_byte_in_sending_application(self) -> None:
        """0x1C in BHS-3 comes back escaped in the reply's BHS-5 and in a batch reject's MSH-5."""
        head = "BHS|^~\\&|L\x1cAB|HOSP|EHR|HOSP|20260101120000||||B1\r"
        for trailer in ("BTS|1\r", "BTS|9\r"):  # accepted, and rejected
            reply = self.receive(head + message("C1") + trailer)
            assert reply.ack is not None
            self.assertNotIn(b"\x1c", reply.ack, trailer)
            self.assertIn(b"|L\\X1C\\AB|", reply.ack, trailer)

    def test_framing_byte_delimiters_refused(self) -> None:
        """A BHS whose field separator or encoding characters are framing bytes gets a batch-level AE."""
        for head, field in (("BHS\x0b^~\\&\x0bA\x0b\x0b\x0b\x0b\x0b\x0b\x0b\x0bB1\r", "BHS-1"),
                            ("BHS|^~\x0b&|A|||||||B1\r", "BHS-2")):
            reply = self.receive(head + message("C1") + "BTS|1\r")
            assert reply.ack is not None and reply.error is not None
            self.assertEqual(reply.code, "AE", head)
            self.assertIn(field, reply.error.text)
            self.assertNotIn(b"\x0b", reply.ack)
        self.assertEqual(self.outbox.stored, [])

    def test_overlong_batch_control_id(self) -> None:
        """A 100,000-character BHS-11 gets a batch-level AE naming BHS-11; it is neither echoed nor stored."""
        long_id = "X" * 100_000
        reply = self.receive(batch(message("C1"), batch_id=long_id, file_id=None))
        assert reply.ack is not None and reply.error is not None
        self.assertEqual(msa(reply.ack), [("AE", "")])
        self.assertIn("BHS-11 is longer than 199 characters", reply.error.text)
        self.assertLess(len(reply.ack), 1000)
        self.assertEqual(self.outbox.stored, [])
        self.assertEqual([a.batch_control_id for a in self.outbox.audits], [""])

    def test_overlong_file_control_id(self) -> None:
        """A 100,000-character FHS-11 gets a batch-level AE naming FHS-11; nothing long comes back or is stored."""
        reply = self.receive(batch(message("C1"), file_id="F" * 100_000))
        assert reply.ack is not None and reply.error is not None
        self.assertIn("FHS-11 is longer than 199 characters", reply.error.text)
        self.assertLess(len(reply.ack), 1000)
        self.assertEqual(self.outbox.stored, [])
        self.assertTrue(all(len(a.batch_control_id or "") <= 199 for a in self.outbox.audits))

    def test_envelope_limits(self) -> None:
        """BHS-3 to 6 get MSH-3's limit (227), BHS-11 MSH-10's (199), other fields 200; at the limit is fine."""
        def bhs(n: int, length: int) -> str:
            fields = ["BHS", "^~\\&", "LAB", "HOSP", "EHR", "HOSP", "", "", "", "", "B1"]
            fields += [""] * (n - len(fields))
            fields[n - 1] = "Y" * length  # fields[0] is the segment id, fields[1] BHS-2
            return "|".join(fields) + "\r"

        for n, limit in ((3, 227), (6, 227), (9, 200), (11, 199), (15, 200)):
            ok = self.receive(bhs(n, limit) + message(f"OK{n}") + "BTS|1\r")
            self.assertEqual([p.code for p in ok.parts], ["AA"], n)
            refused = self.receive(bhs(n, limit + 1) + message(f"NO{n}") + "BTS|1\r")
            assert refused.error is not None
            self.assertEqual(refused.error.text, f"BHS-{n} is longer than {limit} characters")
        self.assertEqual([e.control_id for e in self.outbox.stored], ["OK3", "OK6", "OK9", "OK11", "OK15"])

    def test_forwarded_batch_control_id_is_framing_safe(self) -> None:
        """A stored batch control id holding 0x1C goes upstream escaped in BHS-11."""
        from datetime import UTC, datetime

        from mllpd.batch import forward_payload

        data = forward_payload([message("C1").encode()], "B\x1c9", datetime(2026, 1, 1, tzinfo=UTC))
        self.assertNotIn(b"\x1c", data)
        self.assertEqual(data.split(b"\r")[0].split(b"|")[10], b"B\\X1C\\9")


class BatchOutboxLimitTests(Harness):
    """MLLP_MAX_OUTBOX counts the members of a batch admitted before it."""

    def routed(self, **limits: Any) -> Receiver:
        from mllpd.rules import RuleSet

        return Receiver(self.outbox, self.clock, rules=RuleSet(filters=(("ehr", None),)), **limits)

    def test_batch_stops_at_the_count_limit(self) -> None:
        """With room for two more messages, a batch of four gets AA, AA, AR, AR and two are stored."""
        from mllpd.outbox import Backlog

        self.outbox.pending = Backlog(1, 100)
        reply = self.receive(batch(*(message(f"C{n}") for n in range(4))),
                             self.routed(max_outbox=(3, None)))
        assert reply.ack is not None
        self.assertEqual(msa(reply.ack), [("AA", "C0"), ("AA", "C1"), ("AR", "C2"), ("AR", "C3")])
        self.assertEqual([e.control_id for e in self.outbox.stored], ["C0", "C1"])

    def test_batch_stops_at_the_size_limit(self) -> None:
        """The size limit counts the bytes of the batch's members admitted before."""
        from mllpd.outbox import Backlog

        size = len(message("C0"))
        self.outbox.pending = Backlog(0, 0)
        reply = self.receive(batch(*(message(f"C{n}") for n in range(4))),
                             self.routed(max_outbox=(None, 2 * size)))
        self.assertEqual([p.code for p in reply.parts], ["AA", "AA", "AR", "AR"])

    def test_unrouted_members_do_not_count(self) -> None:
        """Members routed nowhere never join the backlog, so they do not fill it either."""
        from mllpd.outbox import Backlog

        self.outbox.pending = Backlog(2, 100)
        receiver = Receiver(self.outbox, self.clock, max_outbox=(3, None))
        reply = self.receive(batch(*(message(f"C{n}") for n in range(4))), receiver)
        self.assertEqual([p.code for p in reply.parts], ["AA"] * 4)


class FileWithoutBatchTests(Harness):
    """HL7's [FHS] {[BHS] {MSH} [BTS]} [FTS]: BHS and BTS may be left out."""

    def test_file_of_messages_without_bhs(self) -> None:
        """FHS, messages, FTS: one batch; each message stored with FHS-11 and gets its ACK between FHS and FTS."""
        text = ("FHS|^~\\&|LAB|HOSP|EHR|HOSP|20260101120000||||F7\r"
                + message("C1") + message("C2") + "FTS|1\r")
        reply = self.receive(text)
        assert reply.ack is not None
        self.assertEqual([s[:3] for s in segments(reply.ack)], ["FHS", "MSH", "MSA", "MSH", "MSA", "FTS"])
        self.assertEqual(segments(reply.ack)[0].split("|")[11], "F7")  # FHS-12
        self.assertEqual(segments(reply.ack)[-1], "FTS|1")
        self.assertEqual(msa(reply.ack), [("AA", "C1"), ("AA", "C2")])
        self.assertEqual([(e.control_id, e.batch_control_id, e.batch_position) for e in self.outbox.stored],
                         [("C1", "F7", 1), ("C2", "F7", 2)])

    def test_golden_file_without_bhs(self) -> None:
        """The reply to FHS, messages, FTS matches its golden file; hl7apy reads FHS-12 and each ACK."""
        from hl7apy.consts import VALIDATION_LEVEL
        from hl7apy.parser import parse_message, parse_segment

        text = ("FHS|^~\\&|LAB|HOSP|EHR|HOSP|20260101120000||||F7\r"
                + message("G1") + message("G2") + "FTS|1\r")
        reply = self.receive(text)
        assert reply.ack is not None
        got = reply.ack.decode("ascii").replace("\r", "\n")
        path = GOLDEN / "file-without-bhs-2.5-original-standard.er7"
        if os.environ.get("MLLPD_UPDATE_GOLDEN"):
            path.write_text(got, encoding="ascii")
        self.assertEqual(got, path.read_text(encoding="ascii"))
        lines = [s for s in reply.ack.decode("ascii").split("\r") if s]
        chars = _hl7apy_chars(STANDARD)
        fhs = parse_segment(lines[0], version="2.5", encoding_chars=chars)
        self.assertEqual(fhs.fhs_11.value, "F7")  # FHS-12, the reference file control id
        codes = []
        for ack_text in re.split("(?=MSH\\|)", "\r".join(lines[1:-1]) + "\r")[1:]:
            parsed = parse_message(ack_text, validation_level=VALIDATION_LEVEL.STRICT,
                                   find_groups=False)
            parsed.validate()
            codes.append((parsed.msa.msa_1.value, parsed.msa.msa_2.value))
        self.assertEqual(codes, [("AA", "G1"), ("AA", "G2")])

    def test_file_count_of_messages_accepted(self) -> None:
        """FTS-1 of such a file may count its one batch, or its messages; anything else is refused."""
        head = "FHS|^~\\&|LAB|HOSP|EHR|HOSP|20260101120000||||F7\r"
        for count, code in (("", "AA"), ("1", "AA"), ("2", "AA"), ("3", None)):
            reply = self.receive(head + message(f"A{count}") + message(f"B{count}") + f"FTS|{count}\r")
            assert reply.ack is not None
            got = msa(reply.ack)
            if code is None:
                self.assertEqual(got, [("AE", "F7")], count)
            else:
                self.assertEqual({c for c, _ in got}, {code}, count)

    def test_missing_bts_at_the_end(self) -> None:
        """A batch whose BTS is left out ends with the frame (or at FTS): its messages are stored and acknowledged."""
        for text in (
            "BHS|^~\\&|LAB|HOSP|||||||B1\r" + message("E1") + message("E2"),
            "FHS|^~\\&|LAB|HOSP|||||||F1\rBHS|^~\\&|LAB|HOSP|||||||B2\r" + message("E3") + "FTS|1\r",
        ):
            reply = self.receive(text)
            assert reply.ack is not None
            self.assertEqual({c for c, _ in msa(reply.ack)}, {"AA"}, text)
            self.assertIn(f"BTS|{len(reply.parts)}", segments(reply.ack))
        self.assertEqual([(e.control_id, e.batch_control_id) for e in self.outbox.stored],
                         [("E1", "B1"), ("E2", "B1"), ("E3", "B2")])


    def test_missing_fts_at_the_end(self) -> None:
        """A file whose FTS is left out ends with the frame ([FTS]): its messages are stored, and the reply still closes with FTS."""
        for text in (
            "FHS|^~\\&|LAB|HOSP|||||||F2\rBHS|^~\\&|LAB|HOSP|||||||B3\r" + message("G1") + "BTS|1\r",
            "FHS|^~\\&|LAB|HOSP|||||||F3\r" + message("G2") + message("G3"),
        ):
            reply = self.receive(text)
            assert reply.ack is not None
            self.assertEqual({c for c, _ in msa(reply.ack)}, {"AA"}, text)
            self.assertEqual(segments(reply.ack)[-1], "FTS|1", text)
        self.assertEqual([(e.control_id, e.batch_control_id) for e in self.outbox.stored],
                         [("G1", "B3"), ("G2", "F3"), ("G3", "F3")])


_KINDS = st.sampled_from(["new", "new", "new", "again", "prior", "rule", "overlong"])


@st.composite
def _mixed_batches(draw: st.DrawFn) -> list[tuple[str, str, str]]:
    """(kind, control id, message text) per batch member: new messages, exact
    resends of an earlier member ("again") or of a message stored before the
    batch ("prior"), messages a rule refuses, messages with an overlong MSH-3."""
    out: list[tuple[str, str, str]] = []
    for n, kind in enumerate(draw(st.lists(_KINDS, min_size=1, max_size=20))):
        news = [m for m in out if m[0] == "new"]
        if kind == "again" and news:
            out.append(("again", *draw(st.sampled_from(news))[1:]))
            continue
        drawn_id, text = draw(_messages(STANDARD))
        # Unique: a resend is the only way a control id comes twice.
        cid = f"{n}-{drawn_id}" + ("-REFUSE" if kind == "rule" else "")
        first, rest = text.split("\r", 1)
        fields = first.split("|")
        fields[9] = cid
        if kind == "overlong":
            fields[2] = "L" * 228  # MSH-3, one past its limit
        out.append(("new" if kind == "again" else kind, cid, "|".join(fields) + "\r" + rest))
    return out


class SQLiteRoundTripProperty(TestCase):
    """The round trip on a real SQLite outbox file, with resends and refused members."""

    timeout = 300

    async def test_round_trip_with_duplicates_and_refusals(self) -> None:
        """Each member gets the code a lone message would; exactly the first copies of acceptable ones are stored, in order."""
        from mllpd.rules import Rule, RuleSet

        examples: list[list[tuple[str, str, str]]] = []

        # Drawn by hypothesis, then run against the reactor one by one (a
        # failure names its example; there is no shrinking across awaits).
        @settings(max_examples=25, deadline=None, database=None)
        @given(_mixed_batches())
        def draw(members: list[tuple[str, str, str]]) -> None:
            examples.append(members)

        draw()
        rules = RuleSet(rules=(Rule("no-refuse", '!msh.control_id.endsWith("-REFUSE")', "refused"),),
                        filters=(("ehr", None),))
        for members in examples:
            path = temp_db(self)
            clock = Clock()
            clock.advance(1_800_000_000)
            outbox = SQLiteOutbox(path, reactor, wall_clock=clock.seconds)
            outbox.start()
            try:
                receiver = Receiver(outbox, clock, rules=rules)
                for kind, _, text in members:
                    if kind == "prior":
                        alone = await receiver.receive(text.encode("utf-8"), "p")
                        self.assertEqual(alone.code[1], "A", members)
                reply = await receiver.receive(
                    batch(*(text for _, _, text in members)).encode("utf-8"), "p"
                )
            finally:
                await outbox.close()
            expected_codes = []
            expected_rows: list[tuple[str, bytes, str | None, int | None]] = [
                (cid, text.encode(), None, None) for kind, cid, text in members if kind == "prior"
            ]
            for position, (kind, cid, text) in enumerate(members, 1):
                prefix = "C" if "|||AL|NE" in text.split("\r")[0] else "A"
                outcome = {"rule": "E", "overlong": "R"}.get(kind, "A")
                expected_codes.append(prefix + outcome)
                if kind == "new" and cid not in [r[0] for r in expected_rows]:
                    expected_rows.append((cid, text.encode(), "B1", position))
            self.assertEqual([p.code for p in reply.parts], expected_codes, members)
            self.assertEqual([p.duplicate for p in reply.parts],
                             [k in ("prior", "again") for k, _, _ in members], members)
            assert reply.ack is not None
            self.assertEqual(len(msa(reply.ack)), len(members), members)
            conn = sqlite3.connect(path)
            try:
                stored = conn.execute(
                    "SELECT control_id, payload, batch_control_id, batch_position"
                    " FROM messages ORDER BY id").fetchall()
                queued = conn.execute("SELECT COUNT(*) FROM deliveries").fetchone()[0]
            finally:
                conn.close()
            self.assertEqual(stored, expected_rows, members)
            self.assertEqual(queued, len(expected_rows), members)
