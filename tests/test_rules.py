"""CEL rules and connector filters over the msh/pid/pv1/obx/obx_list field model."""

from __future__ import annotations

import cel
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mllpd.hl7 import Message, parse_message, unescape
from mllpd.rules import (
    _EXTRA_FUNCTIONS,
    _NATIVE_FUNCTIONS,
    MODEL_NAMES,
    Rule,
    RuleError,
    RuleSet,
    Violation,
    compile_expression,
    lane_key,
)

MSH = "MSH|^~\\&|LAB^1.2.3^ISO|HOSP|GW|DEST|20240305140709||ORU^R01^ORU_R01|CTRL123|P|2.5.1"
PID = (
    "PID|1||MRN123^^^HOSP^MR~999^^^SSA^SS||DOE&VAN^JOHN^Q^^^^L||19700101|F|||"
    "1 MAIN ST^^SPRINGFIELD^IL^62701^USA^H||||||||123-45-6789"
)
PV1 = "PV1|1|I|4WEST^401^A^HOSP||||1234^ATTEND^ALICE^^^DR" + "|" * 37 + "20240305120000"
OBX1 = "OBX|1|NM|8867-4^Heart rate^LN||72|/min^beats per minute^UCUM|60-100|N|||F"
OBX2 = "OBX|2|NM|8310-5^Body temperature^LN||36.9|Cel^degree Celsius^UCUM|36.1-37.2|N|||P"
OBX3 = "OBX|3|CE|8462-4^Diastolic^LN||HIGH^High^L||||||F"

# A rule that observes every map whole, so the model carries every key.
WHOLE = "size(msh) + size(pid) + size(pv1) + size(obx) >= 0 && obx_list == obx_list"


def message(*segments: str, sep: str = "\r") -> Message:
    return parse_message((sep.join(segments) + sep).encode("latin-1"))


ORU = message(MSH, PID, PV1, OBX1, OBX2, OBX3)
BARE = message(MSH)


def full_model(msg: Message) -> dict[str, object]:
    rs = RuleSet([Rule("whole", WHOLE)])
    return rs.model(msg).variables


def outcome(expr: str, msg: Message = ORU) -> Violation | None:
    rs = RuleSet([Rule("r", expr, "rule r is false")])
    return rs.check(rs.model(msg))


