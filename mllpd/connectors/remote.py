"""Connectors run in a child process, so delivery uses a second core.

With ``MLLP_CONNECTOR_PROCESS=true`` the server keeps its relay (queues,
lanes, retries, dead letters: every state change in the outbox) and hands
each delivery's upstream I/O (the HTTP request, the MLLP round trip, the
PostgreSQL insert) to one child process, ``python -m
mllpd.connectors.remote``. The server sends the child the connectors as it
built them from MLLP_CONFIG at startup (a file changed since is not read
again); the child builds the same connectors with the server's environment,
answers each delivery with its outcome, and writes its log lines straight
to the server's stdout.

Between the two, over the child's stdin (requests) and its fd 3 (answers),
each frame is a 4-byte length, a JSON header line and the payloads it
lists, concatenated. Nothing is stored in the child: a delivery it has not
answered when it dies (or when its answer cannot be read) is answered
Retry, so its row is delivered again (same message id), as after a restart
of the whole server. The server starts the child again after a pause that
doubles up to 30 s; the pause starts again from 1 s once a child has run
that long.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from twisted.internet import protocol
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import LoopingCall
from twisted.logger import ILogFilterPredicate, Logger, PredicateResult
from twisted.protocols.basic import Int32StringReceiver
from twisted.python.failure import Failure
from zope.interface import implementer, provider

from mllpd.connectors import (
    ConnectorSpec,
    Dead,
    Delivered,
    Delivery,
    IBatchConnector,
    IConnector,
    Outcome,
    Retry,
    forwards_batches,
)

log = Logger()

# Largest frame either side sends or accepts. A delivery larger than this
# is answered Retry without being sent (MLLP_MAX_FRAME_SIZE keeps stored
# messages far below it unless raised past it).
MAX_FRAME = 256 * 1024 * 1024
# Pauses before starting a child that exited, doubling; a child that ran
# RESTART_MAX seconds starts the next pause from RESTART_FIRST again.
RESTART_FIRST, RESTART_MAX = 1.0, 30.0
# After its input closes, how long the child lets deliveries in progress
# finish before it exits anyway; the server kills it a little later. Both
# stay inside the relay's CLOSE_TIMEOUT, so shutdown keeps its bound.
CHILD_EXIT_AFTER, KILL_AFTER = 0.3, 0.45
# The server pings the child this often; a child that has not answered a
# ping for PING_DEADLINE (its reactor blocked, the process stopped) is
# killed and replaced, and what it held is retried.
PING_EVERY, PING_DEADLINE = 5.0, 15.0
# The child's fd for answers (stdin carries requests; stdout and stderr
# are the server's own).
ANSWER_FD = 3


class FrameError(ValueError):
    """A frame that does not say what the protocol says it must."""


def encode(header: dict[str, Any], payloads: Sequence[bytes] = ()) -> bytes:
    """One frame's body: the header as a JSON line, then the payloads."""
    return b"".join([json.dumps(header, separators=(",", ":")).encode(), b"\n", *payloads])


