"""Rules and connector filters: CEL expressions over a small HL7 field model.

Expressions are compiled once, at startup, with ``common-expression-language``
(Python bindings of the Rust ``cel`` crate; see docs/rules-and-connectors.md
for why it was chosen over cel-python). Per message, :meth:`RuleSet.model`
builds one CEL context holding only the segments and keys that the compiled
expressions can observe, and every rule and filter runs against that
context, so the Python-to-CEL conversion is paid once per message.

The model: ``msh``, ``pid``, ``pv1``, ``obx`` (first OBX) are maps of
strings, ``obx_list`` is a list of OBX maps. A segment that is not in the
message is an empty map (``has(pid.id)`` is false, ``pid.id`` is an
evaluation error); a present segment has every key, ``""`` when the field is
empty.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import cel
from cel.stdlib import STDLIB_FUNCTIONS

from mllpd.hl7 import Header, Message, unescape

__all__ = [
    "MAX_MODEL_COMPONENTS",
    "MAX_MODEL_SEGMENTS",
    "MODEL_NAMES",
    "ModelLimitError",
    "Program",
    "Rule",
    "RuleError",
    "RuleSet",
    "Violation",
    "compile_expression",
    "default_lane",
    "lane_key",
]

MODEL_NAMES: tuple[str, ...] = ("msh", "pid", "pv1", "obx", "obx_list")

# Rules run on the reactor, so what they model is bounded: at most this many
# OBX segments in ``obx_list``, and this many components and subcomponents
# in a composite value (``pv1.assigned_location``, ``obx.value``...). Only the
# first repetition of any field is modelled. A message past a cap that a
# rule or filter would read gets AE (ModelLimitError): resent unchanged it
# would fail again.
MAX_MODEL_SEGMENTS = 1000
MAX_MODEL_COMPONENTS = 100

# The Rust engine's own functions and macros (CEL's standard definitions).
# The library parses unknown function names without complaint and fails
# only at evaluation, which would answer AR to every message: refuse them
# at startup instead.
_NATIVE_FUNCTIONS = frozenset({
    "size", "contains", "startsWith", "endsWith", "matches",
    "int", "uint", "double", "string", "bytes", "dyn", "type",
    "timestamp", "duration",
    "has", "all", "exists", "exists_one", "map", "filter",
    "getFullYear", "getMonth", "getDayOfYear", "getDayOfMonth", "getDate",
    "getDayOfWeek", "getHours", "getMinutes", "getSeconds", "getMilliseconds",
    "value", "orValue", "hasValue",  # on the optionals that first() and last() return
})
# cel-go's string and list extensions, shipped by the library as Python
# functions. Only the unqualified ones: ``math.abs`` parses as a member call
# on a variable named ``math``. A native name is never shadowed.
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
_FUNCTION_ERROR = re.compile(r"(Function '\w+' error: )(.*)")


def _redact(text: str) -> str:
    """Drop quoted text: the library quotes the values it could not use."""
    return _QUOTED.sub("'...'", text)


def _quiet(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """The library prints a failing Python function's exception to stderr,
    and bool() puts the value it could not read in it: keep values out."""

    def call(*args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 - re-raised without the values
            raise ValueError(_redact(str(e)) or f"{name} failed") from None

    return call


_EXTRA_FUNCTIONS: dict[str, Callable[..., Any]] = {
    name: _quiet(name, fn)
    for name, fn in STDLIB_FUNCTIONS.items()
    if "." not in name and name not in _NATIVE_FUNCTIONS
}
_MACROS = "all|exists|exists_one|map|filter"
# Type names are identifiers too: type(x) == string.
_TYPE_NAMES = frozenset({
    "int", "uint", "double", "string", "bytes", "bool", "list", "map", "null_type", "type",
})


class RuleError(Exception):
    """A rule or filter could not be evaluated for a message."""


class ModelLimitError(RuleError):
    """The message is larger than what rules model (MAX_MODEL_*)."""


class Program:
    """A compiled CEL expression and the model names it needs."""

    __slots__ = ("source", "names", "functions", "keys", "_program")

    def __init__(
        self, source: str, program: cel.Program, names: frozenset[str],
        functions: frozenset[str], keys: Mapping[str, frozenset[str] | None],
    ) -> None:
        self.source = source
        self._program = program
        self.names = names  # subset of MODEL_NAMES
        self.functions = functions  # extension functions to put in the context
        self.keys = keys  # segment id -> model keys it can observe (None: all)

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
        elif var in _TYPE_NAMES:
            continue
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
    segments = {_SEGMENT_OF[n] for n in names}
    needs = _key_needs(expr)
    keys = {seg: needs.get(seg, frozenset()) for seg in segments}
    return Program(expr, program, frozenset(names), frozenset(extras), keys)


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
    """One line for the ERR segment and logs, without values from the message."""
    if isinstance(e, KeyError):
        key = e.args[0] if e.args else None
        # A key computed from message content (pid[pid.id]) must not be shown.
        return f"no such key: {key!r}" if key in _MODEL_KEYS else "no such key"
    text = str(e) or type(e).__name__
    # The library appends advice ("Check function arguments ...") after
    # the first sentence; the first line is the reason.
    text = text.split(". Check ", 1)[0].split("\n", 1)[0]
    m = _FUNCTION_ERROR.match(text)
    text = m.group(1) + _redact(m.group(2)) if m else _redact(text)
    # ASCII, so the text fits an ACK in any character set.
    return _one_line(text.replace("\u2014", "-")).encode("ascii", "replace").decode("ascii")


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
    if value.count(h.component_sep) + value.count(h.subcomponent_sep) >= MAX_MODEL_COMPONENTS:
        raise ModelLimitError(
            f"a field has more than {MAX_MODEL_COMPONENTS} components for rules to read"
        )
    if (h.component_sep, h.subcomponent_sep) == _STANDARD_SEPS and h.escape_char not in value:
        return value.rstrip("^")
    comps = [
        "&".join(unescape(s, h) for s in comp.split(h.subcomponent_sep))
        for comp in value.split(h.component_sep)
    ]
    while comps and not comps[-1]:
        comps.pop()
    return "^".join(comps)


def _field(seg: Sequence[str], n: int) -> str:
    return seg[n] if n < len(seg) else ""


_Extractor = Callable[[Sequence[str], Header], str]


def _simple_at(n: int, c: int = 1) -> _Extractor:
    return lambda seg, h: _simple(seg[n], h, c) if n < len(seg) else ""


def _composite_at(n: int) -> _Extractor:
    return lambda seg, h: _composite(seg[n], h) if n < len(seg) else ""


def _whole_at(n: int) -> _Extractor:
    return lambda seg, h: unescape(seg[n], h) if n < len(seg) else ""


def _person_name(seg: Sequence[str], h: Header) -> str:
    name = _field(seg, 5)
    family = _simple(name, h, 1, 1)  # XPN.1 is FN: its first part is the surname
    given = _simple(name, h, 2)
    return f"{family}^{given}" if given else family


# Segment id -> model key -> how to read it. MSH is read from Header.fields,
# where fields[n] is MSH-n, like any other segment's fields[n].
_FIELDS: dict[str, dict[str, _Extractor]] = {
    "MSH": {
        "msg_type": _simple_at(9, 1),
        "trigger": _simple_at(9, 2),
        "sending_app": _simple_at(3),
        "sending_fac": _simple_at(4),
        "receiving_app": _simple_at(5),
        "receiving_fac": _simple_at(6),
        "control_id": _whole_at(10),
        "version": _simple_at(12),
    },
    "PID": {
        "id": _simple_at(3),
        "name": _person_name,
        "dob": _simple_at(7),
        "sex": _simple_at(8),
        "ssn": _simple_at(19),
        "country": _simple_at(11, 6),
    },
    "PV1": {
        "patient_class": _simple_at(2),
        "assigned_location": _composite_at(3),
        "attending_doctor": _composite_at(7),
        "admit_datetime": _simple_at(44),
    },
    "OBX": {
        "value_type": _simple_at(2),
        "identifier": _simple_at(3),
        "value": _composite_at(5),
        "unit": _simple_at(6),
        "status": _simple_at(11),
    },
}
_MODEL_KEYS = frozenset(key for keys in _FIELDS.values() for key in keys)
_SEGMENT_OF = {"msh": "MSH", "pid": "PID", "pv1": "PV1", "obx": "OBX", "obx_list": "OBX"}
_LINES = re.compile(r"\r\n|\r|\n")


def _lines(text: str) -> list[str]:
    # Splitting on CR alone is the common case and three times faster than
    # the regular expression; str.splitlines would also split on FF, NEL...
    return text.split("\r") if "\n" not in text else _LINES.split(text)


def _first_segment(text: str, sid: str, fs: str) -> list[str] | None:
    """The first segment with this id, split into fields, or None.

    Found with str.find, so the cost does not grow with the message: a rule
    on PID reads a 100 KB ORU as fast as a 1 KB ADT. The text starts with
    MSH, so every other segment follows a CR or an LF.
    """
    start = -1
    for sep in ("\r", "\n"):
        # Search only before a match already found: no scan of the whole text
        # for an LF that a CR-separated message does not have.
        limit = start if start >= 0 else len(text)
        i = text.find(sep + sid, 0, limit)
        while i >= 0:
            after = text[i + 4 : i + 5]
            if after == fs or after in ("\r", "\n", ""):
                start = i
                break
            i = text.find(sep + sid, i + 4, limit)
    if start < 0:
        return None
    start += 1
    end = len(text)
    for sep in ("\r", "\n"):
        j = text.find(sep, start, end)
        if j >= 0:
            end = j
    return text[start:end].split(fs)


# ---------------------------------------------------------------------------
# Which keys an expression can observe
# ---------------------------------------------------------------------------
#
# Converting a Python string into the CEL context costs about 1.5 us, so a
# full PID map (6 keys) costs ~10 us before any rule runs. An expression that
# only ever selects fields (pid.id, has(pid.ssn), o.value of a bound OBX) can
# not tell a map holding just those keys from the full one; any other use of
# a map (size(pid), pid["id"], pid == {...}, passing it on, a call on it)
# makes the whole map needed. The scan below is conservative: text inside
# string literals can only add keys or make a map whole, never drop one.

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SELECT = re.compile(r"\s*\.\s*([A-Za-z_][A-Za-z0-9_]*)\s*(\()?")
_LIST_MACRO = re.compile(r"\s*\.\s*(?:all|exists|exists_one|map)\s*\(")
_LIST_SIZE = re.compile(r"\s*\.\s*size\s*\(\s*\)")
_SIZE_OPEN = re.compile(r"size\s*\(\s*$")
_CLOSE = re.compile(r"\s*\)")
_BINDING = re.compile(rf"\.\s*(?:{_MACROS})\s*\(\s*([A-Za-z_][A-Za-z0-9_]*)\s*,")
_BINDING_BEFORE = re.compile(rf"\.\s*(?:{_MACROS})\s*\(\s*$")

KeyNeeds = dict[str, "frozenset[str] | None"]  # segment id -> keys, None = all


def _matching_bracket(text: str, pos: int) -> int:
    """Index just past the ']' that closes the '[' at pos, or -1."""
    depth = 0
    for i in range(pos, len(text)):
        ch = text[i]
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth == 0:
                return i + 1
    return -1


def _key_needs(expr: str) -> KeyNeeds:
    """For each segment the expression can reach, the keys it can observe."""
    bound = set(_BINDING.findall(expr))
    keys: dict[str, set[str]] = {}
    whole: set[str] = set()

    def select(seg: str, rest: str) -> None:
        m = _SELECT.match(rest)
        if m is None or m.group(2):
            whole.add(seg)
        else:
            keys.setdefault(seg, set()).add(m.group(1))

    for m in _IDENT.finditer(expr):
        name, start, end = m.group(), m.start(), m.end()
        before = expr[:start].rstrip()
        if before.endswith("."):
            continue  # a field or function name, not a variable
        rest = expr[end:]
        if name in bound:
            if _BINDING_BEFORE.search(expr[:start]):
                continue  # where the macro binds it
            select("OBX", rest)
        if name in ("msh", "pid", "pv1", "obx"):
            select(_SEGMENT_OF[name], rest)
        elif name == "obx_list":
            if _LIST_MACRO.match(rest) or _LIST_SIZE.match(rest):
                continue  # elements reach the body only through the bound name
            if _SIZE_OPEN.search(before) and _CLOSE.match(rest):
                continue
            stripped = rest.lstrip()
            if stripped.startswith("["):
                close = _matching_bracket(stripped, 0)
                if close > 0:
                    select("OBX", stripped[close:])
                    continue
            whole.add("OBX")
    needs: KeyNeeds = {seg: frozenset(k) for seg, k in keys.items()}
    for seg in whole:
        needs[seg] = None
    return needs


def lane_key(text: str) -> int:
    """A message's order key as stored with its queue rows: 8 bytes of a
    hash, signed (SQLite's integer), never 0 (the key of rows stored
    without one, e.g. delivered before the outbox knew lanes)."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True) or 1


