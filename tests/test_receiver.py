"""Receiver: which code each message gets and what is stored."""

from __future__ import annotations

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mllpd.ack import AckError
from mllpd.hl7 import Message
from mllpd.receiver import Receiver, Reply
from mllpd.testing import MemoryOutbox


def msh(control_id: str = "C1", version: str = "2.5", msh15: str = "", msh18: str = "") -> str:
    tail = ""
    if msh15 or msh18:
        tail = f"|||{msh15}|||{msh18}"
    return f"MSH|^~\\&|LAB^1.2^ISO|HOSP|EHR|HOSP|20260101||ADT^A01^ADT_A01|{control_id}|P|{version}{tail}\r"


class ReceiverTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.outbox = MemoryOutbox()
        self.receiver = Receiver(self.outbox, self.clock, ack_id=lambda: "ACKID")

    def receive(self, payload: bytes, receiver: Receiver | None = None) -> Reply:
        r = receiver or self.receiver
        return self.successResultOf(r.receive(payload, "10.1.1.1:999"))

    def test_accept_stores_exact_bytes(self) -> None:
        """AA only for a stored message, and the stored bytes are exactly the received ones."""
        payload = (msh() + "PID|1||123\n").encode()
        reply = self.receive(payload)
        self.assertEqual(reply.code, "AA")
        stored = self.outbox.stored[0]
        self.assertEqual(stored.payload, payload)
        self.assertEqual((stored.control_id, stored.msg_type, stored.peer), ("C1", "ADT^A01", "10.1.1.1:999"))
        self.assertEqual(stored.sending_app, "LAB^1.2^ISO")

    def test_duplicate_acked_not_stored(self) -> None:
        """A resent message is acknowledged again but stored once."""
        payload = msh().encode()
        self.assertEqual(self.receive(payload).code, "AA")
        again = self.receive(payload)
        self.assertEqual(again.code, "AA")
        self.assertTrue(again.duplicate)
        self.assertEqual(len(self.outbox.stored), 1)

    def test_required_fields(self) -> None:
        """Missing MSH-9, MSH-10 or MSH-12 gives AE 101 naming the field; nothing is stored."""
        cases = {
            "MSH|^~\\&|A|B|C|D|||ADT^A01||P|2.5\r": "MSH-10",
            "MSH|^~\\&|A|B|C|D||||C1|P|2.5\r": "MSH-9",
            "MSH|^~\\&|A|B|C|D|||ADT^A01|C1|P|\r": "MSH-12",
        }
        for text, field in cases.items():
            reply = self.receive(text.encode())
            self.assertEqual(reply.code, "AE", text)
            assert reply.error is not None and reply.ack is not None
            self.assertEqual(reply.error.code, "101")
            self.assertIn(field, reply.error.text)
            self.assertIn(b"ERR|", reply.ack)
        self.assertEqual(self.outbox.stored, [])

    def test_unsupported_version(self) -> None:
        """A version other than 2.x gets AR 203."""
        reply = self.receive(msh(version="3.0").encode())
        self.assertEqual(reply.code, "AR")
        assert reply.error is not None
        self.assertEqual(reply.error.code, "203")

    def test_enhanced_mode(self) -> None:
        """MSH-15 valued: CA on acceptance; NE sends nothing; ER answers only errors."""
        self.assertEqual(self.receive(msh("E1", msh15="AL").encode()).code, "CA")
        ne = self.receive(msh("E2", msh15="NE").encode())
        self.assertEqual((ne.code, ne.ack), ("CA", None))
        er = self.receive(msh("E3", msh15="ER").encode())
        self.assertIsNone(er.ack)
        er_bad = self.receive(msh("", msh15="ER").encode())
        self.assertEqual(er_bad.code, "CE")
        self.assertIsNotNone(er_bad.ack)
        self.assertEqual(len(self.outbox.stored), 3)

    def test_unknown_charset(self) -> None:
        """An unknown MSH-18 gets AE 103 and is not stored."""
        reply = self.receive(msh(msh18="EBCDIC-ISH").encode())
        self.assertEqual(reply.code, "AE")
        assert reply.error is not None
        self.assertEqual(reply.error.code, "103")
        self.assertEqual(self.outbox.stored, [])

    def test_invalid_bytes_for_charset(self) -> None:
        """Bytes that are not valid in the declared charset get AE 102, with no bytes quoted."""
        payload = msh(msh18="UNICODE UTF-8").encode() + b"PID|1||\xff\xfe\r"
        reply = self.receive(payload)
        self.assertEqual(reply.code, "AE")
        assert reply.error is not None and reply.ack is not None
        self.assertEqual(reply.error.code, "102")
        self.assertNotIn(b"\xff", reply.ack)

    def test_default_charset(self) -> None:
        """MLLP_DEFAULT_CHARSET decodes messages whose MSH-18 is empty; the ACK uses it too."""
        receiver = Receiver(self.outbox, self.clock, default_charset="UNICODE UTF-8")
        payload = "MSH|^~\\&|LABé|HOSP|EHR|HOSP|20260101||ADT^A01|U1|P|2.5\r".encode()
        reply = self.receive(payload, receiver)
        self.assertEqual(reply.code, "AA")
        assert reply.ack is not None
        self.assertIn("MSH|^~\\&|EHR|HOSP|LABé|HOSP|".encode(), reply.ack)

    def test_ack_in_message_charset(self) -> None:
        """An 8859/1 message gets its ACK in 8859/1 (MSH-3/5 swapped, bytes intact)."""
        payload = "MSH|^~\\&|CAFÉ|HOSP|EHR|HOSP|20260101||ADT^A01|L1|P|2.5||||||8859/1\r".encode("latin-1")
        reply = self.receive(payload)
        assert reply.ack is not None
        self.assertIn("|EHR|HOSP|CAFÉ|HOSP|".encode("latin-1"), reply.ack)
        self.assertTrue(reply.ack.endswith(b"|8859/1\rMSA|AA|L1\r"))

    def test_not_accepting_gives_ar(self) -> None:
        """While shutting down, new messages get AR so the sender resends elsewhere."""
        self.receiver.accepting = False
        reply = self.receive(msh().encode())
        self.assertEqual(reply.code, "AR")
        self.assertEqual(self.outbox.stored, [])

    def test_structure_validator(self) -> None:
        """A structure validator's error becomes AE and the message is not stored."""

        def invalid(message: Message) -> Deferred[AckError | None]:
            return succeed(AckError("100", "structure invalid: ValidationError"))

        receiver = Receiver(self.outbox, self.clock, validator=invalid)
        reply = self.receive(msh().encode(), receiver)
        self.assertEqual(reply.code, "AE")
        self.assertEqual(self.outbox.stored, [])


