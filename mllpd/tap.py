"""``twistd mllp``: the options, ``makeService`` and ``build``.

The options and ``makeService`` are the only code that reads os.environ and
picks the global reactor; ``build`` takes settings, a reactor and an
environment and wires the services, so tests can call it with their own.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from functools import partial
from typing import TYPE_CHECKING, NamedTuple, cast

from twisted.application.service import IService
from twisted.internet.interfaces import IReactorTime, IStreamServerEndpoint
from twisted.logger import ILogObserver, Logger
from twisted.python import usage

from mllpd.config import SETTINGS, ConfigError, Settings, load_settings, with_backlog
from mllpd.service import IServiceReactor, MetricsService, MLLPService, TopService

if TYPE_CHECKING:
    from mllpd.connectors import IConnector
    from mllpd.metrics import Metrics
    from mllpd.outbox.common import QueueDepth
    from mllpd.outbox.postgres import PostgresOutbox
    from mllpd.outbox.sqlite import SQLiteOutbox
    from mllpd.pipeline import PipelineConfig
    from mllpd.protocol import MLLPServerFactory
    from mllpd.receiver import Receiver
    from mllpd.relay import Relay, Worker
    from mllpd.tls import ServerTLS

__all__ = ["Options", "build", "makeService"]

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

    # Set by postOptions.
    settings: Settings | None = None
    json_logs = False

    def postOptions(self) -> None:
        given = {s.attr: self[s.option] for s in SETTINGS}
        try:
            self.settings = load_settings(os.environ, given)
        except ConfigError as e:
            raise SystemExit(f"mllpd: {e}") from None
        parent = getattr(self, "parent", None)
        # Under twistd with no logger chosen, log JSON lines to stdout (the
        # container's log stream) instead of twistd's text format.
        self.json_logs = bool(
            parent is not None and parent.get("nodaemon") and not parent.get("logger")
            and not parent.get("logfile")
        )


def makeService(options: Options, reactor: IServiceReactor | None = None) -> IService:
    """twistd's entry point: :func:`build` with the options' settings, the
    process environment and (unless one is given) the global reactor."""
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = cast(IServiceReactor, global_reactor)
    settings = options.settings or load_settings(os.environ, {})
    observer = None
    if options.json_logs:
        from mllpd.logging import json_observer

        observer = json_observer(
            level=settings.log_level, pod=settings.pod_name, namespace=settings.pod_namespace
        )
    # What mllpd writes (the outbox holds PHI) is for mllpd alone; twistd's
    # --umask, applied after makeService, still wins when given.
    os.umask(0o077)
    return build(settings, reactor, os.environ, log_observer=observer)


def build(
    settings: Settings,
    reactor: IServiceReactor,
    environ: Mapping[str, str],
    *,
    log_observer: ILogObserver | None = None,
) -> TopService:
    """The services ``settings`` ask for, on ``reactor``, under one
    :class:`TopService`. ``environ`` is read for MLLP_CONFIG's ``${VAR}``
    references and the OTEL_* settings.

    A setting that cannot be used stops startup: SystemExit with one line
    naming it (``mllpd: MLLP_DB_PATH: ...``).
    """
    from mllpd.metrics import otlp_enabled

    listening = _listen_endpoint(settings, reactor)
    tls = _server_tls(settings, reactor)
    pipeline = _pipeline(settings, reactor, environ)
    outbox = _outbox(settings, reactor, environ)
    otlp = otlp_enabled(environ)
    metrics = _metrics(settings, outbox, tls) if settings.metrics_addr or otlp else None
    receiver = _receiver(settings, reactor, outbox, tls, pipeline)
    relay = _relay(pipeline, outbox, reactor, metrics) if pipeline is not None else None
    factory = _factory(settings, reactor, receiver, tls, metrics)
    mllp = MLLPService(
        _server_endpoint(listening, settings, reactor, factory, tls), factory, outbox, reactor,
        address=settings.port, shutdown_timeout=settings.shutdown_timeout,
        pre_shutdown_delay=settings.pre_shutdown_delay, tls=tls, relay=relay,
    )
    top = TopService(reactor, mllp, log_observer=log_observer)
    if metrics is not None:
        metrics.watch_connections(factory)
        _metrics_service(settings, reactor, metrics, otlp).setServiceParent(top)
    mllp.setServiceParent(top)
    return top


class _Pipeline(NamedTuple):
    """MLLP_CONFIG read, and a connector built for each of its entries."""

    config: PipelineConfig
    connectors: Sequence[IConnector]


def _listen_endpoint(settings: Settings, reactor: IServiceReactor) -> IStreamServerEndpoint:
    """MLLP_ADDR as an endpoint, with MLLP_LISTEN_BACKLOG."""
    from twisted.internet.endpoints import serverFromString

    description = with_backlog(settings.port, _listen_backlog(settings.listen_backlog))
    try:
        endpoint: IStreamServerEndpoint = serverFromString(reactor, description)
    except (ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"mllpd: MLLP_ADDR: invalid endpoint {settings.port!r}: {e}") from None
    return endpoint


def _server_endpoint(
    endpoint: IStreamServerEndpoint,
    settings: Settings,
    reactor: IServiceReactor,
    factory: MLLPServerFactory,
    tls: ServerTLS | None,
) -> IStreamServerEndpoint:
    """The listening endpoint wrapped in the transport concerns the
    settings ask for, innermost first."""
    from mllpd.endpoints import tcp_options_endpoint

    # Innermost of all: the options are for the TCP socket itself.
    endpoint = tcp_options_endpoint(endpoint, settings.keepalive_period)
    if settings.proxy_protocol:
        from mllpd.proxy import proxy_endpoint

        # Inside TLS: the PROXY header comes before any TLS bytes. Connections
        # waiting for it count against MLLP_MAX_CONNECTIONS.
        endpoint = proxy_endpoint(endpoint, reactor, factory)
    if tls is not None:
        from mllpd.tls import tls_endpoint

        endpoint = tls_endpoint(endpoint, tls, handshake_timeout=settings.tls_handshake_timeout)
    return endpoint


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


def _server_tls(settings: Settings, reactor: IServiceReactor) -> ServerTLS | None:
    """TLS_CERT_FILE and friends loaded, or None when TLS is off."""
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


def _pipeline(
    settings: Settings, reactor: IServiceReactor, environ: Mapping[str, str]
) -> _Pipeline | None:
    """MLLP_CONFIG: rules compiled and every connector built, or one line."""
    if not settings.config:
        return None
    from mllpd.connectors import build_connector
    from mllpd.pipeline import load_pipeline_config

    try:
        config = load_pipeline_config(settings.config, environ)
        connectors = [build_connector(spec, reactor, environ) for spec in config.connectors]
    except ConfigError as e:
        raise SystemExit(f"mllpd: {e}") from None
    if settings.connector_process and connectors:
        from mllpd.connectors.remote import in_child

        # Built here as well: a bad option still fails startup with its one
        # line, and the relay learns which connectors forward batches whole.
        # The child builds them from what was read here, not the file again.
        try:
            connectors = in_child(
                config.connectors, connectors, reactor,
                {**environ, "LOG_LEVEL": settings.log_level},
            )
        except ValueError as e:
            raise SystemExit(f"mllpd: MLLP_CONFIG: {e}") from None
    return _Pipeline(config, connectors)


def _outbox(
    settings: Settings, reactor: IServiceReactor, environ: Mapping[str, str]
) -> SQLiteOutbox | PostgresOutbox:
    """The PostgreSQL outbox when MLLP_DB_URL is set, else SQLite's."""
    from mllpd.outbox import OutboxError

    if settings.db_url:
        from mllpd.outbox.postgres import PostgresOutbox, outbox_url, server_name

        try:
            url = outbox_url(settings.db_url, environ, settings.db_insecure)
        except ValueError as e:
            raise SystemExit(f"mllpd: MLLP_DB_URL: {e}") from None
        log.info(
            "outbox in PostgreSQL at {server}; MLLP_DB_PATH ({path}) is not used",
            event="outbox_postgres", server=server_name(settings.db_url),
            path=settings.db_path,
        )
        try:
            return PostgresOutbox(
                url, reactor, dedup_window=settings.dedup_window,
                retention=settings.retention, pod=settings.pod_name,
            )
        except OutboxError as e:
            raise SystemExit(f"mllpd: MLLP_DB_URL: {e}") from None
    from mllpd.outbox.sqlite import SQLiteOutbox

    try:
        return SQLiteOutbox(
            settings.db_path, reactor, dedup_window=settings.dedup_window,
            retention=settings.retention, pod=settings.pod_name, wal_limit=settings.wal_limit,
        )
    except OutboxError as e:
        raise SystemExit(f"mllpd: MLLP_DB_PATH: {e}") from None


