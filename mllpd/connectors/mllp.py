"""The ``mllp`` connector: forward stored messages to an upstream MLLP server.

One persistent connection per lane (:class:`ConnectorPool` over ``lanes``
connectors), each kept by :class:`ClientService` with backoff; one message
in flight on each; the upstream's ACK decides the outcome. An ACK whose MSA-2
is not the message's MSH-10 means the stream no longer lines up with our
messages, so the connection is dropped and the message retried. An ACK
timeout drops the connection too: otherwise the late ACK would arrive while
the next message waits, and could mark the wrong message delivered.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from functools import partial
from typing import Any

from OpenSSL import SSL, crypto
from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet import defer
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.endpoints import _parse as parse_endpoint_string  # the string grammar
from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import (
    IAddress,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath, UnlistableError
from zope.interface import implementer

from mllpd.batch import BatchError, forward_payload, is_batch, parse_batch
from mllpd.config import ConfigError, parse_host_port
from mllpd.connectors import (
    ConnectorSpec,
    Dead,
    Delivered,
    Delivery,
    IBatchConnector,
    IConnector,
    Outcome,
    Retry,
)
from mllpd.connectors._common import (
    ConnectorPool,
    bool_option,
    check_keys,
    duration_option,
    is_loopback,
    option_error,
    warn_plaintext,
    warn_unverified,
)
from mllpd.framing import Frame, Framer, Junk, frame
from mllpd.hl7 import DecodeError, Message, NotHL7Error, parse_message
from mllpd.logging import format_peer

__all__ = [
    "CLOSE_TIMEOUT",
    "DEFAULT_ACK_TIMEOUT",
    "DEFAULT_CONNECT_TIMEOUT",
    "MLLPClientProtocol",
    "MLLPConnector",
    "build",
    "default_retry_policy",
    "endpoint_description",
]

log = Logger(namespace="mllpd.connectors.mllp")

DEFAULT_ACK_TIMEOUT = 30.0
DEFAULT_CONNECT_TIMEOUT = 10.0
# An ACK is a few hundred bytes; anything near this is not an ACK.
MAX_ACK_SIZE = 1024 * 1024
# A batch ACK holds one ACK per forwarded message.
MAX_BATCH_ACK_SIZE = 16 * 1024 * 1024
# stop() closes the connection politely; a peer that never completes the
# close (a stuck TLS shutdown) is aborted after this long.
CLOSE_TIMEOUT = 5.0
# Upper bound for the reason texts we hand to the relay (stored, logged).
_REASON_LIMIT = 200

_OPTIONS = ("address", "ack_timeout", "connect_timeout", "insecure", "batch")
_BATCH_MODES = ("per-message", "forward")
_ADDRESS_HELP = (
    "expected tcp:host:port, tls:host:port[:trustRoots=CA_DIR]"
    "[:certificate=CERT_PEM:privateKey=KEY_PEM] or host:port"
)
# Endpoint types clientFromString knows (``tcp:2575`` is not a host named
# "tcp"); each takes a ``timeout=``.
_ENDPOINT_TYPES = frozenset({"tcp", "tls", "ssl", "unix"})
_TIMEOUT_KWARG = re.compile(r"(?<!\\):timeout=")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


def default_retry_policy() -> Callable[[int], float]:
    """How long ClientService waits before reconnect attempt n: 1.5s growing to 30s."""
    return backoffPolicy(initialDelay=1.0, maxDelay=30.0, factor=1.5)


class _ConnectFailed(Exception):
    """A connection attempt failed; the text says why (no payload in it)."""


class _Ack:
    __slots__ = ("payload",)

    def __init__(self, payload: bytes) -> None:
        self.payload = payload


class _Broken:
    """The connection can no longer carry an answer to the message."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


_Reply = _Ack | _Broken


def _describe(failure: Failure) -> str:
    text = _CONTROL.sub(" ", failure.getErrorMessage()).strip()
    name = failure.type.__name__ if failure.type is not None else "error"
    return (text or name)[:_REASON_LIMIT]


def _clean(text: str, limit: int = 80) -> str:
    return _CONTROL.sub(" ", text).strip()[:limit]