class RulesAndRoutingTests(SynchronousTestCase):
    """MLLP_CONFIG rules decide the ACK; connector filters decide the queues."""

    def setUp(self) -> None:
        from mllpd.rules import Rule, RuleSet

        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.outbox = MemoryOutbox()
        rules = RuleSet(
            rules=(
                Rule("patient-id-required", 'has(pid.id) && pid.id != ""', "PID-3 is required"),
                Rule("no-test-patients", 'pid.name != "TEST^PATIENT"', "", ack="AR"),
            ),
            filters=(("ehr", 'msh.msg_type in ["ADT", "ORU"]'), ("lake", None)),
        )
        self.receiver = Receiver(self.outbox, self.clock, ack_id=lambda: "ACKID", rules=rules)

    def receive(self, payload: bytes, receiver: Receiver | None = None) -> Reply:
        r = receiver or self.receiver
        return self.successResultOf(r.receive(payload, "10.1.1.1:999", client_subject="CN=lab"))

    def test_routes_follow_filters(self) -> None:
        """An ADT goes to both connectors, an ORM only to the one without a filter."""
        adt = (msh("A1") + "PID|1||123||DOE^JOHN\r").encode()
        orm = (msh("O1").replace("ADT^A01^ADT_A01", "ORM^O01") + "PID|1||123\r").encode()
        self.assertEqual(self.receive(adt).code, "AA")
        self.assertEqual(self.receive(orm).code, "AA")
        self.assertEqual([e.routes for e in self.outbox.stored], [("ehr", "lake"), ("lake",)])
        self.assertEqual(self.outbox.stored[0].client_subject, "CN=lab")

    def test_each_route_carries_the_order_key(self) -> None:
        """Stored envelopes carry one order key per route: same patient same key, another patient another."""
        first = (msh("K1") + "PID|1||123\r").encode()
        again = (msh("K2") + "PID|1||123\r").encode()
        other = (msh("K3") + "PID|1||456\r").encode()
        for payload in (first, again, other):
            self.assertEqual(self.receive(payload).code, "AA")
        keys = [e.lanes for e in self.outbox.stored]
        self.assertEqual([len(k) for k in keys], [2, 2, 2])
        self.assertEqual(keys[0], keys[1])
        self.assertNotEqual(keys[0], keys[2])

    def test_failed_rule_gives_ae_naming_rule(self) -> None:
        """A message breaking a rule gets AE whose ERR names the rule, is not stored, and is audited."""
        payload = (msh("R1") + "PID|1||||DOE^JOHN\r").encode()
        reply = self.receive(payload)
        self.assertEqual(reply.code, "AE")
        assert reply.ack is not None
        self.assertIn(b"patient-id-required", reply.ack)
        self.assertIn(b"PID-3 is required", reply.ack)
        self.assertEqual(self.outbox.stored, [])
        [audit] = self.outbox.audits
        self.assertEqual(
            (audit.control_id, audit.ack_code, audit.rule, audit.peer, audit.client_subject),
            ("R1", "AE", "patient-id-required", "10.1.1.1:999", "CN=lab"),
        )

    def test_rule_with_ack_ar(self) -> None:
        """A rule configured with ack: AR answers AR."""
        payload = (msh("T1") + "PID|1||9||TEST^PATIENT\r").encode()
        reply = self.receive(payload)
        self.assertEqual(reply.code, "AR")
        self.assertEqual(reply.rule, "no-test-patients")

    def test_evaluation_error_gives_ar(self) -> None:
        """A rule that cannot be evaluated on a message answers AR, never AA."""
        from mllpd.rules import Rule, RuleSet

        rules = RuleSet(rules=(Rule("needs-pid", 'pid.id != ""', "PID-3 is required"),))
        receiver = Receiver(self.outbox, self.clock, ack_id=lambda: "ACKID", rules=rules)
        reply = self.receive(msh("E1").encode(), receiver)  # no PID: pid.id is an error
        self.assertEqual(reply.code, "AR")
        self.assertEqual(self.outbox.stored, [])

    def test_enhanced_mode_rule_failure(self) -> None:
        """In enhanced mode a failed rule answers CE."""
        payload = (msh("C9", msh15="AL") + "PID|1||||DOE\r").encode()
        self.assertEqual(self.receive(payload).code, "CE")


