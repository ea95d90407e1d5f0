"""MLLP_CONFIG: loading, one-line errors naming the place, and the retry policy."""

from __future__ import annotations

import os
import shutil
import tempfile
import textwrap

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mllpd.config import ConfigError
from mllpd.connectors import ConnectorSpec
from mllpd.hl7 import parse_message
from mllpd.pipeline import RetryPolicy, load_pipeline_config, parse_pipeline_config
from mllpd.rules import Violation

SPEC_EXAMPLE = """\
rules:
  - name: patient-id-required
    expr: pid.id != ""
    message: PID-3 is required
connectors:
  - name: ehr
    type: mllp
    address: tls:ehr.hospital.internal:2575
    filter: msh.msg_type in ["ADT", "ORU"]
  - name: lake
    type: http
    url: https://ingest.example/hl7
  - name: archive
    type: postgres
    dsn_env: ARCHIVE_DSN
    table: hl7_messages
retry: {initial: 1s, max: 5m, multiplier: 2, jitter: 0.2, max_attempts: 20}
"""


class FileTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.folder = tempfile.mkdtemp(prefix="mllpd-pipeline-")
        self.addCleanup(shutil.rmtree, self.folder, True)

    def write(self, text: str, name: str = "mllp.yaml") -> str:
        path = os.path.join(self.folder, name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(textwrap.dedent(text))
        return path


class LoadTests(FileTestCase):
    """A valid file gives compiled rules, connector specs and a retry policy."""

    def test_spec_example(self) -> None:
        """The SPEC section 6 example loads as written."""
        config = load_pipeline_config(self.write(SPEC_EXAMPLE), {})
        self.assertEqual(config.connectors, (
            ConnectorSpec("ehr", "mllp", 'msh.msg_type in ["ADT", "ORU"]',
                          {"address": "tls:ehr.hospital.internal:2575"}),
            ConnectorSpec("lake", "http", None, {"url": "https://ingest.example/hl7"}),
            ConnectorSpec("archive", "postgres", None,
                          {"dsn_env": "ARCHIVE_DSN", "table": "hl7_messages"}),
        ))
        self.assertEqual(config.retry, RetryPolicy(1.0, 300.0, 2.0, 0.2, 20))
        self.assertEqual([r.name for r in config.rules.rules], ["patient-id-required"])

    def test_loaded_rules_work(self) -> None:
        """The loaded rule set refuses a message without PID-3 and routes by filter."""
        rules = load_pipeline_config(self.write(SPEC_EXAMPLE), {}).rules
        good = parse_message(b"MSH|^~\\&|A|B|C|D|20240101||ORU^R01|1|P|2.5\rPID|1||X1\r")
        bad = parse_message(b"MSH|^~\\&|A|B|C|D|20240101||ORM^O01|2|P|2.5\rPID|1\r")
        model = rules.model(good)
        self.assertIsNone(rules.check(model))
        self.assertEqual(rules.route(model), ("ehr", "lake", "archive"))
        model = rules.model(bad)
        self.assertEqual(
            rules.check(model),
            Violation("patient-id-required", "PID-3 is required", "AE", False),
        )
        self.assertEqual(rules.route(model), ("lake", "archive"))

    def test_empty_file(self) -> None:
        """An empty file means no rules, no connectors and the default retry policy."""
        config = load_pipeline_config(self.write(""), {})
        self.assertEqual((config.rules.rules, config.connectors), ((), ()))
        self.assertEqual(config.retry, RetryPolicy())

    def test_rule_ack_and_defaults(self) -> None:
        """A rule's ack is AE unless it says AR; message is optional."""
        config = load_pipeline_config(self.write("""\
            rules:
              - {name: a, expr: "true"}
              - {name: b, expr: "true", ack: AR, message: "  two\\n lines "}
        """), {})
        a, b = config.rules.rules
        self.assertEqual((a.ack, a.message, b.ack, b.message), ("AE", "", "AR", "two lines"))

    def test_partial_retry(self) -> None:
        """Retry keys left out keep their defaults."""
        config = load_pipeline_config(self.write("retry: {initial: 250ms, max_attempts: 3}"), {})
        self.assertEqual(config.retry, RetryPolicy(initial=0.25, max_attempts=3))


class ErrorTests(FileTestCase):
    """Every mistake stops startup with one line naming the place."""

    def assertFails(self, text: str, expected: str) -> None:
        with self.assertRaises(ConfigError) as e:
            load_pipeline_config(self.write(text), {})
        message = str(e.exception)
        self.assertEqual(message, expected)
        self.assertNotIn("\n", message)
        self.assertEqual(e.exception.variable, "MLLP_CONFIG")

    def test_missing_file(self) -> None:
        """A missing file is named."""
        path = os.path.join(self.folder, "nope.yaml")
        with self.assertRaises(ConfigError) as e:
            load_pipeline_config(path, {})
        self.assertEqual(
            str(e.exception), f"MLLP_CONFIG: cannot read {path}: No such file or directory"
        )

    def test_bad_yaml(self) -> None:
        """Broken YAML gives the line and column."""
        path = self.write("rules:\n  - name: a\n    expr: [unclosed\n")
        with self.assertRaises(ConfigError) as e:
            load_pipeline_config(path, {})
        self.assertTrue(
            str(e.exception).startswith(f"MLLP_CONFIG: {path}: not valid YAML at line 4, column 1: "),
            str(e.exception),
        )
        self.assertNotIn("\n", str(e.exception))

    def test_not_utf8(self) -> None:
        """A file that is not UTF-8 is refused with the byte offset."""
        path = os.path.join(self.folder, "latin1.yaml")
        with open(path, "wb") as f:
            f.write(b"rules: []\n# caf\xe9\n")
        with self.assertRaises(ConfigError) as e:
            load_pipeline_config(path, {})
        self.assertEqual(str(e.exception), f"MLLP_CONFIG: {path}: not UTF-8 at byte 15")

    def test_duplicate_yaml_key(self) -> None:
        """A key given twice in one mapping is refused, not silently overridden."""
        path = self.write("connectors:\n  - name: a\n    type: http\n    type: mllp\n")
        with self.assertRaises(ConfigError) as e:
            load_pipeline_config(path, {})
        self.assertEqual(
            str(e.exception),
            f"MLLP_CONFIG: {path}: not valid YAML at line 4, column 5: duplicate key 'type'",
        )

    def test_top_level(self) -> None:
        """The document must be a mapping of rules, connectors and retry."""
        self.assertFails("- a\n", "MLLP_CONFIG: expected a mapping with rules, connectors or "
                         "retry, found a list")
        self.assertFails("rule: []\n", "MLLP_CONFIG: unknown key 'rule'; expected rules, "
                         "connectors or retry")

    def test_rule_shape(self) -> None:
        """rules must be a list of mappings with a valid name and an expr."""
        self.assertFails("rules: {a: 1}\n", "MLLP_CONFIG: rules: expected a list, found a mapping")
        self.assertFails("rules: [x]\n", "MLLP_CONFIG: rules[0]: expected a mapping with name "
                         "and expr, found a string")
        self.assertFails("rules: [{expr: 'true'}]\n", "MLLP_CONFIG: rules[0]: name is required")
        self.assertFails(
            "rules: [{name: 'bad name', expr: 'true'}]\n",
            "MLLP_CONFIG: rules[0].name: 'bad name' is not a valid name; expected up to 64 "
            "letters, digits, '_', '.', ':' or '-', starting with a letter or digit",
        )
        self.assertFails("rules: [{name: a}]\n", "MLLP_CONFIG: rules[0] (a): expr is required")
        self.assertFails("rules: [{name: a, expr: 'true', exp: 1}]\n",
                         "MLLP_CONFIG: rules[0] (a): unknown key 'exp'; expected name, expr, "
                         "message or ack")

    def test_rule_values(self) -> None:
        """expr, message and ack are checked and the rule is named."""
        self.assertFails(
            'rules:\n  - name: patient-id-required\n    expr: pid.id != \n',
            "MLLP_CONFIG: rules[0] (patient-id-required).expr: at 1:10: Syntax error: "
            "mismatched input '<EOF>' expecting {'[', '{', '(', '.', '-', '!', 'true', "
            "'false', 'null', NUM_FLOAT, NUM_INT, NUM_UINT, STRING, BYTES, IDENTIFIER}",
        )
        self.assertFails(
            "rules: [{name: a, expr: 'true'}, {name: b, expr: 'pdi.id == 1'}]\n",
            "MLLP_CONFIG: rules[1] (b).expr: unknown name 'pdi'; expected msh, pid, pv1, "
            "obx, obx_list",
        )
        self.assertFails("rules: [{name: a, expr: true}]\n",
                         "MLLP_CONFIG: rules[0] (a).expr: expected a CEL expression as text, "
                         "found a boolean")
        self.assertFails("rules: [{name: a, expr: 'true', ack: AA}]\n",
                         "MLLP_CONFIG: rules[0] (a).ack: 'AA' is not allowed; expected AE or AR")
        self.assertFails("rules: [{name: a, expr: 'true', message: [x]}]\n",
                         "MLLP_CONFIG: rules[0] (a).message: expected text, found a list")

    def test_duplicate_rule(self) -> None:
        """Two rules with one name are refused."""
        self.assertFails(
            "rules: [{name: a, expr: 'true'}, {name: b, expr: 'true'}, {name: a, expr: 'false'}]\n",
            "MLLP_CONFIG: rules[2] (a): duplicate name; rules[0] has it too",
        )

    def test_connector_type(self) -> None:
        """An unknown or missing type names the connector and the choices."""
        self.assertFails(
            "connectors:\n  - {name: ehr, type: mllp}\n  - {name: lake, type: ftp}\n",
            "MLLP_CONFIG: connectors[1] (lake): unknown type 'ftp'; expected mllp, http or "
            "postgres",
        )
        self.assertFails(
            "connectors: [{name: lake}]\n",
            "MLLP_CONFIG: connectors[0] (lake): type is required; expected mllp, http or postgres",
        )

    def test_connector_shape(self) -> None:
        """connectors must be a list of named mappings with distinct names."""
        self.assertFails("connectors: [{type: http}]\n",
                         "MLLP_CONFIG: connectors[0]: name is required")
        self.assertFails("connectors: 3\n", "MLLP_CONFIG: connectors: expected a list, found a number")
        self.assertFails(
            "connectors: [{name: a, type: http}, {name: a, type: mllp}]\n",
            "MLLP_CONFIG: connectors[1] (a): duplicate name; connectors[0] has it too",
        )
        self.assertFails(
            "connectors: [{name: a, type: http, 1: x}]\n",
            "MLLP_CONFIG: connectors[0] (a): option names must be text, found a number",
        )

    def test_connector_filter(self) -> None:
        """A bad filter names the connector."""
        self.assertFails(
            "connectors: [{name: ehr, type: mllp, filter: 'msh.msg_type.toUpper() == \"A\"'}]\n",
            "MLLP_CONFIG: connectors[0] (ehr).filter: unknown function 'toUpper'",
        )
        self.assertFails(
            "connectors: [{name: ehr, type: mllp, filter: 3}]\n",
            "MLLP_CONFIG: connectors[0] (ehr).filter: expected a CEL expression as text, "
            "found a number",
        )

    def test_connector_lanes(self) -> None:
        """lanes and order_by are read for every type and checked with a line naming them."""
        doc = parse_pipeline_config({"connectors": [
            {"name": "ehr", "type": "mllp", "address": "x:1", "lanes": 8,
             "order_by": "pid.id"},
            {"name": "lake", "type": "http", "url": "http://x/"},
        ]})
        self.assertEqual(doc.connectors[0].lanes, 8)
        self.assertEqual(doc.connectors[0].order_by, "pid.id")
        self.assertEqual(doc.connectors[0].options, {"address": "x:1"})
        self.assertEqual((doc.connectors[1].lanes, doc.connectors[1].order_by), (1, None))
        for value, shown in (("0", "0"), ("257", "257"), ("'8'", "8"), ("true", "True")):
            self.assertFails(
                f"connectors: [{{name: ehr, type: mllp, lanes: {value}}}]\n",
                f"MLLP_CONFIG: connectors[0] (ehr).lanes: {shown!r} is out of range; "
                "expected a whole number from 1 to 256",
            )
        self.assertFails(
            "connectors: [{name: ehr, type: mllp, order_by: 'pid.nope()'}]\n",
            "MLLP_CONFIG: connectors[0] (ehr).order_by: unknown function 'nope'",
        )
        self.assertFails(
            "connectors: [{name: ehr, type: mllp, order_by: [1]}]\n",
            "MLLP_CONFIG: connectors[0] (ehr).order_by: expected a CEL expression as text, "
            "found a list",
        )

    def test_retry(self) -> None:
        """Retry values are checked for type and range."""
        cases = [
            ("retry: [1]", "MLLP_CONFIG: retry: expected a mapping with initial, max, "
             "multiplier, jitter or max_attempts, found a list"),
            ("retry: {intial: 1s}", "MLLP_CONFIG: retry: unknown key 'intial'; expected "
             "initial, max, multiplier, jitter or max_attempts"),
            ("retry: {initial: soon}", "MLLP_CONFIG: retry.initial: invalid duration 'soon'; "
             "expected e.g. 1s, 500ms, 5m or 1h30m"),
            ("retry: {max: 300}", "MLLP_CONFIG: retry.max: 300 has no unit; expected a "
             "duration like 1s, 500ms or 5m"),
            ("retry: {initial: 0}", "MLLP_CONFIG: retry.initial: must be more than 0"),
            ("retry: {initial: 10m, max: 5m}",
             "MLLP_CONFIG: retry.max: must be at least retry.initial (600s)"),
            ("retry: {multiplier: 0.5}",
             "MLLP_CONFIG: retry.multiplier: 0.5 is out of range; expected 1 or more"),
            ("retry: {multiplier: fast}",
             "MLLP_CONFIG: retry.multiplier: expected a number, found a string"),
            ("retry: {jitter: 1}",
             "MLLP_CONFIG: retry.jitter: 1 is out of range; expected 0 <= jitter < 1"),
            ("retry: {jitter: -0.1}",
             "MLLP_CONFIG: retry.jitter: -0.1 is out of range; expected 0 <= jitter < 1"),
            ("retry: {max_attempts: 0}",
             "MLLP_CONFIG: retry.max_attempts: 0 is out of range; expected 1 or more"),
            ("retry: {max_attempts: 2.5}",
             "MLLP_CONFIG: retry.max_attempts: expected a whole number, found a number"),
            ("retry: {max_attempts: true}",
             "MLLP_CONFIG: retry.max_attempts: expected a whole number, found a boolean"),
        ]
        for text, expected in cases:
            self.assertFails(text + "\n", expected)

    def test_parse_document(self) -> None:
        """parse_pipeline_config checks an already loaded document the same way."""
        with self.assertRaises(ConfigError) as e:
            parse_pipeline_config({"connectors": [{"name": "x", "type": "smtp"}]})
        self.assertEqual(str(e.exception), "MLLP_CONFIG: connectors[0] (x): unknown type "
                         "'smtp'; expected mllp, http or postgres")


class RetryPolicyTests(SynchronousTestCase):
    """Exponential backoff with ±jitter, capped at max."""

    def test_exponential_without_jitter(self) -> None:
        """With rand() = 0.5 the delays double from initial up to max."""
        policy = RetryPolicy(initial=1.0, max=300.0, multiplier=2.0, jitter=0.2)
        delays = [policy.delay(n, lambda: 0.5) for n in range(1, 12)]
        self.assertEqual(delays, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300])

    def test_jitter_bounds(self) -> None:
        """rand() = 0 takes jitter off, rand() near 1 adds it, never past max."""
        policy = RetryPolicy(initial=10.0, max=100.0, multiplier=3.0, jitter=0.2)
        self.assertAlmostEqual(policy.delay(1, lambda: 0.0), 8.0)
        self.assertAlmostEqual(policy.delay(2, lambda: 0.75), 33.0)
        self.assertAlmostEqual(policy.delay(3, lambda: 0.0), 72.0)
        self.assertAlmostEqual(policy.delay(4, lambda: 0.0), 80.0)
        self.assertEqual(policy.delay(4, lambda: 0.999), 100.0)

    def test_huge_attempt(self) -> None:
        """A very late attempt waits max, without overflowing."""
        policy = RetryPolicy(initial=1.0, max=60.0, multiplier=10.0, jitter=0.0)
        self.assertEqual(policy.delay(10_000, lambda: 0.5), 60.0)

    def test_constant(self) -> None:
        """multiplier 1 keeps the delay at initial."""
        policy = RetryPolicy(initial=5.0, max=60.0, multiplier=1.0, jitter=0.0)
        self.assertEqual([policy.delay(n, lambda: 0.3) for n in (1, 2, 50)], [5.0, 5.0, 5.0])

    def test_attempt_zero(self) -> None:
        """Attempt numbers start at 1."""
        with self.assertRaises(ValueError):
            RetryPolicy().delay(0, lambda: 0.5)

    def test_invalid_policy(self) -> None:
        """A policy out of range cannot be built."""
        for kwargs in ({"initial": 0.0}, {"initial": 10.0, "max": 5.0}, {"multiplier": 0.9},
                       {"jitter": 1.0}, {"max_attempts": 0}):
            with self.assertRaises(ValueError):
                RetryPolicy(**kwargs)  # type: ignore[arg-type]

    @settings(max_examples=200)
    @given(
        st.floats(0.001, 100), st.floats(1, 10), st.floats(0, 0.99),
        st.integers(1, 200), st.floats(0, 1, exclude_max=True),
    )
    def test_delay_in_bounds(self, initial: float, multiplier: float, jitter: float,
                             attempt: int, r: float) -> None:
        """Every delay lies within ±jitter of the capped exponential and never exceeds max."""
        policy = RetryPolicy(initial=initial, max=initial * 50, multiplier=multiplier,
                             jitter=jitter)
        base = min(policy.max, initial * multiplier ** (attempt - 1))
        d = policy.delay(attempt, lambda: r)
        self.assertLessEqual(d, policy.max)
        self.assertGreaterEqual(d, base * (1 - jitter) - 1e-9)
        self.assertLessEqual(d, base * (1 + jitter) + 1e-9)
