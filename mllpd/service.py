"""The mllpd service: listen, serve, and shut down without losing an ACK."""

from __future__ import annotations

import signal
import sys
from types import FrameType
from typing import TYPE_CHECKING, Any, Protocol

from twisted.application.service import IServiceCollection, MultiService, Service
from twisted.internet.defer import Deferred
from twisted.internet.error import ReactorNotRunning
from twisted.internet.interfaces import (
    IDelayedCall,
    IListeningPort,
    IProtocolFactory,
    IReactorCore,
    IReactorThreads,
    IReactorTime,
    IStreamServerEndpoint,
    _ISupportsExitSignalCapturing,
)
from twisted.logger import ILogObserver, Logger
from twisted.python.components import Componentized
from twisted.python.failure import Failure

if TYPE_CHECKING:
    from mllpd.outbox import IOutbox
    from mllpd.protocol import MLLPServerFactory
    from mllpd.tls import ServerTLS

__all__ = [
    "IServiceReactor",
    "ListenError",
    "MLLPService",
    "MetricsService",
    "Relay",
    "TopService",
]

log = Logger(namespace="mllpd.service")


class IServiceReactor(IReactorCore, IReactorTime, IReactorThreads):
    """What mllpd's services use of the reactor. Like Twisted's own
    ``_IReactorCommon``, a make-believe interface for type checks: every
    reactor mllpd runs on provides each of its parts."""


class Relay(Protocol):
    """What the shutdown needs of the delivery relay: in-flight deliveries
    finish or go back to pending, then the Deferred fires."""

    def stop(self) -> Deferred[None]: ...


class ListenError(Exception):
    """The listen address could not be bound."""

    def __init__(self, message: str, variable: str = "MLLP_ADDR") -> None:
        super().__init__(message)
        self.variable = variable


def _listen_now(
    endpoint: IStreamServerEndpoint, factory: IProtocolFactory, address: str, variable: str
) -> IListeningPort:
    # Bind before privileges are dropped and before the reactor runs, so a
    # busy or forbidden port stops startup with one clear line.
    result: list[Any] = []
    endpoint.listen(factory).addBoth(result.append)
    if not result:
        raise ListenError(f"listening on {address} did not complete", variable)
    if isinstance(result[0], Failure):
        raise ListenError(f"cannot listen on {address}: {result[0].getErrorMessage()}", variable)
    port: IListeningPort = result[0]
    return port


