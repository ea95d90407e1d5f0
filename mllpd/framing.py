"""MLLP framing: bytes in, whole payloads out. No Twisted, no I/O.

A frame is ``0x0B payload 0x1C 0x0D``. Bytes outside a frame are junk: they
are counted and dropped, never glued to a message. A start byte inside an
unfinished frame abandons that frame (counted as junk) and starts a new one,
since 0x0B never occurs in HL7 text; it is a restart, not a new frame, so
the frame timeout still runs from the first start byte.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "END_BLOCK",
    "START_BLOCK",
    "Frame",
    "Framer",
    "Junk",
    "Oversized",
    "frame",
]

START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c\x0d"

# How much of an oversized frame is kept so a NAK can echo its MSH.
SALVAGE_BYTES = 8192


@dataclass(frozen=True)
class Frame:
    """A complete payload, without the block characters."""

    payload: bytes


@dataclass(frozen=True)
class Junk:
    """Bytes that were discarded because they were outside any frame."""

    size: int


@dataclass(frozen=True)
class Oversized:
    """A frame grew past the limit. ``head`` is its first bytes, for a NAK."""

    head: bytes


Event = Frame | Junk | Oversized


def frame(payload: bytes) -> bytes:
    """Wrap a payload in MLLP block characters."""
    return START_BLOCK + payload + END_BLOCK


class Framer:
    """Incremental MLLP decoder.

    ``feed`` returns the events its bytes complete. After an
    :class:`Oversized` event the framer is spent: the connection must close,
    since the rest of the stream can no longer be trusted to line up.
    """

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._buf = bytearray()
        self._in_frame = False
        # Where to resume the search for END_BLOCK, so a frame that arrives in
        # many reads is scanned once, not once per read.
        self._scan = 0
        self.broken = False
        # Frames begun outside a frame; start bytes inside one are restarts.
        self.frames_started = 0
        self.restarts = 0

    @property
    def in_frame(self) -> bool:
        """True while a frame has started and not ended."""
        return self._in_frame

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def partial_head(self) -> bytes:
        """The start of the frame in progress (for a NAK on timeout)."""
        return bytes(self._buf[:SALVAGE_BYTES]) if self._in_frame else b""

    def feed(self, data: bytes) -> list[Event]:
        if self.broken:
            return []
        events: list[Event] = []
        buf = self._buf
        buf += data
        while buf:
            if not self._in_frame:
                start = buf.find(START_BLOCK)
                if start < 0:
                    events.append(Junk(len(buf)))
                    buf.clear()
                    break
                if start:
                    events.append(Junk(start))
                del buf[: start + 1]
                self._in_frame = True
                self._scan = 0
                self.frames_started += 1
                continue
            restart = buf.find(START_BLOCK, self._scan)
            end = buf.find(END_BLOCK, self._scan)
            if restart >= 0 and (end < 0 or restart < end):
                events.append(Junk(restart))
                del buf[: restart + 1]
                self._scan = 0
                self.restarts += 1
                continue
            if end < 0:
                # Keep a trailing 0x1C: its 0x0D may be in the next read.
                self._scan = max(len(buf) - 1, 0)
                if len(buf) > self.max_size + 1:
                    events.append(self._overflow())
                break
            if end > self.max_size:
                events.append(self._overflow(end))
                break
            events.append(Frame(bytes(buf[:end])))
            del buf[: end + len(END_BLOCK)]
            self._in_frame = False
            self._scan = 0
        return events

    def _overflow(self, end: int = SALVAGE_BYTES) -> Oversized:
        head = bytes(self._buf[: min(end, SALVAGE_BYTES)])
        self._buf = bytearray()
        self._in_frame = False
        self.broken = True
        return Oversized(head)
