"""MLLP_CONNECTOR_PROCESS: the connectors' upstream I/O in a child process
of the real ``twistd mllp``, talking to real MLLP and HTTP upstreams."""

from __future__ import annotations

import errno
import os
import signal
import struct
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import succeed
from twisted.internet.error import ProcessExitedAlready, ProcessTerminated
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from mllpd.connectors import ConnectorSpec, Dead, Delivered, Delivery, IConnector, Retry
from mllpd.connectors.remote import (
    ANSWER_FD,
    KILL_AFTER,
    PING_DEADLINE,
    PING_EVERY,
    RESTART_FIRST,
    RESTART_MAX,
    ConnectorProcess,
    _Server,
    decode,
    encode,
    pack_deliveries,
    pack_outcome,
    spec_to_json,
    unpack_deliveries,
    unpack_outcome,
)
from tests.serverproc import ServerProcess, hl7_message
from tests.test_delivery import (
    FAST_RETRY,
    HTTPUpstream,
    MLLPUpstream,
    all_delivered,
    control_id,
    http_connector,
    mllp_connector,
    run_server,
    send,
    states,
)
from tests.upstreams import until

ON = {"MLLP_CONNECTOR_PROCESS": "true"}


def _children(server: ServerProcess) -> list[int]:
    """Pids of the connector processes the server started, in order."""
    return [e["pid"] for e in server.events() if e.get("event") == "connector_process_started"]


def _parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _patients(prefix: str, patients: int, each: int) -> list[bytes]:
    """``each`` messages for every one of ``patients`` patients, interleaved."""
    return [
        hl7_message(f"{prefix}-{p}-{n:03d}", pid=f"PID|1||P{p}^^^HOSP^MR||DOE^J")
        for n in range(each) for p in range(patients)
    ]


def _in_order(arrivals: list[str], sent: list[bytes]) -> bool:
    """Each patient's messages first arrived in the order they were sent."""
    first: dict[str, int] = {}
    for i, cid in enumerate(arrivals):
        first.setdefault(cid, i)
    by_patient: dict[str, list[int]] = {}
    for payload in sent:
        cid = control_id(payload)
        by_patient.setdefault(cid.rsplit("-", 1)[0], []).append(first[cid])
    return all(seq == sorted(seq) for seq in by_patient.values())


class WireTests(SynchronousTestCase):
    """What crosses the pipe comes out as it went in."""

    @settings(max_examples=200, deadline=None)
    @given(
        st.lists(
            st.tuples(st.binary(max_size=300), st.text(max_size=20), st.integers(1, 10**6)),
            min_size=1, max_size=5,
        )
    )
    def test_deliveries_keep_their_exact_bytes(self, items: list[tuple[bytes, str, int]]) -> None:
        """Every delivery's payload bytes (newlines, 0x1C, anything) and fields survive the frame."""
        deliveries = [
            Delivery(f"id-{i}", "ehr", payload, None, "latin-1", cid, "ADT^A01", attempt, 1.5)
            for i, (payload, cid, attempt) in enumerate(items)
        ]
        header, data = decode(encode({"items": pack_deliveries(deliveries)[0]},
                                     pack_deliveries(deliveries)[1]))
        self.assertEqual(unpack_deliveries(header["items"], data), deliveries)

    def test_outcomes_survive_the_frame(self) -> None:
        """Delivered, Retry (with and without Retry-After) and Dead come back as sent."""
        for outcome in (Delivered("200"), Retry("timeout"), Retry("503", 7.5), Dead("AR: no")):
            header, _ = decode(encode({"o": pack_outcome(outcome)}))
            self.assertEqual(unpack_outcome(header["o"]), outcome)

    def test_a_short_frame_is_refused(self) -> None:
        """Payload sizes that do not add up to the frame are an error, not a cut message."""
        items, payloads = pack_deliveries([Delivery("a", "c", b"MSH|x", None, "ascii", "1", "A", 1)])
        with self.assertRaises(ValueError):
            unpack_deliveries(items, payloads[0][:-1])


