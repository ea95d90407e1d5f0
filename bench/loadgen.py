"""MLLP load generator for HL7 v2 servers.

Each connection keeps exactly one message outstanding: it sends an
HL7 v2.5 ADT^A01 framed as ``0x0B payload 0x1C 0x0D``, waits for the ACK,
checks MSA-1 (code) and MSA-2 (must equal the MSH-10 it sent), then sends
the next one. Connections may be spread over several worker processes.

Output: one JSON document on stdout (and optionally ``--json-out``) and a
human-readable summary line on stderr.

Only 127.0.0.1 / localhost targets are accepted; every loop is bounded by a
message count and by a hard deadline.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import random
import resource
import select
import socket
import string
import sys
import time
from array import array
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

SB = b"\x0b"
EB_CR = b"\x1c\x0d"
CTRL_ID_LEN = 20  # HL7 v2.5 MSH-10 is ST(20)
MAX_SEQ = 999_999_999  # 9 digits of sequence in the control id
MAX_ACK_BUFFER = 1 << 20  # drop a connection whose unterminated ACK exceeds 1 MiB
ALLOWED_HOSTS = ("127.0.0.1", "localhost", "::1")
NS = 1_000_000_000


# --------------------------------------------------------------------------
# Payload
# --------------------------------------------------------------------------

_NOTE = (
    "Patient admitted via emergency department for observation after "
    "syncopal episode at home. Vital signs stable on arrival. Telemetry "
    "ordered; fall precautions in place; family at bedside. "
)


def _note_segments(room: int, first_id: int) -> str | None:
    """OBX|TX note segments totalling exactly ``room`` bytes (None if impossible).

    Each note text stays within 199 characters (ST length in v2.5)."""
    out: list[str] = []
    set_id = first_id
    while room > 0 and len(out) < 100_000:
        head = f"OBX|{set_id}|TX|11492-6^History and physical note^LN||"
        tail = "||||||F\r"
        overhead = len(head) + len(tail)
        if room < overhead + 10:
            return None
        n = min(199, room - overhead)
        rest = room - overhead - n
        if 0 < rest < overhead + 12:  # leave enough for one more segment
            n -= overhead + 12 - rest
        text = (_NOTE * (n // len(_NOTE) + 1))[:n]
        out.append(head + text + tail)
        room -= overhead + n
        set_id += 1
    return "".join(out) if room == 0 else None


def build_template(size: int, ts: str) -> tuple[bytes, bytes]:
    """Return (prefix, suffix) so that ``prefix + ctrl_id + suffix`` is an
    HL7 v2.5 ADT^A01 of exactly ``size`` bytes, or the smallest one we build
    (about 600 bytes) if ``size`` is below that."""
    msh_head = f"MSH|^~\\&|LOADGEN|BENCH|MLLPD|HOSPITAL|{ts}||ADT^A01^ADT_A01|"
    msh_tail = "|P|2.5"
    core = [
        f"EVN|A01|{ts}|||OPERATOR^SMITH^JANE",
        (
            "PID|1||MRN00482913^^^HOSP^MR||DOE^JOHN^QUINCY^^^^L||19800101|M|||"
            "123 MAIN ST^^SPRINGFIELD^IL^62701^USA^H||^PRN^PH^^1^217^5551234|||S||"
            "ACC0004829131^^^HOSP^AN|123-45-6789"
        ),
        (
            "NK1|1|DOE^JANE^^^^^L|SPO^Spouse^HL70063|"
            "123 MAIN ST^^SPRINGFIELD^IL^62701^USA^H|^PRN^PH^^1^217^5554321"
        ),
        (
            "PV1|1|I|4WEST^401^A^HOSP||||1234^ATTEND^ALICE^^^DR|"
            "5678^REFER^BOB^^^DR||MED||||7|||1234^ATTEND^ALICE^^^DR|IN||SELF"
            f"|||||||||||||||||||HOSP||ADM|||{ts}"
        ),
    ]
    vitals = [
        f"OBX|1|NM|8867-4^Heart rate^LN||72|/min^beats per minute^UCUM|60-100|N|||F|||{ts}",
        f"OBX|2|NM|8480-6^Systolic blood pressure^LN||128|mm[Hg]^mmHg^UCUM|90-140|N|||F|||{ts}",
        f"OBX|3|NM|8462-4^Diastolic blood pressure^LN||82|mm[Hg]^mmHg^UCUM|60-90|N|||F|||{ts}",
        f"OBX|4|NM|8310-5^Body temperature^LN||36.9|Cel^degree Celsius^UCUM|36.1-37.2|N|||F|||{ts}",
    ]
    suffix = ""
    for nv in range(len(vitals), -1, -1):
        suffix = msh_tail + "\r" + "\r".join(core + vitals[:nv]) + "\r"
        notes = _note_segments(size - len(msh_head) - CTRL_ID_LEN - len(suffix), nv + 1)
        if notes is not None:
            suffix += notes
            break
    return msh_head.encode("ascii"), suffix.encode("ascii")


def random_tag(n: int = 4) -> str:
    """Random alphanumeric run tag so control ids differ between runs."""
    alphabet = string.ascii_uppercase + string.digits
    return "".join(random.SystemRandom().choice(alphabet) for _ in range(n))


# --------------------------------------------------------------------------
# Worker
# --------------------------------------------------------------------------


@dataclass
class Plan:
    """Everything a worker needs; identical across workers except ids."""

    host: str
    port: int
    tag: str
    size: int
    messages: int  # per connection, 0 = duration mode
    start_ns: int  # monotonic: all connections begin sending here
    measure_start_ns: int  # start + warmup
    measure_end_ns: int  # duration mode: stop sending; messages mode: 0
    hard_deadline_ns: int
    ack_timeout_ns: int
    connect_timeout: float
    server_pid: int = 0
    rate: float = 0.0  # messages/s for this worker; 0 = as fast as ACKs come
    samples: str = ""  # write one JSON line per sample interval here (".<worker>" added)
    sample_interval_ns: int = 5 * NS


@dataclass
class Stats:
    """Counters of one worker (mergeable)."""

    sent: int = 0
    answered: int = 0
    codes: dict[str, int] = field(default_factory=dict)  # all phases, matched ids
    mismatches: int = 0
    malformed: int = 0
    unexpected: int = 0
    timeouts: int = 0
    conn_errors: int = 0
    connect_failures: int = 0
    measured_ok: int = 0
    measured_nak: int = 0
    last_measured_ns: int = 0
    latencies: array = field(default_factory=lambda: array("q"))
    cpu_s: float = 0.0
    server_cpu_s: float | None = None
    seconds_measured: float = 0.0


def _server_cpu(pid: int) -> float | None:
    """utime+stime of ``pid`` in seconds, via /proc (None if unavailable)."""
    if pid <= 0:
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _own_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Client:
    """State of one connection (one message outstanding at most)."""

    __slots__ = (
        "buf",
        "cur_measured",
        "expect",
        "fd",
        "measured_sent",
        "out",
        "prefix",
        "sent_at",
        "seq",
        "sock",
    )

    def __init__(self, sock: socket.socket, prefix: bytes) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.prefix = prefix  # control id minus the 9-digit sequence
        self.buf = b""
        self.out: bytes | memoryview = b""  # unsent tail of a partial write
        self.seq = 0
        self.expect = b""  # control id awaiting its ACK
        self.sent_at = 0
        self.measured_sent = 0
        self.cur_measured = False


class Engine:
    """Drives one worker's connections with a plain epoll loop.

    A hand-rolled loop rather than asyncio: per message it costs one send,
    one recv and a few bytes.find calls. Measured against bench/responder.py
    at 64 connections: ~11 us of CPU per message vs ~26 us with asyncio
    protocols, which leaves more of a small machine to the server.
    """

    def __init__(self, plan: Plan, worker: int, conn_ids: list[int]) -> None:
        self.plan = plan
        self.worker = worker
        self.conn_ids = conn_ids
        self.stats = Stats()
        head, tail = build_template(plan.size, time.strftime("%Y%m%d%H%M%S"))
        self.head = SB + head
        self.tail = tail + EB_CR
        self.ep = select.epoll()
        self.clients: dict[int, Client] = {}
        self.cpu0 = 0.0
        self.srv0: float | None = None
        self.started = False
        self.ended = False
        # Rate limit: the k-th message of this worker is due at start + k/rate;
        # a connection whose next message is not due yet waits in ``idle``.
        self.interval_ns = int(NS / plan.rate) if plan.rate > 0 else 0
        self.next_due = plan.start_ns
        self.idle: deque[Client] = deque()
        # Per-interval ACK latencies (ns) of good ACKs, and NAK/mismatch counts.
        self.window: array = array("q")
        self.window_bad = 0
        self.next_sample = plan.start_ns + plan.sample_interval_ns
        self.sample_out = open(f"{plan.samples}.{worker}", "w") if plan.samples else None

    def write_sample(self, now: int) -> None:
        """One line: seconds since start, ACKs, bad ACKs, p50/p99/max ms."""
        assert self.sample_out is not None
        lat = sorted(self.window)
        line = {
            "t": round((now - self.plan.start_ns) / NS, 3),
            "acks": len(lat), "bad": self.window_bad,
            "p50_ms": _pct(lat, 50), "p99_ms": _pct(lat, 99),
            "max_ms": lat[-1] / 1e6 if lat else None,
        }
        self.sample_out.write(json.dumps(line) + "\n")
        self.sample_out.flush()
        self.window = array("q")
        self.window_bad = 0
        self.next_sample += self.plan.sample_interval_ns

    # connection management --------------------------------------------------
    def connect_all(self) -> None:
        """Open every connection (sequentially, each bounded by a timeout)."""
        plan = self.plan
        for cid in self.conn_ids:
            try:
                sock = socket.create_connection((plan.host, plan.port), plan.connect_timeout)
            except OSError:
                self.stats.connect_failures += 1
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setblocking(False)
            prefix = f"{plan.tag}{self.worker:02d}{cid:05d}".encode("ascii")
            c = Client(sock, prefix)
            self.clients[c.fd] = c
            self.ep.register(c.fd, select.EPOLLIN)

    def finish(self, c: Client) -> None:
        """Close a connection and forget it (idempotent)."""
        if self.clients.pop(c.fd, None) is None:
            return
        try:
            self.ep.unregister(c.fd)
        except OSError:
            pass
        c.sock.close()

    def fail(self, c: Client) -> None:
        """Connection broke or closed under us."""
        self.stats.conn_errors += 1
        self.finish(c)

    # per-message logic ------------------------------------------------------
    def send_next(self, c: Client, now: int) -> None:
        """Send one message unless this connection's budget is exhausted."""
        plan = self.plan
        if plan.messages:
            if c.measured_sent >= plan.messages:
                self.finish(c)
                return
        elif now >= plan.measure_end_ns:
            self.finish(c)
            return
        if now >= plan.hard_deadline_ns or c.seq >= MAX_SEQ:
            self.finish(c)
            return
        if self.interval_ns:
            if now < self.next_due:
                self.idle.append(c)
                return
            # Catch up after a stall by at most 10 ms worth of messages, so a
            # hiccup does not turn into a burst.
            self.next_due = max(self.next_due, now - 10_000_000) + self.interval_ns
        c.seq += 1
        ctrl = b"%s%09d" % (c.prefix, c.seq)
        c.cur_measured = now >= plan.measure_start_ns
        if c.cur_measured:
            c.measured_sent += 1
        c.expect = ctrl
        c.sent_at = now
        self.stats.sent += 1
        data = self.head + ctrl + self.tail
        try:
            n = c.sock.send(data)
        except BlockingIOError:
            n = 0
        except OSError:
            self.fail(c)
            return
        if n < len(data):
            c.out = memoryview(data)[n:]
            self.ep.modify(c.fd, select.EPOLLIN | select.EPOLLOUT)

    def on_writable(self, c: Client) -> None:
        """Flush the rest of a partially sent frame."""
        try:
            n = c.sock.send(c.out)
        except BlockingIOError:
            return
        except OSError:
            self.fail(c)
            return
        c.out = c.out[n:]
        if not c.out:
            self.ep.modify(c.fd, select.EPOLLIN)

    def on_readable(self, c: Client) -> None:
        """Read what is there and handle each complete ACK frame."""
        try:
            data = c.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            self.fail(c)
            return
        if not data:
            self.fail(c)
            return
        now = time.monotonic_ns()
        buf = c.buf + data if c.buf else data
        while c.fd in self.clients:
            end = buf.find(EB_CR)
            if end < 0:
                if len(buf) > MAX_ACK_BUFFER:
                    self.stats.malformed += 1
                    self.finish(c)
                    return
                break
            frame = buf[buf.find(SB) + 1 : end]  # find() == -1 keeps whole prefix
            buf = buf[end + 2 :]
            if not c.expect:
                self.stats.unexpected += 1
                continue
            self.on_ack(c, frame, now)
        c.buf = buf

    def on_ack(self, c: Client, frame: bytes, now: int) -> None:
        """Verify MSA-1/MSA-2, record latency, send the next message."""
        stats, plan = self.stats, self.plan
        stats.answered += 1
        ok = False
        i = frame.find(b"\rMSA|")
        if i < 0:
            stats.malformed += 1
        else:
            j = frame.find(b"\r", i + 5)
            parts = (frame[i + 1 : j] if j >= 0 else frame[i + 1 :]).split(b"|", 3)
            if len(parts) < 3:
                stats.malformed += 1
            elif parts[2] != c.expect:
                stats.mismatches += 1
            else:
                code = parts[1].decode("ascii", "replace")
                stats.codes[code] = stats.codes.get(code, 0) + 1
                ok = code == "AA" or code == "CA"
        if self.sample_out is not None:
            if ok:
                self.window.append(now - c.sent_at)
            else:
                self.window_bad += 1
        if plan.messages:
            measured = c.cur_measured
        else:
            measured = plan.measure_start_ns <= now <= plan.measure_end_ns
        if measured:
            if ok:
                stats.measured_ok += 1
                stats.latencies.append(now - c.sent_at)
            else:
                stats.measured_nak += 1
            stats.last_measured_ns = max(stats.last_measured_ns, now)
        c.expect = b""
        self.send_next(c, now)

    # measurement window -----------------------------------------------------
    def snap_start(self) -> None:
        self.started = True
        self.cpu0 = _own_cpu()
        if self.worker == 0:
            self.srv0 = _server_cpu(self.plan.server_pid)

    def snap_end(self) -> None:
        if self.ended:
            return
        self.ended = True
        if not self.started:
            self.snap_start()
        now = time.monotonic_ns()
        if now <= self.plan.measure_start_ns:  # all connections ended in warmup
            return
        self.stats.seconds_measured = (now - self.plan.measure_start_ns) / NS
        self.stats.cpu_s = _own_cpu() - self.cpu0
        if self.srv0 is not None:
            srv1 = _server_cpu(self.plan.server_pid)
            if srv1 is not None:
                self.stats.server_cpu_s = srv1 - self.srv0

    def check_timeouts(self, now: int) -> None:
        """Abort connections whose ACK is overdue."""
        for c in list(self.clients.values()):
            if c.expect and now - c.sent_at > self.plan.ack_timeout_ns:
                self.stats.timeouts += 1
                self.finish(c)

    # main loop --------------------------------------------------------------
    def run(self) -> Stats:
        """Connect, wait for the common start, then loop until done."""
        plan = self.plan
        try:
            self.connect_all()
            delay = (plan.start_ns - time.monotonic_ns()) / NS
            if delay > 0:
                time.sleep(delay)
            now = time.monotonic_ns()
            for c in list(self.clients.values()):
                self.send_next(c, now)
            next_check = now + NS // 4
            clients, poll = self.clients, self.ep.poll
            while clients:
                now = time.monotonic_ns()
                if now >= plan.hard_deadline_ns:
                    break
                if not self.started and now >= plan.measure_start_ns:
                    self.snap_start()
                if plan.measure_end_ns and not self.ended and now >= plan.measure_end_ns:
                    self.snap_end()
                if now >= next_check:
                    self.check_timeouts(now)
                    next_check = now + NS // 4
                if self.sample_out is not None and now >= self.next_sample:
                    self.write_sample(now)
                timeout = 0.05
                idle = self.idle
                while idle and (now >= self.next_due or (
                        plan.measure_end_ns and now >= plan.measure_end_ns)):
                    waiting = idle.popleft()
                    if waiting.fd in clients:
                        self.send_next(waiting, now)
                if idle:
                    timeout = min(timeout, max(self.next_due - now, 0) / NS)
                for fd, ev in poll(timeout):
                    ready = clients.get(fd)
                    if ready is None:
                        continue
                    if ev & select.EPOLLOUT and ready.out:
                        self.on_writable(ready)
                    if ev & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                        self.on_readable(ready)
            for c in list(self.clients.values()):
                if c.expect:
                    self.stats.timeouts += 1
                self.finish(c)
            self.snap_end()
        finally:
            for c in list(self.clients.values()):
                self.finish(c)
            self.ep.close()
            if self.sample_out is not None:
                self.sample_out.close()
        return self.stats


