"""Rows in a real outbox file for the mllp-cli tests.

Messages and queue rows are written with plain SQL in the server's schema,
as the server's routing writes them: a messages row, then one deliveries row
per connector.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import shutil
import sqlite3
import tempfile
from typing import Any, Protocol

from mllpd.outbox import dedup_key
from mllpd.outbox.sqlite import open_database
from tests.serverproc import hl7_message

__all__ = ["add_delivery", "add_message", "connect", "new_outbox"]

_ids = itertools.count(1)


class _Cleanups(Protocol):
    def addCleanup(self, f: Any, *args: Any, **kwargs: Any) -> None: ...


def new_outbox(case: _Cleanups) -> str:
    """A migrated, empty outbox file in a temp dir removed after the test."""
    folder = tempfile.mkdtemp(prefix="mllpd-cli-")
    case.addCleanup(shutil.rmtree, folder, True)
    path = os.path.join(folder, "outbox.db")
    open_database(path).close()
    return path


def connect(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=10.0, isolation_level=None)
    conn.execute("PRAGMA foreign_keys = ON")
    return conn


def add_message(
    conn: sqlite3.Connection,
    control_id: str,
    *,
    received_at: float,
    payload: bytes | None = None,
    charset: str | None = None,
    msg_type: str = "ADT^A01",
    version: str = "2.5",
    batch_control_id: str | None = None,
    batch_position: int | None = None,
) -> str:
    """Store one message row; returns its message id."""
    body = payload if payload is not None else hl7_message(control_id)
    message_id = f"{int(received_at * 1e9):016x}{next(_ids):016x}"
    sha = hashlib.sha256(body).hexdigest()
    conn.execute(
        "INSERT INTO messages (message_id, received_at, peer, control_id, msg_type,"
        " sending_app, sending_fac, version, charset, size, sha256, ack_code, dedup_key,"
        " payload, batch_control_id, batch_position)"
        " VALUES (?, ?, '127.0.0.1:40000', ?, ?, 'TESTAPP', 'TESTFAC', ?, ?, ?, ?, 'AA', ?, ?,"
        " ?, ?)",
        (message_id, received_at, control_id, msg_type, version, charset, len(body),
         sha, dedup_key(sha), body, batch_control_id, batch_position),
    )
    return message_id


def add_delivery(
    conn: sqlite3.Connection,
    message_id: str,
    connector: str,
    state: str = "pending",
    *,
    updated_at: float,
    attempts: int = 0,
    last_error: str | None = None,
) -> int:
    """Queue a message for a connector in a state; returns the row's seq."""
    cursor = conn.execute(
        "INSERT INTO deliveries (message_id, connector, state, attempts, last_error,"
        " next_attempt, updated_at) VALUES (?, ?, ?, ?, ?, 0, ?)",
        (message_id, connector, state, attempts, last_error, updated_at),
    )
    assert cursor.lastrowid is not None
    return cursor.lastrowid