def decode(body: bytes) -> tuple[dict[str, Any], bytes]:
    """A frame's header and the bytes after it."""
    line, _, rest = body.partition(b"\n")
    try:
        header = json.loads(line)
    except ValueError as e:
        raise FrameError(f"frame header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise FrameError("frame header is not an object")
    return header, rest


def pack_deliveries(deliveries: Sequence[Delivery]) -> tuple[list[list[Any]], list[bytes]]:
    items = [
        [d.message_id, d.connector, d.charset, d.codec, d.control_id, d.msg_type,
         d.attempt, d.received_at, len(d.payload)]
        for d in deliveries
    ]
    return items, [d.payload for d in deliveries]


def unpack_deliveries(items: object, data: bytes) -> list[Delivery]:
    if not isinstance(items, list) or not items:
        raise FrameError("a delivery frame lists no deliveries")
    out, at = [], 0
    for item in items:
        try:
            message_id, connector, charset, codec, control_id, msg_type, attempt, received_at, size = item
        except (TypeError, ValueError):
            raise FrameError("a delivery entry does not have nine fields") from None
        if not isinstance(size, int) or size < 0 or at + size > len(data):
            raise FrameError("payload sizes do not match the frame")
        out.append(Delivery(message_id, connector, data[at:at + size], charset, codec,
                            control_id, msg_type, attempt, received_at))
        at += size
    if at != len(data):
        raise FrameError("payload sizes do not match the frame")
    return out


def pack_outcome(outcome: Outcome) -> list[Any]:
    if isinstance(outcome, Delivered):
        return ["delivered", outcome.detail]
    if isinstance(outcome, Dead):
        return ["dead", outcome.reason]
    return ["retry", outcome.reason, outcome.after]


def unpack_outcome(item: object) -> Outcome:
    match item:
        case ["delivered", str(detail)]:
            return Delivered(detail)
        case ["dead", str(reason)]:
            return Dead(reason)
        case ["retry", str(reason), None]:
            return Retry(reason)
        case ["retry", str(reason), int(after) | float(after)] if after >= 0:
            return Retry(reason, float(after))
    raise FrameError(f"not an outcome: {str(item)[:80]}")


def spec_to_json(spec: ConnectorSpec) -> dict[str, Any]:
    """A connector as MLLP_CONFIG gave it, for the child to build alike."""
    return spec._asdict()


def spec_from_json(value: Mapping[str, Any]) -> ConnectorSpec:
    return ConnectorSpec(**value)


class _Frames(Int32StringReceiver):
    """Length-prefixed frames over one pipe each way."""

    MAX_LENGTH = MAX_FRAME

    def __init__(self, on_frame: Any, on_too_long: Any) -> None:
        self._on_frame = on_frame
        self._on_too_long = on_too_long

    def stringReceived(self, string: bytes) -> None:
        self._on_frame(string)

    def lengthLimitExceeded(self, length: int) -> None:
        self._on_too_long(length)


class _ChildWriter:
    """What _Frames writes through on the server's side: the child's stdin."""

    def __init__(self, process: Any) -> None:
        self._process = process

    def write(self, data: bytes) -> None:
        self._process.writeToChild(0, data)


class _ChildProtocol(protocol.ProcessProtocol):
    def __init__(self, owner: ConnectorProcess) -> None:
        self.owner = owner
        self.frames = _Frames(self._answer, self._too_long)

    def connectionMade(self) -> None:
        self.frames.makeConnection(_ChildWriter(self.transport))  # type: ignore[arg-type]

    def _answer(self, body: bytes) -> None:
        self.owner._answer(self, body)

    def _too_long(self, size: int) -> None:
        self.owner._broken(self, f"a {size}-byte answer")

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == ANSWER_FD:
            self.frames.dataReceived(data)

    def childConnectionLost(self, childFD: int) -> None:
        if childFD == ANSWER_FD:
            # No answer can come any more: the child is exiting (its end
            # follows), or stuck without its pipe, which a kill settles.
            self.owner._answers_closed(self)

    def processEnded(self, reason: Failure) -> None:
        self.owner._ended(self, reason)

    def kill(self) -> None:
        try:
            if self.transport is not None:
                self.transport.signalProcess("KILL")
        except (ProcessExitedAlready, OSError):
            pass


class ConnectorProcess:
    """The child process and the deliveries waiting for its answers.

    Started by the first of its connectors to start; told to finish, and
    killed if it has not within KILL_AFTER, by the last to stop.
    """

    def __init__(
        self,
        reactor: Any,
        specs: Sequence[ConnectorSpec],
        *,
        argv: Sequence[str] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.reactor = reactor
        self.specs = [spec_to_json(s) for s in specs]
        self.argv = list(argv or [sys.executable, "-m", "mllpd.connectors.remote"])
        self.env = dict(env if env is not None else os.environ)
        self._proto: _ChildProtocol | None = None
        self._pending: dict[int, tuple[Deferred[list[Outcome]], int]] = {}
        self._next_id = 1
        self._started: set[str] = set()
        self._running = False
        self._pause = RESTART_FIRST
        self._spawned_at = 0.0
        self._restart: IDelayedCall | None = None
        self._kill: IDelayedCall | None = None
        self._exited: Deferred[None] | None = None
        self._ping: tuple[int, float] | None = None  # (request id, sent at)
        self._pinger = LoopingCall(self._check_alive)
        self._pinger.clock = reactor

    # -- connectors' side -------------------------------------------------

    def connector_started(self, name: str) -> None:
        self._started.add(name)
        if not self._running:
            self._running = True
            self._spawn()
        elif self._proto is not None:
            self._send({"op": "start", "connector": name})

    def connector_stopped(self, name: str) -> Deferred[None]:
        """The relay is done with ``name``. The child closes it; with the
        last one, the child exits (killed if it takes over KILL_AFTER)."""
        if name not in self._started:
            return succeed(None)
        self._started.discard(name)
        if self._started:
            if self._proto is not None:
                self._send({"op": "stop", "connector": name})
            return succeed(None)
        return self._finish()

    def deliver(self, name: str, deliveries: Sequence[Delivery], batch: str | None) -> Deferred[list[Outcome]]:
        count = len(deliveries)
        if self._proto is None:
            return succeed([Retry("connector process not running")] * count)
        items, payloads = pack_deliveries(deliveries)
        body = encode({"op": "deliver", "connector": name, "batch": batch, "items": items,
                       "id": self._next_id}, payloads)
        if len(body) > MAX_FRAME:
            return succeed([Retry("message too large for the connector process")] * count)
        rid = self._next_id
        self._next_id += 1
        d: Deferred[list[Outcome]] = Deferred()
        self._pending[rid] = (d, count)
        self._proto.frames.sendString(body)
        return d

    # -- the child ----------------------------------------------------------

    def _spawn(self) -> None:
        self._restart = None
        old, self._proto = self._proto, None
        if old is not None:
            # The last child is still on its way out: its answers no longer count.
            old.kill()
            self._drop("connector process replaced")
        proto = _ChildProtocol(self)
        try:
            self.reactor.spawnProcess(
                proto, self.argv[0], self.argv, env=self.env,
                childFDs={0: "w", 1: 1, 2: 2, ANSWER_FD: "r"},
            )
        except OSError as e:
            log.error("cannot start the connector process: {why}",
                      event="connector_process_spawn_failed", why=str(e))
            self._again()
            return
        self._proto = proto
        self._exited = Deferred()
        self._spawned_at = self.reactor.seconds()
        self._ping = None
        if not self._pinger.running:
            self._pinger.start(PING_EVERY, now=False)
        log.info("connector process {pid} started", event="connector_process_started",
                 pid=getattr(proto.transport, "pid", None))
        self._send({"op": "configure", "connectors": self.specs})
        # Connectors started before a restart start again in the new child.
        for name in sorted(self._started):
            self._send({"op": "start", "connector": name})

    def _again(self) -> None:
        if self._running:
            self._restart = self.reactor.callLater(self._pause, self._spawn)
            self._pause = min(self._pause * 2, RESTART_MAX)

    def _send(self, header: dict[str, Any]) -> None:
        assert self._proto is not None
        self._proto.frames.sendString(encode(header))

    def _answer(self, proto: _ChildProtocol, body: bytes) -> None:
        if proto is not self._proto:
            return
        try:
            header, _ = decode(body)
            rid = header.get("id")
            outcomes = [unpack_outcome(o) for o in header.get("outcomes", [])]
        except (FrameError, TypeError):
            self._broken(proto, "an unreadable answer")
            return
        waiting = self._pending.pop(rid, None) if isinstance(rid, int) else None
        if waiting is None:
            return  # not asked (or asked of a child since replaced)
        d, count = waiting
        if len(outcomes) != count:
            outcomes = [Retry("connector process answered the wrong number of outcomes")] * count
        d.callback(outcomes)

    def _broken(self, proto: _ChildProtocol, what: str) -> None:
        """The child can no longer be trusted to answer: kill it; its
        pending deliveries are answered Retry now, and another child starts."""
        if proto is not self._proto:
            return
        log.error("connector process sent {what}; killing it", event="connector_process_broken",
                  what=what)
        self._proto = None
        proto.kill()
        self._drop(f"connector process sent {what}")
        exited, self._exited = self._exited, None
        self._again()
        if exited is not None:
            exited.callback(None)

    def _answers_closed(self, proto: _ChildProtocol) -> None:
        if proto is self._proto and self._running:
            self.reactor.callLater(KILL_AFTER, lambda: proto.kill() if proto is self._proto else None)

    def _drop(self, reason: str) -> None:
        """Answer everything pending Retry: the child that had it is gone."""
        pending, self._pending = self._pending, {}
        for d, count in pending.values():
            d.callback([Retry(reason)] * count)

    def _ended(self, proto: _ChildProtocol, reason: Failure) -> None:
        if proto is not self._proto:
            return
        self._proto = None
        if self._kill is not None and self._kill.active():
            self._kill.cancel()
        self._kill = None
        if self.reactor.seconds() - self._spawned_at >= RESTART_MAX:
            self._pause = RESTART_FIRST
        self._drop("connector process exited")
        exited, self._exited = self._exited, None
        if self._running:
            log.warn("connector process exited ({why}); starting another in {pause}s",
                     event="connector_process_exited", why=reason.getErrorMessage(),
                     pause=self._pause)
            self._again()
        else:
            log.info("connector process exited", event="connector_process_stopped")
        if exited is not None:
            exited.callback(None)

    def _check_alive(self) -> None:
        proto = self._proto
        if proto is None:
            return
        now = self.reactor.seconds()
        if self._ping is not None:
            rid, sent = self._ping
            if rid in self._pending:
                if now - sent >= PING_DEADLINE:
                    self._broken(proto, f"no answer to a ping for {now - sent:.0f}s")
                return
        rid = self._next_id
        self._next_id += 1
        self._pending[rid] = (Deferred(), 0)
        self._ping = (rid, now)
        self._send({"op": "ping", "id": rid})

    def _finish(self) -> Deferred[None]:
        """Close the child's stdin: it stops what is left and exits, or is
        killed after KILL_AFTER."""
        self._running = False
        if self._pinger.running:
            self._pinger.stop()
        if self._restart is not None and self._restart.active():
            self._restart.cancel()
        proto, exited = self._proto, self._exited
        if proto is None or exited is None or proto.transport is None:
            return succeed(None)
        proto.transport.closeStdin()  # type: ignore[attr-defined]
        if self._kill is None:
            self._kill = self.reactor.callLater(KILL_AFTER, proto.kill)
        return exited


@implementer(IBatchConnector)
class RemoteConnector:
    """One connector as the relay sees it, its deliveries made by the child."""

    def __init__(self, built: IConnector, process: ConnectorProcess) -> None:
        self.name = built.name
        self.process = process
        # Whether it forwards HL7 batches whole, from the one built here to
        # check the configuration.
        self.forward_batches = forwards_batches(built)

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
    specs: Sequence[ConnectorSpec], connectors: Sequence[IConnector], reactor: Any,
    environ: Mapping[str, str],
) -> list[IConnector]:
    """The connectors the relay uses with MLLP_CONNECTOR_PROCESS on: the
    child builds ``specs`` (as the server read them) with ``environ``.
    Raises ValueError naming a connector whose options cannot be sent."""
    for spec in specs:
        try:
            json.dumps(spec_to_json(spec))
        except (TypeError, ValueError):
            raise ValueError(
                f"connectors.{spec.name}: options that cannot be passed to the connector process"
            ) from None
    process = ConnectorProcess(reactor, specs, env=environ)
    return [RemoteConnector(c, process) for c in connectors]


# -- the child's end -----------------------------------------------------------


class _Server(Int32StringReceiver):
    """Requests on stdin, answers on fd 3. Every request with an id gets
    exactly one answer, whatever goes wrong."""

    MAX_LENGTH = MAX_FRAME

    def __init__(self, reactor: Any, environ: Mapping[str, str], build: Any) -> None:
        self.reactor = reactor
        self.environ = environ
        self.build = build
        self.connectors: dict[str, IConnector] = {}
        self.started: set[str] = set()
        self.busy: set[Deferred[Any]] = set()

    def stringReceived(self, string: bytes) -> None:
        rid: object = None
        count = 1
        try:
            header, data = decode(string)
            rid, op, name = header.get("id"), header.get("op"), header.get("connector")
            if op == "configure":
                self._configure(header.get("connectors"))
                return
            if op == "ping":
                self._reply(rid, [])
                return
            if op == "deliver":
                deliveries = unpack_deliveries(header.get("items"), data)
                count = len(deliveries)
            connector = self.connectors.get(name) if isinstance(name, str) else None
            if connector is None:
                # Never Dead: the server knows this connector, so the child
                # is what is wrong; the server retries.
                raise FrameError(f"no connector {str(name)[:60]!r} in the connector process")
            assert isinstance(name, str)
            if op == "start":
                self._start(name, connector)
            elif op == "stop":
                self.started.discard(name)
                maybeDeferred(connector.stop)
            elif op == "deliver":
                self._start(name, connector)
                self._deliver(rid, name, connector, deliveries, header.get("batch"))
            else:
                raise FrameError(f"unknown request {str(op)[:40]!r}")
        except Exception as e:  # noqa: BLE001 - every request gets its answer
            log.error("connector process: bad request: {why}", event="connector_process_bad_request",
                      why=str(e)[:200])
            if rid is not None:
                self._reply(rid, [Retry(f"connector process: {str(e)[:120]}")] * count)

    def _configure(self, specs: object) -> None:
        if not isinstance(specs, list):
            raise FrameError("configure lists no connectors")
        try:
            for value in specs:
                spec = spec_from_json(value)
                self.connectors[spec.name] = self.build(spec, self.reactor, self.environ)
        except Exception as e:  # noqa: BLE001 - the server built these; exit, to be started again
            log.error("connector process cannot build its connectors: {why}",
                      event="connector_process_config_failed", why=str(e)[:200])
            self.reactor.callLater(0, os._exit, 70)

    def _start(self, name: str, connector: IConnector) -> None:
        if name not in self.started:
            self.started.add(name)
            connector.start()

    def _deliver(
        self, rid: object, name: str, connector: IConnector, deliveries: list[Delivery],
        batch: object,
    ) -> None:
        d: Deferred[list[Outcome]]
        if isinstance(batch, str) and IBatchConnector.providedBy(connector):
            d = maybeDeferred(connector.deliver_batch, deliveries, batch)  # type: ignore[attr-defined]
        elif len(deliveries) == 1:
            d = maybeDeferred(connector.deliver, deliveries[0]).addCallback(lambda o: [o])
        else:
            d = succeed([Retry("several deliveries for a connector that takes one")] * len(deliveries))
        self.busy.add(d)

        def failed(f: Failure) -> list[Outcome]:
            log.failure("connector {connector} raised", f, event="delivery_error", connector=name)
            return [Retry(f"connector failed: {f.type.__name__ if f.type else '?'}")] * len(deliveries)

        def answer(outcomes: list[Outcome]) -> None:
            self.busy.discard(d)
            if len(outcomes) != len(deliveries):
                outcomes = [Retry("connector answered the wrong number of outcomes")] * len(deliveries)
            self._reply(rid, outcomes)

        d.addErrback(failed).addCallback(answer)

    def _reply(self, rid: object, outcomes: list[Outcome]) -> None:
        try:
            body = encode({"id": rid, "outcomes": [pack_outcome(o) for o in outcomes]})
        except (TypeError, ValueError):
            body = encode({"id": rid, "outcomes": [
                pack_outcome(Retry("connector process could not answer"))] * len(outcomes)})
        if self.transport is not None and not getattr(self.transport, "disconnecting", False):
            self.sendString(body)

    def lengthLimitExceeded(self, length: int) -> None:
        log.error("connector process got a {size}-byte frame; exiting",
                  event="connector_process_bad_frame", size=length)
        if self.transport is not None:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        # The server closed our stdin (or died): let deliveries in progress
        # finish for a moment, close the connectors, exit; never outlive it long.
        self.reactor.callLater(CHILD_EXIT_AFTER, os._exit, 0)
        stops = [maybeDeferred(c.stop) for n, c in self.connectors.items() if n in self.started]
        DeferredList([*self.busy, *stops], consumeErrors=True).addBoth(
            lambda _: self.reactor.stop()
        )


# Startup warnings the server logged when it built the connectors: the child
# builds them again (at every start) and would repeat them.
_SAID_BY_SERVER = frozenset({"upstream_plaintext", "upstream_tls_unverified"})


@provider(ILogFilterPredicate)
def _not_said_again(event: dict[str, Any]) -> PredicateResult:
    return PredicateResult.no if event.get("event") in _SAID_BY_SERVER else PredicateResult.maybe


def main() -> None:
    """``python -m mllpd.connectors.remote``: the child's entry point."""
    # The server decides when this process ends (it closes our stdin): a
    # signal sent to the whole process group (Ctrl-C, a hangup) must not
    # cut the deliveries in progress short.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    from twisted.internet import reactor
    from twisted.internet.stdio import StandardIO
    from twisted.logger import FilteringLogObserver, globalLogBeginner

    from mllpd.config import load_settings
    from mllpd.connectors import build_connector
    from mllpd.logging import json_observer

    settings = load_settings(os.environ, {})
    observer = json_observer(
        level=settings.log_level, pod=settings.pod_name, namespace=settings.pod_namespace
    )
    globalLogBeginner.beginLoggingTo(
        [FilteringLogObserver(observer, [_not_said_again])], redirectStandardIO=False
    )
    StandardIO(  # type: ignore[call-arg]  # the POSIX one takes fds
        _Server(reactor, os.environ, build_connector), stdin=0, stdout=ANSWER_FD, reactor=reactor
    )
    reactor.run(installSignalHandlers=False)  # type: ignore[call-arg]


if __name__ == "__main__":
    main()
