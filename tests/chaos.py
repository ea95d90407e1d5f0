"""Chaos runs against the real ``twistd mllp`` process (issue 11).

Senders stream numbered messages, each one only after the previous one got
AA (resending on AR or a lost connection, as a real interface engine does),
to a server that routes everything to an MLLP upstream run here. Each cycle
then does four things to it while the load runs:

1. ``kill -9`` and a restart on the same outbox;
2. SIGTERM (exit 0 expected) and a restart;
3. a full disk: the process's RLIMIT_FSIZE is lowered to one byte with
   prlimit(2), so every write to the outbox fails as on a full volume, then
   raised again, with no restart;
4. the upstream goes away (listener closed, connections cut) and comes back.

After each cycle it checks what a hospital would: every AA'd message is in
the outbox and was delivered upstream, in order per sender, with no gap
(redeliveries of the same message after a crash are counted, not failed:
delivery is at-least-once); during the full disk every message got AR and
none AA; and the same process answered AA again once there was room.

``bench/chaos.py`` runs many cycles; ``tests/test_chaos.py`` runs one.
"""

from __future__ import annotations

import os
import resource
import signal
import socket
import threading
import time
from dataclasses import dataclass, field

from tests.serverproc import (
    LOOPBACK,
    ConnectionClosed,
    MLLPClient,
    ServerProcess,
    frame,
    hl7_message,
    query,
)
from tests.upstreams import wait_until, write_config

__all__ = ["ChaosReport", "ChaosRun", "MLLPUpstream"]

START, END = b"\x0b", b"\x1c\r"
# AAs each sender must get in a load phase before the next fault.
PHASE_ACKS = 20
# Bound on any one wait (a restart, a drain, a phase).
WAIT = 60.0
# How long a sender waits before resending after AR (a real engine's pause).
AR_PAUSE = 0.05


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        port: int = s.getsockname()[1]
        return port


