"""Reconnect storm: open N connections to mllpd at once and time their accept.

Starts ``twistd -n mllp`` from this checkout (as ``run.py`` does) with
``MLLP_LISTEN_BACKLOG`` set to each ``--backlog`` value, starts N
non-blocking connects in one burst, and reports how long until every
connection is established and until every one has an AA for one message.
With a backlog smaller than the burst, SYNs overflow the accept queue and
wait for the client's 1 s retransmit.

    python bench/connect_storm.py                        # 2000 connects, backlog 4096 then 50
    python bench/connect_storm.py -n 5000 --backlog 4096
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import selectors
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Server, twistd_command  # noqa: E402

HERE = Path(__file__).resolve().parent


def _message(i: int) -> bytes:
    return (
        f"MSH|^~\\&|STORM|B|C|D|20260101120000||ADT^A01^ADT_A01|S{i:06d}|P|2.5\r"
        "PID|1||1^^^H||DOE^JOHN\r"
    ).encode()


def storm(port: int, count: int, timeout: float) -> dict[str, float | int]:
    """Connect ``count`` sockets at once; seconds until all connected and all AA'd."""
    sel = selectors.DefaultSelector()
    socks: list[socket.socket] = []
    started = time.monotonic()
    for _ in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        err = sock.connect_ex(("127.0.0.1", port))
        if err not in (0, errno.EINPROGRESS):
            raise OSError(err, os.strerror(err))
        socks.append(sock)
        sel.register(sock, selectors.EVENT_WRITE, len(socks) - 1)
    connected = acked = 0
    t_connected = t_acked = float("nan")
    buffers: dict[int, bytes] = {}
    deadline = started + timeout
    failed = 0
    while acked + failed < count and time.monotonic() < deadline:
        for key, mask in sel.select(timeout=max(deadline - time.monotonic(), 0.001)):
            i = key.data
            sock = socks[i]
            if mask & selectors.EVENT_WRITE:
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                    failed += 1
                    sel.unregister(sock)
                    continue
                connected += 1
                if connected == count:
                    t_connected = time.monotonic() - started
                sock.send(b"\x0b" + _message(i) + b"\x1c\r")
                sel.modify(sock, selectors.EVENT_READ, i)
                continue
            try:
                data = sock.recv(4096)
            except OSError:
                data = b""
            if not data:
                failed += 1
                sel.unregister(sock)
                continue
            buffers[i] = buffers.get(i, b"") + data
            if b"\x1c\r" in buffers[i]:
                if b"MSA|AA|" in buffers[i]:
                    acked += 1
                else:
                    failed += 1
                sel.unregister(sock)
                if acked == count:
                    t_acked = time.monotonic() - started
    sel.close()
    for sock in socks:
        sock.close()
    return {"connections": count, "connected": connected, "acked": acked, "failed": failed,
            "all_connected_s": round(t_connected, 3), "all_acked_s": round(t_acked, 3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", "--connections", type=int, default=2000)
    p.add_argument("--backlog", default="4096,50", help="comma-separated MLLP_LISTEN_BACKLOG values")
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--twistd", default=None)
    args = p.parse_args(argv)
    rows = []
    for backlog in [int(b) for b in args.backlog.split(",")]:
        with tempfile.TemporaryDirectory(prefix="mllpd-storm-") as tmp:
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(
                x for x in (str(HERE.parent), os.environ.get("PYTHONPATH", "")) if x
            )
            env.update({
                "MLLP_DB_PATH": str(Path(tmp) / "outbox.db"), "LOG_LEVEL": "info",
                "MLLP_LISTEN_BACKLOG": str(backlog),
            })
            argv_ = [*twistd_command(args.twistd), "-n", "--pidfile=", "mllp",
                     "--port", "tcp:0:interface=127.0.0.1"]
            server = Server("mllpd", argv_, Path(tmp), env)
            port = server.start(30.0)
            try:
                row = {"backlog": backlog, **storm(port, args.connections, args.timeout)}
            finally:
                server.stop(30.0)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| backlog | connections | all connected (s) | all AA (s) | failed |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['backlog']} | {r['connections']} | {r['all_connected_s']} "
              f"| {r['all_acked_s']} | {r['failed']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