class MLLPService(Service):
    """Owns the listening port, the connections' factory and the outbox, and
    stops them in the stages of SPEC section 7."""

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
        pre_shutdown_delay: float = 0.0,
        relay: Relay | None = None,
        tls: ServerTLS | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.factory = factory
        self.outbox = outbox
        self.clock = clock
        self.address = address
        self.shutdown_timeout = shutdown_timeout
        self.pre_shutdown_delay = pre_shutdown_delay
        self.relay = relay
        self.tls = tls
        self.port: IListeningPort | None = None
        self.stage: str | None = None
        self.hurried = False
        self._wake: Deferred[str] | None = None
        self._stopping: Deferred[None] | None = None

    def privilegedStartService(self) -> None:
        self.port = _listen_now(self.endpoint, self.factory, self.address, "MLLP_ADDR")
        Service.privilegedStartService(self)

    def startService(self) -> None:
        Service.startService(self)
        start = getattr(self.outbox, "start", None)
        if start is not None:
            start()
        relay_start = getattr(self.relay, "start", None)
        if relay_start is not None:
            relay_start()
        if self.tls is not None:
            self.tls.start_watching()
        host = self.port.getHost() if self.port is not None else None
        log.info(
            "listening on {host}:{port}", event="listening",
            host=getattr(host, "host", None), port=getattr(host, "port", None),
            tls=self.tls is not None,
        )

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        if self._stopping is None:
            self._stopping = Deferred.fromCoroutine(self._shutdown())
            return self._stopping
        # Asked again while stopping: fire when the one shutdown ends.
        d: Deferred[None] = Deferred()
        self._stopping.addBoth(self._chain, d)
        return d

    @staticmethod
    def _chain(result: object, d: Deferred[None]) -> object:
        if isinstance(result, Failure):
            d.errback(result)
        else:
            d.callback(None)
        return result

    def hurry(self) -> None:
        """A second SIGTERM: skip the pre-delay and the drain, abort now."""
        if self.hurried:
            return
        self.hurried = True
        log.warn("shutdown hurried: aborting open connections", event="shutdown_hurried",
                 stage=self.stage)
        if self._wake is not None and not self._wake.called:
            self._wake.callback("hurried")

    def _until(self, seconds: float, done: Deferred[None] | None = None) -> Deferred[str]:
        """Fires with "timeout", "done" (``done`` fired) or "hurried"."""
        wake: Deferred[str] = Deferred()
        self._wake = wake

        def fire(why: str) -> None:
            if not wake.called:
                wake.callback(why)

        timer: IDelayedCall = self.clock.callLater(seconds, fire, "timeout")
        if done is not None:
            done.addCallback(lambda _: fire("done"))
        if self.hurried:
            fire("hurried")

        def cleanup(why: str) -> str:
            if timer.active():
                timer.cancel()
            self._wake = None
            return why

        return wake.addCallback(cleanup)

    async def _shutdown(self) -> None:
        factory = self.factory
        # (1) Keep serving, so the load balancer can notice the pod going.
        self.stage = "pre_delay"
        log.info(
            "shutting down: serving on for {delay}s", event="shutdown_pre_delay",
            delay=self.pre_shutdown_delay, open=len(factory.connections),
        )
        if self.pre_shutdown_delay > 0 and not self.hurried:
            await self._until(self.pre_shutdown_delay)
        # (2) Stop listening.
        self.stage = "stop_listening"
        if self.port is not None:
            stopped = self.port.stopListening()
            if stopped is not None:
                await stopped
        log.info("stopped listening", event="shutdown_stop_listening",
                 open=len(factory.connections))
        # (3) Drain: frames in progress finish and get their ACKs.
        self.stage = "drain"
        log.info(
            "draining {count} connections for up to {timeout}s",
            event="shutdown_drain", count=len(factory.connections), timeout=self.shutdown_timeout,
        )
        drained = factory.drain()
        why = "done"
        if not drained.called:
            why = await self._until(self.shutdown_timeout, drained)
        # (4) Abort what remains, without ACKs: the senders resend.
        self.stage = "abort"
        aborted = factory.abort_all()
        (log.warn if aborted else log.info)(
            "aborted {count} connections ({why})", event="shutdown_abort",
            count=aborted, why=why, timeout=self.shutdown_timeout,
        )
        # (5) Stop the delivery workers.
        self.stage = "stop_relay"
        workers = 0
        if self.relay is not None:
            workers = len(getattr(self.relay, "workers", ()) or ())
            await self.relay.stop()
        log.info("delivery stopped ({count} workers)", event="shutdown_relay_stopped",
                 count=workers)
        if self.tls is not None:
            self.tls.stop_watching()
        # (6) Close the outbox once its commits in progress are done.
        self.stage = "close_outbox"
        await self.outbox.close()
        self.stage = "stopped"
        log.info(
            "outbox closed", event="shutdown_outbox_closed",
            commits=getattr(self.outbox, "commits", None),
            messages=getattr(self.outbox, "committed_messages", None),
        )


class MetricsService(Service):
    """The Prometheus scrape endpoint (MLLP_METRICS_ADDR), and the OTLP
    exporter when one is configured."""

    name = "metrics"  # type: ignore[assignment]

    def __init__(
        self,
        endpoint: IStreamServerEndpoint | None,
        site: IProtocolFactory | None,
        *,
        address: str | None,
        otlp: Any = None,
    ) -> None:
        self.endpoint = endpoint
        self.site = site
        self.address = address
        self.otlp = otlp
        self.port: IListeningPort | None = None

    def privilegedStartService(self) -> None:
        if self.endpoint is not None and self.site is not None:
            self.port = _listen_now(self.endpoint, self.site, str(self.address), "MLLP_METRICS_ADDR")
        Service.privilegedStartService(self)

    def startService(self) -> None:
        Service.startService(self)
        if self.port is not None:
            host = self.port.getHost()
            log.info(
                "metrics on http://{host}:{port}/metrics", event="metrics_listening",
                host=getattr(host, "host", None), port=getattr(host, "port", None),
            )

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self.port is not None:
            stopped = self.port.stopListening()
            if stopped is not None:
                await stopped
        if self.otlp is not None:
            from twisted.internet.threads import deferToThread

            # The SDK's final export blocks on HTTP: not on the reactor thread.
            await deferToThread(self.otlp.shutdown)


