"""Delivery workers over a real SQLite outbox: order, retries, dead letters, restarts.

The worker's timers run on a Clock (backoff is advanced, never slept); the
outbox is a real file on its own threads.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from mllpd.cli.store import Store
from mllpd.connectors import (
    Dead,
    Delivered,
    Delivery,
    IBatchConnector,
    IConnector,
    Outcome,
    Retry,
)
from mllpd.outbox import QueuedDelivery
from mllpd.outbox.sqlite import SQLiteOutbox
from mllpd.pipeline import RetryPolicy
from mllpd.relay import Relay, Worker
from tests.test_outbox import envelope, temp_db
from tests.upstreams import until

reactor: Any = _reactor


def Policy(max_attempts: int = 20) -> RetryPolicy:
    """Backoff of 10 s, 20 s, 40 s ... (the tests' rand of 0.5 means no jitter)."""
    return RetryPolicy(initial=10.0, max=300.0, multiplier=2.0, jitter=0.2, max_attempts=max_attempts)


@implementer(IConnector)
class ScriptedConnector:
    """Answers each delivery with the next scripted outcome (Delivered when
    the script is empty), holds it when the script says "hold", or raises
    (a connector bug) when it says "raise"."""

    def __init__(self, name: str, script: list[Outcome | str] | None = None) -> None:
        self.name = name
        self.script = list(script or [])
        self.seen: list[Delivery] = []
        self.held: list[Deferred[Outcome]] = []
        self.waiters: list[tuple[int, Deferred[None]]] = []
        self.started = self.stopped = False

    def start(self) -> None:
        self.started = True

    def deliver(self, delivery: Delivery) -> Deferred[Outcome]:
        self.seen.append(delivery)
        for n, d in list(self.waiters):
            if len(self.seen) >= n:
                self.waiters.remove((n, d))
                # On the next turn: by then the worker has handled the outcome.
                reactor.callLater(0, d.callback, None)
        step = self.script.pop(0) if self.script else Delivered()
        if step == "raise":
            raise RuntimeError("a connector bug")
        if step == "hold":
            held: Deferred[Outcome] = Deferred()
            self.held.append(held)
            return held
        assert not isinstance(step, str)
        return succeed(step)

    def wait_for(self, n: int) -> Deferred[None]:
        """Fires once ``n`` deliveries were attempted."""
        if len(self.seen) >= n:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self.waiters.append((n, d))
        return d

    def stop(self) -> Deferred[None]:
        self.stopped = True
        for held in self.held:
            if not held.called:
                held.callback(Retry("connection closed"))
        return succeed(None)


def queue_rows(path: str, connector: str) -> list[tuple[str, str, int, str | None]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(
            "SELECT m.control_id, d.state, d.attempts, d.last_error FROM deliveries d"
            " JOIN messages m USING (message_id) WHERE d.connector = ? ORDER BY d.seq",
            (connector,),
        ).fetchall()
    finally:
        conn.close()


class RelayCase(TestCase):
    """A real outbox file and a worker on a Clock."""

    timeout = 15

    def setUp(self) -> None:
        self.path = temp_db(self)
        self.clock = Clock()
        self.clock.advance(1_000_000)

    def open(self) -> SQLiteOutbox:
        outbox = SQLiteOutbox(self.path, reactor, wall_clock=self.clock.seconds)
        outbox.start()
        self.addCleanup(outbox.close)
        return outbox

    def worker(self, outbox: SQLiteOutbox, connector: ScriptedConnector, **kw: Any) -> Worker:
        worker = Worker(
            connector, outbox, kw.pop("retry", Policy()), self.clock,
            rand=lambda: 0.5, **kw,
        )
        relay = Relay([worker])
        outbox.add_listener(relay.notify)
        worker.start()
        self.addCleanup(worker.stop)
        return worker

    async def store(
        self, outbox: SQLiteOutbox, *control_ids: str, routes: tuple[str, ...] = ("up",),
        lane: int = 0,
    ) -> None:
        for c in control_ids:
            await outbox.store(envelope(c, received_at=self.clock.seconds())._replace(
                routes=routes, lanes=(lane,) * len(routes)))

    async def store_keyed(self, outbox: SQLiteOutbox, *control_ids: str) -> None:
        """Store messages whose order key is the control id's letter: A1, A2 share a lane."""
        for c in control_ids:
            await self.store(outbox, c, lane=ord(c[0]))

    async def settle(self, outbox: SQLiteOutbox) -> None:
        """Wait until every state change queued so far is committed."""
        await outbox.mark_in_flight(-1, 0)



class RelayTests(RelayCase):
    async def test_delivers_in_order_exact_bytes(self) -> None:
        """Every routed message reaches the connector once, in arrival order, byte for byte."""
        outbox = self.open()
        up = ScriptedConnector("up")
        self.worker(outbox, up)
        await self.store(outbox, *[f"C{i}" for i in range(10)])
        await up.wait_for(10)
        await self.settle(outbox)
        self.assertEqual([d.control_id for d in up.seen], [f"C{i}" for i in range(10)])
        stored = sqlite3.connect(self.path).execute(
            "SELECT message_id, payload FROM messages ORDER BY id").fetchall()
        self.assertEqual([(d.message_id, d.payload) for d in up.seen], stored)
        self.assertEqual({r[1] for r in queue_rows(self.path, "up")}, {"delivered"})

    async def test_only_routed_connectors_get_the_message(self) -> None:
        """A message routed to one connector never reaches another."""
        outbox = self.open()
        a, b = ScriptedConnector("a"), ScriptedConnector("b")
        self.worker(outbox, a)
        self.worker(outbox, b)
        await self.store(outbox, "ONLY-A", routes=("a",))
        await self.store(outbox, "BOTH", routes=("a", "b"))
        await a.wait_for(2)
        await b.wait_for(1)
        self.assertEqual([d.control_id for d in a.seen], ["ONLY-A", "BOTH"])
        self.assertEqual([d.control_id for d in b.seen], ["BOTH"])

    async def test_connector_that_raises_is_retried_not_stopped(self) -> None:
        """A connector that raises (a bug) gets its delivery retried after the backoff; the queue goes on, in order."""
        outbox = self.open()
        up = ScriptedConnector("up", ["raise"])
        self.worker(outbox, up)
        await self.store(outbox, "FIRST", "SECOND")
        await up.wait_for(1)
        await self.settle(outbox)
        self.assertEqual(queue_rows(self.path, "up")[0], ("FIRST", "pending", 1, "internal error: RuntimeError"))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.clock.advance(10.1)
        await up.wait_for(3)
        await self.settle(outbox)
        self.assertEqual([d.control_id for d in up.seen], ["FIRST", "FIRST", "SECOND"])
        self.assertEqual({s for _, s, _, _ in queue_rows(self.path, "up")}, {"delivered"})

    async def test_retry_backs_off_and_keeps_order(self) -> None:
        """A failing message is retried after the backoff, and the next one waits behind it."""
        outbox = self.open()
        up = ScriptedConnector("up", [Retry("503 Service Unavailable"), Retry("timeout")])
        self.worker(outbox, up)
        await self.store(outbox, "FIRST", "SECOND")
        await up.wait_for(1)
        await self.settle(outbox)
        self.assertEqual(queue_rows(self.path, "up")[0], ("FIRST", "pending", 1, "503 Service Unavailable"))
        self.clock.advance(9.9)
        self.assertEqual(len(up.seen), 1, "retried before the 10 s backoff")
        self.clock.advance(0.2)
        await up.wait_for(2)
        self.clock.advance(19.9)
        self.assertEqual(len(up.seen), 2, "second backoff must double")
        self.clock.advance(0.2)
        await up.wait_for(4)
        await self.settle(outbox)
        self.assertEqual([d.control_id for d in up.seen], ["FIRST", "FIRST", "FIRST", "SECOND"])
        self.assertEqual([d.attempt for d in up.seen], [1, 2, 3, 1])
        self.assertEqual(
            [(c, s, n) for c, s, n, _ in queue_rows(self.path, "up")],
            [("FIRST", "delivered", 3), ("SECOND", "delivered", 1)],
        )

    async def test_a_fifo_in_backoff_does_not_read_its_queue(self) -> None:
        """While the head waits out its backoff, new messages and polls cost no queue reads."""
        outbox = self.open()
        reads: list[object] = []
        fetch = outbox.fetch

        def counted(*args: Any) -> Deferred[Any]:
            reads.append(args)
            return fetch(*args)

        outbox.fetch = counted  # type: ignore[method-assign]
        up = ScriptedConnector("up", [Retry("503")])
        self.worker(outbox, up)
        await self.store(outbox, "HEAD")
        await up.wait_for(1)
        before = len(reads)
        await self.store(outbox, "N1", "N2", "N3")
        self.clock.advance(5)
        self.assertEqual(len(reads), before)
        self.clock.advance(5.1)
        await up.wait_for(5)
        self.assertEqual([d.control_id for d in up.seen], ["HEAD", "HEAD", "N1", "N2", "N3"])

    async def test_retry_after_overrides_backoff(self) -> None:
        """An upstream's Retry-After replaces the computed backoff, capped at the policy's max."""
        outbox = self.open()
        up = ScriptedConnector("up", [Retry("429", after=120.0), Retry("429", after=86400.0)])
        self.worker(outbox, up)
        await self.store(outbox, "LIMITED")
        await up.wait_for(1)
        self.clock.advance(119)
        self.assertEqual(len(up.seen), 1)
        self.clock.advance(1.5)
        await up.wait_for(2)
        self.clock.advance(299)
        self.assertEqual(len(up.seen), 2)
        self.clock.advance(1.5)
        await up.wait_for(3)

    async def test_dead_letter_then_next(self) -> None:
        """A refused message goes to the dead-letter queue and the next one is delivered."""
        outbox = self.open()
        up = ScriptedConnector("up", [Dead("AE: unknown patient")])
        self.worker(outbox, up)
        await self.store(outbox, "BAD", "GOOD")
        await up.wait_for(2)
        await self.settle(outbox)
        self.assertEqual(
            queue_rows(self.path, "up"),
            [("BAD", "dead", 1, "AE: unknown patient"), ("GOOD", "delivered", 1, None)],
        )

    async def test_attempts_run_out(self) -> None:
        """After max_attempts failures the message is dead-lettered with the reason."""
        outbox = self.open()
        up = ScriptedConnector("up", [Retry("refused")] * 3)
        self.worker(outbox, up, retry=Policy(max_attempts=3))
        await self.store(outbox, "NEVER")
        await up.wait_for(1)
        self.clock.advance(10.1)
        await up.wait_for(2)
        self.clock.advance(20.1)
        await up.wait_for(3)
        await self.settle(outbox)
        self.assertEqual(
            queue_rows(self.path, "up"),
            [("NEVER", "dead", 3, "gave up after 3 attempts: refused")],
        )

    async def test_restart_resumes_in_order(self) -> None:
        """A row left in flight by a crash is delivered again first after a restart, then the rest, in order."""
        outbox = self.open()
        await self.store(outbox, "M1", "M2", "M3")
        await outbox.close()
        # What kill -9 during the first delivery leaves behind.
        conn = sqlite3.connect(self.path, isolation_level=None)
        conn.execute("UPDATE deliveries SET state = 'in_flight', attempts = 0 WHERE seq = 1")
        conn.close()

        again = self.open()
        up = ScriptedConnector("up")
        self.worker(again, up)
        await up.wait_for(3)
        self.assertEqual([d.control_id for d in up.seen], ["M1", "M2", "M3"])
        await self.settle(again)
        self.assertEqual({r[1] for r in queue_rows(self.path, "up")}, {"delivered"})

    async def test_stop_waits_for_the_delivery_then_closes(self) -> None:
        """Stopping lets the delivery in progress finish, then stops the connector."""
        outbox = self.open()
        up = ScriptedConnector("up", ["hold"])
        worker = self.worker(outbox, up)
        await self.store(outbox, "SLOW")
        await up.wait_for(1)
        stopped = worker.stop(timeout=5.0)
        self.assertFalse(stopped.called)
        self.assertFalse(up.stopped)
        up.held[0].callback(Delivered())
        await stopped
        self.assertTrue(up.stopped)
        await self.settle(outbox)
        self.assertEqual(queue_rows(self.path, "up")[0][1], "delivered")

    async def test_stop_gives_up_on_a_hung_delivery(self) -> None:
        """A delivery that does not end within the stop timeout is cut off and stays queued."""
        outbox = self.open()
        up = ScriptedConnector("up", ["hold"])
        worker = self.worker(outbox, up)
        await self.store(outbox, "HUNG")
        await up.wait_for(1)
        stopped = worker.stop(timeout=5.0)
        self.clock.advance(5.0)
        await stopped
        self.assertTrue(up.stopped)
        await outbox.close()
        self.assertEqual(queue_rows(self.path, "up")[0][:2], ("HUNG", "pending"))

    async def test_stop_is_bounded_even_if_the_connector_hangs(self) -> None:
        """A connector that never finishes closing cannot hold up the shutdown past both timeouts."""
        outbox = self.open()
        up = ScriptedConnector("up", ["hold"])
        up.stop = lambda: Deferred()  # type: ignore[method-assign]
        worker = self.worker(outbox, up)
        await self.store(outbox, "STUCK")
        await up.wait_for(1)
        stopped = worker.stop(timeout=1.0)
        self.clock.advance(1.0)
        self.assertNoResult(stopped)
        self.clock.advance(0.5)
        self.assertIsNone(self.successResultOf(stopped))
        up.stop = lambda: succeed(None)  # type: ignore[method-assign]
        up.held[0].callback(Retry("late"))

    async def test_in_flight_row_is_visible(self) -> None:
        """While upstream works on a message, its queue row says in_flight."""
        outbox = self.open()
        up = ScriptedConnector("up", ["hold"])
        self.worker(outbox, up)
        await self.store(outbox, "BUSY")
        await up.wait_for(1)
        await self.settle(outbox)
        self.assertEqual(queue_rows(self.path, "up")[0][:2], ("BUSY", "in_flight"))
        up.held[0].callback(Delivered())

    async def test_replayed_row_is_picked_up_by_polling(self) -> None:
        """A row another process queues (mllp-cli replay) is delivered on the next poll."""
        outbox = self.open()
        up = ScriptedConnector("up", [Dead("AE")])
        self.worker(outbox, up)
        await self.store(outbox, "REPLAY-ME")
        await up.wait_for(1)
        await self.settle(outbox)
        conn = sqlite3.connect(self.path, isolation_level=None)
        conn.execute(
            "INSERT INTO deliveries (message_id, connector, state, attempts, next_attempt, updated_at)"
            " SELECT message_id, connector, 'pending', 0, 0, 0 FROM deliveries WHERE state = 'dead'"
        )
        conn.execute("DELETE FROM deliveries WHERE state = 'dead'")
        conn.close()
        self.clock.advance(1.0)
        await up.wait_for(2)
        self.assertEqual(up.seen[1].message_id, up.seen[0].message_id)

    async def test_row_deleted_during_backoff_is_not_retried(self) -> None:
        """A message deleted (mllp-cli delete) while it waits out its backoff
        is not attempted again; the next one in the queue is delivered."""
        outbox = self.open()
        up = ScriptedConnector("up", [Retry("503 Service Unavailable")])
        self.worker(outbox, up)
        await self.store(outbox, "GONE", "NEXT")
        await up.wait_for(1)
        await self.settle(outbox)
        conn = sqlite3.connect(self.path, isolation_level=None)
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("DELETE FROM messages WHERE control_id = 'GONE'")
        conn.close()
        self.clock.advance(10.1)
        await up.wait_for(2)
        await self.settle(outbox)
        self.assertEqual([d.control_id for d in up.seen], ["GONE", "NEXT"])
        self.assertEqual(queue_rows(self.path, "up"), [("NEXT", "delivered", 1, None)])


def by_key(seen: list[Delivery]) -> dict[str, list[str]]:
    """Control ids as the connector saw them, per order key (the first letter)."""
    out: dict[str, list[str]] = {}
    for d in seen:
        out.setdefault(d.control_id[0], []).append(d.control_id)
    return out


class LaneTests(RelayCase):
    """``lanes: N``: different keys in parallel, each key in order."""

    async def test_different_keys_in_parallel_same_key_in_order(self) -> None:
        """Up to N deliveries are in flight at once, one per key; a key's next message waits for its previous one."""
        outbox = self.open()
        up = ScriptedConnector("up", ["hold"] * 12)
        # Queued before the worker starts: its first read sees every key.
        await self.store_keyed(outbox, "A1", "A2", "B1", "A3", "B2", "C1", "D1", "C2", "D2")
        worker = self.worker(outbox, up, lanes=3)
        await up.wait_for(3)
        self.assertEqual([d.control_id for d in up.seen], ["A1", "B1", "C1"])
        self.assertEqual(worker.in_flight, 3)
        await self.settle(outbox)
        self.assertEqual(
            [r[:2] for r in queue_rows(self.path, "up") if r[1] == "in_flight"],
            [("A1", "in_flight"), ("B1", "in_flight"), ("C1", "in_flight")],
        )
        # B1 done: B2 goes next; C1 done: D1, the oldest head of a free key.
        up.held[1].callback(Delivered())
        await up.wait_for(4)
        self.assertEqual(up.seen[3].control_id, "B2")
        up.held[2].callback(Delivered())
        await up.wait_for(5)
        self.assertEqual(up.seen[4].control_id, "D1")
        while len(up.seen) < 9:
            for held in up.held:
                if not held.called:
                    held.callback(Delivered())
            await up.wait_for(min(len(up.seen) + 1, 9))
        for held in up.held:
            if not held.called:
                held.callback(Delivered())
        await self.settle(outbox)
        self.assertEqual(
            by_key(up.seen),
            {"A": ["A1", "A2", "A3"], "B": ["B1", "B2"], "C": ["C1", "C2"], "D": ["D1", "D2"]},
        )
        self.assertEqual({r[1] for r in queue_rows(self.path, "up")}, {"delivered"})

    async def test_backoff_holds_back_only_its_own_key(self) -> None:
        """While one key waits out a backoff, other keys are delivered; its own later messages wait."""
        outbox = self.open()
        up = ScriptedConnector("up", [Retry("503 Service Unavailable")])
        self.worker(outbox, up, lanes=2)
        await self.store_keyed(outbox, "A1", "A2", "B1", "B2", "C1", "A3", "C2")
        await up.wait_for(5)
        await self.settle(outbox)
        # B's and C's deliveries overlap, so only each key's order is fixed.
        self.assertEqual(by_key(up.seen), {"A": ["A1"], "B": ["B1", "B2"], "C": ["C1", "C2"]})
        self.clock.advance(10.1)
        await up.wait_for(8)
        self.assertEqual(by_key(up.seen)["A"], ["A1", "A1", "A2", "A3"])
        self.assertEqual([d.attempt for d in up.seen if d.control_id == "A1"], [1, 2])

    async def test_a_blocked_key_with_a_long_queue_does_not_starve_others(self) -> None:
        """A key in backoff with far more rows queued than one read holds does not stop the keys queued behind it."""
        outbox = self.open()
        up = ScriptedConnector("up", [Retry("refused")])
        worker = self.worker(outbox, up, lanes=2)
        long = [f"A{i}" for i in range(5 * worker.buffer_limit)]
        await self.store_keyed(outbox, *long, "B1", "B2", "C1")
        await up.wait_for(4)
        # B's and C's deliveries overlap, so only each key's order is fixed.
        self.assertEqual(by_key(up.seen), {"A": ["A0"], "B": ["B1", "B2"], "C": ["C1"]})
        # Nothing but A is left, and A waits: no read returns anything else.
        self.clock.advance(5)
        self.assertEqual(len(up.seen), 4)
        self.clock.advance(5.1)
        await up.wait_for(4 + 2 * worker.buffer_limit)
        # Rows held in memory stay bounded however long the key's queue is.
        self.assertLessEqual(worker._buffered, worker.buffer_limit)
        await up.wait_for(4 + len(long))
        await self.settle(outbox)
        self.assertEqual(by_key(up.seen)["A"], ["A0", *long])

    async def test_dead_letter_then_the_same_keys_next_message(self) -> None:
        """A dead-lettered message lets its key's next message go, in order, while other keys carry on."""
        outbox = self.open()
        up = ScriptedConnector("up", [Dead("AE: unknown patient")])
        self.worker(outbox, up, lanes=2)
        await self.store_keyed(outbox, "A1", "A2", "B1", "A3")
        await up.wait_for(4)
        await self.settle(outbox)
        self.assertEqual(by_key(up.seen), {"A": ["A1", "A2", "A3"], "B": ["B1"]})
        self.assertEqual(queue_rows(self.path, "up")[0], ("A1", "dead", 1, "AE: unknown patient"))

    async def test_replay_keeps_the_key(self) -> None:
        """A replayed dead letter goes back into its own key's lane, after that key's queued messages."""
        outbox = self.open()
        up = ScriptedConnector("up", [Dead("AE"), "hold"])
        self.worker(outbox, up, lanes=2)
        await self.store_keyed(outbox, "A1", "A2", "A3")
        await up.wait_for(2)  # A1 dead, A2 held in flight
        await self.settle(outbox)
        with Store(self.path) as store:
            replayed = store.replay("up", None, self.clock.seconds())
        self.assertEqual(replayed, [up.seen[0].message_id])
        lanes = sqlite3.connect(self.path).execute(
            "SELECT DISTINCT lane FROM deliveries").fetchall()
        self.assertEqual(lanes, [(ord("A"),)])
        self.clock.advance(1.0)  # the poll that finds the replayed row
        self.assertEqual(len(up.seen), 2, "a replay must not overtake its key's message in flight")
        up.held[0].callback(Delivered())
        await up.wait_for(4)
        self.assertEqual([d.control_id for d in up.seen], ["A1", "A2", "A3", "A1"])

    async def test_restart_with_lanes_in_flight(self) -> None:
        """Rows left in flight on several lanes by a crash are delivered again first, each key in order."""
        outbox = self.open()
        await self.store_keyed(outbox, "A1", "B1", "A2", "B2", "C1")
        await outbox.close()
        conn = sqlite3.connect(self.path, isolation_level=None)
        conn.execute("UPDATE deliveries SET state = 'in_flight' WHERE seq IN (1, 2)")
        conn.close()
        again = self.open()
        up = ScriptedConnector("up")
        self.worker(again, up, lanes=4)
        await up.wait_for(5)
        self.assertEqual(
            by_key(up.seen), {"A": ["A1", "A2"], "B": ["B1", "B2"], "C": ["C1"]},
        )

    async def test_a_key_freed_during_a_read_is_read_again(self) -> None:
        """A key whose message finishes while a queue read is under way still gets its next message delivered."""
        outbox = self.open()
        gate: list[Deferred[None]] = []
        fetch = outbox.fetch

        def gated(*args: Any) -> Deferred[Any]:
            if not gate:
                return fetch(*args)
            return gate.pop().addCallback(lambda _: fetch(*args))

        outbox.fetch = gated  # type: ignore[method-assign]
        up = ScriptedConnector("up", ["hold"] * 5)
        self.worker(outbox, up, lanes=5)
        await self.store_keyed(outbox, "A1", "B1")
        await up.wait_for(2)
        await self.store_keyed(outbox, "C1")
        await up.wait_for(3)
        await self.store_keyed(outbox, "C2", "D1")  # C2 waits behind C1
        await up.wait_for(4)
        # A1 done: the read it starts waits at the gate while C1 finishes
        # and E1 arrives; the read finds E1 and must not pass over C2.
        opened: Deferred[None] = Deferred()
        gate.append(opened)
        up.held[0].callback(Delivered())
        up.held[2].callback(Delivered())
        await self.store_keyed(outbox, "E1")
        opened.callback(None)
        await up.wait_for(6)
        self.assertEqual(sorted(d.control_id for d in up.seen[4:]), ["C2", "E1"])
        for held in up.held:
            if not held.called:
                held.callback(Delivered())

    async def test_keys_waiting_out_a_backoff_are_bounded(self) -> None:
        """When upstream refuses everything, no more than max_waiting keys hold a backoff at once."""
        outbox = self.open()
        up = ScriptedConnector("up", [Retry("down")] * 1000)
        worker = self.worker(outbox, up, lanes=2, max_waiting=3)
        await self.store_keyed(outbox, *[f"{chr(ord('A') + i)}1" for i in range(10)])
        await up.wait_for(3)
        self.clock.advance(5)
        self.assertEqual(len(up.seen), 3)
        self.assertEqual(len(worker._waiting), 3)
        self.clock.advance(5.1)
        await up.wait_for(6)
        self.assertLessEqual(len(worker._waiting), 3)

    async def test_one_lane_is_one_fifo_whatever_the_keys(self) -> None:
        """With lanes: 1 a retried message holds back every later one, whatever its key."""
        outbox = self.open()
        up = ScriptedConnector("up", [Retry("503")])
        self.worker(outbox, up)
        await self.store_keyed(outbox, "A1", "B1", "C1")
        await up.wait_for(1)
        self.clock.advance(5)
        self.assertEqual([d.control_id for d in up.seen], ["A1"])
        self.clock.advance(5.1)
        await up.wait_for(4)
        self.assertEqual([d.control_id for d in up.seen], ["A1", "A1", "B1", "C1"])

@implementer(IBatchConnector)
class BatchRecorder:
    """Forwards batches whole; each batch's outcomes are scripted in turn."""

    forward_batches = True

    def __init__(self, scripts: list[list[Outcome]]) -> None:
        self.name = "up"
        self.scripts = scripts
        self.batches: list[list[str]] = []
        self.singles: list[str] = []

    def start(self) -> None:
        pass

    def stop(self) -> Deferred[None]:
        return succeed(None)

    def deliver(self, delivery: Delivery) -> Deferred[Outcome]:
        self.singles.append(delivery.control_id)
        return succeed(Delivered())

    def deliver_batch(self, deliveries: Any, batch_control_id: str) -> Deferred[list[Outcome]]:
        self.batches.append([d.control_id for d in deliveries])
        script = self.scripts.pop(0) if self.scripts else []
        return succeed(script or [Delivered()] * len(deliveries))


class LaneBatchTests(RelayCase):
    async def test_batch_forwarded_per_key_and_retried_together(self) -> None:
        """With lanes: 2 a batch's messages of one key go upstream together; once one is retried, the later ones wait with it, and the other key's message goes alone."""
        outbox = self.open()
        for position, c in enumerate(["A1", "A2", "B3", "A4"], 1):
            await outbox.store(envelope(c, received_at=self.clock.seconds())._replace(
                routes=("up",), lanes=(ord(c[0]),), batch_control_id="BAT",
                batch_position=position))
        up = BatchRecorder([[Delivered(), Retry("503"), Delivered()]])
        self.worker(outbox, up, lanes=2)  # type: ignore[arg-type]
        await until(lambda: (up.batches, up.singles), lambda seen: seen[1] == ["B3"]
                    and len(seen[0]) == 1, timeout=10, what=lambda: str((up.batches, up.singles)))
        self.assertEqual(up.batches, [["A1", "A2", "A4"]])
        self.clock.advance(10.1)
        await until(lambda: len(up.batches), lambda n: n == 2, timeout=10,
                    what=lambda: str(up.batches))
        self.assertEqual(up.batches, [["A1", "A2", "A4"], ["A2", "A4"]])
        await self.settle(outbox)
        self.assertEqual({r[1] for r in queue_rows(self.path, "up")}, {"delivered"})


class _ByStateQueue:
    """A queue read by state, as PostgreSQL's is: every read and every
    delivered mark waits until the test fires it."""

    def __init__(self) -> None:
        self.reads: list[Deferred[list[QueuedDelivery]]] = []
        self.marks: list[Deferred[None]] = []

    def fetch(
        self, connector: str, after: int, limit: int,
        skip_lanes: Any = (), skip_seqs: Any = (),
    ) -> Deferred[list[QueuedDelivery]]:
        d: Deferred[list[QueuedDelivery]] = Deferred()
        self.reads.append(d)
        return d

    def mark_in_flight(self, seq: int, now: float) -> Deferred[None]:
        return succeed(None)

    def mark_delivered(self, seq: int, now: float) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.marks.append(d)
        return d


class ReadByStateTests(SynchronousTestCase):
    def test_read_begun_before_the_mark_committed_does_not_deliver_again(self) -> None:
        """A queue read whose snapshot predates a delivered mark's commit still shows the row pending; the worker does not deliver it again."""
        queue, clock = _ByStateQueue(), Clock()
        connector = ScriptedConnector("up")
        worker = Worker(connector, queue, Policy(), clock, rand=lambda: 0.5)  # type: ignore[arg-type]
        worker.start()
        self.addCleanup(worker.stop)
        row = QueuedDelivery(7, "m7", "up", 0, 0.0, 0.0, "C7", "ADT^A01", None, b"MSH|^~\\&|")
        queue.reads[0].callback([row])
        self.assertEqual(len(connector.seen), 1)
        # The next read starts before the mark is committed, and returns after.
        self.assertEqual(len(queue.reads), 2)
        queue.marks[0].callback(None)
        queue.reads[1].callback([row])
        self.assertEqual(len(connector.seen), 1)
        # A read begun after the commit no longer shows it.
        clock.advance(1.0)
        queue.reads[2].callback([])
        self.assertEqual([d.control_id for d in connector.seen], ["C7"])
        self.assertEqual(worker._finished, {})
