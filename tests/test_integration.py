"""The real ``twistd -n mllp`` process on 127.0.0.1: load, bad input, timeouts,
limits, crashes, startup errors, logs and shutdown.
"""

from __future__ import annotations

import os
import random
import selectors
import signal
import socket
import stat
import string
import threading
import time
from collections import Counter

from twisted.trial.unittest import SynchronousTestCase

from tests.serverproc import (
    LOOPBACK,
    Ack,
    ConnectionClosed,
    MLLPClient,
    ServerProcess,
    frame,
    hl7_message,
    make_workdir,
    parse_ack,
    query,
    spawn_server,
    start_server,
)


def stored(server: ServerProcess) -> dict[str, bytes]:
    """control_id -> payload of every row in the server's outbox."""
    rows = query(server.db_path, "SELECT control_id, payload FROM messages")
    counts = Counter(cid for cid, _ in rows)
    repeated = [cid for cid, n in counts.items() if n > 1]
    assert not repeated, f"stored more than once: {repeated[:10]}"
    return {cid: bytes(payload) for cid, payload in rows}


def assert_serves(case: SynchronousTestCase, server: ServerProcess, control_id: str) -> None:
    """A fresh connection gets AA for a new message (within the request's 10 s timeout)."""
    with MLLPClient(_port(server)) as client:
        ack = client.request(hl7_message(control_id), timeout=10)
    case.assertEqual((ack.code, ack.control_id), ("AA", control_id))


def _port(server: ServerProcess) -> int:
    assert server.port is not None
    return server.port


def _drive(
    port: int, connections: int, per_connection: int, timeout: float
) -> dict[str, Ack]:
    """Open ``connections`` sockets at once; on each, send-wait-ACK
    ``per_connection`` messages, all multiplexed in one thread with a selector.
    Returns control_id -> ACK.
    """
    sel = selectors.DefaultSelector()
    socks: list[socket.socket] = []
    acks: dict[str, Ack] = {}
    buffers: dict[int, bytearray] = {}
    sent: dict[int, int] = {}
    try:
        for c in range(connections):
            sock = socket.create_connection((LOOPBACK, port), timeout=10)
            socks.append(sock)
            buffers[c] = bytearray()
            sent[c] = 0
            sel.register(sock, selectors.EVENT_READ, c)
        for c, sock in enumerate(socks):
            sock.sendall(frame(hl7_message(f"C{c:03d}-0")))
            sent[c] = 1
        deadline = time.monotonic() + timeout
        remaining = connections
        for _ in range(connections * per_connection * 50):
            if not remaining:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for key, _mask in sel.select(timeout=left):
                c = key.data
                sock = socks[c]
                data = sock.recv(65536)
                if not data:
                    raise AssertionError(f"connection {c} closed after {sent[c]} messages")
                buf = buffers[c]
                buf += data
                end = buf.find(b"\x1c\x0d")
                if end < 0:
                    continue
                ack = parse_ack(bytes(buf[buf.index(b"\x0b") + 1 : end]))
                del buf[: end + 2]
                acks[ack.control_id] = ack
                if sent[c] < per_connection:
                    sock.sendall(frame(hl7_message(f"C{c:03d}-{sent[c]}")))
                    sent[c] += 1
                else:
                    sel.unregister(sock)
                    remaining -= 1
        return acks
    finally:
        sel.close()
        for sock in socks:
            sock.close()


