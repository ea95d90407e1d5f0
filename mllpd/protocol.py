"""The MLLP server protocol and its factory.

The protocol owns framing, timeouts and ordering; what a message means is the
receiver's business. ACKs leave in the order their frames arrived, however
the commits interleave.
"""

from __future__ import annotations

from collections import Counter, deque
from enum import Enum
from typing import TYPE_CHECKING, Any

from OpenSSL import SSL
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHandshakeListener, IPushProducer, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mllpd.ack import AckError
from mllpd.framing import Frame, Framer, Junk, Oversized, frame
from mllpd.logging import format_peer
from mllpd.metrics import MessageTypes
from mllpd.receiver import Receiver, Reply
from mllpd.timer import Timer

if TYPE_CHECKING:
    from mllpd.metrics import Metrics

__all__ = ["MLLPServerFactory", "MLLPServerProtocol", "State"]

log = Logger(namespace="mllpd.protocol")

# Frames a connection may have awaiting their ACK before we stop reading from
# it; bounds the memory one pipelining client can take.
MAX_PIPELINE = 64

# After a NAK for a frame we refuse to read, how long the sender has to close.
LINGER = 5.0


class State(Enum):
    """Where a connection is in its life, in the one order it moves through
    them: HANDSHAKING only under TLS, DRAINING only when the server stops,
    and any state may skip ahead to CLOSING or CLOSED."""

    HANDSHAKING = "handshaking"  # TLS: accepted, handshake not yet done
    OPEN = "open"  # reading frames, answering each
    DRAINING = "draining"  # shutting down: the frame in progress and the replies owed, then close
    CLOSING = "closing"  # reading nothing more; the transport is closing (or refused)
    CLOSED = "closed"  # connectionLost


# Reading nothing more.
_ENDED = (State.CLOSING, State.CLOSED)


class _Pending:
    """A frame awaiting its reply, in arrival order."""

    __slots__ = ("close_after", "received", "reply", "size")

    def __init__(self, received: float, size: int = 0) -> None:
        self.reply: Reply | None = None
        self.received = received
        self.close_after = False
        self.size = size  # bytes held against MLLP_MAX_BUFFER until the reply


