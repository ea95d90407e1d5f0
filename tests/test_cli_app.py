"""The mllp-cli terminal UI driven by Textual's pilot, against an outbox that
the real ``twistd mllp`` process is writing to.

Textual needs a running asyncio loop; trial's and pytest-twisted's reactors
need not be asyncio ones. Each scenario therefore runs ``asyncio.run`` on a
thread of its own, which works the same under both runners, and the test
waits for that thread with a bound.

Until routing lands, the queue rows (pending, dead) for the messages the
server stored are added with SQL, as the router will write them.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable, Coroutine
from typing import Any

from textual.pilot import Pilot
from textual.widgets import DataTable
from twisted.trial.unittest import SynchronousTestCase

from mllpd.cli.app import ConfirmScreen, MessageScreen, OutboxApp
from mllpd.cli.store import Store
from tests.outboxrows import add_delivery, add_message, connect, new_outbox
from tests.serverproc import MLLPClient, ServerProcess, hl7_message, query, start_server

SCENARIO_TIMEOUT = 120.0
# Bound on polls while waiting for the UI to catch up (each 50 ms).
MAX_POLLS = 400


def run_scenario(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run an async scenario on its own thread and event loop; re-raise what
    it raised; fail if it does not end in time."""
    failure: list[BaseException] = []

    def target() -> None:
        try:
            asyncio.run(scenario())
        except BaseException as e:
            failure.append(e)

    thread = threading.Thread(target=target, name="textual-scenario", daemon=True)
    thread.start()
    thread.join(SCENARIO_TIMEOUT)
    if thread.is_alive():
        raise AssertionError(f"TUI scenario still running after {SCENARIO_TIMEOUT}s")
    if failure:
        raise failure[0]


def table_rows(app: OutboxApp, table_id: str) -> list[list[Any]]:
    table = app.query_one(table_id, DataTable)
    return [list(table.get_row_at(i)) for i in range(table.row_count)]


def connector_counts(app: OutboxApp) -> dict[str, tuple[int, int, int, int]]:
    """connector -> (pending, in flight, delivered, dead) as shown on screen."""
    return {r[0]: (r[1], r[2], r[3], r[4]) for r in table_rows(app, "#connectors")}


async def settle(app: OutboxApp, pilot: Pilot[None]) -> None:
    """Let started work (outbox calls, screen changes) finish and redraw."""
    await pilot.pause()
    await app.workers.wait_for_complete()
    await pilot.pause()


async def wait_for_reloads(app: OutboxApp, pilot: Pilot[None], count: int) -> None:
    """Wait until the interval timer has reloaded the data ``count`` more times."""
    target = app.reloads + count
    for _ in range(MAX_POLLS):
        if app.reloads >= target:
            return
        await pilot.pause(0.05)
    raise AssertionError(f"the UI did not refresh {count} times on its interval")


def send(server: ServerProcess, control_ids: list[str]) -> dict[str, str]:
    """Send messages to the server, each acknowledged AA; control id -> message id."""
    assert server.port is not None
    with MLLPClient(server.port) as client:
        for cid in control_ids:
            ack = client.request(hl7_message(cid))
            assert (ack.code, ack.control_id) == ("AA", cid), ack
    marks = ", ".join("?" * len(control_ids))
    rows = query(
        server.db_path,
        f"SELECT control_id, message_id FROM messages WHERE control_id IN ({marks})",
        control_ids,
    )
    return dict(rows)


def queue(path: str, rows: list[tuple[str, str, str]], *, now: float = 0.0) -> None:
    """Add (message id, connector, state) queue rows as routing will."""
    conn = connect(path)
    try:
        for mid, connector, state in rows:
            attempts, error = (20, "AE: unknown patient") if state == "dead" else (0, None)
            add_delivery(conn, mid, connector, state, updated_at=now, attempts=attempts,
                         last_error=error)
    finally:
        conn.close()


