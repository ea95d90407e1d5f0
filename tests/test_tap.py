"""tap.py: the settings become the right services; bad settings stop startup with one line."""

from __future__ import annotations

import io
import json
import os
import sys
from typing import Any, cast

from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.application.service import Application
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import ILogObserver, LogLevel, capturedLogs
from twisted.scripts.twistd import ServerOptions
from twisted.trial.unittest import SynchronousTestCase

from mllpd.config import load_settings
from mllpd.outbox.common import QueueDepth
from mllpd.service import IServiceReactor, MLLPService, TopService
from mllpd.tap import Options, _listen_backlog, build, makeService
from tests.certs import CertDir
from tests.serverproc import make_workdir

PIPELINE = """\
connectors:
  - name: ehr
    type: mllp
    address: 127.0.0.1:1
  - name: lake
    type: http
    url: http://127.0.0.1:1/hl7
"""


class BuildTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = make_workdir(self)
        self.reactor = MemoryReactorClock()
        self.env = {"MLLP_DB_PATH": os.path.join(self.dir, "outbox.db"), "MLLP_ADDR": "127.0.0.1:0"}

    def build(self, **env: str) -> TopService:
        environ = {**self.env, **env}
        return build(load_settings(environ, {}), cast(IServiceReactor, self.reactor), environ)

    def listen(self, top: TopService) -> list[tuple[Any, ...]]:
        """Bind what ``top`` would bind at startup; (port, factory, backlog, interface) each."""
        top.privilegedStartService()
        return self.reactor.tcpServers

    def startup_error(self, **env: str) -> str:
        with self.assertRaises(SystemExit) as caught:
            self.build(**env)
        return str(caught.exception.code)

    def test_plain_gateway(self) -> None:
        """With defaults, the one MLLP listener on MLLP_ADDR with no TLS, metrics or delivery."""
        top = self.build()
        mllp = top.getServiceNamed("mllp")
        assert isinstance(mllp, MLLPService)
        self.assertEqual([s.name for s in top], ["mllp"])
        self.assertEqual((mllp.tls, mllp.relay), (None, None))
        [(port, factory, _, interface)] = self.listen(top)
        self.assertEqual((port, interface), (0, "127.0.0.1"))
        # Only the socket options (keepalive, no Nagle delay) wrap it.
        self.assertIs(factory.wrappedFactory, mllp.factory)

    def test_listen_backlog(self) -> None:
        """MLLP_LISTEN_BACKLOG is the listening socket's backlog."""
        [(_, _, backlog, _)] = self.listen(self.build(MLLP_LISTEN_BACKLOG="16"))
        self.assertEqual(backlog, 16)

    def test_metrics_listener(self) -> None:
        """MLLP_METRICS_ADDR adds the scrape endpoint, listening next to MLLP."""
        top = self.build(MLLP_METRICS_ADDR="127.0.0.1:0")
        self.assertEqual(sorted(s.name for s in top), ["metrics", "mllp"])
        self.assertEqual(len(self.listen(top)), 2)

    def test_transport_wrappers(self) -> None:
        """MLLP_PROXY_PROTOCOL and TLS put their wrappers between the socket and the MLLP factory."""
        certs = CertDir(self.dir)
        cert, key, _ = certs.server_pair()
        for env in ({"MLLP_PROXY_PROTOCOL": "true"}, {"TLS_CERT_FILE": cert, "TLS_KEY_FILE": key}):
            self.reactor = MemoryReactorClock()
            top = self.build(**env)
            mllp = top.getServiceNamed("mllp")
            [(_, factory, _, _)] = self.listen(top)
            self.assertIsNot(factory, mllp.factory, env)
            self.assertEqual(mllp.tls is not None, "TLS_CERT_FILE" in env)

    def test_pipeline_workers_and_depths(self) -> None:
        """MLLP_CONFIG gives a delivery worker per connector; the outbox's counts become each queue's depth and age."""
        config = os.path.join(self.dir, "pipeline.yaml")
        with open(config, "w") as f:
            f.write(PIPELINE)
        top = self.build(MLLP_CONFIG=config, MLLP_METRICS_ADDR="127.0.0.1:0")
        mllp = top.getServiceNamed("mllp")
        self.assertEqual(sorted(mllp.relay.workers), ["ehr", "lake"])
        self.reactor.advance(100)
        assert mllp.outbox.count_observer is not None
        mllp.outbox.count_observer({"ehr": QueueDepth(3, 0, 95.0)})
        text = generate_latest(mllp.factory.metrics.registry).decode()
        got = {
            (s.name, s.labels["connector"]): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name in ("mllp_outbox_depth", "mllp_outbox_oldest_age_seconds")
        }
        self.assertEqual(got, {
            ("mllp_outbox_depth", "ehr"): 3, ("mllp_outbox_oldest_age_seconds", "ehr"): 5.0,
            ("mllp_outbox_depth", "lake"): 0, ("mllp_outbox_oldest_age_seconds", "lake"): 0.0,
        })

    def test_bad_settings_one_line(self) -> None:
        """A setting that cannot be used stops startup with one line naming it."""
        missing = os.path.join(self.dir, "missing", "x")
        cases = {
            "MLLP_ADDR": {"MLLP_ADDR": "tcp:notaport"},
            "MLLP_METRICS_ADDR": {"MLLP_METRICS_ADDR": "tcp:notaport"},
            "MLLP_DB_PATH": {"MLLP_DB_PATH": missing},
            "MLLP_CONFIG": {"MLLP_CONFIG": missing},
            "TLS_CERT_FILE": {"TLS_CERT_FILE": missing, "TLS_KEY_FILE": missing},
        }
        for variable, env in cases.items():
            line = self.startup_error(**env)
            self.assertTrue(line.startswith(f"mllpd: {variable}: "), line)
            self.assertNotIn("\n", line)

    def test_bad_connector_option_one_line(self) -> None:
        """A connector option that cannot be used stops startup with one line naming it."""
        config = os.path.join(self.dir, "pipeline.yaml")
        with open(config, "w") as f:
            f.write(PIPELINE.replace("127.0.0.1:1\n", "127.0.0.1:99999\n"))
        line = self.startup_error(MLLP_CONFIG=config)
        self.assertTrue(line.startswith("mllpd: MLLP_CONFIG: connectors.ehr.address: port 99999 out of range"), line)


