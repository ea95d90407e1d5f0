"""Server endpoint wrappers: transport concerns (PROXY header, TLS) as a
wrapper around whatever endpoint the user named, each wrapping the factory
of every connection it accepts."""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from zope.interface import implementer

__all__ = ["WrappingEndpoint"]


@implementer(IStreamServerEndpoint)
class WrappingEndpoint:
    """``endpoint``, listening with ``wrap(factory)`` instead of ``factory``."""

    def __init__(
        self,
        endpoint: IStreamServerEndpoint,
        wrap: Callable[[IProtocolFactory], IProtocolFactory],
    ) -> None:
        self.endpoint = endpoint
        self.wrap = wrap

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        return self.endpoint.listen(self.wrap(protocolFactory))