@implementer(IPushProducer, IHandshakeListener)
class MLLPServerProtocol(Protocol):
    """One sender's connection: frames in, ACKs out, in order."""

    factory: MLLPServerFactory
    # TCP, TLS or (in unit tests) StringTransport: all producers with abort.
    transport: Any

    def __init__(self) -> None:
        self.peer = "?"
        self.state = State.OPEN  # until connectionMade decides
        self._framer: Framer | None = None
        self._held = 0  # the framer's bytes, as counted against MLLP_MAX_BUFFER
        self._queue: deque[_Pending] = deque()
        self._pause_reasons: set[str] = set()
        self._idle_since: float | None = None
        self._timed_frame = 0  # frames_started value the frame timer is for
        self._junk_logged = False
        self._restarts = 0
        self.client_subject: str | None = None
        self.client_names: frozenset[str] = frozenset()

    @property
    def lost(self) -> bool:
        """The connection is gone (connectionLost has run)."""
        return self.state is State.CLOSED

    # -- connection lifecycle -------------------------------------------------

    def connectionMade(self) -> None:
        f = self.factory
        clock = f.clock
        self._idle_timer = Timer(clock, self._idle_check, f.idle_timeout)
        self._frame_timer = Timer(clock, self._frame_timed_out, f.frame_timeout)
        self._write_timer = Timer(clock, self._write_timed_out, f.write_timeout)
        self._linger_timer = Timer(clock, self.abort, LINGER)
        self.peer = format_peer(self.transport.getPeer())
        f.stats["connections_accepted"] += 1
        if f.max_connections and f.open_connections >= f.max_connections:
            f.stats["connections_refused"] += 1
            log.warn(
                "connection refused from {peer}: {open} open, MLLP_MAX_CONNECTIONS is {max}",
                event="connection_refused", peer=self.peer,
                open=f.open_connections, max=f.max_connections,
            )
            self.state = State.CLOSING  # never counted: not in f.connections
            self.transport.loseConnection()
            return
        self.state = State.HANDSHAKING if f.tls else State.OPEN
        f.open_connections += 1
        f.connections.add(self)
        self._framer = Framer(f.max_frame_size)
        self.transport.registerProducer(self, True)
        if f.buffer_full:
            self._pause("buffer")
        log.info(
            "connection opened from {peer}", event="connection_opened",
            peer=self.peer, open=f.open_connections,
        )
        if f.draining:
            self.drain()
        else:
            self._update_idle()

    def handshakeCompleted(self) -> None:
        """TLS is up (client certificate verified, under mutual TLS)."""
        from mllpd.tls import peer_identity

        if self.state is State.HANDSHAKING:
            self.state = State.OPEN
        cert = self.transport.getPeerCertificate()
        if cert is not None:
            self.client_subject, self.client_names = peer_identity(cert)
        connection = self.transport.getHandle()
        log.info(
            "TLS established with {peer}", event="tls_established", peer=self.peer,
            client_subject=self.client_subject, tls_version=connection.get_protocol_version_name(),
            cipher=connection.get_cipher_name(),
        )

    def connectionLost(self, reason: Failure | None = None) -> None:
        previous, self.state = self.state, State.CLOSED
        for timer in (self._frame_timer, self._idle_timer, self._write_timer, self._linger_timer):
            timer.cancel()
        self._release_framer()
        f = self.factory
        if self not in f.connections:
            return  # refused at connectionMade
        if previous is State.HANDSHAKING:
            self._handshake_failed(reason)
        f.open_connections -= 1
        f.connections.discard(self)
        unanswered = sum(1 for p in self._queue if p.reply is None or p.reply.ack)
        log.info(
            "connection closed from {peer}", event="connection_closed",
            peer=self.peer, unanswered=unanswered, open=f.open_connections,
        )
        f.connection_closed(self)

    def _handshake_failed(self, reason: Failure | None) -> None:
        from mllpd.tls import HandshakeTimeout

        f = self.factory
        if reason is not None and reason.check(HandshakeTimeout):
            # tls_endpoint's watch aborted it (and logged tls_handshake_timeout).
            f.stats["tls_handshake_timeouts"] += 1
        if reason is not None and reason.check(SSL.Error, HandshakeTimeout):
            # Refused versions and ciphers, plaintext, missing or untrusted
            # client certificates, timeouts.
            f.stats["tls_handshake_failures"] += 1
            log.warn(
                "TLS handshake with {peer} failed: {reason}", event="tls_handshake_failed",
                peer=self.peer, reason=_tls_reason(reason),
            )
        else:
            # A TCP probe (load balancer, kubelet) connects and closes.
            log.debug("closed before TLS handshake by {peer}", event="tls_not_started",
                      peer=self.peer)

    # -- input ----------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._framer is None or self.state is State.CLOSING:
            return
        framer = self._framer
        events = framer.feed(data)
        # Before the frames are counted as awaiting commit, so their bytes
        # are never counted twice against MLLP_MAX_BUFFER.
        self._hold_framer()
        for event in events:
            if isinstance(event, Frame):
                self._frame_received(event.payload)
            elif isinstance(event, Junk):
                self._junk(event.size)
            elif isinstance(event, Oversized):
                self.factory.stats["frames_oversized"] += 1
                self._fail_frame(event.head, "oversized", f"frame larger than {self.factory.max_frame_size} bytes")
                return
        if framer.restarts != self._restarts:
            self._restarted(framer.restarts - self._restarts)
            self._restarts = framer.restarts
        self._hold_framer()
        self._update_frame_timer()
        self._update_idle()
        self.factory.shed_unfinished()

    def _hold_framer(self) -> None:
        framer = self._framer
        held = framer.buffered if framer is not None else 0
        if held != self._held:
            delta, self._held = held - self._held, held
            self.factory.hold(delta)

    def _release_framer(self) -> None:
        self._framer = None
        self._hold_framer()

    def _frame_received(self, payload: bytes) -> None:
        f = self.factory
        f.stats["frames_ok"] += 1
        self._cancel_idle()
        pending = _Pending(f.clock.seconds(), len(payload))
        f.hold(pending.size)
        self._queue.append(pending)
        if len(self._queue) >= MAX_PIPELINE:
            self._pause("pipeline")
        d = f.receiver.receive(payload, self.peer, self.client_subject, self.client_names)
        d.addCallbacks(
            self._replied, self._receive_failed,
            callbackArgs=(pending,), errbackArgs=(pending, len(payload)),
        )

    def _replied(self, reply: Reply, pending: _Pending) -> None:
        pending.reply = reply
        self._unhold(pending)
        self._flush()

    def _unhold(self, pending: _Pending) -> None:
        # Committed or refused: the receiver no longer holds the payload,
        # whether or not this connection is still open.
        self.factory.hold(-pending.size)
        pending.size = 0

    def _receive_failed(self, failure: Failure, pending: _Pending, size: int) -> None:
        # The receiver turns every expected failure into a NAK; this is a bug.
        log.failure("receiving a message failed", failure, event="receive_error", peer=self.peer)
        pending.reply = self.factory.receiver.refusal(
            None, "ascii", AckError("207", "internal error; resend later"), size
        )
        self._unhold(pending)
        self._flush()

    def _junk(self, size: int) -> None:
        self.factory.stats["junk_bytes"] += size
        self.factory.stats["frames_junk"] += 1
        if not self._junk_logged:
            self._junk_logged = True
            log.warn(
                "discarded {size} bytes outside any frame from {peer}",
                event="junk", peer=self.peer, size=size,
            )

    def _restarted(self, count: int) -> None:
        # A start byte inside an unfinished frame: the frame timer keeps
        # running from the first one, so trickled start bytes cannot hold a
        # connection open.
        self.factory.stats["frame_restarts"] += count
        if not self._restarts:
            log.warn(
                "start byte inside an unfinished frame from {peer}; frame abandoned",
                event="frame_restarted", peer=self.peer, count=count,
            )

    # -- output, in order -------------------------------------------------------

    def _flush(self) -> None:
        if self.lost:
            return
        now = self.factory.clock.seconds()
        while self._queue and self._queue[0].reply is not None:
            pending = self._queue.popleft()
            reply = pending.reply
            assert reply is not None
            if reply.ack is not None:
                self.transport.write(frame(reply.ack))
            self.factory.message_done(self.peer, reply, now - pending.received)
            if pending.close_after:
                self._close_discarding()
                return
        if len(self._queue) < MAX_PIPELINE:
            self._unpause("pipeline")
        self._update_idle()

    # -- flow control (the transport pauses us when its buffer is full) ---------

    def pauseProducing(self) -> None:
        self._pause("write")
        self._write_timer.start()

    def resumeProducing(self) -> None:
        self._write_timer.cancel()
        self._unpause("write")

    def stopProducing(self) -> None:
        pass

    def _pause(self, reason: str) -> None:
        if not self._pause_reasons and not self.lost:
            self.transport.pauseProducing()
        self._pause_reasons.add(reason)

    def buffer_full(self) -> None:
        """MLLP_MAX_BUFFER is reached: read nothing more until it falls."""
        self._pause("buffer")

    def buffer_free(self) -> None:
        self._unpause("buffer")

    def unfinished_bytes(self) -> int:
        """Bytes of the frame in progress held against MLLP_MAX_BUFFER."""
        framer = self._framer
        return self._held if framer is not None and framer.in_frame and self.state not in _ENDED else 0

    def refuse_unfinished(self) -> None:
        """MLLP_MAX_BUFFER is full of unfinished frames and this one is the
        largest: AR it (where its MSH survives) and close, so the others
        can be read again instead of all waiting for their frame timeout."""
        assert self._framer is not None
        self.factory.stats["frames_buffer_refused"] += 1
        head = self._framer.partial_head()
        self._fail_frame(
            head, "buffer_refused",
            f"MLLP_MAX_BUFFER is full of unfinished frames and this one ({self._held} bytes so far)"
            " is the largest; resend later",
        )

    def _unpause(self, reason: str) -> None:
        if reason in self._pause_reasons:
            self._pause_reasons.discard(reason)
            if not self._pause_reasons and self.state not in _ENDED:
                self.transport.resumeProducing()

    # -- timers -----------------------------------------------------------------

    def _busy(self) -> bool:
        return bool(self._queue) or (self._framer is not None and self._framer.in_frame)

    def _update_idle(self) -> None:
        if self.state in _ENDED:
            return
        if self._busy():
            self._idle_since = None
            return
        if self.state is State.DRAINING:
            # Half-close and read on: a frame the sender wrote before it saw
            # our FIN then meets a read, not a reset that could destroy the
            # ACKs just written. It gets no ACK and is resent elsewhere.
            self._close_discarding()
            return
        if self._idle_since is None:
            self._idle_since = self.factory.clock.seconds()
            self._idle_timer.start()

    def _cancel_idle(self) -> None:
        # Only frames are activity: junk trickling in does not keep a
        # connection alive. The timer itself stays: rescheduling it for every
        # message costs more than letting it fire and look.
        self._idle_since = None

    def _update_frame_timer(self) -> None:
        framer = self._framer
        if framer is None or not framer.in_frame or self.state is State.CLOSING:
            self._frame_timer.cancel()
            return
        if self._frame_timer.running and self._timed_frame == framer.frames_started:
            return
        self._timed_frame = framer.frames_started
        self._frame_timer.reset()

    def _idle_check(self) -> None:
        if self._idle_since is None or self.state in _ENDED:
            return  # busy now; becoming idle again schedules a new check
        remaining = self._idle_since + self.factory.idle_timeout - self.factory.clock.seconds()
        if remaining > 1e-6:
            self._idle_timer.start(remaining)
            return
        self.factory.stats["idle_timeouts"] += 1
        log.info(
            "closing idle connection from {peer}", event="idle_timeout", peer=self.peer,
            seconds=self.factory.idle_timeout,
        )
        self._close_gracefully()

    def _frame_timed_out(self) -> None:
        assert self._framer is not None
        self.factory.stats["frames_timed_out"] += 1
        head = self._framer.partial_head()
        self._fail_frame(head, "frame_timeout", f"frame not complete within {self.factory.frame_timeout:g}s")

    def _write_timed_out(self) -> None:
        self.factory.stats["write_timeouts"] += 1
        log.warn(
            "closing connection from {peer}: ACKs not read for {seconds}s",
            event="write_timeout", peer=self.peer, seconds=self.factory.write_timeout,
            unwritten=len(self._queue),
        )
        self.state = State.CLOSING
        self.transport.abortConnection()

    # -- closing ----------------------------------------------------------------

    def _fail_frame(self, head: bytes, reason: str, text: str) -> None:
        """NAK a frame we will not read (where its MSH survives), then close."""
        reply = self.factory.receiver.head_refusal(head, text)
        log.warn(
            "closing connection from {peer}: {reason}", event=reason, peer=self.peer,
            reason=text, control_id=reply.control_id or None,
        )
        self._release_framer()
        self._pause("closing")
        self._frame_timer.cancel()
        pending = _Pending(self.factory.clock.seconds())
        pending.close_after = True
        pending.reply = reply
        self._queue.append(pending)
        self._flush()

    def _stop_input(self) -> bool:
        if self.state in _ENDED:
            return False
        self.state = State.CLOSING
        self._release_framer()
        self._idle_timer.cancel()
        self._frame_timer.cancel()
        return True

    def _close_gracefully(self) -> None:
        """Send what is written, then close."""
        if self._stop_input():
            self.transport.loseConnection()

    def _close_discarding(self) -> None:
        """Half-close after a NAK and read on, discarding, until the sender
        closes: closing with its unread bytes still queued would reset the
        connection and could destroy the NAK before the sender reads it.
        """
        if not self._stop_input():
            return
        # Through TLS, loseWriteConnection would reach the TCP transport
        # beneath it and skip the TLS close_notify.
        lose_write = None if self.factory.tls else getattr(self.transport, "loseWriteConnection", None)
        if lose_write is None:
            self.transport.loseConnection()
            return
        lose_write()
        self._pause_reasons.clear()
        self.transport.resumeProducing()
        self._linger_timer.start()

    def drain(self) -> None:
        """Finish the frame in progress and the ACKs owed, then close."""
        if self.state is State.HANDSHAKING:
            self.abort()  # nothing received yet, so nothing owed
        elif self.state is State.OPEN:
            self.state = State.DRAINING
            self._update_idle()

    def abort(self) -> None:
        """Close now, without ACKs for what is unanswered."""
        if self.state is not State.CLOSED:
            self.state = State.CLOSING
            self.transport.abortConnection()


