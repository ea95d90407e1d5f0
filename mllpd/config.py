"""Settings: parse environment and command-line values into one frozen record.

Every setting has an environment variable and an equal ``twistd mllp`` option;
an option beats the environment, which beats the default. A bad value raises
:class:`ConfigError` whose text is one line naming the variable.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

__all__ = [
    "SETTINGS",
    "SERVER_ENDPOINT_TYPES",
    "ConfigError",
    "HostPort",
    "Setting",
    "Settings",
    "load_settings",
    "parse_duration",
    "parse_boolean",
    "parse_host_port",
    "parse_listen_address",
    "parse_size",
    "with_backlog",
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


# Endpoint types serverFromString knows: ``tcp:2575`` is an endpoint string,
# not a host named "tcp".
SERVER_ENDPOINT_TYPES = frozenset(
    {"tcp", "tcp6", "ssl", "tls", "unix", "systemd", "haproxy", "le", "lets"}
)
_HOST_PORT = re.compile(
    r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9_.\-]*)):(?P<port>\d{1,5})"
)


class HostPort(NamedTuple):
    """An address written ``host:port``, ``[v6 host]:port``, ``:port`` or ``port``."""

    host: str  # "" when none was written
    port: int
    v6: bool = False

    def endpoint_host(self) -> str:
        """The host as a Twisted endpoint string argument (colons escaped)."""
        return self.host.replace(":", "\\:")


def parse_host_port(
    text: str, endpoint_types: frozenset[str], *, lowest_port: int = 0
) -> HostPort | None:
    """``text`` read as a host and port, or None when it is written some
    other way (such as an endpoint string starting with one of
    ``endpoint_types``).

    The one reading of addresses for the listen settings and the connectors.
    Raises ValueError ("port 99999 out of range 0-65535") for a port outside
    ``lowest_port``-65535.
    """
    s = text.strip()
    if s.isdigit():
        return HostPort("", _port(s, lowest_port))
    m = _HOST_PORT.fullmatch(s)
    if m is None or (m.group("host") or "").lower() in endpoint_types:
        return None
    v6 = m.group("v6")
    port = _port(m.group("port"), lowest_port)
    return HostPort(v6, port, True) if v6 is not None else HostPort(m.group("host"), port)


def parse_listen_address(text: str) -> str:
    """Turn ``:2575``, ``host:2575``, ``2575`` or an endpoint string into an
    endpoint description for :func:`twisted.internet.endpoints.serverFromString`.
    """
    s = text.strip()
    if not s:
        raise ValueError("empty address")
    address = parse_host_port(s, SERVER_ENDPOINT_TYPES)
    if address is not None:
        if not address.host:
            return f"tcp:{address.port}"
        kind = "tcp6" if address.v6 else "tcp"
        return f"{kind}:{address.port}:interface={address.endpoint_host()}"
    kind = s.split(":", 1)[0].lower()
    if kind not in SERVER_ENDPOINT_TYPES:
        raise ValueError(
            f"invalid address {text!r} (use host:port, :port, a port number "
            "or a Twisted endpoint such as tcp:2575:interface=127.0.0.1)"
        )
    return s


# Endpoint types whose serverFromString parser takes ``backlog=``.
_BACKLOG_TYPES = frozenset({"tcp", "tcp6", "ssl", "unix"})


def with_backlog(endpoint: str, backlog: int) -> str:
    """``endpoint`` listening with this backlog, unless it names its own."""
    kind = endpoint.split(":", 1)[0].lower()
    if kind not in _BACKLOG_TYPES or re.search(r"(?<!\\):backlog=", endpoint):
        return endpoint
    return f"{endpoint}:backlog={backlog}"


def _port(text: str, lowest: int) -> int:
    port = int(text)
    if not lowest <= port <= 65535:
        raise ValueError(f"port {port} out of range {lowest}-65535")
    return port


def _nonneg_int(text: str) -> int:
    value = int(text.strip())
    if value < 0:
        raise ValueError("must not be negative")
    return value


_LOG_LEVELS = ("trace", "debug", "info", "warn", "error")


def _positive_int(text: str) -> int:
    value = int(text.strip())
    if value <= 0:
        raise ValueError(f"must be more than 0, got {text!r}")
    return value


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
    from mllpd.hl7 import codec_for_charset, is_wide  # a leaf-to-leaf import

    name = text.strip()
    if not name:
        return None
    codec = codec_for_charset(name)
    if codec is None:
        raise ValueError(f"unknown HL7 character set {text!r}")
    if is_wide(codec):
        raise ValueError(f"{text!r}: UTF-16 and UTF-32 cannot be framed safely by MLLP")
    return name


def _path(text: str) -> str:
    if not text.strip():
        raise ValueError("empty path")
    return text


def _optional_path(text: str) -> str | None:
    return text if text.strip() else None


def _db_url(text: str) -> str | None:
    url = text.strip()
    if not url:
        return None
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    try:
        conninfo_to_dict(url)
    except psycopg.Error:
        # Never echo the value: it may hold a password.
        raise ValueError("not a PostgreSQL connection string") from None
    return url


def _tls_version(text: str) -> str:
    version = text.strip()
    if version not in ("1.2", "1.3"):
        raise ValueError(f"invalid TLS version {text!r}")
    return version


def parse_boolean(text: str) -> bool:
    """A true/false setting: 1/true/yes/on, or 0/false/no/off or empty."""
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("", "0", "false", "no", "off"):
        return False
    raise ValueError(f"invalid boolean {text!r}")


def _optional_address(text: str) -> str | None:
    return parse_listen_address(text) if text.strip() else None


def _positive_size(text: str) -> int:
    value = parse_size(text)
    if value <= 0:
        raise ValueError("must be greater than zero")
    return value


def _wal_limit(text: str) -> int:
    value = parse_size(text)
    if value < 4 * 1024 * 1024:
        raise ValueError(f"must be at least 4MiB, got {text!r}")
    return value


def _positive_duration(text: str) -> float:
    value = parse_duration(text)
    if value <= 0:
        raise ValueError(f"must be more than 0, got {text!r}")
    return value


def _max_outbox(text: str) -> tuple[int | None, int | None]:
    """(message count, bytes): a plain number counts messages, a size with
    a unit counts bytes; empty means no limit."""
    text = text.strip()
    if not text:
        return (None, None)
    if text.isdigit():
        count = int(text)
        if count <= 0:
            raise ValueError(f"must be more than 0, got {text!r}")
        return (count, None)
    return (None, _positive_size(text))


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
    Setting("MLLP_LISTEN_BACKLOG", "listen_backlog", "4096", _positive_int,
            "a whole number above 0 (the kernel caps it at net.core.somaxconn)",
            "listen(2) backlog: connections the kernel queues before mllpd accepts them"),
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
    Setting("MLLP_MAX_BATCH_MESSAGES", "max_batch_messages", "10000", _positive_int,
            "a whole number greater than 0",
            "an HL7 batch (BHS ... BTS) with more messages is rejected whole"),
    Setting("MLLP_MAX_BUFFER", "max_buffer", "64MiB", _positive_size,
            "a size such as 64MiB, 256MiB or a number of bytes, at least MLLP_MAX_FRAME_SIZE",
            "all bytes of frames in progress and messages awaiting commit; above it reading pauses"),
    Setting("MLLP_KEEPALIVE_PERIOD", "keepalive_period", "60s", parse_duration,
            "a duration such as 30s or 1m (0 turns keepalive off)",
            "TCP keepalive period (0: off)"),
    Setting("MLLP_DEFAULT_CHARSET", "default_charset", "", _charset,
            "an HL7 table 0211 name such as 8859/1 or UNICODE UTF-8",
            "character set used when MSH-18 is empty"),
    Setting("MLLP_DB_PATH", "db_path", "outbox.db", _path,
            "a file path (':memory:' only for tests)",
            "SQLite outbox file"),
    Setting("MLLP_DB_URL", "db_url", "", _db_url,
            "a libpq URL (postgresql://user@host/db) or key=value string",
            "PostgreSQL outbox shared by replicas (instead of MLLP_DB_PATH)"),
    Setting("MLLP_DB_INSECURE", "db_insecure", "false", parse_boolean,
            "true or false",
            "allow MLLP_DB_URL's sslmode allow, prefer, require or verify-ca for a server that is not local"),
    Setting("MLLP_WAL_LIMIT", "wal_limit", "64MiB", _wal_limit,
            "a size of at least 4MiB, such as 64MiB or 1GiB",
            "bound of the SQLite outbox's WAL file: the log restarts at a quarter of it"),
    Setting("MLLP_DEDUP_WINDOW", "dedup_window", "24h", parse_duration,
            "a duration such as 24h or 30m (0 turns it off)",
            "how long a (MSH-3, MSH-4, MSH-10, payload hash) is remembered"),
    Setting("MLLP_CONFIG", "config", "", _optional_path,
            "a path to a YAML file with rules, connectors and retry",
            "rules and connectors (none: accept all, deliver nowhere)"),
    Setting("MLLP_RETENTION", "retention", "168h", _positive_duration,
            "a duration such as 168h or 30m",
            "how long delivered messages stay in the outbox"),
    Setting("MLLP_MAX_OUTBOX", "max_outbox", "", _max_outbox,
            "a message count such as 100000, or a size such as 5GiB",
            "past this many undelivered messages (or bytes) new ones get AR"),
    Setting("MLLP_VALIDATE", "validate", "none", _validate_mode,
            "none or structure",
            "structure: also validate message structure with hl7apy (slow)"),
    Setting("PRE_SHUTDOWN_DELAY", "pre_shutdown_delay", "0s", parse_duration,
            "a duration such as 5s (0 turns it off)",
            "after SIGTERM, keep serving (and accepting) this long"),
    Setting("SHUTDOWN_TIMEOUT", "shutdown_timeout", "30s", parse_duration,
            "a duration such as 30s",
            "on shutdown, how long open connections may finish their frames"),
    Setting("LOG_LEVEL", "log_level", "info", _log_level,
            "one of trace, debug, info, warn, error",
            "lowest level of log events written"),
    Setting("TLS_CERT_FILE", "tls_cert_file", "", _optional_path,
            "a PEM file: the server certificate, then its chain",
            "PEM server certificate and chain; TLS is on when this and TLS_KEY_FILE are set"),
    Setting("TLS_KEY_FILE", "tls_key_file", "", _optional_path,
            "a PEM file with the private key of TLS_CERT_FILE",
            "private key of the server certificate"),
    Setting("TLS_CLIENT_CA", "tls_client_ca", "", _optional_path,
            "a PEM file of CA certificates",
            "require client certificates issued by these CAs (mutual TLS)"),
    Setting("TLS_MIN_VERSION", "tls_min_version", "1.2", _tls_version,
            "1.2 or 1.3",
            "lowest TLS version accepted"),
    Setting("TLS_HANDSHAKE_TIMEOUT", "tls_handshake_timeout", "10s", parse_duration,
            "a duration such as 10s (0 turns it off)",
            "close a connection whose TLS handshake is not done this long after accept"),
    Setting("MLLP_CLIENT_IDENTITIES", "client_identities", "", _optional_path,
            "a YAML file mapping certificate subjects or SANs to MSH-3/MSH-4 values",
            "which MSH-3/MSH-4 each client certificate may send as (needs TLS_CLIENT_CA)"),
    Setting("TLS_CRL_FILE", "tls_crl_file", "", _optional_path,
            "a PEM file of certificate revocation lists from the TLS_CLIENT_CA issuers",
            "refuse client certificates revoked in these CRLs (needs TLS_CLIENT_CA; reloaded like the certificates)"),
    Setting("MLLP_PROXY_PROTOCOL", "proxy_protocol", "false", parse_boolean,
            "true or false",
            "expect a PROXY protocol v1/v2 header on every connection"),
    Setting("MLLP_CONNECTOR_PROCESS", "connector_process", "false", parse_boolean,
            "true or false",
            "run the connectors' upstream I/O in a child process (a second core for delivery)"),
    Setting("MLLP_METRICS_ADDR", "metrics_addr", "", _optional_address,
            "host:port, :port, a port number or a Twisted endpoint string",
            "serve Prometheus metrics at /metrics on this address"),
)


@dataclass(frozen=True)
class Settings:
    """All of mllpd's settings, parsed."""

    port: str = "tcp:2575"
    listen_backlog: int = 4096
    max_connections: int = 0
    idle_timeout: float = 30.0
    frame_timeout: float = 60.0
    write_timeout: float = 5.0
    max_frame_size: int = 2 * 1024 * 1024
    max_batch_messages: int = 10_000
    max_buffer: int = 64 * 1024 * 1024
    keepalive_period: float = 60.0
    default_charset: str | None = None
    db_path: str = "outbox.db"
    db_url: str | None = None
    db_insecure: bool = False
    wal_limit: int = 64 * 1024 * 1024
    dedup_window: float = 24 * 3600.0
    validate: str = "none"
    config: str | None = None
    retention: float = 168 * 3600.0
    max_outbox: tuple[int | None, int | None] = (None, None)
    pre_shutdown_delay: float = 0.0
    shutdown_timeout: float = 30.0
    log_level: str = "info"
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_client_ca: str | None = None
    tls_min_version: str = "1.2"
    tls_handshake_timeout: float = 10.0
    client_identities: str | None = None
    tls_crl_file: str | None = None
    proxy_protocol: bool = False
    metrics_addr: str | None = None
    connector_process: bool = False
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
    sources: dict[str, str] = {}
    for s in SETTINGS:
        raw = options.get(s.attr)
        source = f"--{s.option}" if raw is not None else s.variable
        sources[s.attr] = source
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
    _check_together(values, sources)
    return Settings(
        pod_name=environ.get("POD_NAME") or None,
        pod_namespace=environ.get("POD_NAMESPACE") or None,
        **values,  # type: ignore[arg-type]
    )


