"""Which MSH-3/MSH-4 each client certificate may send as (MLLP_CLIENT_IDENTITIES).

The file is a YAML list; each entry names a certificate by its subject (RFC
4514, as logged in ``client_subject``) or by one of its SANs, and the sending
application (MSH-3) and facility (MSH-4) values it may use::

    - client: "CN=lab-analyser-1,O=General Hospital"
      msh3: [LAB]
      msh4: [GENHOSP]
    - client: "DNS:ris.hospital.internal"
      msh3: [RIS, PACS]
      msh4: ["*"]

A value is a whole HD (hierarchic designator) as the sender writes it with
the standard delimiters ``|^~\\&``: ``LAB`` matches ``LAB`` (and ``LAB^^``,
whose universal id and type are empty) but not ``LAB^1.2.3^ISO``, which must
be listed as such; ``*`` matches anything. A message whose MSH-1/MSH-2 are not
the standard delimiters is refused, so a sender cannot make ``LAB-2`` read as
``LAB`` by declaring ``-`` its component separator. A certificate may match
several entries; a message passes when one of them allows both its MSH-3 and
MSH-4.
"""

from __future__ import annotations

from dataclasses import dataclass

from mllpd.ack import REJECT, AckError
from mllpd.hl7 import Header

__all__ = ["ClientIdentities", "IdentityError", "load_identities"]


class IdentityError(ValueError):
    """The identities file cannot be read or has the wrong shape."""


# MSH-2 may carry the v2.7 truncation character after the four classic ones.
_STANDARD_ENCODING = ("^~\\&", "^~\\&#")


def _hd(value: str) -> str:
    """An HD as written, without trailing empty components (``LAB^^`` is ``LAB``)."""
    return value.rstrip("^")


def _matches(allowed: frozenset[str], field: str) -> bool:
    return "*" in allowed or _hd(field) in allowed


@dataclass(frozen=True)
class _Entry:
    msh3: frozenset[str]
    msh4: frozenset[str]


class ClientIdentities:
    """The parsed mapping, checked once per message."""

    def __init__(self, entries: dict[str, list[_Entry]]) -> None:
        self._entries = entries

    def __len__(self) -> int:
        return sum(len(v) for v in self._entries.values())

    def maps(self, names: frozenset[str]) -> bool:
        """Whether any of a certificate's names has an entry (may send as anyone)."""
        return any(name in self._entries for name in names)

    def check(self, names: frozenset[str], header: Header) -> tuple[str, AckError] | None:
        """None when one of the certificate's names may send as the message's
        MSH-3/MSH-4; otherwise AR with ERR 207 at MSH-3 (at MSH-2 when the
        message does not use the standard delimiters)."""
        if header.field_sep != "|" or header.encoding_chars not in _STANDARD_ENCODING:
            return REJECT, AckError(
                "207", "client identities need the standard HL7 delimiters", "MSH", 2
            )
        msh3, msh4 = header.field(3), header.field(4)
        for name in names:
            for entry in self._entries.get(name, ()):
                if _matches(entry.msh3, msh3) and _matches(entry.msh4, msh4):
                    return None
        return REJECT, AckError(
            "207", "MSH-3/MSH-4 not allowed for this client certificate", "MSH", 3
        )


def _values(entry: dict[str, object], key: str, where: str) -> frozenset[str]:
    value = entry.get(key)
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise IdentityError(f"{where}: {key} must be a non-empty list of strings")
    for v in value:
        if v != "*" and (not _hd(v) or v.count("^") > 2 or any(c in v for c in "|~\r\n")):
            raise IdentityError(
                f"{where}: {key} values must be an HD as written (e.g. LAB or LAB^1.2.3^ISO) or *"
            )
    return frozenset(v if v == "*" else _hd(v) for v in value)


def load_identities(path: str) -> ClientIdentities:
    """Read and check the file; :class:`IdentityError` with a one-line reason."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise IdentityError(f"cannot read {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise IdentityError(f"{path}: not valid YAML{where}") from None
    if not isinstance(data, list) or not data:
        raise IdentityError(f"{path}: expected a non-empty list of entries with client, msh3, msh4")
    entries: dict[str, list[_Entry]] = {}
    for n, item in enumerate(data, 1):
        where = f"{path}: entry {n}"
        if not isinstance(item, dict):
            raise IdentityError(f"{where}: expected a mapping with client, msh3, msh4")
        client = item.get("client")
        if not isinstance(client, str) or not client.strip():
            raise IdentityError(f"{where}: client must be a certificate subject or SAN")
        unknown = set(item) - {"client", "msh3", "msh4"}
        if unknown:
            raise IdentityError(f"{where}: unknown keys {sorted(unknown)}")
        entries.setdefault(client.strip(), []).append(
            _Entry(_values(item, "msh3", where), _values(item, "msh4", where))
        )
    return ClientIdentities(entries)
