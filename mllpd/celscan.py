"""Which keys of its map variables a CEL expression can observe, from its source.

Converting a Python string into a CEL context costs about 1.5 us, so a
full PID map (6 keys) costs ~10 us before any rule runs. An expression that
only ever selects fields (pid.id, has(pid.ssn), o.value of a bound list
element) cannot tell a map holding just those keys from the full one; any
other use of a map (size(pid), pid["id"], pid == {...}, passing it on, a
call on it) makes the whole map needed.

The CEL library reports the variables and functions an expression
references, not the fields it selects, so this is a scan of the source
text. It is conservative: text inside string literals can only add keys or
make a map whole, never drop one.
"""

from __future__ import annotations

import re
from collections.abc import Collection

__all__ = ["KeyNeeds", "key_needs", "macro_bindings"]

# The comprehension macros that bind a name: list.exists(x, ...).
_MACROS = "all|exists|exists_one|map|filter"

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SELECT = re.compile(r"\s*\.\s*([A-Za-z_][A-Za-z0-9_]*)\s*(\()?")
_LIST_MACRO = re.compile(r"\s*\.\s*(?:all|exists|exists_one|map)\s*\(")
_LIST_SIZE = re.compile(r"\s*\.\s*size\s*\(\s*\)")
_SIZE_OPEN = re.compile(r"size\s*\(\s*$")
_CLOSE = re.compile(r"\s*\)")
_BINDING = re.compile(rf"\.\s*(?:{_MACROS})\s*\(\s*([A-Za-z_][A-Za-z0-9_]*)\s*,")
_BINDING_BEFORE = re.compile(rf"\.\s*(?:{_MACROS})\s*\(\s*$")

KeyNeeds = dict[str, "frozenset[str] | None"]  # variable -> keys, None = all


def macro_bindings(expr: str) -> frozenset[str]:
    """The names that comprehension macros bind in ``expr`` (the ``x`` of
    ``obx_list.exists(x, ...)``): identifiers that are not variables."""
    return frozenset(_BINDING.findall(expr))


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


def key_needs(expr: str, maps: Collection[str], lists: Collection[str]) -> KeyNeeds:
    """For each variable the expression reaches, the keys it can observe.

    ``maps`` are variables holding a map, ``lists`` variables holding a list
    of maps: for those, the keys observed on their elements (reached by
    index, or through a name a macro binds). A variable the expression
    names but reads no key of is absent.
    """
    bound = macro_bindings(expr)
    keys: dict[str, set[str]] = {}
    whole: set[str] = set()

    def select(var: str, rest: str) -> None:
        m = _SELECT.match(rest)
        if m is None or m.group(2):
            whole.add(var)
        else:
            keys.setdefault(var, set()).add(m.group(1))

    for m in _IDENT.finditer(expr):
        name, start, end = m.group(), m.start(), m.end()
        before = expr[:start].rstrip()
        if before.endswith("."):
            continue  # a field or function name, not a variable
        rest = expr[end:]
        if name in bound:
            if _BINDING_BEFORE.search(expr[:start]):
                continue  # where the macro binds it
            # Only elements of a list of maps can reach a bound name as a
            # map: a map variable passed whole is already made whole.
            for var in lists:
                select(var, rest)
        if name in maps:
            select(name, rest)
        elif name in lists:
            if _LIST_MACRO.match(rest) or _LIST_SIZE.match(rest):
                continue  # elements reach the body only through the bound name
            if _SIZE_OPEN.search(before) and _CLOSE.match(rest):
                continue
            stripped = rest.lstrip()
            if stripped.startswith("["):
                close = _matching_bracket(stripped, 0)
                if close > 0:
                    select(name, stripped[close:])
                    continue
            whole.add(name)
    needs: KeyNeeds = {var: frozenset(k) for var, k in keys.items()}
    for var in whole:
        needs[var] = None
    return needs
