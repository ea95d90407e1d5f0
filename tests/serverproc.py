"""Run the real ``twistd -n mllp`` process, and talk MLLP to it, in tests.

The process runs the code of this checkout (``PYTHONPATH`` points at the
repository), in a temporary directory holding its SQLite outbox, with an
environment cleared of any mllpd settings of the caller. Its stdout (JSON log
lines) and stderr are collected by reader threads so a chatty server can never
block on a full pipe. Every wait is bounded; every process is killed when the
test ends.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

__all__ = [
    "LOOPBACK",
    "Ack",
    "ConnectionClosed",
    "MLLPClient",
    "ServerProcess",
    "frame",
    "hl7_message",
    "make_workdir",
    "parse_ack",
    "query",
    "spawn_server",
    "start_server",
]

REPO = Path(__file__).resolve().parents[1]
LOOPBACK = "127.0.0.1"
LISTEN = f"tcp:0:interface={LOOPBACK}"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0

# Settings of the caller's environment that must not leak into the server.
_SCRUB_PREFIXES = ("MLLP_", "TLS_", "POD_", "OTEL_")
_SCRUB_NAMES = frozenset({"LOG_LEVEL", "PRE_SHUTDOWN_DELAY", "SHUTDOWN_TIMEOUT"})

# Runs twistd's entry point with the interpreter running the tests.
_TWISTD = (
    "import sys; from twisted.scripts.twistd import run; "
    "sys.argv[0] = 'twistd'; sys.exit(run())"
)


class _Cleanups(Protocol):
    def addCleanup(self, f: Any, *args: Any, **kwargs: Any) -> None: ...


class ServerProcess:
    """One ``twistd -n --pidfile= mllp`` child process and its output."""

    def __init__(
        self,
        workdir: str,
        *,
        env: Mapping[str, str] | None = None,
        args: Sequence[str] = (),
        listen: str | None = LISTEN,
        db_path: str | None = None,
    ) -> None:
        self.workdir = workdir
        self.db_path = db_path or os.path.join(workdir, "outbox.db")
        environ = {
            k: v for k, v in os.environ.items()
            if not k.startswith(_SCRUB_PREFIXES) and k not in _SCRUB_NAMES
        }
        environ["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p
        )
        environ["PYTHONUNBUFFERED"] = "1"
        environ["MLLP_DB_PATH"] = self.db_path
        environ.update(env or {})
        argv = [sys.executable, "-c", _TWISTD, "-n", "--pidfile=", "mllp"]
        if listen is not None:
            argv += ["--port", listen]
        argv += list(args)
        self.stdout_lines: list[str] = []
        self.stderr_lines: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        self.port: int | None = None
        self.process = subprocess.Popen(
            argv,
            cwd=workdir,
            env=environ,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert self.process.stdout is not None and self.process.stderr is not None
        self._readers = [
            threading.Thread(
                target=self._read, args=(self.process.stdout, self.stdout_lines, True),
                daemon=True,
            ),
            threading.Thread(
                target=self._read, args=(self.process.stderr, self.stderr_lines, False),
                daemon=True,
            ),
        ]
        for reader in self._readers:
            reader.start()

    def _read(self, stream: IO[bytes], into: list[str], announce: bool) -> None:
        try:
            for raw in stream:
                line = raw.decode("utf-8", "replace").rstrip("\n")
                into.append(line)
                if announce:
                    self._lines.put(line)
        finally:
            if announce:
                self._lines.put(None)

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def wait_for_event(self, name: str, timeout: float = START_TIMEOUT) -> dict[str, Any]:
        """The first not yet consumed log event named ``name``; fails on
        timeout or when the process's stdout ends first.
        """
        deadline = time.monotonic() + timeout
        for _ in range(1_000_000):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                line = self._lines.get(timeout=remaining)
            except queue.Empty:
                break
            if line is None:
                self._lines.put(None)  # later waiters see the end too
                self.process.wait(timeout=STOP_TIMEOUT)
                raise AssertionError(
                    f"server exited ({self.process.returncode}) before {name!r}:\n"
                    + self.output()
                )
            event = _json(line)
            if event is not None and event.get("event") == name:
                return event
        raise AssertionError(f"no {name!r} event within {timeout}s:\n" + self.output())

    def wait_listening(self, timeout: float = START_TIMEOUT) -> int:
        """Wait for the "listening" event; returns (and keeps) its port."""
        event = self.wait_for_event("listening", timeout)
        port = event.get("port")
        assert isinstance(port, int) and port > 0, event
        self.port = port
        return port

    def send_signal(self, sig: int) -> None:
        if self.alive():
            self.process.send_signal(sig)

    def wait(self, timeout: float = STOP_TIMEOUT) -> int:
        """Wait for exit, then for the output readers; returns the exit code."""
        code = self.process.wait(timeout=timeout)
        for reader in self._readers:
            reader.join(timeout=timeout)
        return code

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int:
        self.send_signal(sig)
        return self.wait(timeout)

    def kill(self) -> None:
        """SIGKILL unless already gone; reap it and close the pipes."""
        if self.alive():
            self.process.kill()
        try:
            self.wait(timeout=STOP_TIMEOUT)
        finally:
            for stream in (self.process.stdout, self.process.stderr):
                if stream is not None:
                    stream.close()

    def events(self) -> list[dict[str, Any]]:
        """Every JSON log line written so far, parsed."""
        return [e for e in map(_json, list(self.stdout_lines)) if e is not None]

    def output(self) -> str:
        """stdout and stderr, for failure messages."""
        return "\n".join(
            ["--- stdout", *self.stdout_lines[-200:], "--- stderr", *self.stderr_lines[-200:]]
        )


def _json(line: str) -> dict[str, Any] | None:
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def make_workdir(case: _Cleanups) -> str:
    """A temporary directory removed when the test ends."""
    path = tempfile.mkdtemp(prefix="mllpd-it-")
    case.addCleanup(shutil.rmtree, path, True)
    return path


def spawn_server(
    case: _Cleanups,
    *,
    env: Mapping[str, str] | None = None,
    args: Sequence[str] = (),
    listen: str | None = LISTEN,
    workdir: str | None = None,
    db_path: str | None = None,
) -> ServerProcess:
    """Start the server without waiting for it; it is killed when the test ends."""
    server = ServerProcess(
        workdir or make_workdir(case), env=env, args=args, listen=listen, db_path=db_path
    )
    case.addCleanup(server.kill)
    return server


def start_server(case: _Cleanups, **options: Any) -> ServerProcess:
    """Start the server (options as for spawn_server) and wait until it listens."""
    server = spawn_server(case, **options)
    server.wait_listening()
    return server


def query(db_path: str, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    """Run one SELECT on an outbox file and close it again."""
    conn = sqlite3.connect(db_path, timeout=10.0)
    try:
        return list(conn.execute(sql, params))
    finally:
        conn.close()


# -- a minimal MLLP client ------------------------------------------------------

START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c\x0d"


def frame(payload: bytes) -> bytes:
    return START_BLOCK + payload + END_BLOCK


def hl7_message(
    control_id: str,
    *,
    pid: str = "PID|1||4711^^^HOSP^MR||DOE^JANE||19800101|F",
    extra: Sequence[str] = (),
    msg_type: str = "ADT^A01",
    sending_app: str = "TESTAPP",
    version: str = "2.5",
) -> bytes:
    """An ADT-like ER7 message with CR segment terminators."""
    segments = [
        f"MSH|^~\\&|{sending_app}|TESTFAC|MLLPD|HOSP|20240101120000||{msg_type}|"
        f"{control_id}|P|{version}",
        "EVN|A01|20240101120000",
        pid,
        "PV1|1|I|W^101^1",
        *extra,
    ]
    return ("\r".join(segments) + "\r").encode("ascii")


@dataclass(frozen=True)
class Ack:
    code: str
    control_id: str
    has_err: bool
    raw: bytes


def parse_ack(payload: bytes) -> Ack:
    """MSA-1, MSA-2 and whether an ERR segment is present."""
    segments = [s for s in payload.replace(b"\n", b"\r").split(b"\r") if s]
    msa = [s for s in segments if s.startswith(b"MSA|")]
    assert len(msa) == 1, f"expected one MSA segment in {payload!r}"
    fields = msa[0].decode("latin-1").split("|")
    return Ack(
        code=fields[1] if len(fields) > 1 else "",
        control_id=fields[2] if len(fields) > 2 else "",
        has_err=any(s.startswith(b"ERR|") for s in segments),
        raw=payload,
    )


class ConnectionClosed(Exception):
    """The server closed (or reset) the connection."""


class MLLPClient:
    """A blocking MLLP client on 127.0.0.1 with bounded reads."""

    MAX_READS = 100_000

    def __init__(
        self,
        port: int,
        *,
        timeout: float = 10.0,
        rcvbuf: int | None = None,
        sock: socket.socket | None = None,
    ) -> None:
        if sock is not None:
            # Already connected (a TLS socket, say).
            self.sock = sock
            self._buf = bytearray()
            return
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            # Before connect, so the window the server sees is small too.
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect((LOOPBACK, port))
        except BaseException:
            self.sock.close()
            raise
        self._buf = bytearray()

    def __enter__(self) -> MLLPClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, *payloads: bytes) -> None:
        self.sock.sendall(b"".join(frame(p) for p in payloads))

    def read_frame(self, timeout: float = 10.0) -> bytes:
        """The next payload from the server; ConnectionClosed on EOF or
        reset, TimeoutError when none arrives in time."""
        deadline = time.monotonic() + timeout
        for _ in range(self.MAX_READS):
            end = self._buf.find(END_BLOCK)
            if end >= 0:
                start = self._buf.rfind(START_BLOCK, 0, end)
                payload = bytes(self._buf[start + 1 : end])
                del self._buf[: end + len(END_BLOCK)]
                return payload
            self._buf += self._recv(deadline)
        raise AssertionError("too many reads for one frame")

    def read_ack(self, timeout: float = 10.0) -> Ack:
        return parse_ack(self.read_frame(timeout))

    def request(self, payload: bytes, timeout: float = 10.0) -> Ack:
        self.send(payload)
        return self.read_ack(timeout)

    def wait_closed(self, timeout: float = 10.0) -> list[bytes]:
        """Read until the server closes; returns the frames that came first.
        TimeoutError when the connection is still open at the deadline.
        """
        deadline = time.monotonic() + timeout
        frames: list[bytes] = []
        for _ in range(self.MAX_READS):
            try:
                frames.append(self.read_frame(max(deadline - time.monotonic(), 0.001)))
            except ConnectionClosed:
                return frames
        raise AssertionError("too many reads while waiting for close")

    def _recv(self, deadline: float) -> bytes:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no frame from the server in time")
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError, ssl.SSLError) as e:
            raise ConnectionClosed(str(e)) from e
        except TimeoutError:
            raise TimeoutError("no frame from the server in time") from None
        if not data:
            raise ConnectionClosed("EOF")
        return data