class MLLPClientProtocol(Protocol):
    """One connection to the upstream: frames out, one ACK frame back."""

    # TCP or TLS in service, StringTransport in unit tests.
    transport: Any

    def __init__(self, connector: MLLPConnector) -> None:
        self.connector = connector
        self.peer = "?"
        # False once the stream cannot be trusted (dropped) or is gone.
        self.usable = False
        self._framer = Framer(MAX_BATCH_ACK_SIZE if connector.forward_batches else MAX_ACK_SIZE)
        self._waiter: Deferred[_Reply] | None = None

    def connectionMade(self) -> None:
        self.peer = format_peer(self.transport.getPeer())
        self.usable = True
        for option, value in (("setTcpNoDelay", True), ("setTcpKeepAlive", True)):
            # A TLS wrapper may not pass these through; the connection works without.
            setter = getattr(self.transport, option, None)
            if setter is not None:
                try:
                    setter(value)
                except (AttributeError, OSError):
                    pass
        self.connector._connection_made(self)

    def send(self, payload: bytes) -> Deferred[_Reply]:
        """Write one framed message; the Deferred fires with the reply.

        Cancelling it (the ACK timeout) forgets the wait; the caller then drops
        the connection so the late reply can never answer another message.
        """
        if not self.usable or self._waiter is not None:
            return succeed(_Broken("connection not usable"))
        waiter: Deferred[_Reply] = Deferred(canceller=self._forget)
        self._waiter = waiter
        self.transport.write(frame(payload))
        return waiter

    def _forget(self, waiter: Deferred[_Reply]) -> None:
        if self._waiter is waiter:
            self._waiter = None

    def dataReceived(self, data: bytes) -> None:
        if not self.usable:
            return
        if not self._framer.in_frame:
            # Some upstreams end each ACK with a line break.
            data = data.lstrip(b"\r\n")
            if not data:
                return
        ack: bytes | None = None
        problem: str | None = None
        for event in self._framer.feed(data):
            answering = ack is None and self._waiter is not None
            if isinstance(event, Frame):
                if not answering:
                    problem = "a frame that answers no message in flight"
                    break
                ack = event.payload
            elif isinstance(event, Junk):
                if answering:
                    problem = f"{event.size} bytes outside any frame instead of an ACK"
                    break
                # Noise after an ACK, or between messages: the framer has
                # dropped it and will find the next start byte.
            else:
                problem = f"a frame over {self._framer.max_size} bytes instead of an ACK"
                break
        waiter = self._waiter
        if ack is not None and waiter is not None:
            self._waiter = None
            waiter.callback(_Ack(ack))
        if problem is not None:
            self.drop(f"upstream sent {problem}")

    def drop(self, reason: str) -> None:
        """Close at once: what arrives after this point cannot be trusted."""
        if not self.usable:
            return
        self.usable = False
        log.warn(
            "{connector}: dropping connection to {peer}: {reason}",
            event="upstream_dropped", connector=self.connector.name, peer=self.peer,
            reason=reason,
        )
        self.connector._connection_unusable(self)
        self._answer(_Broken(reason))
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        was_usable = self.usable
        self.usable = False
        why = _describe(reason)
        self._answer(_Broken(f"connection lost before the ACK: {why}"))
        self.connector._connection_lost(self, why, was_usable)

    def _answer(self, reply: _Reply) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None:
            waiter.callback(reply)


class _ClientFactory(Factory):
    noisy = False

    def __init__(self, connector: MLLPConnector) -> None:
        self.connector = connector

    def buildProtocol(self, addr: IAddress | None) -> MLLPClientProtocol:
        return MLLPClientProtocol(self.connector)


@implementer(IStreamClientEndpoint)
class _WatchedEndpoint:
    """Tells the connector about failed connection attempts.

    ClientService keeps retrying on its own; a delivery waiting for a
    connection wants to know about the failure rather than sit out its
    connect timeout.
    """

    def __init__(self, endpoint: IStreamClientEndpoint, failed: Callable[[Failure], None]) -> None:
        self._endpoint = endpoint
        self._failed = failed

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        def failed(failure: Failure) -> Failure:
            self._failed(failure)
            return failure

        d: Deferred[IProtocol] = self._endpoint.connect(protocolFactory)
        return d.addErrback(failed)


