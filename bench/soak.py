"""Soak mllpd's SQLite outbox: WAL, database size, RSS and ACK latency over time.

Two phases against one fresh ``twistd mllp`` each: a fixed offered rate
(default 1,000 msgs/s over 8 connections) and as fast as ACKs come (16
connections), each for --minutes. Every --interval seconds it samples the
WAL file, the database file, the server's RSS, and from /metrics the WAL
bytes written, messages acknowledged and restart checkpoints (the one
checkpoint that holds the writer); loadgen.py writes the ACK latency of the
same intervals. Output under --results-dir: ``soak-<stamp>.json`` (every
sample and a summary per phase, with the issue's targets checked) and
``soak-<stamp>.png`` (matplotlib, ``pip install '.[bench]'``).

    python bench/soak.py                       # 10 + 10 minutes
    python bench/soak.py --minutes 1           # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import LOADGEN, Server, twistd_command  # noqa: E402

HERE = Path(__file__).resolve().parent
MiB = 1024 * 1024

# The targets of the WAL issue, checked in the summary.
WAL_MAX = 64 * MiB
WAL_PER_MESSAGE_MAX = 12 * 1024
P99_MAX_MS = 10.0
ACK_MAX_MS = 250.0
RSS_DRIFT_MAX = 10 * MiB


def scrape(port: int) -> dict[str, float]:
    """The metrics this benchmark reads, summed over their labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    wanted = {
        "mllp_outbox_wal_written_bytes_total": "wal_written",
        "mllp_outbox_wal_bytes": "wal_bytes",
        'mllp_outbox_checkpoint_seconds_count{mode="restart"}': "restarts",
        'mllp_outbox_checkpoint_seconds_sum{mode="restart"}': "restart_seconds",
        "mllp_commit_batch_size_count": "commits",
    }
    out: dict[str, float] = {"aa": 0.0}
    for line in text.splitlines():
        if line.startswith("mllp_messages_total{") and 'code="AA"' in line:
            out["aa"] += float(line.rsplit(" ", 1)[1])
            continue
        name, _, value = line.rpartition(" ")
        key = wanted.get(re.sub(r'\{le="[^"]*",?', "{", name).replace("{}", ""))
        if key is not None and "_bucket" not in name:
            out[key] = float(value)
    return out


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def metrics_port(log: Path) -> int:
    for line in log.read_text().splitlines():
        if '"metrics_listening"' in line:
            return int(json.loads(line)["port"])
    raise RuntimeError("no metrics_listening line")


