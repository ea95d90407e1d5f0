"""Receive and deliver at once: mllpd with one rule and two connectors.

For each (connections, offered rate) cell it starts two sinks of
``bench/sinks.py`` on 127.0.0.1 (an MLLP server that ACKs AA with the right
MSA-2, and a twisted.web server answering 200, each in its own process), and
a fresh ``twistd -n mllp`` from this checkout whose MLLP_CONFIG has one rule
(``has(pid.id) && pid.id != ""``) and two connectors, one per sink. It drives
mllpd with ``bench/loadgen.py`` and reports, side by side:

- the receive rate and ACK latency (what senders see),
- each connector's delivery rate inside the same measured window (counted by
  the sinks),
- each connector's queue in the SQLite outbox when the load stops (rows
  pending or in flight),
- how long after the load stopped each sink had received every stored
  message (the drain time), and the delivery rate while draining, when
  nothing is being received.

Delivery keeps up when every queue empties within ``--keep-up`` seconds of the
load stopping. ``--rates`` offers a fixed total rate (loadgen ``--rate``)
instead of sending as fast as ACKs come back, to find the highest receive
rate at which delivery keeps up.

``--sink-delay 20`` makes the sinks answer 20 ms late and ``--lanes 32``
gives both connectors 32 lanes; loadgen sends one patient, so with lanes
the connectors order by control id (every message its own key).

    python bench/run.py --delivery --connections 1,16,64 --duration 10
    python bench/delivery.py --connections 16 --rates 0,2000,3000 --repeat 3
    python bench/delivery.py --connections 16 --rates 1000 --sink-delay 20 --lanes 32
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
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
    cpu_list,
    run_loadgen,
    server_env,
    tail,
    twistd_command,
    write_report,
)

SINKS = HERE / "sinks.py"
CONNECTORS = ("sink-mllp", "sink-http")
RULE = 'has(pid.id) && pid.id != ""'
CONFIG = """\
rules:
  - name: patient-id-required
    expr: {rule}
connectors:
  - name: sink-mllp
    type: mllp
    address: tcp:127.0.0.1:{mllp_port}{lanes}
  - name: sink-http
    type: http
    url: http://127.0.0.1:{http_port}/{lanes}