class FieldModelTests(SynchronousTestCase):
    """The model holds the documented fields as strings."""

    def test_msh(self) -> None:
        """msh holds type, trigger, first components of MSH-3..6, control id and version."""
        self.assertEqual(full_model(ORU)["msh"], {
            "msg_type": "ORU", "trigger": "R01",
            "sending_app": "LAB", "sending_fac": "HOSP",
            "receiving_app": "GW", "receiving_fac": "DEST",
            "control_id": "CTRL123", "version": "2.5.1",
        })

    def test_pid(self) -> None:
        """pid.id is PID-3.1 of the first repetition, name is family^given, country PID-11.6."""
        self.assertEqual(full_model(ORU)["pid"], {
            "id": "MRN123", "name": "DOE^JOHN", "dob": "19700101", "sex": "F",
            "ssn": "123-45-6789", "country": "USA",
        })

    def test_pv1(self) -> None:
        """Composite PV1 fields keep their components joined by ^, trailing empties dropped."""
        self.assertEqual(full_model(ORU)["pv1"], {
            "patient_class": "I", "assigned_location": "4WEST^401^A^HOSP",
            "attending_doctor": "1234^ATTEND^ALICE^^^DR", "admit_datetime": "20240305120000",
        })

    def test_obx_and_obx_list(self) -> None:
        """obx is the first OBX; obx_list holds every OBX in order."""
        model = full_model(ORU)
        first = {"value_type": "NM", "identifier": "8867-4", "value": "72",
                 "unit": "/min", "status": "F"}
        self.assertEqual(model["obx"], first)
        obx_list = model["obx_list"]
        assert isinstance(obx_list, list)
        self.assertEqual(obx_list[0], first)
        self.assertEqual([o["value"] for o in obx_list], ["72", "36.9", "HIGH^High^L"])
        self.assertEqual([o["status"] for o in obx_list], ["F", "P", "F"])

    def test_missing_segments_are_empty_maps(self) -> None:
        """A message with only MSH has empty pid, pv1 and obx maps and no OBX."""
        model = full_model(BARE)
        self.assertEqual(
            (model["pid"], model["pv1"], model["obx"], model["obx_list"]), ({}, {}, {}, [])
        )

    def test_present_segment_with_empty_fields(self) -> None:
        """A short PID still has every key, valued ''."""
        pid = full_model(message(MSH, "PID|1"))["pid"]
        self.assertEqual(pid, {k: "" for k in ("id", "name", "dob", "sex", "ssn", "country")})

    def test_escapes_are_resolved(self) -> None:
        """Escape sequences in values are resolved: \\F\\ is '|', \\S\\ is '^'."""
        msg = message(MSH, "PID|1||A\\F\\B||O\\S\\BRIEN^PAT")
        pid = full_model(msg)["pid"]
        assert isinstance(pid, dict)
        self.assertEqual((pid["id"], pid["name"]), ("A|B", "O^BRIEN^PAT"))

    def test_other_delimiters_are_normalised(self) -> None:
        """Messages with unusual component separators give the same ^-joined values."""
        msh = "MSH|#~\\&|LAB|HOSP|GW|DEST|20240305140709||ADT#A01|C1|P|2.5"
        msg = message(msh, "PID|1||X9#####MR||SMITH#ANN", "PV1|1|O|ER#1#2")
        model = full_model(msg)
        self.assertEqual(model["msh"]["trigger"], "A01")  # type: ignore[index]
        self.assertEqual(model["pid"]["id"], "X9")  # type: ignore[index]
        self.assertEqual(model["pid"]["name"], "SMITH^ANN")  # type: ignore[index]
        self.assertEqual(model["pv1"]["assigned_location"], "ER^1^2")  # type: ignore[index]

    def test_line_feed_separators(self) -> None:
        """Segments separated by LF or CRLF are found as with CR."""
        for sep in ("\n", "\r\n"):
            model = full_model(message(MSH, PID, OBX1, sep=sep))
            self.assertEqual(model["pid"]["id"], "MRN123")  # type: ignore[index]
            self.assertEqual(len(model["obx_list"]), 1)  # type: ignore[arg-type]

    def test_first_segment_wins(self) -> None:
        """With two PID segments, pid is the first."""
        msg = message(MSH, "PID|1||FIRST", "PID|2||SECOND")
        self.assertEqual(full_model(msg)["pid"]["id"], "FIRST")  # type: ignore[index]

    def test_large_message(self) -> None:
        """In a 100 KB message, pid and obx are the first PID and the first OBX."""
        notes = [f"OBX|{i}|TX|11492-6^Note^LN||{'x' * 190}||||||F" for i in range(4, 500)]
        msg = message(MSH, PID, PV1, OBX1, OBX2, OBX3, *notes, "PID|2||LATE")
        self.assertGreater(len(msg.raw), 100_000)
        rs = RuleSet([Rule("a", 'pid.id == "MRN123" && obx.value == "72"')])
        self.assertEqual(rs.model(msg).variables,
                         {"pid": {"id": "MRN123"}, "obx": {"value": "72"}})

    def test_only_referenced_segments_are_built(self) -> None:
        """A rule on pid.id puts only that key of PID into the model."""
        rs = RuleSet([Rule("id", 'pid.id != ""')])
        self.assertEqual(rs.model(ORU).variables, {"pid": {"id": "MRN123"}})

    def test_no_rules_no_model(self) -> None:
        """Without rules or filters, the model is empty and everything routes nowhere."""
        rs = RuleSet()
        model = rs.model(ORU)
        self.assertEqual(model.variables, {})
        self.assertIsNone(rs.check(model))
        self.assertEqual(rs.route(model), ())