class ModelCapTests(SynchronousTestCase):
    """What rules model is bounded; a message past the bound gets AE."""

    def receiver(self, *rules: tuple[str, str]) -> Receiver:
        from mllpd.rules import Rule, RuleSet

        self.outbox = MemoryOutbox()
        ruleset = RuleSet(rules=[Rule(name, expr) for name, expr in rules])
        return Receiver(self.outbox, Clock(), ack_id=lambda: "ACKID", rules=ruleset)

    def test_obx_past_cap_gets_ae(self) -> None:
        """An obx_list rule sees up to MAX_MODEL_SEGMENTS OBX; one more gives AE naming the cap, nothing stored."""
        from mllpd.rules import MAX_MODEL_SEGMENTS

        r = self.receiver(("all-final", 'obx_list.all(o, o.status == "F")'))
        obx = "OBX|1|NM|8867-4||72|/min|||||F\r"
        at_cap = (msh("C1") + obx * MAX_MODEL_SEGMENTS).encode()
        over = (msh("C2") + obx * (MAX_MODEL_SEGMENTS + 1)).encode()
        self.assertEqual(self.successResultOf(r.receive(at_cap, "p")).code, "AA")
        reply = self.successResultOf(r.receive(over, "p"))
        self.assertEqual(reply.code, "AE")
        assert reply.error is not None
        self.assertIn(f"more than {MAX_MODEL_SEGMENTS} OBX", reply.error.text)
        self.assertEqual([e.control_id for e in self.outbox.stored], ["C1"])

    def test_cap_applies_only_to_what_rules_read(self) -> None:
        """A 20,000-OBX message is accepted when no rule reads obx_list."""
        r = self.receiver(("first-final", 'obx.status == "F"'))
        payload = (msh("C1") + "OBX|1|NM|8867-4||72|/min|||||F\r" * 20_000).encode()
        self.assertEqual(self.successResultOf(r.receive(payload, "p")).code, "AA")

    def test_composite_past_cap_gets_ae(self) -> None:
        """A composite value with MAX_MODEL_COMPONENTS or more components gets AE when a rule reads it."""
        from mllpd.rules import MAX_MODEL_COMPONENTS

        r = self.receiver(("located", 'pv1.assigned_location != ""'))
        ok = (msh("C1") + "PV1|1|I|" + "W^" * 10 + "\r").encode()
        over = (msh("C2") + "PV1|1|I|" + "W^" * MAX_MODEL_COMPONENTS + "\r").encode()
        self.assertEqual(self.successResultOf(r.receive(ok, "p")).code, "AA")
        reply = self.successResultOf(r.receive(over, "p"))
        self.assertEqual(reply.code, "AE")


