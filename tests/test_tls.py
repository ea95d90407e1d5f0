"""TLS and mutual TLS against the real ``twistd -n mllp`` process, with
certificates generated in the test: versions, ciphers, client certificates,
identity mapping, live reload and startup errors.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import urllib.request
from typing import Any

from twisted.internet.protocol import Protocol
from twisted.trial.unittest import SynchronousTestCase

from mllpd.tls import TLSConfigError, TLSFiles, load_context
from tests.certs import CertDir, tls_client
from tests.serverproc import (
    LOOPBACK,
    ConnectionClosed,
    MLLPClient,
    ServerProcess,
    hl7_message,
    make_workdir,
    query,
    spawn_server,
    start_server,
)


def _port(server: ServerProcess) -> int:
    assert server.port is not None
    return server.port


class TLSCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.workdir = make_workdir(self)
        self.certs = CertDir(self.workdir)
        self.cert, self.key, self.der = self.certs.server_pair()

    def start(self, **env: str) -> ServerProcess:
        base = {"TLS_CERT_FILE": self.cert, "TLS_KEY_FILE": self.key}
        base.update(env)
        return start_server(self, env=base, workdir=self.workdir)

    def stored_ids(self, server: ServerProcess) -> set[str]:
        return {row[0] for row in query(server.db_path, "SELECT control_id FROM messages")}

    def handshake_failures(self, server: ServerProcess, count: int) -> list[dict[str, object]]:
        """The next ``count`` tls_handshake_failed events (waiting for them)."""
        return [server.wait_for_event("tls_handshake_failed", timeout=10) for _ in range(count)]


class VersionTests(TLSCase):
    """Which TLS versions and ciphers the server speaks."""

    def test_tls12_and_tls13_handshakes(self) -> None:
        """TLS 1.2 (with an AEAD cipher) and TLS 1.3 clients both get AA over TLS."""
        server = self.start()
        for n, version in enumerate((ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3)):
            with tls_client(_port(server), self.certs, version=version) as client:
                tls = client.sock
                assert isinstance(tls, ssl.SSLSocket)
                self.assertEqual(tls.version(), version.name.replace("v1_", "v1."))
                cipher = tls.cipher()
                assert cipher is not None
                self.assertTrue("GCM" in cipher[0] or "CHACHA20" in cipher[0], cipher)
                self.assertEqual(tls.getpeercert(binary_form=True), self.der)
                ack = client.request(hl7_message(f"TLS-{n}"))
                self.assertEqual((ack.code, ack.control_id), ("AA", f"TLS-{n}"))
        server.stop()
        self.assertEqual(self.stored_ids(server), {"TLS-0", "TLS-1"})

    def test_tls11_refused(self) -> None:
        """A TLS 1.1 client cannot connect; the failure is logged and the server serves on."""
        server = self.start()
        with self.assertRaises((ssl.SSLError, ConnectionError)):
            tls_client(_port(server), self.certs, version=ssl.TLSVersion.TLSv1_1).close()
        self.handshake_failures(server, 1)
        with tls_client(_port(server), self.certs) as client:
            self.assertEqual(client.request(hl7_message("AFTER-11")).code, "AA")

    def test_min_version_13_refuses_12(self) -> None:
        """TLS_MIN_VERSION=1.3 refuses a TLS 1.2 client and accepts TLS 1.3."""
        server = self.start(TLS_MIN_VERSION="1.3")
        with self.assertRaises((ssl.SSLError, ConnectionError)):
            tls_client(_port(server), self.certs, version=ssl.TLSVersion.TLSv1_2).close()
        with tls_client(_port(server), self.certs, version=ssl.TLSVersion.TLSv1_3) as client:
            self.assertEqual(client.request(hl7_message("ONLY-13")).code, "AA")

    def test_plaintext_to_tls_port_closed_cleanly(self) -> None:
        """A plain MLLP frame sent to the TLS port gets no ACK and the connection is closed promptly."""
        server = self.start()
        with MLLPClient(_port(server)) as plain:
            plain.send(hl7_message("PLAIN-1"))
            got = b""
            for _ in range(1000):
                try:
                    data = plain.sock.recv(65536)
                except ConnectionResetError:
                    break
                if not data:
                    break
                got += data
            self.assertNotIn(b"MSA|", got)
        self.handshake_failures(server, 1)
        with tls_client(_port(server), self.certs) as client:
            self.assertEqual(client.request(hl7_message("AFTER-PLAIN")).code, "AA")
        server.stop()
        self.assertEqual(self.stored_ids(server), {"AFTER-PLAIN"})

    def test_handshake_timeout(self) -> None:
        """A connection that never starts its handshake is closed after TLS_HANDSHAKE_TIMEOUT."""
        server = self.start(TLS_HANDSHAKE_TIMEOUT="500ms")
        with socket.create_connection((LOOPBACK, _port(server)), timeout=10) as sock:
            try:
                self.assertEqual(sock.recv(100), b"")
            except ConnectionResetError:
                pass
        server.wait_for_event("tls_handshake_timeout", timeout=10)


class MutualTLSTests(TLSCase):
    """Client certificates under TLS_CLIENT_CA, and MLLP_CLIENT_IDENTITIES."""

    def test_client_certificates(self) -> None:
        """Without a client certificate or with one from another CA: refused, nothing stored; a good one: AA, subject logged."""
        server = self.start(TLS_CLIENT_CA=self.certs.ca_file)
        good = self.certs.client("lab-analyser-1")
        stranger = self.certs.client("intruder", ca=self.certs.other_ca)
        for n, pem in enumerate((None, stranger)):
            with self.assertRaises((ssl.SSLError, ConnectionError, ConnectionClosed)):
                # Under TLS 1.3 the client learns of the refusal on its first read.
                with tls_client(_port(server), self.certs, client_pem=pem) as client:
                    client.request(hl7_message(f"REFUSED-{n}"))
        reasons = [str(e["reason"]) for e in self.handshake_failures(server, 2)]
        self.assertIn("certificate", reasons[0])
        self.assertIn("certificate verify failed", reasons[1])
        with tls_client(_port(server), self.certs, client_pem=good) as client:
            self.assertEqual(client.request(hl7_message("GOOD-1")).code, "AA")
        server.stop()
        self.assertEqual(self.stored_ids(server), {"GOOD-1"})
        established = [e for e in server.events() if e.get("event") == "tls_established"]
        self.assertEqual([e["client_subject"] for e in established], [self.certs.subject(good)])

    def test_identity_mapping(self) -> None:
        """A certificate may send only as its mapped MSH-3/MSH-4; otherwise AR with ERR 207 at MSH-3, not stored."""
        lab = self.certs.client("lab-analyser-1")
        ris = self.certs.client("ris.hospital.internal")
        identities = self.certs.write("identities.yaml", (
            f'- client: "{self.certs.subject(lab)}"\n'
            "  msh3: [TESTAPP]\n"
            "  msh4: [TESTFAC]\n"
            '- client: "DNS:ris.hospital.internal"\n'
            "  msh3: [RIS]\n"
            '  msh4: ["*"]\n'
        ).encode())
        server = self.start(TLS_CLIENT_CA=self.certs.ca_file, MLLP_CLIENT_IDENTITIES=identities)
        with tls_client(_port(server), self.certs, client_pem=lab) as client:
            self.assertEqual(client.request(hl7_message("LAB-OK")).code, "AA")
            ack = client.request(hl7_message("LAB-AS-RIS", sending_app="RIS"))
            self.assertEqual((ack.code, ack.control_id, ack.has_err), ("AR", "LAB-AS-RIS", True))
            err = [s for s in ack.raw.split(b"\r") if s.startswith(b"ERR|")][0]
            self.assertIn(b"MSH^1^3", err)
            self.assertIn(b"207", err)
        with tls_client(_port(server), self.certs, client_pem=ris) as client:
            self.assertEqual(client.request(hl7_message("RIS-OK", sending_app="RIS")).code, "AA")
            self.assertEqual(client.request(hl7_message("RIS-AS-LAB")).code, "AR")
        server.stop()
        self.assertEqual(self.stored_ids(server), {"LAB-OK", "RIS-OK"})
        # The audit trail names the certificate behind every message, refused or not.
        audit = query(server.db_path, "SELECT control_id, ack_code, client_subject FROM audit ORDER BY received_at")
        self.assertEqual(audit, [
            ("LAB-OK", "AA", self.certs.subject(lab)),
            ("LAB-AS-RIS", "AR", self.certs.subject(lab)),
            ("RIS-OK", "AA", self.certs.subject(ris)),
            ("RIS-AS-LAB", "AR", self.certs.subject(ris)),
        ])


class ReloadTests(TLSCase):
    """New certificates reach new handshakes; open connections stay up."""

    def new_peer_cert(self, server: ServerProcess) -> bytes:
        with tls_client(_port(server), self.certs) as client:
            sock = client.sock
            assert isinstance(sock, ssl.SSLSocket)
            der = sock.getpeercert(binary_form=True)
            assert der is not None
            return der

    def test_reload_on_sighup(self) -> None:
        """After SIGHUP a new connection sees the new certificate while an old one keeps working."""
        server = self.start()
        old = tls_client(_port(server), self.certs)
        self.addCleanup(old.close)
        self.assertEqual(old.request(hl7_message("OLD-1")).code, "AA")
        _, _, new_der = self.certs.server_pair()  # overwrites server.crt/server.key
        self.assertEqual(self.new_peer_cert(server), self.der)  # not yet reloaded
        server.send_signal(signal.SIGHUP)
        server.wait_for_event("tls_reloaded", timeout=10)
        self.assertEqual(self.new_peer_cert(server), new_der)
        self.assertEqual(old.request(hl7_message("OLD-2")).code, "AA")

    def test_reload_on_symlink_swap(self) -> None:
        """Swapping the ..data symlink as Kubernetes does is noticed without a signal."""
        mount = os.path.join(self.workdir, "mount")
        os.makedirs(os.path.join(mount, "..v1"))
        self.certs.server_pair("tls", os.path.join(mount, "..v1"))
        os.symlink("..v1", os.path.join(mount, "..data"))
        for name in ("tls.crt", "tls.key"):
            os.symlink(os.path.join("..data", name), os.path.join(mount, name))
        server = start_server(self, workdir=self.workdir, env={
            "TLS_CERT_FILE": os.path.join(mount, "tls.crt"),
            "TLS_KEY_FILE": os.path.join(mount, "tls.key"),
        })
        old = tls_client(_port(server), self.certs)
        self.addCleanup(old.close)
        self.assertEqual(old.request(hl7_message("OLD-1")).code, "AA")
        os.makedirs(os.path.join(mount, "..v2"))
        _, _, new_der = self.certs.server_pair("tls", os.path.join(mount, "..v2"))
        os.symlink("..v2", os.path.join(mount, "..data_tmp"))
        os.rename(os.path.join(mount, "..data_tmp"), os.path.join(mount, "..data"))
        server.wait_for_event("tls_reloaded", timeout=15)
        self.assertEqual(self.new_peer_cert(server), new_der)
        self.assertEqual(old.request(hl7_message("OLD-2")).code, "AA")

    def test_corrupt_new_key_keeps_old_pair(self) -> None:
        """A new key that is garbage or does not match is refused with an error event; the old pair stays."""
        server = self.start()
        with open(self.key, "wb") as f:
            f.write(b"-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n")
        server.send_signal(signal.SIGHUP)
        failed = server.wait_for_event("tls_reload_failed", timeout=10)
        self.assertEqual(failed["setting"], "TLS_KEY_FILE")
        self.assertEqual(self.new_peer_cert(server), self.der)
        # A valid key of another certificate: a mismatched pair.
        _, other_key, _ = self.certs.server_pair("other")
        os.replace(other_key, self.key)
        server.send_signal(signal.SIGHUP)
        failed = server.wait_for_event("tls_reload_failed", timeout=10)
        self.assertIn("does not match", str(failed["reason"]))
        with tls_client(_port(server), self.certs) as client:
            self.assertEqual(client.request(hl7_message("STILL-OLD")).code, "AA")


class RevocationTests(TLSCase):
    """TLS_CRL_FILE on every client handshake, reloaded like the certificates."""

    def refused(self, server: ServerProcess, pem: str, control_id: str) -> None:
        """The handshake of ``pem`` fails, logged as a revoked certificate with its subject."""
        with self.assertRaises((ssl.SSLError, ConnectionError, ConnectionClosed)):
            # Under TLS 1.3 the client learns of the refusal on its first read.
            with tls_client(_port(server), self.certs, client_pem=pem) as client:
                client.request(hl7_message(control_id))
        subject = str(server.wait_for_event("tls_client_revoked", timeout=10)["client_subject"])
        self.assertIn("certificate verify failed", str(self.handshake_failures(server, 1)[0]["reason"]))
        self.assertEqual(subject, self.certs.subject(pem))

    def accepted(self, server: ServerProcess, pem: str, control_id: str) -> None:
        with tls_client(_port(server), self.certs, client_pem=pem) as client:
            self.assertEqual(client.request(hl7_message(control_id)).code, "AA")

    def test_revoked_certificate_refused(self) -> None:
        """A client certificate in the CRL fails its handshake (reason logged) and stores nothing; others are served."""
        good = self.certs.client("lab-analyser-1")
        revoked = self.certs.client("stolen-laptop")
        crl = self.certs.crl([revoked])
        server = self.start(TLS_CLIENT_CA=self.certs.ca_file, TLS_CRL_FILE=crl)
        self.refused(server, revoked, "REVOKED-1")
        self.accepted(server, good, "GOOD-1")
        server.stop()
        self.assertEqual(self.stored_ids(server), {"GOOD-1"})

    def test_crl_reloaded_on_sighup_and_on_change(self) -> None:
        """A new CRL applies to the next handshake after SIGHUP or a file change and closes open connections it revokes (logged, counted); a broken one keeps the old."""
        # Before: open connections kept their certificate until they closed.
        # Now a reload closes the ones whose certificate it revokes.
        first = self.certs.client("first")
        second = self.certs.client("second")
        crl = self.certs.crl([])
        server = self.start(
            TLS_CLIENT_CA=self.certs.ca_file, TLS_CRL_FILE=crl,
            MLLP_METRICS_ADDR=f"tcp:0:interface={LOOPBACK}",
        )
        metrics_port = next(e["port"] for e in server.events() if e.get("event") == "metrics_listening")
        open_first = tls_client(_port(server), self.certs, client_pem=first)
        self.addCleanup(open_first.close)
        open_second = tls_client(_port(server), self.certs, client_pem=second)
        self.addCleanup(open_second.close)
        self.assertEqual(open_first.request(hl7_message("OPEN-1")).code, "AA")
        self.assertEqual(open_second.request(hl7_message("OPEN-S1")).code, "AA")
        self.certs.crl([first])
        server.send_signal(signal.SIGHUP)
        self.assertEqual(server.wait_for_event("tls_reloaded", timeout=10)["trigger"], "sighup")
        closed = server.wait_for_event("tls_client_revoked", timeout=10)
        host, port = open_first.sock.getsockname()[:2]
        self.assertEqual(closed["peer"], f"{host}:{port}")
        self.assertEqual(closed["client_subject"], self.certs.subject(first))
        self.assertEqual(closed["serial"], self.certs.serial(first))
        open_first.wait_closed()
        self.assertEqual(open_second.request(hl7_message("OPEN-S2")).code, "AA")
        self.refused(server, first, "FIRST-2")
        self.accepted(server, second, "SECOND-1")
        # Written in place, no signal: the file watch notices.
        self.certs.crl([first, second])
        self.assertEqual(server.wait_for_event("tls_reloaded", timeout=15)["trigger"], "files_changed")
        closed = server.wait_for_event("tls_client_revoked", timeout=10)
        self.assertEqual(closed["client_subject"], self.certs.subject(second))
        open_second.wait_closed()
        self.refused(server, second, "SECOND-2")
        # A broken or foreign CRL is refused and the last good one stays in force.
        for data in (b"-----BEGIN X509 CRL-----\ngarbage\n-----END X509 CRL-----\n", None):
            if data is None:
                self.certs.crl([], ca=self.certs.other_ca)
            else:
                self.certs.write("crl.pem", data)
            server.send_signal(signal.SIGHUP)
            failed = server.wait_for_event("tls_reload_failed", timeout=10)
            self.assertEqual(failed["setting"], "TLS_CRL_FILE")
            self.refused(server, first, "FIRST-3")
        with urllib.request.urlopen(f"http://{LOOPBACK}:{metrics_port}/metrics", timeout=10) as r:
            page = r.read().decode()
        self.assertIn('mllp_tls_connections_closed_total{reason="revoked"} 2.0', page)
        server.stop()
        self.assertEqual(self.stored_ids(server), {"OPEN-1", "OPEN-S1", "OPEN-S2", "SECOND-1"})

    def test_identities_reloaded_on_change_and_broken_file_refused(self) -> None:
        """A changed MLLP_CLIENT_IDENTITIES applies to the next message and closes connections whose certificate it no longer maps; a broken one is refused and the old kept."""
        lab = self.certs.client("lab-analyser-1")
        old_lab = self.certs.client("lab-analyser-old")
        entry = f'- client: "{self.certs.subject(lab)}"\n  msh3: [{{app}}]\n  msh4: ["*"]\n'
        retired = '- client: "DNS:lab-analyser-old"\n  msh3: [TESTAPP]\n  msh4: ["*"]\n'
        identities = self.certs.write(
            "identities.yaml", (entry.format(app="TESTAPP") + retired).encode()
        )
        server = self.start(TLS_CLIENT_CA=self.certs.ca_file, MLLP_CLIENT_IDENTITIES=identities)
        client = tls_client(_port(server), self.certs, client_pem=lab)
        self.addCleanup(client.close)
        old_client = tls_client(_port(server), self.certs, client_pem=old_lab)
        self.addCleanup(old_client.close)
        self.assertEqual(old_client.request(hl7_message("OLD-1")).code, "AA")
        self.assertEqual(client.request(hl7_message("AS-TESTAPP-1")).code, "AA")
        self.assertEqual(client.request(hl7_message("AS-RIS-1", sending_app="RIS")).code, "AR")
        self.certs.write("identities.yaml", entry.format(app="RIS").encode())
        self.assertEqual(server.wait_for_event("identities_reloaded", timeout=15)["entries"], 1)
        # The certificate that is no longer mapped loses its open connection.
        unmapped = server.wait_for_event("tls_client_unmapped", timeout=10)
        self.assertEqual(unmapped["client_subject"], self.certs.subject(old_lab))
        old_client.wait_closed()
        self.assertEqual(client.request(hl7_message("AS-RIS-2", sending_app="RIS")).code, "AA")
        self.assertEqual(client.request(hl7_message("AS-TESTAPP-2")).code, "AR")
        self.certs.write("identities.yaml", b"client: [unclosed\n")
        server.send_signal(signal.SIGHUP)
        failed = server.wait_for_event("tls_reload_failed", timeout=10)
        self.assertEqual(failed["setting"], "MLLP_CLIENT_IDENTITIES")
        self.assertEqual(client.request(hl7_message("AS-RIS-3", sending_app="RIS")).code, "AA")
        self.assertEqual(client.request(hl7_message("AS-TESTAPP-3")).code, "AR")
        client.close()
        server.stop()
        self.assertEqual(self.stored_ids(server), {"OLD-1", "AS-TESTAPP-1", "AS-RIS-2", "AS-RIS-3"})


class StartupTests(TLSCase):
    """Unusable TLS files stop startup with one line naming the setting."""

    def fails(self, env: dict[str, str], prefix: str) -> None:
        server = spawn_server(self, env=env, workdir=self.workdir)
        code = server.wait(timeout=30)
        self.assertNotEqual(code, 0)
        lines = [line for line in server.stderr_lines + server.stdout_lines if line.startswith("mllpd: ")]
        self.assertEqual(len(lines), 1, server.output())
        self.assertTrue(lines[0].startswith(prefix), lines[0])

    def test_cert_without_key(self) -> None:
        """TLS_CERT_FILE without TLS_KEY_FILE names TLS_KEY_FILE."""
        self.fails({"TLS_CERT_FILE": self.cert}, "mllpd: TLS_KEY_FILE: ")

    def test_unreadable_file(self) -> None:
        """A missing certificate file names TLS_CERT_FILE."""
        self.fails({"TLS_CERT_FILE": self.cert + ".missing", "TLS_KEY_FILE": self.key},
                   "mllpd: TLS_CERT_FILE: cannot read")

    def test_bad_crl_file(self) -> None:
        """An unusable TLS_CRL_FILE stops startup naming the setting."""
        self.fails({"TLS_CERT_FILE": self.cert, "TLS_KEY_FILE": self.key, "TLS_CLIENT_CA": self.certs.ca_file,
                    "TLS_CRL_FILE": self.certs.crl([], ca=self.certs.other_ca, name="foreign.pem")},
                   "mllpd: TLS_CRL_FILE: ")

    def test_key_not_matching(self) -> None:
        """A key of another certificate names TLS_KEY_FILE."""
        _, other_key, _ = self.certs.server_pair("other")
        self.fails({"TLS_CERT_FILE": self.cert, "TLS_KEY_FILE": other_key},
                   "mllpd: TLS_KEY_FILE: ")


class LoadContextTests(SynchronousTestCase):
    """load_context checks the files without a server."""

    def test_errors_name_setting(self) -> None:
        """Each unusable file raises TLSConfigError naming its setting."""
        folder = make_workdir(self)
        certs = CertDir(folder)
        cert, key, _ = certs.server_pair()
        load_context(TLSFiles(cert, key, certs.ca_file, "1.3"))
        junk = certs.write("junk.pem", b"not a pem")
        for files, variable in (
            (TLSFiles(junk, key), "TLS_CERT_FILE"),
            (TLSFiles(cert, junk), "TLS_KEY_FILE"),
            (TLSFiles(cert, key, junk), "TLS_CLIENT_CA"),
            (TLSFiles(cert, key, os.path.join(folder, "none.pem")), "TLS_CLIENT_CA"),
            (TLSFiles(cert, key, certs.ca_file, crl_file=junk), "TLS_CRL_FILE"),
            (TLSFiles(cert, key, certs.ca_file, crl_file=certs.crl(ca=certs.other_ca, name="o.pem")), "TLS_CRL_FILE"),
            (TLSFiles(cert, key, certs.ca_file, crl_file=certs.crl(expired=True, name="e.pem")), "TLS_CRL_FILE"),
            (TLSFiles(cert, key, certs.ca_file, crl_file=os.path.join(folder, "none.pem")), "TLS_CRL_FILE"),
        ):
            with self.assertRaises(TLSConfigError) as ctx:
                load_context(files)
            self.assertEqual(ctx.exception.variable, variable)
            self.assertNotIn("\n", str(ctx.exception))


class ProtocolSubjectTests(SynchronousTestCase):
    """The client certificate's subject reaches the stored envelope."""

    def test_subject_in_envelope(self) -> None:
        """After a handshake with a client certificate, stored messages carry its subject."""
        from cryptography import x509
        from OpenSSL import crypto
        from twisted.internet.address import IPv4Address
        from twisted.internet.task import Clock
        from twisted.internet.testing import StringTransport

        from mllpd.framing import frame
        from mllpd.protocol import MLLPServerFactory
        from mllpd.receiver import Receiver
        from mllpd.testing import MemoryOutbox

        certs = CertDir(make_workdir(self))
        pem = certs.client("lab-analyser-1")
        with open(pem, "rb") as f:
            data = f.read()
        cert = x509.load_pem_x509_certificates(data[data.index(b"-----BEGIN CERTIFICATE") :])[0]

        class Handle:
            def get_protocol_version_name(self) -> str:
                return "TLSv1.3"

            def get_cipher_name(self) -> str:
                return "TLS_AES_256_GCM_SHA384"

        class TLSTransport(StringTransport):
            def getPeerCertificate(self) -> crypto.X509:
                return crypto.X509.from_cryptography(cert)

            def getHandle(self) -> Handle:
                return Handle()

        clock = Clock()
        outbox = MemoryOutbox()
        factory = MLLPServerFactory(Receiver(outbox, clock), clock, tls=True)
        proto = factory.buildProtocol(IPv4Address("TCP", "10.0.0.1", 4000))
        assert proto is not None
        proto.makeConnection(TLSTransport())
        proto.handshakeCompleted()  # type: ignore[attr-defined]
        self.assertEqual(clock.getDelayedCalls()[0].func.__name__, "_idle_check")
        proto.dataReceived(frame(hl7_message("SUBJ-1")))
        self.assertEqual([e.client_subject for e in outbox.stored], [certs.subject(pem)])