class ExpressionTests(SynchronousTestCase):
    """Typical rule expressions give the results an integration engineer expects."""

    def assertPasses(self, expr: str, msg: Message = ORU) -> None:
        self.assertIsNone(outcome(expr, msg), expr)

    def assertFalse_(self, expr: str, msg: Message = ORU) -> None:
        v = outcome(expr, msg)
        self.assertIsNotNone(v, expr)
        assert v is not None
        self.assertFalse(v.error, f"{expr}: {v.message}")

    def assertError(self, expr: str, msg: Message = ORU) -> None:
        v = outcome(expr, msg)
        self.assertIsNotNone(v, expr)
        assert v is not None
        self.assertTrue(v.error, expr)

    def test_spec_expressions(self) -> None:
        """The SPEC section 6 rule and filter."""
        self.assertPasses('pid.id != ""')
        self.assertFalse_('pid.id != ""', message(MSH, "PID|1"))
        self.assertPasses('msh.msg_type in ["ADT", "ORU"]')
        self.assertFalse_('msh.msg_type in ["ADT", "ORM"]')

    def test_missing_segment_semantics(self) -> None:
        """has() is false for a missing segment; selecting its field is an error."""
        self.assertPasses("has(pid.ssn)")
        self.assertFalse_("has(pid.ssn)", BARE)
        self.assertError('pid.id != ""', BARE)
        self.assertPasses('!has(pid.id) || pid.id != ""', BARE)
        self.assertPasses("size(pid) == 0 && size(obx_list) == 0", BARE)

    def test_string_functions(self) -> None:
        """startsWith, endsWith, contains, matches and size work on fields."""
        self.assertPasses('pid.id.startsWith("MRN")')
        self.assertPasses('pid.id.endsWith("123")')
        self.assertPasses('pv1.assigned_location.contains("401")')
        self.assertPasses(r'pid.dob.matches("^\\d{8}$")')
        self.assertFalse_('pid.id.matches("^[0-9]+$")')
        self.assertPasses("size(pid.id) == 6 && pid.ssn.size() == 11")

    def test_extension_functions(self) -> None:
        """cel-go string extensions such as lowerAscii and split are available."""
        self.assertPasses('pid.name.lowerAscii() == "doe^john"')
        self.assertPasses('pid.name.split("^")[1] == "JOHN"')

    def test_obx_macros(self) -> None:
        """exists, all, exists_one, filter and map work over obx_list."""
        self.assertPasses('obx_list.exists(o, o.identifier == "8867-4")')
        self.assertFalse_('obx_list.all(o, o.status == "F")')
        self.assertPasses('obx_list.exists_one(o, o.status == "P")')
        self.assertPasses('obx_list.filter(o, o.value_type == "NM").size() == 2')
        self.assertPasses('"8310-5" in obx_list.map(o, o.identifier)')
        self.assertPasses('obx_list.all(o, o.status == "F")', BARE)

    def test_numeric_conversions(self) -> None:
        """int() and double() read OBX values; a value that is not a number is an error."""
        self.assertPasses("int(obx.value) > 60")
        self.assertPasses("double(obx_list[1].value) < 37.5")
        self.assertPasses(
            'obx_list.exists(o, o.identifier == "8310-5" && double(o.value) > 36.5)'
        )
        self.assertError("int(obx_list[1].value) > 0")
        self.assertError("int(obx_list[2].value) > 0")

    def test_type_names(self) -> None:
        """Type names such as string and int are not unknown names."""
        self.assertPasses("type(pid.id) == string && type(size(obx_list)) == int")

    def test_no_implicit_coercion(self) -> None:
        """A string never equals a number (no error), and mixing them in arithmetic is an error."""
        self.assertFalse_("obx.value == 72")
        self.assertError('obx.value + 1 == "73"')

    def test_readme_examples(self) -> None:
        """The expressions shown in the README compile and evaluate on an ORU."""
        self.assertPasses('has(pid.id) && pid.id != ""')
        self.assertFalse_('has(pid.id) && pid.id != ""', BARE)
        self.assertPasses('msh.msg_type in ["ADT", "ORU"] && msh.version.startsWith("2.")')
        self.assertPasses('pid.dob.matches("^[0-9]{8}$")')
        self.assertFalse_('obx_list.all(o, o.status in ["F", "C"])')
        self.assertFalse_('obx_list.exists(o, o.identifier == "8867-4" && int(o.value) > 150)')
        self.assertPasses('pid.name.lowerAscii().startsWith("doe^")')

    def test_logic_absorbs_errors(self) -> None:
        """CEL's && and || ignore an error on the side that does not decide."""
        self.assertFalse_("false && int(obx_list[2].value) > 0")
        self.assertPasses("int(obx_list[2].value) > 0 || true")


