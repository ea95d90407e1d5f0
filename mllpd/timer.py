"""One restartable timeout on an injected clock.

Every timeout of a connection (idle, frame, write, linger, the TLS
handshake) is a :class:`Timer`: one delayed call at most, and start,
reset and cancel that need no "is it running?" check around them.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime

__all__ = ["Timer"]


class Timer:
    """Calls ``function`` ``delay`` seconds after :meth:`start`, unless
    cancelled first. A delay of 0 (a setting's "off") never fires.

    ``function`` itself is what the clock schedules, so a Clock's
    ``getDelayedCalls()`` shows which timeout is pending; once it has fired,
    the timer is no longer running and may be started again from inside it.
    """

    __slots__ = ("_call", "clock", "delay", "function")

    def __init__(
        self, clock: IReactorTime, function: Callable[[], object], delay: float = 0.0
    ) -> None:
        self.clock = clock
        self.function = function
        self.delay = delay
        self._call: IDelayedCall | None = None

    @property
    def running(self) -> bool:
        """Whether a call is scheduled and has not fired or been cancelled."""
        return self._call is not None and self._call.active()

    def start(self, delay: float | None = None) -> None:
        """Schedule the call after ``delay`` (default: :attr:`delay`) seconds,
        unless it is already scheduled: a running timer keeps its deadline."""
        if self.running:
            return
        seconds = self.delay if delay is None else delay
        if seconds > 0:
            self._call = self.clock.callLater(seconds, self.function)
        else:
            self._call = None

    def reset(self, delay: float | None = None) -> None:
        """Schedule the call ``delay`` (default: :attr:`delay`) seconds from
        now, replacing any deadline it had."""
        seconds = self.delay if delay is None else delay
        call = self._call
        if call is not None and call.active():
            if seconds > 0:
                call.reset(seconds)
                return
            call.cancel()
        self._call = None
        self.start(seconds)

    def cancel(self) -> None:
        """Make sure the call does not happen (nothing to do if it is not scheduled)."""
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()