class ConnectorProcessTests(TestCase):
    timeout = 120

    async def start(self, lanes: int = 1) -> tuple[ServerProcess, MLLPUpstream, HTTPUpstream]:
        ehr, lake = MLLPUpstream(self), HTTPUpstream(self)
        ehr.listen()
        lake.listen()
        extra = f"    lanes: {lanes}\n" if lanes > 1 else ""
        config = (
            "connectors:\n" + mllp_connector("ehr", ehr.port, extra)
            + http_connector("lake", lake.port, extra) + FAST_RETRY + "\n"
        )
        server = await run_server(self, config, env=ON)
        return server, ehr, lake

    async def test_both_connectors_deliver_from_a_child_process(self) -> None:
        """With MLLP_CONNECTOR_PROCESS on, every AA'd message reaches both upstreams in order, sent by a child of the server."""
        server, ehr, lake = await self.start()
        sent = [hl7_message(f"C-{n:03d}") for n in range(60)]
        acks = await send(server, sent)
        self.assertEqual({a.code for a in acks}, {"AA"})
        await until(
            lambda: all_delivered(server, "ehr", 60) and all_delivered(server, "lake", 60),
            timeout=30, what=lambda: f"ehr {len(ehr.received)} lake {len(lake.posts)}",
        )
        ids = [control_id(p) for p in sent]
        self.assertEqual(ehr.control_ids(), ids)
        self.assertEqual(lake.control_ids(), ids)
        self.assertEqual([p.body for p in lake.posts], sent)
        children = _children(server)
        self.assertEqual(len(children), 1, server.output())
        self.assertEqual(_parent_of(children[0]), server.pid)

    async def test_killed_child_is_replaced_and_nothing_is_lost(self) -> None:
        """kill -9 of the connector process mid-queue: another starts, every AA'd message arrives, each patient's in order."""
        server, ehr, lake = await self.start(lanes=4)
        sent = _patients("K", 8, 40)
        ehr.answer = lambda payload, n: None if n == 40 else ehr_ack(payload)  # holds one
        acks = await send(server, sent)
        self.assertEqual({a.code for a in acks}, {"AA"})
        await until(lambda: len(ehr.received) > 40, timeout=30, what=lambda: f"ehr {len(ehr.received)}")
        first = _children(server)[0]
        os.kill(first, signal.SIGKILL)
        await until(lambda: len(_children(server)) == 2, timeout=15, what=lambda: server.output())
        ehr.answer = lambda payload, n: ehr_ack(payload)
        await until(
            lambda: all_delivered(server, "ehr", len(sent)) and all_delivered(server, "lake", len(sent)),
            timeout=60, what=lambda: f"ehr {len(ehr.received)} lake {len(lake.posts)}",
        )
        self.assertTrue(_in_order(ehr.control_ids(), sent))
        self.assertTrue(_in_order(lake.control_ids(), sent))
        exited = [e for e in server.events() if e.get("event") == "connector_process_exited"]
        self.assertEqual(len(exited), 1, server.output())
        self.assertTrue(server.alive())

    async def test_sigterm_stops_the_child_with_the_server(self) -> None:
        """SIGTERM with a delivery held by the upstream: the server exits 0, its connector process with it, and the held message stays queued."""
        server, ehr, _ = await self.start()
        await send(server, [hl7_message("T-1")])
        await until(lambda: all_delivered(server, "ehr", 1), timeout=30, what="a delivery")
        ehr.answer = lambda payload, n: None  # hold the next one
        await send(server, [hl7_message("T-2")])
        await until(lambda: len(ehr.received) == 2, timeout=30, what="the held delivery")
        child = _children(server)[0]
        code = await deferToThread(server.stop)
        self.assertEqual(code, 0, server.output())
        await until(lambda: _parent_of(child) is None, timeout=5,
                    what="the connector process to be gone")
        self.assertIn("connector_process_stopped", [e.get("event") for e in server.events()])
        self.assertEqual(states(server, "ehr")[1][:2], ("T-2", "pending"))


def ehr_ack(payload: bytes) -> bytes:
    from tests.test_delivery import upstream_ack

    return upstream_ack(payload)


