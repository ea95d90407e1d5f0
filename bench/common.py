"""What the benchmarks share: starting a server and learning its port,
running the load generator or one blocking MLLP sender, counting what an
outbox stored, and writing a report (`run.py`, `delivery.py`, `cluster.py`,
`connect_storm.py`, `soak.py`, `cli_purge.py`). One launcher for every
server a benchmark starts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
LOADGEN = HERE / "loadgen.py"


class BenchError(RuntimeError):
    """A server could not be started or measured."""


def twistd_command(override: str | None) -> list[str]:
    """How to run twistd: --twistd, else the one beside this interpreter,
    else the one on PATH, else ``python -c`` (``-m twisted.scripts.twistd``
    does nothing: that module has no ``__main__`` block)."""
    if override:
        return [override]
    sibling = Path(sys.executable).with_name("twistd")
    if sibling.is_file() and os.access(sibling, os.X_OK):
        return [str(sibling)]
    found = shutil.which("twistd")
    if found:
        return [found]
    code = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"
    return [sys.executable, "-c", code]


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def cpu_list(spec: str) -> set[int]:
    return {int(x) for x in spec.split(",") if x.strip()}


@dataclass
class Server:
    """A server subprocess whose stdout/stderr go to files in ``workdir``."""

    name: str
    argv: list[str]
    workdir: Path
    env: dict[str, str]
    cpus: set[int] | None = None
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0
    returncode: int | None = None
    killed: bool = False
    stdout_path: Path = field(init=False)
    stderr_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.stdout_path = self.workdir / "stdout.log"
        self.stderr_path = self.workdir / "stderr.log"

    def start(self, timeout: float) -> int:
        """Spawn and wait (at most ``timeout`` s) for the listening line, or
        (``port`` set beforehand: a server that prints none) until it accepts."""
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                cwd=self.workdir, env=self.env,
            )
        if self.cpus:
            os.sched_setaffinity(self.proc.pid, self.cpus)
        deadline = time.monotonic() + timeout
        offset = 0
        pending = b""
        while time.monotonic() < deadline:
            with open(self.stdout_path, "rb") as f:
                f.seek(offset)
                chunk = f.read()
            offset += len(chunk)
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                port = listening_port(line)
                if port:
                    self.port = port
                    return port
            if self.port and accepts(self.port):
                return self.port
            if self.proc.poll() is not None:
                raise BenchError(
                    f"{self.name} exited with {self.proc.returncode} before listening\n"
                    f"stdout:\n{tail(self.stdout_path)}\nstderr:\n{tail(self.stderr_path)}"
                )
            time.sleep(0.05)
        self.stop(5.0)
        raise BenchError(f"{self.name}: no listening line within {timeout:.0f}s\n"
                         f"stderr:\n{tail(self.stderr_path)}")

    def stop(self, timeout: float) -> int | None:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL."""
        if self.proc is None or self.returncode is not None:
            return self.returncode
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.killed = True
                self.proc.kill()
                self.proc.wait(10)
        self.returncode = self.proc.returncode
        return self.returncode


def accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        return False
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listening_port(line: bytes) -> int:
    """Port from a JSON ``"event": "listening"`` log line, else 0."""
    if b"listening" not in line:
        return 0
    try:
        obj = json.loads(line)
    except ValueError:
        return 0
    port = obj.get("port") if isinstance(obj, dict) else None
    if obj.get("event") == "listening" and isinstance(port, int) and 0 < port < 65536:
        return port
    return 0


def hl7_message(control_id: str) -> bytes:
    """A small ADT^A01 (about 170 bytes) with ``control_id`` as MSH-10."""
    segments = [
        f"MSH|^~\\&|BENCH|BENCHFAC|MLLPD|HOSP|20240101120000||ADT^A01|{control_id}|P|2.5",
        "EVN|A01|20240101120000",
        "PID|1||4711^^^HOSP^MR||DOE^JANE||19800101|F",
        "PV1|1|I|W^101^1",
    ]
    return ("\r".join(segments) + "\r").encode("ascii")


