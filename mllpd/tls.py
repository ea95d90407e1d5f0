"""TLS for the MLLP listener: PEM files into a server context, mutual TLS
with revocation lists, and live reload of the certificate pair, the CRLs
and the client identities file.

TLS wraps whatever endpoint the user configured (as tahoe-lafs does): the
listener's factory is wrapped in a ``TLSMemoryBIOFactory`` whose connection
creator is a :class:`ServerTLS`. Each new connection takes the context that
is current when it is accepted, so a reload changes what new handshakes see;
an open connection is closed only when the reloaded CRLs revoke, or the
reloaded client identities no longer map, its client certificate. The same wrapper watches the handshake:
a connection that has not finished it within TLS_HANDSHAKE_TIMEOUT is
aborted, and its protocol learns why from :class:`HandshakeTimeout`.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from OpenSSL import SSL, crypto
from twisted.internet.interfaces import (
    IOpenSSLServerConnectionCreator,
    IProtocolFactory,
    IReactorTime,
    IStreamServerEndpoint,
    ITransport,
)
from twisted.internet.protocol import connectionDone
from twisted.internet.ssl import (
    AcceptableCiphers,
    Certificate,
    CertificateOptions,
    TLSVersion,
    trustRootFromCertificates,
)
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from mllpd.endpoints import WrappingEndpoint
from mllpd.logging import format_peer
from mllpd.timer import Timer

if TYPE_CHECKING:
    from mllpd.identities import ClientIdentities

__all__ = [
    "AEAD_CIPHERS",
    "RELOAD_POLL_INTERVAL",
    "HandshakeTimeout",
    "ServerTLS",
    "TLSConfigError",
    "TLSFiles",
    "load_context",
    "load_identities_file",
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
    crl_file: str | None = None
    identities_file: str | None = None

    def paths(self) -> tuple[str, ...]:
        return tuple(p for p in (
            self.cert_file, self.key_file, self.client_ca, self.crl_file, self.identities_file,
        ) if p)


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


_PEM_CRL = re.compile(rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----", re.DOTALL)


def _crls(path: str, cas: list[x509.Certificate]) -> list[x509.CertificateRevocationList]:
    """The CRLs in ``path``, each signed by one of the client CAs and current."""
    data = _read("TLS_CRL_FILE", path)
    crls: list[x509.CertificateRevocationList] = []
    for pem in _PEM_CRL.findall(data):
        try:
            crls.append(x509.load_pem_x509_crl(pem))
        except ValueError:
            raise TLSConfigError("TLS_CRL_FILE", f"{path}: a CRL cannot be parsed") from None
    if not crls:
        raise TLSConfigError("TLS_CRL_FILE", f"no PEM CRL (BEGIN X509 CRL) in {path}")
    now = datetime.now(UTC)
    for crl in crls:
        issuer = crl.issuer.rfc4514_string()
        signers = [ca for ca in cas if ca.subject == crl.issuer]
        if not any(crl.is_signature_valid(ca.public_key()) for ca in signers):  # type: ignore[arg-type]
            raise TLSConfigError(
                "TLS_CRL_FILE", f"{path}: the CRL of {issuer} is not signed by a TLS_CLIENT_CA certificate"
            )
        if crl.next_update_utc is not None and crl.next_update_utc < now:
            raise TLSConfigError(
                "TLS_CRL_FILE",
                f"{path}: the CRL of {issuer} expired at {crl.next_update_utc:%Y-%m-%dT%H:%M:%SZ}",
            )
    return crls


def load_context(files: TLSFiles) -> SSL.Context:
    """Read and check the PEM files; an OpenSSL context for the server.

    Raises :class:`TLSConfigError` naming the setting whose file is
    unreadable, malformed, or (TLS_KEY_FILE) does not match the certificate.
    """
    return _load(files)[0]


def _load(files: TLSFiles) -> tuple[SSL.Context, list[x509.CertificateRevocationList]]:
    """load_context, with the CRLs loaded into the context (a reload judges
    open connections by the same lists as new handshakes)."""
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
    crls: list[x509.CertificateRevocationList] = []
    if files.client_ca:
        client_cas = _certificates("TLS_CLIENT_CA", files.client_ca)
        # The certificate store still wants pyOpenSSL's X509.
        cas = [Certificate(crypto.X509.from_cryptography(c)) for c in client_cas]
        trust = {"trustRoot": trustRootFromCertificates(cas)}
        if files.crl_file:
            crls = _crls(files.crl_file, client_cas)
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
        context = options.getContext()
    except SSL.Error as e:
        raise TLSConfigError("TLS_CERT_FILE", f"OpenSSL refused the pair: {e}") from None
    if crls:
        # Checked by OpenSSL in every handshake's chain verification. The
        # client certificate's issuer must have a CRL here, or the handshake
        # fails: a missing list is not read as "nothing revoked".
        store = context.get_cert_store()
        assert store is not None
        for crl in crls:
            store.add_crl(crl)
        store.set_flags(crypto.X509StoreFlags.CRL_CHECK)
        context.set_verify(context.get_verify_mode(), _note_revoked)
    return context, crls


# OpenSSL's X509_V_ERR_CERT_REVOKED; the handshake failure itself only says
# "certificate verify failed".
_CERT_REVOKED = 23


def _note_revoked(conn: SSL.Connection, cert: crypto.X509, errno: int, depth: int, ok: int) -> bool:
    if errno == _CERT_REVOKED:
        c = cert.to_cryptography()
        log.warn(
            "revoked client certificate refused: {client_subject} (serial {serial:x})",
            event="tls_client_revoked", client_subject=c.subject.rfc4514_string(),
            serial=c.serial_number,
        )
    return bool(ok)


def _revoked(cert: x509.Certificate, crls: list[x509.CertificateRevocationList]) -> bool:
    """Whether a CRL from ``cert``'s issuer lists its serial number."""
    return any(
        crl.issuer == cert.issuer
        and crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None
        for crl in crls
    )