def run_worker(plan: Plan, worker: int, conn_ids: list[int]) -> Stats:
    """Run one worker's connections to completion (blocking)."""
    return Engine(plan, worker, conn_ids).run()


def _worker_entry(plan: Plan, worker: int, conn_ids: list[int], pipe: Connection) -> None:
    try:
        stats = run_worker(plan, worker, conn_ids)
        pipe.send(stats)
    except Exception as e:  # report it so the parent does not wait in vain
        pipe.send(repr(e))
        raise
    finally:
        pipe.close()


# --------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------


def _pct(sorted_ns: list[int], q: float) -> float | None:
    """Nearest-rank percentile in ms."""
    if not sorted_ns:
        return None
    k = max(0, min(len(sorted_ns) - 1, math.ceil(q * len(sorted_ns) / 100) - 1))
    return sorted_ns[k] / 1e6


def summarize(args: argparse.Namespace, plan: Plan, parts: list[Stats], worker_errors: list[str]) -> dict[str, Any]:
    """Merge worker stats into the report dictionary."""
    lat: list[int] = []
    codes: dict[str, int] = {}
    tot = Stats()
    for s in parts:
        lat.extend(s.latencies)
        for k, v in s.codes.items():
            codes[k] = codes.get(k, 0) + v
        for name in ("sent", "answered", "mismatches", "malformed", "unexpected",
                     "timeouts", "conn_errors", "connect_failures",
                     "measured_ok", "measured_nak", "cpu_s"):
            setattr(tot, name, getattr(tot, name) + getattr(s, name))
    lat.sort()
    if plan.messages:
        last = max((s.last_measured_ns for s in parts), default=0)
        window = max(last - plan.measure_start_ns, 1) / NS
    else:
        window = (plan.measure_end_ns - plan.measure_start_ns) / NS
    cpu_window = max((s.seconds_measured for s in parts), default=0.0) or window
    srv = next((s.server_cpu_s for s in parts if s.server_cpu_s is not None), None)
    ok_total = codes.get("AA", 0) + codes.get("CA", 0)
    nak_total = sum(v for k, v in codes.items() if k not in ("AA", "CA"))
    errors = (nak_total + tot.mismatches + tot.malformed + tot.unexpected + tot.timeouts
              + tot.conn_errors + tot.connect_failures + len(worker_errors))
    return {
        "target": f"{plan.host}:{plan.port}",
        "connections": args.connections,
        "workers": len(parts) + len(worker_errors),
        "mode": "messages" if plan.messages else "duration",
        "messages_per_connection": plan.messages or None,
        "duration_s": None if plan.messages else args.duration,
        "warmup_s": args.warmup,
        "payload_bytes": args.actual_size,
        "rate_limit": args.rate or None,
        # CLOCK_MONOTONIC is system-wide: other processes can place their own
        # timestamps inside the measured window.
        "window_monotonic_s": [plan.measure_start_ns / NS,
                               (plan.measure_end_ns or max(
                                   (s.last_measured_ns for s in parts), default=0)) / NS],
        "window_s": round(window, 4),
        "msgs_per_s": round(tot.measured_ok / window, 1) if window > 0 else 0.0,
        "latency_ms": {
            "p50": _pct(lat, 50), "p90": _pct(lat, 90), "p99": _pct(lat, 99),
            "max": lat[-1] / 1e6 if lat else None,
            "mean": (sum(lat) / len(lat) / 1e6) if lat else None,
        },
        "measured": {"ok": tot.measured_ok, "not_ok": tot.measured_nak},
        "totals": {
            "sent": tot.sent, "answered": tot.answered, "ok": ok_total,
            "aa": codes.get("AA", 0), "codes": codes,
        },
        "errors": {
            "total": errors, "nak": nak_total, "mismatch": tot.mismatches,
            "malformed": tot.malformed, "unexpected": tot.unexpected,
            "timeout": tot.timeouts, "connection": tot.conn_errors,
            "connect_failed": tot.connect_failures, "worker": worker_errors,
        },
        "cpu": {
            "loadgen_s": round(tot.cpu_s, 3),
            "loadgen_pct_of_core": round(100 * tot.cpu_s / cpu_window, 1) if cpu_window else None,
            "server_pid": plan.server_pid or None,
            "server_s": None if srv is None else round(srv, 3),
            "server_pct_of_core": None if srv is None else round(100 * srv / cpu_window, 1),
        },
    }


