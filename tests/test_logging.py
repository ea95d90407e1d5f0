"""JSON log lines: one object per event, with its level and named fields."""

from __future__ import annotations

import io
import json
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.logger import Logger, LogPublisher
from twisted.trial.unittest import SynchronousTestCase

from mllpd.logging import format_peer, json_observer


class JSONObserverTests(SynchronousTestCase):
    def test_level_is_the_events_level(self) -> None:
        """A warning is written as level warn, an error as error, so operators can filter on it."""
        out = io.StringIO()
        publisher = LogPublisher(json_observer(out, level="debug", pod="p-1"))
        log = Logger(namespace="mllpd.test", observer=publisher)
        log.debug("d", event="e_debug")
        log.info("i", event="e_info")
        log.warn("w {connector}", event="e_warn", connector="ehr")
        log.error("e", event="e_error")
        lines = [json.loads(line) for line in out.getvalue().splitlines()]
        self.assertEqual(
            [(r["event"], r["level"]) for r in lines],
            [("e_debug", "debug"), ("e_info", "info"), ("e_warn", "warn"), ("e_error", "error")],
        )
        self.assertEqual((lines[2]["msg"], lines[2]["connector"], lines[2]["pod"]), ("w ehr", "ehr", "p-1"))

    def lines(self, **observer: Any) -> tuple[Logger, io.StringIO]:
        out = io.StringIO()
        return Logger(namespace="mllpd.test", observer=LogPublisher(json_observer(out, **observer))), out

    def test_pod_and_namespace_on_every_line(self) -> None:
        """Every line names the pod and its namespace, so a cluster's logs can be told apart."""
        log, out = self.lines(pod="mllpd-0", namespace="healthcare-prod")
        log.info("a", event="a")
        log.warn("b", event="b")
        records = [json.loads(line) for line in out.getvalue().splitlines()]
        self.assertEqual([(r["pod"], r["pod_namespace"]) for r in records], [("mllpd-0", "healthcare-prod")] * 2)

    def test_only_scalar_fields(self) -> None:
        """Named scalar fields are written; bytes, objects and twistd's internals never reach the line."""
        log, out = self.lines()
        payload = b"MSH|^~\\&|LAB||EHR||20260101||ADT^A01|C1|P|2.5\rPID|1||123^^^H||DOE^JOHN\r"
        log.info(
            "stored {control_id}", event="stored", control_id="C1", size=len(payload),
            peer="10.0.0.7:40000", payload=payload, segments=[payload], envelope=object(),
        )
        [line] = out.getvalue().splitlines()
        self.assertNotIn("DOE", line)
        record = json.loads(line)
        self.assertEqual(
            set(record),
            {"time", "level", "logger", "msg", "pod", "pod_namespace", "event", "control_id", "size", "peer"},
        )
        self.assertEqual((record["msg"], record["size"], record["logger"]), ("stored C1", len(payload), "mllpd.test"))

    def test_configured_level_filters(self) -> None:
        """MLLP_LOG_LEVEL=warn drops info; trace shows debug."""
        log, out = self.lines(level="warn")
        log.info("i", event="i")
        log.warn("w", event="w")
        self.assertEqual([json.loads(line)["event"] for line in out.getvalue().splitlines()], ["w"])
        log, out = self.lines(level="trace")
        log.debug("d", event="d")
        self.assertEqual([json.loads(line)["event"] for line in out.getvalue().splitlines()], ["d"])

    def test_failure_has_type_and_traceback(self) -> None:
        """A logged failure carries its exception type and traceback in the line."""
        log, out = self.lines()
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            log.failure("commit failed", event="commit_failed")
        record = json.loads(out.getvalue())
        self.assertEqual((record["level"], record["error_type"]), ("critical", "RuntimeError"))
        self.assertIn("boom", record["traceback"])


class FormatPeerTests(SynchronousTestCase):
    def test_forms(self) -> None:
        """Peers read host:port, [v6 host]:port, or the address itself when it has no host."""
        self.assertEqual(format_peer(IPv4Address("TCP", "10.0.0.7", 40000)), "10.0.0.7:40000")
        self.assertEqual(format_peer(IPv6Address("TCP", "::1", 40000)), "[::1]:40000")
        self.assertEqual(format_peer(UNIXAddress("/run/mllp.sock")), str(UNIXAddress("/run/mllp.sock")))
