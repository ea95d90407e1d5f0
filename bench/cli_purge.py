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
import hashlib
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "bench"), str(REPO)]

from common import (  # noqa: E402
    MLLPClient,
    Server,
    hl7_message,
    server_env,
    twistd_command,
)

from mllpd.outbox import dedup_key  # noqa: E402

# Bound on messages sent per measurement.
MAX_MESSAGES = 1_000_000


def fill(path: Path, rows: int) -> None:
    conn = sqlite3.connect(path, isolation_level=None, timeout=30)
    now = time.time()
    body = hl7_message("FILL") * 6  # about 1 KB
    sha = hashlib.sha256(body).hexdigest()
    conn.execute("BEGIN IMMEDIATE")
    for i in range(rows):
        mid = f"{i:032x}"
        conn.execute(
            "INSERT INTO messages (message_id, received_at, peer, control_id, msg_type,"
            " sending_app, sending_fac, version, charset, size, sha256, ack_code, dedup_key,"
            " payload)"
            " VALUES (?, ?, 'bench', ?, 'ADT^A01', 'A', 'F', '2.5', NULL, ?, ?, 'AA', ?, ?)",
            (mid, now - 86400, f"F{i}", len(body), sha, dedup_key(sha), body),
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


def measure(port: int, label: str, command: list[str] | None) -> None:
    latencies: list[float] = []
    refused: list[str] = []
    stop = threading.Event()

    def send() -> None:
        with MLLPClient(port) as client:
            for i in range(MAX_MESSAGES):
                if stop.is_set():
                    return
                started = time.perf_counter()
                code = client.request(hl7_message(f"{label}{i}"))
                latencies.append(time.perf_counter() - started)
                if code != "AA":
                    refused.append(code)

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
    if not latencies:
        raise SystemExit(f"{label}: no ACK came back")
    latencies.sort()
    n = len(latencies)
    print(
        f"{label:>14}: {n} ACKs, p50 {latencies[n // 2] * 1000:.2f} ms,"
        f" p99 {latencies[int(n * 0.99)] * 1000:.2f} ms, max {latencies[-1] * 1000:.1f} ms{took}"
        + (f", {len(refused)} not AA: {sorted(set(refused))}" if refused else "")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000, help="delivered messages to fill in")
    parser.add_argument("--twistd", default=None, help="twistd executable to use")
    parser.add_argument("--log-level", default="info", help="LOG_LEVEL for mllpd")
    parser.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment for mllpd (repeatable)")
    args = parser.parse_args()
    if any("=" not in kv for kv in args.server_env):
        parser.error("--server-env wants KEY=VALUE")
    with tempfile.TemporaryDirectory(prefix="mllpd-cli-purge-") as tmp:
        db = Path(tmp) / "outbox.db"
        argv = [*twistd_command(args.twistd), "-n", "--pidfile=", "mllp",
                "--port", "tcp:0:interface=127.0.0.1"]
        server = Server("mllpd", argv, Path(tmp), server_env(args, db))
        try:
            port = server.start(30.0)
            fill(db, args.rows)
            cli = [sys.executable, "-m", "mllpd.cli", "--db", str(db), "purge", "-y",
                   "--delivered-before", "1h", "-c"]
            measure(port, "idle", None)
            measure(port, "purge ehr", [*cli, "ehr"])
            measure(port, "purge lake", [*cli, "lake"])
        finally:
            server.stop(40.0)


if __name__ == "__main__":
    main()
