"""Runs inside the bubblewrap sandbox, as the pod's user, with the pod's
environment: records the process context, starts the server with the
image's ENTRYPOINT, sends one HL7 message, stops the server with SIGTERM and
reads the outbox. Prints one JSON object on stdout.

Standard library only: it runs with the installed package's interpreter and
must not import anything from the checkout (which the sandbox hides).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import queue
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from typing import IO, Any

START_TIMEOUT = 30.0
ACK_TIMEOUT = 10.0
STATUS_KEYS = ("Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb",
               "NoNewPrivs", "Seccomp")
# In a child, so the driver keeps its namespaces: a new user namespace needs
# no privilege, so only a seccomp filter refuses it.
_UNSHARE_PROBE = (
    "import ctypes, errno; libc = ctypes.CDLL(None, use_errno=True); "
    "rc = libc.unshare(0x10000000); "  # CLONE_NEWUSER
    "print('allowed' if rc == 0 else errno.errorcode[ctypes.get_errno()])"
)


def status(pid: str) -> dict[str, str]:
    """The credential lines of /proc/<pid>/status."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in STATUS_KEYS:
                out[key] = " ".join(value.split())
    return out


def probe_write(path: str) -> str:
    """'written' when a file could be created at path, else the errno name."""
    try:
        with open(path, "x") as f:
            f.write("probe")
    except OSError as e:
        return errno.errorcode.get(e.errno or 0, str(e))
    os.unlink(path)
    return "written"


def rw_mounts() -> list[str]:
    """Mount points of this mount namespace that are mounted read-write."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[5].split(",")[0] == "rw":
                found.append(fields[4].replace("\\040", " "))
    return sorted(set(found))


def message(control_id: str) -> bytes:
    segments = [
        f"MSH|^~\\&|SANDBOX|TESTFAC|MLLPD|HOSP|20240101120000||ADT^A01^ADT_A01|{control_id}"
        "|P|2.5",
        "EVN|A01|20240101120000",
        "PID|1||4711^^^HOSP^MR||DOE^JANE||19800101|F",
        "PV1|1|I|W^101^1",
    ]
    return b"\x0b" + ("\r".join(segments) + "\r").encode("ascii") + b"\x1c\r"


def exchange(port: int, payload: bytes) -> dict[str, str]:
    """Send one frame to 127.0.0.1:port and return MSA-1 and MSA-2 of the reply."""
    deadline = time.monotonic() + ACK_TIMEOUT
    with socket.create_connection(("127.0.0.1", port), timeout=ACK_TIMEOUT) as s:
        s.sendall(payload)
        buf = b""
        for _ in range(10_000):
            if b"\x1c\r" in buf or time.monotonic() > deadline:
                break
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    ack = buf.strip(b"\x0b\x1c\r").decode("latin-1")
    msa = [seg.split("|") for seg in ack.split("\r") if seg.startswith("MSA|")]
    if not msa:
        return {"code": "", "control_id": "", "raw": ack}
    fields = msa[0] + ["", ""]
    return {"code": fields[1], "control_id": fields[2], "raw": ""}


class Server:
    def __init__(self, argv: list[str]) -> None:
        self.events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self.process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        assert self.process.stdout is not None and self.process.stderr is not None
        self.readers = [
            threading.Thread(target=self._read, args=(self.process.stdout, self.stdout, True)),
            threading.Thread(target=self._read, args=(self.process.stderr, self.stderr, False)),
        ]
        for reader in self.readers:
            reader.daemon = True
            reader.start()

    def _read(self, stream: IO[bytes], into: list[str], parse: bool) -> None:
        for raw in stream:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            into.append(line)
            if parse:
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if isinstance(event, dict):
                    self.events.put(event)
        if parse:
            self.events.put(None)

    def wait_event(self, name: str, timeout: float) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout
        for _ in range(100_000):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            try:
                event = self.events.get(timeout=remaining)
            except queue.Empty:
                return None
            if event is None:
                return None
            if event.get("event") == name:
                return event
        return None


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--entrypoint", required=True, help="the image's ENTRYPOINT, JSON")
    parser.add_argument("--writable", required=True,
                        help="JSON list of the mount points the pod may write")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--grace", type=float, required=True,
                        help="terminationGracePeriodSeconds: the SIGTERM-to-exit bound")
    parser.add_argument("--control-id", required=True)
    args = parser.parse_args()

    result: dict[str, Any] = {"driver": status("self"), "cwd": os.getcwd()}
    result["rw_mounts"] = rw_mounts()
    result["unshare_user_namespace"] = subprocess.run(
        [sys.executable, "-c", _UNSHARE_PROBE], capture_output=True, text=True, check=False,
    ).stdout.strip()
    result["write_root"] = probe_write("/mllpd-sandbox-probe")
    result["write_volumes"] = {
        path: probe_write(os.path.join(path, "probe")) for path in json.loads(args.writable)
    }
    db_path = os.path.abspath(os.environ.get("MLLP_DB_PATH", "outbox.db"))
    result["mllpd_module"] = subprocess.run(
        [sys.executable, "-c", "import mllpd, os; print(os.path.realpath(mllpd.__file__))"],
        capture_output=True, text=True, check=False,
    ).stdout.strip()

    server = Server(json.loads(args.entrypoint))
    try:
        listening = server.wait_event("listening", START_TIMEOUT)
        result["listening"] = listening
        if listening is not None:
            result["server"] = status(str(server.process.pid))
            result["ack"] = exchange(args.port, message(args.control_id))
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        try:
            result["exit_code"] = server.process.wait(timeout=args.grace)
        except subprocess.TimeoutExpired:
            result["exit_code"] = None  # the kubelet would SIGKILL here
        result["stop_seconds"] = round(time.monotonic() - started, 3)
    finally:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()
        for reader in server.readers:
            reader.join(timeout=10)

    result["db_path"] = db_path
    result["data_files"] = sorted(os.listdir(os.path.dirname(db_path)))
    try:
        conn = sqlite3.connect(db_path, timeout=10)
        try:
            result["outbox_rows"] = conn.execute(
                "SELECT COUNT(*) FROM messages WHERE control_id = ?", (args.control_id,)
            ).fetchone()[0]
        finally:
            conn.close()
    except sqlite3.Error as e:
        result["outbox_rows"] = f"error: {e}"
    result["stdout"] = server.stdout[-200:]
    result["stderr"] = server.stderr[-200:]
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