def _check_together(values: Mapping[str, object], sources: Mapping[str, str]) -> None:
    """Settings that only make sense with another one."""
    max_buffer, max_frame = values.get("max_buffer"), values.get("max_frame_size")
    if isinstance(max_buffer, int) and isinstance(max_frame, int) and max_buffer < max_frame:
        raise ConfigError(
            sources["max_buffer"], f"{max_buffer} bytes is less than MLLP_MAX_FRAME_SIZE ({max_frame})"
        )
    cert, key = values.get("tls_cert_file"), values.get("tls_key_file")
    if cert and not key:
        raise ConfigError(sources["tls_key_file"], "not set, but TLS_CERT_FILE is; set both or neither")
    if key and not cert:
        raise ConfigError(sources["tls_cert_file"], "not set, but TLS_KEY_FILE is; set both or neither")
    if values.get("tls_client_ca") and not cert:
        raise ConfigError(sources["tls_client_ca"], "needs TLS_CERT_FILE and TLS_KEY_FILE")
    if values.get("tls_crl_file") and not values.get("tls_client_ca"):
        raise ConfigError(
            sources["tls_crl_file"], "needs TLS_CLIENT_CA (revocation applies to client certificates)"
        )
    if values.get("client_identities") and not values.get("tls_client_ca"):
        raise ConfigError(
            sources["client_identities"], "needs TLS_CLIENT_CA (identities come from client certificates)"
        )