# -- the server's side of the pipe, on a fake reactor -----------------------------


class _FakeChild:
    """What spawnProcess returns: records what the server does to the child."""

    def __init__(self, pid: int, proto: Any) -> None:
        self.pid = pid
        self.proto = proto
        self.answers_pings = True
        self.written = b""
        self.stdin_closed = False
        self.signals: list[str] = []
        self.ended = False

    def writeToChild(self, fd: int, data: bytes) -> None:
        self.written += data
        (size,) = struct.unpack("!I", data[:4])
        header = decode(data[4:4 + size])[0]
        if header["op"] == "ping" and self.answers_pings and not self.ended:
            _answer(self.proto, header["id"], [])

    def closeStdin(self) -> None:
        self.stdin_closed = True

    def signalProcess(self, sig: str) -> None:
        if self.ended:
            raise ProcessExitedAlready()
        self.signals.append(sig)

    def requests(self) -> list[dict[str, Any]]:
        out, data = [], self.written
        while data:
            (size,) = struct.unpack("!I", data[:4])
            out.append(decode(data[4:4 + size])[0])
            data = data[4 + size:]
        return out


class _FakeReactor(Clock):
    def __init__(self) -> None:
        super().__init__()
        self.children: list[tuple[Any, _FakeChild]] = []
        self.fail_spawns = 0

    def spawnProcess(self, proto: Any, executable: str, args: Any, env: Any = None,
                     childFDs: Any = None) -> _FakeChild:
        if self.fail_spawns:
            self.fail_spawns -= 1
            raise OSError(errno.EAGAIN, "Resource temporarily unavailable")
        child = _FakeChild(1000 + len(self.children), proto)
        proto.makeConnection(child)
        self.children.append((proto, child))
        return child


def _answer(proto: Any, rid: Any, outcomes: list[Any]) -> None:
    body = encode({"id": rid, "outcomes": outcomes})
    proto.childDataReceived(ANSWER_FD, struct.pack("!I", len(body)) + body)


def _end(proto: Any, child: _FakeChild) -> None:
    child.ended = True
    proto.childConnectionLost(ANSWER_FD)
    proto.processEnded(Failure(ProcessTerminated(exitCode=1)))


def _delivery(cid: str) -> Delivery:
    return Delivery(f"id-{cid}", "ehr", f"MSH|^~\\\\&|A|B|C|D|||ADT^A01|{cid}|P|2.5\r".encode(),
                    None, "ascii", cid, "ADT^A01", 1)


