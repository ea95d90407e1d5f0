"""Connectors run in a child process, so delivery uses a second core.

With ``MLLP_CONNECTOR_PROCESS=true`` the server keeps its relay (queues,
lanes, retries, dead letters: every state change in the outbox) and hands
each delivery's upstream I/O (the HTTP request, the MLLP round trip, the
PostgreSQL insert) to one child process, ``python -m
mllpd.connectors.remote``. The child builds the same connectors from the
same MLLP_CONFIG and environment, answers each delivery with its outcome,
and writes its log lines straight to the server's stdout.

Between the two, over the child's stdin (requests) and its fd 3 (answers),
each frame is a 4-byte length, a JSON header line and the payloads it
lists, concatenated. Nothing is stored in the child: a delivery it has not
answered when it dies is answered Retry, so its row is delivered again
(same message id), as after a restart of the whole server. The server
starts the child again after a pause that doubles up to 30 s.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from twisted.internet import protocol
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorProcess, IReactorTime
from twisted.logger import Logger
from twisted.protocols.basic import Int32StringReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from mllpd.connectors import (
    Dead,
    Delivered,
    Delivery,
    IBatchConnector,
    IConnector,
    Outcome,
    Retry,
)

if TYPE_CHECKING:
    from mllpd.config import Settings

log = Logger()

# Largest frame either side accepts: a batch of deliveries is bounded by
# MLLP_MAX_FRAME_SIZE (2 MiB by default), well under this.
MAX_FRAME = 256 * 1024 * 1024
# Pauses before starting a child that exited, doubling.
RESTART_FIRST, RESTART_MAX = 1.0, 30.0
# How long a stopping child may take to finish and exit before SIGKILL.
EXIT_TIMEOUT = 10.0
# The child's fd for answers (stdin carries requests, stdout and stderr
# are the server's own).
ANSWER_FD = 3


def encode(header: dict[str, Any], payloads: Sequence[bytes] = ()) -> bytes:
    """One frame's body: the header as a JSON line, then the payloads."""
    return b"".join([json.dumps(header, separators=(",", ":")).encode(), b"\n", *payloads])


def decode(body: bytes) -> tuple[dict[str, Any], bytes]:
    """A frame's header and the bytes after it."""
    line, _, rest = body.partition(b"\n")
    header = json.loads(line)
    if not isinstance(header, dict):
        raise ValueError("frame header is not an object")
    return header, rest


def pack_deliveries(deliveries: Sequence[Delivery]) -> tuple[list[list[Any]], list[bytes]]:
    items = [
        [d.message_id, d.connector, d.charset, d.codec, d.control_id, d.msg_type,
         d.attempt, d.received_at, len(d.payload)]
        for d in deliveries
    ]
    return items, [d.payload for d in deliveries]


def unpack_deliveries(items: list[list[Any]], data: bytes) -> list[Delivery]:
    out, at = [], 0
    for message_id, connector, charset, codec, control_id, msg_type, attempt, received_at, size in items:
        payload = data[at:at + size]
        at += size
        out.append(Delivery(message_id, connector, payload, charset, codec, control_id,
                            msg_type, attempt, received_at))
    if at != len(data):
        raise ValueError("payload bytes do not match the frame header")
    return out


def pack_outcome(outcome: Outcome) -> list[Any]:
    if isinstance(outcome, Delivered):
        return ["delivered", outcome.detail]
    if isinstance(outcome, Dead):
        return ["dead", outcome.reason]
    return ["retry", outcome.reason, outcome.after]


def unpack_outcome(item: list[Any]) -> Outcome:
    kind = item[0]
    if kind == "delivered":
        return Delivered(item[1])
    if kind == "dead":
        return Dead(item[1])
    return Retry(item[1], item[2])


