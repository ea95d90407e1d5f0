"""MLLP_CLIENT_IDENTITIES: the file format, matching, and the receiver's AR."""

from __future__ import annotations

import os

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mllpd.ack import REJECT
from mllpd.hl7 import parse_message
from mllpd.identities import IdentityError, load_identities
from mllpd.receiver import Receiver
from mllpd.testing import MemoryOutbox
from tests.serverproc import make_workdir, spawn_server

LAB = "CN=lab-analyser-1,O=General Hospital"
FILE = f"""
- client: "{LAB}"
  msh3: [LAB]
  msh4: [GENHOSP]
- client: "DNS:ris.hospital.internal"
  msh3: [RIS, PACS]
  msh4: ["*"]
- client: "{LAB}"
  msh3: [LAB2]
  msh4: [CLINIC]
"""


def message(msh3: str, msh4: str, control_id: str = "C1", delimiters: str = "|^~\\&") -> bytes:
    fs = delimiters[0]
    return (
        f"MSH{delimiters}{fs}{msh3}{fs}{msh4}{fs}EHR{fs}HOSP{fs}20260101{fs}{fs}ADT^A01{fs}{control_id}{fs}P{fs}2.5\r"
        "PID|1||123\r"
    ).encode()


class IdentityFileTests(SynchronousTestCase):
    def write(self, text: str) -> str:
        path = os.path.join(make_workdir(self), "identities.yaml")
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path

    def test_matching(self) -> None:
        """Subject or SAN entries allow exactly their MSH-3/MSH-4 pairs as whole HDs; * matches anything."""
        ids = load_identities(self.write(FILE))
        self.assertEqual(len(ids), 3)
        lab = frozenset({LAB, "DNS:lab-analyser-1"})
        ris = frozenset({"CN=ris", "DNS:ris.hospital.internal"})
        cases = [
            (lab, "LAB", "GENHOSP", True),
            (lab, "LAB^^", "GENHOSP", True),  # empty HD.2/HD.3 are the same HD
            (lab, "LAB^1.2.3^ISO", "GENHOSP", False),  # an unlisted OID is another sender
            (lab, "LAB^2.16.840.1.999^ISO", "GENHOSP", False),
            (lab, "LAB&X", "GENHOSP", False),
            (lab, "LAB~RIS", "GENHOSP", False),
            (lab, "LAB2", "CLINIC", True),
            (lab, "LAB", "CLINIC", False),  # each entry's pair, not a cross product
            (lab, "RIS", "GENHOSP", False),
            (ris, "PACS", "ANYWHERE", True),
            (ris, "LAB", "GENHOSP", False),
            (frozenset(), "LAB", "GENHOSP", False),
        ]
        for names, msh3, msh4, allowed in cases:
            header = parse_message(message(msh3, msh4)).header
            result = ids.check(names, header)
            self.assertEqual(result is None, allowed, (names, msh3, msh4))
            if result is not None:
                outcome, error = result
                self.assertEqual((outcome, error.code, error.segment, error.position), (REJECT, "207", "MSH", 3))

    def test_listed_universal_id(self) -> None:
        """An entry naming HD.2/HD.3 matches exactly that HD, not the bare namespace or another OID."""
        ids = load_identities(self.write(f'- client: "{LAB}"\n  msh3: ["LAB^1.2.3^ISO"]\n  msh4: [GENHOSP]\n'))
        lab = frozenset({LAB})
        for msh3, allowed in [("LAB^1.2.3^ISO", True), ("LAB", False), ("LAB^1.2.4^ISO", False),
                              ("LAB^1.2.3^DNS", False), ("^1.2.3^ISO", False)]:
            result = ids.check(lab, parse_message(message(msh3, "GENHOSP")).header)
            self.assertEqual(result is None, allowed, msh3)

    def test_non_standard_delimiters_refused(self) -> None:
        """With identities on, a message with other delimiters gets AR at MSH-2, so LAB-2 cannot pass as LAB."""
        ids = load_identities(self.write(FILE))
        lab = frozenset({LAB})
        for delimiters, msh3 in [("|-~\\&", "LAB-2"), ("|-~\\&", "LAB"), ("#^~\\&", "LAB"),
                                 ("|^~\\", "LAB"), ("|&~\\^", "LAB")]:
            header = parse_message(message(msh3, "GENHOSP", delimiters=delimiters)).header
            result = ids.check(lab, header)
            assert result is not None, delimiters
            outcome, error = result
            self.assertEqual((outcome, error.code, error.segment, error.position), (REJECT, "207", "MSH", 2))
        # The v2.7 truncation character is still the standard set.
        header = parse_message(message("LAB", "GENHOSP", delimiters="|^~\\&#")).header
        self.assertIsNone(ids.check(lab, header))

    def test_bad_files(self) -> None:
        """A missing, malformed or mis-shaped file raises IdentityError with one line."""
        folder = make_workdir(self)
        bad = [
            os.path.join(folder, "missing.yaml"),
            self.write("- client: [unclosed\n"),
            self.write("client: x\n"),
            self.write("- client: x\n  msh3: [A]\n"),
            self.write("- client: x\n  msh3: [A]\n  msh4: [B]\n  msh5: [C]\n"),
            self.write("- msh3: [A]\n  msh4: [B]\n"),
            self.write("- client: x\n  msh3: [\"A|B\"]\n  msh4: [B]\n"),
            self.write("- client: x\n  msh3: [\"A^B^C^D\"]\n  msh4: [B]\n"),
            self.write("- client: x\n  msh3: [\"^^\"]\n  msh4: [B]\n"),
        ]
        for path in bad:
            with self.assertRaises(IdentityError, msg=path) as ctx:
                load_identities(path)
            self.assertNotIn("\n", str(ctx.exception))


