"""Rules and connector filters: CEL expressions over a small HL7 field model.

Expressions are compiled once, at startup, with ``common-expression-language``
(Python bindings of the Rust ``cel`` crate; see README "Rules and connectors"
for why it was chosen over cel-python). Per message, :meth:`RuleSet.model`
builds one CEL context holding only the segments that some compiled
expression references, and every rule and filter runs against that context,
so the Python-to-CEL conversion is paid once per message.

The model: ``msh``, ``pid``, ``pv1``, ``obx`` (first OBX) are maps of
strings, ``obx_list`` is a list of OBX maps. A segment that is not in the
message is an empty map (``has(pid.id)`` is false, ``pid.id`` is an
evaluation error); a present segment has every key, ``""`` when the field is
empty.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import cel
from cel.stdlib import STDLIB_FUNCTIONS

from mllpd.hl7 import Header, Message, unescape

__all__ = [
    "MODEL_NAMES",
    "Program",
    "Rule",
    "RuleError",
    "RuleSet",
    "Violation",
    "compile_expression",
]

MODEL_NAMES: tuple[str, ...] = ("msh", "pid", "pv1", "obx", "obx_list")

# The Rust engine's own functions and macros (CEL's standard definitions).
# The library parses unknown function names without complaint and fails
# only at evaluation, which would answer AR to every message: refuse them
# at startup instead.
_NATIVE_FUNCTIONS = frozenset({
    "size", "contains", "startsWith", "endsWith", "matches",
    "int", "uint", "double", "string", "bytes", "bool", "dyn", "type",
    "timestamp", "duration",
    "has", "all", "exists", "exists_one", "map", "filter",
    "getFullYear", "getMonth", "getDayOfYear", "getDayOfMonth", "getDate",
    "getDayOfWeek", "getHours", "getMinutes", "getSeconds", "getMilliseconds",
})
# cel-go's string and list extensions, shipped by the library as Python
# functions. Only the unqualified ones: ``math.abs`` parses as a member call
# on a variable named ``math``. A native name is never shadowed.
_EXTRA_FUNCTIONS: dict[str, Callable[..., Any]] = {
    name: fn
    for name, fn in STDLIB_FUNCTIONS.items()
    if "." not in name and name not in _NATIVE_FUNCTIONS
}
_MACROS = "all|exists|exists_one|map|filter"


class RuleError(Exception):
    """A rule or filter could not be evaluated for a message."""


class Program:
    """A compiled CEL expression and the model names it needs."""

    __slots__ = ("source", "names", "functions", "_program")

    def __init__(
        self, source: str, program: cel.Program, names: frozenset[str],
        functions: frozenset[str],
    ) -> None:
        self.source = source
        self._program = program
        self.names = names  # subset of MODEL_NAMES
        self.functions = functions  # extension functions to put in the context

    def __repr__(self) -> str:
        return f"Program({self.source!r})"

    def evaluate(self, model: cel.Context) -> Any:
        """Run the expression; library exceptions propagate."""
        return self._program.execute(model)


def _one_line(text: str, limit: int = 200) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


_PARSE_PREFIX = re.compile(r"^Failed to parse expression .*?: ERROR: <input>:", re.S)


def compile_expression(expr: str) -> Program:
    """Compile a rule or filter; ValueError with a one-line reason if bad."""
    if not isinstance(expr, str) or not expr.strip():
        raise ValueError("empty expression")
    try:
        program = cel.compile(expr)
    except ValueError as e:
        first = str(e).split("\n| ", 1)[0]
        first = _PARSE_PREFIX.sub("at ", first)
        raise ValueError(_one_line(first)) from None
    refs = program.references()
    names: set[str] = set()
    for var in refs["variables"]:
        if var in MODEL_NAMES:
            names.add(var)
        elif not re.search(rf"\.\s*(?:{_MACROS})\s*\(\s*{re.escape(var)}\s*,", expr):
            raise ValueError(
                f"unknown name {var!r}; expected {', '.join(MODEL_NAMES)}"
            )
    extras: set[str] = set()
    for fn in refs["functions"]:
        if fn[:1] in "_@!-":  # operators: _==_, @in, !_, -_
            continue
        if fn in _EXTRA_FUNCTIONS:
            extras.add(fn)
        elif fn not in _NATIVE_FUNCTIONS:
            raise ValueError(f"unknown function {fn!r}")
    return Program(expr, program, frozenset(names), frozenset(extras))


@dataclass(frozen=True)
class Rule:
    """One entry of MLLP_CONFIG's ``rules``: false answers ``ack``."""

    name: str
    expr: str
    message: str = ""
    ack: Literal["AE", "AR"] = "AE"


