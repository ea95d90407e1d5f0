"""The ``http`` connector: POST each message's exact bytes to a URL.

2xx is delivered. 408, 429, 5xx, 3xx (redirects are not followed: the URL is
wrong until someone fixes it), network errors and timeouts are retried,
honouring Retry-After. Any other 4xx is dead-lettered: upstream refused this
message for good. Payloads and response bodies are never logged; status codes
are.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Mapping
from datetime import UTC
from email.utils import parsedate_to_datetime
from http import HTTPStatus
from typing import Any
from urllib.parse import urlsplit

from hyperlink import URL
from OpenSSL import crypto
from twisted.internet import ssl
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import (
    ConnectionDone,
    ConnectionLost,
    ConnectionRefusedError,
    DNSLookupError,
    VerifyError,
)
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    HTTPConnectionPool,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseNeverReceived,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IPolicyForHTTPS, IResponse
from zope.interface import implementer

from . import ConnectorSpec, Dead, Delivered, Delivery, IConnector, Outcome, Retry
from ._common import (
    CurrentDelivery,
    check_keys,
    duration_option,
    expand_env,
    is_loopback,
    mapping_option,
    option_error,
    string_option,
    warn_plaintext,
)

__all__ = ["CONTENT_TYPE", "HTTPConnector", "build", "mime_charset", "parse_retry_after"]

CONTENT_TYPE = "x-application/hl7-v2+er7"

_OPTIONS = ("url", "headers", "timeout", "ca_file", "client_cert_file", "client_key_file")
# Set by the connector for every request; configuring them would break the
# contract with upstream (exact bytes, their charset, the idempotency key).
_RESERVED_HEADERS = frozenset(
    {"content-type", "content-length", "transfer-encoding", "host", "connection",
     "idempotency-key", "x-mllp-message-id"}
)
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")

# Python codec names (as codecs.lookup gives them) to IANA charset names.
_MIME_NAMES = {
    "ascii": "US-ASCII",
    "utf-8": "UTF-8",
    "utf-16": "UTF-16",
    "utf-16-le": "UTF-16LE",
    "utf-16-be": "UTF-16BE",
    "utf-32": "UTF-32",
    "utf-32-le": "UTF-32LE",
    "utf-32-be": "UTF-32BE",
    "iso2022_jp": "ISO-2022-JP",
    "iso2022_jp_2": "ISO-2022-JP-2",
    "gb18030": "GB18030",
    "euc_kr": "EUC-KR",
    "big5": "Big5",
}


def mime_charset(codec: str) -> str:
    """The IANA charset name for a Python codec (``iso8859-1`` -> ``ISO-8859-1``)."""
    try:
        name = codecs.lookup(codec).name
    except LookupError:
        name = codec.lower()
    if name in _MIME_NAMES:
        return _MIME_NAMES[name]
    if name.startswith("iso8859-"):
        return "ISO-8859-" + name[len("iso8859-"):]
    return name.upper().replace("_", "-")


def parse_retry_after(value: str, now: float) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an
    HTTP-date), or None when it is unreadable."""
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        # RFC 9110 dates are GMT; an obsolete form may come without a zone.
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now)


def describe_error(failure: Failure | BaseException) -> str:
    """One line for a network failure: no URL, no body, no payload."""
    exc = failure.value if isinstance(failure, Failure) else failure
    # treq/Agent wrap the real cause: ResponseNeverReceived, ResponseFailed,
    # RequestTransmissionFailed all carry ``reasons``.
    reasons = getattr(exc, "reasons", None)
    if reasons:
        return describe_error(reasons[0])
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, DNSLookupError):
        return "DNS lookup failed"
    text = " ".join(str(exc).split())
    if len(text) > 200:
        text = text[:197] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@implementer(IBodyProducer)
