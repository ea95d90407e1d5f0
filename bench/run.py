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
import json
import os
import platform
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
LOADGEN = HERE / "loadgen.py"
RESPONDER = HERE / "responder.py"
REFERENCE = HERE.parent.parent / "shared" / "bench" / "ref_group_commit.py"
TARGETS = ("mllpd", "reference", "responder")


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


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _cpu_list(spec: str) -> set[int]:
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
                port = _listening_port(line)
                if port:
                    self.port = port
                    return port
            if self.port and _accepts(self.port):
                return self.port
            if self.proc.poll() is not None:
                raise BenchError(
                    f"{self.name} exited with {self.proc.returncode} before listening\n"
                    f"stdout:\n{_tail(self.stdout_path)}\nstderr:\n{_tail(self.stderr_path)}"
                )
            time.sleep(0.05)
        self.stop(5.0)
        raise BenchError(f"{self.name}: no listening line within {timeout:.0f}s\n"
                         f"stderr:\n{_tail(self.stderr_path)}")

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


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        return False
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening_port(line: bytes) -> int:
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
        os.sched_setaffinity(proc.pid, _cpu_list(args.loadgen_cpus))
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
        port = _free_port()
        argv = [sys.executable, str(args.reference), "--port", str(port), "--store", "group",
                "--db", str(db)]
    else:
        db = None
        argv = [sys.executable, str(RESPONDER), "--port", "0"]
    cpus = _cpu_list(args.server_cpus) if args.pin != "none" else None
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
        rec["server_log_tail"] = _tail(server.stdout_path) + "\n" + _tail(server.stderr_path)
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


def _fs_type(path: Path) -> str | None:
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


def _git_rev() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(HERE.parent), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return None
    return out.stdout.strip() or None


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


def write_report(args: argparse.Namespace, tmp: Path, stamp: str, kind: str, md: str,
                 runs: list[dict[str, Any]], failed: bool, **meta: Any) -> int:
    """Print the table and keep it, the runs and how they were made as
    ``<kind>-<stamp>.json`` and ``.md`` in --results-dir; 1 if a run failed."""
    results = Path(args.results_dir)
    meta = {
        "time": stamp, "git": _git_rev(), "python": platform.python_version(),
        "twisted": metadata.version("twisted"), "cpus": os.cpu_count(),
        "platform": platform.platform(), "args": vars(args),
        "twistd": twistd_command(args.twistd), "outbox_fs": _fs_type(tmp), **meta,
    }
    out = results / f"{kind}-{stamp}.json"
    out.write_text(json.dumps({"meta": meta, "table": md, "runs": runs}, indent=2) + "\n")
    (results / f"{kind}-{stamp}.md").write_text(md + "\n")
    print(md)
    print(f"\nresults: {out}" + ("" if not failed else "  (SOME RUNS FAILED, see JSON)"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