def human_line(r: dict[str, Any]) -> str:
    """One-line summary of a report."""
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"
    lat, e, cpu = r["latency_ms"], r["errors"], r["cpu"]
    srv = "" if cpu["server_pct_of_core"] is None else f", server CPU {cpu['server_pct_of_core']}%"
    rate = f" rate={r['rate_limit']:g}/s" if r.get("rate_limit") else ""
    return (
        f"{r['target']} conns={r['connections']} workers={r['workers']}{rate}: "
        f"{r['msgs_per_s']:.0f} msg/s over {r['window_s']:.2f}s, "
        f"latency ms p50 {ms(lat['p50'])} p90 {ms(lat['p90'])} p99 {ms(lat['p99'])} "
        f"max {ms(lat['max'])}; ok {r['totals']['ok']}/{r['totals']['sent']}, "
        f"errors {e['total']} (nak {e['nak']}, mismatch {e['mismatch']}, "
        f"timeout {e['timeout']}, conn {e['connection'] + e['connect_failed']}); "
        f"loadgen CPU {cpu['loadgen_pct_of_core']}%{srv}"
    )


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1", choices=ALLOWED_HOSTS)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--connections", "-c", type=int, default=64)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--messages", "-n", type=int, default=0,
                   help="messages per connection (after warmup)")
    g.add_argument("--duration", "-d", type=float, default=None,
                   help="measured seconds (default 10 unless --messages)")
    p.add_argument("--size", type=int, default=1024, help="HL7 payload bytes")
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds first")
    p.add_argument("--workers", default="1",
                   help="worker processes, or 'auto' (2 if >=2 connections and >=2 CPUs)")
    p.add_argument("--ack-timeout", type=float, default=10.0)
    p.add_argument("--connect-timeout", type=float, default=10.0)
    p.add_argument("--max-time", type=float, default=600.0,
                   help="hard cap on the whole run in seconds")
    p.add_argument("--rate", type=float, default=0.0,
                   help="offered load in messages/s across all connections (0 = no limit: "
                        "each connection sends its next message when the ACK arrives)")
    p.add_argument("--server-pid", type=int, default=0,
                   help="also report this process's CPU over the window")
    p.add_argument("--json-out", default=None, help="also write the JSON report here")
    p.add_argument("--samples", default="",
                   help="write ACK latency per interval as JSON lines to PATH.<worker>")
    p.add_argument("--sample-interval", type=float, default=5.0,
                   help="seconds per --samples line")
    args = p.parse_args(argv)
    if args.messages < 0 or args.connections < 1 or not 0 < args.port < 65536:
        p.error("bad --messages/--connections/--port")
    if args.messages and args.messages > MAX_SEQ:
        p.error("--messages too large")
    if not args.messages and args.duration is None:
        args.duration = 10.0
    if args.duration is not None and not 0 < args.duration <= 3600:
        p.error("--duration must be in (0, 3600]")
    if not 0 <= args.rate <= 10_000_000:
        p.error("--rate must be 0 (no limit) or a positive messages/s")
    if not 0 <= args.warmup <= 600 or args.connections > 10000:
        p.error("bad --warmup/--connections")
    if args.workers == "auto":
        args.workers = 2 if args.connections >= 2 and (os.cpu_count() or 1) >= 2 else 1
    else:
        args.workers = max(1, min(int(args.workers), args.connections, 16))
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns 0 if no errors, 2 otherwise."""
    args = parse_args(argv)
    now = time.monotonic_ns()
    start = now + int((0.3 + 0.01 * args.connections / args.workers) * NS)
    m_start = start + int(args.warmup * NS)
    m_end = 0 if args.messages else m_start + int(args.duration * NS)
    run_cap = args.max_time if args.messages else min(args.max_time, args.warmup + args.duration)
    hard = start + int(run_cap * NS) + (0 if args.messages else int(args.ack_timeout * NS))
    plan = Plan(
        host=args.host, port=args.port, tag=random_tag(), size=args.size,
        messages=args.messages, start_ns=start, measure_start_ns=m_start,
        measure_end_ns=m_end, hard_deadline_ns=hard,
        ack_timeout_ns=int(args.ack_timeout * NS),
        connect_timeout=args.connect_timeout, server_pid=args.server_pid,
        rate=args.rate / args.workers,
        samples=args.samples, sample_interval_ns=int(args.sample_interval * NS),
    )
    head, tail = build_template(args.size, "20250101120000")
    args.actual_size = len(head) + CTRL_ID_LEN + len(tail)
    shards = [list(range(w, args.connections, args.workers)) for w in range(args.workers)]
    parts: list[Stats] = []
    worker_errors: list[str] = []
    if args.workers == 1:
        parts.append(run_worker(plan, 0, shards[0]))
    else:
        ctx = multiprocessing.get_context("fork")
        procs = []
        for w, ids in enumerate(shards):
            rx, tx = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_worker_entry, args=(plan, w, ids, tx), daemon=True)
            proc.start()
            tx.close()
            procs.append((proc, rx))
        wait_s = (hard - time.monotonic_ns()) / NS + args.ack_timeout + 30
        for proc, rx in procs:
            res: Stats | str
            if rx.poll(max(wait_s, 1.0)):
                try:
                    res = rx.recv()
                except EOFError:
                    res = "worker exited without a result"
            else:
                res = "worker timed out"
            if isinstance(res, Stats):
                parts.append(res)
            else:
                worker_errors.append(res)
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
    report = summarize(args, plan, parts, worker_errors)
    text = json.dumps(report, indent=None)
    print(text, flush=True)
    if args.json_out:
        with open(args.json_out, "w") as f:
            f.write(json.dumps(report, indent=2) + "\n")
    print(human_line(report), file=sys.stderr, flush=True)
    return 0 if report["errors"]["total"] == 0 else 2


if __name__ == "__main__":
    sys.exit(main())
