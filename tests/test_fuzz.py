"""Stateful fuzzing of the MLLP protocol (hypothesis): hostile senders
against the real protocol, factory and receiver, with a Clock.

Several connections get, in any order: whole frames with random MSH fields
and delimiters, split at random points; junk; lone start bytes; unfinished
and oversized frames; commits and failed commits; clock jumps; ACK readers
that stop reading; closes at any point. After every step:

- every ACK is one intact frame (no 0x0B or 0x1C inside);
- the replies on a connection are, in order, those of its complete frames;
  fewer (or one more, the NAK of a frame that failed) only when the
  connection was closed, and then with a logged reason;
- nothing is logged with a traceback;
- the bytes held (``factory.buffered``) stay within MLLP_MAX_BUFFER plus one
  read, and go back to zero once every connection is gone.

The short profile runs with the tests; ``bench/fuzz.py --minutes N`` runs
the same machine for longer.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from typing import Any, cast

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from mllpd.protocol import MLLPServerFactory, MLLPServerProtocol
from mllpd.receiver import Receiver
from mllpd.testing import MemoryOutbox

MAX_FRAME = 4096
MAX_BUFFER = 16384
READ = 1024  # the largest chunk handed to dataReceived, as a socket read would be
CLOSE_REASONS = frozenset({"oversized", "frame_timeout", "idle_timeout", "write_timeout"})

_DELIMS = "|^~\\&#!$%*+/:;=?@"
_FIELD_CHARS = st.text(
    alphabet=st.one_of(
        st.sampled_from(string.ascii_letters + string.digits + " .-_"),
        st.sampled_from("\x1c\x00\x7f\t"),
        st.characters(min_codepoint=0xA0, max_codepoint=0x2FFF),
        st.sampled_from(_DELIMS),
    ),
    max_size=12,
)
_LONG_FIELD = st.integers(min_value=190, max_value=260).map(lambda n: "L" * n)


class _Transport(StringTransport):
    write_closed = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True


@dataclass
class _Conn:
    proto: MLLPServerProtocol
    transport: _Transport
    inbox: list[bytes] = field(default_factory=list)  # sent, not yet read by the server
    expected: list[str | None] = field(default_factory=list)  # MSA-2 per complete frame
    client_closed: bool = False
    lost: bool = False
    last_frame_at: float = 0.0  # clock time of its last complete frame (or connect)
    # The sender's own view of its byte stream (MLLP as written, not the
    # server's framer): inside a frame, and whether the last byte was 0x1C.
    in_frame: bool = False
    after_fs: bool = False


def _frames_completed(c: _Conn, data: bytes) -> int:
    """How many frames ``data`` ends, as MLLP defines them: 0x0B starts (or
    restarts) a frame, 0x1C 0x0D inside one ends it."""
    done = 0
    for b in data:
        if b == 0x0B:
            c.in_frame, c.after_fs = True, False
        elif c.in_frame and c.after_fs and b == 0x0D:
            c.in_frame, c.after_fs = False, False
            done += 1
        elif c.in_frame:
            c.after_fs = b == 0x1C
    return done


@st.composite
def messages(draw: st.DrawFn, control_id: str) -> bytes:
    """An HL7 message whose MSH-10 is ``control_id``: random delimiters and
    fields (never the field separator, CR, LF or 0x0B inside a field)."""
    fs = draw(st.sampled_from(_DELIMS))
    rest = [c for c in _DELIMS if c != fs]
    enc = "".join(draw(st.permutations(rest))[: draw(st.integers(1, 5))])
    fields = {
        n: draw(st.one_of(_FIELD_CHARS, _LONG_FIELD) if draw(st.integers(0, 9)) == 0 else _FIELD_CHARS)
        for n in range(3, 22)
    }
    fields[9] = draw(st.sampled_from(["ADT", "ORU", "adt", "A-B", "X" * 20, ""])) + (
        enc[0] + "A01" if enc else ""
    )
    fields[10] = control_id
    fields[12] = draw(st.sampled_from(["2.5", "2.3", "2.8", "3.0", "", "x"]))
    fields[15] = draw(st.sampled_from(["", "AL"]))
    fields[18] = draw(st.sampled_from(["", "", "UNICODE UTF-8", "8859/1", "UNICODE UTF-16", "KLINGON"]))
    last = draw(st.integers(12, 21))
    cleaned = {n: v.replace(fs, "") for n, v in fields.items() if n <= last}
    cleaned[10] = control_id
    msh = f"MSH{fs}{enc}" + "".join(fs + cleaned[n] for n in range(3, last + 1))
    body = draw(st.sampled_from(["", f"PID{fs}1{fs}{fs}123\r", f"OBX{fs}1{fs}NM\r" * 3]))
    payload = (msh + "\r" + body).encode("utf-8")
    return payload.replace(b"\x1c\r", b"\x1c ").replace(b"\x0b", b"")


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    chunks = [data[a:b] for a, b in zip(points, points[1:], strict=False) if b > a]
    return [c[i : i + READ] for c in chunks for i in range(0, len(c), READ)]


def _replies(data: bytes) -> list[str]:
    """MSA-2 of every ACK written, checking that each is one intact frame."""
    out = []
    while data:
        assert data[:1] == b"\x0b", data[:40]
        end = data.find(b"\x1c\x0d")
        assert end > 0, data[:80]
        payload = data[1:end]
        assert b"\x0b" not in payload and b"\x1c" not in payload, payload[:200]
        text = payload.decode("latin-1")
        fs = text[3]
        msa = next(s for s in text.split("\r") if s.startswith("MSA" + fs))
        out.append(msa.split(fs)[2])
        data = data[end + 2 :]
    return out


class ProtocolMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.outbox = MemoryOutbox(hold=True)
        self.factory = MLLPServerFactory(
            Receiver(self.outbox, self.clock), self.clock,
            max_frame_size=MAX_FRAME, max_buffer=MAX_BUFFER,
            idle_timeout=30.0, frame_timeout=60.0, write_timeout=5.0,
        )
        self.conns: list[_Conn] = []
        self.events: list[dict[str, Any]] = []
        self._observer = cast(ILogObserver, self.events.append)
        globalLogPublisher.addObserver(self._observer)
        self.next_id = 0

    def teardown(self) -> None:
        try:
            for _ in range(1000):
                if not self.outbox.waiting:
                    break
                self.outbox.commit()
                self._pump()
            self._check(final=True)
            for c in self.conns:
                self._lose(c)
            assert self.factory.buffered == 0, self.factory.buffered
        finally:
            globalLogPublisher.removeObserver(self._observer)

    # -- driving -----------------------------------------------------------------

    def _lose(self, c: _Conn) -> None:
        if not c.lost:
            c.lost = True
            c.proto.connectionLost(Failure(ConnectionDone()))

    def _pump(self) -> None:
        """Deliver what senders wrote while their transport reads; lose the
        connections the server closed."""
        for _ in range(100):
            moved = False
            for c in self.conns:
                if c.lost:
                    continue
                if c.transport.disconnecting:
                    self._lose(c)
                    moved = True
                    continue
                if c.inbox and c.transport.producerState == "producing":
                    c.proto.dataReceived(c.inbox.pop(0))
                    moved = True
            if not moved:
                return

    def _open(self) -> list[_Conn]:
        return [c for c in self.conns if not c.lost and not c.client_closed]

    def _send(self, c: _Conn, data: bytes, cuts: list[int], own: int = 0) -> None:
        """Send ``data``; ``own`` frames in it are already expected. Frames
        that bytes of several rules complete together (a trickled 0x0B, a
        0x1C, then junk starting with CR) owe a reply too: any reply."""
        surplus = _frames_completed(c, data) - own
        if surplus > 0:
            at = len(c.expected) - own
            c.expected[at:at] = [None] * surplus
            c.last_frame_at = self.clock.seconds()
        c.inbox.extend(_split(data, cuts))
        self._pump()

    # -- rules ---------------------------------------------------------------------

    @precondition(lambda self: len(self.conns) < 4)
    @rule()
    def connect(self) -> None:
        port = 40000 + len(self.conns)
        proto = self.factory.buildProtocol(IPv4Address("TCP", "10.0.0.1", port))
        assert isinstance(proto, MLLPServerProtocol)
        transport = _Transport(peerAddress=IPv4Address("TCP", "10.0.0.1", port))
        proto.makeConnection(transport)
        self.conns.append(_Conn(proto, transport, last_frame_at=self.clock.seconds()))

    @precondition(lambda self: bool(self._open()))
    @rule(data=st.data(), cuts=st.lists(st.integers(0, 10_000), max_size=6))
    def send_frame(self, data: st.DataObject, cuts: list[int]) -> None:
        c = data.draw(st.sampled_from(self._open()))
        self.next_id += 1
        cid = f"C{self.next_id}"
        payload = data.draw(messages(cid))
        c.expected.append(cid)
        c.last_frame_at = self.clock.seconds()
        self._send(c, b"\x0b" + payload + b"\x1c\x0d", cuts, own=1)

    @precondition(lambda self: bool(self._open()))
    @rule(data=st.data(), payload=st.binary(max_size=64), cuts=st.lists(st.integers(0, 99), max_size=3))
    def send_garbage_frame(self, data: st.DataObject, payload: bytes, cuts: list[int]) -> None:
        c = data.draw(st.sampled_from(self._open()))
        payload = payload.replace(b"\x0b", b"").replace(b"\x1c", b"")
        c.expected.append(None)
        c.last_frame_at = self.clock.seconds()
        self._send(c, b"\x0b" + payload + b"\x1c\x0d", cuts, own=1)

    @precondition(lambda self: bool(self._open()))
    @rule(data=st.data(), junk=st.binary(min_size=1, max_size=300))
    def send_junk(self, data: st.DataObject, junk: bytes) -> None:
        c = data.draw(st.sampled_from(self._open()))
        self._send(c, junk.replace(b"\x0b", b"").replace(b"\x1c", b""), [])

    @precondition(lambda self: bool(self._open()))
    @rule(data=st.data())
    def send_start_byte(self, data: st.DataObject) -> None:
        """A lone start byte, as a sender holding a socket open would trickle."""
        self._send(data.draw(st.sampled_from(self._open())), b"\x0b", [])

    @precondition(lambda self: bool(self._open()))
    @rule(data=st.data(), gap=st.sampled_from([10.0, 31.0, 55.0, 59.0]), times=st.integers(1, 8),
          byte=st.sampled_from([b"\x0b", b"x", b"\x1c"]))
    def trickle(self, data: st.DataObject, gap: float, times: int, byte: bytes) -> None:
        """One byte every ``gap`` seconds, as a sender holding a socket would."""
        c = data.draw(st.sampled_from(self._open()))
        for _ in range(times):
            self._send(c, byte, [])
            self.clock.advance(gap)
            self._pump()

    @precondition(lambda self: bool(self._open()))
    @rule(data=st.data(), size=st.integers(0, 2 * MAX_FRAME))
    def send_unfinished(self, data: st.DataObject, size: int) -> None:
        """A start byte and part of a frame (perhaps an MSH), never ended."""
        c = data.draw(st.sampled_from(self._open()))
        head = b"MSH|^~\\&|A|B|C|D|||ADT^A01|PART|P|2.5\r" if size % 2 else b""
        self._send(c, b"\x0b" + (head + b"x" * size)[:size], [size // 3])

    @precondition(lambda self: bool(self._open()))
    @rule(data=st.data(), extra=st.integers(1, 3 * MAX_FRAME))
    def send_oversized(self, data: st.DataObject, extra: int) -> None:
        c = data.draw(st.sampled_from(self._open()))
        c.expected.append(None)
        body = b"MSH|^~\\&|A|B|C|D|||ADT^A01|BIG|P|2.5\r" + b"y" * (MAX_FRAME + extra)
        self._send(c, b"\x0b" + body + b"\x1c\x0d", [], own=1)

    @precondition(lambda self: bool(self.outbox.waiting))
    @rule(data=st.data(), ok=st.booleans())
    def finish_commit(self, data: st.DataObject, ok: bool) -> None:
        index = data.draw(st.integers(0, len(self.outbox.waiting) - 1))
        if ok:
            self.outbox.commit(index)
        else:
            self.outbox.fail(index)
        for c in self.conns:
            c.last_frame_at = self.clock.seconds()  # an ACK written is activity too
        self._pump()

    @rule(seconds=st.sampled_from([0.5, 4.0, 6.0, 29.0, 31.0, 59.0, 61.0]))
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self._pump()

    @precondition(lambda self: bool(self._open()))
    @rule(data=st.data(), blocked=st.booleans())
    def reader_stalls(self, data: st.DataObject, blocked: bool) -> None:
        """The sender stops (or resumes) reading its ACKs."""
        c = data.draw(st.sampled_from(self._open()))
        if blocked:
            c.proto.pauseProducing()
        else:
            c.proto.resumeProducing()
        self._pump()

    @precondition(lambda self: bool(self._open()))
    @rule(data=st.data())
    def client_closes(self, data: st.DataObject) -> None:
        c = data.draw(st.sampled_from(self._open()))
        c.client_closed = True
        self._lose(c)
        self._pump()

    # -- invariants ----------------------------------------------------------------

    @invariant()
    def no_traceback(self) -> None:
        failures = [e for e in self.events if e.get("log_failure") is not None]
        assert not failures, failures[0].get("log_failure")

    @invariant()
    def buffer_within_budget(self) -> None:
        assert 0 <= self.factory.buffered <= MAX_BUFFER + READ, self.factory.buffered

    @invariant()
    def no_connection_held_without_frames(self) -> None:
        """Start bytes, junk or unfinished frames cannot keep a connection:
        without complete frames or commits owed, it closes within the frame
        and idle timeouts (plus a frame's wait behind a full buffer)."""
        owed = {envelope.peer for envelope, _ in self.outbox.waiting}
        now = self.clock.seconds()
        for c in self.conns:
            if c.proto.peer in owed:
                continue
            closed = c.lost or c.transport.disconnecting or c.transport.write_closed
            assert closed or now - c.last_frame_at <= 200, (c.proto.peer, now - c.last_frame_at)

    @invariant()
    def replies_in_order(self) -> None:
        self._check(final=False)

    def _check(self, final: bool) -> None:
        closed_for = {e.get("peer") for e in self.events if e.get("event") in CLOSE_REASONS}
        for c in self.conns:
            got = _replies(c.transport.value())
            want = c.expected
            closed = c.lost or c.transport.disconnecting or c.transport.write_closed
            if closed and got and "PART".startswith(got[-1]):
                # The NAK of an unfinished frame that timed out or grew too
                # big: it comes last, and only before a close. Its MSH-10 is
                # as much of PART as was sent before the frame was cut off.
                if len(got) > len(want) or want[len(got) - 1] not in (None, ""):
                    got = got[:-1]
            assert len(got) <= len(want), (got, want)
            for g, w in zip(got, want, strict=False):
                assert w is None or g == w, (got, want)
            if closed and not c.client_closed and len(got) != len(want):
                assert c.proto.peer in closed_for, (c.proto.peer, got, want)
            if final and not closed and not c.inbox and not self.outbox.waiting:
                assert len(got) == len(want), (got, want)


def fuzz_settings(examples: int, steps: int) -> settings:
    return settings(
        max_examples=examples, stateful_step_count=steps, deadline=None,
        suppress_health_check=list(HealthCheck), database=None,
    )


class ProtocolFuzzTests(SynchronousTestCase):
    def test_random_hostile_senders(self) -> None:
        """Random hostile senders: replies in order or a logged close, no traceback, bytes within budget."""
        run_state_machine_as_test(ProtocolMachine, settings=fuzz_settings(examples=25, steps=30))