def _key_text(value: Any) -> str:
    """An ``order_by`` result as text: strings as they are, anything else
    tagged with its CEL type so that 1 and "1" stay different keys."""
    if isinstance(value, str):
        return value
    return f"\x00{_cel_type(value)}:{value!r}"


class RuleSet:
    """The compiled rules, connector filters and order keys of one configuration."""

    def __init__(
        self,
        rules: Iterable[Rule] = (),
        filters: Mapping[str, str | Program | None]
        | Iterable[tuple[str, str | Program | None]] = (),
        *,
        order_by: Mapping[str, str | Program | None] | None = None,
    ) -> None:
        """Compile everything; ValueError naming the rule or connector."""
        self.rules: tuple[Rule, ...] = tuple(rules)
        compiled: list[tuple[Rule, cel.Program]] = []
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
        routed: list[tuple[str, cel.Program | None]] = []
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
        # Connector -> its order_by; connectors without one use the default key.
        self._order_by: dict[str, cel.Program] = {}
        for name, expr in (order_by or {}).items():
            if expr is None:
                continue
            if isinstance(expr, str):
                try:
                    expr = compile_expression(expr)
                except ValueError as e:
                    raise ValueError(f"connector {name}: order_by: {e}") from None
            programs.append(expr)
            self._order_by[name] = expr._program
        self.names: frozenset[str] = frozenset().union(*(p.names for p in programs))
        # Per segment, the (key, extractor) pairs some expression can observe.
        keys: dict[str, set[str] | None] = {}
        for program in programs:
            for seg, need in program.keys.items():
                have = keys.setdefault(seg, set())
                if need is None or have is None:
                    keys[seg] = None
                else:
                    have.update(need)
        self._extract: dict[str, tuple[tuple[str, _Extractor], ...]] = {
            seg: tuple(
                (key, fn) for key, fn in _FIELDS[seg].items() if want is None or key in want
            )
            for seg, want in keys.items()
        }
        self._msh = self._extract.get("MSH") if "msh" in self.names else None
        self._pid = self._extract.get("PID") if "pid" in self.names else None
        self._pv1 = self._extract.get("PV1") if "pv1" in self.names else None
        self._obx = self._extract.get("OBX") if "obx" in self.names else None
        self._obx_list = self._extract.get("OBX") if "obx_list" in self.names else None
        self._segment_ids = frozenset(
            _SEGMENT_OF[n] for n in self.names if n != "msh"
        )
        fns = frozenset().union(*(p.functions for p in programs))
        self._functions = {f: _EXTRA_FUNCTIONS[f] for f in sorted(fns)} or None

    def model(self, message: Message) -> cel.Context:
        """The CEL context for one message: only what the expressions can see.

        Raises :class:`ModelLimitError` past MAX_MODEL_SEGMENTS or
        MAX_MODEL_COMPONENTS.
        """
        h = message.header
        variables: dict[str, Any] = {}
        if self._msh is not None:
            fields = h.fields
            variables["msh"] = {key: fn(fields, h) for key, fn in self._msh}
        if self._segment_ids:
            fs = h.field_sep
            text = message.text
            pid = pv1 = None
            obx: list[list[str]] = []
            if self._obx_list is not None:
                # Every OBX is needed: one pass over all segments.
                wanted = self._segment_ids
                for line in _lines(text):
                    sid = line[:3]
                    if sid not in wanted or line[3:4] not in (fs, ""):
                        continue
                    if sid == "OBX":
                        if len(obx) == MAX_MODEL_SEGMENTS:
                            raise ModelLimitError(
                                f"more than {MAX_MODEL_SEGMENTS} OBX segments for rules to read"
                            )
                        obx.append(line.split(fs))
                    elif sid == "PID":
                        if pid is None:
                            pid = line.split(fs)
                    elif pv1 is None:
                        pv1 = line.split(fs)
            else:
                if self._pid is not None:
                    pid = _first_segment(text, "PID", fs)
                if self._pv1 is not None:
                    pv1 = _first_segment(text, "PV1", fs)
                if self._obx is not None and (first := _first_segment(text, "OBX", fs)):
                    obx.append(first)
            if self._pid is not None:
                variables["pid"] = (
                    {key: fn(pid, h) for key, fn in self._pid} if pid is not None else {}
                )
            if self._pv1 is not None:
                variables["pv1"] = (
                    {key: fn(pv1, h) for key, fn in self._pv1} if pv1 is not None else {}
                )
            if self._obx_list is not None:
                extract = self._obx_list
                obx_list = [{key: fn(seg, h) for key, fn in extract} for seg in obx]
                variables["obx_list"] = obx_list
                if self._obx is not None:
                    variables["obx"] = obx_list[0] if obx_list else {}
            elif self._obx is not None:
                variables["obx"] = (
                    {key: fn(obx[0], h) for key, fn in self._obx} if obx else {}
                )
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


    def lanes(
        self, model: cel.Context, message: Message, routes: Sequence[str]
    ) -> tuple[int, ...]:
        """The order key of the message for each route, in the same order.

        The default key is the sending application (MSH-3) and, when the
        message has a PID with an id (PID-3), the patient id; without one, the
        sender's own lane. An ``order_by`` that cannot be evaluated, or gives
        null, also sends the message down the sender's lane.
        """
        h = message.header
        app = h.field(3)
        default: int | None = None
        keys: list[int] = []
        for name in routes:
            program = self._order_by.get(name)
            if program is None:
                if default is None:
                    default = lane_key(_default_key_text(app, message))
                keys.append(default)
                continue
            try:
                value = program.execute(model)
            except Exception:  # noqa: BLE001 - any failure: the sender's lane
                value = None
            keys.append(lane_key(app if value is None else _key_text(value)))
        return tuple(keys)


def default_lane(message: Message) -> int:
    """The default order key of a message (no ``order_by``)."""
    return lane_key(_default_key_text(message.header.field(3), message))


def _default_key_text(app: str, message: Message) -> str:
    h = message.header
    pid = _first_segment(message.text, "PID", h.field_sep)
    patient = _simple(pid[3], h) if pid is not None and len(pid) > 3 else ""
    return f"{app}\x1f{patient}" if patient else app


def _cel_type(value: object) -> str:
    return {
        str: "string", int: "int", float: "double", bytes: "bytes",
        list: "list", dict: "map", type(None): "null",
    }.get(type(value), type(value).__name__)
