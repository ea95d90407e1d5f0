"""Delivery of stored messages to upstream systems.

A connector takes one :class:`Delivery` at a time and answers with an
outcome: :class:`Delivered`, :class:`Retry` (the relay backs off and tries the
same message again, keeping order) or :class:`Dead` (the message goes to the
connector's dead-letter queue and the next one is delivered). ``deliver``
never fails: every expected problem is an outcome; the relay treats an
unexpected exception as a Retry.

Each connector type lives in a module of this package with a
``build(spec, reactor, environ) -> IConnector`` function that checks the
type's options and raises :class:`mllpd.config.ConfigError` with a one-line
reason naming ``connectors.<name>.<option>``. :data:`CONNECTOR_TYPES` lists
them and :func:`build_connector` builds one of any type.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, Protocol, cast

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

__all__ = [
    "CONNECTOR_TYPES",
    "ConnectorSpec",
    "Dead",
    "Delivered",
    "Delivery",
    "IBatchConnector",
    "forwards_batches",
    "IConnector",
    "Outcome",
    "Retry",
    "build_connector",
]


class ConnectorSpec(NamedTuple):
    """One entry of MLLP_CONFIG's ``connectors`` list, after generic checks.

    ``options`` holds the type-specific keys (everything except name, type,
    filter, lanes and order_by) exactly as read from YAML. ``lanes`` is how
    many deliveries may be in flight at once (on different order keys);
    ``order_by`` the CEL expression giving a message's order key (None: the
    sending application and patient id).
    """

    name: str
    type: str
    filter: str | None
    options: dict[str, Any]
    lanes: int = 1
    order_by: str | None = None


class Delivery(NamedTuple):
    """One queued message for one connector."""

    message_id: str  # idempotency key upstream
    connector: str
    payload: bytes  # exactly as received
    charset: str | None  # MSH-18 (or the default charset) as stored
    codec: str  # the Python codec that decodes payload
    control_id: str
    msg_type: str
    attempt: int  # 1 for the first try
    received_at: float | None = None  # epoch seconds the receiver stored it


class Delivered(NamedTuple):
    detail: str = ""


class Retry(NamedTuple):
    """Try again later. ``after`` (seconds) overrides the backoff, e.g. from
    an HTTP Retry-After header."""

    reason: str
    after: float | None = None


class Dead(NamedTuple):
    """Upstream refused the message for good: dead-letter it."""

    reason: str


Outcome = Delivered | Retry | Dead


class IConnector(Interface):
    """Delivers messages to one upstream system, one at a time."""

    name = Attribute("The connector's name from MLLP_CONFIG.")

    def start() -> None:
        """Begin connecting (if the connector keeps a connection)."""

    def deliver(delivery: Delivery) -> Deferred[Outcome]:
        """Send one message; fires with an outcome, never fails."""

    def stop() -> Deferred[None]:
        """Let a delivery in progress finish, then close connections."""


class IBatchConnector(IConnector):
    """A connector that can forward the messages of an HL7 batch together."""

    forward_batches = Attribute("True when configured to forward batches whole.")

    def deliver_batch(
        deliveries: Sequence[Delivery], batch_control_id: str
    ) -> Deferred[list[Outcome]]:
        """Send the messages as one batch; fires with one outcome each, in
        order, never fails."""


def forwards_batches(connector: IConnector) -> bool:
    """Whether the connector is set to forward HL7 batches whole (``batch: forward``)."""
    return bool(
        IBatchConnector.providedBy(connector) and getattr(connector, "forward_batches", False)
    )


class ConnectorBuilder(Protocol):
    """A connector module's ``build``: check the options, make the connector."""

    def __call__(
        self, spec: ConnectorSpec, reactor: Any, environ: Mapping[str, str]
    ) -> IConnector: ...


# Each type's module, imported when a connector of that type is built: those
# modules import this one, and a gateway without a postgres connector need not
# load psycopg.
_MODULES = {
    "mllp": "mllpd.connectors.mllp",
    "http": "mllpd.connectors.http",
    "postgres": "mllpd.connectors.postgres",
}
CONNECTOR_TYPES: tuple[str, ...] = tuple(_MODULES)


def build_connector(spec: ConnectorSpec, reactor: Any, environ: Mapping[str, str]) -> IConnector:
    """The connector ``spec`` describes, built by its type's module.

    ``reactor`` is whatever that module needs of it (each module says);
    raises :class:`mllpd.config.ConfigError` naming the bad option.
    """
    build = cast(ConnectorBuilder, importlib.import_module(_MODULES[spec.type]).build)
    return build(spec, reactor, environ)
