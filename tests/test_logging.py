"""JSON log lines: one object per event, with its level and named fields."""

from __future__ import annotations

import io
import json

from twisted.logger import Logger, LogPublisher
from twisted.trial.unittest import SynchronousTestCase

from mllpd.logging import json_observer


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
