"""HL7 batches end to end: the real ``twistd -n mllp`` process takes batches
of 1, 100 and 1,000 messages and delivers every message once, in batch
order, to an MLLP upstream of the test's own.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from mllpd.connectors import ConnectorSpec, Delivery
from mllpd.connectors.mllp import build
from tests.serverproc import MLLPClient, hl7_message, query, spawn_server
from tests.test_delivery import (
    FAST_RETRY,
    MLLPUpstream,
    all_delivered,
    control_id,
    mllp_connector,
    run_server,
    states,
)
from tests.upstreams import until

SIZES = (1, 100, 1000)


def batch_payload(batch_id: str, messages: list[bytes]) -> bytes:
    head = f"FHS|^~\\&|TESTAPP|TESTFAC|MLLPD|HOSP|20240101120000||||F-{batch_id}\r"
    head += f"BHS|^~\\&|TESTAPP|TESTFAC|MLLPD|HOSP|20240101120000||||{batch_id}\r"
    tail = f"BTS|{len(messages)}\rFTS|1\r"
    return head.encode() + b"".join(messages) + tail.encode()


def send_batches(port: int, batches: list[bytes]) -> list[bytes]:
    """Send each batch in its own frame on one connection; the reply frames."""
    with MLLPClient(port, timeout=60) as client:
        client.send(*batches)
        return [client.read_frame(60) for _ in batches]


def msa(reply: bytes) -> list[tuple[str, str]]:
    segments = [s.decode() for s in reply.split(b"\r") if s.startswith(b"MSA|")]
    return [(s.split("|")[1], s.split("|")[2]) for s in segments]


class BatchDeliveryTests(TestCase):
    """What a batch sender gets, and what the upstream gets, through the real process."""

    async def test_batches_delivered_once_in_order(self) -> None:
        """Batches of 1, 100 and 1,000 get one AA each in a batch ACK; upstream gets every message once, in order."""
        upstream = MLLPUpstream(self)
        upstream.listen()
        config = "connectors:\n" + mllp_connector("ehr", upstream.port) + FAST_RETRY + "\n"
        server = await run_server(self, config)
        sent: list[list[bytes]] = [
            [hl7_message(f"B{size}-{n:04d}", pid=f"PID|1||{n}^^^HOSP^MR") for n in range(size)]
            for size in SIZES
        ]
        assert server.port is not None
        replies = await deferToThread(
            send_batches, server.port, [batch_payload(f"B{size}", m) for size, m in zip(SIZES, sent, strict=True)]
        )
        for size, reply, messages in zip(SIZES, replies, sent, strict=True):
            self.assertTrue(reply.startswith(b"FHS|"), reply[:40])
            self.assertIn(f"|F-B{size}\rBHS|".encode(), reply)  # FHS-12
            self.assertIn(f"|B{size}\rMSH|".encode(), reply)  # BHS-12
            self.assertIn(f"BTS|{size}\rFTS|1\r".encode(), reply)
            self.assertEqual(msa(reply), [("AA", control_id(m)) for m in messages])

        everything = [m for messages in sent for m in messages]
        await until(
            lambda: all_delivered(server, "ehr", len(everything)), timeout=60,
            what=lambda: f"{len(upstream.received)} received; queue {states(server, 'ehr')[-3:]}",
        )
        self.assertEqual(upstream.received, everything)
        rows = query(
            server.db_path,
            "SELECT batch_control_id, batch_position FROM messages ORDER BY id",
        )
        expected = [(f"B{size}", n + 1) for size in SIZES for n in range(size)]
        self.assertEqual(rows, expected)
        audited = query(server.db_path, "SELECT COUNT(*), COUNT(DISTINCT batch_control_id) FROM audit")
        self.assertEqual(audited, [(len(everything), 3)])


def batch_ack(payload: bytes, refuse: frozenset[str] = frozenset()) -> bytes:
    """An upstream's batch ACK: AA for each message (AE for those in ``refuse``)."""
    lines = payload.split(b"\r")
    bhs = lines[0].decode().split("|")
    ids = [line.decode().split("|")[9] for line in lines if line.startswith(b"MSH|")]
    out = [f"BHS|^~\\&|UPSTREAM|UPFAC|MLLPD|HOSP|20240101120000||||U-{bhs[10]}|{bhs[10]}"]
    for cid in ids:
        code = "AE" if cid in refuse else "AA"
        out.append(f"MSH|^~\\&|UPSTREAM|UPFAC|MLLPD|HOSP|20240101120000||ACK^A01^ACK|U-{cid}|P|2.5")
        out.append(f"MSA|{code}|{cid}")
        if code == "AE":
            out.append("ERR||PID^1^3|101^Required field missing^HL70357|E")
    out.append(f"BTS|{len(ids)}")
    return ("\r".join(out) + "\r").encode()