class LoadTests(SynchronousTestCase):
    """Many messages, pipelined, concurrent and large, all stored byte-exact."""

    def test_sequential_messages_acknowledged_and_stored_exactly(self) -> None:
        """100 messages on one connection each get AA with their MSA-2 and are stored byte for byte."""
        server = start_server(self)
        sent: dict[str, bytes] = {}
        with MLLPClient(_port(server)) as client:
            for n in range(100):
                cid = f"SEQ-{n:04d}"
                payload = hl7_message(cid, pid=f"PID|1||{n}^^^HOSP^MR||DOE^JANE{n}")
                sent[cid] = payload
                ack = client.request(payload)
                self.assertEqual((ack.code, ack.control_id), ("AA", cid))
        self.assertEqual(stored(server), sent)

    def test_pipelined_frames_acknowledged_in_order(self) -> None:
        """50 frames written at once get 50 ACKs back in the order sent."""
        server = start_server(self)
        ids = [f"PIPE-{n:03d}" for n in range(50)]
        with MLLPClient(_port(server)) as client:
            client.sock.sendall(b"".join(frame(hl7_message(cid)) for cid in ids))
            acks = [client.read_ack() for _ in ids]
        self.assertEqual([a.control_id for a in acks], ids)
        self.assertEqual({a.code for a in acks}, {"AA"})
        self.assertEqual(sorted(stored(server)), ids)

    def test_many_concurrent_connections(self) -> None:
        """200 connections sending 5 messages each all get AA; 1000 rows stored."""
        server = start_server(self)
        acks = _drive(_port(server), connections=200, per_connection=5, timeout=60)
        expected = {f"C{c:03d}-{n}" for c in range(200) for n in range(5)}
        self.assertEqual(set(acks), expected)
        self.assertEqual({a.code for a in acks.values()}, {"AA"})
        self.assertEqual(set(stored(server)), expected)
        self.assertTrue(server.alive())

    def test_one_megabyte_message_stored_exactly(self) -> None:
        """A 1 MB message gets AA and is stored byte for byte."""
        server = start_server(self)
        rng = random.Random(20240101)
        note = "".join(rng.choices(string.ascii_letters + string.digits + " .,", k=1_000_000))
        payload = hl7_message("BIG-1", extra=[f"OBX|1|TX|NOTE^Note||{note}||||||F"])
        self.assertGreater(len(payload), 1_000_000)
        with MLLPClient(_port(server)) as client:
            ack = client.request(payload, timeout=30)
        self.assertEqual((ack.code, ack.control_id), ("AA", "BIG-1"))
        self.assertEqual(stored(server), {"BIG-1": payload})


class BadInputTests(SynchronousTestCase):
    """Oversized, slow, unread and non-HL7 input hurts only its own connection."""

    def test_oversized_frame_rejected_and_server_keeps_serving(self) -> None:
        """A 20 MB frame gets an AR NAK and a close, is not stored, and others still get AA."""
        server = start_server(self)
        head = hl7_message("HUGE-1")
        data = b"\x0b" + head + b"OBX|1|TX|NOTE^Note||" + b"x" * (20 * 1024 * 1024) + b"\x1c\x0d"
        client = MLLPClient(_port(server), timeout=30)
        self.addCleanup(client.close)
        send_errors: list[BaseException] = []

        def send() -> None:
            try:
                client.sock.sendall(data)
            except OSError as e:  # the server may stop reading: expected
                send_errors.append(e)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        try:
            frames = client.wait_closed(timeout=30)
        finally:
            try:
                client.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sender.join(timeout=30)
        self.assertFalse(sender.is_alive())
        self.assertEqual(len(frames), 1, f"expected exactly one NAK, got {frames!r}")
        nak = parse_ack(frames[0])
        self.assertEqual((nak.code, nak.control_id, nak.has_err), ("AR", "HUGE-1", True))
        self.assertTrue(server.alive())
        assert_serves(self, server, "AFTER-HUGE")
        self.assertEqual(set(stored(server)), {"AFTER-HUGE"})

    def test_slow_sender_closed_after_frame_timeout(self) -> None:
        """An unfinished frame gets AR and a close about MLLP_FRAME_TIMEOUT in; others are served."""
        server = start_server(self, env={"MLLP_FRAME_TIMEOUT": "1s"})
        partial = hl7_message("SLOW-1")[:-20]
        self.assertIn(b"|SLOW-1|P|2.5\r", partial)
        with MLLPClient(_port(server)) as slow:
            started = time.monotonic()
            slow.sock.sendall(b"\x0b" + partial)
            assert_serves(self, server, "WHILE-SLOW")
            frames = slow.wait_closed(timeout=10)
            elapsed = time.monotonic() - started
        self.assertGreaterEqual(elapsed, 0.9)
        self.assertEqual(len(frames), 1, f"expected exactly one NAK, got {frames!r}")
        nak = parse_ack(frames[0])
        self.assertEqual((nak.code, nak.control_id, nak.has_err), ("AR", "SLOW-1", True))
        assert_serves(self, server, "AFTER-SLOW")
        self.assertEqual(set(stored(server)), {"WHILE-SLOW", "AFTER-SLOW"})

    def test_client_that_never_reads_is_disconnected(self) -> None:
        """A client that never reads its ACKs is cut off after MLLP_WRITE_TIMEOUT; others are served."""
        server = start_server(self, env={"MLLP_WRITE_TIMEOUT": "1s"})
        client = MLLPClient(_port(server), rcvbuf=4096)
        self.addCleanup(client.close)
        client.sock.settimeout(0.5)
        pending = b""
        blocked_at: float | None = None
        closed_at: float | None = None
        checked_others = False
        deadline = time.monotonic() + 30
        for n in range(200_000):
            if time.monotonic() > deadline:
                break
            if not pending:
                pending = b"".join(
                    frame(hl7_message(f"NR-{n:06d}-{k:02d}")) for k in range(50)
                )
            try:
                pending = pending[client.sock.send(pending):]
            except TimeoutError:
                if blocked_at is None:
                    blocked_at = time.monotonic()
                if not checked_others:
                    checked_others = True
                    assert_serves(self, server, "WHILE-UNREAD")
            except (ConnectionResetError, BrokenPipeError):
                closed_at = time.monotonic()
                break
        self.assertIsNotNone(blocked_at, "the client's sends never blocked")
        self.assertIsNotNone(closed_at, "the server never closed the connection")
        assert blocked_at is not None and closed_at is not None
        self.assertTrue(checked_others)
        self.assertTrue(server.alive())
        assert_serves(self, server, "AFTER-UNREAD")
        self.assertIn("write_timeout", {e.get("event") for e in server.events()})

    def test_non_hl7_payload_rejected_connection_stays_open(self) -> None:
        """A non-HL7 payload gets AR with ERR and the next message on that connection gets AA."""
        server = start_server(self)
        with MLLPClient(_port(server)) as client:
            nak = client.request(b"this is not an HL7 message\r")
            self.assertEqual((nak.code, nak.has_err), ("AR", True))
            ack = client.request(hl7_message("GOOD-1"))
        self.assertEqual((ack.code, ack.control_id), ("AA", "GOOD-1"))
        self.assertEqual(set(stored(server)), {"GOOD-1"})