class ConnectorProcessLogicTests(SynchronousTestCase):
    """Every delivery handed to the child gets exactly one outcome, whatever the child does."""

    def setUp(self) -> None:
        self.reactor = _FakeReactor()
        specs = [ConnectorSpec("ehr", "mllp", None, {}), ConnectorSpec("lake", "http", None, {})]
        self.process = ConnectorProcess(self.reactor, specs, env={})
        self.process.connector_started("ehr")
        self.process.connector_started("lake")

    def outcomes(self, d: Any) -> list[Any]:
        got: list[Any] = []
        d.addCallback(got.append)
        return got

    def test_child_is_told_its_connectors_first(self) -> None:
        """A new child gets the connectors as the server read them, then a start for each running one."""
        [(_, child)] = self.reactor.children
        ops = [(r["op"], r.get("connector")) for r in child.requests()]
        self.assertEqual(ops, [("configure", None), ("start", "ehr"), ("start", "lake")])
        self.assertEqual([c["name"] for c in child.requests()[0]["connectors"]], ["ehr", "lake"])

    def test_answer_reaches_its_delivery(self) -> None:
        """Answers go to the request they name, in any order."""
        [(proto, child)] = self.reactor.children
        first = self.outcomes(self.process.deliver("ehr", [_delivery("A")], None))
        second = self.outcomes(self.process.deliver("ehr", [_delivery("B")], None))
        rid_a, rid_b = [r["id"] for r in child.requests() if r["op"] == "deliver"]
        _answer(proto, rid_b, [["dead", "AR"]])
        _answer(proto, rid_a, [["delivered", "AA"]])
        self.assertEqual((first, second), ([[Delivered("AA")]], [[Dead("AR")]]))

    def test_unreadable_answer_retries_and_replaces_the_child(self) -> None:
        """An answer that cannot be read: the delivery is retried, the child killed and another started."""
        [(proto, child)] = self.reactor.children
        got = self.outcomes(self.process.deliver("ehr", [_delivery("A")], None))
        proto.childDataReceived(ANSWER_FD, struct.pack("!I", 5) + b"junk\n")
        self.assertEqual(len(got), 1)
        self.assertIsInstance(got[0][0], Retry)
        self.assertEqual(child.signals, ["KILL"])
        self.reactor.advance(RESTART_FIRST)
        self.assertEqual(len(self.reactor.children), 2)

    def test_wrong_number_of_outcomes_is_a_retry_of_each(self) -> None:
        """A batch answered with fewer outcomes than messages: every message is retried, none marked delivered."""
        [(proto, child)] = self.reactor.children
        got = self.outcomes(self.process.deliver("ehr", [_delivery("A"), _delivery("B")], "BATCH-1"))
        [rid] = [r["id"] for r in child.requests() if r["op"] == "deliver"]
        _answer(proto, rid, [["delivered", "AA"]])
        self.assertEqual(len(got[0]), 2)
        self.assertTrue(all(isinstance(o, Retry) for o in got[0]))

    def test_exit_retries_what_was_pending_and_backs_off(self) -> None:
        """A child that dies: its deliveries are retried; the next starts after 1 s, then 2 s."""
        proto, child = self.reactor.children[0]
        got = self.outcomes(self.process.deliver("ehr", [_delivery("A")], None))
        _end(proto, child)
        self.assertIsInstance(got[0][0], Retry)
        self.assertIsInstance(self.outcomes(self.process.deliver("ehr", [_delivery("B")], None))[0][0], Retry)
        self.reactor.advance(RESTART_FIRST)
        proto, child = self.reactor.children[1]
        _end(proto, child)
        self.reactor.advance(RESTART_FIRST)
        self.assertEqual(len(self.reactor.children), 2)
        self.reactor.advance(RESTART_FIRST)
        self.assertEqual(len(self.reactor.children), 3)

    def test_a_child_that_ran_long_is_restarted_after_the_first_pause(self) -> None:
        """The pause goes back to 1 s once a child has run RESTART_MAX seconds."""
        for _ in range(3):  # pauses of 1, 2 and 4 s
            proto, child = self.reactor.children[-1]
            _end(proto, child)
            self.reactor.advance(RESTART_MAX)
        proto, child = self.reactor.children[-1]
        self.reactor.advance(RESTART_MAX)  # this one ran long
        _end(proto, child)
        self.reactor.advance(RESTART_FIRST)
        self.assertEqual(len(self.reactor.children), 5)

    def test_a_frozen_child_is_replaced(self) -> None:
        """A child that answers no ping for PING_DEADLINE is killed: what it held is retried and another starts."""
        proto, child = self.reactor.children[0]
        got = self.outcomes(self.process.deliver("ehr", [_delivery("A")], None))
        self.reactor.advance(PING_EVERY)  # answered: all is well
        self.assertEqual(child.signals, [])
        child.answers_pings = False
        for _ in range(int(PING_DEADLINE / PING_EVERY) + 1):
            self.reactor.advance(PING_EVERY)
        self.assertEqual(child.signals, ["KILL"])
        self.assertIsInstance(got[0][0], Retry)
        self.reactor.advance(RESTART_FIRST)
        self.assertEqual(len(self.reactor.children), 2)

    def test_failed_start_is_tried_again(self) -> None:
        """fork failing (EAGAIN): deliveries are retried meanwhile and the start is tried again."""
        proto, child = self.reactor.children[0]
        _end(proto, child)
        self.reactor.fail_spawns = 1
        self.reactor.advance(RESTART_FIRST)
        self.assertEqual(len(self.reactor.children), 1)
        self.assertIsInstance(self.outcomes(self.process.deliver("ehr", [_delivery("A")], None))[0][0], Retry)
        self.reactor.advance(2 * RESTART_FIRST)
        self.assertEqual(len(self.reactor.children), 2)

    def test_last_stop_closes_the_child_and_kills_it_if_slow(self) -> None:
        """Stopping the last connector closes the child's input, kills it after KILL_AFTER and starts no other."""
        proto, child = self.reactor.children[0]
        self.assertEqual(self.outcomes(self.process.connector_stopped("ehr")), [None])
        self.assertFalse(child.stdin_closed)
        stopped = self.outcomes(self.process.connector_stopped("lake"))
        self.assertEqual(self.outcomes(self.process.connector_stopped("lake")), [None])  # twice is fine
        self.assertTrue(child.stdin_closed)
        self.assertEqual(stopped, [])
        self.reactor.advance(KILL_AFTER)
        self.assertEqual(child.signals, ["KILL"])
        _end(proto, child)
        self.assertEqual(stopped, [None])
        self.reactor.advance(RESTART_MAX)
        self.assertEqual(len(self.reactor.children), 1)


