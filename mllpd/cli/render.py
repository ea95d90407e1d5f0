"""How mllp-cli shows outbox content, in its commands and in its terminal UI:
sender text made safe to print, ages, timestamps, one message field by field.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

from mllpd.cli.store import MessageDetail

__all__ = ["format_age", "plain", "render_message", "timestamp"]

# What a sender could use to write to the operator's terminal rather than
# show text: C0 and C1 controls (ESC starts terminal escape sequences), DEL,
# and the invisible Unicode characters that reorder or hide text (bidi
# overrides and isolates, zero-width characters, line separators, BOM).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")


def _visible(m: re.Match[str]) -> str:
    code = ord(m.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def plain(text: str) -> str:
    """Sender text made safe to print: every control or invisible formatting
    character shown as a ``\\xNN``/``\\uNNNN`` escape. Markup is never
    interpreted anywhere it is shown (the TUI passes it as plain Text)."""
    return _UNSAFE.sub(_visible, text)


def format_age(seconds: float | None) -> str:
    """A short age: ``45s``, ``12m``, ``3h5m``, ``2d4h``; ``-`` for none."""
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        h, m = divmod(s // 60, 60)
        return f"{h}h{m}m" if m else f"{h}h"
    d, h = divmod(s // 3600, 24)
    return f"{d}d{h}h" if h else f"{d}d"


def timestamp(t: float) -> str:
    """Unix seconds as an ISO 8601 UTC time to the second."""
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def render_message(detail: MessageDetail, now: float) -> list[str]:
    """The lines ``show`` prints: what is known, then each segment followed by
    its non-empty fields named from hl7apy."""
    d = detail
    lines = [
        f"message     {d.message_id}",
        f"received    {timestamp(d.received_at)} ({format_age(now - d.received_at)} ago)"
        f" from {d.peer}",
        f"type        {d.msg_type}   control id {d.control_id}   version {d.version}",
        f"charset     {d.charset or '-'}   size {d.size} bytes   ACK {d.ack_code}",
        f"sha256      {d.sha256}",
    ]
    if d.batch_position is not None:
        lines.append(
            f"batch       control id {d.batch_control_id or '-'}   position {d.batch_position}"
        )
    if not d.deliveries:
        lines.append("queues      (not routed to any connector)")
    for i, q in enumerate(d.deliveries):
        label = "queues      " if i == 0 else "            "
        text = f"{q.connector}: {q.state}, {q.attempts} attempts"
        if q.last_error:
            text += f", last error: {q.last_error}"
        lines.append(label + text)
    lines.append("")
    for segment in d.segments():
        lines.append(segment.text)
        for f in segment.fields:
            lines.append(f"    {f.label()}: {f.value}")
    return [plain(line) for line in lines]