class LiveOutboxTests(SynchronousTestCase):
    def test_counts_view_and_replay_while_server_writes(self) -> None:
        """With the server storing messages, the UI shows live queue counts,
        a message field by field, and replays a confirmed dead letter to the
        tail of its queue (and nothing when the dialog is declined)."""
        server = start_server(self)
        first = send(server, [f"LIVE{i}" for i in range(6)])
        ids = [first[f"LIVE{i}"] for i in range(6)]
        queue(server.db_path,
              [(mid, "ehr", "pending") for mid in ids[:4]]
              + [(mid, "ehr", "dead") for mid in ids[4:]]
              + [(mid, "lake", "delivered") for mid in ids])

        async def scenario() -> None:
            store = Store(server.db_path)
            app = OutboxApp(store, interval=0.2)
            try:
                async with app.run_test(size=(200, 50)) as pilot:
                    await settle(app, pilot)
                    self.assertEqual(connector_counts(app),
                                     {"ehr": (4, 0, 0, 2), "lake": (0, 0, 6, 0)})

                    # More traffic while the UI is open: it refreshes by itself.
                    more = await asyncio.to_thread(send, server, ["LIVE6", "LIVE7", "LIVE8"])
                    await asyncio.to_thread(
                        queue, server.db_path, [(m, "ehr", "pending") for m in more.values()]
                    )
                    await wait_for_reloads(app, pilot, 2)
                    self.assertEqual(connector_counts(app)["ehr"], (7, 0, 0, 2))

                    # The dead-letter list of the first connector, head first.
                    self.assertEqual(app.connector, "ehr")
                    self.assertEqual(app.state, "dead")
                    dead = table_rows(app, "#messages")
                    self.assertEqual([(r[0], r[2], r[4], r[7]) for r in dead],
                                     [(ids[4], "dead", "LIVE4", 20), (ids[5], "dead", "LIVE5", 20)])

                    # View the selected one.
                    await pilot.press("v")
                    await settle(app, pilot)
                    screen = app.screen
                    self.assertIsInstance(screen, MessageScreen)
                    assert isinstance(screen, MessageScreen)
                    self.assertIn("    PID-5 (patient_name): DOE^JANE", screen.lines)
                    self.assertIn("    MSH-10 (message_control_id): LIVE4", screen.lines)
                    await pilot.press("d")  # the list's keys do nothing over the view
                    await settle(app, pilot)
                    self.assertIs(app.screen, screen)
                    await pilot.press("escape")
                    await settle(app, pilot)
                    self.assertNotIsInstance(app.screen, MessageScreen)

                    # The selection survives the interval refresh.
                    await pilot.press("tab", "down")
                    await wait_for_reloads(app, pilot, 2)
                    selected = app.selected_message()
                    self.assertEqual(selected.control_id if selected else None, "LIVE5")
                    await pilot.press("up")
                    await settle(app, pilot)
                    selected = app.selected_message()
                    self.assertEqual(selected.control_id if selected else None, "LIVE4")

                    # Replay, declined: nothing changes.
                    await pilot.press("r")
                    await settle(app, pilot)
                    self.assertIsInstance(app.screen, ConfirmScreen)
                    await pilot.click("#no")
                    await settle(app, pilot)
                    self.assertEqual(app.status, "cancelled")
                    self.assertEqual(connector_counts(app)["ehr"], (7, 0, 0, 2))

                    # Replay, confirmed.
                    await pilot.press("r")
                    await settle(app, pilot)
                    await pilot.click("#yes")
                    await settle(app, pilot)
                    self.assertEqual(app.status, "replayed 1 dead letter(s) of ehr")
                    self.assertEqual(connector_counts(app)["ehr"], (8, 0, 0, 1))
                    self.assertEqual([r[4] for r in table_rows(app, "#messages")], ["LIVE5"])
            finally:
                store.close()

        run_scenario(scenario)

        tail = query(server.db_path,
                     "SELECT message_id, state, attempts, last_error FROM deliveries"
                     " WHERE connector = 'ehr' ORDER BY seq DESC LIMIT 1")
        self.assertEqual(tail, [(ids[4], "pending", 0, None)])
        # The server kept serving throughout.
        self.assertEqual(send(server, ["AFTER"]).keys(), {"AFTER"})
        self.assertTrue(server.alive())


class DialogTests(SynchronousTestCase):
    """Delete and purge from the UI, each behind its confirmation."""

    def setUp(self) -> None:
        self.path = new_outbox(self)
        conn = connect(self.path)
        self.addCleanup(conn.close)
        self.ids = [add_message(conn, f"D{i}", received_at=1000.0 + i) for i in range(3)]
        for mid in self.ids:
            add_delivery(conn, mid, "ehr", "dead", updated_at=1000.0)
        add_delivery(conn, self.ids[0], "lake", "pending", updated_at=1000.0)

    def test_delete_and_purge(self) -> None:
        """Delete removes the selected message once confirmed; purge empties
        the dead-letter queue once confirmed; "n" cancels either."""

        async def scenario() -> None:
            store = Store(self.path)
            app = OutboxApp(store, interval=0, clock=lambda: 2000.0)
            try:
                async with app.run_test(size=(200, 50)) as pilot:
                    await settle(app, pilot)
                    self.assertEqual(connector_counts(app),
                                     {"ehr": (0, 0, 0, 3), "lake": (1, 0, 0, 0)})
                    await pilot.press("d")
                    await settle(app, pilot)
                    await pilot.press("n")
                    await settle(app, pilot)
                    self.assertEqual(connector_counts(app)["ehr"], (0, 0, 0, 3))

                    await pilot.press("d")
                    await settle(app, pilot)
                    await pilot.press("y")
                    await settle(app, pilot)
                    self.assertEqual(app.status, f"deleted {self.ids[0]}")
                    # Gone from every queue, lake's too.
                    self.assertEqual(connector_counts(app), {"ehr": (0, 0, 0, 2)})

                    await pilot.press("p")
                    await settle(app, pilot)
                    self.assertIsInstance(app.screen, ConfirmScreen)
                    await pilot.press("y")
                    await settle(app, pilot)
                    self.assertEqual(app.status, "purged 2 dead letter(s) of ehr")
                    self.assertEqual(connector_counts(app), {})
            finally:
                store.close()

        run_scenario(scenario)
        self.assertEqual(query(self.path, "SELECT COUNT(*) FROM messages"), [(0,)])

    def test_busy_outbox_is_reported_not_fatal(self) -> None:
        """A replay that cannot get the write lock in time shows an error in
        the status line; the UI stays up and nothing changes."""
        writer = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.addCleanup(writer.close)

        async def scenario() -> None:
            store = Store(self.path, busy_timeout=0.1)
            app = OutboxApp(store, interval=0)
            try:
                async with app.run_test(size=(200, 50)) as pilot:
                    await settle(app, pilot)
                    writer.execute("BEGIN IMMEDIATE")
                    try:
                        await pilot.press("r")
                        await settle(app, pilot)
                        await pilot.press("y")
                        await settle(app, pilot)
                    finally:
                        writer.execute("ROLLBACK")
                    self.assertTrue(app.status.startswith("outbox error: outbox"), app.status)
                    self.assertIn("is busy", app.status)
                    self.assertTrue(app.is_running)
                    await pilot.press("g")
                    await settle(app, pilot)
                    self.assertEqual(connector_counts(app)["ehr"], (0, 0, 0, 3))
            finally:
                store.close()

        run_scenario(scenario)