@implementer(IBatchConnector)
class MLLPConnector:
    """Delivers messages over one persistent MLLP connection.

    ``clock`` drives the ACK and connect timeouts and ClientService's
    reconnect backoff; ``retry_policy`` maps the count of failed attempts in a
    row to the wait before the next one.
    """

    def __init__(
        self,
        name: str,
        endpoint: IStreamClientEndpoint,
        *,
        clock: IReactorTime,
        ack_timeout: float = DEFAULT_ACK_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        retry_policy: Callable[[int], float] | None = None,
        address: str = "",
        forward_batches: bool = False,
    ) -> None:
        self.name = name
        self.address = address
        # batch: forward sends the messages of an HL7 batch as one batch.
        self.forward_batches = forward_batches
        self.ack_timeout = ack_timeout
        self.connect_timeout = connect_timeout
        self._clock = clock
        self._proto: MLLPClientProtocol | None = None
        self._open: set[MLLPClientProtocol] = set()
        self._conn_waiters: list[Deferred[MLLPClientProtocol]] = []
        self._connecting: Deferred[MLLPClientProtocol] | None = None
        self._in_flight = False
        self._idle_waiters: list[Deferred[None]] = []
        self._stopping = False
        self._up: bool | None = None
        self._service = ClientService(
            _WatchedEndpoint(endpoint, self._attempt_failed),
            _ClientFactory(self),
            retryPolicy=retry_policy or default_retry_policy(),
            clock=clock,
        )

    # IConnector

    def start(self) -> None:
        self._stopping = False
        log.info(
            "{connector}: connecting to {address}", event="connector_starting",
            connector=self.name, address=self.address,
        )
        self._service.startService()

    def deliver(self, delivery: Delivery) -> Deferred[Outcome]:
        if self._stopping:
            return succeed(self._retry(delivery, "connector is stopping"))
        if self._in_flight:
            # The relay never does this; refusing keeps ACKs matched to messages.
            return succeed(self._retry(delivery, "another delivery is in progress"))
        self._in_flight = True
        d = Deferred.fromCoroutine(self._deliver(delivery))
        d.addErrback(self._unexpected, delivery)
        d.addBoth(self._finished)
        return d

    def stop(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())

    # Delivery

    async def _connection(self, delivery: Delivery) -> MLLPClientProtocol | Retry:
        connecting = self._wait_connection().addTimeout(self.connect_timeout, self._clock)
        self._connecting = connecting
        try:
            return await connecting
        except defer.TimeoutError:
            return self._retry(delivery, f"not connected within {self.connect_timeout:g}s")
        except CancelledError:
            return self._retry(delivery, "connector is stopping")
        except _ConnectFailed as e:
            return self._retry(delivery, f"not connected: {e}")
        finally:
            self._connecting = None

    async def _deliver(self, delivery: Delivery) -> Outcome:
        proto = await self._connection(delivery)
        if isinstance(proto, Retry):
            return proto
        waiting = proto.send(delivery.payload).addTimeout(self.ack_timeout, self._clock)
        try:
            reply = await waiting
        except defer.TimeoutError:
            proto.drop(f"no ACK for {delivery.control_id} within {self.ack_timeout:g}s")
            return self._retry(delivery, f"no ACK within {self.ack_timeout:g}s")
        if isinstance(reply, _Broken):
            return self._retry(delivery, reply.reason)
        return self._judge(proto, delivery, reply.payload)

    def _judge(self, proto: MLLPClientProtocol, delivery: Delivery, payload: bytes) -> Outcome:
        """Turn the upstream's ACK into an outcome."""
        try:
            ack = parse_message(payload, default_charset=delivery.charset)
        except (NotHL7Error, DecodeError):
            proto.drop("upstream answered with a frame that is not an HL7 message")
            return self._retry(delivery, "upstream answered with a frame that is not an HL7 ACK")
        msa = ack.segment("MSA")
        if msa is None:
            proto.drop("upstream answered without an MSA segment")
            return self._retry(delivery, "upstream's answer has no MSA segment")
        code = ack.pick(msa[1]).strip().upper() if len(msa) > 1 else ""
        acked = msa[2].strip() if len(msa) > 2 else ""
        if acked != delivery.control_id.strip() and ack.pick(acked) != delivery.control_id.strip():
            # A late ACK for an earlier message, or another system's: the
            # stream no longer pairs ACKs with our messages.
            proto.drop(f"ACK for {_clean(acked, 40)!r} while {delivery.control_id!r} waits")
            return self._retry(
                delivery,
                f"ACK's MSA-2 {_clean(acked, 40)!r} is not the message's MSH-10 "
                f"{delivery.control_id!r}",
            )
        return self._verdict(proto, delivery, ack, code)

    def _verdict(
        self, proto: MLLPClientProtocol, delivery: Delivery, ack: Message, code: str
    ) -> Outcome:
        """The outcome an ACK's MSA-1 means for the message it answers."""
        if code in ("AA", "CA"):
            return self._delivered(delivery, proto, code)
        err_code, err_text = _error_of(ack)
        detail = f"upstream {code}"
        if err_code:
            detail += f" (ERR {err_code})"
        if err_text:
            detail += f": {err_text}"
        if code in ("AE", "CE"):
            log.warn(
                "{connector}: {code} for {msg_type} {control_id} from {peer}; dead-lettered",
                event="delivery_dead", connector=self.name, code=code, err_code=err_code,
                control_id=delivery.control_id, msg_type=delivery.msg_type,
                attempt=delivery.attempt, peer=proto.peer, message_id=delivery.message_id,
            )
            return Dead(detail)
        if code in ("AR", "CR"):
            # The upstream's ERR text may quote the message: stored, never logged.
            said = f"upstream {code}" + (f" (ERR {err_code})" if err_code else "")
            return self._retry(delivery, detail, code=code, logged=said)
        return self._retry(delivery, f"upstream answered with unknown MSA-1 {_clean(code, 10)!r}")

    # HL7 batches (batch: forward)

    def deliver_batch(
        self, deliveries: Sequence[Delivery], batch_control_id: str
    ) -> Deferred[list[Outcome]]:
        items = list(deliveries)
        if self._stopping or self._in_flight:
            why = "connector is stopping" if self._stopping else "another delivery is in progress"
            return succeed(self._retry_batch(items, batch_control_id, why))
        self._in_flight = True
        d = Deferred.fromCoroutine(self._deliver_batch(items, batch_control_id))
        d.addErrback(lambda f: [self._unexpected(f, items[0])] * len(items))
        d.addBoth(self._finished)
        return d

    async def _deliver_batch(self, items: list[Delivery], batch_control_id: str) -> list[Outcome]:
        proto = await self._connection(items[0])
        if isinstance(proto, Retry):
            return [proto] * len(items)
        payload = forward_payload(
            [d.payload for d in items], batch_control_id,
            datetime.fromtimestamp(self._clock.seconds(), UTC),
        )
        waiting = proto.send(payload).addTimeout(self.ack_timeout, self._clock)
        try:
            reply = await waiting
        except defer.TimeoutError:
            proto.drop(f"no batch ACK for {batch_control_id} within {self.ack_timeout:g}s")
            return self._retry_batch(items, batch_control_id, f"no batch ACK within {self.ack_timeout:g}s")
        if isinstance(reply, _Broken):
            return self._retry_batch(items, batch_control_id, reply.reason)
        return self._judge_batch(proto, items, batch_control_id, reply.payload)

    def _judge_batch(
        self, proto: MLLPClientProtocol, items: list[Delivery], batch_control_id: str, payload: bytes
    ) -> list[Outcome]:
        """Map the upstream's batch ACK to each message by MSA-2; one ACK
        answering the batch control id answers every message. A batch ACK
        that names our batch (BHS-12) and holds only negative ACKs accepts
        the messages it does not list (HL7 v2 chapter 2: acknowledgement by
        exception)."""
        references = None
        try:
            if is_batch(payload):
                answered = parse_batch(payload, 2 * len(items) + 1)
                header = answered.batches[0].header or answered.file_header
                references = header.field(12).strip() if header is not None else ""
                raws = [raw for _, _, raw in answered.messages()]
            else:
                raws = [payload]
            acks = [parse_message(raw, default_charset=items[0].charset) for raw in raws]
        except (BatchError, NotHL7Error, DecodeError):
            proto.drop("upstream answered the batch with a frame that is not an HL7 batch ACK")
            return self._retry_batch(items, batch_control_id, "upstream's answer is not an HL7 batch ACK")
        answers: dict[str, list[tuple[Message, str]]] = {}
        for ack in acks:
            msa = ack.segment("MSA")
            if msa is None:
                proto.drop("upstream answered the batch without an MSA segment")
                return self._retry_batch(items, batch_control_id, "an ACK in upstream's answer has no MSA")
            code = ack.pick(msa[1]).strip().upper() if len(msa) > 1 else ""
            acked = ack.pick(msa[2]).strip() if len(msa) > 2 else ""
            answers.setdefault(acked, []).append((ack, code))
        whole = answers.get(batch_control_id.strip()) if len(acks) == 1 else None
        by_exception = references == batch_control_id.strip() and all(
            code not in ("AA", "CA") for listed in answers.values() for _, code in listed
        )
        outcomes: list[Outcome] = []
        for delivery in items:
            mine = answers.get(delivery.control_id.strip())
            answer = mine.pop(0) if mine else (whole[0] if whole else None)
            if answer is None and by_exception:
                outcomes.append(self._delivered(delivery, proto, "implicit AA"))
            elif answer is None:
                outcomes.append(self._retry(delivery, "upstream's batch ACK has no ACK for this message"))
            else:
                outcomes.append(self._verdict(proto, delivery, *answer))
        return outcomes

    def _retry_batch(self, items: list[Delivery], batch_control_id: str, reason: str) -> list[Outcome]:
        reason = reason[:_REASON_LIMIT]
        log.warn(
            "{connector}: batch {batch_control_id} of {count} messages not delivered: {reason}",
            event="batch_retry", connector=self.name, reason=reason, count=len(items),
            batch_control_id=batch_control_id, attempt=items[0].attempt,
        )
        return [Retry(reason)] * len(items)

    def _delivered(self, delivery: Delivery, proto: MLLPClientProtocol, code: str) -> Delivered:
        log.debug(
            "{connector}: {code} for {msg_type} {control_id} from {peer}",
            event="delivered", connector=self.name, code=code, peer=proto.peer,
            control_id=delivery.control_id, msg_type=delivery.msg_type,
            attempt=delivery.attempt, message_id=delivery.message_id,
            size=len(delivery.payload),
        )
        return Delivered(code)

    def _retry(
        self, delivery: Delivery, reason: str, code: str | None = None, logged: str | None = None
    ) -> Retry:
        reason = reason[:_REASON_LIMIT]
        log.warn(
            "{connector}: {msg_type} {control_id} not delivered (attempt {attempt}): {reason}",
            event="delivery_retry", connector=self.name, reason=logged or reason, code=code,
            control_id=delivery.control_id, msg_type=delivery.msg_type,
            attempt=delivery.attempt, message_id=delivery.message_id,
        )
        return Retry(reason)

    def _unexpected(self, failure: Failure, delivery: Delivery) -> Outcome:
        log.failure(
            "{connector}: delivery of {msg_type} {control_id} failed unexpectedly",
            failure, event="delivery_error", connector=self.name,
            control_id=delivery.control_id, msg_type=delivery.msg_type,
        )
        return Retry(f"internal error: {failure.type.__name__ if failure.type else 'error'}")

    def _finished(self, outcome: Outcome) -> Outcome:
        self._in_flight = False
        waiters, self._idle_waiters = self._idle_waiters, []
        for w in waiters:
            w.callback(None)
        return outcome

    # Connection state

    def _wait_connection(self) -> Deferred[MLLPClientProtocol]:
        if self._proto is not None and self._proto.usable:
            return succeed(self._proto)

        def forget(d: Deferred[MLLPClientProtocol]) -> None:
            if d in self._conn_waiters:
                self._conn_waiters.remove(d)

        waiter: Deferred[MLLPClientProtocol] = Deferred(canceller=forget)
        self._conn_waiters.append(waiter)
        return waiter

    def _connection_made(self, proto: MLLPClientProtocol) -> None:
        self._open.add(proto)
        self._proto = proto
        self._up = True
        log.info(
            "{connector}: connected to {peer}", event="upstream_connected",
            connector=self.name, peer=proto.peer,
        )
        waiters, self._conn_waiters = self._conn_waiters, []
        for w in waiters:
            if proto.usable:
                w.callback(proto)
            else:
                self._conn_waiters.append(w)

    def _connection_unusable(self, proto: MLLPClientProtocol) -> None:
        if self._proto is proto:
            self._proto = None

    def _connection_lost(self, proto: MLLPClientProtocol, why: str, was_usable: bool) -> None:
        self._open.discard(proto)
        self._connection_unusable(proto)
        self._up = None
        if was_usable and not self._stopping:
            log.warn(
                "{connector}: connection to {peer} lost: {reason}", event="upstream_lost",
                connector=self.name, peer=proto.peer, reason=why,
            )
        else:
            log.info(
                "{connector}: connection to {peer} closed", event="upstream_closed",
                connector=self.name, peer=proto.peer,
            )

    def _attempt_failed(self, failure: Failure) -> None:
        if failure.check(CancelledError):
            return
        why = _describe(failure)
        # One warning when the upstream becomes unreachable; repeats at debug.
        emit = log.warn if self._up is not False else log.debug
        emit(
            "{connector}: cannot connect to {address}: {reason}", event="upstream_unreachable",
            connector=self.name, address=self.address, reason=why,
        )
        self._up = False
        waiters, self._conn_waiters = self._conn_waiters, []
        for w in waiters:
            w.errback(_ConnectFailed(why))

    # Shutdown

    async def _stop(self) -> None:
        self._stopping = True
        if self._connecting is not None:
            self._connecting.cancel()
        if self._in_flight:
            # Waiting for an ACK, which ack_timeout bounds.
            idle: Deferred[None] = Deferred()
            self._idle_waiters.append(idle)
            await idle
        if not self._service.running:
            return
        closing = self._service.stopService()
        abort = self._clock.callLater(CLOSE_TIMEOUT, self._abort_open)
        try:
            await closing
        finally:
            if abort.active():
                abort.cancel()
        log.info("{connector}: stopped", event="connector_stopped", connector=self.name)

    def _abort_open(self) -> None:
        for proto in list(self._open):
            proto.transport.abortConnection()


