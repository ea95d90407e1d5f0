"""mllp-cli subcommands run as a real process (``python -m mllpd.cli``) on
real outbox files: output, exit codes and confirmations.

CommandTests write exact queue states with SQL into a quiet file; the live
test runs the real server, whose relay fills the queues by delivering to
upstreams of the test's own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence

from twisted.trial.unittest import SynchronousTestCase

from tests.outboxrows import add_delivery, add_message, connect, new_outbox
from tests.serverproc import REPO, MLLPClient, hl7_message, make_workdir, query, start_server
from tests.upstreams import HTTPUpstream, refusing_port, wait_until, write_config

RUN_TIMEOUT = 60.0
# Bound on the messages streamed while commands run against a live server.
MAX_STREAMED = 50_000


def mllp_cli(
    args: Sequence[str],
    *,
    answer: str | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m mllpd.cli`` from this checkout; ``answer`` is typed at
    the confirmation prompt (stdin is empty otherwise)."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MLLP_")}
    environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p
    )
    environ.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "mllpd.cli", *args],
        cwd=REPO, env=environ, input=answer or "", capture_output=True, text=True,
        timeout=RUN_TIMEOUT,
    )


def states(path: str, connector: str) -> list[tuple[str, str]]:
    """(message_id, state) of a connector's rows in queue order."""
    conn = connect(path)
    try:
        return list(conn.execute(
            "SELECT message_id, state FROM deliveries WHERE connector = ? ORDER BY seq",
            (connector,),
        ))
    finally:
        conn.close()


