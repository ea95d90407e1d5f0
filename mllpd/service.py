"""The mllpd service: listen, serve, and shut down without losing an ACK."""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import (
    IListeningPort,
    IReactorTime,
    IStreamServerEndpoint,
)
from twisted.logger import Logger
from twisted.python.failure import Failure

from mllpd.outbox import IOutbox
from mllpd.protocol import MLLPServerFactory

__all__ = ["ListenError", "MLLPService"]

log = Logger(namespace="mllpd.service")


class ListenError(Exception):
    """The listen address could not be bound."""


class MLLPService(Service):
    """Owns the listening port, the connections' factory and the outbox."""

    name = "mllp"  # type: ignore[assignment]

    def __init__(
        self,
        endpoint: IStreamServerEndpoint,
        factory: MLLPServerFactory,
        outbox: IOutbox,
        clock: IReactorTime,
        *,
        address: str,
        shutdown_timeout: float = 30.0,
    ) -> None:
        self.endpoint = endpoint
        self.factory = factory
        self.outbox = outbox
        self.clock = clock
        self.address = address
        self.shutdown_timeout = shutdown_timeout
        self.port: IListeningPort | None = None

    def privilegedStartService(self) -> None:
        # Bind before privileges are dropped and before the reactor runs, so a
        # busy or forbidden port stops startup with one clear line.
        result: list[Any] = []
        self.endpoint.listen(self.factory).addBoth(result.append)
        if not result:
            raise ListenError(f"listening on {self.address} did not complete")
        if isinstance(result[0], Failure):
            raise ListenError(f"cannot listen on {self.address}: {result[0].getErrorMessage()}")
        self.port = result[0]
        Service.privilegedStartService(self)

    def startService(self) -> None:
        Service.startService(self)
        start = getattr(self.outbox, "start", None)
        if start is not None:
            start()
        host = self.port.getHost() if self.port is not None else None
        log.info(
            "listening on {host}:{port}", event="listening",
            host=getattr(host, "host", None), port=getattr(host, "port", None),
        )

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        return Deferred.fromCoroutine(self._shutdown())

    async def _shutdown(self) -> None:
        if self.port is not None:
            stopped = self.port.stopListening()
            if stopped is not None:
                await stopped
            log.info("stopped listening", event="shutdown_stop_listening")
        open_now = len(self.factory.connections)
        log.info(
            "draining {count} connections for up to {timeout}s",
            event="shutdown_drain", count=open_now, timeout=self.shutdown_timeout,
        )
        drained = self.factory.drain()
        timer = self.clock.callLater(self.shutdown_timeout, drained.cancel)
        try:
            await drained
            timer.cancel()
        except CancelledError:
            aborted = self.factory.abort_all()
            log.warn(
                "aborted {count} connections still busy after {timeout}s",
                event="shutdown_abort", count=aborted, timeout=self.shutdown_timeout,
            )
        await self.outbox.close()
        log.info(
            "outbox closed", event="shutdown_outbox_closed",
            commits=getattr(self.outbox, "commits", None),
            messages=getattr(self.outbox, "committed_messages", None),
        )
