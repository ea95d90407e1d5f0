"""Keeping the SQLite outbox's write-ahead log bounded.

SQLite restarts its WAL (writes from the top again) only when a writer
starts a transaction while every frame has been checkpointed and no reader
uses the log. The outbox's writer is in a transaction almost all the time
under steady traffic, and a background checkpoint copies only the frames
that existed when it began, so the WAL never became fully checkpointed
between two commits and grew by every commit's pages, forever (3 GB in
90 s at 1,000 msgs/s).

So two parts:

* a PASSIVE checkpoint on a connection and thread of its own, every
  CHECKPOINT_INTERVAL: it copies most of the log into the database file
  without ever blocking the writer, and reports how big the log is;
* once the log holds a quarter of MLLP_WAL_LIMIT, the writer itself runs a
  RESTART checkpoint between two transactions, where no new frames can
  arrive. The background checkpoint has already copied nearly everything,
  so this only copies the last few commits' pages; then the next commit
  starts the log from the top, and ``journal_size_limit`` trims the file.

The background checkpoint says when the log passed its quarter. So that a
slow one (a large database on a slow disk) cannot let the log run on
meanwhile, the writer also looks at the -wal file's size before each
transaction (a stat, about 2 us beside a commit's 250 us or more):
``journal_size_limit`` trims the file to the quarter at every restart, so
a file larger than that holds more log than that.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import NamedTuple

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

__all__ = ["CHECKPOINT_INTERVAL", "DEFAULT_WAL_LIMIT", "WalGuard", "restart_threshold"]

log = Logger(namespace="mllpd.outbox")

# Seconds between background PASSIVE checkpoints.
CHECKPOINT_INTERVAL = 0.25
DEFAULT_WAL_LIMIT = 64 * 1024 * 1024
# A restart checkpoint waits at most this long (ms) for readers to leave the
# log; after that it is tried again after the next background checkpoint,
# rather than hold the writer (and the ACKs waiting on it) any longer.
RESTART_BUSY_MS = 20
# Seconds before the writer asks again after its first busy restart.
BUSY_RETRY_FIRST = 0.01
# The writer's usual busy timeout (ms), restored after a restart checkpoint.
WRITER_BUSY_MS = 5000
# WAL frame header: 24 bytes before each page.
_FRAME_HEADER = 24


def restart_threshold(limit: int) -> int:
    """Log bytes at which the writer restarts the WAL: a quarter of the
    limit, so the file stays far below it between two background checks
    even at full receive speed."""
    return max(limit // 4, 1024 * 1024)


class Checkpoint(NamedTuple):
    """What one checkpoint did (mode: passive or restart; result: ok, busy
    or failed), with the log size it saw, in frames."""

    mode: str
    result: str
    frames: int
    seconds: float


class WalGuard:
    """Background checkpoints, restarts by the writer, and the WAL's figures.

    ``wal_bytes`` (frames in the log as of the last checkpoint),
    ``file_bytes`` (the -wal file's size), ``written_bytes`` (WAL bytes
    written since start, counted at each checkpoint) and ``checkpoints``
    (by mode and result) are read by the metrics.
    """

    def __init__(
        self,
        path: str,
        reactor: IReactorThreads,
        *,
        limit: int = DEFAULT_WAL_LIMIT,
        interval: float = CHECKPOINT_INTERVAL,
    ) -> None:
        self.path = path
        self.limit = limit
        self.restart_at = restart_threshold(limit)
        self._reactor = reactor
        self._wal_path = path + "-wal"
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        page = int(self._conn.execute("PRAGMA page_size").fetchone()[0])
        self.frame_bytes = page + _FRAME_HEADER
        self._interval = interval
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name="mllpd-checkpoint")
        self._loop = LoopingCall(self.run)
        self._loop.clock = reactor  # type: ignore[assignment]
        # Frame accounting across the two threads that checkpoint.
        self._lock = threading.Lock()
        self._seen = 0  # frames in the current log as last observed
        self._written = 0  # frames written since start
        # After a restart checkpoint the log keeps its old frame count until
        # the next commit starts it over: a look in between is not news.
        self._stale: int | None = None
        # Set (reactor thread) when the log passed restart_at; read and
        # cleared by the writer thread before its next transaction.
        self.restart_wanted = False
        # After a busy restart (a reader was in the log) the writer's own look
        # waits a while before it asks again: 10 ms, doubling up to
        # CHECKPOINT_INTERVAL, so a reader that holds the log for long costs
        # the writer at most RESTART_BUSY_MS per CHECKPOINT_INTERVAL.
        self._look_after = 0.0
        self._busy_backoff = 0.0
        # Set while a background checkpoint runs: SQLite runs one checkpoint
        # at a time, so the writer does not try a restart meanwhile (it would
        # only wait RESTART_BUSY_MS and give up); the one running asks after.
        self.checkpointing = False
        self.wal_bytes = 0
        self.file_bytes = 0
        self.checkpoints: Counter[tuple[str, str]] = Counter()
        self.over_limit = False
        # Told every Checkpoint, on the reactor thread: metrics.
        self.observer: Callable[[Checkpoint], None] | None = None

    @property
    def written_bytes(self) -> int:
        return self._written * self.frame_bytes

    def start(self) -> None:
        self._pool.start()
        self._loop.start(self._interval, now=False)

    def stop(self) -> Deferred[None]:
        """Stop the timer; close after a checkpoint in progress (same thread)."""
        if self._loop.running:
            self._loop.stop()
        if not self._pool.started:
            self._conn.close()
            return succeed(None)
        d = deferToThreadPool(self._reactor, self._pool, self._conn.close)
        return d.addBoth(lambda _: self._pool.stop())

    def _observe(self, frames: int, restarted: bool = False) -> None:
        with self._lock:
            if self._stale is not None:
                if frames == self._stale and not restarted:
                    return
                self._stale = None
            if frames >= self._seen:
                self._written += frames - self._seen
            else:
                # The log restarted without us (idle moments do that): what
                # the old one got after our last look is not counted.
                self._written += frames
            self._seen = 0 if restarted else frames
            if restarted:
                self._stale = frames

    # -- background (checkpoint thread) ---------------------------------

    def run(self) -> Deferred[None]:
        """One background checkpoint (the timer's job; tests call it)."""
        # LoopingCall waits for this Deferred, so runs never overlap.
        d = deferToThreadPool(self._reactor, self._pool, self._passive)
        done = d.addCallback(self._passive_done)
        return done.addErrback(self._failed)

    def _passive(self) -> tuple[Checkpoint, int]:
        started = time.perf_counter()
        self.checkpointing = True
        try:
            busy, frames, _ = self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        finally:
            self.checkpointing = False
        elapsed = time.perf_counter() - started
        frames = max(frames, 0)  # -1 when the database is not in WAL mode
        self._observe(frames)
        try:
            size = os.stat(self._wal_path).st_size
        except FileNotFoundError:
            size = 0
        return Checkpoint("passive", "busy" if busy else "ok", frames, elapsed), size

    def _passive_done(self, result: tuple[Checkpoint, int]) -> None:
        checkpoint, size = result
        self.wal_bytes = checkpoint.frames * self.frame_bytes
        self.file_bytes = size
        if self.wal_bytes >= self.restart_at:
            self.restart_wanted = True
        self._record(checkpoint)
        if size > self.limit and not self.over_limit:
            self.over_limit = True
            log.warn(
                "outbox WAL file is {size} bytes, past MLLP_WAL_LIMIT ({limit});"
                " a reader may be holding it open",
                event="wal_over_limit", size=size, limit=self.limit,
            )
        elif size <= self.limit and self.over_limit:
            self.over_limit = False
            log.info(
                "outbox WAL file is back under MLLP_WAL_LIMIT: {size} bytes",
                event="wal_under_limit", size=size, limit=self.limit,
            )

    def _record(self, checkpoint: Checkpoint) -> None:
        self.checkpoints[(checkpoint.mode, checkpoint.result)] += 1
        if self.observer is not None:
            self.observer(checkpoint)

    def _failed(self, failure: Failure) -> None:
        self.checkpoints[("passive", "failed")] += 1
        log.warn(
            "outbox checkpoint failed: {reason}", event="checkpoint_failed",
            reason=failure.getErrorMessage(),
        )

    # -- the writer's side (outbox thread) ----------------------------------

    def before_write(self, conn: sqlite3.Connection) -> None:
        """Restart the log if it asked for it, or if the writer finds the file
        past its quarter: called by the writer between transactions, on its
        own thread and connection."""
        if not self.restart_wanted and not self._file_past_threshold():
            return
        self.restart_wanted = False
        started = time.perf_counter()
        result = "failed"
        frames = 0
        try:
            conn.execute(f"PRAGMA busy_timeout = {RESTART_BUSY_MS}")
            try:
                busy, frames, _ = conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
            finally:
                conn.execute(f"PRAGMA busy_timeout = {WRITER_BUSY_MS}")
            frames = max(frames, 0)
            result = "busy" if busy else "ok"
            # Busy: a reader or the background checkpoint held on; ask again
            # after a backoff, or when the next background checkpoint does.
            if busy:
                self._busy_backoff = min(
                    max(self._busy_backoff * 2, BUSY_RETRY_FIRST), self._interval
                )
                self._look_after = time.monotonic() + self._busy_backoff
            else:
                self._busy_backoff = 0.0
            self._observe(frames, restarted=not busy)
        except sqlite3.Error:
            pass  # the commit that follows reports a broken database
        checkpoint = Checkpoint("restart", result, frames, time.perf_counter() - started)
        self._reactor.callFromThread(self._record, checkpoint)

    def _file_past_threshold(self) -> bool:
        """The writer's own look at the -wal file."""
        if self.checkpointing or (self._busy_backoff and time.monotonic() < self._look_after):
            return False
        try:
            return os.stat(self._wal_path).st_size > self.restart_at
        except FileNotFoundError:
            return False
