"""MLLP_CONFIG: rules, connectors and retry policy from one YAML file.

Everything is checked at startup. A problem raises :class:`ConfigError` whose
text is one line starting ``MLLP_CONFIG: `` and naming the place, e.g.
``MLLP_CONFIG: rules[0] (patient-id-required).expr: ...``. Connector options
beyond name, type, filter, lanes and order_by are passed on unchecked: each
connector module checks its own.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import yaml

from mllpd.config import ConfigError, parse_duration
from mllpd.connectors import CONNECTOR_TYPES, ConnectorSpec
from mllpd.relay import RetryPolicy
from mllpd.rules import Rule, RuleSet, compile_expression

__all__ = [
    "CONNECTOR_TYPES",
    "PipelineConfig",
    "RetryPolicy",
    "load_pipeline_config",
    "parse_pipeline_config",
]

VARIABLE = "MLLP_CONFIG"
_TOP_KEYS = ("rules", "connectors", "retry")
_RULE_KEYS = ("name", "expr", "message", "ack")
# Connector keys every type has; the rest go to the type's own checks.
_GENERIC_KEYS = ("name", "type", "filter", "lanes", "order_by")
_RETRY_KEYS = ("initial", "max", "multiplier", "jitter", "max_attempts")
# Deliveries in flight per connector: connections (mllp), pooled requests
# (http) or rows per transaction (postgres).
MAX_LANES = 256
# Names end up as outbox queue names, ERR text and mllp-cli arguments.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")


class PipelineConfig(NamedTuple):
    """MLLP_CONFIG, checked and compiled."""

    rules: RuleSet
    connectors: tuple[ConnectorSpec, ...]
    retry: RetryPolicy


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, but a key given twice in one mapping is an error, not a
    silent override (two ``filter:`` lines would otherwise keep the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: let PyYAML report it
                break
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _fail(message: str) -> ConfigError:
    return ConfigError(VARIABLE, message)


def _yaml_error(path: str, e: yaml.YAMLError) -> ConfigError:
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return _fail(f"{path}: not valid YAML{where}: {' '.join(str(problem).split())}")


def load_pipeline_config(path: str, environ: Mapping[str, str]) -> PipelineConfig:
    """Read and check the MLLP_CONFIG file; ConfigError on any problem.

    ``environ`` is not read here: secrets are expanded by the connector that
    uses them (http headers, postgres dsn_env) when it is built.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise _fail(f"cannot read {path}: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _fail(f"{path}: not UTF-8 at byte {e.start}") from None
    try:
        doc = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as e:
        raise _yaml_error(path, e) from None
    return parse_pipeline_config(doc)


def parse_pipeline_config(doc: object) -> PipelineConfig:
    """Check an already-loaded document (a mapping, or None for empty)."""
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise _fail(f"expected a mapping with {_list(_TOP_KEYS)}, found {_kind(doc)}")
    _no_unknown_keys(doc, _TOP_KEYS, "")
    rules = _rules(doc.get("rules"))
    specs = _connectors(doc.get("connectors"))
    retry = _retry(doc.get("retry"))
    try:
        ruleset = RuleSet(
            rules, [(s.name, s.filter) for s in specs],
            order_by={s.name: s.order_by for s in specs},
        )
    except ValueError as e:  # already compiled one by one above; kept as a guard
        raise _fail(str(e)) from None
    return PipelineConfig(ruleset, specs, retry)


def _list(names: tuple[str, ...]) -> str:
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]


def _kind(value: object) -> str:
    if value is None:
        return "nothing"
    return {
        bool: "a boolean", int: "a number", float: "a number", str: "a string",
        list: "a list", dict: "a mapping",
    }.get(type(value), type(value).__name__)


def _no_unknown_keys(item: dict[Any, Any], allowed: tuple[str, ...], place: str) -> None:
    for key in item:
        if key not in allowed:
            prefix = f"{place}: " if place else ""
            raise _fail(f"{prefix}unknown key {str(key)!r}; expected {_list(allowed)}")


def _name(item: dict[Any, Any], place: str) -> str:
    if "name" not in item:
        raise _fail(f"{place}: name is required")
    name = item["name"]
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise _fail(
            f"{place}.name: {str(name)[:70]!r} is not a valid name; expected up to 64 "
            "letters, digits, '_', '.', ':' or '-', starting with a letter or digit"
        )
    return name