class CommandTests(SynchronousTestCase):
    """ehr: A0 dead, A1 pending, A2 dead, A3 delivered two hours ago;
    lake: A0 delivered just now."""

    def setUp(self) -> None:
        self.path = new_outbox(self)
        now = time.time()
        conn = connect(self.path)
        self.addCleanup(conn.close)
        self.ids = [add_message(conn, f"A{i}", received_at=now - 100 + i) for i in range(4)]
        add_delivery(conn, self.ids[0], "ehr", "dead", updated_at=now, attempts=20,
                     last_error="AE: unknown patient")
        add_delivery(conn, self.ids[1], "ehr", "pending", updated_at=now)
        add_delivery(conn, self.ids[2], "ehr", "dead", updated_at=now, attempts=5,
                     last_error="HTTP 400 Bad Request")
        add_delivery(conn, self.ids[3], "ehr", "delivered", updated_at=now - 7200)
        add_delivery(conn, self.ids[0], "lake", "delivered", updated_at=now)

    def run_cli(self, *args: str, answer: str | None = None) -> subprocess.CompletedProcess[str]:
        return mllp_cli(["--db", self.path, *args], answer=answer)

    def test_stats_json(self) -> None:
        """``stats --json`` gives each connector's counts."""
        result = self.run_cli("stats", "--json")
        self.assertEqual(result.returncode, 0, result.stderr)
        stats = {s["connector"]: s for s in json.loads(result.stdout)}
        self.assertEqual(
            {k: (v["pending"], v["in_flight"], v["delivered"], v["dead"]) for k, v in stats.items()},
            {"ehr": (1, 0, 1, 2), "lake": (0, 0, 1, 0)},
        )
        self.assertGreaterEqual(stats["ehr"]["oldest_pending_age"], 99)
        self.assertIsNone(stats["lake"]["oldest_pending_age"])

    def test_stats_table(self) -> None:
        """``stats`` prints one line per connector under a header."""
        result = self.run_cli("stats")
        self.assertEqual(result.returncode, 0, result.stderr)
        lines = result.stdout.splitlines()
        self.assertEqual(lines[0].split(),
                         ["connector", "pending", "in_flight", "delivered", "dead", "oldest",
                          "retrying"])
        self.assertEqual(lines[1].split()[:5], ["ehr", "1", "0", "1", "2"])
        self.assertEqual(lines[2].split(), ["lake", "0", "0", "1", "0", "-", "0"])

    def test_list_dead_letters(self) -> None:
        """``list`` filters by connector and state and shows attempts, error and preview."""
        result = self.run_cli("list", "--connector", "ehr", "--state", "dead")
        self.assertEqual(result.returncode, 0, result.stderr)
        body = result.stdout.splitlines()[1:]
        self.assertEqual([line.split()[0] for line in body], [self.ids[0], self.ids[2]])
        self.assertIn("AE: unknown patient", body[0])
        self.assertIn("PID|1||4711", body[0])
        as_json = json.loads(self.run_cli("list", "-c", "ehr", "-s", "dead", "--json").stdout)
        self.assertEqual(
            [(r["message_id"], r["attempts"], r["last_error"]) for r in as_json],
            [(self.ids[0], 20, "AE: unknown patient"), (self.ids[2], 5, "HTTP 400 Bad Request")],
        )

    def test_show(self) -> None:
        """``show`` prints each segment and its fields by hl7apy name."""
        result = self.run_cli("show", self.ids[0])
        self.assertEqual(result.returncode, 0, result.stderr)
        lines = result.stdout.splitlines()
        self.assertIn("PID|1||4711^^^HOSP^MR||DOE^JANE||19800101|F", lines)
        self.assertIn("    PID-5 (patient_name): DOE^JANE", lines)
        self.assertIn("    MSH-10 (message_control_id): A0", lines)
        self.assertIn("queues      ehr: dead, 20 attempts, last error: AE: unknown patient",
                      lines)

    def test_sender_text_printed_as_text(self) -> None:
        """Control characters from a sender (ESC, BEL, bidi overrides) reach the terminal only as escapes."""
        conn = connect(self.path)
        self.addCleanup(conn.close)
        hostile = "X\x1b]0;owned\x07\u202eY"
        payload = f"MSH|^~\\&|A|B|C|D|20240101||ADT^A01|{hostile}|P|2.5|||||||UNICODE UTF-8\rPID|1||4711\r"
        mid = add_message(conn, hostile, received_at=time.time(), payload=payload.encode("utf-8"),
                          charset="UNICODE UTF-8")
        add_delivery(conn, mid, "ehr", "dead", updated_at=time.time(), last_error="AE: \x1b[2Jgone")
        shown = "X\\x1b]0;owned\\x07\\u202eY"
        listed = self.run_cli("list", "-c", "ehr", "-s", "dead")
        show = self.run_cli("show", mid)
        delete = self.run_cli("delete", mid, answer="n\n")
        for result in (listed, show, delete):
            self.assertNotRegex(result.stdout + result.stderr, "[\x00-\x08\x0b-\x1f\x7f\u202e]")
        self.assertIn(shown, listed.stdout)
        self.assertIn("AE: \\x1b[2Jgone", listed.stdout)
        self.assertIn(f"    MSH-10 (message_control_id): {shown}", show.stdout.splitlines())
        self.assertIn(shown, delete.stderr)
        # JSON keeps the exact text, escaped by JSON itself.
        rows = json.loads(self.run_cli("list", "-c", "ehr", "-s", "dead", "--json").stdout)
        self.assertIn(hostile, [r["control_id"] for r in rows])

    def test_show_unknown(self) -> None:
        """``show`` of an unknown id exits 1 and says so on stderr."""
        result = self.run_cli("show", "f" * 32)
        self.assertEqual((result.returncode, result.stdout), (1, ""))
        self.assertIn(f"no message {'f' * 32}", result.stderr)

    def test_replay_asks_first(self) -> None:
        """Answering no replays nothing (exit 1); answering yes re-queues the
        dead letter at the tail."""
        before = states(self.path, "ehr")
        declined = self.run_cli("replay", "--connector", "ehr", self.ids[0], answer="n\n")
        self.assertEqual(declined.returncode, 1)
        self.assertIn("[y/N]", declined.stderr)
        self.assertEqual(states(self.path, "ehr"), before)
        accepted = self.run_cli("replay", "--connector", "ehr", self.ids[0], answer="y\n")
        self.assertEqual(accepted.returncode, 0, accepted.stderr)
        self.assertEqual(accepted.stdout, f"replayed {self.ids[0]}\n")
        self.assertEqual(states(self.path, "ehr")[-1], (self.ids[0], "pending"))

    def test_replay_all_with_yes(self) -> None:
        """``replay --all --yes`` re-queues every dead letter without asking."""
        result = self.run_cli("replay", "-c", "ehr", "--all", "--yes")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout.split(), ["replayed", self.ids[0], "replayed", self.ids[2]])
        self.assertEqual(
            states(self.path, "ehr"),
            [(self.ids[1], "pending"), (self.ids[3], "delivered"),
             (self.ids[0], "pending"), (self.ids[2], "pending")],
        )

    def test_replay_of_a_pending_message(self) -> None:
        """Replaying a message that is not a dead letter exits 1 naming it."""
        result = self.run_cli("replay", "-c", "ehr", self.ids[1], "-y")
        self.assertEqual(result.returncode, 1)
        self.assertIn(f"{self.ids[1]} is not a dead letter of ehr", result.stderr)

    def test_replay_needs_ids_or_all(self) -> None:
        """``replay`` without ids or --all is a usage error."""
        result = self.run_cli("replay", "-c", "ehr", "-y")
        self.assertEqual(result.returncode, 2)
        self.assertIn("MESSAGE_ID", result.stderr)

    def test_delete(self) -> None:
        """``delete --yes`` removes the message from every queue."""
        result = self.run_cli("delete", self.ids[0], "--yes")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout, f"deleted {self.ids[0]}\n")
        self.assertNotIn(self.ids[0], [m for m, _ in states(self.path, "ehr")])
        self.assertEqual(states(self.path, "lake"), [])
        self.assertEqual(self.run_cli("show", self.ids[0]).returncode, 1)

    def test_delete_declined_on_empty_answer(self) -> None:
        """With no answer (stdin closed), nothing is deleted."""
        result = self.run_cli("delete", self.ids[0])
        self.assertEqual(result.returncode, 1)
        self.assertEqual(self.run_cli("show", self.ids[0]).returncode, 0)

    def test_purge_dead(self) -> None:
        """``purge --dead`` empties the connector's dead-letter queue."""
        result = self.run_cli("purge", "-c", "ehr", "--dead", "-y")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout, "purged 2 dead letters of connector 'ehr'\n")
        self.assertEqual(states(self.path, "ehr"),
                         [(self.ids[1], "pending"), (self.ids[3], "delivered")])

    def test_purge_delivered_before(self) -> None:
        """``purge --delivered-before 1h`` drops only older delivered rows."""
        result = self.run_cli("purge", "-c", "ehr", "--delivered-before", "1h", "-y")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout,
                         "purged 1 delivered message of connector 'ehr' older than 1h\n")
        self.assertNotIn((self.ids[3], "delivered"), states(self.path, "ehr"))
        again = self.run_cli("purge", "-c", "lake", "--delivered-before", "1h", "-y")
        self.assertEqual(again.stdout,
                         "no delivered messages of connector 'lake' older than 1h\n")

    def test_bad_duration(self) -> None:
        """A duration that is not Go syntax is a usage error naming it."""
        result = self.run_cli("purge", "-c", "ehr", "--delivered-before", "1 day", "-y")
        self.assertEqual(result.returncode, 2)
        self.assertIn("invalid duration '1 day'", result.stderr)

    def test_db_path_from_environment(self) -> None:
        """Without --db the outbox is $MLLP_DB_PATH, as for the server."""
        result = mllp_cli(["stats", "--json"], env={"MLLP_DB_PATH": self.path})
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual([s["connector"] for s in json.loads(result.stdout)], ["ehr", "lake"])

    def test_ui_needs_a_terminal(self) -> None:
        """Without a command and without a terminal (a script, a pipe) the
        CLI says what to use instead of starting the UI."""
        result = self.run_cli()
        self.assertEqual(result.returncode, 2)
        self.assertIn("the terminal UI needs a terminal", result.stderr)

    def test_missing_outbox(self) -> None:
        """A path with no outbox exits 2 with one line naming it."""
        missing = os.path.join(os.path.dirname(self.path), "nope.db")
        result = mllp_cli(["--db", missing, "stats"])
        self.assertEqual(result.returncode, 2)
        self.assertEqual(result.stderr,
                         f"mllp-cli: no outbox at {missing} (set --db or MLLP_DB_PATH)\n")
        self.assertFalse(os.path.exists(missing))

    def test_older_outbox_not_migrated(self) -> None:
        """An outbox at an older schema (an older server on it) exits 2 with one line; the schema is unchanged."""
        conn = connect(self.path)
        conn.execute("DELETE FROM schema_version WHERE version > 1")
        conn.close()
        result = self.run_cli("stats")
        self.assertEqual(result.returncode, 2)
        self.assertTrue(result.stderr.startswith("mllp-cli: outbox schema version 1 is older than this mllp-cli"),
                        result.stderr)
        self.assertEqual(result.stderr.count("\n"), 1)
        self.assertEqual(query(self.path, "SELECT MAX(version) FROM schema_version"), [(1,)])


