"""TLS for the MLLP listener: PEM files into a server context, mutual TLS,
and live reload of the certificate pair.

TLS wraps whatever endpoint the user configured (as tahoe-lafs does): the
listener's factory is wrapped in a ``TLSMemoryBIOFactory`` whose connection
creator is a :class:`ServerTLS`. Each new connection takes the context that
is current when it is accepted, so a reload changes what new handshakes see
and leaves open connections alone.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from OpenSSL import SSL, crypto
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IListeningPort,
    IOpenSSLServerConnectionCreator,
    IProtocolFactory,
    IReactorTime,
    IStreamServerEndpoint,
)
from twisted.internet.ssl import (
    AcceptableCiphers,
    Certificate,
    CertificateOptions,
    TLSVersion,
    trustRootFromCertificates,
)
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

__all__ = [
    "AEAD_CIPHERS",
    "RELOAD_POLL_INTERVAL",
    "ServerTLS",
    "TLSConfigError",
    "TLSFiles",
    "load_context",
    "peer_identity",
    "tls_endpoint",
]

log = Logger(namespace="mllpd.tls")

# TLS 1.2 suites with authenticated encryption and forward secrecy only; TLS
# 1.3 suites are all AEAD and not affected by this string.
AEAD_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20"

# Seconds between looks at the certificate files. Kubernetes takes up to a
# minute to update a mounted Secret, so a few seconds more do not matter.
RELOAD_POLL_INTERVAL = 2.0

_VERSIONS = {"1.2": TLSVersion.TLSv1_2, "1.3": TLSVersion.TLSv1_3}


class TLSConfigError(Exception):
    """A TLS file cannot be used; names the setting it came from."""

    def __init__(self, variable: str, message: str) -> None:
        super().__init__(f"{variable}: {message}")
        self.variable = variable
        self.reason = message


@dataclass(frozen=True)
class TLSFiles:
    """Where the server's TLS material lives, and the lowest version."""

    cert_file: str
    key_file: str
    client_ca: str | None = None
    min_version: str = "1.2"

    def paths(self) -> tuple[str, ...]:
        return tuple(p for p in (self.cert_file, self.key_file, self.client_ca) if p)