class Violation(NamedTuple):
    """Why a message is refused. ``error``: the rule could not be evaluated
    (the sender gets AR whatever ``ack`` says)."""

    rule: str
    message: str
    ack: str
    error: bool


def _reason(e: Exception) -> str:
    if isinstance(e, KeyError):
        return f"no such key: {e}"
    text = str(e) or type(e).__name__
    # The library appends advice ("Check function arguments ...") after
    # the first sentence; the first line is the reason.
    return _one_line(text.split(". Check ", 1)[0].split("\n", 1)[0])


# ---------------------------------------------------------------------------
# The field model
# ---------------------------------------------------------------------------

_STANDARD_SEPS = ("^", "&")


def _simple(value: str, h: Header, c: int = 1, s: int = 0) -> str:
    """Component c (and subcomponent s) of the first repetition, unescaped."""
    if h.repetition_sep in value:
        value = value.split(h.repetition_sep, 1)[0]
    if h.component_sep in value:
        parts = value.split(h.component_sep)
        value = parts[c - 1] if c <= len(parts) else ""
    elif c > 1:
        return ""
    if s and h.subcomponent_sep in value:
        subs = value.split(h.subcomponent_sep)
        value = subs[s - 1] if s <= len(subs) else ""
    return unescape(value, h) if h.escape_char in value else value


def _composite(value: str, h: Header) -> str:
    """The first repetition with components joined by ^ and subcomponents
    by &, each unescaped, trailing empty components dropped."""
    if h.repetition_sep in value:
        value = value.split(h.repetition_sep, 1)[0]
    if (h.component_sep, h.subcomponent_sep) == _STANDARD_SEPS and h.escape_char not in value:
        return value.rstrip("^")
    comps = [
        "&".join(unescape(s, h) for s in comp.split(h.subcomponent_sep))
        for comp in value.split(h.component_sep)
    ]
    while comps and not comps[-1]:
        comps.pop()
    return "^".join(comps)


def _field(seg: list[str], n: int) -> str:
    return seg[n] if n < len(seg) else ""


def _msh(h: Header) -> dict[str, str]:
    f = h.fields
    n = len(f)
    return {
        "msg_type": unescape(h.msg_type, h),
        "trigger": unescape(h.trigger, h),
        "sending_app": _simple(f[3], h) if n > 3 else "",
        "sending_fac": _simple(f[4], h) if n > 4 else "",
        "receiving_app": _simple(f[5], h) if n > 5 else "",
        "receiving_fac": _simple(f[6], h) if n > 6 else "",
        "control_id": unescape(h.control_id, h),
        "version": unescape(h.version, h),
    }


def _pid(seg: list[str], h: Header) -> dict[str, str]:
    name = _field(seg, 5)
    family = _simple(name, h, 1, 1)  # XPN.1 is FN: its first part is the surname
    given = _simple(name, h, 2)
    return {
        "id": _simple(_field(seg, 3), h),
        "name": f"{family}^{given}" if given else family,
        "dob": _simple(_field(seg, 7), h),
        "sex": _simple(_field(seg, 8), h),
        "ssn": _simple(_field(seg, 19), h),
        "country": _simple(_field(seg, 11), h, 6),
    }


def _pv1(seg: list[str], h: Header) -> dict[str, str]:
    return {
        "patient_class": _simple(_field(seg, 2), h),
        "assigned_location": _composite(_field(seg, 3), h),
        "attending_doctor": _composite(_field(seg, 7), h),
        "admit_datetime": _simple(_field(seg, 44), h),
    }


def _obx(seg: list[str], h: Header) -> dict[str, str]:
    return {
        "value_type": _simple(_field(seg, 2), h),
        "identifier": _simple(_field(seg, 3), h),
        "value": _composite(_field(seg, 5), h),
        "unit": _simple(_field(seg, 6), h),
        "status": _simple(_field(seg, 11), h),
    }


_SEGMENT_OF = {"pid": "PID", "pv1": "PV1", "obx": "OBX", "obx_list": "OBX"}
_LINES = re.compile(r"\r\n|\r|\n")


def _lines(text: str) -> list[str]:
    # Splitting on CR alone is the common case and three times faster than
    # the regular expression; str.splitlines would also split on FF, NEL...
    return text.split("\r") if "\n" not in text else _LINES.split(text)


