"""Field names for a segment from hl7apy's reference tables.

Only the names are taken from hl7apy: building its element tree for a whole
message is slow and fails on messages that do not match its structures, but
an operator should still see any message the outbox holds.
"""

from __future__ import annotations

from functools import lru_cache

import hl7apy
from hl7apy.exceptions import HL7apyException

__all__ = ["field_names", "reference_version"]

# Used for messages whose MSH-12 hl7apy has no tables for.
FALLBACK_VERSION = "2.5"


def reference_version(version: str) -> str:
    """The hl7apy table version to name the fields of a message of ``version``."""
    v = version.strip()
    if v in hl7apy.SUPPORTED_LIBRARIES:
        return v
    # "2.5.1.1" or "2.3.1^USA": the longest supported prefix.
    for candidate in sorted(hl7apy.SUPPORTED_LIBRARIES, key=len, reverse=True):
        if v.startswith(candidate):
            return candidate
    return FALLBACK_VERSION


@lru_cache(maxsize=512)
def field_names(segment: str, version: str) -> dict[int, str]:
    """Field number -> lower-case hl7apy long name (``{5: "patient_name"}``)
    for a segment; empty for segments hl7apy does not know (Z-segments)."""
    try:
        reference = hl7apy.load_reference(segment, "Segment", reference_version(version))
    except (HL7apyException, KeyError, ValueError, ImportError):
        return {}
    names: dict[int, str] = {}
    # A segment reference is ("sequence", children); each child is
    # (name "PID_5", (kind, ..., datatype, LONG_NAME, table, length), ...).
    for child in reference[1]:
        name, spec = child[0], child[1]
        prefix, _, number = name.rpartition("_")
        if prefix != segment or not number.isdigit() or len(spec) < 4:
            continue
        long_name = spec[3]
        if isinstance(long_name, str) and long_name:
            names[int(number)] = long_name.lower()
    return names