class ProxyProtocolTests(TLSCase):
    """MLLP_PROXY_PROTOCOL=true: the address from the PROXY header is the peer."""

    def test_proxy_header_address_used(self) -> None:
        """Plain and TLS connections behind a PROXY v1 header are logged and stored with the client's real address."""
        plain = start_server(self, env={"MLLP_PROXY_PROTOCOL": "true"})
        with MLLPClient(_port(plain)) as client:
            client.sock.sendall(b"PROXY TCP4 203.0.113.7 10.0.0.1 51234 2575\r\n")
            self.assertEqual(client.request(hl7_message("PROXIED-1")).code, "AA")
        plain.stop()
        rows = query(plain.db_path, "SELECT control_id, peer FROM messages")
        self.assertEqual(rows, [("PROXIED-1", "203.0.113.7:51234")])
        opened = [e["peer"] for e in plain.events() if e.get("event") == "connection_opened"]
        self.assertEqual(opened, ["203.0.113.7:51234"])

        tls = self.start(MLLP_PROXY_PROTOCOL="true")
        raw = socket.create_connection((LOOPBACK, _port(tls)), timeout=10)
        raw.sendall(b"PROXY TCP4 198.51.100.9 10.0.0.1 40000 2575\r\n")
        from tests.certs import client_context

        sock = client_context(self.certs).wrap_socket(raw, server_hostname="mllpd.test")
        with MLLPClient(0, sock=sock) as client:
            self.assertEqual(client.request(hl7_message("PROXIED-TLS")).code, "AA")
        tls.stop()
        rows = query(tls.db_path, "SELECT control_id, peer FROM messages")
        self.assertEqual(rows, [("PROXIED-TLS", "198.51.100.9:40000")])

    def test_missing_header_closed(self) -> None:
        """With MLLP_PROXY_PROTOCOL on, a connection without a PROXY header gets no ACK and is closed."""
        server = start_server(self, env={"MLLP_PROXY_PROTOCOL": "true"})
        with MLLPClient(_port(server)) as client:
            client.send(hl7_message("NO-HEADER"))
            self.assertEqual(client.wait_closed(timeout=10), [])
        server.stop()
        self.assertEqual(self.stored_ids(server), set())