def _error_of(ack: Message) -> tuple[str, str]:
    """(table 0357 code, short text) from ERR (any version) or MSA-3/MSA-6.

    The upstream's own words (ERR-8, MSA-3) say more than the table's name
    for the code, so they come first.
    """
    code = ack.get("ERR", 3, 1) or ack.get("ERR", 1, 4, 1) or ack.get("MSA", 6, 1)
    text = (
        ack.get("ERR", 8) or ack.get("MSA", 3) or ack.get("ERR", 3, 2)
        or ack.get("ERR", 1, 4, 2) or ack.get("MSA", 6, 2)
    )
    return _clean(code, 20), _clean(text)


# Configuration


def build(spec: ConnectorSpec, reactor: Any, environ: Mapping[str, str]) -> IConnector:
    """Check an ``mllp`` connector's options and make the connector.

    Raises :class:`ConfigError` naming ``connectors.<name>.<option>``.
    """
    options = spec.options
    problem = partial(option_error, spec)
    check_keys(spec, _OPTIONS)
    ack_timeout = duration_option(spec, "ack_timeout", f"{DEFAULT_ACK_TIMEOUT:g}s")
    connect_timeout = duration_option(spec, "connect_timeout", f"{DEFAULT_CONNECT_TIMEOUT:g}s")
    address = options.get("address")
    if address is None:
        raise problem("address", f"required; {_ADDRESS_HELP}")
    if not isinstance(address, str) or not address.strip():
        raise problem("address", f"must be a non-empty string; {_ADDRESS_HELP}")
    try:
        description = endpoint_description(address, connect_timeout)
        endpoint = clientFromString(reactor, description)
    except ValueError as e:
        raise problem("address", f"{_clean(str(e), 160)}; {_ADDRESS_HELP}") from None
    except TypeError as e:
        raise problem("address", f"{_endpoint_type_error(e)}; {_ADDRESS_HELP}") from None
    except UnlistableError:
        raise problem(
            "address", "trustRoots must be a readable directory of CA certificates (*.pem)"
        ) from None
    except OSError as e:
        raise problem("address", f"cannot read {e.filename}: {e.strerror}") from None
    except (crypto.Error, SSL.Error):
        raise problem(
            "address", "certificate or privateKey is not a valid PEM certificate/key"
        ) from None
    _check_transport(spec, description, bool_option(spec, "insecure"), problem)
    batch = options.get("batch", "per-message")
    if batch not in _BATCH_MODES:
        raise problem("batch", f"{_clean(str(batch), 40)!r}; expected per-message or forward")
    members = [
        MLLPConnector(
            spec.name,
            endpoint,
            clock=reactor,
            ack_timeout=ack_timeout,
            connect_timeout=connect_timeout,
            address=address.strip(),
            forward_batches=batch == "forward",
        )
        for _ in range(spec.lanes)
    ]
    # One connection per lane: MLLP carries one message at a time on each.
    return members[0] if len(members) == 1 else ConnectorPool(members)


