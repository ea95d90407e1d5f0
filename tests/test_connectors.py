"""Every connector type provides the interface the relay drives."""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor as _reactor
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mllpd.config import ConfigError
from mllpd.connectors import (
    CONNECTOR_TYPES,
    ConnectorSpec,
    IConnector,
    build_connector,
    http,
    mllp,
    postgres,
)

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

    def test_registry_builds_every_type(self) -> None:
        """build_connector builds a connector of each type MLLP_CONFIG accepts, with that type's checks."""
        options = {
            "http": {"url": "http://127.0.0.1:1/"},
            "mllp": {"address": "tcp:127.0.0.1:1"},
            "postgres": {"dsn": "postgresql://127.0.0.1:1/x"},
        }
        classes = {"http": http.HTTPConnector, "mllp": mllp.MLLPConnector, "postgres": postgres.PostgresConnector}
        self.assertEqual(sorted(CONNECTOR_TYPES), sorted(options))
        for kind in CONNECTOR_TYPES:
            connector = build_connector(ConnectorSpec("c", kind, None, options[kind]), reactor, {})
            self.assertIsInstance(connector, classes[kind])
            self.assertTrue(verifyObject(IConnector, connector))
        with self.assertRaises(ConfigError) as caught:
            build_connector(ConnectorSpec("c", "mllp", None, {"address": "h:0"}), reactor, {})
        self.assertEqual(str(caught.exception).split(";")[0], "MLLP_CONFIG: connectors.c.address: port 0 out of range 1-65535")