class LiveServerTests(SynchronousTestCase):
    def test_commands_while_server_routes(self) -> None:
        """stats, list and show see the queues the server's relay keeps, and
        a replay gets the dead letter delivered by the running server, while
        a sender streams messages that the server acknowledges and delivers."""
        ehr = HTTPUpstream.start(self, status=400)
        lake = HTTPUpstream.start(self)
        down = refusing_port(self)
        workdir = make_workdir(self)
        config = write_config(os.path.join(workdir, "mllp.yaml"), [
            {"name": "ehr", "type": "http", "url": ehr.url,
             "filter": 'msh.control_id.startsWith("DEAD")'},
            {"name": "lake", "type": "http", "url": lake.url,
             "filter": 'msh.control_id.startsWith("S")'},
            {"name": "pacs", "type": "http", "url": f"http://127.0.0.1:{down}/hl7",
             "filter": 'msh.control_id.startsWith("HELD")'},
        ])
        server = start_server(self, workdir=workdir, env={"MLLP_CONFIG": config})
        assert server.port is not None
        with MLLPClient(server.port) as client:
            for cid in ("DEAD1", "HELD1", "HELD2"):
                self.assertEqual(client.request(hl7_message(cid)).code, "AA")
        ((dead_id,),) = query(server.db_path,
                              "SELECT message_id FROM messages WHERE control_id = 'DEAD1'")
        wait_until(
            lambda: query(server.db_path,
                          "SELECT connector, state, MAX(attempts) FROM deliveries"
                          " GROUP BY connector, state ORDER BY connector, state"),
            lambda rows: len(rows) >= 2 and rows[0] == ("ehr", "dead", 1)
            and all(r[0] == "pacs" and r[1] != "dead" for r in rows[1:])
            and max(r[2] for r in rows[1:]) >= 2,
            what="a dead letter for ehr and a retried backlog for pacs",
        )

        acks: list[str] = []
        errors: list[BaseException] = []
        done = threading.Event()

        def stream() -> None:
            try:
                with MLLPClient(server.port or 0) as client:
                    for i in range(MAX_STREAMED):
                        if done.is_set():
                            return
                        acks.append(client.request(hl7_message(f"S{i}")).code)
            except BaseException as e:
                errors.append(e)

        sender = threading.Thread(target=stream, daemon=True)
        sender.start()
        try:
            sent_before = len(acks)
            db = ["--db", server.db_path]
            stats = mllp_cli([*db, "stats", "--json"])
            self.assertEqual(stats.returncode, 0, stats.stderr)
            by_name = {s["connector"]: s for s in json.loads(stats.stdout)}
            self.assertEqual(
                [by_name["ehr"][k] for k in ("pending", "in_flight", "delivered", "dead")],
                [0, 0, 0, 1],
            )
            pacs = by_name["pacs"]
            self.assertEqual((pacs["pending"] + pacs["in_flight"], pacs["delivered"],
                              pacs["dead"]), (2, 0, 0))
            self.assertIsNotNone(pacs["oldest_pending_age"])
            listed = mllp_cli([*db, "list", "-s", "dead", "--json"])
            self.assertEqual(listed.returncode, 0, listed.stderr)
            self.assertEqual(
                [(r["message_id"], r["connector"], r["attempts"], r["last_error"])
                 for r in json.loads(listed.stdout)],
                [(dead_id, "ehr", 1, "HTTP 400 Bad Request")],
            )
            shown = mllp_cli([*db, "show", dead_id])
            self.assertEqual(shown.returncode, 0, shown.stderr)
            self.assertIn("    MSH-10 (message_control_id): DEAD1", shown.stdout.splitlines())
            self.assertIn("queues      ehr: dead, 1 attempts, last error: HTTP 400 Bad Request",
                          shown.stdout.splitlines())

            # Upstream is fixed; the replay is delivered by the running server.
            ehr.status = 200
            replay = mllp_cli([*db, "replay", "-c", "ehr", "--all", "-y"])
            self.assertEqual((replay.returncode, replay.stdout), (0, f"replayed {dead_id}\n"),
                             replay.stderr)
            wait_until(
                lambda: query(server.db_path, "SELECT state, attempts FROM deliveries"
                              " WHERE message_id = ?", (dead_id,)),
                lambda rows: rows == [("delivered", 1)],
                what="delivery of the replayed message",
            )
            sent_during = len(acks) - sent_before
        finally:
            done.set()
            sender.join(RUN_TIMEOUT)
        self.assertFalse(sender.is_alive())
        self.assertEqual(errors, [])
        self.assertGreater(sent_during, 0, "the server stopped acknowledging during the commands")
        self.assertEqual(set(acks), {"AA"})
        self.assertEqual(
            [(r.message_id, r.body, r.status) for r in ehr.received],
            [(dead_id, hl7_message("DEAD1"), 400), (dead_id, hl7_message("DEAD1"), 200)],
        )
        self.assertEqual(query(server.db_path, "SELECT COUNT(*) FROM messages"),
                         [(len(acks) + 3,)])
        # The streamed messages were delivered too, each once and in order.
        wait_until(lambda: len(lake.received), lambda n: n >= len(acks), timeout=60.0,
                   what=f"lake receiving all {len(acks)} streamed messages")
        self.assertEqual([r.body for r in lake.received],
                         [hl7_message(f"S{i}") for i in range(len(acks))])

    def test_delete_unblocks_a_stuck_queue(self) -> None:
        """Deleting the message at the head of a queue that upstream keeps
        refusing for now (503) lets the next one through, and the deleted
        one is never delivered once upstream recovers."""
        pacs = HTTPUpstream.start(self, status=503)
        workdir = make_workdir(self)
        config = write_config(os.path.join(workdir, "mllp.yaml"), [
            {"name": "pacs", "type": "http", "url": pacs.url},
        ])
        server = start_server(self, workdir=workdir, env={"MLLP_CONFIG": config})
        assert server.port is not None
        with MLLPClient(server.port) as client:
            for cid in ("STUCK", "NEXT"):
                self.assertEqual(client.request(hl7_message(cid)).code, "AA")
        ids = dict(query(server.db_path, "SELECT control_id, message_id FROM messages"))
        wait_until(lambda: [r.message_id for r in pacs.received],
                   lambda seen: seen.count(ids["STUCK"]) >= 2,
                   what="retries of the head of the queue")

        deleted = mllp_cli(["--db", server.db_path, "delete", ids["STUCK"], "--yes"])
        self.assertEqual((deleted.returncode, deleted.stdout), (0, f"deleted {ids['STUCK']}\n"),
                         deleted.stderr)
        # The relay moves on to the next message (still refused for now) ...
        wait_until(lambda: [r.message_id for r in pacs.received],
                   lambda seen: ids["NEXT"] in seen,
                   what="an attempt of the message behind the deleted one")
        # ... and once upstream takes messages, only that one is delivered.
        pacs.status = 200
        wait_until(
            lambda: query(server.db_path, "SELECT state FROM deliveries"),
            lambda rows: rows == [("delivered",)],
            what="delivery of the message behind the deleted one",
        )
        self.assertEqual([r.message_id for r in pacs.received if r.status == 200], [ids["NEXT"]])


