"""Settings: parse environment and command-line values into one frozen record.

Every setting has an environment variable and an equal ``twistd mllp`` option;
an option beats the environment, which beats the default. A bad value raises
:class:`ConfigError` whose text is one line naming the variable.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

__all__ = [
    "SETTINGS",
    "ConfigError",
    "Setting",
    "Settings",
    "load_settings",
    "parse_duration",
    "parse_listen_address",
    "parse_size",
]


class ConfigError(ValueError):
    """A setting has a value mllpd cannot use."""

    def __init__(self, variable: str, message: str) -> None:
        super().__init__(f"{variable}: {message}")
        self.variable = variable


_DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


def parse_duration(text: str) -> float:
    """Parse a Go duration ("250ms", "1h30m", "0") into seconds."""
    s = text.strip()
    if s == "0":
        return 0.0
    if not s:
        raise ValueError("empty duration")
    pos = 0
    total = 0.0
    while pos < len(s):
        m = _DURATION_PART.match(s, pos)
        if m is None:
            raise ValueError(f"invalid duration {text!r}")
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    return total


_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "ki": 1024,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mi": 1024**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gi": 1024**3,
    "gib": 1024**3,
}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([A-Za-z]*)")


def parse_size(text: str) -> int:
    """Parse a size ("2MiB", "512KiB", "1048576") into bytes."""
    m = _SIZE.fullmatch(text.strip())
    if m is None or m.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"invalid size {text!r}")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


_ENDPOINT_TYPES = frozenset(
    {"tcp", "tcp6", "ssl", "tls", "unix", "systemd", "haproxy", "le", "lets"}
)
_HOST_PORT = re.compile(r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[^:\[\]]*)):(?P<port>\d{1,5})")


def parse_listen_address(text: str) -> str:
    """Turn ``:2575``, ``host:2575``, ``2575`` or an endpoint string into an
    endpoint description for :func:`twisted.internet.endpoints.serverFromString`.
    """
    s = text.strip()
    if not s:
        raise ValueError("empty address")
    if s.isdigit():
        return f"tcp:{_port(s)}"
    m = _HOST_PORT.fullmatch(s)
    if m is not None and (m.group("host") or "").lower() not in _ENDPOINT_TYPES:
        port = _port(m.group("port"))
        host = m.group("v6") or m.group("host")
        if not host:
            return f"tcp:{port}"
        kind = "tcp6" if m.group("v6") else "tcp"
        return f"{kind}:{port}:interface={host.replace(':', chr(92) + ':')}"
    kind = s.split(":", 1)[0].lower()
    if kind not in _ENDPOINT_TYPES:
        raise ValueError(
            f"invalid address {text!r} (use host:port, :port, a port number "
            "or a Twisted endpoint such as tcp:2575:interface=127.0.0.1)"
        )
    return s


def _port(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} out of range 0-65535")
    return port


def _nonneg_int(text: str) -> int:
    value = int(text.strip())
    if value < 0:
        raise ValueError("must not be negative")
    return value


_LOG_LEVELS = ("trace", "debug", "info", "warn", "error")


def _log_level(text: str) -> str:
    level = text.strip().lower()
    if level == "warning":
        level = "warn"
    if level not in _LOG_LEVELS:
        raise ValueError(f"invalid level {text!r}")
    return level


def _validate_mode(text: str) -> str:
    mode = text.strip().lower()
    if mode not in ("none", "structure"):
        raise ValueError(f"invalid mode {text!r}")
    return mode


def _charset(text: str) -> str | None:
    from mllpd.hl7 import codec_for_charset  # a leaf-to-leaf import

    name = text.strip()
    if not name:
        return None
    if codec_for_charset(name) is None:
        raise ValueError(f"unknown HL7 character set {text!r}")
    return name


def _path(text: str) -> str:
    if not text.strip():
        raise ValueError("empty path")
    return text


def _positive_size(text: str) -> int:
    value = parse_size(text)
    if value <= 0:
        raise ValueError("must be greater than zero")
    return value


@dataclass(frozen=True)
class Setting:
    """One configurable value: its variable, option name, default and parser."""

    variable: str
    attr: str
    default: str
    parse: Callable[[str], object]
    accepts: str
    help: str

    @property
    def option(self) -> str:
        return self.attr.replace("_", "-")


SETTINGS: tuple[Setting, ...] = (
    Setting("MLLP_ADDR", "port", ":2575", parse_listen_address,
            "host:port, :port, a port number or a Twisted endpoint string",
            "listen address"),
    Setting("MLLP_MAX_CONNECTIONS", "max_connections", "0", _nonneg_int,
            "a whole number, 0 for unlimited",
            "connections beyond this are closed at once (0: unlimited)"),
    Setting("MLLP_IDLE_TIMEOUT", "idle_timeout", "30s", parse_duration,
            "a duration such as 250ms, 30s, 1h30m (0 turns it off)",
            "close a connection idle this long between frames"),
    Setting("MLLP_FRAME_TIMEOUT", "frame_timeout", "60s", parse_duration,
            "a duration such as 250ms, 60s, 1h30m (0 turns it off)",
            "a frame must be complete this long after its start byte"),
    Setting("MLLP_WRITE_TIMEOUT", "write_timeout", "5s", parse_duration,
            "a duration such as 250ms, 5s, 1m (0 turns it off)",
            "close a connection whose ACKs cannot be written this long"),
    Setting("MLLP_MAX_FRAME_SIZE", "max_frame_size", "2MiB", _positive_size,
            "a size such as 2MiB, 512KiB or a number of bytes",
            "larger frames are rejected and the connection closed"),
    Setting("MLLP_KEEPALIVE_PERIOD", "keepalive_period", "60s", parse_duration,
            "a duration such as 30s or 1m (0 turns keepalive off)",
            "TCP keepalive period (0: off)"),
    Setting("MLLP_DEFAULT_CHARSET", "default_charset", "", _charset,
            "an HL7 table 0211 name such as 8859/1 or UNICODE UTF-8",
            "character set used when MSH-18 is empty"),
    Setting("MLLP_DB_PATH", "db_path", "outbox.db", _path,
            "a file path (':memory:' only for tests)",
            "SQLite outbox file"),
    Setting("MLLP_DEDUP_WINDOW", "dedup_window", "24h", parse_duration,
            "a duration such as 24h or 30m (0 turns it off)",
            "how long a (MSH-3, MSH-4, MSH-10, payload hash) is remembered"),
    Setting("MLLP_VALIDATE", "validate", "none", _validate_mode,
            "none or structure",
            "structure: also validate message structure with hl7apy (slow)"),
    Setting("SHUTDOWN_TIMEOUT", "shutdown_timeout", "30s", parse_duration,
            "a duration such as 30s",
            "on shutdown, how long open connections may finish their frames"),
    Setting("LOG_LEVEL", "log_level", "info", _log_level,
            "one of trace, debug, info, warn, error",
            "lowest level of log events written"),
)


@dataclass(frozen=True)
class Settings:
    """All of mllpd's settings, parsed."""

    port: str = "tcp:2575"
    max_connections: int = 0
    idle_timeout: float = 30.0
    frame_timeout: float = 60.0
    write_timeout: float = 5.0
    max_frame_size: int = 2 * 1024 * 1024
    keepalive_period: float = 60.0
    default_charset: str | None = None
    db_path: str = "outbox.db"
    dedup_window: float = 24 * 3600.0
    validate: str = "none"
    shutdown_timeout: float = 30.0
    log_level: str = "info"
    pod_name: str | None = None
    pod_namespace: str | None = None


def load_settings(
    environ: Mapping[str, str], options: Mapping[str, str | None]
) -> Settings:
    """Build :class:`Settings` from the environment and command-line options.

    ``options`` maps a setting's attribute name to the string given on the
    command line, or None when the option was not given.
    """
    values: dict[str, object] = {}
    for s in SETTINGS:
        raw = options.get(s.attr)
        source = f"--{s.option}" if raw is not None else s.variable
        if raw is None:
            raw = environ.get(s.variable)
        if raw is None:
            raw = s.default
        try:
            values[s.attr] = s.parse(raw)
        except ValueError as e:
            detail = str(e)
            raise ConfigError(
                source, f"{detail}; expected {s.accepts}"
            ) from None
    return Settings(
        pod_name=environ.get("POD_NAME") or None,
        pod_namespace=environ.get("POD_NAMESPACE") or None,
        **values,  # type: ignore[arg-type]
    )