def _tls_reason(reason: Failure | None) -> str:
    """OpenSSL's reason text (library errors only, never data)."""
    if reason is None:
        return "connection closed"
    value = reason.value
    args = getattr(value, "args", None)
    if args and isinstance(args[0], list) and args[0]:
        parts = [str(e[-1]) for e in args[0] if isinstance(e, tuple) and e]
        if parts:
            return "; ".join(parts)
    return type(value).__name__


class MLLPServerFactory(Factory):
    """Shared state of all connections: limits, receiver, clock, counters."""

    protocol = MLLPServerProtocol  # type: ignore[assignment]
    noisy = False

    def __init__(
        self,
        receiver: Receiver,
        clock: IReactorTime,
        *,
        max_connections: int = 0,
        max_frame_size: int = 2 * 1024 * 1024,
        idle_timeout: float = 30.0,
        frame_timeout: float = 60.0,
        write_timeout: float = 5.0,
        debug: bool = False,
        tls: bool = False,
        metrics: Metrics | None = None,
        max_buffer: int = 64 * 1024 * 1024,
    ) -> None:
        self.receiver = receiver
        self.clock = clock
        self.max_connections = max_connections
        self.max_frame_size = max_frame_size
        self.idle_timeout = idle_timeout
        self.frame_timeout = frame_timeout
        self.write_timeout = write_timeout
        self.debug = debug
        self.tls = tls
        self.metrics = metrics
        self.max_buffer = max_buffer
        # Bytes of frames in progress and of messages awaiting their commit,
        # across all connections (MLLP_MAX_BUFFER).
        self.buffered = 0
        self.buffer_full = False
        self._shedding = False
        self.open_connections = 0
        self.awaiting_header = 0  # accepted, PROXY header not yet read
        self.connections: set[MLLPServerProtocol] = set()
        self.stats: Counter[str] = Counter()
        # Replies by (message type label, ACK code); MessageTypes bounds the keys.
        self.acks: Counter[tuple[str, str]] = Counter()
        self.types = MessageTypes()
        self.draining = False
        self._all_closed: list[Deferred[None]] = []

    def admit(self, peer: str) -> bool:
        """A connection that has yet to send its PROXY header: it counts
        against MLLP_MAX_CONNECTIONS from now (False: refuse it)."""
        taken = self.open_connections + self.awaiting_header
        if self.max_connections and taken >= self.max_connections:
            self.stats["connections_accepted"] += 1
            self.stats["connections_refused"] += 1
            log.warn(
                "connection refused from {peer}: {open} open, MLLP_MAX_CONNECTIONS is {max}",
                event="connection_refused", peer=peer, open=self.open_connections,
                awaiting_header=self.awaiting_header, max=self.max_connections,
            )
            return False
        self.awaiting_header += 1
        return True

    def header_done(self) -> None:
        """The PROXY header is read (the connection now counts as open) or
        the connection closed without one."""
        self.awaiting_header -= 1

    def header_invalid(self) -> None:
        """A PROXY header was refused (malformed, too long); its connection is closed."""
        self.stats["proxy_headers_invalid"] += 1

    def hold(self, delta: int) -> None:
        """Count bytes taken (or, negative, freed) against MLLP_MAX_BUFFER.

        Past the limit every connection stops reading; below seven eighths
        of it they all read again. Reads that arrive together may overshoot
        by one read each, never more: a paused transport reads nothing.
        """
        self.buffered += delta
        if not self.max_buffer:
            return
        if not self.buffer_full and self.buffered > self.max_buffer:
            self.buffer_full = True
            self.stats["buffer_full"] += 1
            log.warn(
                "MLLP_MAX_BUFFER reached ({buffered} bytes held): reading paused on all connections",
                event="buffer_full", buffered=self.buffered, max=self.max_buffer,
                open=self.open_connections,
            )
            for proto in list(self.connections):
                proto.buffer_full()
        elif self.buffer_full and self.buffered <= self.max_buffer * 7 // 8:
            self.buffer_full = False
            log.info(
                "buffered bytes down to {buffered}: reading resumed", event="buffer_resumed",
                buffered=self.buffered, max=self.max_buffer,
            )
            for proto in list(self.connections):
                proto.buffer_free()

    def shed_unfinished(self) -> None:
        """After a read while reading is paused (MLLP_MAX_BUFFER): commits
        free the bytes awaiting them, but unfinished frames only grow or
        time out. When those alone keep the buffer above the mark where
        reading resumes, refuse the largest until they do not, so the other
        senders resume instead of all waiting for MLLP_FRAME_TIMEOUT."""
        if not self.buffer_full or self._shedding:
            return
        mark = self.max_buffer * 7 // 8
        self._shedding = True
        try:
            # Sizes read once (refusing one frees only its own bytes), largest
            # first: one pass, not one scan of every connection per refusal.
            held = [(p.unfinished_bytes(), p) for p in self.connections]
            total = sum(size for size, _ in held)
            for size, conn in sorted(held, key=lambda item: -item[0]):
                if total <= mark:
                    return
                conn.refuse_unfinished()
                total -= size
        finally:
            self._shedding = False

    def message_done(self, peer: str, reply: Reply, latency: float) -> None:
        if reply.parts:
            # An HL7 batch: counted and logged message by message.
            for part in reply.parts:
                self.message_done(peer, part, latency)
            log.info(
                "batch {control_id} from {peer}: {count} messages",
                event="batch", peer=peer, control_id=reply.control_id,
                count=len(reply.parts), size=reply.size,
                accepted=sum(1 for p in reply.parts if p.outcome == "A"),
            )
            return
        self.acks[(self.types.label(reply.msg_type), reply.code)] += 1
        if self.metrics is not None:
            self.metrics.ack_latency.observe(latency)
        if reply.error is not None:
            log.info(
                "{code} to {peer} for {msg_type} {control_id}: {reason}",
                event="nak", peer=peer, code=reply.code, msg_type=reply.msg_type,
                control_id=reply.control_id, size=reply.size, reason=reply.error.text,
                err_code=reply.error.code, sent=reply.ack is not None,
            )
        elif self.debug:
            log.debug(
                "{code} to {peer} for {msg_type} {control_id}",
                event="message", peer=peer, code=reply.code, msg_type=reply.msg_type,
                control_id=reply.control_id, size=reply.size, duplicate=reply.duplicate,
                latency_ms=round(latency * 1000, 3), sent=reply.ack is not None,
            )

    def connection_closed(self, proto: MLLPServerProtocol) -> None:
        if not self.connections:
            waiters, self._all_closed = self._all_closed, []
            for d in waiters:
                d.callback(None)

    def drain(self) -> Deferred[None]:
        """Ask every connection to finish and close; fires when all are closed."""
        self.draining = True
        d: Deferred[None] = Deferred()
        if not self.connections:
            d.callback(None)
            return d
        self._all_closed.append(d)
        for proto in list(self.connections):
            proto.drain()
        return d

    def abort_all(self) -> int:
        remaining = list(self.connections)
        for proto in remaining:
            proto.abort()
        return len(remaining)
