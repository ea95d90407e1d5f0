"""Rules and connector filters: CEL expressions over a small HL7 field model.

Expressions are compiled once, at startup, with ``common-expression-language``
(Python bindings of the Rust ``cel`` crate; see docs/rules-and-connectors.md
for why it was chosen over cel-python). Per message, :meth:`RuleSet.model`
builds one CEL context holding only the segments and keys that the compiled
expressions can observe, and every rule and filter runs against that
context, so the Python-to-CEL conversion is paid once per message.

The model (:mod:`mllpd.hl7model`): ``msh``, ``pid``, ``pv1``, ``obx`` (first
OBX) are maps of strings, ``obx_list`` is a list of OBX maps. A segment that
is not in the message is an empty map (``has(pid.id)`` is false, ``pid.id``
is an evaluation error); a present segment has every key, ``""`` when the
field is empty. Which keys an expression can observe is read from its
source by :mod:`mllpd.celscan`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import cel
from cel.stdlib import STDLIB_FUNCTIONS

from mllpd.celscan import key_needs, macro_bindings
from mllpd.hl7 import Message, first_segment, pick
from mllpd.hl7model import (
    LIST_NAMES,
    MAP_NAMES,
    MAX_MODEL_COMPONENTS,
    MAX_MODEL_SEGMENTS,
    MODEL_KEYS,
    MODEL_NAMES,
    SEGMENT_OF,
    FieldModel,
    ModelTooLarge,
)

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
# Type names are identifiers too: type(x) == string.
_TYPE_NAMES = frozenset({
    "int", "uint", "double", "string", "bytes", "bool", "list", "map", "null_type", "type",
})


class RuleError(Exception):
    """A rule or filter could not be evaluated for a message."""


class ModelLimitError(RuleError):
    """The message is larger than what rules model (MAX_MODEL_*): AE."""


class Program:
    """A compiled CEL expression and the model names it needs."""

    __slots__ = ("source", "compiled", "names", "functions", "keys")

    def __init__(
        self, source: str, compiled: cel.Program, names: frozenset[str],
        functions: frozenset[str], keys: Mapping[str, frozenset[str] | None],
    ) -> None:
        self.source = source
        # The library's program: RuleSet calls its execute() directly, one
        # Python call less per rule and message than evaluate().
        self.compiled = compiled
        self.names = names  # subset of MODEL_NAMES
        self.functions = functions  # extension functions to put in the context
        self.keys = keys  # segment id -> model keys it can observe (None: all)

    def __repr__(self) -> str:
        return f"Program({self.source!r})"


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
    bound = macro_bindings(expr)
    for var in refs["variables"]:
        if var in MODEL_NAMES:
            names.add(var)
        elif var in _TYPE_NAMES:
            continue
        elif var not in bound:
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
    needs = key_needs(expr, MAP_NAMES, LIST_NAMES)
    # obx and obx_list both read OBX: a segment needs what either observes.
    keys: dict[str, frozenset[str] | None] = {}
    for name in names:
        keys[SEGMENT_OF[name]] = _union(
            keys.get(SEGMENT_OF[name], frozenset()), needs.get(name, frozenset())
        )
    return Program(expr, program, frozenset(names), frozenset(extras), keys)


def _union(a: frozenset[str] | None, b: frozenset[str] | None) -> frozenset[str] | None:
    """Keys observed by either (None: the whole map)."""
    return None if a is None or b is None else a | b


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
        return f"no such key: {key!r}" if key in MODEL_KEYS else "no such key"
    text = str(e) or type(e).__name__
    # The library appends advice ("Check function arguments ...") after
    # the first sentence; the first line is the reason.
    text = text.split(". Check ", 1)[0].split("\n", 1)[0]
    m = _FUNCTION_ERROR.match(text)
    text = m.group(1) + _redact(m.group(2)) if m else _redact(text)
    # ASCII, so the text fits an ACK in any character set.
    return _one_line(text.replace("\u2014", "-")).encode("ascii", "replace").decode("ascii")


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
            compiled.append((rule, program.compiled))
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
            routed.append((name, flt.compiled))
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
            self._order_by[name] = expr.compiled
        self.names: frozenset[str] = frozenset().union(*(p.names for p in programs))
        # Per segment, the keys some expression can observe.
        keys: dict[str, frozenset[str] | None] = {}
        for program in programs:
            for seg, need in program.keys.items():
                keys[seg] = _union(keys.get(seg, frozenset()), need)
        self._fields = FieldModel(self.names, keys)
        fns = frozenset().union(*(p.functions for p in programs))
        self._functions = {f: _EXTRA_FUNCTIONS[f] for f in sorted(fns)} or None

    def model(self, message: Message) -> cel.Context:
        """The CEL context for one message: only what the expressions can see.

        Raises :class:`ModelLimitError` past MAX_MODEL_SEGMENTS or
        MAX_MODEL_COMPONENTS.
        """
        try:
            variables = self._fields.read(message)
        except ModelTooLarge as e:
            raise ModelLimitError(str(e)) from None
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
    pid = first_segment(message.text, "PID", h.field_sep)
    patient = pick(pid[3], h, 1) if pid is not None and len(pid) > 3 else ""
    return f"{app}\x1f{patient}" if patient else app


def _cel_type(value: object) -> str:
    return {
        str: "string", int: "int", float: "double", bytes: "bytes",
        list: "list", dict: "map", type(None): "null",
    }.get(type(value), type(value).__name__)
