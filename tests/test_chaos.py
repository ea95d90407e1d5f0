"""A CI-sized chaos run of the real process: kill -9, SIGTERM, a full disk
and a flapping upstream under load, with every AA'd message checked."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from tests.chaos import run_chaos
from tests.serverproc import make_workdir


class ChaosTests(SynchronousTestCase):
    def test_one_cycle_keeps_every_promise(self) -> None:
        """After kill -9, SIGTERM, a full disk and an upstream flap, every AA'd message is stored and delivered in order."""
        report = run_chaos(make_workdir(self), cycles=1, senders=3, phase_acks=10)
        self.assertEqual(report.problems, [])
        self.assertEqual((report.cycles, report.kills, report.sigterms, report.full_disks, report.upstream_flaps),
                         (1, 1, 1, 1, 1))
        self.assertGreaterEqual(report.checked, 3 * 10 * 6)
        self.assertGreater(report.refused_while_full, 0)