PATIENT = "ZZTLSPATIENT"
MRN = "MRN987654"


class NoPHITests(TLSCase):
    """TLS, identity checks and metrics never put message content in logs."""

    def test_no_phi_in_tls_identity_and_metrics_paths(self) -> None:
        """At debug level, with mTLS, identity ARs, handshake failures and scrapes, no patient data is logged or exported."""
        lab = self.certs.client("lab-analyser-1")
        identities = self.certs.write("identities.yaml", (
            f'- client: "{self.certs.subject(lab)}"\n  msh3: [TESTAPP]\n  msh4: [TESTFAC]\n'
        ).encode())
        server = spawn_server(self, workdir=self.workdir, env={
            "TLS_CERT_FILE": self.cert, "TLS_KEY_FILE": self.key,
            "TLS_CLIENT_CA": self.certs.ca_file, "MLLP_CLIENT_IDENTITIES": identities,
            "LOG_LEVEL": "debug", "MLLP_METRICS_ADDR": f"tcp:0:interface={LOOPBACK}",
        })
        metrics_port = server.wait_for_event("metrics_listening")["port"]
        port = server.wait_listening()
        pid = f"PID|1||{MRN}^^^H||{PATIENT}^QUINCY||19700101|M"
        with tls_client(port, self.certs, client_pem=lab) as client:
            self.assertEqual(client.request(hl7_message("P-1", pid=pid)).code, "AA")
            self.assertEqual(client.request(hl7_message("P-2", pid=pid, sending_app=PATIENT)).code, "AR")
            self.assertEqual(client.request(f"{PATIENT} {MRN}".encode()).code, "AR")
        with self.assertRaises((ssl.SSLError, ConnectionError, ConnectionClosed)):
            with tls_client(port, self.certs) as anonymous:
                anonymous.request(hl7_message("P-4", pid=pid))
        with MLLPClient(port) as plain:
            plain.send(hl7_message("P-5", pid=pid))
            plain.wait_closed(timeout=10)
        with urllib.request.urlopen(f"http://{LOOPBACK}:{metrics_port}/metrics", timeout=10) as r:
            page = r.read().decode()
        server.stop()
        self.assertIn("mllp_messages_total", page)
        lines = server.stdout_lines + server.stderr_lines
        self.assertGreater(len(lines), 10)
        for text in (*lines, page):
            for secret in (PATIENT, MRN, "QUINCY"):
                self.assertNotIn(secret, text)
        names = {e.get("event") for e in server.events()}
        self.assertTrue({"tls_established", "nak", "tls_handshake_failed", "message"} <= names, names)