def _sequence(value: object, key: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _fail(f"{key}: expected a list, found {_kind(value)}")
    return value


def _rules(value: object) -> list[Rule]:
    out: list[Rule] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(_sequence(value, "rules")):
        place = f"rules[{i}]"
        if not isinstance(item, dict):
            raise _fail(f"{place}: expected a mapping with name and expr, found {_kind(item)}")
        name = _name(item, place)
        place = f"{place} ({name})"
        _no_unknown_keys(item, _RULE_KEYS, place)
        if name in seen:
            raise _fail(f"{place}: duplicate name; rules[{seen[name]}] has it too")
        seen[name] = i
        if "expr" not in item:
            raise _fail(f"{place}: expr is required")
        expr = _expression(item, "expr", place, required=True)
        assert expr is not None
        message = item.get("message", "")
        if message is None:
            message = ""
        if not isinstance(message, str):
            raise _fail(f"{place}.message: expected text, found {_kind(message)}")
        ack = item.get("ack", "AE")
        if ack not in ("AE", "AR"):
            raise _fail(f"{place}.ack: {str(ack)[:20]!r} is not allowed; expected AE or AR")
        out.append(Rule(name, expr, " ".join(message.split()), ack))
    return out


def _expression(item: dict[str, Any], key: str, place: str, required: bool = False) -> str | None:
    """A CEL option (a rule's ``expr``; a connector's optional ``filter``,
    ``order_by``), compiled once to check it."""
    text = item.get(key)
    if text is None and not required:
        return None
    if not isinstance(text, str):
        raise _fail(f"{place}.{key}: expected a CEL expression as text, found {_kind(text)}")
    try:
        compile_expression(text)
    except ValueError as e:
        raise _fail(f"{place}.{key}: {e}") from None
    return text


def _connectors(value: object) -> tuple[ConnectorSpec, ...]:
    out: list[ConnectorSpec] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(_sequence(value, "connectors")):
        place = f"connectors[{i}]"
        if not isinstance(item, dict):
            raise _fail(f"{place}: expected a mapping with name and type, found {_kind(item)}")
        name = _name(item, place)
        place = f"{place} ({name})"
        if name in seen:
            raise _fail(f"{place}: duplicate name; connectors[{seen[name]}] has it too")
        seen[name] = i
        if "type" not in item:
            raise _fail(f"{place}: type is required; expected {_list(CONNECTOR_TYPES)}")
        ctype = item["type"]
        if ctype not in CONNECTOR_TYPES:
            raise _fail(
                f"{place}: unknown type {str(ctype)[:40]!r}; expected {_list(CONNECTOR_TYPES)}"
            )
        flt = _expression(item, "filter", place)
        lanes = item.get("lanes", 1)
        if isinstance(lanes, bool) or not isinstance(lanes, int) or not 1 <= lanes <= MAX_LANES:
            raise _fail(
                f"{place}.lanes: {str(lanes)[:20]!r} is out of range; expected a whole "
                f"number from 1 to {MAX_LANES}"
            )
        order_by = _expression(item, "order_by", place)
        for key in item:
            if not isinstance(key, str):
                raise _fail(f"{place}: option names must be text, found {_kind(key)}")
        options = {k: v for k, v in item.items() if k not in _GENERIC_KEYS}
        out.append(ConnectorSpec(name, ctype, flt, options, lanes, order_by))
    return tuple(out)


def _duration(value: object, place: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise _fail(f"{place}: expected a duration like 1s, 500ms or 5m, found {_kind(value)}")
    if isinstance(value, (int, float)):
        if value == 0:
            return 0.0
        raise _fail(f"{place}: {value} has no unit; expected a duration like 1s, 500ms or 5m")
    try:
        return parse_duration(value)
    except ValueError:
        raise _fail(
            f"{place}: invalid duration {value[:40]!r}; expected e.g. 1s, 500ms, 5m or 1h30m"
        ) from None


def _number(value: object, place: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(f"{place}: expected a number, found {_kind(value)}")
    return float(value)


def _retry(value: object) -> RetryPolicy:
    if value is None:
        return RetryPolicy()
    if not isinstance(value, dict):
        raise _fail(f"retry: expected a mapping with {_list(_RETRY_KEYS)}, found {_kind(value)}")
    _no_unknown_keys(value, _RETRY_KEYS, "retry")
    default = RetryPolicy()
    initial = _duration(value["initial"], "retry.initial") if "initial" in value else default.initial
    maximum = _duration(value["max"], "retry.max") if "max" in value else default.max
    multiplier = (
        _number(value["multiplier"], "retry.multiplier") if "multiplier" in value
        else default.multiplier
    )
    jitter = _number(value["jitter"], "retry.jitter") if "jitter" in value else default.jitter
    attempts = value.get("max_attempts", default.max_attempts)
    if isinstance(attempts, bool) or not isinstance(attempts, int):
        raise _fail(f"retry.max_attempts: expected a whole number, found {_kind(attempts)}")
    if not initial > 0:
        raise _fail("retry.initial: must be more than 0")
    if not maximum >= initial:
        raise _fail(f"retry.max: must be at least retry.initial ({initial:g}s)")
    if not (multiplier >= 1 and math.isfinite(multiplier)):
        raise _fail(f"retry.multiplier: {multiplier:g} is out of range; expected 1 or more")
    if not 0 <= jitter < 1:
        raise _fail(f"retry.jitter: {jitter:g} is out of range; expected 0 <= jitter < 1")
    if attempts < 1:
        raise _fail(f"retry.max_attempts: {attempts} is out of range; expected 1 or more")
    return RetryPolicy(initial, maximum, multiplier, jitter, attempts)