class ConnectionLimitTests(SynchronousTestCase):
    """Idle connections and connections beyond the limit are closed."""

    def test_idle_connection_closed(self) -> None:
        """A connection that sends nothing is closed after MLLP_IDLE_TIMEOUT."""
        server = start_server(self, env={"MLLP_IDLE_TIMEOUT": "1s"})
        with MLLPClient(_port(server)) as client:
            started = time.monotonic()
            frames = client.wait_closed(timeout=10)
            elapsed = time.monotonic() - started
        self.assertEqual(frames, [])
        self.assertGreaterEqual(elapsed, 0.8)

    def test_connection_beyond_limit_closed_at_once(self) -> None:
        """With MLLP_MAX_CONNECTIONS=2 a third connection is closed at once; the first two work."""
        server = start_server(self, env={"MLLP_MAX_CONNECTIONS": "2"})
        with MLLPClient(_port(server)) as first, MLLPClient(_port(server)) as second:
            self.assertEqual(first.request(hl7_message("MAX-1")).code, "AA")
            self.assertEqual(second.request(hl7_message("MAX-2")).code, "AA")
            with MLLPClient(_port(server)) as third:
                try:
                    third.send(hl7_message("MAX-3"))
                except (ConnectionResetError, BrokenPipeError):
                    pass
                frames = third.wait_closed(timeout=10)
            self.assertEqual(frames, [])
            self.assertEqual(first.request(hl7_message("MAX-4")).code, "AA")
            self.assertEqual(second.request(hl7_message("MAX-5")).code, "AA")
        self.assertEqual(set(stored(server)), {"MAX-1", "MAX-2", "MAX-4", "MAX-5"})