class RuleOutcomeTests(SynchronousTestCase):
    """check() returns the first rule that is false or fails, with the ACK to send."""

    def test_all_true(self) -> None:
        """When every rule holds, check returns None."""
        rs = RuleSet([Rule("a", 'pid.id != ""'), Rule("b", 'msh.version.startsWith("2.")')])
        self.assertIsNone(rs.check(rs.model(ORU)))

    def test_false_rule_answers_ae_with_its_message(self) -> None:
        """A false rule gives AE with the rule's name and message."""
        rs = RuleSet([Rule("patient-id-required", 'pid.id != ""', "PID-3 is required")])
        self.assertEqual(
            rs.check(rs.model(message(MSH, "PID|1"))),
            Violation("patient-id-required", "PID-3 is required", "AE", False),
        )

    def test_rule_ack_override(self) -> None:
        """A rule with ack AR answers AR when false."""
        rs = RuleSet([Rule("adt-only", 'msh.msg_type == "ADT"', "ADT only", "AR")])
        self.assertEqual(rs.check(rs.model(ORU)), Violation("adt-only", "ADT only", "AR", False))

    def test_default_message(self) -> None:
        """A rule without a message is reported by name."""
        rs = RuleSet([Rule("adt-only", 'msh.msg_type == "ADT"')])
        v = rs.check(rs.model(ORU))
        assert v is not None
        self.assertEqual(v.message, "rule adt-only failed")

    def test_first_failing_rule_in_order(self) -> None:
        """Rules run in order and the first failure is reported."""
        rs = RuleSet([
            Rule("ok", "true"),
            Rule("second", 'pid.sex == "M"', "male only"),
            Rule("third", "false", "never"),
        ])
        v = rs.check(rs.model(ORU))
        assert v is not None
        self.assertEqual((v.rule, v.message), ("second", "male only"))

    def test_evaluation_error_is_ar(self) -> None:
        """A rule that cannot be evaluated gives an error violation with AR naming the rule."""
        rs = RuleSet([Rule("numeric", "int(obx_list[2].value) > 0", "numeric", "AE")])
        v = rs.check(rs.model(ORU))
        assert v is not None
        self.assertEqual((v.rule, v.ack, v.error), ("numeric", "AR", True))
        self.assertTrue(v.message.startswith("rule numeric could not be evaluated: "), v.message)
        self.assertNotIn("\n", v.message)

    def test_missing_key_error_message(self) -> None:
        """Selecting a field of a missing segment says which key is missing."""
        rs = RuleSet([Rule("pid", 'pid.id != ""')])
        v = rs.check(rs.model(BARE))
        assert v is not None
        self.assertEqual(v.message, "rule pid could not be evaluated: no such key: 'id'")

    def test_error_never_shows_message_content(self) -> None:
        """Values from the message are not repeated in the error text, which is ASCII."""
        rs = RuleSet([Rule("dyn", 'pid[pid.id] == "x"')])
        v = rs.check(rs.model(ORU))
        assert v is not None
        self.assertEqual(v.message, "rule dyn could not be evaluated: no such key")
        secret = message(MSH, "PID|1||SECRET(ID")
        for expr in ['"x".matches(pid.id)', "bool(pid.id)", 'duration(pid.id) > duration("1s")',
                     "pid.id / 2 == 1", "int(pid.id) == 1"]:
            rs = RuleSet([Rule("r", expr)])
            v = rs.check(rs.model(secret))
            assert v is not None
            self.assertTrue(v.error, expr)
            self.assertNotIn("SECRET", v.message)
            self.assertTrue(v.message.isascii(), v.message)

    def test_non_bool_is_error(self) -> None:
        """A rule whose result is not a bool is an evaluation error."""
        rs = RuleSet([Rule("str", "pid.id")])
        v = rs.check(rs.model(ORU))
        self.assertEqual(
            v, Violation("str", "rule str could not be evaluated: result is string, not bool",
                         "AR", True),
        )

    def test_bad_rule_refused_by_ruleset(self) -> None:
        """Building a RuleSet with a bad expression or ack names the rule."""
        with self.assertRaises(ValueError) as e:
            RuleSet([Rule("broken", "pid.id ==")])
        self.assertTrue(str(e.exception).startswith("rule broken: "), str(e.exception))
        with self.assertRaises(ValueError) as e:
            RuleSet([Rule("x", "true", ack="AA")])  # type: ignore[arg-type]
        self.assertEqual(str(e.exception), "rule x: ack must be AE or AR")


