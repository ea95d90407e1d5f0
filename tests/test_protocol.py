"""MLLPServerProtocol with StringTransport and a Clock: order, limits, timeouts."""

from __future__ import annotations

import itertools

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from mllpd.framing import frame
from mllpd.metrics import MAX_MSG_TYPES
from mllpd.protocol import LINGER, MAX_PIPELINE, MLLPServerFactory, MLLPServerProtocol
from mllpd.receiver import Receiver
from mllpd.testing import MemoryOutbox


def adt(control_id: str, version: str = "2.5", extra: str = "") -> bytes:
    return (
        f"MSH|^~\\&|LAB|HOSP|EHR|HOSP|20260101120000||ADT^A01^ADT_A01|{control_id}|P|{version}{extra}\r"
        "PID|1||123^^^H||DOE^JOHN\r"
    ).encode()


class HalfCloseTransport(StringTransport):
    """StringTransport that records a half-close, as TCP transports offer."""

    write_closed = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True


def acks(transport: StringTransport) -> list[str]:
    """Split written bytes into ACK payloads, checking the framing."""
    data = transport.value()
    out = []
    while data:
        assert data.startswith(b"\x0b"), data[:20]
        end = data.index(b"\x1c\x0d")
        out.append(data[1:end].decode("latin-1"))
        data = data[end + 2 :]
    return out


def msa(ack: str) -> list[str]:
    for seg in ack.split("\r"):
        if seg.startswith("MSA|"):
            return seg.split("|")
    raise AssertionError(f"no MSA in {ack!r}")


class Harness:
    def __init__(self, hold: bool = False, **limits: object) -> None:
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.outbox = MemoryOutbox(hold=hold)
        self.receiver = Receiver(self.outbox, self.clock)
        self.factory = MLLPServerFactory(self.receiver, self.clock, **limits)  # type: ignore[arg-type]

    def connect(self, port: int = 40000) -> tuple[MLLPServerProtocol, HalfCloseTransport]:
        proto = self.factory.buildProtocol(IPv4Address("TCP", "10.0.0.1", port))
        assert isinstance(proto, MLLPServerProtocol)
        transport = HalfCloseTransport(peerAddress=IPv4Address("TCP", "10.0.0.1", port))
        proto.makeConnection(transport)
        return proto, transport