class BacklogTests(SynchronousTestCase):
    def somaxconn(self, text: str) -> str:
        path = os.path.join(make_workdir(self), "somaxconn")
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_capped_at_somaxconn(self) -> None:
        """A backlog over net.core.somaxconn is capped there, with one warning naming both."""
        with capturedLogs() as events:
            self.assertEqual(_listen_backlog(4096, self.somaxconn("128\n")), 128)
        [warning] = [e for e in events if e.get("event") == "listen_backlog_capped"]
        self.assertEqual((warning["log_level"], warning["requested"], warning["limit"]), (LogLevel.warn, 4096, 128))

    def test_kept_when_allowed_or_unknown(self) -> None:
        """A backlog within somaxconn, or with somaxconn unreadable, is used as set, silently."""
        with capturedLogs() as events:
            self.assertEqual(_listen_backlog(64, self.somaxconn("4096\n")), 64)
            self.assertEqual(_listen_backlog(64, self.somaxconn("junk")), 64)
            self.assertEqual(_listen_backlog(64, os.path.join(make_workdir(self), "none")), 64)
        self.assertEqual([e for e in events if e.get("event") == "listen_backlog_capped"], [])


class MakeServiceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = make_workdir(self)
        environ = {"MLLP_DB_PATH": os.path.join(self.dir, "outbox.db"), "POD_NAME": "mllpd-0"}
        self.patch(os, "environ", environ)
        self.addCleanup(os.umask, os.umask(0o022))

    def options(self, *argv: str, **twistd: object) -> Options:
        """``twistd [twistd options] mllp argv``, as twistd hands them to makeService."""
        parent = ServerOptions()
        parent.update(twistd)
        options = Options()
        options.parent = parent
        options.parseOptions(list(argv))
        return options

    def test_options_then_environment(self) -> None:
        """An option beats its environment variable; the service runs on the given reactor with private files."""
        os.environ["MLLP_ADDR"] = ":2575"
        reactor = MemoryReactorClock()
        top = makeService(self.options("--port", "127.0.0.1:0"), reactor=cast(IServiceReactor, reactor))
        top.privilegedStartService()
        [(port, _, _, interface)] = reactor.tcpServers
        self.assertEqual((port, interface), (0, "127.0.0.1"))
        self.assertEqual(os.umask(0o077), 0o077)

    def test_bad_option_one_line(self) -> None:
        """A bad option or variable stops startup with one line naming it as the user wrote it."""
        with self.assertRaises(SystemExit) as caught:
            self.options("--idle-timeout", "soon")
        self.assertTrue(str(caught.exception.code).startswith("mllpd: --idle-timeout: "))
        os.environ["MLLP_IDLE_TIMEOUT"] = "soon"
        with self.assertRaises(SystemExit) as caught:
            self.options()
        self.assertTrue(str(caught.exception.code).startswith("mllpd: MLLP_IDLE_TIMEOUT: "))

    def test_json_logs_under_twistd_nodaemon(self) -> None:
        """twistd -n with no --logger or --logfile logs JSON lines with the pod's name to stdout, at MLLP_LOG_LEVEL."""
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        app = Application("mllp")
        options = self.options("--port", "127.0.0.1:0", "--log-level", "warn", nodaemon=True)
        makeService(options, reactor=cast(IServiceReactor, MemoryReactorClock())).setServiceParent(app)
        observer = app.getComponent(ILogObserver)
        self.assertIsNotNone(observer)
        for level in (LogLevel.info, LogLevel.warn):
            observer({"log_level": level, "log_format": "hello", "log_namespace": "t", "log_time": 0, "event": "e"})
        [line] = out.getvalue().splitlines()
        self.assertEqual({k: v for k, v in json.loads(line).items() if k in ("level", "pod", "msg")},
                         {"level": "warn", "pod": "mllpd-0", "msg": "hello"})

    def test_twistd_logging_when_asked(self) -> None:
        """With --logfile, --logger, or without -n, twistd's own logging is left alone."""
        for twistd in ({"nodaemon": True, "logfile": "x.log"}, {"nodaemon": True, "logger": "x.y"}, {}):
            app = Application("mllp")
            options = self.options("--port", "127.0.0.1:0", **twistd)
            makeService(options, reactor=cast(IServiceReactor, MemoryReactorClock())).setServiceParent(app)
            self.assertIsNone(app.getComponent(ILogObserver), twistd)