class ProbeTests(TLSCase):
    """TCP probes are not TLS failures."""

    def test_tcp_probe_not_counted_as_failure(self) -> None:
        """A connection that closes without sending anything is not logged as a failed handshake."""
        server = self.start()
        socket.create_connection((LOOPBACK, _port(server)), timeout=10).close()
        with tls_client(_port(server), self.certs) as client:
            self.assertEqual(client.request(hl7_message("AFTER-PROBE")).code, "AA")
        server.stop()
        names = [e.get("event") for e in server.events()]
        self.assertEqual(names.count("connection_closed"), 2, server.output())
        self.assertNotIn("tls_handshake_failed", names)


class ServerTLSTests(SynchronousTestCase):
    """ServerTLS's file watch, timed by a Clock."""

    def test_poll_reloads_changed_files_only(self) -> None:
        """A changed pair is loaded at the next poll; unchanged files are not reloaded; a bad pair keeps the old context."""
        from twisted.internet.task import Clock

        from mllpd.tls import ServerTLS

        folder = make_workdir(self)
        certs = CertDir(folder)
        cert, key, _ = certs.server_pair()
        clock = Clock()
        tls = ServerTLS(TLSFiles(cert, key), clock, poll_interval=2.0)
        first = tls.context
        tls.start_watching()
        self.addCleanup(tls.stop_watching)
        clock.advance(2.0)
        self.assertIs(tls.context, first)
        self.assertEqual(sum(tls.reloads.values()), 0)
        certs.server_pair()  # new files at the same paths
        clock.advance(1.9)
        self.assertIs(tls.context, first)
        clock.advance(0.1)
        second = tls.context
        self.assertIsNot(second, first)
        self.assertEqual(tls.reloads["ok"], 1)
        with open(key, "wb") as f:
            f.write(b"broken")
        clock.advance(2.0)
        self.assertIs(tls.context, second)
        self.assertEqual(tls.reloads["failed"], 1)
        clock.advance(2.0)  # unchanged since the failed attempt: not retried
        self.assertEqual(tls.reloads["failed"], 1)
        tls.stop_watching()
        self.assertEqual(clock.getDelayedCalls(), [])


    def test_identities_reload_apart_from_the_pair(self) -> None:
        """A changed identities file reaches the listeners; a broken one is refused without holding back a new pair."""
        from twisted.internet.task import Clock

        from mllpd.tls import ServerTLS

        folder = make_workdir(self)
        certs = CertDir(folder)
        cert, key, _ = certs.server_pair()
        ids = certs.write("ids.yaml", b"- client: CN=a\n  msh3: [A]\n  msh4: [B]\n")
        clock = Clock()
        tls = ServerTLS(TLSFiles(cert, key, certs.ca_file, identities_file=ids), clock, poll_interval=2.0)
        seen: list[object] = []
        tls.identity_listeners.append(seen.append)
        assert tls.identities is not None
        self.assertEqual(len(tls.identities), 1)
        tls.start_watching()
        self.addCleanup(tls.stop_watching)
        certs.write("ids.yaml", b"- client: CN=a\n  msh3: [A]\n  msh4: [B]\n- client: CN=b\n  msh3: [C]\n  msh4: [D]\n")
        clock.advance(2.0)
        self.assertEqual([len(i) for i in seen], [2])  # type: ignore[arg-type]
        self.assertIs(tls.identities, seen[0])
        first = tls.context
        certs.server_pair()
        certs.write("ids.yaml", b"- client: CN=a\n")
        clock.advance(2.0)
        self.assertIsNot(tls.context, first)  # the new pair is in use
        self.assertIs(tls.identities, seen[0])  # the broken file is not
        self.assertEqual(len(seen), 1)
        self.assertEqual(tls.reloads, {"ok": 1, "failed": 1})