class MLLPUpstream:
    """An MLLP server on a fixed port that records (MSH-3, MSH-10) of each
    message in arrival order and answers AA; it can be taken down and
    brought back on the same port."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.received: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._down = threading.Event()

    def up(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((LOOPBACK, self.port))
        sock.listen(16)
        sock.settimeout(0.1)
        self._listener = sock
        self._down.clear()
        thread = threading.Thread(target=self._accept, args=(sock,), daemon=True, name="chaos-upstream")
        self._threads.append(thread)
        thread.start()

    def down(self) -> None:
        """Close the listener and cut every connection, as a crashed upstream."""
        self._down.set()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()
        for thread in self._threads:
            thread.join(10)
        self._threads = [t for t in self._threads if t.is_alive()]

    def snapshot(self) -> list[tuple[str, str]]:
        with self._lock:
            return list(self.received)

    def _accept(self, listener: socket.socket) -> None:
        while not self._down.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(0.2)
            with self._lock:
                self._conns.append(conn)
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        while not self._down.is_set():
            try:
                data = conn.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                return
            buf += data
            while (end := buf.find(END)) >= 0:
                start = buf.rfind(START, 0, end)
                payload, buf = buf[start + 1 : end], buf[end + len(END) :]
                fields = payload.split(b"\r", 1)[0].decode("latin-1").split("|")
                sender, control_id = fields[2], fields[9]
                with self._lock:
                    self.received.append((sender, control_id))
                ack = f"MSH|^~\\&|UP|UP|MLLPD|HOSP|||ACK^A01^ACK|A{control_id}|P|2.5\rMSA|AA|{control_id}\r"
                try:
                    conn.sendall(frame(ack.encode("latin-1")))
                except OSError:
                    return


@dataclass
class _Sent:
    seq: int
    code: str
    sent_at: float
    answered_at: float


class Sender(threading.Thread):
    """One sending application: message n+1 only after message n got AA."""

    def __init__(self, name: str, port: int, stop: threading.Event) -> None:
        super().__init__(daemon=True, name=f"chaos-{name}")
        self.app = name
        self.port = port
        self._halt = stop
        self.lock = threading.Lock()
        self.acked: list[int] = []
        self.answers: list[_Sent] = []
        self.problems: list[str] = []

    def control_id(self, seq: int) -> str:
        return f"{self.app}-{seq:07d}"

    def message(self, seq: int) -> bytes:
        return hl7_message(self.control_id(seq), sending_app=self.app)

    def count(self, code: str, since: float = 0.0) -> int:
        with self.lock:
            return sum(1 for a in self.answers if a.code == code and a.sent_at >= since)

    def run(self) -> None:
        seq = 0
        client: MLLPClient | None = None
        for _ in range(10_000_000):
            if self._halt.is_set():
                break
            if client is None:
                try:
                    client = MLLPClient(self.port, timeout=2.0)
                except OSError:
                    self._halt.wait(AR_PAUSE)  # the server is restarting
                    continue
            sent_at = time.monotonic()
            try:
                ack = client.request(self.message(seq), timeout=10.0)
            except (ConnectionClosed, OSError):
                client.close()
                client = None
                continue  # resend the same message: it may or may not be stored
            answered_at = time.monotonic()
            with self.lock:
                self.answers.append(_Sent(seq, ack.code, sent_at, answered_at))
                if ack.code == "AA" and ack.control_id == self.control_id(seq):
                    self.acked.append(seq)
                    seq += 1
                elif ack.code != "AR" or ack.control_id != self.control_id(seq):
                    self.problems.append(f"{self.control_id(seq)}: {ack.code} for {ack.control_id}")
            if ack.code == "AR":
                self._halt.wait(AR_PAUSE)
        if client is not None:
            client.close()


@dataclass
class ChaosReport:
    cycles: int = 0
    acked: int = 0
    checked: int = 0  # AA'd messages verified stored and delivered, summed over cycles
    redelivered: int = 0
    refused_while_full: int = 0
    kills: int = 0
    sigterms: int = 0
    full_disks: int = 0
    upstream_flaps: int = 0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)


class ChaosRun:
    """The server, its upstream and the senders of one chaos run."""

    def __init__(self, workdir: str, senders: int = 3, phase_acks: int = PHASE_ACKS) -> None:
        self.workdir = workdir
        self.db_path = os.path.join(workdir, "outbox.db")
        self.port = _free_port()
        self.phase_acks = phase_acks
        self.upstream = MLLPUpstream()
        self.config = write_config(os.path.join(workdir, "mllp.yaml"), [
            {"name": "upstream", "type": "mllp", "address": f"tcp:{LOOPBACK}:{self.upstream.port}",
             "ack_timeout": "5s", "connect_timeout": "2s"},
        ])
        self._stop = threading.Event()
        self.senders = [Sender(f"SND{k}", self.port, self._stop) for k in range(senders)]
        self.server: ServerProcess | None = None
        self.servers: list[ServerProcess] = []
        self.report = ChaosReport()

    # -- process -------------------------------------------------------------

    def start_server(self) -> ServerProcess:
        server = ServerProcess(
            self.workdir, listen=f"tcp:{self.port}:interface={LOOPBACK}", db_path=self.db_path,
            env={"MLLP_CONFIG": self.config, "SHUTDOWN_TIMEOUT": "5s"},
        )
        self.server = server
        self.servers.append(server)
        server.wait_listening(timeout=WAIT)
        return server

    def start(self) -> None:
        self.upstream.up()
        self.start_server()
        for sender in self.senders:
            sender.start()

    def close(self) -> None:
        self._stop.set()
        for sender in self.senders:
            if sender.is_alive():
                sender.join(WAIT)
        for server in self.servers:
            server.kill()
        self.upstream.down()

    # -- faults ----------------------------------------------------------------

    def load(self, acks: int | None = None) -> None:
        """Let every sender get ``acks`` more AAs."""
        wanted = {s.app: len(s.acked) + (acks or self.phase_acks) for s in self.senders}
        wait_until(
            lambda: {s.app: len(s.acked) for s in self.senders},
            lambda got: all(got[k] >= v for k, v in wanted.items()),
            timeout=WAIT, what=f"{acks or self.phase_acks} more AAs per sender",
        )

    def kill9(self) -> None:
        assert self.server is not None
        self.server.process.send_signal(signal.SIGKILL)
        code = self.server.wait(timeout=WAIT)
        if code != -signal.SIGKILL:
            self.report.problems.append(f"kill -9: exit {code}")
        self.report.kills += 1
        self.start_server()

    def sigterm(self) -> None:
        assert self.server is not None
        code = self.server.stop(signal.SIGTERM, timeout=WAIT)
        if code != 0:
            self.report.problems.append(f"SIGTERM: exit {code}")
        self.report.sigterms += 1
        self.start_server()

    def full_disk(self) -> None:
        """Every write fails for a while; AR only, then AA again, same process."""
        server = self.server
        assert server is not None
        pid = server.pid
        _, hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (1, hard))
        full_from = time.monotonic()
        try:
            wait_until(
                lambda: [s.count("AR", since=full_from) for s in self.senders],
                lambda counts: all(n >= 3 for n in counts),
                timeout=WAIT, what="AR for every sender while the disk is full",
            )
        finally:
            resource.prlimit(pid, resource.RLIMIT_FSIZE, (hard, hard))
            full_until = time.monotonic()
        for s in self.senders:
            with s.lock:
                wrong = [a for a in s.answers if a.code == "AA" and a.sent_at > full_from
                         and a.answered_at < full_until]
                self.report.refused_while_full += sum(
                    1 for a in s.answers if a.code == "AR" and a.sent_at >= full_from
                    and a.answered_at <= full_until)
            if wrong:
                self.report.problems.append(
                    f"full disk: {s.app} got AA for {[s.control_id(a.seq) for a in wrong][:5]}")
        self.load(3)  # room again: AA without a restart
        if not server.alive() or server.pid != pid or self.server is not server:
            self.report.problems.append("full disk: the process did not survive it")
        self.report.full_disks += 1

    def flap_upstream(self) -> None:
        self.upstream.down()
        self.load()  # accepted and queued while the upstream is away
        self.upstream.up()
        self.report.upstream_flaps += 1

    # -- checks ----------------------------------------------------------------

    def verify(self) -> int:
        """Every AA'd message so far stored and delivered in order; returns how many."""
        acked = {s.app: (s, list(s.acked)) for s in self.senders}
        wanted = {s.control_id(seq) for s, seqs in acked.values() for seq in seqs}

        def delivered() -> set[str]:
            return {cid for _, cid in self.upstream.snapshot()}

        wait_until(delivered, lambda got: wanted <= got, timeout=WAIT,
                   what=f"delivery of all {len(wanted)} AA'd messages")
        stored = {cid for (cid,) in query(self.db_path, "SELECT control_id FROM messages")}
        lost = sorted(wanted - stored)
        if lost:
            self.report.problems.append(f"{len(lost)} AA'd messages not stored: {lost[:5]}")
        received = self.upstream.snapshot()
        redelivered = 0
        for app, (sender, seqs) in acked.items():
            highest = -1
            for got_app, cid in received:
                if got_app != app:
                    continue
                seq = int(cid.rsplit("-", 1)[1])
                if seq <= highest:
                    redelivered += 1  # at-least-once: the same message again after a crash
                elif seq == highest + 1:
                    highest = seq
                else:
                    self.report.problems.append(
                        f"{app}: {sender.control_id(seq)} delivered after {sender.control_id(highest)}")
                    highest = seq
            if seqs and highest < seqs[-1]:
                self.report.problems.append(f"{app}: delivered up to {highest}, AA'd up to {seqs[-1]}")
            with sender.lock:
                self.report.problems.extend(sender.problems)
                sender.problems.clear()
        tracebacks = [e for p in self.servers for e in p.events() if "traceback" in e]
        if tracebacks:
            self.report.problems.append(
                f"{len(tracebacks)} tracebacks logged, first: {tracebacks[0].get('msg')!r:.300}")
        self.report.redelivered = redelivered
        self.report.acked = len(wanted)
        return len(wanted)

    def cycle(self) -> None:
        self.load()
        self.kill9()
        self.load()
        self.sigterm()
        self.load()
        self.full_disk()
        self.load()
        self.flap_upstream()
        self.load()
        self.report.checked += self.verify()
        self.report.cycles += 1


def run_chaos(workdir: str, cycles: int, senders: int = 3, phase_acks: int = PHASE_ACKS) -> ChaosReport:
    """Run ``cycles`` chaos cycles; the report lists every broken promise."""
    run = ChaosRun(workdir, senders=senders, phase_acks=phase_acks)
    started = time.monotonic()
    try:
        run.start()
        for _ in range(cycles):
            run.cycle()
            if run.report.problems:
                break
    finally:
        run.report.seconds = time.monotonic() - started
        run.close()
    return run.report