def _metrics(
    settings: Settings, outbox: SQLiteOutbox | PostgresOutbox, tls: ServerTLS | None
) -> Metrics:
    """The metrics, watching the outbox and the TLS reloads."""
    from mllpd.metrics import Metrics

    metrics = Metrics(pod=settings.pod_name, namespace=settings.pod_namespace)
    outbox.commit_observer = metrics.commit_done
    wal = getattr(outbox, "wal", None)  # SQLite's
    if wal is not None:
        metrics.watch_wal(wal)
    if tls is not None:
        metrics.watch_tls_reloads(tls.reloads, tls.closed)
    return metrics


def _receiver(
    settings: Settings,
    reactor: IServiceReactor,
    outbox: SQLiteOutbox | PostgresOutbox,
    tls: ServerTLS | None,
    pipeline: _Pipeline | None,
) -> Receiver:
    from mllpd.receiver import Receiver
    from mllpd.validation import structure_validator

    receiver = Receiver(
        outbox,
        reactor,
        default_charset=settings.default_charset,
        validator=structure_validator(reactor) if settings.validate == "structure" else None,
        # MLLP_CLIENT_IDENTITIES needs TLS_CLIENT_CA: loaded and reloaded with the TLS files.
        identities=tls.identities if tls is not None else None,
        rules=pipeline.config.rules if pipeline is not None else None,
        max_outbox=settings.max_outbox,
        max_batch_messages=settings.max_batch_messages,
    )
    if tls is not None:
        tls.identity_listeners.append(partial(setattr, receiver, "identities"))
    return receiver