class ForwardBatchTests(TestCase):
    """``batch: forward`` on an mllp connector: batches go upstream whole."""

    async def test_batch_forwarded_whole_codes_mapped(self) -> None:
        """Each batch reaches upstream as one batch frame, messages exact and in order; upstream's AE dead-letters only its message."""
        upstream = MLLPUpstream(self, answer=lambda payload, n: batch_ack(payload, frozenset({"F2-0003"})))
        upstream.listen()
        config = (
            "connectors:\n" + mllp_connector("ehr", upstream.port, "    batch: forward\n")
            + FAST_RETRY + "\n"
        )
        server = await run_server(self, config)
        sent = {
            f"F{n}": [hl7_message(f"F{n}-{i:04d}", pid=f"PID|1||{i}^^^HOSP^MR") for i in range(size)]
            for n, size in ((1, 3), (2, 50))
        }
        assert server.port is not None
        replies = await deferToThread(
            send_batches, server.port, [batch_payload(b, m) for b, m in sent.items()]
        )
        self.assertEqual([len(msa(r)) for r in replies], [3, 50])
        total = sum(len(m) for m in sent.values())
        await until(
            lambda: sum(1 for row in states(server, "ehr") if row[1] in ("delivered", "dead")) == total,
            timeout=30, what=lambda: str(states(server, "ehr")[-3:]),
        )
        self.assertEqual(len(upstream.received), 2)
        for frame_, (batch_id, messages) in zip(upstream.received, sent.items(), strict=True):
            self.assertTrue(frame_.startswith(b"BHS|^~\\&|TESTAPP|TESTFAC|MLLPD|HOSP|"), frame_[:60])
            self.assertIn(f"||||{batch_id}\r".encode(), frame_.split(b"MSH|", 1)[0])
            self.assertEqual(frame_.split(b"\r", 1)[1], b"".join(messages) + f"BTS|{len(messages)}\r".encode())
        dead = [(cid, error) for cid, state, _, error in states(server, "ehr") if state == "dead"]
        self.assertEqual([cid for cid, _ in dead], ["F2-0003"])
        self.assertIn("upstream AE (ERR 101)", dead[0][1] or "")


class BatchLimitStartupTests(TestCase):
    """MLLP_MAX_BATCH_MESSAGES is checked at startup."""

    def test_bad_batch_limit_names_variable(self) -> None:
        """MLLP_MAX_BATCH_MESSAGES=0 stops startup with one line naming it."""
        server = spawn_server(self, env={"MLLP_MAX_BATCH_MESSAGES": "0"})
        self.assertNotEqual(server.wait(timeout=30), 0, server.output())
        self.assertEqual(len(server.stderr_lines), 1, server.output())
        self.assertTrue(
            server.stderr_lines[0].startswith("mllpd: MLLP_MAX_BATCH_MESSAGES: "),
            server.stderr_lines[0],
        )


def delivery(cid: str) -> Delivery:
    payload = hl7_message(cid)
    return Delivery(
        message_id=f"id-{cid}", connector="ehr", payload=payload, charset=None,
        codec="iso8859-1", control_id=cid, msg_type="ADT^A01", attempt=1,
    )


def exception_ack(payload: bytes, refuse: str, reference: str | None = None) -> bytes:
    """A batch ACK by exception: only the AE for ``refuse``, BHS-12 naming the batch."""
    bhs = payload.split(b"\r", 1)[0].decode().split("|")
    ref = bhs[10] if reference is None else reference
    return (
        f"BHS|^~\\&|UPSTREAM|UPFAC|MLLPD|HOSP|20240101120000||||U1|{ref}\r"
        f"MSH|^~\\&|UPSTREAM|UPFAC|MLLPD|HOSP|20240101120000||ACK^A01^ACK|U2|P|2.5\r"
        f"MSA|AE|{refuse}\rBTS|1\r"
    ).encode()


class ForwardConnectorTests(TestCase):
    """The mllp connector's batch judgement against a real upstream socket."""

    async def forward(self, answer: Any, ids: list[str]) -> list[Any]:
        upstream = MLLPUpstream(self, answer=answer)
        port = upstream.listen()
        spec = ConnectorSpec("ehr", "mllp", None, {
            "address": f"tcp:127.0.0.1:{port}", "ack_timeout": "5s", "batch": "forward"})
        connector: Any = build(spec, reactor, {})
        connector.start()
        self.addCleanup(connector.stop)
        outcomes: list[Any] = await connector.deliver_batch([delivery(c) for c in ids], "BX")
        self.assertEqual(len(upstream.received), 1)
        return outcomes

    async def test_acknowledgement_by_exception(self) -> None:
        """A batch ACK naming our batch with only an AE: that message is dead-lettered, the rest delivered."""
        outcomes = await self.forward(lambda p, n: exception_ack(p, "X2"), ["X1", "X2", "X3"])
        self.assertEqual([type(o).__name__ for o in outcomes], ["Delivered", "Dead", "Delivered"])

    async def test_missing_ack_is_retried(self) -> None:
        """A batch ACK for another batch, or one listing some AAs, leaves unlisted messages to retry."""
        foreign = await self.forward(lambda p, n: exception_ack(p, "X2", reference="OTHER"), ["X1", "X2"])
        self.assertEqual([type(o).__name__ for o in foreign], ["Retry", "Dead"])

        def partial(payload: bytes, n: int) -> bytes:
            ack = batch_ack(payload)
            x3 = ack.index(b"MSH|^~\\&|UPSTREAM|UPFAC|MLLPD|HOSP|20240101120000||ACK^A01^ACK|U-X3|")
            return ack[:x3] + b"BTS|2\r"

        outcomes = await self.forward(partial, ["X1", "X2", "X3"])
        self.assertEqual([type(o).__name__ for o in outcomes], ["Delivered", "Delivered", "Retry"])

    async def test_one_ack_for_the_batch(self) -> None:
        """A single ACK whose MSA-2 is the batch control id answers every message."""
        def whole(payload: bytes, n: int) -> bytes:
            return b"MSH|^~\\&|UP|F|M|H|20240101||ACK|U1|P|2.5\rMSA|AR|BX\r"

        outcomes = await self.forward(whole, ["X1", "X2"])
        self.assertEqual([type(o).__name__ for o in outcomes], ["Retry", "Retry"])
