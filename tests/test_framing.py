"""MLLP framing: frames split, pipelined, junk, oversized (SPEC section 4)."""

from __future__ import annotations

from collections.abc import Iterable

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mllpd.framing import (
    END_BLOCK,
    SALVAGE_BYTES,
    START_BLOCK,
    Event,
    Frame,
    Framer,
    Junk,
    Oversized,
    frame,
)

MSG_A = b"MSH|^~\\&|LAB|HOSP|GW|DEST|20240101120000||ADT^A01|A1|P|2.5\rPID|1||111\r"
MSG_B = b"MSH|^~\\&|LAB|HOSP|GW|DEST|20240101120001||ADT^A08|B2|P|2.5\rPID|1||222\r"
MSG_C = b"MSH|^~\\&|LAB|HOSP|GW|DEST|20240101120002||ORU^R01|C3|P|2.5\rOBX|1|ST|X||y\r"


def payloads(events: Iterable[Event]) -> list[bytes]:
    return [e.payload for e in events if isinstance(e, Frame)]


def junk_total(events: Iterable[Event]) -> int:
    return sum(e.size for e in events if isinstance(e, Junk))


def feed_chunks(framer: Framer, chunks: Iterable[bytes]) -> list[Event]:
    events: list[Event] = []
    for chunk in chunks:
        events.extend(framer.feed(chunk))
    return events