class AuditCommandTests(SynchronousTestCase):
    """``mllp-cli audit`` reads the audit trail a running server writes."""

    def test_audit_shows_accepted_and_refused(self) -> None:
        """Every received message is listed, newest first, with its ACK code, rule and connectors; filters narrow it."""
        workdir = make_workdir(self)
        config = os.path.join(workdir, "mllp.yaml")
        with open(config, "w") as f:
            f.write(
                "rules:\n"
                "  - {name: pid-required, expr: 'has(pid.id) && pid.id != \"\"', message: PID-3 is required}\n"
                "connectors:\n"
                f"  - {{name: lake, type: mllp, address: 'tcp:127.0.0.1:{refusing_port(self)}'}}\n"
            )
        server = start_server(self, workdir=workdir, env={"MLLP_CONFIG": config})
        assert server.port is not None
        with MLLPClient(server.port) as client:
            self.assertEqual(client.request(hl7_message("AUD-OK")).code, "AA")
            no_pid = hl7_message("AUD-BAD", pid="ZPI|1")
            self.assertEqual(client.request(no_pid).code, "AE")

        def audit(*extra: str) -> list[dict[str, object]]:
            result = mllp_cli(["--db", server.db_path, "audit", "--json", *extra])
            self.assertEqual(result.returncode, 0, result.stderr)
            rows: list[dict[str, object]] = json.loads(result.stdout)
            return rows

        rows = wait_until(audit, lambda rows: len(rows) == 2, what="two audit records")
        self.assertEqual(
            [(r["control_id"], r["ack_code"], r["rule"], r["connectors"]) for r in rows],
            [("AUD-BAD", "AE", "pid-required", ""), ("AUD-OK", "AA", None, "lake")],
        )
        self.assertIsNone(rows[0]["message_id"])
        self.assertIsNotNone(rows[1]["message_id"])
        self.assertEqual([r["control_id"] for r in audit("--code", "AE")], ["AUD-BAD"])
        self.assertEqual([r["control_id"] for r in audit("--control-id", "AUD-OK")], ["AUD-OK"])
        table = mllp_cli(["--db", server.db_path, "audit"]).stdout
        self.assertIn("pid-required", table)
        self.assertNotIn("PID|", table)  # no content, only the record
