"""The postgres connector against a real PostgreSQL server.

`.ci/run` starts a throwaway cluster (`.ci/postgres.sh`) and sets
MLLPD_TEST_POSTGRES_DSN; without it the tests that need a server skip.
Outages are made with a TCP proxy between the connector and the server:
dropping its connections is "server gone", closing its port is "connection
refused", reopening it is the server coming back.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import uuid
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.threads import deferToThread
from twisted.logger import capturedLogs, formatEvent, globalLogPublisher
from twisted.protocols import portforward
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from mllpd.config import ConfigError
from mllpd.connectors import ConnectorSpec, Dead, Delivered, Delivery, Retry
from mllpd.connectors.postgres import PostgresConnector, build
from tests.upstreams import until

reactor: Any = _reactor

DSN_VAR = "MLLPD_TEST_POSTGRES_DSN"
DSN = os.environ.get(DSN_VAR, "")

PAYLOAD = (
    b"MSH|^~\\&|LAB|HOSP|EHR|HOSP|20260101120000||ORU^R01^ORU_R01|C123|P|2.5|||||||8859/1\r"
    b"PID|1||4711^^^H||M\xfcLLER^J\xe9R\xd4ME\r"
    b"NTE|1||binary \x00\xff kept\r"
)


def delivery(message_id: str | None = None, control_id: str = "C123", payload: bytes = PAYLOAD) -> Delivery:
    return Delivery(
        message_id=message_id or uuid.uuid4().hex,
        connector="archive",
        payload=payload,
        charset="8859/1",
        codec="iso8859-1",
        control_id=control_id,
        msg_type="ORU^R01",
        attempt=1,
        received_at=1_790_000_000.25,
    )


def need_server() -> None:
    if not DSN:
        raise SkipTest(
            f"{DSN_VAR} is not set: start a throwaway server with "
            "`eval \"$(.ci/postgres.sh start)\"` (as .ci/run does)"
        )


def query(statement: Any, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(DSN, autocommit=True) as conn:
        cursor = conn.execute(statement, params)
        return cursor.fetchall() if cursor.description else []


class _ProxyServer(portforward.ProxyServer):
    def connectionMade(self) -> None:
        self.factory.live.append(self)  # type: ignore[attr-defined]
        super().connectionMade()

    def connectionLost(self, reason: Any) -> None:
        super().connectionLost(reason)
        self.factory.live.remove(self)  # type: ignore[attr-defined]
        for d in self.factory.waiting:  # type: ignore[attr-defined]
            if not self.factory.live and not d.called:  # type: ignore[attr-defined]
                d.callback(None)


class Proxy(portforward.ProxyFactory):
    """A TCP forwarder to the test server that a test can take down and bring back."""

    protocol = _ProxyServer

    def __init__(self, host: str, port: int, interface: str = "127.0.0.1") -> None:
        super().__init__(host, port)
        self.interface = interface
        self.live: list[_ProxyServer] = []
        self.waiting: list[Deferred[None]] = []
        self.listening: Any = None
        self.port_number = 0

    def up(self) -> None:
        self.listening = reactor.listenTCP(self.port_number, self, interface=self.interface)
        self.port_number = self.listening.getHost().port

    async def down(self) -> None:
        """Stop listening and cut every open connection, as a crashed server would."""
        if self.listening is not None:
            await self.listening.stopListening()
            self.listening = None
        if self.live:
            d: Deferred[None] = Deferred()
            self.waiting.append(d)
            for server in list(self.live):
                assert server.transport is not None
                server.transport.abortConnection()
            await d


def spec(**options: Any) -> ConnectorSpec:
    return ConnectorSpec("archive", "postgres", None, options)


class PostgresConnectorTests(TestCase):
    def setUp(self) -> None:
        need_server()
        self.table = f"mllpd_test_{uuid.uuid4().hex[:12]}"
        self.addCleanup(query, sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(self.table)))

    def connector(self, dsn: str | None = None, **options: Any) -> PostgresConnector:
        options.setdefault("table", self.table)
        connector = build(spec(dsn_env="ARCHIVE_DSN", **options), reactor, {"ARCHIVE_DSN": dsn or DSN})
        connector.start()
        self.addCleanup(connector.stop)
        return connector

    def proxy(self, interface: str = "127.0.0.1") -> tuple[Proxy, str]:
        params = conninfo_to_dict(DSN)
        proxy = Proxy(str(params.get("host", "127.0.0.1")), int(params.get("port", 5432)), interface)
        proxy.up()
        self.addCleanup(lambda: Deferred.fromCoroutine(proxy.down()))
        return proxy, make_conninfo(DSN, host=interface, port=proxy.port_number)

    def rows(self, table: str | None = None) -> list[tuple[Any, ...]]:
        parts = (table or self.table).split(".")
        return query(
            sql.SQL(
                "SELECT message_id, control_id, msg_type, charset, codec, size, payload,"
                " extract(epoch FROM received_at)::float8, delivered_at IS NOT NULL FROM {} ORDER BY delivered_at"
            ).format(sql.Identifier(*parts))
        )

    async def test_creates_table_and_stores_exact_bytes(self) -> None:
        """The table is created if absent and the row holds the payload byte for byte."""
        self.assertEqual(query("SELECT to_regclass(%s)::text", (self.table,)), [(None,)])
        d = delivery()
        outcome = await self.connector().deliver(d)
        self.assertEqual(outcome, Delivered("inserted"))
        self.assertEqual(
            self.rows(),
            [(d.message_id, "C123", "ORU^R01", "8859/1", "iso8859-1", len(PAYLOAD), PAYLOAD, 1_790_000_000.25, True)],
        )

    async def test_redelivery_is_idempotent(self) -> None:
        """The same message id delivered twice is Delivered both times and stored once."""
        connector = self.connector()
        d = delivery()
        self.assertEqual(await connector.deliver(d), Delivered("inserted"))
        self.assertEqual(await connector.deliver(d._replace(attempt=2)), Delivered("already stored"))
        self.assertEqual([r[0] for r in self.rows()], [d.message_id])

    async def test_schema_qualified_table(self) -> None:
        """A schema.table name puts the table in that schema."""
        schema = f"mllpd_s_{uuid.uuid4().hex[:8]}"
        query(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        self.addCleanup(query, sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))
        d = delivery()
        outcome = await self.connector(table=f"{schema}.hl7_messages").deliver(d)
        self.assertEqual(outcome, Delivered("inserted"))
        self.assertEqual([r[0] for r in self.rows(f"{schema}.hl7_messages")], [d.message_id])

    async def test_missing_schema_is_retried(self) -> None:
        """A table in a schema that does not exist is retried (an operator fixes it), not dead-lettered."""
        outcome = await self.connector(table="no_such_schema.hl7").deliver(delivery())
        self.assertIsInstance(outcome, Retry)
        self.assertIn("3F000", outcome.reason)

    async def test_server_gone_then_back(self) -> None:
        """Server lost mid-session: Retry; refused while down: Retry; back: the same message is delivered once."""
        proxy, dsn = self.proxy()
        connector = self.connector(dsn)
        first = delivery()
        self.assertEqual(await connector.deliver(first), Delivered("inserted"))
        await proxy.down()
        second = delivery()
        lost = await connector.deliver(second)
        self.assertIsInstance(lost, Retry)
        self.assertIn("server closed the connection", lost.reason)
        refused = await connector.deliver(second._replace(attempt=2))
        self.assertIsInstance(refused, Retry)
        self.assertIn("Connection refused", refused.reason)
        proxy.up()
        self.assertEqual(await connector.deliver(second._replace(attempt=3)), Delivered("inserted"))
        self.assertEqual([r[0] for r in self.rows()], [first.message_id, second.message_id])

    async def test_unreachable_at_start(self) -> None:
        """No server at startup: start() does not fail and deliveries are retried with the reason."""
        proxy, dsn = self.proxy()
        await proxy.down()
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        connector = self.connector(dsn)
        outcome = await connector.deliver(delivery())
        self.assertIsInstance(outcome, Retry)
        self.assertIn("Connection refused", outcome.reason)
        warnings = [formatEvent(e) for e in events if e.get("connector") == "archive" and "unavailable" in formatEvent(e)]
        self.assertEqual(len(warnings), 1, "one warning per outage, not per retry")

    async def test_server_off_loopback_needs_a_verified_certificate(self) -> None:
        """A server that is not local gets sslmode=verify-full: a plaintext server is not written to unless sslmode=disable says so."""
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            probe.connect(("192.0.2.1", 9))  # no packet is sent; this picks the outgoing address
            address = probe.getsockname()[0]
        except OSError:
            address = "127.0.0.1"
        finally:
            probe.close()
        if ipaddress.ip_address(address).is_loopback:
            raise SkipTest("this machine has no address off loopback")
        _, dsn = self.proxy(interface=address)
        outcome = await self.connector(dsn).deliver(delivery())
        assert isinstance(outcome, Retry), outcome
        self.assertIn("SSL", outcome.reason)
        self.assertEqual(query("SELECT to_regclass(%s)::text", (self.table,)), [(None,)])
        with capturedLogs() as events:
            connector = self.connector(make_conninfo(dsn, sslmode="disable"))
        self.assertEqual(await connector.deliver(delivery()), Delivered("inserted"))
        self.assertEqual([(e["event"], e["host"]) for e in events if e.get("event") == "upstream_plaintext"],
                         [("upstream_plaintext", address)])

    async def test_value_the_table_refuses_is_dead(self) -> None:
        """A value the table's types refuse dead-letters that message only; the next is stored."""
        query(sql.SQL(
            "CREATE TABLE {} (message_id text PRIMARY KEY, received_at timestamptz,"
            " delivered_at timestamptz NOT NULL DEFAULT now(), control_id varchar(8) NOT NULL,"
            " msg_type text NOT NULL, charset text, codec text NOT NULL, size integer NOT NULL, payload bytea NOT NULL)"
        ).format(sql.Identifier(self.table)))
        connector = self.connector()
        too_long = await connector.deliver(delivery(control_id="CONTROL-ID-TOO-LONG"))
        self.assertEqual(too_long, Dead("StringDataRightTruncation (22001): value too long for type character varying(8)"))
        nul = await connector.deliver(delivery(control_id="C\x00"))
        self.assertIsInstance(nul, Dead)
        self.assertIn("NUL", nul.reason)
        ok = delivery()
        self.assertEqual(await connector.deliver(ok), Delivered("inserted"))
        self.assertEqual([r[0] for r in self.rows()], [ok.message_id])

    async def test_lanes_share_one_transaction(self) -> None:
        """Deliveries started together go in one transaction; a resend among them is already stored."""
        connector = build(
            spec(dsn_env="ARCHIVE_DSN", table=self.table)._replace(lanes=4), reactor,
            {"ARCHIVE_DSN": DSN},
        )
        connector.start()
        self.addCleanup(connector.stop)
        first = delivery()
        self.assertEqual(await connector.deliver(first), Delivered("inserted"))
        batch = [delivery() for _ in range(3)]
        outcomes = await gatherResults(
            [connector.deliver(d) for d in batch] + [connector.deliver(first._replace(attempt=2))]
        )
        self.assertEqual(outcomes, [Delivered("inserted")] * 3 + [Delivered("already stored")])
        xmins = query(
            sql.SQL("SELECT message_id, xmin::text FROM {}").format(sql.Identifier(self.table))
        )
        by_id = dict(xmins)
        self.assertEqual(len({by_id[d.message_id] for d in batch}), 1)
        self.assertNotEqual(by_id[first.message_id], by_id[batch[0].message_id])

    async def test_a_refused_value_in_a_batch_is_dead_alone(self) -> None:
        """When one message of a batch is refused by the table, it alone is Dead; the others are stored."""
        connector = build(
            spec(dsn_env="ARCHIVE_DSN", table=self.table)._replace(lanes=3), reactor,
            {"ARCHIVE_DSN": DSN},
        )
        connector.start()
        self.addCleanup(connector.stop)
        await connector.deliver(delivery())  # the table exists
        good = [delivery(), delivery()]
        outcomes = await gatherResults([
            connector.deliver(good[0]), connector.deliver(delivery(control_id="C\x00")),
            connector.deliver(good[1]),
        ])
        self.assertEqual(outcomes[0], Delivered("inserted"))
        self.assertIsInstance(outcomes[1], Dead)
        self.assertEqual(outcomes[2], Delivered("inserted"))
        stored = {r[0] for r in self.rows()}
        self.assertTrue({d.message_id for d in good} <= stored)

    async def test_table_without_unique_id_is_retried(self) -> None:
        """An existing table with no unique message_id cannot take an idempotent insert: Retry, not Dead."""
        query(sql.SQL(
            "CREATE TABLE {} (message_id text, received_at timestamptz, control_id text, msg_type text,"
            " charset text, codec text, size integer, payload bytea)"
        ).format(sql.Identifier(self.table)))
        outcome = await self.connector().deliver(delivery())
        self.assertIsInstance(outcome, Retry)
        self.assertIn("42P10", outcome.reason)

    async def test_stop_closes_the_connection(self) -> None:
        """stop() closes the server connection; deliveries after it are retried, not sent."""
        # A name of its own: other tests' connectors share the server.
        name = f"archive-{uuid.uuid4().hex[:8]}"
        connector = build(ConnectorSpec(name, "postgres", None, {"dsn_env": "ARCHIVE_DSN", "table": self.table}),
                          reactor, {"ARCHIVE_DSN": DSN})
        connector.start()
        self.assertIsInstance(await connector.deliver(delivery()), Delivered)

        def sessions() -> list[tuple[Any, ...]]:
            return query("SELECT pid FROM pg_stat_activity WHERE application_name = %s", (f"mllpd-{name}",))

        self.assertEqual(len(await deferToThread(sessions)), 1)
        await connector.stop()
        # The backend exits just after the client closes: bounded wait for it.
        await until(lambda: deferToThread(sessions), lambda rows: not rows, what="the backend to exit")
        self.assertEqual(await deferToThread(sessions), [])
        self.assertEqual(await connector.deliver(delivery()), Retry("connector is stopping"))