def split_at(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    points = sorted({c for c in cuts if 0 < c < len(data)})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


class FrameTests(SynchronousTestCase):
    """Whole, split and pipelined frames."""

    def test_frame_wraps_payload(self) -> None:
        """frame() puts 0x0B before and 0x1C 0x0D after the payload."""
        self.assertEqual(frame(b"MSH|x"), b"\x0bMSH|x\x1c\x0d")
        self.assertEqual(START_BLOCK, b"\x0b")
        self.assertEqual(END_BLOCK, b"\x1c\x0d")

    def test_single_frame(self) -> None:
        """One frame in one read yields exactly its payload."""
        framer = Framer(1024)
        self.assertEqual(framer.feed(frame(MSG_A)), [Frame(MSG_A)])
        self.assertFalse(framer.in_frame)
        self.assertEqual(framer.buffered, 0)

    def test_frame_split_at_every_position(self) -> None:
        """A frame split into two reads at any byte yields the payload once."""
        data = frame(MSG_A)
        for cut in range(1, len(data)):
            framer = Framer(1024)
            first = framer.feed(data[:cut])
            self.assertEqual(first, [], f"cut at {cut}")
            self.assertEqual(framer.feed(data[cut:]), [Frame(MSG_A)], f"cut at {cut}")

    def test_frame_byte_by_byte(self) -> None:
        """A frame arriving one byte per read yields the payload on the last byte only."""
        framer = Framer(1024)
        data = frame(MSG_A)
        events = [framer.feed(data[i : i + 1]) for i in range(len(data))]
        self.assertEqual(events[-1], [Frame(MSG_A)])
        self.assertEqual([e for e in events[:-1] if e], [])

    def test_pipelined_frames_in_one_read(self) -> None:
        """Several frames in one read come out in order, none merged."""
        framer = Framer(1024)
        events = framer.feed(frame(MSG_A) + frame(MSG_B) + frame(MSG_C))
        self.assertEqual(events, [Frame(MSG_A), Frame(MSG_B), Frame(MSG_C)])
        self.assertEqual(framer.frames_started, 3)

    def test_pipelined_frames_with_split_tail(self) -> None:
        """A read ending mid-frame delivers the finished frames and keeps the rest."""
        framer = Framer(1024)
        data = frame(MSG_A) + frame(MSG_B)
        cut = len(frame(MSG_A)) + 10
        self.assertEqual(framer.feed(data[:cut]), [Frame(MSG_A)])
        self.assertTrue(framer.in_frame)
        self.assertEqual(framer.feed(data[cut:]), [Frame(MSG_B)])

    def test_empty_payload(self) -> None:
        """An empty frame is delivered as an empty payload, not silently dropped."""
        framer = Framer(1024)
        self.assertEqual(framer.feed(b"\x0b\x1c\x0d"), [Frame(b"")])


class EndBlockTests(SynchronousTestCase):
    """The 0x1C 0x0D end block, alone and split."""

    def test_fs_without_cr_is_payload(self) -> None:
        """A 0x1C not followed by 0x0D stays in the payload."""
        payload = b"MSH|^~\\&|A\x1cB|C\x1cD\rPID|1\r\x1c"
        framer = Framer(1024)
        self.assertEqual(framer.feed(frame(payload)), [Frame(payload)])

    def test_end_block_split_across_reads(self) -> None:
        """0x1C at the end of one read and 0x0D at the start of the next end the frame."""
        framer = Framer(1024)
        self.assertEqual(framer.feed(b"\x0b" + MSG_A + b"\x1c"), [])
        self.assertTrue(framer.in_frame)
        self.assertEqual(framer.feed(b"\x0d" + frame(MSG_B)), [Frame(MSG_A), Frame(MSG_B)])

    def test_trailing_fs_then_other_byte_is_payload(self) -> None:
        """0x1C at the end of a read followed by something other than 0x0D is payload."""
        framer = Framer(1024)
        self.assertEqual(framer.feed(b"\x0bMSH|a\x1c"), [])
        self.assertEqual(framer.feed(b"b\x1c\x0d"), [Frame(b"MSH|a\x1cb")])

    def test_payload_ending_in_fs(self) -> None:
        """A payload whose last byte is 0x1C keeps it (0x1C 0x1C 0x0D)."""
        framer = Framer(1024)
        self.assertEqual(framer.feed(b"\x0bMSH|a\x1c\x1c\x0d"), [Frame(b"MSH|a\x1c")])

    def test_cr_alone_does_not_end_frame(self) -> None:
        """Segment CRs inside the payload never end the frame."""
        framer = Framer(1024)
        self.assertEqual(framer.feed(b"\x0b" + MSG_A), [])
        self.assertTrue(framer.in_frame)


class JunkTests(SynchronousTestCase):
    """Bytes outside frames are discarded and counted, never glued to a message."""

    def test_junk_before_first_frame(self) -> None:
        """Bytes before the start block are reported as junk and not in the payload."""
        framer = Framer(1024)
        events = framer.feed(b"GET / HTTP/1.0\r\n" + frame(MSG_A))
        self.assertEqual(events, [Junk(16), Frame(MSG_A)])

    def test_junk_between_frames(self) -> None:
        """A stray LF after an end block is junk; the next frame is unaffected."""
        framer = Framer(1024)
        events = framer.feed(frame(MSG_A) + b"\n" + frame(MSG_B) + b"\r\n\r\n" + frame(MSG_C))
        self.assertEqual(payloads(events), [MSG_A, MSG_B, MSG_C])
        self.assertEqual(junk_total(events), 5)

    def test_junk_in_separate_read(self) -> None:
        """Junk arriving in its own read is counted at once and not buffered."""
        framer = Framer(1024)
        self.assertEqual(framer.feed(b"hello"), [Junk(5)])
        self.assertEqual(framer.buffered, 0)
        self.assertFalse(framer.in_frame)
        self.assertEqual(framer.feed(frame(MSG_A)), [Frame(MSG_A)])

    def test_unbounded_junk_is_not_buffered(self) -> None:
        """A client sending megabytes without a start block does not grow memory."""
        framer = Framer(1024)
        for _ in range(64):
            self.assertEqual(framer.feed(b"x" * 65536), [Junk(65536)])
            self.assertEqual(framer.buffered, 0)

    def test_start_block_inside_unfinished_frame(self) -> None:
        """A start byte inside an unfinished frame abandons it; the new frame is whole."""
        framer = Framer(1024)
        events = framer.feed(b"\x0bMSH|partial" + frame(MSG_B))
        self.assertEqual(events, [Junk(len(b"MSH|partial")), Frame(MSG_B)])
        self.assertEqual((framer.frames_started, framer.restarts), (1, 1))

    def test_start_block_inside_unfinished_frame_next_read(self) -> None:
        """A restart arriving in a later read also abandons the partial frame."""
        framer = Framer(1024)
        self.assertEqual(framer.feed(b"\x0bMSH|partial"), [])
        events = framer.feed(frame(MSG_B))
        self.assertEqual(payloads(events), [MSG_B])
        self.assertEqual(junk_total(events), len(b"MSH|partial"))

    def test_end_block_outside_frame_is_junk(self) -> None:
        """An end block with no frame open is junk, not an empty message."""
        framer = Framer(1024)
        events = framer.feed(b"\x1c\x0d" + frame(MSG_A) + b"\x1c\x0d")
        self.assertEqual(payloads(events), [MSG_A])
        self.assertEqual(junk_total(events), 4)


class StateTests(SynchronousTestCase):
    """in_frame, frames_started and partial_head."""

    def test_in_frame_follows_start_and_end(self) -> None:
        """in_frame is true only between a start byte and its end block."""
        framer = Framer(1024)
        self.assertFalse(framer.in_frame)
        framer.feed(b"junk")
        self.assertFalse(framer.in_frame)
        framer.feed(b"\x0b")
        self.assertTrue(framer.in_frame)
        framer.feed(MSG_A)
        self.assertTrue(framer.in_frame)
        framer.feed(END_BLOCK)
        self.assertFalse(framer.in_frame)

    def test_frames_started_counts_start_bytes(self) -> None:
        """frames_started counts every frame begun after the last one ended, finished or not."""
        framer = Framer(1024)
        self.assertEqual(framer.frames_started, 0)
        framer.feed(frame(MSG_A) + frame(MSG_B))
        self.assertEqual(framer.frames_started, 2)
        framer.feed(b"\x0bMSH")
        self.assertEqual(framer.frames_started, 3)

    def test_partial_head(self) -> None:
        """partial_head gives the unfinished frame's bytes, and nothing between frames."""
        framer = Framer(1024)
        self.assertEqual(framer.partial_head(), b"")
        framer.feed(b"\x0b" + MSG_A[:20])
        self.assertEqual(framer.partial_head(), MSG_A[:20])
        framer.feed(MSG_A[20:] + END_BLOCK)
        self.assertEqual(framer.partial_head(), b"")

    def test_partial_head_is_capped(self) -> None:
        """partial_head of a large unfinished frame is at most SALVAGE_BYTES long."""
        framer = Framer(10 * SALVAGE_BYTES)
        framer.feed(b"\x0b" + MSG_A + b"x" * (3 * SALVAGE_BYTES))
        head = framer.partial_head()
        self.assertEqual(len(head), SALVAGE_BYTES)
        self.assertTrue(head.startswith(MSG_A))


class OversizedTests(SynchronousTestCase):
    """Frames larger than the limit: Oversized with the salvaged head, framer spent."""

    def test_frame_at_limit_is_accepted(self) -> None:
        """A payload of exactly max_size bytes is delivered."""
        payload = MSG_A + b"x" * (100 - len(MSG_A))
        framer = Framer(100)
        self.assertEqual(framer.feed(frame(payload)), [Frame(payload)])

    def test_frame_at_limit_split_is_accepted(self) -> None:
        """A max_size payload whose end block is split across reads is delivered."""
        payload = MSG_A + b"x" * (100 - len(MSG_A))
        framer = Framer(100)
        self.assertEqual(framer.feed(b"\x0b" + payload + b"\x1c"), [])
        self.assertEqual(framer.feed(b"\x0d"), [Frame(payload)])

    def test_complete_frame_too_large(self) -> None:
        """A complete frame one byte over the limit is Oversized, with its MSH kept."""
        payload = MSG_A + b"x" * (101 - len(MSG_A))
        framer = Framer(100)
        events = framer.feed(frame(payload))
        self.assertEqual(len(events), 1)
        self.assertIsInstance(events[0], Oversized)
        assert isinstance(events[0], Oversized)
        self.assertTrue(events[0].head.startswith(MSG_A))
        self.assertTrue(framer.broken)
        self.assertFalse(framer.in_frame)

    def test_oversized_head_has_only_that_frame(self) -> None:
        """The salvaged head of a complete oversized frame holds no end block or later frame."""
        payload = MSG_A + b"x" * 200
        framer = Framer(100)
        events = framer.feed(frame(payload) + frame(MSG_B))
        self.assertEqual(events, [Oversized(payload)])

    def test_end_never_arrives(self) -> None:
        """A frame that keeps growing past the limit is cut off once, without its end."""
        framer = Framer(1000)
        events = framer.feed(b"\x0b" + MSG_A)
        for _ in range(20):
            events += framer.feed(b"y" * 100)
        oversized = [e for e in events if isinstance(e, Oversized)]
        self.assertEqual(len(oversized), 1)
        self.assertEqual(events, oversized)
        self.assertTrue(oversized[0].head.startswith(MSG_A))
        self.assertTrue(framer.broken)
        self.assertEqual(framer.buffered, 0)

    def test_buffer_bounded_while_waiting(self) -> None:
        """Before the cut-off the framer holds at most max_size + 1 bytes."""
        framer = Framer(1000)
        framer.feed(b"\x0b")
        while not framer.broken:
            framer.feed(b"z" * 7)
            self.assertLessEqual(framer.buffered, 1001)

    def test_salvaged_head_is_capped(self) -> None:
        """The salvaged head of a huge frame is at most SALVAGE_BYTES and starts with MSH."""
        framer = Framer(4 * SALVAGE_BYTES)
        events = framer.feed(b"\x0b" + MSG_A + b"x" * (8 * SALVAGE_BYTES))
        self.assertEqual(len(events), 1)
        assert isinstance(events[0], Oversized)
        self.assertEqual(len(events[0].head), SALVAGE_BYTES)
        self.assertTrue(events[0].head.startswith(MSG_A))

    def test_frames_before_oversized_are_delivered(self) -> None:
        """Frames completed in the same read before an oversized one still come out."""
        framer = Framer(200)
        events = framer.feed(frame(MSG_A) + frame(MSG_B + b"x" * 300) + frame(MSG_C))
        self.assertEqual(events[0], Frame(MSG_A))
        self.assertEqual(len(events), 2)
        self.assertIsInstance(events[1], Oversized)

    def test_spent_framer_ignores_input(self) -> None:
        """After Oversized, later bytes (even valid frames) produce no events."""
        framer = Framer(50)
        framer.feed(b"\x0b" + b"x" * 100)
        self.assertTrue(framer.broken)
        self.assertEqual(framer.feed(frame(b"MSH|ok")), [])
        self.assertEqual(framer.feed(b"junk"), [])
        self.assertEqual(framer.buffered, 0)


# Payloads never hold a start byte or an end block; junk never holds a start byte.
_payload = st.binary(max_size=300).filter(lambda b: START_BLOCK not in b and END_BLOCK not in b)
_junk = st.binary(max_size=20).map(lambda b: b.replace(START_BLOCK, b""))
_streams = st.lists(st.tuples(_junk, _payload), max_size=8).flatmap(
    lambda parts: st.tuples(st.just(parts), _junk)
)


def build_stream(parts: list[tuple[bytes, bytes]], tail: bytes) -> bytes:
    return b"".join(junk + frame(payload) for junk, payload in parts) + tail


class FramerPropertyTests(SynchronousTestCase):
    """Hypothesis properties: any split gives the same messages; no input raises."""

    @settings(deadline=None, max_examples=300)
    @given(stream=_streams, cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=40))
    def test_any_split_same_payloads(
        self, stream: tuple[list[tuple[bytes, bytes]], bytes], cuts: list[int]
    ) -> None:
        """Any split of a stream of frames and junk yields the same payloads in order."""
        parts, tail = stream
        data = build_stream(parts, tail)
        expected = [payload for _, payload in parts]
        junk = sum(len(j) for j, _ in parts) + len(tail)

        whole = Framer(1024).feed(data)
        self.assertEqual(payloads(whole), expected)
        self.assertEqual(junk_total(whole), junk)

        split = feed_chunks(Framer(1024), split_at(data, cuts))
        self.assertEqual(payloads(split), expected)
        self.assertEqual(junk_total(split), junk)
        self.assertFalse(any(isinstance(e, Oversized) for e in split))

    @settings(deadline=None, max_examples=300)
    @given(stream=_streams)
    def test_byte_by_byte_same_payloads(self, stream: tuple[list[tuple[bytes, bytes]], bytes]) -> None:
        """Feeding a stream one byte at a time yields the same payloads as feeding it whole."""
        parts, tail = stream
        data = build_stream(parts, tail)
        framer = Framer(1024)
        events = feed_chunks(framer, (data[i : i + 1] for i in range(len(data))))
        self.assertEqual(payloads(events), [payload for _, payload in parts])

    @settings(deadline=None, max_examples=500)
    @given(
        data=st.binary(max_size=2000),
        cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=30),
        max_size=st.integers(min_value=0, max_value=300),
    )
    def test_feed_never_raises(self, data: bytes, cuts: list[int], max_size: int) -> None:
        """Arbitrary bytes never raise, memory stays bounded, nothing follows Oversized."""
        framer = Framer(max_size)
        events: list[Event] = []
        for chunk in split_at(data, cuts):
            events.extend(framer.feed(chunk))
            self.assertLessEqual(framer.buffered, max_size + 1)
        for i, event in enumerate(events):
            self.assertIsInstance(event, Frame | Junk | Oversized)
            if isinstance(event, Frame):
                self.assertLessEqual(len(event.payload), max_size)
                self.assertNotIn(START_BLOCK, event.payload)
            if isinstance(event, Oversized):
                self.assertEqual(i, len(events) - 1)

    @settings(deadline=None, max_examples=300)
    @given(
        data=st.binary(max_size=2000),
        cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=30),
    )
    def test_arbitrary_bytes_any_split_same_events(self, data: bytes, cuts: list[int]) -> None:
        """For arbitrary bytes under the limit, a split stream gives the same frames and junk."""
        whole = Framer(4096).feed(data)
        split = feed_chunks(Framer(4096), split_at(data, cuts))
        self.assertEqual(payloads(split), payloads(whole))
        self.assertEqual(junk_total(split), junk_total(whole))


