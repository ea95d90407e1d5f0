"""The field model: only the names and keys asked for, unescaped values, bounded."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from mllpd.hl7 import Message, parse_message
from mllpd.hl7model import (
    FIELDS,
    MAX_MODEL_COMPONENTS,
    MAX_MODEL_SEGMENTS,
    FieldModel,
    ModelTooLarge,
)

MSH = "MSH|^~\\&|LAB|HOSP|GW|DEST|20240305140709||ORU^R01|CTRL\\F\\1|P|2.5.1"
PID = "PID|1||MRN\\S\\1^^^HOSP~999^^^SSA||DOE&VAN^JOHN||19700101|F"
OBX = "OBX|{n}|NM|8867-4^Heart rate^LN||{n}|/min"


def message(*segments: str) -> Message:
    return parse_message(("\r".join([MSH, *segments]) + "\r").encode())


ALL = {seg: None for seg in FIELDS}


class FieldModelTests(SynchronousTestCase):
    """What FieldModel.read gives for one message."""

    def test_only_what_is_asked(self) -> None:
        """Only the requested names and keys are built, values unescaped from the first repetition."""
        model = FieldModel({"pid", "msh"}, {"PID": frozenset({"id", "name"}), "MSH": frozenset({"control_id"})})
        self.assertEqual(model.read(message(PID)), {
            "msh": {"control_id": "CTRL|1"},
            "pid": {"id": "MRN^1", "name": "DOE^JOHN"},
        })

    def test_absent_and_empty(self) -> None:
        """A missing segment is an empty map; a present one has every key, '' when empty."""
        model = FieldModel({"pid", "pv1", "obx", "obx_list"}, ALL)
        got = model.read(message("PV1|1"))
        self.assertEqual(got["pid"], {})
        self.assertEqual(got["pv1"], dict.fromkeys(FIELDS["PV1"], ""))
        self.assertEqual((got["obx"], got["obx_list"]), ({}, []))

    def test_obx_list_in_order(self) -> None:
        """obx_list holds every OBX in order, and obx is the first of them."""
        model = FieldModel({"obx", "obx_list"}, {"OBX": frozenset({"value"})})
        got = model.read(message(PID, OBX.format(n=1), OBX.format(n=2)))
        self.assertEqual(got["obx_list"], [{"value": "1"}, {"value": "2"}])
        self.assertEqual(got["obx"], {"value": "1"})

    def test_obx_cap(self) -> None:
        """obx_list reads up to MAX_MODEL_SEGMENTS OBX; one more raises, while obx alone still reads."""
        obx = [OBX.format(n=1)] * MAX_MODEL_SEGMENTS
        listed = FieldModel({"obx_list"}, {"OBX": frozenset({"value"})})
        self.assertEqual(len(listed.read(message(*obx))["obx_list"]), MAX_MODEL_SEGMENTS)
        with self.assertRaises(ModelTooLarge):
            listed.read(message(*obx, OBX.format(n=2)))
        first = FieldModel({"obx"}, {"OBX": frozenset({"value"})})
        self.assertEqual(first.read(message(*obx, OBX.format(n=2)))["obx"], {"value": "1"})

    def test_component_cap(self) -> None:
        """A composite value with MAX_MODEL_COMPONENTS components raises; one fewer is read."""
        model = FieldModel({"pv1"}, {"PV1": frozenset({"assigned_location"})})
        under = "W^" * (MAX_MODEL_COMPONENTS - 1)
        self.assertEqual(
            model.read(message("PV1|1|I|" + under + "X"))["pv1"]["assigned_location"], under + "X"
        )
        with self.assertRaises(ModelTooLarge):
            model.read(message("PV1|1|I|" + "W^" * MAX_MODEL_COMPONENTS))
