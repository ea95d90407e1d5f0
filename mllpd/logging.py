"""JSON-line log events on stdout, each carrying the pod's name and namespace.

Events carry named fields (peer, control_id, msg_type, size, code); message
content is never a field, so it can never reach a log line.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from typing import IO, Any

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
)
from zope.interface import provider

__all__ = ["LEVELS", "json_observer"]

LEVELS = {
    "trace": LogLevel.debug,
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
}

_SCALARS = (str, int, float, bool, type(None))
_LEVEL_SET = frozenset(LogLevel.iterconstants())


def _event_record(event: dict[str, Any], pod: str | None, namespace: str | None) -> dict[str, Any]:
    level = event.get("log_level")
    record: dict[str, Any] = {
        "time": datetime.fromtimestamp(event.get("log_time", 0), UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z"),
        # LogLevel's members are NamedConstants, not LogLevel instances.
        "level": level.name if level in _LEVEL_SET and level is not None else "info",
        "logger": event.get("log_namespace", "-"),
        "msg": formatEvent(event),
        "pod": pod,
        "pod_namespace": namespace,
    }
    for key, value in event.items():
        if key.startswith("log_") or key in record or key in ("format", "message", "system", "time", "isError"):
            continue
        if isinstance(value, _SCALARS):
            record[key] = value
    failure = event.get("log_failure")
    if failure is not None:
        record["error_type"] = failure.type.__name__ if failure.type else "?"
        record["traceback"] = failure.getTraceback()
    return record


def json_observer(
    out: IO[str] | None = None,
    level: str = "info",
    pod: str | None = None,
    namespace: str | None = None,
) -> ILogObserver:
    """An observer writing one JSON object per line, filtered by level."""
    stream = out if out is not None else sys.stdout

    @provider(ILogObserver)
    def write(event: dict[str, Any]) -> None:
        line = json.dumps(_event_record(event, pod, namespace), default=str)
        stream.write(line + "\n")
        stream.flush()

    predicate = LogLevelFilterPredicate(defaultLogLevel=LEVELS[level])
    return FilteringLogObserver(write, [predicate])


def format_peer(address: Any) -> str:
    """How a peer is named in logs and audit records: ``host:port``,
    ``[v6 host]:port``, or the address as text when it has no host."""
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is None:
        return str(address)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
