"""The mllp-cli terminal UI driven by Textual's pilot, against an outbox that
the real ``twistd mllp`` process is writing to and delivering from.

Textual needs a running asyncio loop; trial's and pytest-twisted's reactors
need not be asyncio ones. Each scenario therefore runs ``asyncio.run`` on a
thread of its own, which works the same under both runners, and the test
waits for that thread with a bound.

The live test's queues are the server's own: MLLP_CONFIG routes each
message to connectors whose upstreams run in this process (or are down), and
the server's relay marks the rows delivered, dead or pending. Only the
dialog tests, which need exact states on a quiet file, write rows with SQL.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
from collections.abc import Callable, Coroutine
from typing import Any

from rich.text import Text
from textual.pilot import Pilot
from textual.widgets import DataTable
from twisted.trial.unittest import SynchronousTestCase

from mllpd.cli.app import ConfirmScreen, MessageScreen, OutboxApp
from mllpd.cli.store import Store
from tests.outboxrows import add_delivery, add_message, connect, new_outbox
from tests.serverproc import (
    MLLPClient,
    ServerProcess,
    hl7_message,
    make_workdir,
    query,
    start_server,
)
from tests.upstreams import HTTPUpstream, refusing_port, until, wait_until, write_config

SCENARIO_TIMEOUT = 120.0
# Bound on waiting for the UI to catch up.
UI_TIMEOUT = 20.0


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
    """The cells as shown: text cells as their plain text."""
    table = app.query_one(table_id, DataTable)
    return [
        [c.plain if isinstance(c, Text) else c for c in table.get_row_at(i)]
        for i in range(table.row_count)
    ]


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
    await until(lambda: app.reloads >= target, timeout=UI_TIMEOUT, pause=pilot.pause,
                what=f"the UI refreshing {count} times on its interval")


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


def routed_server(case: SynchronousTestCase) -> tuple[ServerProcess, HTTPUpstream, HTTPUpstream]:
    """The server routing to three connectors: ``ehr`` (control ids DEAD*)
    at an upstream that refuses them (400: dead letters), ``lake`` (every
    message) at one that takes them, ``pacs`` (control ids HELD*) at a port
    nothing listens on (a pending backlog). Returns (server, ehr, lake)."""
    ehr = HTTPUpstream.start(case, status=400)
    lake = HTTPUpstream.start(case, status=200)
    down = refusing_port(case)
    workdir = make_workdir(case)
    config = write_config(os.path.join(workdir, "mllp.yaml"), [
        {"name": "ehr", "type": "http", "url": ehr.url,
         "filter": 'msh.control_id.startsWith("DEAD")'},
        {"name": "lake", "type": "http", "url": lake.url},
        {"name": "pacs", "type": "http", "url": f"http://127.0.0.1:{down}/hl7",
         "filter": 'msh.control_id.startsWith("HELD")'},
    ])
    return start_server(case, workdir=workdir, env={"MLLP_CONFIG": config}), ehr, lake


def queue_states(path: str) -> dict[str, dict[str, int]]:
    """connector -> state -> rows, read from the outbox file."""
    counts: dict[str, dict[str, int]] = {}
    for connector, state, n in query(
        path, "SELECT connector, state, COUNT(*) FROM deliveries GROUP BY connector, state"
    ):
        counts.setdefault(connector, {})[state] = n
    return counts


def backlog(counts: tuple[int, int, int, int]) -> int:
    """Queued rows of a connector whose upstream is down: its head may be
    in an attempt (in flight) at any moment, the rest are pending."""
    pending, in_flight, delivered, dead = counts
    assert (in_flight, delivered, dead) in ((0, 0, 0), (1, 0, 0)), counts
    return pending + in_flight


async def wait_for_counts(
    app: OutboxApp, pilot: Pilot[None], done: Callable[[dict[str, tuple[int, int, int, int]]], bool]
) -> dict[str, tuple[int, int, int, int]]:
    """Wait until the counts on screen (refreshed on the UI's interval) satisfy ``done``."""
    return await until(lambda: connector_counts(app), done, timeout=UI_TIMEOUT, pause=pilot.pause,
                       what="the expected counts on screen")


class LiveOutboxTests(SynchronousTestCase):
    def test_counts_view_and_replay_while_server_routes(self) -> None:
        """With the server routing and delivering, the UI shows the real
        queue counts, a message field by field, and a confirmed replay of a
        dead letter gets it delivered upstream (nothing when declined)."""
        server, ehr, lake = routed_server(self)
        names = [f"HELD{i}" for i in range(4)] + ["DEAD4", "DEAD5"]
        sent = send(server, names)
        ids = [sent[n] for n in names]
        # The relay's own doing: two refused for good, six delivered, and the
        # backlog retried against the closed port.
        wait_until(
            lambda: (queue_states(server.db_path),
                     query(server.db_path, "SELECT MAX(attempts) FROM deliveries"
                           " WHERE connector = 'pacs'")),
            lambda q: (q[0].get("ehr") == {"dead": 2} and q[0].get("lake") == {"delivered": 6}
                       and sum(q[0].get("pacs", {}).values()) == 4 and (q[1][0][0] or 0) >= 2),
            what="routing of the first six messages",
        )
        later: list[str] = []

        async def scenario() -> None:
            store = Store(server.db_path)
            app = OutboxApp(store, interval=0.2)
            try:
                async with app.run_test(size=(200, 50)) as pilot:
                    await settle(app, pilot)
                    counts = connector_counts(app)
                    self.assertEqual((counts["ehr"], counts["lake"]),
                                     ((0, 0, 0, 2), (0, 0, 6, 0)))
                    self.assertEqual(backlog(counts["pacs"]), 4)

                    # More traffic while the UI is open: it refreshes by itself.
                    more = await asyncio.to_thread(send, server, ["HELD6", "HELD7", "HELD8"])
                    later.extend(more[n] for n in ["HELD6", "HELD7", "HELD8"])
                    counts = await wait_for_counts(
                        app, pilot, lambda c: c["lake"] == (0, 0, 9, 0)
                        and backlog(c["pacs"]) == 7)
                    self.assertEqual(counts["ehr"], (0, 0, 0, 2))

                    # The dead-letter list of the first connector, head first.
                    self.assertEqual(app.connector, "ehr")
                    self.assertEqual(app.state, "dead")
                    dead = table_rows(app, "#messages")
                    self.assertEqual(
                        [(r[0], r[2], r[4], r[7], r[8]) for r in dead],
                        [(ids[4], "dead", "DEAD4", 1, "HTTP 400 Bad Request"),
                         (ids[5], "dead", "DEAD5", 1, "HTTP 400 Bad Request")],
                    )

                    # View the selected one.
                    await pilot.press("v")
                    await settle(app, pilot)
                    screen = app.screen
                    self.assertIsInstance(screen, MessageScreen)
                    assert isinstance(screen, MessageScreen)
                    self.assertIn("    PID-5 (patient_name): DOE^JANE", screen.lines)
                    self.assertIn("    MSH-10 (message_control_id): DEAD4", screen.lines)
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
                    self.assertEqual(selected.control_id if selected else None, "DEAD5")
                    await pilot.press("up")
                    await settle(app, pilot)
                    selected = app.selected_message()
                    self.assertEqual(selected.control_id if selected else None, "DEAD4")

                    # Replay, declined: nothing changes.
                    await pilot.press("r")
                    await settle(app, pilot)
                    self.assertIsInstance(app.screen, ConfirmScreen)
                    await pilot.click("#no")
                    await settle(app, pilot)
                    self.assertEqual(app.status, "cancelled")
                    self.assertEqual(connector_counts(app)["ehr"], (0, 0, 0, 2))

                    # Upstream is fixed; replay, confirmed: the running server
                    # delivers it.
                    ehr.status = 200
                    await pilot.press("r")
                    await settle(app, pilot)
                    await pilot.click("#yes")
                    await settle(app, pilot)
                    self.assertEqual(app.status, "replayed 1 dead letter(s) of ehr")
                    await wait_for_counts(app, pilot, lambda c: c["ehr"] == (0, 0, 1, 1))
                    await wait_for_reloads(app, pilot, 1)
                    self.assertEqual([r[4] for r in table_rows(app, "#messages")], ["DEAD5"])
            finally:
                store.close()

        run_scenario(scenario)

        # Upstream got DEAD4 again, byte for byte, after refusing both once;
        # the declined replay sent nothing.
        self.assertEqual(
            [(r.message_id, r.body, r.status) for r in ehr.received],
            [(ids[4], hl7_message("DEAD4"), 400), (ids[5], hl7_message("DEAD5"), 400),
             (ids[4], hl7_message("DEAD4"), 200)],
        )
        self.assertEqual(
            query(server.db_path, "SELECT message_id, state, attempts, last_error"
                  " FROM deliveries WHERE connector = 'ehr' ORDER BY seq"),
            [(ids[5], "dead", 1, "HTTP 400 Bad Request"), (ids[4], "delivered", 1, None)],
        )
        # lake got every message once, in arrival order.
        self.assertEqual([(r.message_id, r.status) for r in lake.received],
                         [(mid, 200) for mid in [*ids, *later]])
        # Nothing of the backlog got through the closed port.
        self.assertEqual(
            query(server.db_path, "SELECT DISTINCT last_error FROM deliveries"
                  " WHERE connector = 'pacs' AND attempts > 0"),
            [("connection refused",)],
        )
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


# Sender text that markup would read as tags, and that would drive a terminal.
HOSTILE_ID = "A[/]\x1b[2J[bold]B[link=http://x]C"
SHOWN_ID = "A[/]\\x1b[2J[bold]B[link=http://x]C"


class HostileTextTests(SynchronousTestCase):
    """Sender text is shown as plain text: no markup, no control characters."""

    def test_markup_and_control_characters_shown_as_text(self) -> None:
        """A control id with markup and ESC is shown literally in the table, the view and the dialog; the UI stays up."""
        path = new_outbox(self)
        conn = connect(path)
        self.addCleanup(conn.close)
        mid = add_message(conn, HOSTILE_ID, received_at=1000.0, msg_type="ADT^[/]")
        add_delivery(conn, mid, "ehr", "dead", updated_at=1000.0, last_error="AE: [red]\x07no\u202e")

        async def scenario() -> None:
            store = Store(path)
            app = OutboxApp(store, interval=0, clock=lambda: 2000.0)
            try:
                async with app.run_test(size=(250, 50)) as pilot:
                    await settle(app, pilot)
                    row = table_rows(app, "#messages")[0]
                    self.assertEqual((row[3], row[4]), ("ADT^[/]", SHOWN_ID))
                    self.assertEqual(row[8], "AE: [red]\\x07no\\u202e")
                    await pilot.press("v")
                    await settle(app, pilot)
                    assert isinstance(app.screen, MessageScreen)
                    self.assertIn(f"    MSH-10 (message_control_id): {SHOWN_ID}", app.screen.lines)
                    body = str(app.screen.query_one("#message-body").render())
                    self.assertIn(SHOWN_ID, body)
                    self.assertNotIn("\x1b", body)
                    await pilot.press("escape")
                    await settle(app, pilot)
                    await pilot.press("d")
                    await settle(app, pilot)
                    assert isinstance(app.screen, ConfirmScreen)
                    question = str(app.screen.query_one("#question").render())
                    self.assertIn(f"(ADT^[/] {SHOWN_ID})", question)
                    await pilot.press("n")
                    await settle(app, pilot)
                    self.assertTrue(app.is_running)
            finally:
                store.close()

        run_scenario(scenario)