def _memory_kib(pid: int, key: str) -> int:
    """A VmRSS/VmHWM line of /proc/<pid>/status, in KiB."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {key} for {pid}")


def _flood_partial_frames(port: int, connections: int, size: int, stall: float) -> int:
    """Open ``connections`` sockets and write an unfinished frame of ``size``
    bytes on each, until every byte is written or no socket takes a byte for
    ``stall`` seconds. Returns the bytes written; the sockets stay open."""
    sel = selectors.DefaultSelector()
    socks = []
    head = b"\x0b" + hl7_message("FLOOD") + b"NTE|1||"
    left: dict[int, memoryview] = {}
    for c in range(connections):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        sock.connect((LOOPBACK, port))
        sock.setblocking(False)
        socks.append(sock)
        left[c] = memoryview(head + b"x" * (size - len(head)))
        sel.register(sock, selectors.EVENT_WRITE, c)
    written = 0
    last_progress = time.monotonic()
    for _ in range(connections * size // 1024):
        if not left or time.monotonic() - last_progress > stall:
            break
        for key, _mask in sel.select(timeout=stall):
            c = key.data
            try:
                n = socks[c].send(left[c][:65536])
            except BlockingIOError:
                continue
            except (ConnectionResetError, BrokenPipeError):
                n = len(left[c])  # closed by the server (its frame timed out)
            written += n
            last_progress = time.monotonic()
            left[c] = left[c][n:]
            if not left[c]:
                sel.unregister(socks[c])
                del left[c]
    sel.close()
    _FLOODS.append(socks)
    return written


_FLOODS: list[list[socket.socket]] = []


def _close_floods() -> None:
    while _FLOODS:
        for sock in _FLOODS.pop():
            sock.close()


class MemoryBoundTests(SynchronousTestCase):
    """MLLP_MAX_BUFFER bounds what all connections together can make the process hold."""

    def test_rss_bounded_under_partial_frame_flood(self) -> None:
        """100 connections each writing a 2 MiB unfinished frame leave the process's peak RSS within MLLP_MAX_BUFFER plus a generous margin; it serves again once their frames time out."""
        budget_mib = 16
        server = start_server(
            self, env={"MLLP_MAX_BUFFER": f"{budget_mib}MiB", "MLLP_FRAME_TIMEOUT": "5s"}
        )
        with MLLPClient(_port(server)) as client:
            self.assertEqual(client.request(hl7_message("BEFORE")).code, "AA")
        before = _memory_kib(server.pid, "VmRSS")
        self.addCleanup(_close_floods)
        written = _flood_partial_frames(_port(server), 100, 2 * 1024 * 1024 - 64, stall=3.0)
        grown_mib = (_memory_kib(server.pid, "VmHWM") - before) / 1024
        # Without the limit the process holds every byte written (~200 MiB).
        self.assertLess(grown_mib, budget_mib + 48, f"{written} bytes written")
        server.wait_for_event("buffer_full", timeout=10)
        _close_floods()
        # A paused connection is not read, so its close is noticed when its
        # frame times out; then the budget frees and reading resumes.
        server.wait_for_event("buffer_resumed", timeout=30)
        with MLLPClient(_port(server)) as client:
            self.assertEqual(client.request(hl7_message("AFTER"), timeout=30).code, "AA")
        self.assertNotIn("Traceback", server.output())


    def test_unfinished_frames_do_not_stall_honest_senders(self) -> None:
        """With MLLP_MAX_BUFFER full of unfinished 2 MiB frames, the largest are refused and an honest sender is answered while the flood's connections are still open, long before their frame timeout."""
        server = start_server(self, env={"MLLP_MAX_BUFFER": "16MiB", "MLLP_FRAME_TIMEOUT": "120s"})
        self.addCleanup(_close_floods)
        _flood_partial_frames(_port(server), 20, 2 * 1024 * 1024 - 64, stall=3.0)
        server.wait_for_event("buffer_full", timeout=10)
        refused = server.wait_for_event("buffer_refused", timeout=10)
        self.assertEqual(refused["control_id"], "FLOOD")
        with MLLPClient(_port(server)) as client:
            # Without the refusals this waits for the flood's 120 s frame timeout.
            self.assertEqual(client.request(hl7_message("HONEST"), timeout=60).code, "AA")
        events = [e.get("event") for e in server.events()]
        self.assertNotIn("frame_timeout", events)
        self.assertNotIn("Traceback", server.output())