class FramingTests(SynchronousTestCase):
    def test_split_frames(self) -> None:
        """A frame arriving one byte at a time is acknowledged once, when complete."""
        h = Harness()
        proto, t = h.connect()
        data = frame(adt("C1"))
        for i in range(len(data) - 1):
            proto.dataReceived(data[i : i + 1])
            self.assertEqual(t.value(), b"")
        proto.dataReceived(data[-1:])
        self.assertEqual([msa(a)[1:3] for a in acks(t)], [["AA", "C1"]])
        self.assertEqual(h.outbox.stored[0].payload, adt("C1"))

    def test_pipelined_frames_acked_in_order(self) -> None:
        """Pipelined frames get ACKs in arrival order even when commits finish out of order."""
        h = Harness(hold=True)
        proto, t = h.connect()
        proto.dataReceived(b"".join(frame(adt(f"C{i}")) for i in range(5)))
        self.assertEqual(len(h.outbox.waiting), 5)
        h.outbox.commit(4)
        h.outbox.commit(2)
        self.assertEqual(t.value(), b"", "no ACK may overtake an earlier frame's")
        h.outbox.commit(0)
        self.assertEqual([msa(a)[2] for a in acks(t)], ["C0"])
        h.outbox.commit(0)
        h.outbox.commit(0)
        self.assertEqual([msa(a)[2] for a in acks(t)], [f"C{i}" for i in range(5)])

    def test_no_ack_before_commit(self) -> None:
        """No AA is written before the outbox commit has returned."""
        h = Harness(hold=True)
        proto, t = h.connect()
        proto.dataReceived(frame(adt("C1")))
        self.assertEqual(t.value(), b"")
        h.outbox.commit()
        self.assertEqual(msa(acks(t)[0])[1], "AA")

    def test_commit_failure_gives_ar(self) -> None:
        """A failed commit (disk full) answers AR, never AA, and the connection stays usable."""
        h = Harness(hold=True)
        proto, t = h.connect()
        proto.dataReceived(frame(adt("C1")))
        h.outbox.fail()
        ack = acks(t)[0]
        self.assertEqual(msa(ack)[1:3], ["AR", "C1"])
        self.assertIn("ERR|", ack)
        self.assertIn("207", ack)
        proto.dataReceived(frame(adt("C2")))
        h.outbox.commit()
        self.assertEqual(msa(acks(t)[1])[1:3], ["AA", "C2"])
        self.assertFalse(t.disconnecting)

    def test_framing_bytes_in_echoed_fields_escaped(self) -> None:
        """An MSH-10 of X<0x1C> gets exactly one intact ACK frame whose MSA-2 holds the escape, not the byte."""
        h = Harness()
        proto, t = h.connect()
        proto.dataReceived(frame(adt("X\x1c")) + frame(adt("NEXT")))
        answers = acks(t)
        self.assertEqual([msa(a)[1:3] for a in answers], [["AA", "X\\X1C\\"], ["AA", "NEXT"]])
        self.assertNotIn(b"\x1c\x0d\x1c", t.value())
        self.assertEqual(t.value().count(b"\x1c"), 2)

    def test_junk_discarded_and_counted(self) -> None:
        """Bytes before a start block are counted and never reach the stored message."""
        h = Harness()
        proto, t = h.connect()
        proto.dataReceived(b"GET / HTTP/1.0\r\n" + frame(adt("C1")) + b"\r\n")
        self.assertEqual(h.outbox.stored[0].payload, adt("C1"))
        self.assertEqual(h.factory.stats["junk_bytes"], 18)
        self.assertEqual(msa(acks(t)[0])[1], "AA")

    def test_not_hl7_gets_ar(self) -> None:
        """A frame without MSH gets an AR with an ERR segment and the connection stays open."""
        h = Harness()
        proto, t = h.connect()
        proto.dataReceived(frame(b"hello world"))
        ack = acks(t)[0]
        self.assertEqual(msa(ack)[1], "AR")
        self.assertIn("\rERR|", ack)
        self.assertFalse(t.disconnecting)
        self.assertEqual(h.outbox.stored, [])


