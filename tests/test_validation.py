"""MLLP_VALIDATE=structure: hl7apy's strict structure check, off the receive path."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from mllpd.validation import check_structure

ADT = "\r".join(
    [
        "MSH|^~\\&|LAB|HOSP|EHR|HOSP|20260101120000||ADT^A01^ADT_A01|V1|P|2.5",
        "EVN|A01|20260101120000",
        "PID|1||MRN4711^^^HOSP^MR||ZZSECRETNAME^QUINCY||19800101|M",
        "PV1|1|I|4WEST^401^A",
    ]
) + "\r"


class StructureTests(SynchronousTestCase):
    def test_valid_message_passes(self) -> None:
        """A well-formed ADT^A01 passes strict validation."""
        self.assertIsNone(check_structure(ADT))

    def test_missing_required_segment(self) -> None:
        """An ADT^A01 without its required PV1 fails with ERR code 100."""
        without_pv1 = "\r".join(s for s in ADT.split("\r") if not s.startswith("PV1"))
        error = check_structure(without_pv1)
        assert error is not None
        self.assertEqual(error.code, "100")

    def test_error_never_quotes_content(self) -> None:
        """The error text names the kind of failure, never a field value."""
        broken = ADT.replace("PID|1||", "PID|1|||").replace("19800101", "notadate")
        error = check_structure(broken)
        assert error is not None
        self.assertNotIn("ZZSECRETNAME", error.text)
        self.assertNotIn("MRN4711", error.text)
        self.assertNotIn("notadate", error.text)

    def test_newline_separators(self) -> None:
        """Messages separated by LF or CRLF are validated like CR ones."""
        self.assertIsNone(check_structure(ADT.replace("\r", "\r\n")))