class _Frames(Int32StringReceiver):
    """Length-prefixed frames over one pipe each way."""

    MAX_LENGTH = MAX_FRAME

    def __init__(self, on_frame: Callable[[bytes], None]) -> None:
        self._on_frame = on_frame

    def stringReceived(self, string: bytes) -> None:
        self._on_frame(string)

    def lengthLimitExceeded(self, length: int) -> None:
        log.error("connector process sent a {size}-byte frame; closing",
                  event="connector_process_bad_frame", size=length)
        if self.transport is not None:
            self.transport.loseConnection()


class _ChildWriter:
    """The transport _Frames writes through: the child's stdin."""

    def __init__(self, process: Any) -> None:
        self._process = process

    def write(self, data: bytes) -> None:
        self._process.writeToChild(0, data)

    def loseConnection(self) -> None:
        self._process.signalProcess("KILL")


class _ChildProtocol(protocol.ProcessProtocol):
    def __init__(self, owner: ConnectorProcess) -> None:
        self.owner = owner
        self.frames = _Frames(owner._answer)

    def connectionMade(self) -> None:
        self.frames.makeConnection(_ChildWriter(self.transport))  # type: ignore[arg-type]

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == ANSWER_FD:
            self.frames.dataReceived(data)

    def processEnded(self, reason: Failure) -> None:
        self.owner._ended(self, reason)


