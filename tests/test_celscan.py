"""Which map keys a CEL expression can observe, read from its source."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from mllpd.celscan import key_needs, macro_bindings

MAPS = ("msh", "pid", "pv1", "obx")
LISTS = ("obx_list",)


def needs(expr: str) -> dict[str, frozenset[str] | None]:
    return key_needs(expr, MAPS, LISTS)


class KeyNeedsTests(SynchronousTestCase):
    """Selections name keys; every other use of a map needs all of it."""

    def test_selections(self) -> None:
        """Field selections and has() need just those keys."""
        self.assertEqual(
            needs('pid.id != "" && has(pid.ssn) && msh . msg_type == "ADT"'),
            {"pid": {"id", "ssn"}, "msh": {"msg_type"}},
        )

    def test_whole_map(self) -> None:
        """Indexing, size(), comparison, passing on or calling on a map needs all of it."""
        for expr in ('pid["id"] == ""', "size(pid) > 0", "pid == {}", "[pid].size() == 1",
                     "pid.id.startsWith('x') && pv1.exists(k, k == 'x')"):
            got = needs(expr)
            self.assertIn(None, got.values(), expr)
        self.assertEqual(needs('pid.id.startsWith("x")'), {"pid": {"id"}})

    def test_list_elements(self) -> None:
        """Keys read on list elements, by index or through a macro's name, are the list's."""
        self.assertEqual(needs('obx_list.exists(o, o.value == "72")'), {"obx_list": {"value"}})
        self.assertEqual(needs("obx_list[0].unit == 'x'"), {"obx_list": {"unit"}})
        self.assertEqual(needs("size(obx_list) > 1 && obx_list.size() < 9"), {})
        self.assertEqual(needs("obx_list.filter(o, true) == []"), {"obx_list": None})
        self.assertEqual(needs("obx_list.all(o, size(o) > 0)"), {"obx_list": None})

    def test_string_literals_only_add(self) -> None:
        """Text in a string literal can add keys, never drop the ones the expression reads."""
        self.assertEqual(needs('pid.id == "obx.value"'), {"pid": {"id"}, "obx": {"value"}})

    def test_macro_bindings(self) -> None:
        """The names comprehension macros bind are found, and nothing else."""
        self.assertEqual(
            macro_bindings("obx_list.exists(o, o.value == 'x') && [1].map( n , n + 1) == [2]"),
            {"o", "n"},
        )
        self.assertEqual(macro_bindings("pid.id == 'x'"), frozenset())
