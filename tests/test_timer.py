"""Timer on a Clock: start, reset and cancel, whether or not it is running."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mllpd.timer import Timer


class TimerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.fired: list[float] = []
        self.timer = Timer(self.clock, self.fire, 5.0)

    def fire(self) -> None:
        self.fired.append(self.clock.seconds())

    def test_fires_once_after_its_delay(self) -> None:
        """Started, it calls its function once, after its delay, and is then no longer running."""
        self.timer.start()
        self.assertTrue(self.timer.running)
        self.assertEqual([c.func for c in self.clock.getDelayedCalls()], [self.fire])
        self.clock.advance(4.9)
        self.assertEqual(self.fired, [])
        self.clock.advance(0.1)
        self.assertEqual(self.fired, [5.0])
        self.clock.advance(100)
        self.assertEqual(self.fired, [5.0])
        self.assertFalse(self.timer.running)

    def test_start_keeps_a_running_deadline(self) -> None:
        """Starting a running timer neither moves its deadline nor schedules a second call."""
        self.timer.start()
        self.clock.advance(3)
        self.timer.start()
        self.timer.start(1.0)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(2)
        self.assertEqual(self.fired, [5.0])

    def test_reset_moves_the_deadline(self) -> None:
        """Reset schedules the call a full delay from now, running or not."""
        self.timer.reset()
        self.clock.advance(3)
        self.timer.reset()
        self.clock.advance(4.9)
        self.assertEqual(self.fired, [])
        self.clock.advance(0.1)
        self.assertEqual(self.fired, [8.0])
        self.timer.reset(2.0)  # after firing: starts again
        self.clock.advance(2.0)
        self.assertEqual(self.fired, [8.0, 10.0])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_cancel_is_safe_in_any_state(self) -> None:
        """Cancel before start, twice, and after firing is harmless; a cancelled timer never fires."""
        self.timer.cancel()
        self.timer.start()
        self.timer.cancel()
        self.timer.cancel()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(10)
        self.assertEqual(self.fired, [])
        self.timer.start()
        self.clock.advance(5)
        self.timer.cancel()
        self.assertEqual(self.fired, [15.0])

    def test_zero_delay_is_off(self) -> None:
        """A delay of 0 (a setting's "off") schedules nothing; resetting a running timer to 0 stops it."""
        off = Timer(self.clock, self.fire)
        off.start()
        off.reset()
        self.assertFalse(off.running)
        self.timer.start()
        self.timer.reset(0)
        self.assertFalse(self.timer.running)
        self.clock.advance(60)
        self.assertEqual((self.fired, self.clock.getDelayedCalls()), ([], []))

    def test_restarted_from_its_own_function(self) -> None:
        """The function may start its timer again (a timeout that looks, then waits the rest)."""
        def again() -> None:
            self.fire()
            if len(self.fired) < 3:
                timer.start(2.0)

        timer = Timer(self.clock, again, 5.0)
        timer.start()
        self.clock.advance(5)
        self.clock.advance(2)
        self.clock.advance(2)
        self.clock.advance(2)
        self.assertEqual(self.fired, [5.0, 7.0, 9.0])
        self.assertFalse(timer.running)
