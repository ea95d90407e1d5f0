"""``twistd mllp``: options and makeService.

The only module that reads os.environ and picks the global reactor.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from twisted.application.service import IService, MultiService
from twisted.internet.defer import Deferred
from twisted.logger import ILogObserver, Logger
from twisted.python import usage

from mllpd.config import SETTINGS, ConfigError, Settings, load_settings, with_backlog

__all__ = ["Options", "log_observer", "makeService"]

_settings: Settings | None = None

log = Logger(namespace="mllpd.tap")


def _describe(variable: str, default: str, text: str) -> str:
    return f"{text} [{variable}; default {default or 'none'}]"


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Run the mllpd HL7 v2 MLLP gateway. Every option has an equal "
        "environment variable (in brackets); an option beats the variable, "
        "which beats the default. Durations use Go syntax (250ms, 5s, 1h30m); "
        "sizes accept 2MiB, 512KiB or bytes."
    )
    optParameters = [
        [s.option, "p" if s.attr == "port" else None, None, _describe(s.variable, s.default, s.help)]
        for s in SETTINGS
    ]

    def postOptions(self) -> None:
        global _settings
        given = {s.attr: self[s.option] for s in SETTINGS}
        try:
            _settings = self.settings = load_settings(os.environ, given)
        except ConfigError as e:
            raise SystemExit(f"mllpd: {e}") from None
        parent = getattr(self, "parent", None)
        # Under twistd with no logger chosen, log JSON lines to stdout (the
        # container's log stream) instead of twistd's text format.
        if parent is not None and parent.get("nodaemon") and not parent.get("logger") \
                and not parent.get("logfile"):
            parent["logger"] = "mllpd.tap.log_observer"


def log_observer() -> ILogObserver:
    """twistd's --logger factory: JSON lines with the configured level."""
    from mllpd.logging import json_observer

    s = _settings or load_settings(os.environ, {})
    return json_observer(level=s.log_level, pod=s.pod_name, namespace=s.pod_namespace)


def makeService(options: Any) -> IService:
    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString

    from mllpd.endpoints import tcp_options_endpoint
    from mllpd.metrics import Metrics, metrics_site, otlp_enabled, start_otlp
    from mllpd.protocol import MLLPServerFactory
    from mllpd.receiver import Receiver
    from mllpd.service import MetricsService, MLLPService
    from mllpd.validation import structure_validator

    settings: Settings = getattr(options, "settings", None) or load_settings(os.environ, {})
    # What mllpd writes (the outbox holds PHI) is for mllpd alone; twistd's
    # --umask, applied after makeService, still wins when given.
    os.umask(0o077)
    backlog = _listen_backlog(settings.listen_backlog)
    try:
        endpoint = serverFromString(reactor, with_backlog(settings.port, backlog))
    except (ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"mllpd: MLLP_ADDR: invalid endpoint {settings.port!r}: {e}") from None
    endpoint = tcp_options_endpoint(endpoint, settings.keepalive_period)
    tls = _server_tls(settings, reactor)
    # MLLP_CLIENT_IDENTITIES needs TLS_CLIENT_CA: loaded and reloaded with the TLS files.
    identities = tls.identities if tls is not None else None
    pipeline = _pipeline(settings, reactor)
    outbox = _outbox(settings, reactor)
    otlp_on = otlp_enabled(os.environ)
    metrics = None
    if settings.metrics_addr or otlp_on:
        metrics = Metrics(pod=settings.pod_name, namespace=settings.pod_namespace)
        outbox.commit_observer = metrics.commit_done
        wal = getattr(outbox, "wal", None)  # SQLite's
        if wal is not None:
            metrics.watch_wal(wal)
        if tls is not None:
            metrics.watch_tls_reloads(tls.reloads)
    receiver = Receiver(
        outbox,
        reactor,
        default_charset=settings.default_charset,
        validator=structure_validator(reactor) if settings.validate == "structure" else None,
        identities=identities,
        rules=pipeline[0].rules if pipeline is not None else None,
        max_outbox=settings.max_outbox,
        max_batch_messages=settings.max_batch_messages,
    )
    if tls is not None:
        tls.identity_listeners.append(lambda new: setattr(receiver, "identities", new))
    relay = _relay(pipeline, outbox, reactor, metrics) if pipeline is not None else None
    factory = MLLPServerFactory(
        receiver,
        reactor,
        max_connections=settings.max_connections,
        max_frame_size=settings.max_frame_size,
        max_buffer=settings.max_buffer,
        idle_timeout=settings.idle_timeout,
        frame_timeout=settings.frame_timeout,
        write_timeout=settings.write_timeout,
        debug=settings.log_level in ("debug", "trace"),
        tls=tls is not None,
        metrics=metrics,
    )
    if settings.proxy_protocol:
        from mllpd.proxy import proxy_endpoint

        # Innermost: the PROXY header comes before any TLS bytes. Connections
        # waiting for it count against MLLP_MAX_CONNECTIONS.
        endpoint = proxy_endpoint(endpoint, reactor, factory)
    if tls is not None:
        from mllpd.tls import tls_endpoint

        endpoint = tls_endpoint(endpoint, tls, handshake_timeout=settings.tls_handshake_timeout)
    mllp = MLLPService(
        endpoint, factory, outbox, reactor,
        address=settings.port, shutdown_timeout=settings.shutdown_timeout,
        pre_shutdown_delay=settings.pre_shutdown_delay, tls=tls, relay=relay,
    )
    top = _Top(reactor, mllp)
    if metrics is not None:
        metrics.watch_connections(factory)
        metrics_endpoint = None
        if settings.metrics_addr:
            try:
                metrics_endpoint = serverFromString(reactor, settings.metrics_addr)
            except (ValueError, KeyError, TypeError) as e:
                raise SystemExit(
                    f"mllpd: MLLP_METRICS_ADDR: invalid endpoint {settings.metrics_addr!r}: {e}"
                ) from None
        MetricsService(
            metrics_endpoint,
            metrics_site(metrics) if metrics_endpoint is not None else None,
            address=settings.metrics_addr,
            otlp=start_otlp(metrics) if otlp_on else None,
        ).setServiceParent(top)
    mllp.setServiceParent(top)
    return top


