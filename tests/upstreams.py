"""Upstreams for the real server's connectors, run by the test process.

``HTTPUpstream`` is a small HTTP server on 127.0.0.1 (port 0) on a thread of
its own, so it serves while a SynchronousTestCase blocks: it records every
POST and answers with ``status``, which the test may change at any time.
``refusing_port`` gives a port where nothing listens, for a connector whose
upstream is down. ``write_config`` writes the MLLP_CONFIG file, and
``wait_until`` polls (the outbox file, say) with a deadline; ``until`` is
the same poll for asynchronous tests, letting the event loop run between tries.
"""

from __future__ import annotations

import inspect
import socket
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol, TypeVar, cast

import yaml

from tests.serverproc import LOOPBACK

__all__ = ["HTTPUpstream", "Received", "refusing_port", "until", "wait_until", "write_config"]

T = TypeVar("T")

# Connectors retry quickly in these tests; a down upstream keeps its
# messages pending (attempts never run out within a test).
FAST_RETRY = {"initial": "100ms", "max": "500ms", "max_attempts": 100_000}
POLL_STEP = 0.02


class _Cleanups(Protocol):
    def addCleanup(self, f: Any, *args: Any, **kwargs: Any) -> None: ...


@dataclass(frozen=True)
class Received:
    """One POST as the upstream saw it, and the status it answered."""

    message_id: str | None
    content_type: str | None
    body: bytes
    status: int


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        # The server process is killed at the end of a test, resetting its
        # kept-alive connections: not worth a traceback. Anything else is.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class HTTPUpstream:
    """Records POSTs and answers each with the current ``status``."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        # Cleared: requests are recorded, then their answer waits until set.
        self.answering = threading.Event()
        self.answering.set()
        self._lock = threading.Lock()
        self._received: list[Received] = []
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the connector's pool expects
            timeout = 30  # an idle kept-alive connection ends its thread in time

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                with upstream._lock:
                    status = upstream.status
                    upstream._received.append(Received(
                        self.headers.get("X-MLLP-Message-Id"),
                        self.headers.get("Content-Type"), body, status,
                    ))
                upstream.answering.wait(30)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass  # stderr noise in test output

        self._server = _Server((LOOPBACK, 0), Handler)
        self.port: int = self._server.server_address[1]
        self.url = f"http://{LOOPBACK}:{self.port}/hl7"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
            name=f"http-upstream-{self.port}", daemon=True,
        )

    @classmethod
    def start(cls, case: _Cleanups, status: int = 200) -> HTTPUpstream:
        """A serving upstream, shut down when the test ends."""
        upstream = cls(status)
        upstream._thread.start()
        case.addCleanup(upstream.stop)
        return upstream

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)

    @property
    def received(self) -> list[Received]:
        with self._lock:
            return list(self._received)


def refusing_port(case: _Cleanups) -> int:
    """A port on 127.0.0.1 that refuses connections until the test ends.

    The socket is bound but never listens: connecting gets a reset at once,
    and no other process can take the port meanwhile.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    case.addCleanup(sock.close)
    sock.bind((LOOPBACK, 0))
    port: int = sock.getsockname()[1]
    return port


def write_config(path: str, connectors: list[dict[str, Any]]) -> str:
    """An MLLP_CONFIG file with these connectors and FAST_RETRY; returns path."""
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump({"connectors": connectors, "retry": FAST_RETRY}, f)
    return path


async def until(
    probe: Callable[[], T | Awaitable[T]],
    done: Callable[[T], bool] = bool,
    *,
    timeout: float = 30.0,
    what: str | Callable[[], object] = "the condition",
    pause: Callable[[float], Awaitable[object]] | None = None,
) -> T:
    """The suite's one poll: call ``probe`` (awaiting what it returns, if
    awaitable) until ``done`` holds for its result; returns that result.
    Fails after ``timeout`` seconds naming ``what`` (or what it returns)
    and the last result. Between tries it awaits ``pause(POLL_STEP)``: by
    default the Twisted reactor runs meanwhile; an asyncio test passes its
    own."""
    wait = pause or _reactor_pause
    deadline = time.monotonic() + timeout
    last: T | None = None
    for _ in range(int(timeout / POLL_STEP) + 100):
        value = probe()
        last = await value if inspect.isawaitable(value) else value
        if done(last):
            return last
        if time.monotonic() >= deadline:
            break
        await wait(POLL_STEP)
    name = what if isinstance(what, str) else what()
    raise AssertionError(f"{name} not reached within {timeout}s; last: {last!r:.500}")


def wait_until(
    probe: Callable[[], T],
    done: Callable[[T], bool] = bool,
    *,
    timeout: float = 30.0,
    what: str | Callable[[], object] = "the condition",
) -> T:
    """:func:`until` for synchronous tests: it sleeps between tries."""
    poll = until(probe, done, timeout=timeout, what=what, pause=_sleep)
    try:
        poll.send(None)  # never suspends: runs the poll to its end
    except StopIteration as stop:
        return cast(T, stop.value)
    poll.close()
    raise AssertionError("wait_until's probe must not return an awaitable that suspends")


async def _sleep(seconds: float) -> None:
    time.sleep(seconds)


def _reactor_pause(seconds: float) -> Awaitable[object]:
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    return deferLater(reactor, seconds)
