"""MLLP_CONNECTOR_PROCESS: the connectors' upstream I/O in a child process
of the real ``twistd mllp``, talking to real MLLP and HTTP upstreams."""

from __future__ import annotations

import os
import signal

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mllpd.connectors import Dead, Delivered, Delivery, Retry
from mllpd.connectors.remote import (
    decode,
    encode,
    pack_deliveries,
    pack_outcome,
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
        """SIGTERM: the server exits 0 and takes its connector process with it."""
        server, ehr, _ = await self.start()
        await send(server, [hl7_message("T-1")])
        await until(lambda: ehr.received, timeout=30, what="a delivery")
        child = _children(server)[0]
        code = await deferToThread(server.stop)
        self.assertEqual(code, 0, server.output())
        self.assertIsNone(_parent_of(child), "the connector process outlived the server")
        self.assertIn("connector_process_stopped", [e.get("event") for e in server.events()])


def ehr_ack(payload: bytes) -> bytes:
    from tests.test_delivery import upstream_ack

    return upstream_ack(payload)