def endpoint_description(address: str, connect_timeout: float) -> str:
    """The Twisted client endpoint string for an ``address`` option.

    ``host:port`` means TCP. Unless the string sets ``timeout``, each TCP
    connect attempt is limited to the connector's connect timeout.
    """
    text = address.strip()
    host_port = parse_host_port(text, _ENDPOINT_TYPES, lowest_port=1)
    if host_port is not None:
        if not host_port.host:
            raise ValueError("host and port are required")
        text = f"tcp:{host_port.endpoint_host()}:{host_port.port}"
    kind = text.split(":", 1)[0].lower()
    if kind == "tls":
        _check_trust_roots(text)
    if kind in _ENDPOINT_TYPES and not _TIMEOUT_KWARG.search(text):
        text += f":timeout={max(1, math.ceil(connect_timeout))}"
    return text


def _check_transport(
    spec: ConnectorSpec,
    description: str,
    insecure: bool,
    problem: Callable[[str, str], ConfigError],
) -> None:
    """Refuse TLS that verifies nothing unless ``insecure: true``; warn about plaintext.

    ``tls:`` always checks the chain and the name. Twisted's ``ssl:`` without
    ``hostname=`` checks no name (and, without ``caCertsDir=``, no chain):
    anyone in the path could read and answer for the upstream.
    """
    args, kwargs = parse_endpoint_string(description)
    kind = str(args[0]).lower()
    host = str(kwargs.get("host") or (args[1] if len(args) > 1 else ""))
    if kind == "ssl" and not kwargs.get("hostname"):
        if not insecure:
            raise problem(
                "address",
                "ssl: without hostname= does not verify the upstream's certificate; "
                "use tls:host:port[:trustRoots=CA_DIR], add hostname=, "
                "or set insecure: true to accept that",
            )
        warn_unverified(spec, host, "the upstream's certificate is not verified")
    elif kind == "tcp" and not is_loopback(host):
        warn_plaintext(spec, host)


def _check_trust_roots(description: str) -> None:
    # Twisted loads only *.pem files from trustRoots and trusts nothing when
    # there are none, which would fail every handshake with a vague error.
    _, kwargs = parse_endpoint_string(description)
    directory = kwargs.get("trustRoots")
    if directory is None:
        return
    path = FilePath(directory)
    if path.isdir() and not any(c.basename().lower().endswith(".pem") for c in path.children()):
        raise ValueError(
            f"trustRoots directory {directory} holds no *.pem file "
            "(Twisted loads CA certificates only from files named *.pem)"
        )


def _endpoint_type_error(error: TypeError) -> str:
    text = str(error)
    if "unrecognized keyword" in text or "unexpected keyword" in text:
        return f"unknown endpoint parameter ({_clean(text, 120)})"
    if "missing" in text:
        return "host and port are required"
    return _clean(text, 120)