class _Client(Protocol):
    """Collects what the server sends."""

    def __init__(self) -> None:
        self.received = b""
        self.lost = False

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: object = None) -> None:
        self.lost = True


class HandshakeWatchTests(SynchronousTestCase):
    """tls_endpoint's handshake timeout: real TLS in memory (iosim), timed by a Clock."""

    def setUp(self) -> None:
        from twisted.internet.task import Clock

        from mllpd.protocol import MLLPServerFactory
        from mllpd.receiver import Receiver
        from mllpd.testing import MemoryOutbox
        from mllpd.tls import ServerTLS

        self.certs = CertDir(make_workdir(self))
        cert, key, _ = self.certs.server_pair()
        self.clock = Clock()
        self.tls = ServerTLS(TLSFiles(cert, key), self.clock)
        self.mllp = MLLPServerFactory(
            Receiver(MemoryOutbox(), self.clock), self.clock, tls=True, idle_timeout=0
        )
        self.events: list[dict[str, Any]] = []
        from twisted.logger import globalLogPublisher

        globalLogPublisher.addObserver(self.events.append)  # type: ignore[arg-type]
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)  # type: ignore[arg-type]

    def connect(self, timeout: float, *, tls_client: bool) -> tuple[Any, Any, _Client]:
        """Accept one connection through tls_endpoint; the client speaks TLS or stays silent."""
        from twisted.internet.address import IPv4Address
        from twisted.internet.defer import succeed
        from twisted.internet.protocol import Factory
        from twisted.internet.ssl import Certificate, optionsForClientTLS
        from twisted.protocols.tls import TLSMemoryBIOFactory
        from twisted.test.iosim import FakeTransport, connect

        from mllpd.tls import tls_endpoint
        from tests.certs import SERVER_NAME

        listening: list[Any] = []

        class Accepting:
            def listen(self, factory: Any) -> Any:
                listening.append(factory)
                return succeed(None)

        tls_endpoint(Accepting(), self.tls, handshake_timeout=timeout).listen(self.mllp)  # type: ignore[arg-type]
        peer = IPv4Address("TCP", "10.0.0.9", 4000)
        server = listening[0].buildProtocol(peer)
        server_io = FakeTransport(server, True, peerAddress=peer)
        client = _Client()
        client_side: Any = client
        if tls_client:
            trust = Certificate.loadPEM(self.certs.ca.cert_pem.bytes())
            wrapper = TLSMemoryBIOFactory(
                optionsForClientTLS(SERVER_NAME, trustRoot=trust), True,
                Factory.forProtocol(lambda: client), clock=self.clock,
            )
            client_side = wrapper.buildProtocol(None)
        pump = connect(server, server_io, client_side, FakeTransport(client_side, False),
                       greet=False, clock=self.clock)
        return pump, server_io, client

    def named(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == event]

    def test_silent_client_aborted_at_the_timeout(self) -> None:
        """A client that never starts its handshake is aborted at the timeout, logged and counted as a failed handshake."""
        from mllpd.tls import HandshakeTimeout

        pump, server_io, client = self.connect(10.0, tls_client=False)
        pump.flush()
        self.clock.advance(9.9)
        pump.flush()
        self.assertFalse(server_io.disconnecting)
        self.clock.advance(0.1)
        pump.flush()
        self.assertTrue(client.lost)
        self.assertEqual(self.mllp.open_connections, 0)
        self.assertEqual(
            (self.mllp.stats["tls_handshake_timeouts"], self.mllp.stats["tls_handshake_failures"]),
            (1, 1),
        )
        [timeout] = self.named("tls_handshake_timeout")
        self.assertEqual((timeout["peer"], timeout["seconds"]), ("10.0.0.9:4000", 10.0))
        [failed] = self.named("tls_handshake_failed")
        self.assertEqual(failed["reason"], HandshakeTimeout.__name__)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_handshake_done_in_time_keeps_the_connection(self) -> None:
        """A handshake finished just before the timeout keeps its connection past it, and messages get AA."""
        from mllpd.framing import frame

        pump, server_io, client = self.connect(10.0, tls_client=True)
        self.clock.advance(9.9)
        pump.flush()
        self.assertEqual(len(self.named("tls_established")), 1)
        self.clock.advance(60)
        pump.flush()
        self.assertFalse(server_io.disconnecting or client.lost)
        assert client.transport is not None
        client.transport.write(frame(hl7_message("IN-TIME")))
        pump.flush()
        self.assertIn(b"MSA|AA|IN-TIME", client.received)
        self.assertEqual(self.mllp.stats["tls_handshake_failures"], 0)
        self.assertEqual(self.named("tls_handshake_timeout"), [])

    def test_zero_turns_the_timeout_off(self) -> None:
        """With a handshake timeout of 0 a silent client is never closed by the watch."""
        pump, server_io, client = self.connect(0, tls_client=False)
        self.clock.advance(3600)
        pump.flush()
        self.assertFalse(server_io.disconnecting or client.lost)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_closed_by_client_before_the_timeout(self) -> None:
        """A client that closes before the timeout is a TCP probe: no timeout, no failure, no timer left."""
        pump, server_io, client = self.connect(10.0, tls_client=False)
        assert client.transport is not None
        client.transport.loseConnection()
        pump.flush()
        self.assertEqual(self.mllp.open_connections, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(10)
        self.assertEqual(self.named("tls_handshake_timeout") + self.named("tls_handshake_failed"), [])


class ProxyHeaderUnitTests(SynchronousTestCase):
    """The PROXY wrapper with a Clock and string transports."""

    def make(self) -> tuple[Any, Any, Any, Any]:
        from twisted.internet.address import IPv4Address
        from twisted.internet.task import Clock
        from twisted.internet.testing import StringTransport

        from mllpd.protocol import MLLPServerFactory
        from mllpd.proxy import _HeaderFirstFactory
        from mllpd.receiver import Receiver
        from mllpd.testing import MemoryOutbox

        clock = Clock()
        outbox = MemoryOutbox()
        inner = MLLPServerFactory(Receiver(outbox, clock), clock, max_connections=1)
        wrapper = _HeaderFirstFactory(inner, clock)
        proto = wrapper.buildProtocol(IPv4Address("TCP", "10.0.0.1", 1234))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.1", 1234))
        proto.makeConnection(transport)
        return clock, inner, proto, transport

    def test_counted_only_after_header(self) -> None:
        """The connection counts (and is limited) under the header's address, from the header on; split headers work."""
        from mllpd.framing import frame

        clock, inner, proto, transport = self.make()
        self.assertEqual(inner.open_connections, 0)
        proto.dataReceived(b"PROXY TCP4 203.0.113.7 10.0.0.2 5")
        self.assertEqual(inner.open_connections, 0)
        proto.dataReceived(b"1234 2575\r\n" + frame(hl7_message("SPLIT-1")))
        self.assertEqual(inner.open_connections, 1)
        self.assertEqual([p.peer for p in inner.connections], ["203.0.113.7:51234"])
        self.assertIn(b"MSA|AA|SPLIT-1", transport.value())
        self.assertEqual(clock.getDelayedCalls()[0].func.__name__, "_idle_check")

    def test_no_header_aborted(self) -> None:
        """A connection that sends no header is aborted after HEADER_TIMEOUT without reaching MLLP."""
        from mllpd.proxy import HEADER_TIMEOUT

        clock, inner, proto, transport = self.make()
        clock.advance(HEADER_TIMEOUT - 0.1)
        self.assertFalse(transport.disconnecting)
        clock.advance(0.1)
        self.assertTrue(transport.disconnecting)
        proto.connectionLost(None)
        self.assertEqual((inner.open_connections, inner.stats["connections_accepted"]), (0, 0))
        self.assertEqual(clock.getDelayedCalls(), [])