class _Body:
    """The payload, written in one piece (no cooperator, no file object)."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.length = len(data)

    def startProducing(self, consumer: Any) -> Deferred[None]:
        consumer.write(self._data)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


@implementer(IPolicyForHTTPS)
class _TLSPolicy:
    """Verify the server against our CA file (or the platform's roots) and
    present a client certificate when configured."""

    def __init__(
        self,
        trust_root: Any,
        client_certificate: ssl.PrivateCertificate | None,
    ) -> None:
        self._trust_root = trust_root
        self._client_certificate = client_certificate

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        return ssl.optionsForClientTLS(
            hostname.decode("idna"),
            trustRoot=self._trust_root,
            clientCertificate=self._client_certificate,
        )


class _Discard(Protocol):
    """Reads and drops a response body so the connection can be reused."""

    def __init__(self) -> None:
        self.done: Deferred[None] = Deferred(self._cancel)

    def _cancel(self, d: Deferred[None]) -> None:
        # A body that stalls must not pin a connection: close it.
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(None)
        else:
            self.done.errback(reason)


def _closed_before_response(error: BaseException) -> bool:
    """The connection closed before any response byte: a pooled connection
    the server had already given up on."""
    if not isinstance(error, ResponseNeverReceived | RequestTransmissionFailed):
        return False
    return any(r.check(ConnectionDone, ConnectionLost) for r in error.reasons)


@implementer(IConnector)
class HTTPConnector:
    """POSTs each delivery over a pool of kept-alive connections, one per lane."""

    log = Logger()

    def __init__(
        self,
        name: str,
        url: str,
        headers: Mapping[str, str],
        timeout: float,
        reactor: Any,
        *,
        tls: IPolicyForHTTPS | None = None,
        clock: IReactorTime | None = None,
        lanes: int = 1,
    ) -> None:
        self.name = name
        self.url = url
        self.timeout = timeout
        self._headers = dict(headers)
        self._reactor = reactor
        self._clock: IReactorTime = clock if clock is not None else reactor
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        # One delivery per lane at a time: a kept-alive connection for each.
        self._pool.maxPersistentPerHost = lanes
        agent = (
            Agent(reactor, contextFactory=tls, pool=self._pool)
            if tls is not None else Agent(reactor, pool=self._pool)
        )
        # Twisted's Agent directly: treq's layers (its URL handling, which
        # IDNA-encodes the host again per request, and response wrapping)
        # cost about a third of the CPU of each POST. The URL is encoded once.
        self._agent = agent
        self._uri = URL.from_text(url).to_uri().to_text().encode("ascii")
        self._current = CurrentDelivery()
        self._stopping = False

    def start(self) -> None:
        self.log.info(
            "connector {connector} (http) ready, timeout {timeout}s",
            event="connector_starting", connector=self.name, timeout=self.timeout,
        )

    def deliver(self, delivery: Delivery) -> Deferred[Outcome]:
        if self._stopping:
            return succeed(Retry("connector is stopping"))
        d = Deferred.fromCoroutine(self._deliver(delivery)).addErrback(self._unexpected)
        return self._current.track(d)

    def _unexpected(self, failure: Failure) -> Outcome:
        self.log.failure(
            "connector {connector} (http): unexpected error", failure,
            event="delivery_error", connector=self.name,
        )
        return Retry(describe_error(failure))

    def stop(self) -> Deferred[None]:
        self._stopping = True
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        # deliver() never fails, and the timeout bounds the wait.
        await self._current.finished()
        await self._pool.closeCachedConnections()

    def _request_headers(self, delivery: Delivery) -> Headers:
        headers = Headers()
        for key, value in self._headers.items():
            headers.addRawHeader(key, value)
        headers.addRawHeader(
            "Content-Type", f"{CONTENT_TYPE}; charset={mime_charset(delivery.codec)}"
        )
        headers.addRawHeader("Idempotency-Key", delivery.message_id)
        headers.addRawHeader("X-MLLP-Message-Id", delivery.message_id)
        return headers

    async def _deliver(self, delivery: Delivery) -> Outcome:
        started = self._clock.seconds()
        for fresh in (False, True):
            try:
                request = self._agent.request(
                    b"POST", self._uri, self._request_headers(delivery),
                    _Body(delivery.payload),
                )
            except Exception as e:  # noqa: BLE001 - deliver() answers with an outcome, never fails
                return Retry(f"request not sent: {describe_error(e)}")
            timed_out: list[bool] = []

            def expire(
                request: Deferred[Any] = request, timed_out: list[bool] = timed_out
            ) -> None:
                timed_out.append(True)
                request.cancel()

            remaining = max(0.0, self.timeout - (self._clock.seconds() - started))
            timer = self._clock.callLater(remaining, expire)
            try:
                response: IResponse = await request
                break
            except Exception as e:  # noqa: BLE001 - every network failure is a Retry
                if not fresh and not timed_out and _closed_before_response(e):
                    # A kept-alive connection the server had closed: the
                    # request never reached it. Once more on a new connection
                    # at once (the Idempotency-Key makes a repeat harmless)
                    # rather than after a full backoff.
                    continue
                reason = (
                    f"no response within {self.timeout:g}s" if timed_out else describe_error(e)
                )
                self.log.info(
                    "connector {connector}: {control_id} not delivered: {reason}",
                    event="delivery_retry", connector=self.name,
                    control_id=delivery.control_id, reason=reason,
                    attempt=delivery.attempt,
                )
                return Retry(reason)
            finally:
                if timer.active():
                    timer.cancel()
        status = response.code
        await self._drain(response, max(0.0, self.timeout - (self._clock.seconds() - started)))
        outcome = self._classify(status, response)
        emit = self.log.debug if isinstance(outcome, Delivered) else self.log.info
        emit(
            "connector {connector}: {control_id} ({msg_type}) -> HTTP {status} in {elapsed:.3f}s",
            connector=self.name, control_id=delivery.control_id, msg_type=delivery.msg_type,
            status=status, attempt=delivery.attempt,
            elapsed=self._clock.seconds() - started,
        )
        return outcome

    async def _drain(self, response: IResponse, limit: float) -> None:
        # The status decides the outcome; the body only needs reading so the
        # connection goes back to the pool. Its failure changes nothing.
        if response.length == 0:
            return
        body = _Discard()
        response.deliverBody(body)
        timer = self._clock.callLater(limit, body.done.cancel)
        try:
            await body.done
        except Exception as e:  # noqa: BLE001 - the status already decided
            self.log.debug(
                "connector {connector}: response body not read: {reason}",
                event="response_unread", connector=self.name, reason=describe_error(e),
            )
        finally:
            if timer.active():
                timer.cancel()

    def _classify(self, status: int, response: IResponse) -> Outcome:
        # Python's phrase, not the server's: servers send odd ones or none.
        try:
            label = f"HTTP {status} {HTTPStatus(status).phrase}"
        except ValueError:
            label = f"HTTP {status}"
        if 200 <= status < 300:
            return Delivered(label)
        if status in (408, 429) or status >= 500:
            return Retry(label, self._retry_after(response))
        if 300 <= status < 400:
            return Retry(f"{label}: redirects are not followed; check the url")
        if 400 <= status < 500:
            return Dead(label)
        return Retry(label)

    def _retry_after(self, response: IResponse) -> float | None:
        values = response.headers.getRawHeaders(b"retry-after")
        if not values:
            return None
        return parse_retry_after(values[0].decode("latin-1"), self._clock.seconds())


def build(
    spec: ConnectorSpec,
    reactor: Any,
    environ: Mapping[str, str],
    *,
    clock: IReactorTime | None = None,
) -> HTTPConnector:
    """Check an ``http`` connector's options and build it."""
    check_keys(spec, _OPTIONS, required=("url",))
    url = string_option(spec, "url")
    assert url is not None
    https = _check_url(spec, url)
    headers = _headers(spec, environ)
    timeout = duration_option(spec, "timeout", "30s")
    tls = _tls_policy(spec, https)
    return HTTPConnector(
        spec.name, url, headers, timeout, reactor, tls=tls, clock=clock, lanes=spec.lanes
    )


def _check_url(spec: ConnectorSpec, url: str) -> bool:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise option_error(spec, "url", f"invalid URL ({e})") from None
    if parts.scheme not in ("http", "https"):
        raise option_error(spec, "url", "expected an http:// or https:// URL")
    if not parts.hostname:
        raise option_error(spec, "url", "the URL has no host")
    if parts.username is not None or parts.password is not None:
        raise option_error(
            spec, "url",
            "credentials in the URL are not sent; use headers (e.g. Authorization: ${SECRET})",
        )
    if parts.fragment:
        raise option_error(spec, "url", "a URL fragment is never sent; remove it")
    del port
    if parts.scheme == "http" and not is_loopback(parts.hostname):
        warn_plaintext(spec, parts.hostname)
    return parts.scheme == "https"


def _headers(spec: ConnectorSpec, environ: Mapping[str, str]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for key, value in mapping_option(spec, "headers").items():
        where = f"headers.{key}"
        if not isinstance(key, str) or not _TOKEN.fullmatch(key):
            raise option_error(spec, where, "invalid header name")
        if key.lower() in _RESERVED_HEADERS:
            raise option_error(spec, where, "is set by the connector and cannot be configured")
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise option_error(spec, where, "expected a string value")
        expanded = expand_env(spec, where, str(value), environ)
        if any(c in expanded for c in "\r\n\0"):
            raise option_error(spec, where, "the value contains a line break or NUL")
        headers[key] = expanded
    return headers


def _read_file(spec: ConnectorSpec, key: str) -> bytes | None:
    path = string_option(spec, key)
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise option_error(spec, key, f"cannot read {path}: {e.strerror}") from None


_PEM_CERT = re.compile(
    rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL
)


def _tls_policy(spec: ConnectorSpec, https: bool) -> IPolicyForHTTPS | None:
    keys = ("ca_file", "client_cert_file", "client_key_file")
    given = [k for k in keys if spec.options.get(k) is not None]
    if not given:
        return None
    if not https:
        raise option_error(spec, given[0], "only applies to an https:// url")
    trust_root: Any = None
    ca = _read_file(spec, "ca_file")
    if ca is not None:
        try:
            certs = [ssl.Certificate.loadPEM(pem) for pem in _PEM_CERT.findall(ca)]
        except crypto.Error:
            certs = []
        if not certs:
            raise option_error(spec, "ca_file", "no PEM certificate found")
        trust_root = ssl.trustRootFromCertificates(certs)
    cert = _read_file(spec, "client_cert_file")
    key = _read_file(spec, "client_key_file")
    client: ssl.PrivateCertificate | None = None
    if (cert is None) != (key is None):
        missing = "client_key_file" if key is None else "client_cert_file"
        raise option_error(spec, missing, "is required with " + (
            "client_cert_file" if key is None else "client_key_file"))
    if cert is not None and key is not None:
        try:
            client = ssl.PrivateCertificate.loadPEM(cert + b"\n" + key)
        except (crypto.Error, VerifyError, ValueError):
            raise option_error(
                spec, "client_cert_file", "cannot load the certificate and key as a PEM pair"
            ) from None
    return _TLSPolicy(trust_root, client)
