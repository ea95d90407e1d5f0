"""Every connector type provides the interface the relay drives."""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor as _reactor
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mllpd.connectors import ConnectorSpec, IConnector, http, mllp, postgres

reactor: Any = _reactor


class InterfaceTests(SynchronousTestCase):
    def test_each_type_provides_iconnector(self) -> None:
        """http, mllp and postgres connectors built from config all provide IConnector."""
        built = [
            http.build(ConnectorSpec("lake", "http", None, {"url": "http://127.0.0.1:1/"}), reactor, {}),
            mllp.build(ConnectorSpec("ehr", "mllp", None, {"address": "tcp:127.0.0.1:1"}), reactor, {}),
            postgres.build(
                ConnectorSpec("archive", "postgres", None, {"dsn": "postgresql://127.0.0.1:1/x"}),
                reactor, {},
            ),
        ]
        for connector in built:
            self.assertTrue(verifyObject(IConnector, connector))
