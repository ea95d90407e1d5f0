"""``twistd mllp``: options and makeService.

The only module that reads os.environ and picks the global reactor.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from twisted.application.service import IService, MultiService
from twisted.internet.defer import Deferred
from twisted.logger import ILogObserver
from twisted.python import usage

from mllpd.config import SETTINGS, ConfigError, Settings, load_settings

__all__ = ["Options", "log_observer", "makeService"]

_settings: Settings | None = None


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

    from mllpd.outbox import OutboxError
    from mllpd.outbox.sqlite import SQLiteOutbox
    from mllpd.protocol import MLLPServerFactory
    from mllpd.receiver import Receiver
    from mllpd.service import MLLPService
    from mllpd.validation import structure_validator

    settings: Settings = getattr(options, "settings", None) or load_settings(os.environ, {})
    try:
        endpoint = serverFromString(reactor, settings.port)
    except (ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"mllpd: MLLP_ADDR: invalid endpoint {settings.port!r}: {e}") from None
    try:
        outbox = SQLiteOutbox(
            settings.db_path, reactor, dedup_window=settings.dedup_window  # type: ignore[arg-type]
        )
    except OutboxError as e:
        raise SystemExit(f"mllpd: MLLP_DB_PATH: {e}") from None
    receiver = Receiver(
        outbox,
        reactor,
        default_charset=settings.default_charset,
        validator=structure_validator(reactor) if settings.validate == "structure" else None,
    )
    factory = MLLPServerFactory(
        receiver,
        reactor,
        max_connections=settings.max_connections,
        max_frame_size=settings.max_frame_size,
        idle_timeout=settings.idle_timeout,
        frame_timeout=settings.frame_timeout,
        write_timeout=settings.write_timeout,
        keepalive_period=settings.keepalive_period,
        debug=settings.log_level in ("debug", "trace"),
    )
    mllp = MLLPService(
        endpoint, factory, outbox, reactor,
        address=settings.port, shutdown_timeout=settings.shutdown_timeout,
    )
    top = _Top(reactor)
    mllp.setServiceParent(top)
    return top


class _Top(MultiService):
    """Exit status for twistd: 1 with one stderr line when the bind fails,
    0 after a completed shutdown.
    """

    def __init__(self, reactor: Any) -> None:
        super().__init__()
        self._reactor = reactor

    def privilegedStartService(self) -> None:
        from mllpd.service import ListenError

        try:
            MultiService.privilegedStartService(self)
        except ListenError as e:
            # twistd has already pointed sys.stderr at the log by now.
            stderr = sys.__stderr__ or sys.stderr
            stderr.write(f"mllpd: MLLP_ADDR: {e}\n")
            stderr.flush()
            raise SystemExit(1) from None

    def stopService(self) -> Deferred[None]:
        d = MultiService.stopService(self)

        def clean_exit(result: object) -> object:
            # twistd re-raises the SIGTERM it got once the reactor stops (exit
            # 143); a drained, orderly stop is a success, so report 0.
            if hasattr(self._reactor, "_exitSignal"):
                self._reactor._exitSignal = None
            return result

        return d.addCallback(clean_exit)