def load_identities_file(path: str) -> ClientIdentities:
    """MLLP_CLIENT_IDENTITIES, with its errors as :class:`TLSConfigError`."""
    from mllpd.identities import IdentityError, load_identities

    try:
        return load_identities(path)
    except IdentityError as e:
        raise TLSConfigError("MLLP_CLIENT_IDENTITIES", str(e)) from None


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

    The client identities file (MLLP_CLIENT_IDENTITIES) is reloaded with
    them, on its own: a broken identities file keeps the old mapping without
    holding back a new certificate, and the other way round. Whoever checks
    identities reads :attr:`identities` or listens on
    :attr:`identity_listeners`.
    """

    def __init__(
        self,
        files: TLSFiles,
        clock: IReactorTime,
        *,
        poll_interval: float = RELOAD_POLL_INTERVAL,
    ) -> None:
        self.files = files
        self.clock = clock
        self.poll_interval = poll_interval
        self._stamp = _stamp(files.paths())
        # At startup a bad file is fatal: TLSConfigError propagates.
        self.context = load_context(files)
        self.identities: ClientIdentities | None = (
            load_identities_file(files.identities_file) if files.identities_file else None
        )
        self.identity_listeners: list[Callable[[ClientIdentities], None]] = []
        self.reloads: Counter[str] = Counter()
        # Open connections closed by a reload: "revoked" (now in a CRL) and
        # "unmapped" (no longer in MLLP_CLIENT_IDENTITIES).
        self.closed: Counter[str] = Counter()
        self.connections: set[_WatchedTLS] = set()
        self._loop: LoopingCall | None = None

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        return SSL.Connection(self.context, None)

    def reload(self, trigger: str = "sighup") -> bool:
        """Load the files again; keep what is current for each part that is unusable."""
        self._stamp = _stamp(self.files.paths())
        failed = False
        crls: list[x509.CertificateRevocationList] = []
        try:
            self.context, crls = _load(self.files)
        except TLSConfigError as e:
            failed = True
            self._failed(trigger, e, "keeping the current certificate and CRLs")
        else:
            log.info(
                "TLS certificate reloaded ({trigger})", event="tls_reloaded", trigger=trigger,
            )
        identities: ClientIdentities | None = None
        if self.files.identities_file:
            try:
                identities = load_identities_file(self.files.identities_file)
            except TLSConfigError as e:
                failed = True
                self._failed(trigger, e, "keeping the current client identities")
            else:
                self.identities = identities
                for listener in self.identity_listeners:
                    listener(identities)
                log.info(
                    "client identities reloaded ({trigger}): {entries} entries",
                    event="identities_reloaded", trigger=trigger, entries=len(identities),
                )
        self._close_refused(crls, identities)
        self.reloads["failed" if failed else "ok"] += 1
        return not failed

    def _close_refused(
        self, crls: list[x509.CertificateRevocationList], identities: ClientIdentities | None
    ) -> None:
        """Close the open connections whose client certificate the reloaded
        files now refuse: revoked in a CRL, or (MLLP_CLIENT_IDENTITIES) no
        longer mapped to any sender. Each is logged and counted."""
        if not crls and identities is None:
            return
        for conn in list(self.connections):
            cert = conn.client_certificate()
            if cert is None:
                continue
            if _revoked(cert, crls):
                reason, event = "revoked", "tls_client_revoked"
            elif identities is not None and not identities.maps(peer_identity(cert)[1]):
                reason, event = "unmapped", "tls_client_unmapped"
            else:
                continue
            self.closed[reason] += 1
            log.warn(
                "closing connection from {peer}: client certificate {client_subject} "
                "(serial {serial:x}) is {reason} after a reload",
                event=event, peer=format_peer(conn.getPeer()),
                client_subject=cert.subject.rfc4514_string(), serial=cert.serial_number,
                reason=reason,
            )
            conn.abortConnection()

    def _failed(self, trigger: str, e: TLSConfigError, kept: str) -> None:
        log.error(
            "TLS reload ({trigger}) failed, {kept}: {setting}: {reason}",
            event="tls_reload_failed", trigger=trigger, setting=e.variable, reason=e.reason,
            kept=kept,
        )

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


class HandshakeTimeout(Exception):
    """The TLS handshake was not done within TLS_HANDSHAKE_TIMEOUT: the
    reason the wrapped protocol's ``connectionLost`` is given."""


