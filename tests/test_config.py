"""Settings: Go durations, sizes, addresses, precedence and one-line errors."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from mllpd.config import (
    SETTINGS,
    ConfigError,
    HostPort,
    load_settings,
    parse_duration,
    parse_host_port,
    parse_listen_address,
    parse_size,
)


class DurationTests(SynchronousTestCase):
    def test_go_syntax(self) -> None:
        """Durations read as in the manifests: 250ms, 5s, 1h30m, 1.5s, 0."""
        cases = {"250ms": 0.25, "5s": 5, "1h30m": 5400, "1.5s": 1.5, "0": 0, "2m3s": 123, "500us": 0.0005}
        for text, seconds in cases.items():
            self.assertAlmostEqual(parse_duration(text), seconds)

    def test_rejects(self) -> None:
        """A bare number other than 0, a unit alone or junk is not a duration."""
        for text in ("5", "s", "5 s", "-5s", "5d", "", "1h30"):
            with self.assertRaises(ValueError, msg=text):
                parse_duration(text)


class SizeTests(SynchronousTestCase):
    def test_sizes(self) -> None:
        """Sizes take binary and decimal units or plain bytes."""
        cases = {"2MiB": 2 * 1024**2, "512KiB": 512 * 1024, "1048576": 1048576, "5GiB": 5 * 1024**3, "1MB": 10**6}
        for text, size in cases.items():
            self.assertEqual(parse_size(text), size)

    def test_rejects(self) -> None:
        """Unknown units and junk are refused."""
        for text in ("2 parsecs", "MiB", "", "-1"):
            with self.assertRaises(ValueError, msg=text):
                parse_size(text)


class AddressTests(SynchronousTestCase):
    def test_forms(self) -> None:
        """host:port, :port, a bare port and endpoint strings all become endpoints."""
        cases = {
            ":2575": "tcp:2575",
            "2575": "tcp:2575",
            "127.0.0.1:2575": "tcp:2575:interface=127.0.0.1",
            "[::1]:2575": "tcp6:2575:interface=\\:\\:1",
            "tcp:2575:interface=127.0.0.1": "tcp:2575:interface=127.0.0.1",
            "unix:/run/mllp.sock": "unix:/run/mllp.sock",
        }
        for text, endpoint in cases.items():
            self.assertEqual(parse_listen_address(text), endpoint)

    def test_rejects(self) -> None:
        """Out-of-range ports and unknown endpoint types are refused."""
        for text in ("99999", "host:99999", "bogus:thing:here", ""):
            with self.assertRaises(ValueError, msg=text):
                parse_listen_address(text)


class HostPortTests(SynchronousTestCase):
    def test_one_reading(self) -> None:
        """host:port, [v6]:port, :port and a bare port are read one way; endpoint strings are left alone."""
        types = frozenset({"tcp", "unix"})
        self.assertEqual(parse_host_port(" ehr.hospital:2575 ", types), HostPort("ehr.hospital", 2575))
        self.assertEqual(parse_host_port("[::1]:2575", types), HostPort("::1", 2575, True))
        self.assertEqual(parse_host_port(":2575", types), HostPort("", 2575))
        self.assertEqual(parse_host_port("2575", types), HostPort("", 2575))
        for text in ("tcp:2575", "unix:/run/mllp.sock", "tcp:ehr:2575", "a b:2575", "ehr"):
            self.assertIsNone(parse_host_port(text, types), text)

    def test_port_range_wording(self) -> None:
        """A port out of range is refused in the same words, with the caller's lowest port."""
        for text, lowest, message in (
            ("h:99999", 0, "port 99999 out of range 0-65535"),
            ("99999", 0, "port 99999 out of range 0-65535"),
            ("h:0", 1, "port 0 out of range 1-65535"),
        ):
            with self.assertRaises(ValueError) as caught:
                parse_host_port(text, frozenset(), lowest_port=lowest)
            self.assertEqual(str(caught.exception), message)


class LoadTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        """With nothing set, the SPEC's defaults apply."""
        s = load_settings({}, {})
        self.assertEqual(s.port, "tcp:2575")
        self.assertEqual(s.idle_timeout, 30)
        self.assertEqual(s.frame_timeout, 60)
        self.assertEqual(s.write_timeout, 5)
        self.assertEqual(s.max_frame_size, 2 * 1024 * 1024)
        self.assertEqual(s.keepalive_period, 60)
        self.assertEqual(s.db_path, "outbox.db")
        self.assertEqual(s.dedup_window, 24 * 3600)
        self.assertEqual(s.max_connections, 0)
        self.assertEqual(s.log_level, "info")
        self.assertIsNone(s.default_charset)
        self.assertEqual(s.max_buffer, 64 * 1024 * 1024)

    def test_option_beats_env_beats_default(self) -> None:
        """An option beats the environment, which beats the default."""
        env = {"MLLP_IDLE_TIMEOUT": "10s", "MLLP_FRAME_TIMEOUT": "20s"}
        s = load_settings(env, {"idle_timeout": "1s", "frame_timeout": None})
        self.assertEqual(s.idle_timeout, 1)
        self.assertEqual(s.frame_timeout, 20)
        self.assertEqual(s.write_timeout, 5)

    def test_wide_default_charset_refused(self) -> None:
        """MLLP_DEFAULT_CHARSET of UTF-16 or UTF-32 fails at startup naming it."""
        for name in ("UNICODE", "UNICODE UTF-16", "UNICODE UTF-32"):
            with self.assertRaises(ConfigError) as ctx:
                load_settings({"MLLP_DEFAULT_CHARSET": name}, {})
            self.assertTrue(str(ctx.exception).startswith("MLLP_DEFAULT_CHARSET: "))

    def test_backlog_added_to_endpoint(self) -> None:
        """MLLP_LISTEN_BACKLOG goes into tcp, ssl and unix endpoints, unless they name a backlog."""
        from mllpd.config import with_backlog

        self.assertEqual(with_backlog("tcp:2575", 4096), "tcp:2575:backlog=4096")
        self.assertEqual(with_backlog("unix:/run/m.sock", 8), "unix:/run/m.sock:backlog=8")
        self.assertEqual(with_backlog("tcp:1:backlog=9", 4096), "tcp:1:backlog=9")
        self.assertEqual(with_backlog("systemd:domain=INET:index=0", 9), "systemd:domain=INET:index=0")
        self.assertEqual(load_settings({}, {}).listen_backlog, 4096)

    def test_max_buffer_below_frame_size(self) -> None:
        """MLLP_MAX_BUFFER smaller than MLLP_MAX_FRAME_SIZE fails naming MLLP_MAX_BUFFER."""
        with self.assertRaises(ConfigError) as ctx:
            load_settings({"MLLP_MAX_BUFFER": "1MiB"}, {})
        self.assertTrue(str(ctx.exception).startswith("MLLP_MAX_BUFFER: "))
        s = load_settings({"MLLP_MAX_BUFFER": "1MiB", "MLLP_MAX_FRAME_SIZE": "512KiB"}, {})
        self.assertEqual(s.max_buffer, 1024 * 1024)

    def test_pod_identity(self) -> None:
        """POD_NAME and POD_NAMESPACE come from the environment."""
        s = load_settings({"POD_NAME": "mllpd-0", "POD_NAMESPACE": "healthcare-prod"}, {})
        self.assertEqual((s.pod_name, s.pod_namespace), ("mllpd-0", "healthcare-prod"))

    def test_error_names_variable(self) -> None:
        """Each bad value fails with one line naming the variable and what it accepts."""
        bad = {
            "MLLP_ADDR": "nowhere",
            "MLLP_MAX_CONNECTIONS": "many",
            "MLLP_IDLE_TIMEOUT": "30",
            "MLLP_FRAME_TIMEOUT": "1 minute",
            "MLLP_WRITE_TIMEOUT": "x",
            "MLLP_MAX_FRAME_SIZE": "0",
            "MLLP_KEEPALIVE_PERIOD": "yes",
            "MLLP_DEFAULT_CHARSET": "KLINGON",
            "MLLP_DEDUP_WINDOW": "a day",
            "MLLP_VALIDATE": "everything",
            "SHUTDOWN_TIMEOUT": "soon",
            "LOG_LEVEL": "loud",
            "PRE_SHUTDOWN_DELAY": "later",
            "TLS_MIN_VERSION": "1.1",
            "TLS_HANDSHAKE_TIMEOUT": "10",
            "MLLP_PROXY_PROTOCOL": "maybe",
            "MLLP_CONNECTOR_PROCESS": "sometimes",
            "MLLP_METRICS_ADDR": "nowhere",
            "MLLP_RETENTION": "0",
            "MLLP_MAX_OUTBOX": "plenty",
            "MLLP_DB_URL": "postgresql://u:secret@[::1",
            "MLLP_DB_INSECURE": "perhaps",
            "MLLP_WAL_LIMIT": "1MiB",
            "MLLP_MAX_BATCH_MESSAGES": "0",
            "MLLP_MAX_BUFFER": "lots",
            "MLLP_LISTEN_BACKLOG": "0",
        }
        paths = {
            "MLLP_DB_PATH", "TLS_CERT_FILE", "TLS_KEY_FILE", "TLS_CLIENT_CA",
            "MLLP_CLIENT_IDENTITIES", "MLLP_CONFIG", "TLS_CRL_FILE",
        }
        self.assertEqual(set(bad) | paths, {s.variable for s in SETTINGS})
        for variable, value in bad.items():
            with self.assertRaises(ConfigError, msg=variable) as ctx:
                load_settings({variable: value}, {})
            text = str(ctx.exception)
            self.assertTrue(text.startswith(variable + ": "), text)
            self.assertIn("expected", text)
            self.assertNotIn("\n", text)
            self.assertNotIn("secret", text)

    def test_tls_settings_need_each_other(self) -> None:
        """A TLS file setting without its partner fails naming the missing one."""
        cases = [
            ({"TLS_CERT_FILE": "c.pem"}, "TLS_KEY_FILE: "),
            ({"TLS_KEY_FILE": "k.pem"}, "TLS_CERT_FILE: "),
            ({"TLS_CLIENT_CA": "ca.pem"}, "TLS_CLIENT_CA: "),
            ({"TLS_CERT_FILE": "c", "TLS_KEY_FILE": "k", "MLLP_CLIENT_IDENTITIES": "i.yaml"},
             "MLLP_CLIENT_IDENTITIES: "),
            ({"TLS_CERT_FILE": "c", "TLS_KEY_FILE": "k", "TLS_CRL_FILE": "crl.pem"},
             "TLS_CRL_FILE: needs TLS_CLIENT_CA"),
        ]
        for env, prefix in cases:
            with self.assertRaises(ConfigError, msg=str(env)) as ctx:
                load_settings(env, {})
            self.assertTrue(str(ctx.exception).startswith(prefix), str(ctx.exception))
        s = load_settings(
            {"TLS_CERT_FILE": "c", "TLS_KEY_FILE": "k", "TLS_CLIENT_CA": "ca",
             "MLLP_CLIENT_IDENTITIES": "i.yaml", "TLS_MIN_VERSION": "1.3", "TLS_CRL_FILE": "crl.pem",
             "MLLP_PROXY_PROTOCOL": "true", "MLLP_METRICS_ADDR": ":9102",
             "PRE_SHUTDOWN_DELAY": "5s"}, {},
        )
        self.assertEqual(
            (s.tls_cert_file, s.tls_key_file, s.tls_client_ca, s.client_identities, s.tls_min_version,
             s.tls_crl_file),
            ("c", "k", "ca", "i.yaml", "1.3", "crl.pem"),
        )
        self.assertEqual((s.proxy_protocol, s.metrics_addr, s.pre_shutdown_delay), (True, "tcp:9102", 5.0))

    def test_error_names_option(self) -> None:
        """A bad command-line value is reported under its option name."""
        with self.assertRaises(ConfigError) as ctx:
            load_settings({}, {"max_frame_size": "lots"})
        self.assertTrue(str(ctx.exception).startswith("--max-frame-size: "))