class RouteTests(SynchronousTestCase):
    """route() names the connectors whose filter holds, in configuration order."""

    def test_filters(self) -> None:
        """No filter always routes; true routes; false does not."""
        rs = RuleSet((), {
            "ehr": 'msh.msg_type in ["ADT", "ORU"]',
            "lake": None,
            "adt-only": 'msh.msg_type == "ADT"',
            "labs": 'obx_list.exists(o, o.identifier == "8867-4")',
        })
        self.assertEqual(rs.route(rs.model(ORU)), ("ehr", "lake", "labs"))
        self.assertEqual(rs.connectors, ("ehr", "lake", "adt-only", "labs"))

    def test_no_match(self) -> None:
        """When no filter matches, the route is empty."""
        rs = RuleSet((), [("a", "false"), ("b", 'pid.sex == "M"')])
        self.assertEqual(rs.route(rs.model(ORU)), ())

    def test_filter_error_names_connector(self) -> None:
        """A filter that cannot be evaluated raises RuleError naming the connector."""
        rs = RuleSet((), {"lake": None, "ehr": 'pid.id.startsWith("M")'})
        with self.assertRaises(RuleError) as e:
            rs.route(rs.model(BARE))
        self.assertEqual(
            str(e.exception), "connector ehr: filter could not be evaluated: no such key: 'id'"
        )

    def test_filter_non_bool(self) -> None:
        """A filter whose result is not a bool raises RuleError."""
        rs = RuleSet((), {"ehr": "size(obx_list)"})
        with self.assertRaises(RuleError) as e:
            rs.route(rs.model(ORU))
        self.assertEqual(str(e.exception), "connector ehr: filter result is int, not bool")

    def test_bad_filter_refused(self) -> None:
        """A bad filter expression is refused when the RuleSet is built, naming the connector."""
        with self.assertRaises(ValueError) as e:
            RuleSet((), {"ehr": "msh.nope("})
        self.assertTrue(str(e.exception).startswith("connector ehr: filter: "))

    def test_rules_and_filters_share_model(self) -> None:
        """One model serves both check and route."""
        rs = RuleSet([Rule("id", 'pid.id != ""')], {"ehr": 'pv1.patient_class == "I"'})
        model = rs.model(ORU)
        self.assertIsNone(rs.check(model))
        self.assertEqual(rs.route(model), ("ehr",))


class LaneKeyTests(SynchronousTestCase):
    """lanes() gives each route the message's order key."""

    def keys(self, rs: RuleSet, msg: Message) -> tuple[int, ...]:
        model = rs.model(msg)
        return rs.lanes(model, msg, rs.route(model))

    def test_default_is_sender_and_patient(self) -> None:
        """Without order_by, the key is MSH-3 and PID-3: same patient same key, other patient or sender another."""
        rs = RuleSet((), {"ehr": None, "lake": None})
        same = self.keys(rs, message(MSH.replace("CTRL123", "X"), PID))
        self.assertEqual(self.keys(rs, ORU), same)
        self.assertEqual(same[0], same[1])
        other_patient = self.keys(rs, message(MSH, PID.replace("MRN123", "MRN999")))
        other_sender = self.keys(rs, message(MSH.replace("LAB^", "RAD^"), PID))
        self.assertEqual(len({same, other_patient, other_sender}), 3)

    def test_no_patient_is_the_senders_lane(self) -> None:
        """A message without PID, or with an empty PID-3, goes down its sender's lane."""
        rs = RuleSet((), {"ehr": None})
        sender = (lane_key("LAB^1.2.3^ISO"),)
        self.assertEqual(self.keys(rs, BARE), sender)
        self.assertEqual(self.keys(rs, message(MSH, "PID|1||")), sender)
        self.assertNotEqual(self.keys(rs, ORU), sender)

    def test_order_by(self) -> None:
        """order_by decides the key per connector; equal values share a key, 1 and "1" do not."""
        rs = RuleSet((), {"ehr": None, "lake": None}, order_by={"ehr": "pv1.patient_class"})
        ehr, lake = self.keys(rs, ORU)
        self.assertEqual(ehr, lane_key("I"))
        self.assertNotEqual(ehr, lake)
        numeric = RuleSet((), {"ehr": None}, order_by={"ehr": "1"})
        text = RuleSet((), {"ehr": None}, order_by={"ehr": '"1"'})
        self.assertNotEqual(self.keys(numeric, ORU), self.keys(text, ORU))

    def test_order_by_error_is_the_senders_lane(self) -> None:
        """An order_by that cannot be evaluated (or gives null) sends the message down its sender's lane."""
        rs = RuleSet((), {"ehr": None}, order_by={"ehr": "pid.id"})
        self.assertEqual(self.keys(rs, BARE), (lane_key("LAB^1.2.3^ISO"),))
        nothing = RuleSet((), {"ehr": None}, order_by={"ehr": "null"})
        self.assertEqual(self.keys(nothing, ORU), (lane_key("LAB^1.2.3^ISO"),))

    def test_bad_order_by_refused(self) -> None:
        """A bad order_by is refused when the RuleSet is built, naming the connector."""
        with self.assertRaises(ValueError) as e:
            RuleSet((), {"ehr": None}, order_by={"ehr": "msh.nope("})
        self.assertTrue(str(e.exception).startswith("connector ehr: order_by: "))