class _WatchedTLS(BufferingTLSTransport):
    """Server-side TLS that aborts a connection whose handshake is not done
    within the factory's ``handshake_timeout`` seconds of accepting it."""

    factory: _WatchedTLSFactory

    def makeConnection(self, transport: ITransport) -> None:
        factory = self.factory
        self._watch = Timer(factory.clock, self._handshake_timed_out, factory.handshake_timeout)
        self._watch.start()
        factory.tls.connections.add(self)
        super().makeConnection(transport)

    def client_certificate(self) -> x509.Certificate | None:
        """The client's certificate once the handshake is done, else None."""
        if not self._handshakeDone or self.disconnecting:
            return None
        cert = self.getPeerCertificate()
        return cert.to_cryptography() if cert is not None else None

    # _handshakeDone and _reason are TLSMemoryBIOProtocol's documented
    # ivars; it has no public equivalent, and noticing handshakeCompleted
    # instead would take a protocol layer of its own on every connection.

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        if self._handshakeDone:
            self._watch.cancel()

    def _handshake_timed_out(self) -> None:
        if self._handshakeDone:
            return
        seconds = self.factory.handshake_timeout
        log.warn(
            "closing connection from {peer}: TLS handshake not done in {seconds}s",
            event="tls_handshake_timeout", peer=format_peer(self.getPeer()), seconds=seconds,
        )
        # What the wrapped protocol's connectionLost is given, rather than
        # the EOF that the abort leaves in the half-done handshake.
        self._reason = Failure(HandshakeTimeout(f"not done in {seconds:g}s"))  # type: ignore[assignment]
        self.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._watch.cancel()
        self.factory.tls.connections.discard(self)
        super().connectionLost(reason)


class _WatchedTLSFactory(TLSMemoryBIOFactory):
    protocol = _WatchedTLS

    def __init__(
        self, tls: ServerTLS, wrapped: IProtocolFactory, handshake_timeout: float
    ) -> None:
        super().__init__(tls, False, wrapped, clock=tls.clock)
        self.tls = tls
        self.clock = tls.clock
        self.handshake_timeout = handshake_timeout


def tls_endpoint(
    endpoint: IStreamServerEndpoint, tls: ServerTLS, *, handshake_timeout: float
) -> IStreamServerEndpoint:
    """``endpoint`` with every accepted connection wrapped in TLS, and
    aborted when its handshake is not done ``handshake_timeout`` seconds
    after it was accepted (0: never)."""
    return WrappingEndpoint(
        endpoint, lambda factory: _WatchedTLSFactory(tls, factory, handshake_timeout)
    )


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