def _read(variable: str, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TLSConfigError(variable, f"cannot read {path}: {e.strerror or e}") from None


def _certificates(variable: str, path: str) -> list[x509.Certificate]:
    data = _read(variable, path)
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if not certs:
        raise TLSConfigError(variable, f"no PEM certificate in {path}")
    return certs


def _public_der(key: Any) -> bytes:
    return bytes(
        key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def load_context(files: TLSFiles) -> SSL.Context:
    """Read and check the PEM files; an OpenSSL context for the server.

    Raises :class:`TLSConfigError` naming the setting whose file is
    unreadable, malformed, or (TLS_KEY_FILE) does not match the certificate.
    """
    chain = _certificates("TLS_CERT_FILE", files.cert_file)
    key_data = _read("TLS_KEY_FILE", files.key_file)
    try:
        key: PrivateKeyTypes = serialization.load_pem_private_key(key_data, password=None)
    except (ValueError, TypeError) as e:
        reason = "encrypted keys are not supported" if isinstance(e, TypeError) else "not a PEM private key"
        raise TLSConfigError("TLS_KEY_FILE", f"{files.key_file}: {reason}") from None
    if _public_der(key.public_key()) != _public_der(chain[0].public_key()):
        raise TLSConfigError(
            "TLS_KEY_FILE", f"{files.key_file} does not match the certificate in TLS_CERT_FILE"
        )
    trust: dict[str, Any] = {}
    if files.client_ca:
        # The certificate store still wants pyOpenSSL's X509.
        cas = [
            Certificate(crypto.X509.from_cryptography(c))
            for c in _certificates("TLS_CLIENT_CA", files.client_ca)
        ]
        trust = {"trustRoot": trustRootFromCertificates(cas)}
    options = CertificateOptions(
        # Twisted hands these to pyOpenSSL's Context, which takes
        # cryptography's objects (its X509 and PKey wrappers are deprecated).
        privateKey=key,  # type: ignore[arg-type]
        certificate=chain[0],  # type: ignore[arg-type]
        extraCertChain=chain[1:],  # type: ignore[arg-type]
        raiseMinimumTo=_VERSIONS[files.min_version],
        acceptableCiphers=AcceptableCiphers.fromOpenSSLCipherString(AEAD_CIPHERS),
        **trust,
    )
    try:
        return options.getContext()
    except SSL.Error as e:
        raise TLSConfigError("TLS_CERT_FILE", f"OpenSSL refused the pair: {e}") from None


def _stamp(paths: tuple[str, ...]) -> tuple[object, ...]:
    """What identifies the files' current content: where each path leads now
    (Kubernetes swaps the ``..data`` symlink) and a digest of what is there.

    A digest rather than mtimes: a file rewritten in place within one
    timestamp tick, at the same size, would otherwise go unnoticed. The files
    are a few KiB, read once per poll.
    """
    parts: list[object] = []
    for path in paths:
        real = os.path.realpath(path)
        try:
            with open(real, "rb") as f:
                parts.append((real, hashlib.sha256(f.read()).digest()))
        except OSError as e:
            parts.append((real, e.errno))
    return tuple(parts)


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """The server's TLS contexts: the current one for each new connection,
    replaced by :meth:`reload` only when the new files load and match.
    """

    def __init__(
        self,
        files: TLSFiles,
        clock: IReactorTime,
        *,
        poll_interval: float = RELOAD_POLL_INTERVAL,
        load: Callable[[TLSFiles], SSL.Context] = load_context,
    ) -> None:
        self.files = files
        self.clock = clock
        self.poll_interval = poll_interval
        self._load = load
        self._stamp = _stamp(files.paths())
        # At startup a bad file is fatal: TLSConfigError propagates.
        self.context = load(files)
        self.reloads: Counter[str] = Counter()
        self._loop: LoopingCall | None = None

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        return SSL.Connection(self.context, None)

    def reload(self, trigger: str = "sighup") -> bool:
        """Load the files again; keep the current pair when they are unusable."""
        self._stamp = _stamp(self.files.paths())
        try:
            context = self._load(self.files)
        except TLSConfigError as e:
            self.reloads["failed"] += 1
            log.error(
                "TLS reload ({trigger}) failed, keeping the current certificate: {setting}: {reason}",
                event="tls_reload_failed", trigger=trigger, setting=e.variable, reason=e.reason,
            )
            return False
        self.context = context
        self.reloads["ok"] += 1
        log.info(
            "TLS certificate reloaded ({trigger})", event="tls_reloaded", trigger=trigger,
        )
        return True

    def check_files(self) -> None:
        """Reload when a file or the symlink leading to it changed."""
        if _stamp(self.files.paths()) != self._stamp:
            self.reload("files_changed")

    def start_watching(self) -> None:
        if self._loop is None and self.poll_interval > 0:
            self._loop = LoopingCall(self.check_files)
            self._loop.clock = self.clock
            self._loop.start(self.poll_interval, now=False)

    def stop_watching(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None


@implementer(IStreamServerEndpoint)
class _TLSServerEndpoint:
    def __init__(self, endpoint: IStreamServerEndpoint, tls: ServerTLS) -> None:
        self.endpoint = endpoint
        self.tls = tls

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        return self.endpoint.listen(TLSMemoryBIOFactory(self.tls, False, protocolFactory))


def tls_endpoint(endpoint: IStreamServerEndpoint, tls: ServerTLS) -> IStreamServerEndpoint:
    """``endpoint`` with every accepted connection wrapped in TLS."""
    return _TLSServerEndpoint(endpoint, tls)


def peer_identity(cert: Any) -> tuple[str, frozenset[str]]:
    """A peer certificate's subject (RFC 4514) and every name it can be
    matched by: the subject, and its SANs as ``DNS:``, ``URI:``, ``email:``
    and ``IP:`` values."""
    if isinstance(cert, crypto.X509):
        cert = cert.to_cryptography()
    subject: str = cert.subject.rfc4514_string()
    names = {subject}
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return subject, frozenset(names)
    for prefix, kind in (
        ("DNS", x509.DNSName),
        ("URI", x509.UniformResourceIdentifier),
        ("email", x509.RFC822Name),
        ("IP", x509.IPAddress),
    ):
        for value in san.get_values_for_type(kind):  # type: ignore[type-var]
            names.add(f"{prefix}:{value}")
    return subject, frozenset(names)