class ListenBacklogTests(SynchronousTestCase):
    """MLLP_LISTEN_BACKLOG reaches listen(2)."""

    def _backlog(self, port: int) -> int:
        import shutil
        import subprocess

        if shutil.which("ss") is None:
            self.skipTest("ss (iproute2) is not installed")
        out = subprocess.run(
            ["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=True,
            timeout=10,
        ).stdout.split()
        # State Recv-Q Send-Q ...: for a listening socket Send-Q is the backlog.
        return int(out[2])

    def test_backlog_reaches_listen(self) -> None:
        """The listening socket's backlog is MLLP_LISTEN_BACKLOG, and 4096 (or somaxconn) by default."""
        server = start_server(self, env={"MLLP_LISTEN_BACKLOG": "777"})
        self.assertEqual(self._backlog(_port(server)), 777)
        with open("/proc/sys/net/core/somaxconn", encoding="ascii") as f:
            somaxconn = int(f.read())
        default = start_server(self)
        self.assertEqual(self._backlog(_port(default)), min(4096, somaxconn))


class CrashTests(SynchronousTestCase):
    """kill -9 never loses an acknowledged message."""

    def test_kill_during_load_loses_no_acknowledged_message(self) -> None:
        """After kill -9 under load every AA'd message is in the outbox and a restart serves."""
        server = start_server(self)
        port = _port(server)
        acked: list[str] = []
        problems: list[str] = []
        lock = threading.Lock()
        enough = threading.Event()
        stop = threading.Event()

        def worker(k: int) -> None:
            try:
                with MLLPClient(port) as client:
                    for n in range(100_000):
                        if stop.is_set():
                            return
                        cid = f"K{k}-{n:06d}"
                        ack = client.request(hl7_message(cid), timeout=10)
                        with lock:
                            if (ack.code, ack.control_id) != ("AA", cid):
                                problems.append(f"{cid}: {ack.raw!r}")
                                return
                            acked.append(cid)
                            if len(acked) >= 3000:
                                enough.set()
            except (ConnectionClosed, OSError):
                return  # the server was killed mid-request: expected

        workers = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(4)]
        for w in workers:
            w.start()
        try:
            self.assertTrue(enough.wait(timeout=60), f"only {len(acked)} AAs: {problems}")
            server.process.send_signal(signal.SIGKILL)
            self.assertEqual(server.wait(timeout=30), -signal.SIGKILL)
        finally:
            stop.set()
            for w in workers:
                w.join(timeout=30)
        self.assertFalse(any(w.is_alive() for w in workers))
        self.assertEqual(problems, [])
        with lock:
            acknowledged = list(acked)
        self.assertGreaterEqual(len(acknowledged), 3000)
        rows = stored(server)
        missing = [cid for cid in acknowledged if cid not in rows]
        self.assertEqual(missing, [], f"{len(missing)} acknowledged messages lost")
        for cid in acknowledged[:: len(acknowledged) // 50]:
            self.assertEqual(rows[cid], hl7_message(cid))

        again = start_server(self, workdir=server.workdir, db_path=server.db_path)
        assert_serves(self, again, "AFTER-KILL")
        with MLLPClient(_port(again)) as client:
            resent = client.request(hl7_message(acknowledged[0]))
        self.assertEqual((resent.code, resent.control_id), ("AA", acknowledged[0]))
        self.assertEqual(
            query(again.db_path, "SELECT COUNT(*) FROM messages WHERE control_id = ?",
                  (acknowledged[0],)),
            [(1,)],
        )


class StartupTests(SynchronousTestCase):
    """Bad settings stop startup with one line naming the setting."""

    def assert_startup_error(self, server: ServerProcess, name: str) -> None:
        code = server.wait(timeout=30)
        self.assertNotEqual(code, 0, server.output())
        self.assertEqual(len(server.stderr_lines), 1, server.output())
        self.assertTrue(
            server.stderr_lines[0].startswith(f"mllpd: {name}: "), server.stderr_lines[0]
        )

    def test_bad_duration_names_variable(self) -> None:
        """MLLP_IDLE_TIMEOUT=abc stops startup with one line naming it."""
        server = spawn_server(self, env={"MLLP_IDLE_TIMEOUT": "abc"})
        self.assert_startup_error(server, "MLLP_IDLE_TIMEOUT")

    def test_bad_size_option_names_option(self) -> None:
        """--max-frame-size=lots stops startup with one line naming the option."""
        server = spawn_server(self, args=["--max-frame-size=lots"])
        self.assert_startup_error(server, "--max-frame-size")

    def test_outbox_in_missing_directory_names_variable(self) -> None:
        """An outbox in a missing directory stops startup with one line naming MLLP_DB_PATH."""
        workdir = make_workdir(self)
        missing = os.path.join(workdir, "missing", "outbox.db")
        server = spawn_server(self, workdir=workdir, db_path=missing)
        self.assert_startup_error(server, "MLLP_DB_PATH")

    def start_with_config(self, text: str) -> ServerProcess:
        workdir = make_workdir(self)
        config = os.path.join(workdir, "mllp.yaml")
        with open(config, "w") as f:
            f.write(text)
        return spawn_server(self, workdir=workdir, env={"MLLP_CONFIG": config})

    def test_bad_config_names_the_rule(self) -> None:
        """A rule that does not compile stops startup with one line naming MLLP_CONFIG and the rule."""
        server = self.start_with_config("rules:\n  - name: broken-rule\n    expr: pid.id ==\n")
        self.assert_startup_error(server, "MLLP_CONFIG")
        self.assertIn("broken-rule", server.stderr_lines[0])

    def test_bad_connector_option_names_it(self) -> None:
        """A connector with a bad option stops startup with one line naming the connector."""
        server = self.start_with_config("connectors:\n  - name: lake\n    type: http\n    url: ftp://x\n")
        self.assert_startup_error(server, "MLLP_CONFIG")
        self.assertIn("lake", server.stderr_lines[0])

    def test_bad_lanes_names_the_setting(self) -> None:
        """lanes: 0 on a connector stops startup with one line naming the connector's lanes."""
        server = self.start_with_config(
            "connectors:\n  - name: lake\n    type: http\n    url: http://x/\n    lanes: 0\n"
        )
        self.assert_startup_error(server, "MLLP_CONFIG")
        self.assertIn("connectors[0] (lake).lanes", server.stderr_lines[0])

    def test_busy_port_names_variable(self) -> None:
        """A port already in use stops startup with one line naming MLLP_ADDR."""
        busy = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(busy.close)
        busy.bind((LOOPBACK, 0))
        busy.listen(1)
        address = f"{LOOPBACK}:{busy.getsockname()[1]}"
        server = spawn_server(self, listen=None, env={"MLLP_ADDR": address})
        self.assert_startup_error(server, "MLLP_ADDR")

    def test_host_port_address(self) -> None:
        """MLLP_ADDR=127.0.0.1:0 listens on 127.0.0.1 and serves."""
        server = spawn_server(self, listen=None, env={"MLLP_ADDR": f"{LOOPBACK}:0"})
        server.wait_listening()
        listening = [e for e in server.events() if e.get("event") == "listening"]
        self.assertEqual(listening[0].get("host"), LOOPBACK)
        assert_serves(self, server, "HOSTPORT-1")


PATIENT = "ZZTESTPATIENT"
MRN = "MRN123"


class FilePermissionTests(SynchronousTestCase):
    """The outbox holds PHI: only mllpd's user can read it."""

    def test_outbox_files_private_under_nodaemon(self) -> None:
        """Started with umask 022 under twistd --nodaemon, every file mllpd writes (outbox.db, -wal, -shm) is 0600."""
        old_umask = os.umask(0o022)
        try:
            server = spawn_server(self)
        finally:
            os.umask(old_umask)
        server.wait_listening()
        assert_serves(self, server, "PERM-1")
        names = sorted(os.listdir(server.workdir))
        self.assertEqual(names, ["outbox.db", "outbox.db-shm", "outbox.db-wal"])
        modes = {n: oct(stat.S_IMODE(os.stat(os.path.join(server.workdir, n)).st_mode)) for n in names}
        self.assertEqual(set(modes.values()), {"0o600"}, modes)


class AuditBoundTests(SynchronousTestCase):
    """Refused messages leave small audit records, whatever they carried."""

    def test_refused_huge_control_ids_leave_bounded_audit_rows(self) -> None:
        """20 refused frames with 1 MiB MSH-10s add 20 audit rows of at most a few hundred bytes each."""
        server = start_server(self)
        huge = "C" * (1024 * 1024)
        with MLLPClient(_port(server)) as client:
            for n in range(20):
                ack = client.request(hl7_message(f"{n:02d}{huge}", version="9.9"), timeout=30)
                self.assertEqual(ack.code, "AR")
        assert_serves(self, server, "AFTER-HUGE")
        server.stop()
        rows = query(server.db_path, "SELECT ack_code, length(control_id), substr(control_id, 1, 2) FROM audit"
                                     " WHERE ack_code = 'AR' ORDER BY received_at")
        self.assertEqual([(code, start) for code, _, start in rows], [("AR", f"{n:02d}") for n in range(20)])
        self.assertLessEqual(max(length for _, length, _ in rows), 250)


class LoggingAndShutdownTests(SynchronousTestCase):
    """Logs carry fields, never message content; SIGTERM stops in stages."""

    def test_no_phi_in_logs(self) -> None:
        """At debug level logs name peer, control_id, type, size and code but never PHI."""
        server = start_server(self, env={"LOG_LEVEL": "debug"})
        pid = f"PID|1||{MRN}^^^H||{PATIENT}^QUINCY||19700101|M"
        expected: dict[str, str] = {}
        with MLLPClient(_port(server)) as client:
            for n in range(3):
                cid = f"PHI-{n}"
                self.assertEqual(client.request(hl7_message(cid, pid=pid)).code, "AA")
                expected[cid] = "AA"
            ae = client.request(hl7_message("PHI-AE", pid=pid, msg_type=""))
            self.assertEqual((ae.code, ae.control_id), ("AE", "PHI-AE"))
            expected["PHI-AE"] = "AE"
            ar = client.request(hl7_message("PHI-AR", pid=pid, version="3.0"))
            self.assertEqual((ar.code, ar.control_id), ("AR", "PHI-AR"))
            expected["PHI-AR"] = "AR"
            # Content that is not HL7, and junk outside any frame.
            junk = f"{PATIENT}^QUINCY {MRN}".encode()
            self.assertEqual(client.request(junk).code, "AR")
            client.sock.sendall(junk + b"\r\n")
            self.assertEqual(client.request(hl7_message("PHI-LAST", pid=pid)).code, "AA")
            expected["PHI-LAST"] = "AA"
        server.stop(timeout=30)
        lines = server.stdout_lines + server.stderr_lines
        self.assertGreater(len(lines), 5)
        leaks = [line for line in lines if PATIENT in line or MRN in line or "QUINCY" in line]
        self.assertEqual(leaks, [])
        logged: dict[str, dict[str, object]] = {}
        for event in server.events():
            if event.get("event") in ("message", "nak") and event.get("control_id") in expected:
                logged[str(event["control_id"])] = event
        self.assertEqual(set(logged), set(expected))
        for cid, event in logged.items():
            for field in ("peer", "control_id", "msg_type", "size", "code"):
                self.assertIn(field, event, f"{cid}: {event}")
            self.assertEqual(event["code"], expected[cid], event)
            self.assertTrue(str(event["peer"]).startswith(f"{LOOPBACK}:"), event)
            self.assertGreater(int(str(event["size"])), 0, event)
        self.assertEqual(logged["PHI-0"]["msg_type"], "ADT^A01")

    def test_sigterm_logs_stop_stages_in_order(self) -> None:
        """On SIGTERM idle connections close and the stop stages are logged in order."""
        server = start_server(self)
        with MLLPClient(_port(server)) as client:
            self.assertEqual(client.request(hl7_message("TERM-1")).code, "AA")
            server.send_signal(signal.SIGTERM)
            self.assertEqual(client.wait_closed(timeout=20), [])
        server.wait(timeout=30)
        names = [e.get("event") for e in server.events()]
        stages = [
            "shutdown_pre_delay", "shutdown_stop_listening", "shutdown_drain", "shutdown_abort",
            "shutdown_relay_stopped", "shutdown_outbox_closed",
        ]
        for stage in stages:
            self.assertIn(stage, names, server.output())
        self.assertEqual([names.index(s) for s in stages], sorted(names.index(s) for s in stages))
        abort = next(e for e in server.events() if e.get("event") == "shutdown_abort")
        self.assertEqual(abort["count"], 0)
        self.assertEqual(set(stored(server)), {"TERM-1"})

    def test_sigterm_exits_zero(self) -> None:
        """SIGTERM makes the process exit with status 0, promptly."""
        server = start_server(self)
        assert_serves(self, server, "EXIT-1")
        code = server.stop(signal.SIGTERM, timeout=30)
        self.assertEqual(code, 0, server.output())
