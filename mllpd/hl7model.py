"""The field model that rules and filters read: a few HL7 fields as strings.

``msh``, ``pid``, ``pv1``, ``obx`` (first OBX) are maps of strings,
``obx_list`` is a list of OBX maps. A segment that is not in the message is
an empty map; a present segment has every key, ``""`` when the field is
empty. Values are the first repetition, unescaped with :mod:`mllpd.hl7`.

:class:`FieldModel` builds only the names and keys it is told are needed,
so a message costs only what its rules can observe. Nothing here knows CEL.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from mllpd.hl7 import Header, Message, first_segment, pick, split_segments, unescape

__all__ = [
    "FIELDS",
    "LIST_NAMES",
    "MAP_NAMES",
    "MAX_MODEL_COMPONENTS",
    "MAX_MODEL_SEGMENTS",
    "MODEL_KEYS",
    "MODEL_NAMES",
    "SEGMENT_OF",
    "FieldModel",
    "ModelTooLarge",
    "composite",
]

MODEL_NAMES: tuple[str, ...] = ("msh", "pid", "pv1", "obx", "obx_list")
MAP_NAMES: tuple[str, ...] = ("msh", "pid", "pv1", "obx")  # a map of strings each
LIST_NAMES: tuple[str, ...] = ("obx_list",)  # a list of such maps each
# Model name -> the id of the segment it reads.
SEGMENT_OF: dict[str, str] = {
    "msh": "MSH", "pid": "PID", "pv1": "PV1", "obx": "OBX", "obx_list": "OBX",
}

# Rules run on the reactor, so what they model is bounded: at most this many
# OBX segments in ``obx_list``, and this many components and subcomponents
# in a composite value (``pv1.assigned_location``, ``obx.value``...). Only the
# first repetition of any field is modelled. A message past a cap that a
# rule or filter would read gets AE: resent unchanged it would fail again.
MAX_MODEL_SEGMENTS = 1000
MAX_MODEL_COMPONENTS = 100


class ModelTooLarge(ValueError):
    """The message is larger than what the model reads (MAX_MODEL_*)."""


_STANDARD_SEPS = ("^", "&")


def composite(value: str, h: Header) -> str:
    """The first repetition with components joined by ^ and subcomponents
    by &, each unescaped, trailing empty components dropped."""
    if h.repetition_sep in value:
        value = value.split(h.repetition_sep, 1)[0]
    if value.count(h.component_sep) + value.count(h.subcomponent_sep) >= MAX_MODEL_COMPONENTS:
        raise ModelTooLarge(
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


Extractor = Callable[[Sequence[str], Header], str]


def _simple_at(n: int, c: int = 1) -> Extractor:
    return lambda seg, h: pick(seg[n], h, c) if n < len(seg) else ""


def _composite_at(n: int) -> Extractor:
    return lambda seg, h: composite(seg[n], h) if n < len(seg) else ""


def _whole_at(n: int) -> Extractor:
    return lambda seg, h: unescape(seg[n], h) if n < len(seg) else ""


def _person_name(seg: Sequence[str], h: Header) -> str:
    name = seg[5] if len(seg) > 5 else ""
    family = pick(name, h, 1, 1)  # XPN.1 is FN: its first part is the surname
    given = pick(name, h, 2)
    return f"{family}^{given}" if given else family


# Segment id -> model key -> how to read it. MSH is read from Header.fields,
# where fields[n] is MSH-n, like any other segment's fields[n].
FIELDS: dict[str, dict[str, Extractor]] = {
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
MODEL_KEYS = frozenset(key for keys in FIELDS.values() for key in keys)

_Pairs = tuple[tuple[str, Extractor], ...]


class FieldModel:
    """Reads the model names (and, per segment, the keys) that are needed."""

    def __init__(
        self, names: Iterable[str], keys: Mapping[str, frozenset[str] | None]
    ) -> None:
        """``names``: model names to build; ``keys``: segment id -> the keys
        some reader can observe (None: all of them)."""
        self.names = frozenset(names)
        extract: dict[str, _Pairs] = {
            seg: tuple(
                (key, fn) for key, fn in FIELDS[seg].items() if want is None or key in want
            )
            for seg, want in keys.items()
        }

        def wanted(name: str) -> _Pairs | None:
            return extract.get(SEGMENT_OF[name], ()) if name in self.names else None

        self._msh = wanted("msh")
        self._pid = wanted("pid")
        self._pv1 = wanted("pv1")
        self._obx = wanted("obx")
        self._obx_list = wanted("obx_list")
        self._segment_ids = frozenset(SEGMENT_OF[n] for n in self.names if n != "msh")

    def read(self, message: Message) -> dict[str, Any]:
        """Model name -> value for one message.

        Raises :class:`ModelTooLarge` past MAX_MODEL_SEGMENTS or
        MAX_MODEL_COMPONENTS.
        """
        h = message.header
        variables: dict[str, Any] = {}
        if self._msh is not None:
            fields = h.fields
            variables["msh"] = {key: fn(fields, h) for key, fn in self._msh}
        if not self._segment_ids:
            return variables
        fs = h.field_sep
        text = message.text
        pid = pv1 = None
        obx: list[list[str]] = []
        if self._obx_list is not None:
            # Every OBX is needed: one pass over all segments.
            wanted = self._segment_ids
            for line in split_segments(text):
                sid = line[:3]
                if sid not in wanted or line[3:4] not in (fs, ""):
                    continue
                if sid == "OBX":
                    if len(obx) == MAX_MODEL_SEGMENTS:
                        raise ModelTooLarge(
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
                pid = first_segment(text, "PID", fs)
            if self._pv1 is not None:
                pv1 = first_segment(text, "PV1", fs)
            if self._obx is not None and (first := first_segment(text, "OBX", fs)):
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
        return variables