class RuleSet:
    """The compiled rules and connector filters of one configuration."""

    def __init__(
        self,
        rules: Iterable[Rule] = (),
        filters: Mapping[str, str | Program | None] | Iterable[tuple[str, str | Program | None]] = (),
    ) -> None:
        """Compile everything; ValueError naming the rule or connector."""
        self.rules: tuple[Rule, ...] = tuple(rules)
        compiled: list[tuple[Rule, Any]] = []
        programs: list[Program] = []
        for rule in self.rules:
            if rule.ack not in ("AE", "AR"):
                raise ValueError(f"rule {rule.name}: ack must be AE or AR")
            try:
                program = compile_expression(rule.expr)
            except ValueError as e:
                raise ValueError(f"rule {rule.name}: {e}") from None
            programs.append(program)
            compiled.append((rule, program._program))
        self._rules = tuple(compiled)
        items = filters.items() if isinstance(filters, Mapping) else filters
        routed: list[tuple[str, Any]] = []
        for name, flt in items:
            if flt is None:
                routed.append((name, None))
                continue
            if isinstance(flt, str):
                try:
                    flt = compile_expression(flt)
                except ValueError as e:
                    raise ValueError(f"connector {name}: filter: {e}") from None
            programs.append(flt)
            routed.append((name, flt._program))
        self._filters = tuple(routed)
        self.connectors: tuple[str, ...] = tuple(name for name, _ in routed)
        names = frozenset().union(*(p.names for p in programs))
        self.names: frozenset[str] = names
        self._need_msh = "msh" in names
        self._need_pid = "pid" in names
        self._need_pv1 = "pv1" in names
        self._need_obx = "obx" in names
        self._need_obx_list = "obx_list" in names
        self._segment_ids = tuple(sorted({_SEGMENT_OF[n] for n in names if n in _SEGMENT_OF}))
        fns = frozenset().union(*(p.functions for p in programs))
        self._functions = {f: _EXTRA_FUNCTIONS[f] for f in sorted(fns)} or None

    def model(self, message: Message) -> cel.Context:
        """The CEL context for one message: only referenced segments."""
        h = message.header
        variables: dict[str, Any] = {}
        if self._need_msh:
            variables["msh"] = _msh(h)
        if self._segment_ids:
            fs = h.field_sep
            pid = pv1 = None
            obx: list[list[str]] = []
            wanted = self._segment_ids
            for line in _lines(message.text):
                sid = line[:3]
                if sid not in wanted or line[3:4] not in (fs, ""):
                    continue
                if sid == "OBX":
                    obx.append(line.split(fs))
                elif sid == "PID":
                    if pid is None:
                        pid = line.split(fs)
                elif pv1 is None:
                    pv1 = line.split(fs)
            if self._need_pid:
                variables["pid"] = _pid(pid, h) if pid is not None else {}
            if self._need_pv1:
                variables["pv1"] = _pv1(pv1, h) if pv1 is not None else {}
            if self._need_obx_list:
                obx_list = [_obx(seg, h) for seg in obx]
                variables["obx_list"] = obx_list
                if self._need_obx:
                    variables["obx"] = obx_list[0] if obx_list else {}
            elif self._need_obx:
                variables["obx"] = _obx(obx[0], h) if obx else {}
        return cel.Context(variables=variables, functions=self._functions)

    def check(self, model: cel.Context) -> Violation | None:
        """The first rule, in order, that is false or cannot be evaluated."""
        for rule, program in self._rules:
            try:
                result = program.execute(model)
            # The library raises ValueError, TypeError, KeyError, RuntimeError,
            # ZeroDivisionError... and extension functions anything: every
            # failure is this rule's evaluation error, never the receiver's.
            except Exception as e:  # noqa: BLE001
                return Violation(
                    rule.name, f"rule {rule.name} could not be evaluated: {_reason(e)}",
                    "AR", True,
                )
            if result is True:
                continue
            if result is False:
                return Violation(
                    rule.name, rule.message or f"rule {rule.name} failed", rule.ack, False
                )
            return Violation(
                rule.name,
                f"rule {rule.name} could not be evaluated: result is "
                f"{_cel_type(result)}, not bool",
                "AR", True,
            )
        return None

    def route(self, model: cel.Context) -> tuple[str, ...]:
        """Names of the connectors whose filter is true (no filter: all)."""
        out: list[str] = []
        for name, program in self._filters:
            if program is None:
                out.append(name)
                continue
            try:
                result = program.execute(model)
            except Exception as e:  # noqa: BLE001 - as in check()
                raise RuleError(
                    f"connector {name}: filter could not be evaluated: {_reason(e)}"
                ) from None
            if result is True:
                out.append(name)
            elif result is not False:
                raise RuleError(
                    f"connector {name}: filter result is {_cel_type(result)}, not bool"
                )
        return tuple(out)


def _cel_type(value: object) -> str:
    return {
        str: "string", int: "int", float: "double", bytes: "bytes",
        list: "list", dict: "map", type(None): "null",
    }.get(type(value), type(value).__name__)
