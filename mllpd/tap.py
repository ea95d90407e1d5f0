"""``twistd mllp``: options and makeService.

The only module that reads os.environ and picks the global reactor.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.application.service import IService, MultiService
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
    top = _Top()
    mllp.setServiceParent(top)
    return top


class _Top(MultiService):
    """Turns a failed bind into one line on stderr and exit status 1."""

    def privilegedStartService(self) -> None:
        from mllpd.service import ListenError

        try:
            MultiService.privilegedStartService(self)
        except ListenError as e:
            raise SystemExit(f"mllpd: MLLP_ADDR: {e}") from None