def _outbox(settings: Settings, reactor: Any) -> Any:
    """The PostgreSQL outbox when MLLP_DB_URL is set, else SQLite's."""
    from mllpd.outbox import OutboxError

    options: dict[str, Any] = dict(
        dedup_window=settings.dedup_window, retention=settings.retention,
        pod=settings.pod_name,
    )
    if settings.db_url:
        from mllpd.outbox.postgres import PostgresOutbox, server_name

        log.info(
            "outbox in PostgreSQL at {server}; MLLP_DB_PATH ({path}) is not used",
            event="outbox_postgres", server=server_name(settings.db_url),
            path=settings.db_path,
        )
        try:
            return PostgresOutbox(settings.db_url, reactor, **options)
        except OutboxError as e:
            raise SystemExit(f"mllpd: MLLP_DB_URL: {e}") from None
    from mllpd.outbox.sqlite import SQLiteOutbox

    try:
        return SQLiteOutbox(settings.db_path, reactor, wal_limit=settings.wal_limit, **options)
    except OutboxError as e:
        raise SystemExit(f"mllpd: MLLP_DB_PATH: {e}") from None


def _listen_backlog(requested: int, somaxconn: str = "/proc/sys/net/core/somaxconn") -> int:
    """MLLP_LISTEN_BACKLOG, capped (as the kernel would, silently) at somaxconn."""
    try:
        with open(somaxconn, encoding="ascii") as f:
            limit = int(f.read().strip())
    except (OSError, ValueError):
        return requested
    if requested > limit:
        log.warn(
            "MLLP_LISTEN_BACKLOG {requested} capped at net.core.somaxconn {limit}",
            event="listen_backlog_capped", requested=requested, limit=limit,
        )
        return limit
    return requested


def _pipeline(settings: Settings, reactor: Any) -> Any:
    """MLLP_CONFIG: rules compiled and every connector built, or one line."""
    if not settings.config:
        return None
    from mllpd.pipeline import load_pipeline_config

    try:
        pipeline = load_pipeline_config(settings.config, os.environ)
        connectors = [_connector(spec, reactor) for spec in pipeline.connectors]
    except ConfigError as e:
        raise SystemExit(f"mllpd: {e}") from None
    return pipeline, connectors