class CompileTests(SynchronousTestCase):
    """compile_expression refuses bad expressions with a one-line reason."""

    def assertRefused(self, expr: str, reason: str) -> None:
        with self.assertRaises(ValueError) as e:
            compile_expression(expr)
        text = str(e.exception)
        self.assertNotIn("\n", text)
        self.assertIn(reason, text)

    def test_syntax_error(self) -> None:
        """A syntax error gives the position and what was expected, on one line."""
        self.assertRefused('pid.id != ', "at 1:11: Syntax error: mismatched input '<EOF>'")

    def test_empty(self) -> None:
        """An empty expression is refused."""
        self.assertRefused("  ", "empty expression")

    def test_unknown_name(self) -> None:
        """A misspelt segment name is refused at compile time, not at every message."""
        self.assertRefused(
            'pdi.id != ""', "unknown name 'pdi'; expected msh, pid, pv1, obx, obx_list"
        )

    def test_unknown_function(self) -> None:
        """A function the engine does not have is refused at compile time."""
        self.assertRefused("pid.id.toUpper() == 'X'", "unknown function 'toUpper'")

    def test_macro_variables_allowed(self) -> None:
        """Names bound by exists/all/map/filter are not unknown names."""
        p = compile_expression("obx_list.map(x, x.value).exists(v, v == '72')")
        self.assertEqual(p.names, frozenset({"obx_list"}))

    def test_every_allowed_function_works(self) -> None:
        """Each function that compiles also evaluates: none fails only at run time."""
        t = 'timestamp("2024-03-05T14:07:09.250Z")'
        examples = {
            "size": 'size("ab") == 2', "contains": '"abc".contains("b")',
            "startsWith": '"abc".startsWith("a")', "endsWith": '"abc".endsWith("c")',
            "matches": '"abc".matches("^a")', "int": 'int("3") == 3', "uint": 'uint("3") == 3u',
            "double": 'double("1.5") == 1.5', "string": 'string(3) == "3"',
            "bytes": 'bytes("a") == b"a"', "dyn": "dyn(1) == 1", "type": "type(1) == int",
            "timestamp": f'{t} > timestamp("2000-01-01T00:00:00Z")',
            "duration": 'duration("1s") < duration("2s")', "has": 'has({"a": 1}.a)',
            "all": "[1].all(x, x == 1)", "exists": "[1].exists(x, x == 1)",
            "exists_one": "[1].exists_one(x, x == 1)", "map": "[1].map(x, x * 2) == [2]",
            "filter": "[1, 2].filter(x, x > 1) == [2]",
            "getFullYear": f"{t}.getFullYear() == 2024", "getMonth": f"{t}.getMonth() == 2",
            "getDayOfYear": f"{t}.getDayOfYear() == 64",
            "getDayOfMonth": f"{t}.getDayOfMonth() == 4", "getDate": f"{t}.getDate() == 5",
            "getDayOfWeek": f"{t}.getDayOfWeek() == 2", "getHours": f"{t}.getHours() == 14",
            "getMinutes": f"{t}.getMinutes() == 7", "getSeconds": f"{t}.getSeconds() == 9",
            "getMilliseconds": f"{t}.getMilliseconds() == 250",
            "value": "[1, 2].first().value() == 1", "orValue": "[].first().orValue(0) == 0",
            "hasValue": "[1].last().hasValue()",
            "charAt": '"abc".charAt(1) == "b"', "distinct": "[1, 1, 2].distinct() == [1, 2]",
            "first": "[1, 2].first().value() == 1", "last": "[1, 2].last().value() == 2",
            "flatten": "[[1], [2]].flatten() == [1, 2]", "indexOf": '"abc".indexOf("c") == 2',
            "join": '["a", "b"].join("-") == "a-b"', "lastIndexOf": '"abca".lastIndexOf("a") == 3',
            "lowerAscii": '"AB".lowerAscii() == "ab"', "upperAscii": '"ab".upperAscii() == "AB"',
            "max": "max([1, 3]) == 3", "min": "min([1, 3]) == 1", "sum": "sum([1, 2]) == 3",
            "replace": '"aa".replace("a", "b") == "bb"', "reverse": '"ab".reverse() == "ba"',
            "slice": "[1, 2, 3].slice(1, 2) == [2]", "sort": "[2, 1].sort() == [1, 2]",
            "split": '"a,b".split(",") == ["a", "b"]', "substring": '"abc".substring(1) == "bc"',
            "trim": '" a ".trim() == "a"', "bool": 'bool("true")',
        }
        self.assertEqual(set(examples), set(_NATIVE_FUNCTIONS) | set(_EXTRA_FUNCTIONS))
        for name, expr in examples.items():
            self.assertIsNone(outcome(expr), name)

    def test_names(self) -> None:
        """A program knows which model names it references."""
        p = compile_expression('msh.msg_type == "ADT" && has(pv1.patient_class)')
        self.assertEqual(p.names, frozenset({"msh", "pv1"}))
        self.assertTrue(set(p.names) <= set(MODEL_NAMES))