class BackPressureTests(SynchronousTestCase):
    """MLLP_MAX_OUTBOX: past the limit new messages get AR, never AA."""

    def setUp(self) -> None:
        from mllpd.outbox import Backlog

        self.Backlog = Backlog
        self.clock = Clock()
        self.outbox = MemoryOutbox()

    def reply(self, receiver: Receiver, control_id: str) -> Reply:
        return self.successResultOf(receiver.receive(msh(control_id).encode(), "10.1.1.1:9"))

    def test_count_limit(self) -> None:
        """At the message limit AR 207; once the backlog falls, AA again."""
        receiver = Receiver(self.outbox, self.clock, max_outbox=(3, None))
        self.outbox.pending = self.Backlog(2, 2000)
        self.assertEqual(self.reply(receiver, "B1").code, "AA")
        self.outbox.pending = self.Backlog(3, 3000)
        full = self.reply(receiver, "B2")
        self.assertEqual(full.code, "AR")
        assert full.error is not None
        self.assertEqual(full.error.code, "207")
        self.assertEqual([e.control_id for e in self.outbox.stored], ["B1"])
        self.outbox.pending = self.Backlog(0, 0)
        self.assertEqual(self.reply(receiver, "B3").code, "AA")

    def test_size_limit(self) -> None:
        """A size limit counts the bytes of undelivered messages."""
        receiver = Receiver(self.outbox, self.clock, max_outbox=(None, 10_000))
        self.outbox.pending = self.Backlog(1, 10_000)
        self.assertEqual(self.reply(receiver, "S1").code, "AR")
        self.outbox.pending = self.Backlog(1, 9_999)
        self.assertEqual(self.reply(receiver, "S2").code, "AA")


class WideCharsetTests(SynchronousTestCase):
    def test_utf16_and_utf32_get_ar(self) -> None:
        """UTF-16/32 messages get AR 103 on MSH-18 in an 8-bit ACK without framing bytes; nothing is stored."""
        outbox = MemoryOutbox()
        receiver = Receiver(outbox, Clock(), ack_id=lambda: "ACKID")
        for charset, codec in (("UNICODE UTF-16", "utf-16"), ("UNICODE UTF-32", "utf-32-le")):
            text = msh("W1", msh18=charset) + "PID|1||\u0d1c\r"
            reply = self.successResultOf(receiver.receive(text.encode(codec), "p"))
            self.assertEqual(reply.code, "AR")
            assert reply.ack is not None and reply.error is not None
            self.assertEqual(reply.error.code, "103")
            self.assertIn(b"MSA|AR|W1", reply.ack)
            self.assertNotIn(b"\x1c", reply.ack)
        self.assertEqual(outbox.stored, [])


class OverlongFieldTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.outbox = MemoryOutbox()
        self.receiver = Receiver(self.outbox, self.clock, ack_id=lambda: "ACKID")

    def receive(self, payload: bytes) -> Reply:
        return self.successResultOf(self.receiver.receive(payload, "10.1.1.1:999"))

    def test_overlong_fields_get_ar_not_echoed(self) -> None:
        """An MSH field past HL7's maximum gets AR naming it; the ACK, log fields and audit hold a bounded prefix."""
        big = "X" * 1_000_000
        cases = {
            f"MSH|^~\\&|A|B|C|D|||{big}^A01|C1|P|9.9\r": 9,
            f"MSH|^~\\&|A|B|C|D|||ADT^A01|{big}|P|2.5\r": 10,
            f"MSH|^~\\&|{big}|B|C|D|||ADT^A01|C1|P|2.5\r": 3,
            f"MSH|^~\\&|A|B|C|D|||ADT^A01|C1|P|2.5|||||||||||||||||{'Z' * 201}\r": 29,
        }
        for text, n in cases.items():
            reply = self.receive(text.encode())
            self.assertEqual(reply.code, "AR")
            assert reply.error is not None and reply.ack is not None
            self.assertIn(f"MSH-{n} is longer than", reply.error.text)
            self.assertLess(len(reply.ack), 2000)
            self.assertLessEqual(len(reply.control_id), 199)
            self.assertLessEqual(len(reply.msg_type), 40)
        self.assertEqual(self.outbox.stored, [])

    def test_repeated_charsets_within_limits_accepted(self) -> None:
        """MSH-18 with two repetitions, each within 16 characters, is not overlong."""
        text = "MSH|^~\\&|A|B|C|D|||ADT^A01|C1|P|2.5|||||||ASCII~ISO IR87\r"
        self.assertEqual(self.receive(text.encode()).code, "AA")