def _connector(spec: Any, reactor: Any) -> Any:
    from mllpd.connectors import http, mllp, postgres

    builders: dict[str, Any] = {
        "mllp": mllp.build, "http": http.build, "postgres": postgres.build,
    }
    return builders[spec.type](spec, reactor, os.environ)


def _relay(pipeline: Any, outbox: Any, reactor: Any, metrics: Any) -> Any:
    from mllpd.relay import Relay, Worker

    config, connectors = pipeline
    workers = [
        Worker(connector, outbox, config.retry, reactor, lanes=spec.lanes, metrics=metrics)
        for spec, connector in zip(config.connectors, connectors, strict=True)
    ]
    leases = None
    url = getattr(outbox, "url", None)
    if url is not None:
        # A cluster: each connector is delivered by whichever replica holds
        # its lease; workers wait until then.
        from mllpd.outbox.leases import Leases

        by_name = {w.name: w for w in workers}

        def on_lease(name: str, held: bool) -> None:
            worker = by_name[name]
            worker.resume() if held else worker.pause()
            if metrics is not None:
                metrics.set_lease(name, held)

        leases = Leases(url, reactor, by_name, on_lease, pod=outbox.pod)
    relay = Relay(workers, leases=leases)
    outbox.add_listener(relay.notify)
    if metrics is not None:
        names = [c.name for c in connectors]

        def depths(counted: dict[str, Any]) -> None:
            now = reactor.seconds()
            for name in names:
                depth = counted.get(name)
                if depth is None or depth.oldest is None:
                    metrics.set_depth(name, 0, 0.0)
                else:
                    metrics.set_depth(name, depth.pending, max(0.0, now - depth.oldest))

        outbox.count_observer = depths
    return relay


def _server_tls(settings: Settings, reactor: Any) -> Any:
    if not (settings.tls_cert_file and settings.tls_key_file):
        return None
    from mllpd.tls import ServerTLS, TLSConfigError, TLSFiles

    files = TLSFiles(
        settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca,
        settings.tls_min_version, crl_file=settings.tls_crl_file,
        identities_file=settings.client_identities,
    )
    try:
        return ServerTLS(files, reactor)
    except TLSConfigError as e:
        raise SystemExit(f"mllpd: {e}") from None


class _Top(MultiService):
    """Exit status for twistd (1 with one stderr line when a bind fails, 0
    after a completed shutdown) and the signals: SIGTERM once starts the
    staged shutdown, SIGTERM again hurries it; SIGHUP reloads the TLS files,
    CRLs and client identities.
    """

    def __init__(self, reactor: Any, mllp: Any = None) -> None:
        super().__init__()
        self._reactor = reactor
        self._mllp = mllp
        self._terms = 0

    def privilegedStartService(self) -> None:
        from mllpd.service import ListenError

        try:
            MultiService.privilegedStartService(self)
        except ListenError as e:
            # twistd has already pointed sys.stderr at the log by now.
            stderr = sys.__stderr__ or sys.stderr
            stderr.write(f"mllpd: {e.variable}: {e}\n")
            stderr.flush()
            raise SystemExit(1) from None

    def startService(self) -> None:
        import signal

        def on_hup(signum: int, frame: object) -> None:
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
        import signal

        def on_term(signum: int, frame: object) -> None:
            self._reactor.callFromThread(self._terminate, signal.Signals(signum).name)

        signal.signal(signal.SIGTERM, on_term)
        # Ctrl-C in a terminal: the same stages (a second one hurries them).
        signal.signal(signal.SIGINT, on_term)

    def _terminate(self, name: str = "SIGTERM") -> None:
        from twisted.internet.error import ReactorNotRunning

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
        tls = getattr(self._mllp, "tls", None)
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
        # twistd re-raises a SIGINT (or a SIGTERM that came before our
        # handler) once the reactor stops; an orderly stop is a success: 0.
        if hasattr(self._reactor, "_exitSignal"):
            self._reactor._exitSignal = None