def _factory(
    settings: Settings,
    reactor: IServiceReactor,
    receiver: Receiver,
    tls: ServerTLS | None,
    metrics: Metrics | None,
) -> MLLPServerFactory:
    from mllpd.protocol import MLLPServerFactory

    return MLLPServerFactory(
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


def _relay(
    pipeline: _Pipeline,
    outbox: SQLiteOutbox | PostgresOutbox,
    reactor: IServiceReactor,
    metrics: Metrics | None,
) -> Relay:
    """A delivery worker per connector; in a cluster (the PostgreSQL outbox)
    each delivers only while this replica holds its connector's lease."""
    from mllpd.outbox.sqlite import SQLiteOutbox
    from mllpd.relay import Relay, Worker

    config = pipeline.config
    workers = [
        Worker(connector, outbox, config.retry, reactor, lanes=spec.lanes, metrics=metrics)
        for spec, connector in zip(config.connectors, pipeline.connectors, strict=True)
    ]
    leases = None
    if not isinstance(outbox, SQLiteOutbox):
        from mllpd.outbox.leases import Leases

        by_name = {w.name: w for w in workers}
        leases = Leases(
            outbox.url, reactor, by_name, partial(_lease_changed, by_name, metrics),
            pod=outbox.pod, drain=lambda name: by_name[name].drained(),
        )
        for worker in workers:
            worker.fence = partial(leases.wait, worker.name)
    relay = Relay(workers, leases=leases)
    outbox.add_listener(relay.notify)
    if metrics is not None:
        names = [c.name for c in pipeline.connectors]
        outbox.count_observer = partial(_report_depths, metrics, names, reactor)
    return relay


def _lease_changed(
    workers: Mapping[str, Worker], metrics: Metrics | None, name: str, held: bool
) -> None:
    """A worker delivers while this replica holds its connector's lease."""
    if held:
        workers[name].resume()
    else:
        workers[name].pause()
    if metrics is not None:
        metrics.set_lease(name, held)


def _report_depths(
    metrics: Metrics,
    names: Sequence[str],
    clock: IReactorTime,
    counted: Mapping[str, QueueDepth],
) -> None:
    """The outbox's latest count, as each connector's queue depth and age."""
    now = clock.seconds()
    for name in names:
        depth = counted.get(name)
        if depth is None or depth.oldest is None:
            metrics.set_depth(name, 0, 0.0)
        else:
            metrics.set_depth(name, depth.pending, max(0.0, now - depth.oldest))


def _metrics_service(
    settings: Settings, reactor: IServiceReactor, metrics: Metrics, otlp: bool
) -> MetricsService:
    """The scrape endpoint on MLLP_METRICS_ADDR, and the OTLP export."""
    from twisted.internet.endpoints import serverFromString

    from mllpd.metrics import metrics_site, start_otlp

    endpoint = None
    if settings.metrics_addr:
        try:
            endpoint = serverFromString(reactor, settings.metrics_addr)
        except (ValueError, KeyError, TypeError) as e:
            raise SystemExit(
                f"mllpd: MLLP_METRICS_ADDR: invalid endpoint {settings.metrics_addr!r}: {e}"
            ) from None
    return MetricsService(
        endpoint,
        metrics_site(metrics) if endpoint is not None else None,
        address=settings.metrics_addr,
        otlp=start_otlp(metrics) if otlp else None,
    )
