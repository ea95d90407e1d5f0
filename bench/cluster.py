"""Receive rate with the PostgreSQL outbox beside SQLite, and with 1, 2, 3
replicas sharing one database, in one run.

It starts a throwaway PostgreSQL with fsync on (``.ci/postgres.sh start
durable``; stopped at the end), then for each cell a fresh database (or
SQLite file) and fresh ``twistd -n mllp`` replicas from this checkout, and
drives them with ``bench/loadgen.py``: ``--connections`` in all, split
evenly over the replicas (one loadgen per replica, run at once). The rate is
the sum over replicas; latency is the worst replica's p50/p99. After each
run the stored rows are counted (must equal the AAs).

    python bench/cluster.py --connections 64 --duration 10
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from common import (  # noqa: E402
    BenchError,
    Server,
    count_rows,
    run_loadgen,
    server_env,
    twistd_command,
    write_report,
)

POSTGRES_SH = REPO / ".ci" / "postgres.sh"
CELLS = ("sqlite:1", "postgres:1", "postgres:2", "postgres:3")


def start_postgres() -> tuple[str, str]:
    """A durable throwaway cluster: (DSN, its directory)."""
    done = subprocess.run([str(POSTGRES_SH), "start", "durable"], capture_output=True,
                          text=True, timeout=120, check=False)
    if done.returncode != 0:
        raise BenchError(f"postgres.sh start failed: {done.stderr[-800:]}")
    values = dict(
        line.removeprefix("export ").split("=", 1)
        for line in done.stdout.splitlines() if line.startswith("export ")
    )
    return values["MLLPD_TEST_POSTGRES_DSN"], values["MLLPD_TEST_POSTGRES_DIR"]


def new_database(dsn: str, name: str) -> str:
    import psycopg
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    params = conninfo_to_dict(dsn)
    params["dbname"] = name
    return make_conninfo(**params)


def count_pg(url: str) -> int | str:
    import psycopg

    try:
        with psycopg.connect(url) as conn:
            row = conn.execute("SELECT count(*) FROM messages").fetchone()
            return int(row[0]) if row else 0
    except psycopg.Error as e:
        return f"postgres: {e}"


def one_cell(args: argparse.Namespace, dsn: str, backend: str, replicas: int,
             rep: int, tmp: Path) -> dict[str, Any]:
    name = f"{backend}-r{replicas}-{rep}"
    url = new_database(dsn, name.replace("-", "_")) if backend == "postgres" else None
    db = tmp / name / "outbox.db"
    servers: list[Server] = []
    rec: dict[str, Any] = {"backend": backend, "replicas": replicas, "repeat": rep, "ok": False}
    try:
        for i in range(replicas):
            workdir = tmp / name / f"replica-{i}"
            workdir.mkdir(parents=True)
            env = server_env(args, db)
            if url is not None:
                env.update({"MLLP_DB_URL": url, "POD_NAME": f"mllpd-{i}"})
            argv = [*twistd_command(args.twistd), "-n", "--pidfile=", "mllp",
                    "--port", "tcp:0:interface=127.0.0.1"]
            servers.append(Server(f"{name}-{i}", argv, workdir, env))
        for server in servers:
            server.start(args.startup_timeout)
        loads: list[dict[str, Any] | None] = [None] * replicas
        errors: list[str] = []
        share = [args.conns // replicas + (1 if i < args.conns % replicas else 0)
                 for i in range(replicas)]

        def drive(i: int) -> None:
            try:
                assert servers[i].proc is not None
                loads[i] = run_loadgen(args, servers[i].port, share[i], servers[i].proc.pid)
            except BenchError as e:
                errors.append(str(e))

        threads = [threading.Thread(target=drive, args=(i,)) for i in range(replicas)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors or any(x is None for x in loads):
            raise BenchError("; ".join(errors) or "a loadgen returned nothing")
        rec["loads"] = loads
    except BenchError as e:
        rec["error"] = str(e)
        sys.stderr.write(f"  {name}: FAILED: {e}\n")
    finally:
        for server in servers:
            server.stop(args.stop_timeout)
    loads_done = rec.get("loads")
    if loads_done:
        aa = sum(x["totals"]["aa"] for x in loads_done)
        rows = count_pg(url) if url is not None else count_rows(db)
        rec["msgs_per_s"] = sum(x["msgs_per_s"] for x in loads_done)
        rec["p50"] = max(x["latency_ms"]["p50"] or 0 for x in loads_done)
        rec["p99"] = max(x["latency_ms"]["p99"] or 0 for x in loads_done)
        rec["errors"] = sum(x["errors"]["total"] for x in loads_done)
        rec["outbox"] = {"rows": rows, "aa": aa, "rows_equal_aa": rows == aa}
        rec["ok"] = rec["errors"] == 0 and rows == aa
    return rec


def table(cells: dict[str, dict[str, Any]], conns: int) -> str:
    lines = [
        "| outbox | replicas | connections | msgs/s | p50 ms (worst replica) "
        "| p99 ms (worst replica) | errors | rows = AA |",
        "|" + "---|" * 8,
    ]
    for key, rec in cells.items():
        backend, replicas = key.split(":")
        if "msgs_per_s" not in rec:
            lines.append(f"| {backend} | {replicas} | {conns} | FAILED | | | | |")
            continue
        ob = rec["outbox"]
        rows = f"yes ({ob['rows']})" if ob["rows_equal_aa"] else f"NO: {ob['rows']} vs {ob['aa']}"
        lines.append(
            f"| {backend} | {replicas} | {conns} | {rec['msgs_per_s']:.0f} | {rec['p50']:.2f} "
            f"| {rec['p99']:.2f} | {rec['errors']} | {rows} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per run")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before")
    p.add_argument("--connections", type=int, default=64, help="in all, over the replicas")
    p.add_argument("--cells", default=",".join(CELLS),
                   help="comma-separated backend:replicas, e.g. sqlite:1,postgres:3")
    p.add_argument("--repeat", type=int, default=1,
                   help="runs per cell; the table shows the median by msgs/s")
    p.add_argument("--size", type=int, default=1024, help="HL7 payload bytes")
    p.add_argument("--workers", default="1", help="loadgen worker processes per replica")
    p.add_argument("--ack-timeout", type=float, default=10.0)
    p.add_argument("--twistd", default=None)
    p.add_argument("--log-level", default="info")
    p.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--startup-timeout", type=float, default=30.0)
    p.add_argument("--stop-timeout", type=float, default=40.0)
    p.add_argument("--results-dir", default=str(HERE / "results"))
    p.add_argument("--tmp-dir", default=None)
    args = p.parse_args(argv)
    args.conns = args.connections
    args.pin = "none"
    args.cell_list = [c.strip() for c in args.cells.split(",") if c.strip()]
    for cell in args.cell_list:
        backend, _, n = cell.partition(":")
        if backend not in ("sqlite", "postgres") or not n.isdigit() or int(n) < 1:
            p.error(f"bad cell {cell!r}; expected sqlite:1 or postgres:N")
        if backend == "sqlite" and int(n) != 1:
            p.error("a SQLite outbox has one replica")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    Path(args.results_dir).mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"
    tmp = Path(tempfile.mkdtemp(prefix="mllpd-cluster-bench-", dir=args.tmp_dir)).resolve()
    dsn, pg_dir = start_postgres()
    runs: list[dict[str, Any]] = []
    cells: dict[str, dict[str, Any]] = {}
    try:
        for cell in args.cell_list:
            backend, _, n = cell.partition(":")
            sys.stderr.write(f"  {cell}\n")
            reps = [one_cell(args, dsn, backend, int(n), r, tmp) for r in range(args.repeat)]
            runs.extend(reps)
            good = [r for r in reps if "msgs_per_s" in r]
            if good:
                rate = statistics.median_low([r["msgs_per_s"] for r in good])
                cells[cell] = next(r for r in good if r["msgs_per_s"] == rate)
            else:
                cells[cell] = reps[0]
    finally:
        subprocess.run([str(POSTGRES_SH), "stop", pg_dir], timeout=120, check=False)
        shutil.rmtree(tmp, ignore_errors=True)
    failed = not runs or not all(r["ok"] for r in runs)
    return write_report(args, tmp, stamp, "cluster", table(cells, args.conns), runs, failed)


if __name__ == "__main__":
    sys.exit(main())