"""
LANES = "\n    lanes: {n}\n    order_by: msh.control_id"

Timeline = list[tuple[float, int, int]]  # (monotonic s, messages, distinct ids)


def read_counts(path: Path) -> Timeline:
    """The ``count`` lines a sink has written so far."""
    out: Timeline = []
    try:
        text = path.read_bytes()
    except OSError:
        return out
    for line in text.split(b"\n"):
        if b'"count"' not in line:
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            continue  # a line still being written
        out.append((float(obj["t"]), int(obj["n"]), int(obj["unique"])))
    return out


def unique_at(timeline: Timeline, t: float) -> int:
    """Distinct messages the sink had at time ``t``, interpolated between
    its reports."""
    before = (timeline[0][0], 0) if timeline else (t, 0)
    for when, _, unique in timeline:
        if when >= t:
            span = when - before[0]
            if span <= 0:
                return unique
            return round(before[1] + (unique - before[1]) * (t - before[0]) / span)
        before = (when, unique)
    return before[1]


def first_reaching(timeline: Timeline, target: int) -> float | None:
    """Time of the first report with at least ``target`` distinct messages."""
    for when, _, unique in timeline:
        if unique >= target:
            return when
    return None


def queue_depths(db: Path) -> dict[str, int] | str:
    """Rows pending or in flight per connector (an error string if unreadable)."""
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
        try:
            rows = con.execute(
                "SELECT connector, COUNT(*) FROM deliveries"
                " WHERE state IN ('pending', 'in_flight') GROUP BY connector"
            ).fetchall()
        finally:
            con.close()
    except sqlite3.Error as e:
        return f"sqlite: {e}"
    depths = dict.fromkeys(CONNECTORS, 0)
    depths.update({str(name): int(n) for name, n in rows})
    return depths


def one_run(args: argparse.Namespace, conns: int, rate: float, rep: int,
            tmp: Path) -> dict[str, Any]:
    """Fresh sinks and server, one loadgen run, then wait for the queues to drain."""
    workdir = tmp / f"c{conns}-r{rate:g}-{rep}"
    workdir.mkdir()
    sinks = {}
    for kind in ("mllp", "http"):
        d = workdir / f"sink-{kind}"
        d.mkdir()
        sinks[kind] = Server(f"sink-{kind}", [sys.executable, str(SINKS), "--kind", kind,
                                              "--report-every", str(args.report_every),
                                              "--delay", str(args.sink_delay)],
                             d, dict(os.environ))
    db = workdir / "outbox.db"
    rec: dict[str, Any] = {"connections": conns, "offered_rate": rate or None,
                           "repeat": rep, "ok": False}
    server: Server | None = None
    try:
        for sink in sinks.values():
            sink.start(args.startup_timeout)
        config = workdir / "mllp.yaml"
        lanes = LANES.format(n=args.lanes) if args.lanes > 1 else ""
        config.write_text(CONFIG.format(rule=json.dumps(RULE), mllp_port=sinks["mllp"].port,
                                        http_port=sinks["http"].port, lanes=lanes))
        env = server_env(args, db)
        env["MLLP_CONFIG"] = str(config)
        argv = [*twistd_command(args.twistd), "-n", "--pidfile=", "mllp",
                "--port", "tcp:0:interface=127.0.0.1"]
        srv_dir = workdir / "mllpd"
        srv_dir.mkdir()
        cpus = cpu_list(args.server_cpus) if args.pin != "none" else None
        server = Server("mllpd", argv, srv_dir, env, cpus)
        port = server.start(args.startup_timeout)
        assert server.proc is not None
        sys.stderr.write(f"  c={conns} rate={rate or 'max'} r={rep}: mllpd pid "
                         f"{server.proc.pid} port {port}, sinks {sinks['mllp'].port} "
                         f"(mllp) {sinks['http'].port} (http)\n")
        load = run_loadgen(args, port, conns, server.proc.pid, rate)
        rec["load"] = load
        rec["queue_at_end"] = queue_depths(db)
        stored = count_rows(db)
        rec["stored"] = stored
        w0, w1 = load["window_monotonic_s"]
        if not isinstance(stored, int):
            raise BenchError(f"cannot count stored messages: {stored}")
        # Wait until each sink has every stored message, or give up.
        deadline = time.monotonic() + args.drain_timeout
        timelines: dict[str, Timeline] = {}
        while True:
            timelines = {k: read_counts(s.stdout_path) for k, s in sinks.items()}
            done = all(t and t[-1][2] >= stored for t in timelines.values())
            if done or time.monotonic() > deadline:
                break
            time.sleep(args.report_every)
        # The delivered marks reach the file one group commit later.
        settle = time.monotonic() + 5.0
        after = queue_depths(db)
        while (isinstance(after, dict) and any(after.values())
               and time.monotonic() < settle):
            time.sleep(0.05)
            after = queue_depths(db)
        rec["queue_after_drain"] = after
        window = w1 - w0
        per: dict[str, Any] = {}
        for kind, name in zip(("mllp", "http"), CONNECTORS, strict=True):
            tl = timelines[kind]
            at_start, at_end = unique_at(tl, w0), unique_at(tl, w1)
            reached = first_reaching(tl, stored)
            drain = None if reached is None else max(0.0, reached - w1)
            backlog = stored - at_end
            final = tl[-1] if tl else (0.0, 0, 0)
            per[name] = {
                "delivered_in_window": at_end - at_start,
                "msgs_per_s": round((at_end - at_start) / window, 1) if window > 0 else None,
                "behind_at_end": backlog,
                "drain_s": None if drain is None else round(drain, 2),
                # Only meaningful with something to drain: a handful of rows
                # in flight at the end says nothing about the rate.
                "drain_msgs_per_s": (round(backlog / drain, 1)
                                     if drain and drain >= 0.5 and backlog > 0 else None),
                "received": final[1], "distinct": final[2],
                "all_delivered": final[2] >= stored,
            }
            if reached is None and tl:
                # Not drained: report how fast it was going when we gave up.
                t_last, _, u_last = tl[-1]
                if t_last > w1:
                    per[name]["drain_msgs_per_s"] = round((u_last - at_end) / (t_last - w1), 1)
        rec["connectors"] = per
        rec["keeps_up"] = all(
            p["drain_s"] is not None and p["drain_s"] <= args.keep_up for p in per.values()
        )
    except BenchError as e:
        rec["error"] = str(e)
        sys.stderr.write(f"  c={conns} rate={rate or 'max'}: FAILED: {e}\n")
    finally:
        if server is not None:
            rec["exit_code"] = server.stop(args.stop_timeout)
            rec["killed"] = server.killed
            if server.killed or rec["exit_code"] not in (0, -15):
                rec["server_log_tail"] = tail(server.stdout_path) + "\n" + tail(server.stderr_path)
        for sink in sinks.values():
            sink.stop(5.0)
    load = rec.get("load")
    per = rec.get("connectors", {})
    rec["ok"] = bool(
        load is not None and load["errors"]["total"] == 0
        and load["totals"]["aa"] == rec.get("stored")
        and per and all(p["all_delivered"] for p in per.values())
        and not rec.get("killed")
    )
    return rec


def _f(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(cells: list[dict[str, Any]]) -> str:
    """Markdown table, one row per (connections, offered rate)."""
    lines = [
        "| connections | offered msgs/s | received msgs/s | p50 ms | p99 ms | mllpd CPU % "
        "| delivered msgs/s mllp / http | queue at end mllp / http | drain s mllp / http "
        "| drain msgs/s mllp / http | keeps up |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for rec in cells:
        load = rec.get("load")
        head = f"| {rec['connections']} | {_f(rec['offered_rate'], '.0f') if rec['offered_rate'] else 'max'}"
        if not load or "connectors" not in rec:
            lines.append(head + " | FAILED | | | | | | | | |")
            continue
        m, h = (rec["connectors"][n] for n in CONNECTORS)
        q = rec["queue_at_end"]
        queue = f"{q['sink-mllp']} / {q['sink-http']}" if isinstance(q, dict) else q
        spread = rec.get("spread")
        received = f"{load['msgs_per_s']:.0f}" + (f" ({spread})" if spread else "")
        lines.append(
            f"{head} | {received} | {_f(load['latency_ms']['p50'], '.2f')} "
            f"| {_f(load['latency_ms']['p99'], '.2f')} | {_f(load['cpu']['server_pct_of_core'], '.0f')} "
            f"| {_f(m['msgs_per_s'], '.0f')} / {_f(h['msgs_per_s'], '.0f')} | {queue} "
            f"| {_f(m['drain_s'], '.2f')} / {_f(h['drain_s'], '.2f')} "
            f"| {_f(m['drain_msgs_per_s'], '.0f')} / {_f(h['drain_msgs_per_s'], '.0f')} "
            f"| {'yes' if rec['keeps_up'] else 'NO'} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--connections", default="1,16,64", help="comma-separated list")
    p.add_argument("--rates", default="0",
                   help="offered msgs/s across all connections, comma-separated; 0 = no limit")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per run")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before")
    p.add_argument("--repeat", type=int, default=1,
                   help="runs per cell; the table shows the median by received msgs/s")
    p.add_argument("--keep-up", type=float, default=1.0,
                   help="delivery keeps up if every queue is empty this many seconds "
                        "after the load stops")
    p.add_argument("--drain-timeout", type=float, default=120.0,
                   help="seconds to wait for the queues to drain after the load")
    p.add_argument("--report-every", type=float, default=0.05,
                   help="seconds between the sinks' count lines (drain time resolution)")
    p.add_argument("--size", type=int, default=1024, help="HL7 payload bytes")
    p.add_argument("--sink-delay", type=float, default=0.0,
                   help="milliseconds each sink waits before answering")
    p.add_argument("--lanes", type=int, default=1, help="lanes of both connectors")
    p.add_argument("--workers", default="1", help="loadgen worker processes")
    p.add_argument("--ack-timeout", type=float, default=10.0)
    p.add_argument("--pin", choices=("none", "split"), default="none")
    p.add_argument("--server-cpus", default="0")
    p.add_argument("--loadgen-cpus", default="1")
    p.add_argument("--twistd", default=None, help="twistd executable to use")
    p.add_argument("--log-level", default="info", help="LOG_LEVEL for mllpd")
    p.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment for mllpd (repeatable)")
    p.add_argument("--startup-timeout", type=float, default=30.0)
    p.add_argument("--stop-timeout", type=float, default=40.0)
    p.add_argument("--results-dir", default=str(HERE / "results"))
    p.add_argument("--tmp-dir", default=None)
    p.add_argument("--keep-tmp", action="store_true")
    args = p.parse_args(argv)
    try:
        args.conns = [int(x) for x in args.connections.split(",") if x.strip()]
        args.rate_list = [float(x) for x in args.rates.split(",") if x.strip()]
    except ValueError:
        p.error("--connections and --rates must be numbers, e.g. 1,16,64")
    if not args.conns or min(args.conns) < 1 or not 1 <= args.repeat <= 20:
        p.error("bad --connections or --repeat")
    if not args.rate_list or min(args.rate_list) < 0:
        p.error("--rates must be 0 (no limit) or positive")
    if not 0 < args.duration <= 3600 or not 0 < args.drain_timeout <= 3600:
        p.error("--duration and --drain-timeout must be in (0, 3600]")
    if any("=" not in kv for kv in args.server_env):
        p.error("--server-env wants KEY=VALUE")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run every cell, print the table, write results; 0 if all passed."""
    args = parse_args(argv)
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"
    tmp = Path(tempfile.mkdtemp(prefix="mllpd-delivery-", dir=args.tmp_dir)).resolve()
    runs: list[dict[str, Any]] = []
    cells: list[dict[str, Any]] = []
    try:
        for n in args.conns:
            for rate in args.rate_list:
                reps = [one_run(args, n, rate, r, tmp) for r in range(args.repeat)]
                runs.extend(reps)
                good = [r for r in reps if r.get("connectors")]
                if not good:
                    cells.append(reps[0])
                    continue
                rates = sorted(r["load"]["msgs_per_s"] for r in good)
                mid = statistics.median_low(rates)
                cell = dict(next(r for r in good if r["load"]["msgs_per_s"] == mid))
                if len(good) > 1:
                    cell["spread"] = f"{rates[0]:.0f}-{rates[-1]:.0f}"
                    cell["keeps_up"] = all(r["keeps_up"] for r in good)
                cells.append(cell)
    finally:
        failed = not runs or not all(r["ok"] for r in runs)
        if args.keep_tmp or failed:
            sys.stderr.write(f"logs and outboxes kept in {tmp}\n")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    md = table(cells)
    return write_report(args, tmp, stamp, "delivery", md, runs, failed, rule=RULE)


if __name__ == "__main__":
    sys.exit(main())