class BuildTests(SynchronousTestCase):
    def refused(self, environ: dict[str, str] | None = None, **options: Any) -> str:
        with self.assertRaises(ConfigError) as caught:
            build(spec(**options), reactor, environ or {})
        text = str(caught.exception)
        self.assertNotIn("\n", text)
        return text

    def test_dsn_env_missing_or_empty(self) -> None:
        """dsn_env naming an unset or empty variable stops startup naming the variable."""
        self.assertEqual(
            self.refused(dsn_env="ARCHIVE_DSN"),
            "MLLP_CONFIG: connectors.archive.dsn_env: environment variable ARCHIVE_DSN is not set",
        )
        self.assertEqual(
            self.refused({"ARCHIVE_DSN": " "}, dsn_env="ARCHIVE_DSN"),
            "MLLP_CONFIG: connectors.archive.dsn_env: environment variable ARCHIVE_DSN is empty",
        )

    def test_exactly_one_dsn_source(self) -> None:
        """Exactly one of dsn and dsn_env."""
        expected = (
            "MLLP_CONFIG: connectors.archive.dsn_env: set exactly one of dsn_env (the name of a "
            "variable holding the connection string) and dsn"
        )
        self.assertEqual(self.refused(), expected)
        self.assertEqual(self.refused({"X": "host=h"}, dsn_env="X", dsn="host=h"), expected)

    def test_bad_dsn_is_not_echoed(self) -> None:
        """A malformed connection string is refused without printing it (it may hold a password)."""
        text = self.refused({"ARCHIVE_DSN": "host=h password=hunter2 nonsense"}, dsn_env="ARCHIVE_DSN")
        self.assertEqual(
            text,
            "MLLP_CONFIG: connectors.archive.dsn_env: environment variable ARCHIVE_DSN is not a PostgreSQL "
            "connection string (expected postgresql://user@host:port/db or 'host=... dbname=...')",
        )
        self.assertNotIn("hunter2", self.refused(dsn="postgresql://u:hunter2@h/db?sslmod=require"))

    def test_dsn_env_expansion(self) -> None:
        """dsn takes ${VAR} for the password; a missing variable is named."""
        self.assertEqual(
            self.refused(dsn="postgresql://archiver:${PGPASS}@db/archive"),
            "MLLP_CONFIG: connectors.archive.dsn: environment variable PGPASS is not set",
        )
        connector = build(spec(dsn="postgresql://archiver:${PGPASS}@db:5433/archive"), reactor, {"PGPASS": "pw"})
        self.assertEqual(connector.server, "db:5433/archive")

    def test_table_name(self) -> None:
        """table is name or schema.name in lower-case identifier characters; default hl7_messages."""
        for bad in ("hl7-messages", "a.b.c", "Messages", "x" * 64, "1abc", "a;drop table x", ""):
            text = self.refused({"D": "host=h"}, dsn_env="D", table=bad)
            self.assertTrue(text.startswith("MLLP_CONFIG: connectors.archive.table: "), text)
        self.assertEqual(build(spec(dsn="host=h"), reactor, {}).table, "hl7_messages")
        self.assertEqual(build(spec(dsn="host=h", table="archive.hl7"), reactor, {}).table, "archive.hl7")

    def test_timeout_and_unknown_option(self) -> None:
        """timeout is a positive Go duration; misspelt options are refused."""
        self.assertEqual(
            self.refused(dsn="host=h", timeout="soon"),
            "MLLP_CONFIG: connectors.archive.timeout: invalid duration 'soon'; "
            "expected a duration such as 30s, 500ms, 1m",
        )
        self.assertEqual(
            self.refused(dsn="host=h", tabel="x"),
            "MLLP_CONFIG: connectors.archive.tabel: unknown option for a postgres connector; "
            "expected one of dsn, dsn_env, insecure, table, timeout",
        )

    def test_remote_server_is_verified(self) -> None:
        """A server off loopback defaults to sslmode=verify-full; weaker modes need insecure: true; local ones are left alone."""
        def sslmode(dsn: str, environ: dict[str, str] | None = None, **options: Any) -> object:
            connector = build(spec(dsn=dsn, **options), reactor, environ or {})
            return conninfo_to_dict(connector._conninfo).get("sslmode")

        self.assertEqual(sslmode("host=db.hospital.internal dbname=archive"), "verify-full")
        self.assertEqual(sslmode("postgresql://u@10.0.0.5/archive"), "verify-full")
        self.assertEqual(sslmode("dbname=archive", {"PGHOST": "db.hospital.internal"}), "verify-full")
        self.assertEqual(sslmode("host=db sslmode=verify-full"), "verify-full")
        self.assertEqual(sslmode("host=db sslmode=disable"), "disable")
        for local in ("host=localhost", "host=127.0.0.1", "host=/run/postgresql", "dbname=a",
                      "host=db hostaddr=127.0.0.1", "host=::1"):
            self.assertIsNone(sslmode(local), local)
        for mode in ("prefer", "require", "verify-ca", "allow"):
            self.assertEqual(
                self.refused(dsn=f"host=db sslmode={mode} password=hunter2"),
                f"MLLP_CONFIG: connectors.archive.dsn: sslmode={mode} does not verify the server's certificate "
                "and name; use sslmode=verify-full (the default for a server that is not local), "
                "or set insecure: true to accept that",
            )
            self.assertEqual(sslmode(f"host=db sslmode={mode}", insecure=True), mode)
        self.assertIn("connectors.archive.dsn_env: sslmode=require",
                      self.refused({"D": "host=db sslmode=require"}, dsn_env="D"))
        self.assertIn("connectors.archive.dsn: sslmode=prefer", self.refused({"PGSSLMODE": "prefer"}, dsn="host=db"))
        self.assertIn("connectors.archive.insecure: expected true or false", self.refused(dsn="host=db", insecure="true"))