def phase(args: argparse.Namespace, name: str, rate: float, conns: int, tmp: Path) -> dict[str, Any]:
    workdir = tmp / name
    workdir.mkdir()
    db = workdir / "outbox.db"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE.parent), env.get("PYTHONPATH", "")) if p)
    env.update({"MLLP_DB_PATH": str(db), "LOG_LEVEL": "info",
                "MLLP_METRICS_ADDR": "127.0.0.1:0"})
    argv = [*twistd_command(None), "-n", "--pidfile=", "mllp", "--port", "tcp:0:interface=127.0.0.1"]
    server = Server(name, argv, workdir, env, None)
    port = server.start(60)
    assert server.proc is not None
    pid = server.proc.pid
    mport = metrics_port(server.stdout_path)
    duration = args.minutes * 60
    samples_path = workdir / "latency"
    load = subprocess.Popen(
        [sys.executable, str(LOADGEN), "--port", str(port), "-c", str(conns),
         "--duration", str(duration), "--warmup", "0", "--rate", str(rate),
         "--size", "1024", "--samples", str(samples_path), "--sample-interval", str(args.interval),
         "--server-pid", str(pid), "--max-time", str(duration + 60)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    sys.stderr.write(f"{name}: pid {pid} port {port}, {duration:.0f} s at "
                     f"{f'{rate:g} msgs/s' if rate else 'full speed'} over {conns} connections\n")
    started = time.monotonic()
    rows: list[dict[str, Any]] = []
    last = scrape(mport)
    while load.poll() is None and time.monotonic() - started < duration + 90:
        time.sleep(args.interval)
        now = scrape(mport)
        row = {
            "t": round(time.monotonic() - started, 1),
            "wal_file": size(Path(str(db) + "-wal")),
            "db_file": size(db),
            "rss": rss(pid),
            "aa": now["aa"] - last["aa"],
            "wal_written": now["wal_written"] - last["wal_written"],
            "restarts": now["restarts"] - last["restarts"],
            "restart_ms": 1000 * (now["restart_seconds"] - last["restart_seconds"]),
            "commits": now["commits"] - last["commits"],
        }
        rows.append(row)
        last = now
        sys.stderr.write(
            f"  t={row['t']:6.1f}s wal {row['wal_file'] / MiB:5.1f} MiB  db {row['db_file'] / MiB:7.1f} MiB"
            f"  rss {row['rss'] / MiB:5.1f} MiB  acks {row['aa']:6.0f}"
            f"  restarts {row['restarts']:.0f} ({row['restart_ms']:.1f} ms)\n"
        )
    stdout, stderr = load.communicate(timeout=120)
    sys.stderr.write("  " + stderr.decode().strip() + "\n")
    report = json.loads(stdout.decode().strip().splitlines()[-1])
    final = {"wal_file": size(Path(str(db) + "-wal")), "db_file": size(db)}
    server.stop(30)
    final["wal_file_after_stop"] = size(Path(str(db) + "-wal"))
    latency = [json.loads(line) for line in Path(f"{samples_path}.0").read_text().splitlines()]
    return {"name": name, "rate": rate, "connections": conns, "samples": rows,
            "latency": latency, "loadgen": report, "final": final,
            "summary": summarize(rows, latency, report, final, args.minutes)}


def summarize(rows: list[dict[str, Any]], latency: list[dict[str, Any]], report: dict[str, Any],
              final: dict[str, int], minutes: float) -> dict[str, Any]:
    aa = sum(r["aa"] for r in rows)
    written = sum(r["wal_written"] for r in rows)
    # RSS from minute 2 on (the first samples include start-up and warm caches).
    steady = [r["rss"] for r in rows if r["t"] >= min(120.0, minutes * 60 / 5)]
    worst_p99 = max((s["p99_ms"] or 0.0) for s in latency) if latency else None
    lat = report.get("latency_ms", {})
    out = {
        "acks": report.get("totals", {}).get("aa"),
        "msgs_per_s": report.get("msgs_per_s"),
        "wal_file_max_mib": max(
            [r["wal_file"] for r in rows] + [final["wal_file"], final["wal_file_after_stop"]]
        ) / MiB,
        "wal_file_after_mib": final["wal_file"] / MiB,
        "wal_file_after_stop_mib": final["wal_file_after_stop"] / MiB,
        "wal_bytes_per_message": written / aa if aa else None,
        "db_file_mib": final["db_file"] / MiB,
        "messages_per_commit": aa / max(1.0, sum(r["commits"] for r in rows)),
        "p50_ms": lat.get("p50"), "p99_ms": lat.get("p99"), "max_ms": lat.get("max"),
        "worst_interval_p99_ms": worst_p99,
        "restarts": sum(r["restarts"] for r in rows),
        "restart_ms_total": sum(r["restart_ms"] for r in rows),
        "rss_steady_min_mib": min(steady) / MiB if steady else None,
        "rss_steady_max_mib": max(steady) / MiB if steady else None,
    }
    out["targets"] = {
        "wal_file_max <= 64 MiB": out["wal_file_max_mib"] <= WAL_MAX / MiB,
        "rss flat within 10 MiB from minute 2": bool(steady) and max(steady) - min(steady) <= RSS_DRIFT_MAX,
    }
    return out


def plot(phases: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(4, len(phases), figsize=(6 * len(phases), 11), sharex="col", squeeze=False)
    for col, ph in enumerate(phases):
        rows, lat = ph["samples"], ph["latency"]
        t = [r["t"] / 60 for r in rows]
        ax = axes[0][col]
        ax.set_title(f"{ph['name']}: {ph['summary']['msgs_per_s'] or 0:,.0f} msgs/s, "
                     f"{ph['connections']} connections")
        ax.plot(t, [r["wal_file"] / MiB for r in rows], label="WAL file")
        ax.axhline(WAL_MAX / MiB, color="red", linestyle=":", label="64 MiB bound")
        ax.set_ylabel("MiB")
        ax.legend(loc="upper left")
        ax = axes[1][col]
        ax.plot(t, [r["db_file"] / MiB for r in rows], label="database file")
        ax2 = ax.twinx()
        ax2.plot(t, [r["rss"] / MiB for r in rows], color="green", label="RSS")
        ax.set_ylabel("database MiB")
        ax2.set_ylabel("RSS MiB", color="green")
        ax = axes[2][col]
        lt = [s["t"] / 60 for s in lat]
        ax.plot(lt, [s["p50_ms"] for s in lat], label="p50")
        ax.plot(lt, [s["p99_ms"] for s in lat], label="p99")
        ax.plot(lt, [s["max_ms"] for s in lat], label="max", alpha=0.5)
        ax.set_yscale("log")
        ax.set_ylabel("ACK latency, ms")
        ax.legend(loc="upper left")
        ax = axes[3][col]
        ax.bar(t, [r["restart_ms"] for r in rows], width=0.05, label="writer held by restart checkpoints")
        ax.set_ylabel("ms per interval")
        ax.set_xlabel("minutes")
        ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0, help="per phase")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between samples")
    p.add_argument("--rate", type=float, default=1000.0, help="fixed phase: msgs/s")
    p.add_argument("--phases", default="fixed,full", help="fixed, full or both")
    p.add_argument("--results-dir", default=str(HERE / "results"))
    args = p.parse_args(argv)
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    phases: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="mllpd-soak-") as tmp:
        for name in args.phases.split(","):
            if name == "fixed":
                ph = phase(args, "fixed", args.rate, 8, Path(tmp))
                s = ph["summary"]
                s["targets"]["wal bytes per message <= 12 KB"] = (
                    s["wal_bytes_per_message"] is not None
                    and s["wal_bytes_per_message"] <= WAL_PER_MESSAGE_MAX)
                s["targets"]["p99 <= 10 ms"] = (s["p99_ms"] or 1e9) <= P99_MAX_MS
                s["targets"]["no ACK over 250 ms"] = (s["max_ms"] or 1e9) <= ACK_MAX_MS
            else:
                ph = phase(args, "full", 0.0, 16, Path(tmp))
            phases.append(ph)
    out = results / f"soak-{stamp}.json"
    out.write_text(json.dumps({"args": vars(args), "phases": phases}, indent=1) + "\n")
    try:
        plot(phases, results / f"soak-{stamp}.png")
        print(f"plot: {results / f'soak-{stamp}.png'}")
    except ImportError:
        print("no matplotlib: pip install '.[bench]' for the plot", file=sys.stderr)
    for ph in phases:
        print(f"\n{ph['name']}:")
        for k, v in ph["summary"].items():
            print(f"  {k}: {v:.2f}" if isinstance(v, float) else f"  {k}: {v}")
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