class ConnectorProcess:
    """The child process and the deliveries waiting for its answers.

    Started by the first of its connectors to start, told to finish by the
    last to stop.
    """

    def __init__(
        self,
        reactor: Any,
        *,
        argv: Sequence[str] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.reactor: IReactorProcess & IReactorTime = reactor  # type: ignore[valid-type]
        self.argv = list(argv or [sys.executable, "-m", "mllpd.connectors.remote"])
        self.env = dict(env if env is not None else os.environ)
        self._proto: _ChildProtocol | None = None
        self._pending: dict[int, tuple[Deferred[list[Outcome]], int]] = {}
        self._next_id = 1
        self._started: set[str] = set()
        self._stopping: dict[str, Deferred[None]] = {}
        self._running = False
        self._pause = RESTART_FIRST
        self._restart: IDelayedCall | None = None
        self._kill: IDelayedCall | None = None
        self._exited: Deferred[None] | None = None
        self.starts = 0

    # -- connectors' side -------------------------------------------------

    def connector_started(self, name: str) -> None:
        self._started.add(name)
        if not self._running:
            self._running = True
            self._spawn()

    def connector_stopped(self, name: str) -> Deferred[None]:
        """The relay is done with ``name``: the child stops it (letting a
        delivery in progress finish); with the last one, the child exits."""
        self._started.discard(name)
        d: Deferred[None] = self._request({"op": "stop", "connector": name}).addBoth(lambda _: None)
        if not self._started:
            d.addCallback(lambda _: self._finish())
        return d

    def deliver(self, name: str, deliveries: Sequence[Delivery], batch: str | None) -> Deferred[list[Outcome]]:
        items, payloads = pack_deliveries(deliveries)
        header = {"op": "deliver", "connector": name, "batch": batch, "items": items}
        d = self._request(header, payloads, len(deliveries))
        return d

    # -- the child ----------------------------------------------------------

    def _spawn(self) -> None:
        self._restart = None
        proto = _ChildProtocol(self)
        self._proto = proto
        self._exited = Deferred()
        self.starts += 1
        self.reactor.spawnProcess(
            proto, self.argv[0], self.argv, env=self.env,
            childFDs={0: "w", 1: 1, 2: 2, ANSWER_FD: "r"},
        )
        log.info("connector process {pid} started", event="connector_process_started",
                 pid=getattr(proto.transport, "pid", None))
        # Connectors started before a restart start again in the new child.
        for name in sorted(self._started):
            self._send({"op": "start", "connector": name})

    def _request(self, header: dict[str, Any], payloads: Sequence[bytes] = (),
                 count: int = 0) -> Deferred[list[Outcome]]:
        if self._proto is None:
            return succeed([Retry("connector process not running")] * count)
        rid = self._next_id
        self._next_id += 1
        d: Deferred[list[Outcome]] = Deferred()
        self._pending[rid] = (d, count)
        self._send({**header, "id": rid}, payloads)
        return d

    def _send(self, header: dict[str, Any], payloads: Sequence[bytes] = ()) -> None:
        assert self._proto is not None
        self._proto.frames.sendString(encode(header, payloads))

    def _answer(self, body: bytes) -> None:
        try:
            header, _ = decode(body)
            d, _count = self._pending.pop(header["id"])
            outcomes = [unpack_outcome(o) for o in header.get("outcomes", [])]
        except (ValueError, KeyError, TypeError, IndexError):
            log.error("unreadable answer from the connector process",
                      event="connector_process_bad_frame", size=len(body))
            return
        self._pause = RESTART_FIRST  # it works
        d.callback(outcomes)

    def _ended(self, proto: _ChildProtocol, reason: Failure) -> None:
        if proto is not self._proto:
            return
        self._proto = None
        if self._kill is not None and self._kill.active():
            self._kill.cancel()
        pending, self._pending = self._pending, {}
        for d, count in pending.values():
            d.callback([Retry("connector process exited")] * count)
        exited, self._exited = self._exited, None
        if self._running:
            log.warn("connector process exited ({why}); starting another in {pause}s",
                     event="connector_process_exited", why=reason.getErrorMessage(),
                     pause=self._pause)
            self._restart = self.reactor.callLater(self._pause, self._spawn)
            self._pause = min(self._pause * 2, RESTART_MAX)
        else:
            log.info("connector process exited", event="connector_process_stopped")
        if exited is not None:
            exited.callback(None)

    def _finish(self) -> Deferred[None]:
        """Close the child's stdin: it stops what is left and exits."""
        self._running = False
        if self._restart is not None and self._restart.active():
            self._restart.cancel()
        if self._proto is None or self._exited is None:
            return succeed(None)
        transport = self._proto.transport
        assert transport is not None
        transport.closeStdin()  # type: ignore[attr-defined]
        self._kill = self.reactor.callLater(EXIT_TIMEOUT, transport.signalProcess, "KILL")
        return self._exited


@implementer(IBatchConnector)
class RemoteConnector:
    """One connector as the relay sees it, its deliveries made by the child."""

    def __init__(self, built: IConnector, process: ConnectorProcess) -> None:
        self.name = built.name
        self.process = process
        # Whether it forwards HL7 batches whole, from the one built here to
        # check the configuration.
        self.forward_batches = bool(
            IBatchConnector.providedBy(built) and getattr(built, "forward_batches", False)
        )

    def start(self) -> None:
        self.process.connector_started(self.name)

    def deliver(self, delivery: Delivery) -> Deferred[Outcome]:
        return self.process.deliver(self.name, [delivery], None).addCallback(_first)

    def deliver_batch(self, deliveries: Sequence[Delivery], batch_control_id: str) -> Deferred[list[Outcome]]:
        return self.process.deliver(self.name, deliveries, batch_control_id)

    def stop(self) -> Deferred[None]:
        return self.process.connector_stopped(self.name)


def _first(outcomes: list[Outcome]) -> Outcome:
    return outcomes[0] if outcomes else Retry("no answer from the connector process")


def in_child(
    connectors: Sequence[IConnector], reactor: Any, environ: Mapping[str, str], settings: Settings
) -> list[IConnector]:
    """The connectors the relay uses with MLLP_CONNECTOR_PROCESS on. The
    child reads the same MLLP_CONFIG and log level, given on the command
    line or not."""
    env = {**environ, "LOG_LEVEL": settings.log_level}
    if settings.config:
        env["MLLP_CONFIG"] = settings.config
    process = ConnectorProcess(reactor, env=env)
    return [RemoteConnector(c, process) for c in connectors]


# -- the child ---------------------------------------------------------------


class _Server(Int32StringReceiver):
    """The child's end: requests on stdin, answers on fd 3."""

    MAX_LENGTH = MAX_FRAME

    def __init__(self, connectors: Mapping[str, IConnector], reactor: Any) -> None:
        self.connectors = dict(connectors)
        self.reactor = reactor
        self.started: set[str] = set()
        self.busy: set[Deferred[Any]] = set()

    def stringReceived(self, string: bytes) -> None:
        header, data = decode(string)
        op, name, rid = header.get("op"), header.get("connector"), header.get("id")
        connector = self.connectors.get(name) if isinstance(name, str) else None
        if connector is None or not isinstance(name, str):
            if rid is not None:
                self._reply(rid, [["dead", f"no connector {name!r} in the connector process"]])
            return
        if op == "start":
            self._start(name, connector)
        elif op == "stop":
            self.started.discard(name)
            connector.stop().addBoth(lambda _: self._reply(rid, []))
        elif op == "deliver":
            self._start(name, connector)
            self._deliver(rid, connector, unpack_deliveries(header["items"], data), header.get("batch"))

    def _deliver(
        self, rid: object, connector: IConnector, deliveries: list[Delivery], batch: str | None
    ) -> None:
        d: Deferred[list[Outcome]]
        if batch is not None and IBatchConnector.providedBy(connector):
            d = connector.deliver_batch(deliveries, batch)  # type: ignore[attr-defined]
        else:
            d = connector.deliver(deliveries[0]).addCallback(lambda outcome: [outcome])
        self.busy.add(d)

        def failed(f: Failure) -> list[Outcome]:
            return [Retry(f"connector failed: {f.getErrorMessage()}")] * len(deliveries)

        def answer(outcomes: list[Outcome]) -> None:
            self.busy.discard(d)
            self._reply(rid, [pack_outcome(o) for o in outcomes])

        d.addErrback(failed).addCallback(answer)

    def _start(self, name: str, connector: IConnector) -> None:
        if name not in self.started:
            self.started.add(name)
            connector.start()

    def _reply(self, rid: Any, outcomes: list[Any]) -> None:
        if self.transport is not None and not self.transport.disconnecting:  # type: ignore[attr-defined]
            self.sendString(encode({"id": rid, "outcomes": outcomes}))

    def lengthLimitExceeded(self, length: int) -> None:
        log.error("connector process got a {size}-byte frame; exiting",
                  event="connector_process_bad_frame", size=length)
        self.transport.loseConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        # The server closed our stdin (or died): finish and exit.
        from twisted.internet.defer import DeferredList

        stops = [c.stop() for n, c in self.connectors.items() if n in self.started]
        DeferredList([*self.busy, *stops], consumeErrors=True).addBoth(
            lambda _: self.reactor.stop()
        )


def main() -> None:
    """``python -m mllpd.connectors.remote``: the child's entry point."""
    from twisted.internet import reactor
    from twisted.internet.stdio import StandardIO
    from twisted.logger import globalLogBeginner

    from mllpd.config import ConfigError, load_settings
    from mllpd.connectors import build_connector
    from mllpd.logging import json_observer
    from mllpd.pipeline import load_pipeline_config

    settings = load_settings(os.environ, {})
    globalLogBeginner.beginLoggingTo(
        [json_observer(level=settings.log_level, pod=settings.pod_name,
                       namespace=settings.pod_namespace)],
        redirectStandardIO=False,
    )
    if not settings.config:
        raise SystemExit("mllpd connector process: MLLP_CONFIG is not set")
    try:
        pipeline = load_pipeline_config(settings.config, os.environ)
        connectors = {
            spec.name: build_connector(spec, reactor, os.environ) for spec in pipeline.connectors
        }
    except ConfigError as e:
        raise SystemExit(f"mllpd connector process: {e}") from None
    StandardIO(  # type: ignore[call-arg]  # the POSIX one takes fds
        _Server(connectors, reactor), stdin=0, stdout=ANSWER_FD, reactor=reactor
    )
    # The server decides when this process ends (it closes our stdin): a
    # SIGINT or SIGTERM sent to the whole process group must not cut the
    # deliveries in progress short.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    reactor.run(installSignalHandlers=False)  # type: ignore[call-arg]


if __name__ == "__main__":
    main()