class ReceiverIdentityTests(SynchronousTestCase):
    def test_receiver_rejects_other_sender(self) -> None:
        """With identities, a mismatched MSH-3 gets AR (ERR 207 at MSH-3) and is not stored; a match is stored with its subject."""
        path = os.path.join(make_workdir(self), "ids.yaml")
        with open(path, "w", encoding="utf-8") as f:
            f.write(FILE)
        outbox = MemoryOutbox()
        receiver = Receiver(outbox, Clock(), identities=load_identities(path))
        names = frozenset({LAB})
        bad = self.successResultOf(receiver.receive(message("RIS", "GENHOSP", "C1"), "p:1", LAB, names))
        self.assertEqual(bad.code, "AR")
        assert bad.ack is not None
        self.assertIn(b"ERR|", bad.ack)
        self.assertIn(b"MSH^1^3", bad.ack)
        good = self.successResultOf(receiver.receive(message("LAB", "GENHOSP", "C2"), "p:1", LAB, names))
        self.assertEqual(good.code, "AA")
        self.assertEqual([(e.control_id, e.client_subject) for e in outbox.stored], [("C2", LAB)])


class StartupTests(SynchronousTestCase):
    """A bad identities file or metrics address stops startup naming the setting."""

    def fails(self, env: dict[str, str], prefix: str) -> None:
        server = spawn_server(self, env=env)
        self.assertNotEqual(server.wait(timeout=30), 0)
        lines = [line for line in server.stderr_lines + server.stdout_lines if line.startswith("mllpd: ")]
        self.assertEqual(len(lines), 1, server.output())
        self.assertTrue(lines[0].startswith(prefix), lines[0])

    def test_bad_identities_file(self) -> None:
        """A malformed MLLP_CLIENT_IDENTITIES file names the setting."""
        from tests.certs import CertDir

        folder = make_workdir(self)
        certs = CertDir(folder)
        cert, key, _ = certs.server_pair()
        ids = certs.write("ids.yaml", b"client: nobody\n")
        self.fails({"TLS_CERT_FILE": cert, "TLS_KEY_FILE": key, "TLS_CLIENT_CA": certs.ca_file,
                    "MLLP_CLIENT_IDENTITIES": ids}, "mllpd: MLLP_CLIENT_IDENTITIES: ")

    def test_busy_metrics_port(self) -> None:
        """A metrics address that is taken names MLLP_METRICS_ADDR."""
        import socket

        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        self.fails({"MLLP_METRICS_ADDR": f"127.0.0.1:{port}"}, "mllpd: MLLP_METRICS_ADDR: ")