# Expressions whose results must not change when the model holds only the
# keys they can observe. Each observes maps in a different way.
NARROWING_EXPRESSIONS = [
    'pid.id != ""',
    "has(pid.ssn)",
    "has(pid.id) && pid.id == pid.name",
    "size(pid) == 6",
    'pid["dob"] == "19700101"',
    'pid == {"id": pid.id}',
    "obx_list.exists(o, has(o.unit))",
    "obx_list.map(o, o).exists(m, size(m) == 5)",
    "obx_list.filter(o, true) == obx_list",
    "size(obx_list[0]) == 5",
    "obx_list[0].value == obx.value",
    "obx_list.exists(pid, pid.value == '72')",
    "obx_list.all(obx, has(obx.status))",
    "[pid, pv1].exists(m, size(m) > 0)",
    "'id' in pid",
    "msh.exists(k, k == 'version')",
    "obx == obx_list[0]",
    "size(obx_list) == 3 && obx_list.size() == 3",
    'pv1.assigned_location.startsWith("4") || size(pv1) == 0',
]

TOKENS = [*"AZaz09 .-^~&", "\\F\\", "\\S\\", "\\T\\", "\\R\\", "\\E\\", "\\X41\\", "\\"]
field_text = st.lists(st.sampled_from(TOKENS), max_size=8).map("".join)


@st.composite
def messages(draw: st.DrawFn) -> Message:
    segs = [MSH]
    for _ in range(draw(st.integers(0, 5))):
        sid = draw(st.sampled_from(["PID", "PV1", "OBX", "NK1", "PIDX", "PV12", "OBXA"]))
        fields = draw(st.lists(field_text, max_size=46))
        segs.append("|".join([sid, *fields]))
    return message(*segs, sep=draw(st.sampled_from(["\r", "\n", "\r\n"])))


