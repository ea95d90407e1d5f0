"""mllp-cli against the PostgreSQL outbox of a cluster (MLLP_DB_URL): the
same commands, the same answers, while the outbox stays open."""

from __future__ import annotations

import contextlib
import io
import json
from typing import Any

from twisted.internet import defer
from twisted.internet.threads import deferToThread

from mllpd.cli import main
from mllpd.cli.app import OutboxApp
from mllpd.cli.store import PostgresStore, open_store
from tests.test_cli_app import run_scenario, wait_for_counts
from tests.test_outbox_postgres import _PG, envelope, select


def cli(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(list(argv))
    return code, out.getvalue()


class PostgresCLITests(_PG):
    async def fill(self) -> list[str]:
        """Three messages for ehr: one delivered, one dead, one pending."""
        outbox = self.open(pod="mllpd-0")
        stored = await defer.gatherResults([outbox.store(envelope(f"Q{i}")) for i in range(3)])
        ids = [s.message_id for s in stored]
        seqs = dict(select(self.url, "SELECT message_id, seq FROM deliveries"))
        await outbox.mark_delivered(seqs[ids[0]], 1001.0)
        await outbox.mark_dead(seqs[ids[1]], 5, "AE: unknown patient", 1002.0)
        return ids

    async def test_stats_list_show_and_audit(self) -> None:
        """stats, list, show and audit read the cluster's outbox given by --db-url."""
        ids = await self.fill()
        code, out = cli("stats", "--json", "--db-url", self.url)
        self.assertEqual(code, 0)
        stats = json.loads(out)
        self.assertEqual(
            [(s["connector"], s["pending"], s["delivered"], s["dead"]) for s in stats],
            [("ehr", 1, 1, 1)],
        )
        code, out = cli("list", "--json", "--state", "dead", "--db-url", self.url)
        self.assertEqual([r["message_id"] for r in json.loads(out)], [ids[1]])
        code, out = cli("show", ids[2], "--db-url", self.url)
        self.assertEqual(code, 0)
        self.assertIn("Q2", out)
        code, out = cli("audit", "--json", "--db-url", self.url)
        rows = json.loads(out)
        self.assertEqual(sorted(r["control_id"] for r in rows), ["Q0", "Q1", "Q2"])
        self.assertEqual({r["pod"] for r in rows}, {"mllpd-0"})

    async def test_replay_delete_and_purge(self) -> None:
        """replay puts a dead letter back at the tail, delete removes a message, purge drops delivered rows."""
        ids = await self.fill()
        store: Any = open_store(url=self.url)
        self.addCleanup(store.close)
        self.assertIsInstance(store, PostgresStore)
        self.assertEqual(store.replay("ehr", None, 2000.0), [ids[1]])
        self.assertEqual(
            [(m, s) for m, s in select(
                self.url, "SELECT message_id, state FROM deliveries ORDER BY seq")],
            [(ids[0], "delivered"), (ids[2], "pending"), (ids[1], "pending")],
        )
        self.assertTrue(store.delete(ids[2]))
        self.assertEqual(store.purge_delivered("ehr", 5000.0), 1)
        self.assertEqual(select(self.url, "SELECT message_id FROM messages"), [(ids[1],)])

    async def test_terminal_ui_shows_the_cluster_queues(self) -> None:
        """The terminal UI opened on the PostgreSQL outbox shows each connector's counts."""
        await self.fill()
        store = open_store(url=self.url)
        self.addCleanup(store.close)

        async def scenario() -> None:
            app = OutboxApp(store, interval=0.2)
            async with app.run_test() as pilot:
                await wait_for_counts(app, pilot, lambda c: c.get("ehr") == (1, 0, 1, 1))

        await deferToThread(run_scenario, scenario)

    def test_database_without_outbox_refused(self) -> None:
        """A database no replica has set up is refused with one line, and left as it was."""
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code, _ = cli("stats", "--db-url", self.url)
        self.assertEqual(code, 2)
        self.assertIn("no outbox", err.getvalue())
        self.assertEqual(select(self.url, "SELECT to_regclass('messages') IS NULL"), [(True,)])

    def test_unreachable_database_is_one_line(self) -> None:
        """A database that cannot be reached is one error line naming it, without the password."""
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code, _ = cli("stats", "--db-url", "postgresql://u:secret@127.0.0.1:1/none")
        self.assertEqual(code, 2)
        self.assertEqual(len(err.getvalue().splitlines()), 1)
        self.assertIn("127.0.0.1:1/none", err.getvalue())
        self.assertNotIn("secret", err.getvalue())
