"""What the connector types share: option checks for ``build`` and a
helper for ``stop``.

Every option error is a :class:`ConfigError` on MLLP_CONFIG whose one line names
``connectors.<name>.<option>``, so an operator finds the bad key at once.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.logger import Logger
from zope.interface import implementer

from mllpd.config import ConfigError, parse_duration
from mllpd.endpoints import is_loopback

from . import ConnectorSpec, Delivery, IBatchConnector, IConnector, Outcome, Retry, forwards_batches

__all__ = [
    "ConnectorPool",
    "CurrentDelivery",
    "bool_option",
    "check_keys",
    "duration_option",
    "expand_env",
    "is_loopback",
    "mapping_option",
    "option_error",
    "settled",
    "string_option",
    "warn_plaintext",
    "warn_unverified",
]

log = Logger(namespace="mllpd.connectors")


def option_error(spec: ConnectorSpec, option: str, message: str) -> ConfigError:
    return ConfigError("MLLP_CONFIG", f"connectors.{spec.name}.{option}: {message}")


def check_keys(spec: ConnectorSpec, allowed: Collection[str], required: Collection[str] = ()) -> None:
    """Refuse unknown keys (usually typos that would silently do nothing)."""
    for key in spec.options:
        if key not in allowed:
            raise option_error(
                spec, str(key),
                f"unknown option for a {spec.type} connector; expected one of "
                + ", ".join(sorted(allowed)),
            )
    for key in required:
        if spec.options.get(key) is None:
            raise option_error(spec, key, "is required")


def string_option(spec: ConnectorSpec, key: str, default: str | None = None) -> str | None:
    value = spec.options.get(key)
    if value is None:
        return default
    if not isinstance(value, str) or not value.strip():
        raise option_error(spec, key, "expected a non-empty string")
    return value.strip()


def bool_option(spec: ConnectorSpec, key: str) -> bool:
    """A YAML boolean, false when absent: ``"yes"`` or ``1`` are refused, not guessed."""
    value = spec.options.get(key, False)
    if not isinstance(value, bool):
        raise option_error(spec, key, "expected true or false")
    return value


def warn_plaintext(spec: ConnectorSpec, host: str) -> None:
    """Say at startup that messages (PHI) will cross the network unencrypted."""
    log.warn(
        "{connector}: messages to {host} are sent without TLS; they are readable on the network",
        event="upstream_plaintext", connector=spec.name, host=host,
    )


def warn_unverified(spec: ConnectorSpec, host: str, what: str) -> None:
    """Say at startup that ``insecure: true`` lets anyone in the path read the messages."""
    log.warn(
        "{connector}: insecure: true: {what} for {host}; a machine in the path can read every message",
        event="upstream_tls_unverified", connector=spec.name, host=host, what=what,
    )


def duration_option(spec: ConnectorSpec, key: str, default: str) -> float:
    """A Go duration greater than zero: a connector never waits forever."""
    value = spec.options.get(key, default)
    if not isinstance(value, str):
        raise option_error(spec, key, f"expected a duration such as {default}, 500ms, 1m (a string)")
    try:
        seconds = parse_duration(value)
    except ValueError:
        raise option_error(
            spec, key, f"invalid duration {value!r}; expected a duration such as {default}, 500ms, 1m"
        ) from None
    if seconds <= 0:
        raise option_error(spec, key, "must be greater than 0")
    return seconds


# ${NAME} is replaced; $${ stays a literal ${.
_ENV_REF = re.compile(r"\$\$\{|\$\{([^}]*)\}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def expand_env(
    spec: ConnectorSpec, option: str, text: str, environ: Mapping[str, str]
) -> str:
    """Replace each ``${NAME}`` with the environment variable's value.

    Errors name the variable, never its value (they are secrets).
    """

    def repl(m: re.Match[str]) -> str:
        name = m.group(1)
        if name is None:
            return "${"
        if not _ENV_NAME.fullmatch(name):
            raise option_error(spec, option, f"invalid variable reference ${{{name}}}")
        value = environ.get(name)
        if value is None:
            raise option_error(spec, option, f"environment variable {name} is not set")
        if not value:
            raise option_error(spec, option, f"environment variable {name} is empty")
        return value

    return _ENV_REF.sub(repl, text)


def mapping_option(spec: ConnectorSpec, key: str) -> Mapping[Any, Any]:
    value = spec.options.get(key)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise option_error(spec, key, "expected a map of names to values")
    return value


async def settled(d: Deferred[Any]) -> None:
    """Wait for ``d`` to fire, without taking its result from other waiters."""
    waiter: Deferred[None] = Deferred()

    def fire(result: object) -> object:
        waiter.callback(None)
        return result

    d.addBoth(fire)
    await waiter


class CurrentDelivery:
    """The deliveries in progress (one per lane), so that ``stop`` can let
    them finish first."""

    def __init__(self) -> None:
        self._ds: set[Deferred[Any]] = set()

    def track(self, d: Deferred[Any]) -> Deferred[Any]:
        self._ds.add(d)

        def done(outcome: object) -> object:
            self._ds.discard(d)
            return outcome

        return d.addCallback(done)

    async def finished(self) -> None:
        for d in list(self._ds):
            await settled(d)


@implementer(IBatchConnector)
class ConnectorPool:
    """``lanes`` connectors of one kind that carry one delivery each (the
    mllp connector's one connection): each delivery goes to an idle one, so
    the relay's lanes travel over as many connections at once."""

    def __init__(self, members: Sequence[IConnector]) -> None:
        self.members = tuple(members)
        self.name = self.members[0].name
        self._idle: deque[IConnector] = deque(self.members)
        # Members that forward HL7 batches whole do so in the pool too.
        self.forward_batches = forwards_batches(self.members[0])

    def start(self) -> None:
        for member in self.members:
            member.start()

    def deliver(self, delivery: Delivery) -> Deferred[Outcome]:
        if not self._idle:
            # The relay never has more deliveries in flight than members.
            return succeed(Retry("every connection is busy"))
        member = self._idle.popleft()

        def release(outcome: Outcome) -> Outcome:
            self._idle.append(member)
            return outcome

        return member.deliver(delivery).addBoth(release)

    def deliver_batch(
        self, deliveries: Sequence[Delivery], batch_control_id: str
    ) -> Deferred[list[Outcome]]:
        if not self._idle:
            return succeed([Retry("every connection is busy")] * len(deliveries))
        member: Any = self._idle.popleft()

        def release(outcomes: list[Outcome]) -> list[Outcome]:
            self._idle.append(member)
            return outcomes

        d: Deferred[list[Outcome]] = member.deliver_batch(deliveries, batch_control_id)
        return d.addBoth(release)

    def stop(self) -> Deferred[None]:
        d = DeferredList([member.stop() for member in self.members], consumeErrors=True)
        return d.addCallback(lambda _: None)