class ChildServerTests(SynchronousTestCase):
    """The child's end answers every request that has an id, whatever goes wrong."""

    def setUp(self) -> None:
        self.delivered: list[Delivery] = []
        test = self

        @implementer(IConnector)
        class Upstream:
            def __init__(self, name: str) -> None:
                self.name = name

            def start(self) -> None:
                pass

            def deliver(self, delivery: Delivery) -> Any:
                if delivery.control_id == "BOOM":
                    raise RuntimeError("bug")
                test.delivered.append(delivery)
                return succeed(Delivered("AA"))

            def stop(self) -> Any:
                return succeed(None)

        self.server = _Server(Clock(), {}, lambda spec, reactor, environ: Upstream(spec.name))
        self.transport = StringTransport()
        self.server.makeConnection(self.transport)
        self.send({"op": "configure", "connectors": [
            spec_to_json(ConnectorSpec("ehr", "mllp", None, {}))]})

    def send(self, header: dict[str, Any], payloads: list[bytes] = []) -> None:  # noqa: B006
        self.server.dataReceived(struct.pack("!I", len(encode(header, payloads))) + encode(header, payloads))

    def answers(self) -> dict[Any, list[Any]]:
        data, out = self.transport.value(), {}
        while data:
            (size,) = struct.unpack("!I", data[:4])
            header = decode(data[4:4 + size])[0]
            out[header["id"]] = [unpack_outcome(o) for o in header["outcomes"]]
            data = data[4 + size:]
        return out

    def deliver(self, rid: int, cid: str, connector: str = "ehr", **extra: Any) -> None:
        items, payloads = pack_deliveries([_delivery(cid)])
        self.send({"op": "deliver", "id": rid, "connector": connector, "batch": None,
                   "items": items, **extra}, payloads)

    def test_delivers_and_answers(self) -> None:
        """A delivery reaches the connector with its exact bytes and is answered Delivered."""
        self.deliver(1, "A")
        self.assertEqual(self.answers(), {1: [Delivered("AA")]})
        self.assertEqual(self.delivered, [_delivery("A")])

    def test_ping_is_answered_at_once(self) -> None:
        """A ping gets its empty answer while deliveries are in progress."""
        self.send({"op": "ping", "id": 9})
        self.assertEqual(self.answers(), {9: []})

    def test_everything_wrong_is_answered_retry(self) -> None:
        """An unknown connector, an unknown request and a connector that raises are each answered Retry, never Dead."""
        self.deliver(1, "A", connector="nowhere")
        self.send({"op": "frobnicate", "id": 2, "connector": "ehr"})
        self.deliver(3, "BOOM")
        self.send({"op": "deliver", "id": 4, "connector": "ehr", "items": [[1, 2]]})
        self.deliver(5, "B")
        answers = self.answers()
        self.assertEqual(sorted(answers), [1, 2, 3, 4, 5])
        for rid in (1, 2, 3, 4):
            self.assertIsInstance(answers[rid][0], Retry, rid)
        self.assertEqual(answers[5], [Delivered("AA")])
        self.flushLoggedErrors(RuntimeError)