class LimitTests(SynchronousTestCase):
    def test_metric_labels_bounded(self) -> None:
        """Reply counts use the message type only when it is three capitals or digits, else 'other'."""
        h = Harness()
        proto, t = h.connect()
        for i, kind in enumerate(["ADT", "x" * 15, "A-B", "ORU", "Ab1"]):
            payload = f"MSH|^~\\&|A|B|C|D|||{kind}^A01|C{i}|P|9.9\r".encode()
            proto.dataReceived(frame(payload))
        big = f"MSH|^~\\&|A|B|C|D|||{'Q' * 1_000_000}^A01|C9|P|9.9\r".encode()
        proto.dataReceived(frame(big))
        self.assertEqual(
            dict(h.factory.acks), {("ADT", "AR"): 1, ("ORU", "AR"): 1, ("other", "AR"): 4}
        )

    def test_reply_counts_bounded_at_the_source(self) -> None:
        """Thousands of distinct valid message types keep at most MAX_MSG_TYPES + 1 type keys in the reply counts, and every reply is counted."""
        h = Harness()
        proto, t = h.connect()
        n = 3 * MAX_MSG_TYPES
        for i in range(n):
            kind = f"{i:03d}"
            proto.dataReceived(frame(f"MSH|^~\\&|A|B|C|D|||{kind}^A01|C{i}|P|9.9\r".encode()))
        self.assertEqual(len(acks(t)), n)
        self.assertEqual(len(h.factory.acks), MAX_MSG_TYPES + 1)
        self.assertEqual(sum(h.factory.acks.values()), n)
        self.assertEqual(h.factory.acks[("other", "AR")], n - MAX_MSG_TYPES)
        self.assertEqual(h.factory.acks[("000", "AR")], 1)

    def test_oversized_frame_nak_and_close(self) -> None:
        """A frame over MLLP_MAX_FRAME_SIZE gets an AR echoing its MSH-10, then a half-close."""
        h = Harness(max_frame_size=1000)
        proto, t = h.connect()
        proto.dataReceived(b"\x0b" + adt("BIG1") + b"OBX|" + b"x" * 2000)
        ack = acks(t)[0]
        self.assertEqual(msa(ack)[1:3], ["AR", "BIG1"])
        self.assertTrue(t.write_closed)
        self.assertEqual(h.factory.stats["frames_oversized"], 1)
        self.assertEqual(h.outbox.stored, [])
        # Input after the NAK is discarded while the sender gets to read it.
        proto.dataReceived(frame(adt("C2")))
        self.assertEqual(len(acks(t)), 1)
        h.clock.advance(LINGER)
        self.assertTrue(t.disconnecting)

    def test_refusals_come_from_the_receiver(self) -> None:
        """The AR for an oversized frame is built by the receiver, with its clock and ACK ids."""
        h = Harness(max_frame_size=1000)
        h.receiver = Receiver(h.outbox, h.clock, ack_id=lambda: "RECEIVER-ID-1")
        h.factory.receiver = h.receiver
        proto, t = h.connect()
        proto.dataReceived(b"\x0b" + adt("BIG2") + b"OBX|" + b"x" * 2000)
        msh = acks(t)[0].split("\r", 1)[0].split("|")
        self.assertEqual(msh[9], "RECEIVER-ID-1")

    def test_every_reply_the_protocol_makes_comes_from_the_receiver(self) -> None:
        """The ARs the protocol answers on its own (a timed-out frame, an oversized batch, a failed receive) carry the receiver's ACK ids."""
        ids = (f"RECEIVER-ID-{n}" for n in itertools.count())
        h = Harness(max_frame_size=1000, frame_timeout=5.0)
        h.receiver = Receiver(h.outbox, h.clock, ack_id=lambda: next(ids))
        h.factory.receiver = h.receiver
        slow, t_slow = h.connect(1)
        slow.dataReceived(b"\x0b" + adt("SLOW"))
        h.clock.advance(5)
        big, t_big = h.connect(2)
        big.dataReceived(
            b"\x0bBHS|^~\\&|LAB|HOSP|EHR|HOSP|20260101120000||||B7\r" + adt("IN-BATCH") + b"x" * 2000
        )
        failing, t_failing = h.connect(3)
        h.receiver.receive = lambda *args: defer.fail(RuntimeError("a bug"))  # type: ignore[method-assign]
        failing.dataReceived(frame(adt("C3")))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        for t, header in ((t_slow, "MSH"), (t_big, "BHS"), (t_failing, "MSH")):
            [ack] = acks(t)
            self.assertEqual(msa(ack)[1], "AR")
            self.assertTrue(ack.startswith(header + "|"), ack)
            ids_used = [
                seg.split("|")[9 if seg.startswith("MSH") else 10]
                for seg in ack.split("\r") if seg[:3] in ("MSH", "BHS")
            ]
            self.assertTrue(ids_used and all(i.startswith("RECEIVER-ID-") for i in ids_used), ack)

    def test_oversized_waits_for_earlier_acks(self) -> None:
        """The NAK for an oversized frame follows the ACKs of the frames before it."""
        h = Harness(hold=True, max_frame_size=1000)
        proto, t = h.connect()
        proto.dataReceived(frame(adt("C1")) + b"\x0b" + adt("BIG") + b"y" * 1200)
        self.assertEqual(t.value(), b"")
        h.outbox.commit()
        codes = [msa(a)[1] for a in acks(t)]
        self.assertEqual(codes, ["AA", "AR"])

    def test_max_connections(self) -> None:
        """Beyond MLLP_MAX_CONNECTIONS a new connection is closed at once and counted."""
        h = Harness(max_connections=2)
        _, t1 = h.connect(1)
        _, t2 = h.connect(2)
        p3, t3 = h.connect(3)
        self.assertFalse(t1.disconnecting or t2.disconnecting)
        self.assertTrue(t3.disconnecting)
        self.assertEqual(h.factory.stats["connections_refused"], 1)
        self.assertEqual(h.factory.open_connections, 2)
        p3.connectionLost(None)
        self.assertEqual(h.factory.open_connections, 2)

    def test_max_buffer_pauses_every_connection(self) -> None:
        """Past MLLP_MAX_BUFFER (partial frames plus uncommitted messages, all connections) nobody is read until it falls."""
        h = Harness(hold=True, max_buffer=100_000, max_frame_size=60_000)
        conns = [h.connect(40000 + i) for i in range(4)]
        (p0, t0), (p1, t1), (p2, t2), (p3, t3) = conns
        big = adt("C0") + b"NTE|1||" + b"x" * 45_000 + b"\r"
        p0.dataReceived(frame(big))  # awaiting commit
        partial = adt("C1") + b"y" * 40_000
        p1.dataReceived(b"\x0b" + partial)  # in progress
        self.assertTrue(all(t.producerState == "producing" for _, t in conns))
        p2.dataReceived(b"\x0b" + b"z" * 20_000)
        self.assertEqual(h.factory.buffered, len(big) + len(partial) + 20_000)
        self.assertTrue(all(t.producerState == "paused" for _, t in conns))
        _, t4 = h.connect(40010)
        self.assertEqual(t4.producerState, "paused")
        self.assertEqual(h.factory.stats["buffer_full"], 1)
        h.outbox.commit()  # C0's bytes are freed
        self.assertEqual(msa(acks(t0)[0])[1:3], ["AA", "C0"])
        self.assertTrue(all(t.producerState == "producing" for _, t in [*conns, (None, t4)]))
        p2.connectionLost(None)
        p1.dataReceived(b"\x1c\r")
        h.outbox.commit()
        self.assertEqual(h.factory.buffered, 0)
        self.assertEqual(h.factory.stats["buffer_full"], 1)

    def test_unfinished_frames_over_budget_refuse_the_largest(self) -> None:
        """When unfinished frames alone keep MLLP_MAX_BUFFER full, the largest gets AR and is closed, and the other senders are read again."""
        h = Harness(max_buffer=100_000, max_frame_size=60_000)
        (p0, t0), (p1, t1), (p2, t2), (p3, t3) = [h.connect(40000 + i) for i in range(4)]
        p0.dataReceived(b"\x0b" + adt("SMALL") + b"a" * 30_000)
        p1.dataReceived(b"\x0b" + adt("BIG") + b"b" * 40_000)
        p2.dataReceived(b"\x0b" + adt("MID") + b"c" * 35_000)  # 105 KB unfinished: over the limit
        self.assertEqual(h.factory.stats["buffer_full"], 1)
        self.assertEqual(h.factory.stats["frames_buffer_refused"], 1)
        self.assertEqual(msa(acks(t1)[0])[1:3], ["AR", "BIG"])
        self.assertTrue(t1.write_closed)
        self.assertEqual((acks(t0), acks(t2)), ([], []))
        # The rest fit under seven eighths: everyone else reads again.
        self.assertEqual([t.producerState for t in (t0, t2, t3)], ["producing"] * 3)
        p3.dataReceived(frame(adt("HONEST")))
        self.assertEqual(msa(acks(t3)[0])[1:3], ["AA", "HONEST"])
        p0.dataReceived(b"\x1c\r")
        self.assertEqual(msa(acks(t0)[0])[1:3], ["AA", "SMALL"])

    def test_frame_completed_is_not_counted_twice(self) -> None:
        """A frame finishing in a read moves its bytes from in-progress to awaiting-commit without pausing anyone."""
        h = Harness(hold=True, max_buffer=100_000, max_frame_size=90_000)
        proto, t = h.connect()
        big = adt("C0") + b"NTE|1||" + b"x" * 60_000 + b"\r"
        proto.dataReceived(b"\x0b" + big)
        proto.dataReceived(b"\x1c\r")
        self.assertEqual(h.factory.buffered, len(big))
        self.assertEqual((t.producerState, h.factory.stats["buffer_full"]), ("producing", 0))

    def test_pipeline_depth_pauses_reading(self) -> None:
        """A client with MAX_PIPELINE unanswered frames is not read from until ACKs go out."""
        h = Harness(hold=True)
        proto, t = h.connect()
        proto.dataReceived(b"".join(frame(adt(f"C{i}")) for i in range(MAX_PIPELINE)))
        self.assertEqual(t.producerState, "paused")
        h.outbox.commit()
        self.assertEqual(t.producerState, "producing")


