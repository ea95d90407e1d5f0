"""One stored message at a time: what a commit costs mllpd's SQLite outbox
against the shared reference's one-row commit, on the same thread machinery.

At one connection every message is its own commit, so this is where the
receive ratio at 1 connection goes. Three ways, each in a fresh directory,
the same 1 KB payload, N sequential commits after a warm-up long enough for
the WAL to be reused:

- ``reference``: ``deferToThread`` of BEGIN, one INSERT into a 4-column
  table, COMMIT (what ``ref_group_commit.py --store group`` does per batch);
- ``outbox write``: ``deferToThreadPool`` of the outbox's own ``_write`` for
  one envelope (dedup probe, the message row with its audit fields, WAL
  guard);
- ``outbox store``: ``SQLiteOutbox.store`` (the group-commit path the
  receiver uses).

Prints per commit: wall time, the time inside the thread, and user and
system CPU of the whole process.

    python bench/store_path.py [--commits 8000] [--warmup 3000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from twisted.internet import defer, reactor  # noqa: E402
from twisted.internet.threads import deferToThread, deferToThreadPool  # noqa: E402

from mllpd.outbox import Envelope  # noqa: E402
from mllpd.outbox.sqlite import SQLiteOutbox  # noqa: E402

PAYLOAD = b"MSH|^~\\&|SENDER|HOSP|MLLPD|HOSP|20240101120000||ADT^A01|X|P|2.5\r" + (
    b"PID|1||123456^^^HOSP^MR||DOE^JOHN||19700101|M\r" * 20
)[:960]


def envelope(i: int) -> Envelope:
    return Envelope(
        message_id=f"{i:032x}", received_at=time.time(), peer="127.0.0.1:40000",
        control_id=f"C{i}", msg_type="ADT^A01", sending_app="SENDER", sending_fac="HOSP",
        version="2.5", charset=None, ack_code="AA", payload=PAYLOAD,
        sha256=hashlib.sha256(PAYLOAD + str(i).encode()).hexdigest(),
    )


class Timed:
    """A function whose calls (on any thread) are timed."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn, self.spent = fn, 0.0

    def __call__(self, *args: Any) -> Any:
        t = time.perf_counter()
        try:
            return self.fn(*args)
        finally:
            self.spent += time.perf_counter() - t


async def measure(name: str, commit: Callable[[int], defer.Deferred[Any]], inner: Timed,
                  commits: int, warmup: int) -> dict[str, float]:
    for i in range(warmup):
        await commit(i)
    inner.spent = 0.0
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for i in range(warmup, warmup + commits):
        await commit(i)
    r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    per = 1e6 / commits
    return {
        "way": name, "wall": (t1 - t0) * per, "inner": inner.spent * per,
        "user": (r1.ru_utime - r0.ru_utime) * per, "sys": (r1.ru_stime - r0.ru_stime) * per,
    }


async def reference(directory: str, commits: int, warmup: int) -> dict[str, float]:
    db = sqlite3.connect(os.path.join(directory, "ref.db"), isolation_level=None,
                         check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE messages (id INTEGER PRIMARY KEY, ctrl TEXT, received_at REAL, body BLOB)")

    def write(i: int) -> None:
        db.execute("BEGIN")
        db.executemany("INSERT INTO messages (ctrl, received_at, body) VALUES (?, ?, ?)",
                       [(f"C{i}", time.time(), PAYLOAD)])
        db.execute("COMMIT")

    inner = Timed(write)
    try:
        return await measure("reference", lambda i: deferToThread(inner, i), inner, commits, warmup)
    finally:
        db.close()


async def outbox(directory: str, commits: int, warmup: int, store: bool) -> dict[str, float]:
    box = SQLiteOutbox(os.path.join(directory, "outbox.db"), reactor)
    box.start()
    inner = Timed(box._write)
    box._write = inner  # type: ignore[method-assign]
    try:
        if store:
            return await measure("outbox store", lambda i: box.store(envelope(i)), inner,
                                 commits, warmup)
        return await measure(
            "outbox write",
            lambda i: deferToThreadPool(reactor, box._pool, inner, [envelope(i)], [], []),
            inner, commits, warmup,
        )
    finally:
        await box.close()


async def main(args: argparse.Namespace) -> None:
    rows = []
    for _ in range(args.repeat):
        for way in ("reference", "outbox write", "outbox store"):
            with tempfile.TemporaryDirectory() as d:
                if way == "reference":
                    rows.append(await reference(d, args.commits, args.warmup))
                else:
                    rows.append(await outbox(d, args.commits, args.warmup, way == "outbox store"))
    print("| way | wall us | in the thread us | user CPU us | system CPU us |")
    print("|---|---|---|---|---|")
    for way in ("reference", "outbox write", "outbox store"):
        mine = sorted((r for r in rows if r["way"] == way), key=lambda r: r["wall"])
        r = mine[len(mine) // 2]  # the median run by wall time
        print(f"| {way} | {r['wall']:.0f} | {r['inner']:.0f} | {r['user']:.0f} | {r['sys']:.0f} |")


def run() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--commits", type=int, default=8000)
    p.add_argument("--warmup", type=int, default=3000)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()

    def go() -> None:
        d = defer.Deferred.fromCoroutine(main(args))
        d.addErrback(lambda f: (f.printTraceback(), None))
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(go)
    reactor.run()


if __name__ == "__main__":
    run()
