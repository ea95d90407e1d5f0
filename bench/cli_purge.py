"""What an mllp-cli purge costs the running server's ACKs.

Starts ``twistd -n mllp`` on a temp outbox, fills it with N delivered
messages for two connectors, then measures one sender's ACK latency
(request/response, one message at a time) while idle and while
``mllp-cli purge --delivered-before 1h`` runs for each connector (the second
purge also deletes the messages themselves).

    python bench/cli_purge.py [--rows 100000]
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import subprocess
import sys
import threading
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

from tests.serverproc import MLLPClient, ServerProcess, hl7_message, start_server  # noqa: E402

# Bound on messages sent per measurement.
MAX_MESSAGES = 1_000_000


class _Cleanups:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, tuple[Any, ...]]] = []

    def addCleanup(self, f: Any, *args: Any, **kwargs: Any) -> None:
        self.calls.append((f, args))

    def run(self) -> None:
        for f, args in reversed(self.calls):
            f(*args)


def fill(path: str, rows: int) -> None:
    conn = sqlite3.connect(path, isolation_level=None, timeout=30)
    now = time.time()
    body = hl7_message("FILL") * 6  # about 1 KB
    conn.execute("BEGIN IMMEDIATE")
    for i in range(rows):
        mid = f"{i:032x}"
        conn.execute(
            "INSERT INTO messages (message_id, received_at, peer, control_id, msg_type,"
            " sending_app, sending_fac, version, charset, size, sha256, ack_code, payload)"
            " VALUES (?, ?, 'bench', ?, 'ADT^A01', 'A', 'F', '2.5', NULL, ?, 'x', 'AA', ?)",
            (mid, now - 86400, f"F{i}", len(body), body),
        )
        for connector in ("ehr", "lake"):
            conn.execute(
                "INSERT INTO deliveries (message_id, connector, state, updated_at)"
                " VALUES (?, ?, 'delivered', ?)",
                (mid, connector, now - 7200),
            )
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


def measure(server: ServerProcess, label: str, command: list[str] | None) -> None:
    latencies: list[float] = []
    stop = threading.Event()

    def send() -> None:
        assert server.port is not None
        with MLLPClient(server.port) as client:
            for i in range(MAX_MESSAGES):
                if stop.is_set():
                    return
                started = time.perf_counter()
                ack = client.request(hl7_message(f"{label}{i}"))
                latencies.append(time.perf_counter() - started)
                assert ack.code == "AA", ack

    sender = threading.Thread(target=send)
    sender.start()
    took = ""
    if command is None:
        stop.wait(3.0)
    else:
        started = time.perf_counter()
        subprocess.run(command, cwd=REPO, check=True, capture_output=True)
        took = f", command {time.perf_counter() - started:.1f} s"
    stop.set()
    sender.join()
    latencies.sort()
    n = len(latencies)
    print(
        f"{label:>14}: {n} ACKs, p50 {latencies[n // 2] * 1000:.2f} ms,"
        f" p99 {latencies[int(n * 0.99)] * 1000:.2f} ms, max {latencies[-1] * 1000:.1f} ms{took}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    args = parser.parse_args()
    cleanups = _Cleanups()
    try:
        server = start_server(cleanups)
        fill(server.db_path, args.rows)
        cli = [sys.executable, "-m", "mllpd.cli", "--db", server.db_path, "purge", "-y",
               "--delivered-before", "1h", "-c"]
        measure(server, "idle", None)
        measure(server, "purge ehr", [*cli, "ehr"])
        measure(server, "purge lake", [*cli, "lake"])
    finally:
        cleanups.run()


if __name__ == "__main__":
    main()