class TimeoutTests(SynchronousTestCase):
    def test_idle_timeout(self) -> None:
        """A connection idle for MLLP_IDLE_TIMEOUT is closed; activity restarts the wait."""
        h = Harness(idle_timeout=30.0)
        proto, t = h.connect()
        h.clock.advance(29)
        proto.dataReceived(frame(adt("C1")))
        h.clock.advance(29)
        self.assertFalse(t.disconnecting)
        h.clock.advance(1)
        self.assertTrue(t.disconnecting)
        self.assertEqual(h.factory.stats["idle_timeouts"], 1)

    def test_not_idle_while_commit_pending(self) -> None:
        """A connection waiting for its ACK is not idle, however long the commit takes."""
        h = Harness(hold=True, idle_timeout=5.0)
        proto, t = h.connect()
        proto.dataReceived(frame(adt("C1")))
        h.clock.advance(60)
        self.assertFalse(t.disconnecting)
        h.outbox.commit()
        self.assertEqual(msa(acks(t)[0])[1], "AA")

    def test_frame_timeout_naks_and_closes(self) -> None:
        """A frame still incomplete MLLP_FRAME_TIMEOUT after its start gets AR and a close."""
        h = Harness(frame_timeout=60.0, idle_timeout=0)
        proto, t = h.connect()
        proto.dataReceived(b"\x0b" + adt("SLOW1")[:80])
        for _ in range(59):
            h.clock.advance(1)
            proto.dataReceived(b"x")  # a trickle does not reset the frame's clock
        self.assertEqual(t.value(), b"")
        h.clock.advance(1)
        self.assertEqual(msa(acks(t)[0])[1:3], ["AR", "SLOW1"])
        self.assertTrue(t.write_closed)
        self.assertEqual(h.factory.stats["frames_timed_out"], 1)

    def test_start_bytes_do_not_restart_frame_timer(self) -> None:
        """Start bytes trickled into an unfinished frame neither restart MLLP_FRAME_TIMEOUT nor hold the connection; they are counted."""
        h = Harness(frame_timeout=60.0, idle_timeout=30.0)
        proto, t = h.connect()
        proto.dataReceived(b"\x0b")
        h.clock.advance(55)
        proto.dataReceived(b"\x0b")
        self.assertFalse(proto.lost or t.write_closed or t.disconnecting)
        h.clock.advance(5)
        self.assertTrue(t.write_closed or t.disconnecting)
        self.assertEqual(h.factory.stats["frames_timed_out"], 1)
        self.assertEqual(h.factory.stats["frame_restarts"], 1)

    def test_frame_timeout_restarts_per_frame(self) -> None:
        """Each frame gets the full MLLP_FRAME_TIMEOUT from its own start byte."""
        h = Harness(frame_timeout=10.0, idle_timeout=0)
        proto, t = h.connect()
        proto.dataReceived(b"\x0b" + adt("A"))
        h.clock.advance(9)
        proto.dataReceived(b"\x1c\x0d\x0b" + adt("B"))
        h.clock.advance(9)
        self.assertFalse(t.write_closed)
        proto.dataReceived(b"\x1c\x0d")
        h.clock.advance(100)
        self.assertEqual([msa(a)[1] for a in acks(t)], ["AA", "AA"])
        self.assertFalse(t.write_closed or t.disconnecting)

    def test_frame_timeout_without_header_closes_silently(self) -> None:
        """A timed-out frame with no readable MSH is closed without a NAK."""
        h = Harness(frame_timeout=1.0, idle_timeout=0)
        proto, t = h.connect()
        proto.dataReceived(b"\x0bjunk")
        h.clock.advance(1)
        self.assertEqual(t.value(), b"")
        self.assertTrue(t.write_closed)

    def test_write_timeout(self) -> None:
        """A client that does not read its ACKs is not read from, then dropped after MLLP_WRITE_TIMEOUT."""
        h = Harness(write_timeout=5.0)
        proto, t = h.connect()
        proto.pauseProducing()  # the transport's buffer is full
        self.assertEqual(t.producerState, "paused")
        h.clock.advance(4.9)
        self.assertFalse(t.disconnecting)
        h.clock.advance(0.1)
        self.assertTrue(t.disconnecting)
        self.assertEqual(h.factory.stats["write_timeouts"], 1)

    def test_write_resumes_in_time(self) -> None:
        """A client that catches up within MLLP_WRITE_TIMEOUT keeps its connection."""
        h = Harness(write_timeout=5.0)
        proto, t = h.connect()
        proto.pauseProducing()
        h.clock.advance(4)
        proto.resumeProducing()
        h.clock.advance(10)
        self.assertFalse(t.disconnecting)
        self.assertEqual(t.producerState, "producing")

    def test_timers_cancelled_on_close(self) -> None:
        """No timer outlives its connection."""
        h = Harness(frame_timeout=5.0, idle_timeout=5.0, write_timeout=5.0)
        proto, _ = h.connect()
        proto.dataReceived(b"\x0bMSH|")
        proto.pauseProducing()
        proto.connectionLost(None)
        self.assertEqual(h.clock.getDelayedCalls(), [])


class DrainTests(SynchronousTestCase):
    def test_drain_closes_idle_and_finishes_busy(self) -> None:
        """Draining half-closes idle connections now and busy ones after their ACK."""
        h = Harness(hold=True)
        idle, t_idle = h.connect(1)
        busy, t_busy = h.connect(2)
        busy.dataReceived(frame(adt("C1")))
        d = h.factory.drain()
        self.assertTrue(t_idle.write_closed)
        idle.connectionLost(None)
        self.assertFalse(t_busy.write_closed or t_busy.disconnecting)
        h.outbox.commit()
        self.assertEqual(msa(acks(t_busy)[0])[1], "AA")
        self.assertTrue(t_busy.write_closed)
        self.assertNoResult(d)
        busy.connectionLost(None)
        self.successResultOf(d)

    def test_drain_waits_for_frame_in_progress(self) -> None:
        """A frame in progress when draining starts is finished and acknowledged."""
        h = Harness()
        proto, t = h.connect()
        data = frame(adt("C1"))
        proto.dataReceived(data[:30])
        h.factory.drain()
        self.assertFalse(t.disconnecting)
        proto.dataReceived(data[30:])
        self.assertEqual(msa(acks(t)[0])[1], "AA")
        self.assertTrue(t.write_closed)
