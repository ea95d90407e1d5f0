"""Certificates for TLS tests, made with trustme in a temporary directory."""

from __future__ import annotations

import os
import socket
import ssl
import warnings
from collections.abc import Sequence
from typing import Any

import trustme

from tests.serverproc import LOOPBACK, MLLPClient

__all__ = ["CertDir", "tls_client"]

SERVER_NAME = "mllpd.test"


class CertDir:
    """A CA, a second unrelated CA, and PEM files written under ``folder``."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.ca = trustme.CA()
        self.other_ca = trustme.CA()
        self.ca_file = self.write("ca.pem", self.ca.cert_pem.bytes())
        self._n = 0

    def write(self, name: str, data: bytes) -> str:
        path = os.path.join(self.folder, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def server_pair(self, prefix: str = "server", folder: str | None = None) -> tuple[str, str, bytes]:
        """(cert chain file, key file, leaf DER) of a new server certificate."""
        self._n += 1
        issued = self.ca.issue_cert(SERVER_NAME, LOOPBACK, common_name=f"mllpd-{self._n}")
        where = folder or self.folder
        cert = os.path.join(where, f"{prefix}.crt")
        key = os.path.join(where, f"{prefix}.key")
        with open(cert, "wb") as f:
            f.write(b"".join(p.bytes() for p in issued.cert_chain_pems))
        with open(key, "wb") as f:
            f.write(issued.private_key_pem.bytes())
        der = ssl.PEM_cert_to_DER_cert(issued.cert_chain_pems[0].bytes().decode())
        return cert, key, der

    def client(self, name: str, *, ca: trustme.CA | None = None) -> str:
        """A PEM file with a client certificate (CN and DNS SAN ``name``) and its key."""
        issued = (ca or self.ca).issue_cert(name, common_name=name)
        return self.write(f"client-{name}.pem", issued.private_key_and_cert_chain_pem.bytes())

    def crl(self, revoked: Sequence[str] = (), *, name: str = "crl.pem",
            ca: trustme.CA | None = None, expired: bool = False) -> str:
        """Write a PEM CRL of ``ca`` (default: the CA) revoking the client PEM files ``revoked``."""
        import datetime

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization

        issuer = ca or self.ca
        ca_cert = x509.load_pem_x509_certificate(issuer.cert_pem.bytes())
        key = serialization.load_pem_private_key(issuer.private_key_pem.bytes(), password=None)
        now = datetime.datetime.now(datetime.UTC)
        this_update = now - datetime.timedelta(days=2 if expired else 0, minutes=5)
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(ca_cert.subject)
            .last_update(this_update)
            .next_update(now - datetime.timedelta(days=1) if expired else now + datetime.timedelta(days=7))
        )
        for path in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(self._certificate(path).serial_number)
                .revocation_date(this_update)
                .build()
            )
        crl = builder.sign(key, hashes.SHA256())  # type: ignore[arg-type]
        return self.write(name, crl.public_bytes(serialization.Encoding.PEM))

    def _certificate(self, path: str) -> Any:
        from cryptography import x509

        with open(path, "rb") as f:
            data = f.read()
        return x509.load_pem_x509_certificates(data[data.index(b"-----BEGIN CERTIFICATE") :])[0]

    def subject(self, path: str) -> str:
        from cryptography import x509

        with open(path, "rb") as f:
            data = f.read()
        cert = x509.load_pem_x509_certificates(data[data.index(b"-----BEGIN CERTIFICATE") :])[0]
        return cert.subject.rfc4514_string()

    def serial(self, path: str) -> int:
        """The serial number of the (first) certificate in a PEM file."""
        from cryptography import x509

        with open(path, "rb") as f:
            data = f.read()
        return x509.load_pem_x509_certificates(data[data.index(b"-----BEGIN CERTIFICATE") :])[0].serial_number


def client_context(
    certs: CertDir,
    *,
    version: ssl.TLSVersion | None = None,
    client_pem: str | None = None,
) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=certs.ca_file)
    if version is not None:
        if version < ssl.TLSVersion.TLSv1_2:
            ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        with warnings.catch_warnings():
            # TLS 1.1 is deprecated; the tests need a client that offers it.
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx.minimum_version = version
            ctx.maximum_version = version
    if client_pem is not None:
        ctx.load_cert_chain(client_pem)
    return ctx


def tls_client(
    port: int,
    certs: CertDir,
    *,
    version: ssl.TLSVersion | None = None,
    client_pem: str | None = None,
    timeout: float = 10.0,
) -> MLLPClient:
    """An MLLP client over TLS (handshake done); ssl.SSLError when refused."""
    ctx = client_context(certs, version=version, client_pem=client_pem)
    raw = socket.create_connection((LOOPBACK, port), timeout=timeout)
    try:
        sock = ctx.wrap_socket(raw, server_hostname=SERVER_NAME)
    except BaseException:
        raw.close()
        raise
    return MLLPClient(port, sock=sock)