class TopService(MultiService):
    """The root of the service tree: the process's signals and exit status.

    Exit status for twistd: 1 with one stderr line when a bind fails, 0 after
    a completed shutdown. SIGTERM (or SIGINT) once starts the staged
    shutdown, again hurries it; SIGHUP reloads the TLS files, CRLs and client
    identities. ``log_observer``, when given, becomes the log observer of the
    twistd application this service is added to.
    """

    def __init__(
        self,
        reactor: IServiceReactor,
        mllp: MLLPService | None = None,
        *,
        log_observer: ILogObserver | None = None,
    ) -> None:
        super().__init__()
        self._reactor = reactor
        self._mllp = mllp
        self._log_observer = log_observer
        self._terms = 0

    def setServiceParent(self, parent: IServiceCollection) -> None:
        MultiService.setServiceParent(self, parent)
        # twistd takes the application's ILogObserver component as its log
        # observer (when no --logger is given), after makeService returns:
        # the place an application chooses where its log goes.
        if self._log_observer is not None and isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, self._log_observer)

    def privilegedStartService(self) -> None:
        try:
            MultiService.privilegedStartService(self)
        except ListenError as e:
            # twistd has already pointed sys.stderr at the log by now.
            stderr = sys.__stderr__ or sys.stderr
            stderr.write(f"mllpd: {e.variable}: {e}\n")
            stderr.flush()
            raise SystemExit(1) from None

    def startService(self) -> None:
        def on_hup(signum: int, frame: FrameType | None) -> None:
            self._reactor.callFromThread(self._reload)

        # Before the children log "listening": the default actions of SIGHUP
        # and SIGTERM would kill us before the reactor installs its own.
        signal.signal(signal.SIGHUP, on_hup)
        self._install_sigterm()
        MultiService.startService(self)
        # The reactor replaces SIGTERM's and SIGINT's handlers during startup
        # (a signal then still starts the same shutdown, via reactor.stop());
        # ours go back on top once it runs.
        self._reactor.callWhenRunning(self._install_sigterm)

    def _install_sigterm(self) -> None:
        def on_term(signum: int, frame: FrameType | None) -> None:
            self._reactor.callFromThread(self._terminate, signal.Signals(signum).name)

        signal.signal(signal.SIGTERM, on_term)
        # Ctrl-C in a terminal: the same stages (a second one hurries them).
        signal.signal(signal.SIGINT, on_term)

    def _terminate(self, name: str = "SIGTERM") -> None:
        self._terms += 1
        if self._terms == 1:
            log.info("{signal}: shutting down", event="sigterm", signal=name, count=1)
            try:
                self._reactor.stop()
            except ReactorNotRunning:
                pass  # already stopping for another reason
            return
        log.warn("{signal} again: skipping to the abort", event="sigterm", signal=name,
                 count=self._terms)
        if self._mllp is not None:
            self._mllp.hurry()

    def _reload(self) -> None:
        tls = self._mllp.tls if self._mllp is not None else None
        if tls is None:
            log.info("SIGHUP ignored: TLS is off", event="sighup_ignored")
            return
        tls.reload("sighup")

    def stopService(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop_in_order())

    async def _stop_in_order(self) -> None:
        # The MLLP service first, alone: metrics stay scrapeable (and OTLP
        # exports its last values) through the whole staged shutdown.
        if self._mllp is not None:
            await self._mllp.stopService()
        await MultiService.stopService(self)
        _orderly_exit(self._reactor)


def _orderly_exit(reactor: object) -> None:
    """Have twistd (and twist) exit 0 after this completed shutdown, even
    when the signal that started it reached the reactor's own handler.

    During the reactor's startup, until ours go back on top, its SIGTERM and
    SIGINT handlers are the ones in place; they record the signal, and once
    the reactor stops twistd and twist re-raise it (exit 143 or 130).
    Twisted has no public way to mark a stop as orderly, so this clears the
    attribute those runners read, through the (private) interface they read
    it by.
    """
    if _ISupportsExitSignalCapturing.providedBy(reactor):
        reactor._exitSignal = None