def reference_model(msg: Message) -> dict[str, object]:
    """The documented model, built field by field with Message.get."""
    h = msg.header

    def composite(seg: list[str] | None, n: int) -> str:
        raw = seg[n] if seg is not None and n < len(seg) else ""
        comps = [
            "&".join(unescape(sub, h) for sub in comp.split(h.subcomponent_sep))
            for comp in raw.split(h.repetition_sep)[0].split(h.component_sep)
        ]
        while comps and comps[-1] == "":
            comps.pop()
        return "^".join(comps)

    def get(name: str, n: int, c: int = 1, s: int = 0) -> str:
        return msg.get(name, n, c, s)

    pid: dict[str, str] = {}
    if msg.segment("PID") is not None:
        family, given = get("PID", 5, 1, 1), get("PID", 5, 2)
        pid = {
            "id": get("PID", 3), "name": f"{family}^{given}" if given else family,
            "dob": get("PID", 7), "sex": get("PID", 8), "ssn": get("PID", 19),
            "country": get("PID", 11, 6),
        }
    pv1: dict[str, str] = {}
    if (pv1_seg := msg.segment("PV1")) is not None:
        pv1 = {
            "patient_class": get("PV1", 2), "assigned_location": composite(pv1_seg, 3),
            "attending_doctor": composite(pv1_seg, 7), "admit_datetime": get("PV1", 44),
        }
    obx_list = []
    for seg in msg.segments:
        if seg[0] == "OBX":
            def one(n: int, c: int = 1, seg: list[str] = seg) -> str:
                return msg.pick(seg[n] if n < len(seg) else "", c)
            obx_list.append({
                "value_type": one(2), "identifier": one(3), "value": composite(seg, 5),
                "unit": one(6), "status": one(11),
            })
    return {
        "msh": {
            "msg_type": get("MSH", 9), "trigger": get("MSH", 9, 2),
            "sending_app": get("MSH", 3), "sending_fac": get("MSH", 4),
            "receiving_app": get("MSH", 5), "receiving_fac": get("MSH", 6),
            "control_id": msg.get("MSH", 10), "version": get("MSH", 12),
        },
        "pid": pid, "pv1": pv1, "obx": obx_list[0] if obx_list else {}, "obx_list": obx_list,
    }


def reference_outcome(msg: Message, expr: str) -> str:
    try:
        result = cel.compile(expr).execute(cel.Context(variables=reference_model(msg)))
    except Exception:  # noqa: BLE001 - any failure is an evaluation error
        return "error"
    return {True: "true", False: "false"}.get(result, "error") if isinstance(result, bool) else "error"


def kind(v: Violation | None) -> str:
    return "true" if v is None else "error" if v.error else "false"


class PropertyTests(SynchronousTestCase):
    """Laws that hold for every message."""

    @settings(deadline=None, max_examples=300)
    @given(messages(), st.sampled_from(NARROWING_EXPRESSIONS))
    def test_narrowed_model_gives_same_result(self, msg: Message, expr: str) -> None:
        """A rule gives the result it gives on the full, documented model."""
        rs = RuleSet([Rule("r", expr)])
        self.assertEqual(kind(rs.check(rs.model(msg))), reference_outcome(msg, expr))

    @settings(deadline=None, max_examples=150)
    @given(messages())
    def test_whole_model_matches_reference(self, msg: Message) -> None:
        """The model a whole-map rule sees is the documented model, field by field."""
        self.assertEqual(full_model(msg), reference_model(msg))

    @settings(deadline=None, max_examples=150)
    @given(messages())
    def test_first_segments_model_matches_reference(self, msg: Message) -> None:
        """Without obx_list, PID, PV1 and the first OBX are found (by search) as documented."""
        rs = RuleSet([Rule("whole", "size(pid) + size(pv1) + size(obx) >= 0")])
        expected = reference_model(msg)
        self.assertEqual(
            rs.model(msg).variables,
            {"pid": expected["pid"], "pv1": expected["pv1"], "obx": expected["obx"]},
        )

    @settings(deadline=None, max_examples=200)
    @given(st.binary(max_size=300))
    def test_model_never_raises(self, tail: bytes) -> None:
        """Any parsed message yields a model, and rules and filters never raise but RuleError."""
        try:
            msg = parse_message(MSH.encode() + tail)
        except ValueError:
            return
        rs = RuleSet(
            [Rule("whole", WHOLE), Rule("id", 'pid.id != ""')],
            {"all": None, "num": "obx_list.all(o, int(o.value) > 0)"},
        )
        model = rs.model(msg)
        v = rs.check(model)
        self.assertTrue(v is None or isinstance(v, Violation))
        try:
            routes = rs.route(model)
        except RuleError:
            return
        self.assertIn("all", routes)