class MLLPClient:
    """One blocking MLLP connection to 127.0.0.1: a message, then its ACK."""

    # An ACK without its end block after this many bytes is an error.
    MAX_ACK = 1 << 20

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self._buf = bytearray()

    def __enter__(self) -> MLLPClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def request(self, payload: bytes) -> str:
        """Send one framed message; its ACK's MSA-1 code (``""`` if none)."""
        self.sock.sendall(b"\x0b" + payload + b"\x1c\r")
        while (end := self._buf.find(b"\x1c\r")) < 0:
            if len(self._buf) > self.MAX_ACK:
                raise BenchError(f"no end block in the first {self.MAX_ACK} bytes of an ACK")
            chunk = self.sock.recv(65536)
            if not chunk:
                raise BenchError("the server closed the connection before its ACK")
            self._buf += chunk
        ack = bytes(self._buf[:end]).lstrip(b"\x0b")
        del self._buf[: end + 2]
        for segment in ack.split(b"\r"):
            if segment.startswith(b"MSA|"):
                return segment.split(b"|")[1].decode("ascii", "replace")
        return ""


def count_rows(db: Path) -> int | str:
    """Rows in the outbox's ``messages`` table (an error string if unreadable)."""
    if not db.exists():
        return f"no database at {db}"
    try:
        con = sqlite3.connect(db, timeout=10)
        try:
            return int(con.execute("SELECT COUNT(*) FROM messages").fetchone()[0])
        finally:
            con.close()
    except sqlite3.Error as e:
        return f"sqlite: {e}"


def server_env(args: argparse.Namespace, db: Path) -> dict[str, str]:
    """Environment for mllpd: this checkout first on PYTHONPATH (so the code
    measured is the code here, not an installed copy), the outbox in ``db``,
    ``--log-level`` and every ``--server-env``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(HERE.parent), os.environ.get("PYTHONPATH", "")) if p
    )
    env.update({"MLLP_DB_PATH": str(db), "LOG_LEVEL": args.log_level})
    for kv in args.server_env:
        k, _, v = kv.partition("=")
        env[k] = v
    return env


def run_loadgen(args: argparse.Namespace, port: int, conns: int,
                server_pid: int, rate: float = 0.0) -> dict[str, Any]:
    """Run loadgen.py once (``rate`` msgs/s in all, 0: as fast as ACKs come
    back); return its JSON report."""
    cmd = [
        sys.executable, str(LOADGEN), "--port", str(port), "--connections", str(conns),
        "--duration", str(args.duration), "--warmup", str(args.warmup),
        "--size", str(args.size), "--workers", str(args.workers),
        "--ack-timeout", str(args.ack_timeout),
        "--server-pid", str(server_pid), "--rate", str(rate),
    ]
    budget = args.warmup + args.duration + args.ack_timeout + 60
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if args.pin != "none":
        os.sched_setaffinity(proc.pid, cpu_list(args.loadgen_cpus))
    try:
        stdout, stderr = proc.communicate(timeout=budget)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate(timeout=10)
        raise BenchError(f"loadgen did not finish within {budget:.0f}s") from None
    sys.stderr.write("    " + stderr.decode(errors="replace").strip().replace("\n", "\n    ") + "\n")
    try:
        return dict(json.loads(stdout.decode().strip().splitlines()[-1]))
    except (ValueError, IndexError):
        raise BenchError(f"loadgen rc={proc.returncode}, no JSON: {stderr.decode()[-800:]}") from None


def fs_type(path: Path) -> str | None:
    """Filesystem type holding ``path`` (longest mount prefix in /proc/mounts)."""
    best, kind = "", None
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 2 and str(path).startswith(parts[1]) and len(parts[1]) > len(best):
                    best, kind = parts[1], parts[2]
    except OSError:
        return None
    return kind


def git_rev() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(HERE.parent), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return None
    return out.stdout.strip() or None


def write_report(args: argparse.Namespace, tmp: Path, stamp: str, kind: str, md: str,
                 runs: list[dict[str, Any]], failed: bool, **meta: Any) -> int:
    """Print the table and keep it, the runs and how they were made as
    ``<kind>-<stamp>.json`` and ``.md`` in --results-dir; 1 if a run failed."""
    results = Path(args.results_dir)
    meta = {
        "time": stamp, "git": git_rev(), "python": platform.python_version(),
        "twisted": metadata.version("twisted"), "cpus": os.cpu_count(),
        "platform": platform.platform(), "args": vars(args),
        "twistd": twistd_command(args.twistd), "outbox_fs": fs_type(tmp), **meta,
    }
    out = results / f"{kind}-{stamp}.json"
    out.write_text(json.dumps({"meta": meta, "table": md, "runs": runs}, indent=2) + "\n")
    (results / f"{kind}-{stamp}.md").write_text(md + "\n")
    print(md)
    print(f"\nresults: {out}" + ("" if not failed else "  (SOME RUNS FAILED, see JSON)"))
    return 1 if failed else 0