class _CountingBuffer(bytearray):
    """A bytearray that counts how many bytes ``find`` is asked to search."""

    scanned = 0

    def find(self, sub: bytes, start: int | None = None, end: int | None = None) -> int:  # type: ignore[override]
        begin = 0 if start is None else start
        _CountingBuffer.scanned += max(len(self) - begin, 0)
        return super().find(sub, begin, len(self) if end is None else end)


class LinearScanTests(SynchronousTestCase):
    """A big frame arriving in tiny reads is scanned once, not once per read."""

    def test_scan_work_is_linear(self) -> None:
        """Bytes searched for a 200 KB frame fed byte by byte stay proportional to its size."""
        payload = MSG_A + b"\x1cA" * (100 * 1024)
        data = frame(payload)
        framer = Framer(2 * 1024 * 1024)
        # White-box: swap in a counting buffer (same type) to measure the scan.
        _CountingBuffer.scanned = 0
        framer._buf = _CountingBuffer()
        events: list[Event] = []
        for i in range(len(data)):
            events.extend(framer.feed(data[i : i + 1]))
        self.assertEqual(events, [Frame(payload)])
        self.assertLess(_CountingBuffer.scanned, 8 * len(data))

    def test_big_frame_with_fs_bytes_byte_by_byte(self) -> None:
        """A 200 KB payload full of lone 0x1C bytes, fed byte by byte, is delivered intact."""
        payload = MSG_A + b"\x1cA" * (100 * 1024)
        data = frame(payload)
        framer = Framer(2 * 1024 * 1024)
        events: list[Event] = []
        for i in range(len(data)):
            events.extend(framer.feed(data[i : i + 1]))
        self.assertEqual(events, [Frame(payload)])
