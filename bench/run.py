"""Benchmark mllpd against a reference and the minimal responder, same load.

The reference is ``../shared/bench/ref_group_commit.py --store group``: a
bare Twisted MLLP server doing the same durable group commit (WAL,
synchronous=FULL, AA after COMMIT, one INSERT per message), run from where it
lives (--reference), never copied here. The responder ACKs without storing.

For each connection count (default 64 and 1) it starts a fresh server,
learns its port from the ``{"event": "listening", "port": N}`` stdout line,
runs ``bench/loadgen.py`` against it, stops it with SIGTERM and, for mllpd,
counts the rows of the outbox's ``messages`` table (must equal the number
of AA ACKs). Prints a markdown table and writes JSON + markdown under
``bench/results/``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    HERE,
    BenchError,
    Server,
    count_rows,
    cpu_list,
    free_port,
    run_loadgen,
    server_env,
    tail,
    twistd_command,
    write_report,
)

RESPONDER = HERE / "responder.py"
REFERENCE = HERE.parent.parent / "shared" / "bench" / "ref_group_commit.py"
TARGETS = ("mllpd", "reference", "responder")


def one_run(args: argparse.Namespace, target: str, conns: int, rep: int,
            tmp: Path) -> dict[str, Any]:
    """Fresh server, one loadgen run, stop, check the outbox."""
    workdir = tmp / f"{target}-c{conns}-r{rep}"
    workdir.mkdir()
    env = dict(os.environ)
    if target == "mllpd":
        db = workdir / "outbox.db"
        env = server_env(args, db)
        argv = [*twistd_command(args.twistd), "-n", "--pidfile=", "mllp",
                "--port", "tcp:0:interface=127.0.0.1"]
    elif target == "reference":
        db = workdir / "ref.db"
        port = free_port()
        argv = [sys.executable, str(args.reference), "--port", str(port), "--store", "group",
                "--db", str(db)]
    else:
        db = None
        argv = [sys.executable, str(RESPONDER), "--port", "0"]
    cpus = cpu_list(args.server_cpus) if args.pin != "none" else None
    server = Server(target, argv, workdir, env, cpus)
    if target == "reference":
        server.port = port
    rec: dict[str, Any] = {"server": target, "connections": conns, "repeat": rep,
                           "argv": argv, "ok": False}
    try:
        t0 = time.monotonic()
        port = server.start(args.startup_timeout)
        rec["startup_s"] = round(time.monotonic() - t0, 3)
        rec["port"] = port
        assert server.proc is not None
        sys.stderr.write(f"  {target} c={conns} r={rep}: pid {server.proc.pid} port {port}\n")
        rec["load"] = run_loadgen(args, port, conns, server.proc.pid)
    except BenchError as e:
        rec["error"] = str(e)
        sys.stderr.write(f"  {target} c={conns}: FAILED: {e}\n")
    finally:
        t1 = time.monotonic()
        rec["exit_code"] = server.stop(args.stop_timeout)
        rec["stop_s"] = round(time.monotonic() - t1, 3)
        rec["killed"] = server.killed
    if db is not None and "load" in rec:
        rows = count_rows(db)
        aa = rec["load"]["totals"]["aa"]
        rec["outbox"] = {"rows": rows, "aa": aa, "rows_equal_aa": rows == aa}
    # twistd re-raises the signal it stopped on, so -SIGTERM is a clean exit.
    rec["clean_exit"] = rec["exit_code"] in (0, -signal.SIGTERM) and not server.killed
    if not rec["clean_exit"]:
        rec["server_log_tail"] = tail(server.stdout_path) + "\n" + tail(server.stderr_path)
    load = rec.get("load")
    rec["ok"] = (
        load is not None
        and load["errors"]["total"] == 0
        and rec["clean_exit"]
        and rec.get("outbox", {}).get("rows_equal_aa", True)
    )
    return rec


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(cells: dict[tuple[str, int], dict[str, Any]], conns_list: list[int],
          targets: list[str]) -> str:
    """Markdown table, one row per (connections, server)."""
    head = ("| server | connections | msgs/s | p50 ms | p99 ms | mllpd/reference "
            "| mllpd/responder | errors | server CPU % | µs CPU/msg | loadgen CPU % "
            "| rows = AA |")
    lines = [head, "|" + "---|" * 12]
    for n in conns_list:
        base = cells.get(("responder", n), {}).get("load")
        ref = cells.get(("reference", n), {}).get("load")
        for t in targets:
            rec = cells.get((t, n))
            if rec is None:
                continue
            load = rec.get("load")
            if not load:
                lines.append(f"| {t} | {n} | FAILED | | | | | | | | | |")
                continue
            ratio = vs_ref = "-"
            if t == "mllpd" and base and base["msgs_per_s"]:
                ratio = f"{load['msgs_per_s'] / base['msgs_per_s']:.3f}"
            if t == "mllpd" and ref and ref["msgs_per_s"]:
                vs_ref = f"{load['msgs_per_s'] / ref['msgs_per_s']:.3f}"
            cpu = load["cpu"]["server_s"]
            ok = load["measured"]["ok"]
            per_msg = f"{1e6 * cpu / ok:.0f}" if cpu and ok else "-"
            ob = rec.get("outbox")
            rows = "-" if ob is None else (
                f"yes ({ob['rows']})" if ob["rows_equal_aa"] else f"NO: {ob['rows']} vs {ob['aa']}")
            lines.append(
                f"| {t} | {n} | {load['msgs_per_s']:.0f} | {_fmt(load['latency_ms']['p50'], '.3f')} "
                f"| {_fmt(load['latency_ms']['p99'], '.3f')} | {vs_ref} | {ratio} "
                f"| {load['errors']['total']} "
                f"| {_fmt(load['cpu']['server_pct_of_core'], '.0f')} | {per_msg} "
                f"| {_fmt(load['cpu']['loadgen_pct_of_core'], '.0f')} | {rows} |"
            )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per run")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before")
    p.add_argument("--connections", default="64,1", help="comma-separated list")
    p.add_argument("--only", choices=TARGETS, default=None, help="run one server only")
    p.add_argument("--repeat", type=int, default=1,
                   help="runs per cell; the table shows the median by msgs/s")
    p.add_argument("--size", type=int, default=1024, help="HL7 payload bytes")
    p.add_argument("--workers", default="1", help="loadgen worker processes (or 'auto')")
    p.add_argument("--ack-timeout", type=float, default=10.0)
    p.add_argument("--pin", choices=("none", "split"), default="none",
                   help="split: server on --server-cpus, loadgen on --loadgen-cpus")
    p.add_argument("--server-cpus", default="0")
    p.add_argument("--loadgen-cpus", default="1")
    p.add_argument("--twistd", default=None, help="twistd executable to use")
    p.add_argument("--reference", default=str(REFERENCE),
                   help="ref_group_commit.py (run where it is, never copied)")
    p.add_argument("--log-level", default="info", help="LOG_LEVEL for mllpd")
    p.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment for mllpd (repeatable)")
    p.add_argument("--startup-timeout", type=float, default=30.0)
    p.add_argument("--stop-timeout", type=float, default=40.0,
                   help="SIGTERM grace before SIGKILL (mllpd drains up to 30 s)")
    p.add_argument("--results-dir", default=str(HERE / "results"))
    p.add_argument("--tmp-dir", default=None,
                   help="parent of the per-run dirs (outbox.db lives there; fsync matters)")
    p.add_argument("--keep-tmp", action="store_true", help="keep server logs and outboxes")
    args = p.parse_args(argv)
    try:
        args.conns = [int(x) for x in args.connections.split(",") if x.strip()]
    except ValueError:
        p.error("--connections must be integers, e.g. 64,1")
    if not args.conns or min(args.conns) < 1 or not 1 <= args.repeat <= 20:
        p.error("bad --connections or --repeat")
    if not 0 < args.duration <= 3600:
        p.error("--duration must be in (0, 3600]")
    if any("=" not in kv for kv in args.server_env):
        p.error("--server-env wants KEY=VALUE")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run every cell, print the table, write results; 0 if all passed.

    ``--delivery`` as the first argument runs ``delivery.py`` (receive and
    delivery to two connectors) with the remaining arguments instead."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--delivery"]:
        import delivery

        return delivery.main(argv[1:])
    args = parse_args(argv)
    targets = [args.only] if args.only else list(TARGETS)
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"
    tmp = Path(tempfile.mkdtemp(prefix="mllpd-bench-", dir=args.tmp_dir)).resolve()
    runs: list[dict[str, Any]] = []
    cells: dict[tuple[str, int], dict[str, Any]] = {}
    try:
        for n in args.conns:
            for t in targets:
                reps = [one_run(args, t, n, r, tmp) for r in range(args.repeat)]
                runs.extend(reps)
                good = [r for r in reps if r.get("load")]
                if good:
                    rate = statistics.median_low([r["load"]["msgs_per_s"] for r in good])
                    cells[(t, n)] = next(r for r in good if r["load"]["msgs_per_s"] == rate)
                else:
                    cells[(t, n)] = reps[0]
    finally:
        failed = not runs or not all(r["ok"] for r in runs)
        if args.keep_tmp or failed:
            sys.stderr.write(f"server logs and outboxes kept in {tmp}\n")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    md = table(cells, args.conns, targets)
    return write_report(args, tmp, stamp, "run", md, runs, failed)


if __name__ == "__main__":
    sys.exit(main())
