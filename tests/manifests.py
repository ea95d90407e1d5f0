"""Render the kustomize tree with ``kubectl kustomize`` and check it against
SPEC section 8.

Each ``check_*`` function returns a list of problems (empty when the
manifests are right), so the same checks serve the tests of the real tree
and the tests that break a copy of it on purpose.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mllpd.config import load_settings, parse_duration

__all__ = [
    "EXPECTED",
    "KUSTOMIZE",
    "OVERLAYS",
    "Expected",
    "Rendered",
    "check_overlay",
    "check_tls",
    "kubectl",
    "render",
    "tree_copy",
]

REPO = Path(__file__).resolve().parents[1]
KUSTOMIZE = REPO / "kustomize"
OVERLAYS = ("dev", "staging", "prod", "persistent")
RENDER_TIMEOUT = 60.0

# Objects the manifests refer to but do not create: the TLS Secret and the
# PostgreSQL URL's Secret are made by the operator (docs/deploying.md).
EXTERNAL_SECRETS = frozenset({"mllp-tls", "mllp-db"})
NAMESPACED = frozenset(
    {"ConfigMap", "Service", "Deployment", "PodDisruptionBudget", "NetworkPolicy",
     "HorizontalPodAutoscaler", "PersistentVolumeClaim", "Secret"}
)


def kubectl() -> str | None:
    return shutil.which("kubectl")


def render(path: Path) -> Rendered:
    """``kubectl kustomize path``, parsed."""
    tool = kubectl()
    if tool is None:
        raise RuntimeError("kubectl is not installed")
    done = subprocess.run(
        [tool, "kustomize", str(path)], capture_output=True, text=True,
        timeout=RENDER_TIMEOUT, check=False,
    )
    if done.returncode != 0:
        raise AssertionError(f"kubectl kustomize {path} failed:\n{done.stderr}")
    return Rendered([d for d in yaml.safe_load_all(done.stdout) if d])


@contextmanager
def tree_copy() -> Iterator[Path]:
    """A temporary copy of kustomize/ (removed afterwards), to change."""
    with tempfile.TemporaryDirectory(prefix="mllpd-kustomize-") as tmp:
        root = Path(tmp) / "kustomize"
        shutil.copytree(KUSTOMIZE, root)
        yield root


class Rendered:
    """The objects one kustomization renders to."""

    def __init__(self, docs: list[dict[str, Any]]) -> None:
        self.docs = docs

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d.get("kind") == kind]

    def get(self, kind: str, name: str | None = None) -> dict[str, Any] | None:
        found = [d for d in self.all(kind) if name is None or d["metadata"]["name"] == name]
        return found[0] if len(found) == 1 else None

    def deployment(self) -> dict[str, Any]:
        found = self.all("Deployment")
        assert len(found) == 1, f"expected one Deployment, got {len(found)}"
        return found[0]

    def pod(self) -> dict[str, Any]:
        spec: dict[str, Any] = self.deployment()["spec"]["template"]["spec"]
        return spec

    def container(self) -> dict[str, Any]:
        found = [c for c in self.pod()["containers"] if c["name"] == "mllpd"]
        assert len(found) == 1, "expected one container named mllpd"
        return found[0]

    def environment(self, pod_name: str = "mllpd-0") -> dict[str, str]:
        """The container's environment as the kubelet would build it:
        envFrom ConfigMaps first, then env (downward API values filled in)."""
        container = self.container()
        namespace = self.deployment()["metadata"].get("namespace", "default")
        env: dict[str, str] = {}
        for source in container.get("envFrom", []):
            ref = source.get("configMapRef")
            assert ref is not None, f"unsupported envFrom {source}"
            cm = self.get("ConfigMap", ref["name"])
            assert cm is not None, f"envFrom ConfigMap {ref['name']} is not rendered"
            env.update({k: str(v) for k, v in cm.get("data", {}).items()})
        fields = {"metadata.name": pod_name, "metadata.namespace": namespace}
        for var in container.get("env", []):
            if "value" in var:
                env[var["name"]] = str(var["value"])
            elif "secretKeyRef" in var["valueFrom"]:
                continue  # the operator's Secret: not known here
            else:
                env[var["name"]] = fields[var["valueFrom"]["fieldRef"]["fieldPath"]]
        return env


@dataclass(frozen=True)
class Expected:
    """One column of SPEC section 8's overlay table."""

    namespace: str
    replicas: int
    log_level: str
    max_connections: str
    cpu: tuple[str, str]
    memory: tuple[str, str]
    hpa: tuple[int, int, int] | None = None  # min, max, CPU %
    zone_spread: bool = False
    data_claim: str | None = None  # PVC at /data instead of the emptyDir
    db_secret: tuple[str, str] | None = None  # MLLP_DB_URL's Secret and key
    claim_size: str | None = None
    strategy: str = "RollingUpdate"


EXPECTED: Mapping[str, Expected] = {
    "base": Expected(
        namespace="", replicas=1, log_level="info", max_connections="100",
        cpu=("100m", "500m"), memory=("64Mi", "256Mi"),
    ),
    "dev": Expected(
        namespace="healthcare-dev", replicas=1, log_level="debug", max_connections="10",
        cpu=("50m", "250m"), memory=("32Mi", "128Mi"),
    ),
    "staging": Expected(
        namespace="healthcare-staging", replicas=2, log_level="info", max_connections="100",
        cpu=("100m", "500m"), memory=("64Mi", "256Mi"),
    ),
    "prod": Expected(
        namespace="healthcare-prod", replicas=2, log_level="info", max_connections="200",
        cpu=("250m", "1000m"), memory=("128Mi", "512Mi"), hpa=(2, 10, 70), zone_spread=True,
        db_secret=("mllp-db", "url"),
    ),
    "persistent": Expected(
        namespace="healthcare-prod", replicas=1, log_level="info", max_connections="200",
        cpu=("250m", "1000m"), memory=("128Mi", "512Mi"), zone_spread=True,
        data_claim="mllpd-data", claim_size="10Gi", strategy="Recreate",
    ),
}

# Settings every rendering carries in its ConfigMap (SPEC section 8).
BASE_SETTINGS = {
    "MLLP_ADDR": ":2575",
    "MLLP_IDLE_TIMEOUT": "30s",
    "MLLP_FRAME_TIMEOUT": "60s",
    "MLLP_WRITE_TIMEOUT": "5s",
    "PRE_SHUTDOWN_DELAY": "5s",
    "SHUTDOWN_TIMEOUT": "30s",
}
POD_SECURITY = {
    "runAsNonRoot": True,
    "runAsUser": 65534,
    "runAsGroup": 65534,
    "fsGroup": 65534,
    "seccompProfile": {"type": "RuntimeDefault"},
}
CONTAINER_SECURITY = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
}
LIVENESS = {
    "tcpSocket": {"port": "mllp"}, "initialDelaySeconds": 5, "periodSeconds": 10,
    "timeoutSeconds": 3, "failureThreshold": 3,
}
READINESS = {
    "tcpSocket": {"port": "mllp"}, "initialDelaySeconds": 5, "periodSeconds": 5,
    "timeoutSeconds": 3, "failureThreshold": 2,
}
CLIENT_LABEL = {"network-policy/mllp-client": "true"}


class _Problems:
    def __init__(self) -> None:
        self.found: list[str] = []

    def equal(self, what: str, actual: object, expected: object) -> None:
        if actual != expected:
            self.found.append(f"{what}: {actual!r}, expected {expected!r}")

    def true(self, what: str, condition: bool) -> None:
        if not condition:
            self.found.append(what)


def _subset(labels: Mapping[str, str] | None, of: Mapping[str, str]) -> bool:
    return bool(labels) and all(of.get(k) == v for k, v in (labels or {}).items())


def check_overlay(name: str, r: Rendered) -> list[str]:
    """Every SPEC section 8 value of overlay ``name`` (or "base")."""
    want = EXPECTED[name]
    p = _Problems()
    deployment = r.deployment()
    pod = r.pod()
    container = r.container()
    env = r.environment()

    # Namespace on every namespaced object.
    for doc in r.docs:
        if doc["kind"] in NAMESPACED:
            p.equal(f"{doc['kind']}/{doc['metadata']['name']} namespace",
                    doc["metadata"].get("namespace", ""), want.namespace)

    # Deployment.
    p.equal("replicas", deployment["spec"].get("replicas"), want.replicas)
    strategy = deployment["spec"].get("strategy", {})
    if want.strategy == "Recreate":
        # Exactly {type: Recreate}: a leftover rollingUpdate is rejected by
        # the API server.
        p.equal("strategy", strategy, {"type": "Recreate"})
    else:
        p.equal("strategy type", strategy.get("type"), "RollingUpdate")
    p.equal("pod securityContext", {k: pod.get("securityContext", {}).get(k)
                                    for k in POD_SECURITY}, POD_SECURITY)
    p.equal("container securityContext", container.get("securityContext"), CONTAINER_SECURITY)
    p.equal("liveness probe", container.get("livenessProbe"), LIVENESS)
    p.equal("readiness probe", container.get("readinessProbe"), READINESS)
    p.equal("container ports", [(x.get("name"), x.get("containerPort"), x.get("protocol"))
                                for x in container.get("ports", [])], [("mllp", 2575, "TCP")])
    p.equal("terminationGracePeriodSeconds", pod.get("terminationGracePeriodSeconds"), 45)
    p.equal("cpu request/limit", (container["resources"]["requests"].get("cpu"),
                                  container["resources"]["limits"].get("cpu")), want.cpu)
    p.equal("memory request/limit", (container["resources"]["requests"].get("memory"),
                                     container["resources"]["limits"].get("memory")),
            want.memory)
    downward = {v["name"]: v.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
                for v in container.get("env", [])}
    p.equal("POD_NAME from the downward API", downward.get("POD_NAME"), "metadata.name")
    p.equal("POD_NAMESPACE from the downward API", downward.get("POD_NAMESPACE"),
            "metadata.namespace")
    secrets = {v["name"]: v.get("valueFrom", {}).get("secretKeyRef", {})
               for v in container.get("env", [])}
    db_url = secrets.get("MLLP_DB_URL")
    p.equal("MLLP_DB_URL from a Secret (PostgreSQL outbox)",
            (db_url["name"], db_url["key"]) if db_url else None, want.db_secret)
    if want.db_secret is not None:
        # Several replicas may run (an HPA) only with the shared outbox.
        p.true("MLLP_DB_URL names an operator-made Secret", db_url is not None
               and (db_url["name"] in EXTERNAL_SECRETS or r.get("Secret", db_url["name"])))
    p.true("the pod does not mount a service account token",
           pod.get("automountServiceAccountToken") is False)

    # Settings, as the container sees them.
    for var, value in BASE_SETTINGS.items():
        p.equal(var, env.get(var), value)
    p.equal("LOG_LEVEL", env.get("LOG_LEVEL"), want.log_level)
    p.equal("MLLP_MAX_CONNECTIONS", env.get("MLLP_MAX_CONNECTIONS"), want.max_connections)
    p.equal("MLLP_DB_PATH", env.get("MLLP_DB_PATH"), "/data/outbox.db")
    try:
        load_settings(env, {})
    except ValueError as e:
        p.found.append(f"mllpd refuses the rendered settings: {e}")
    p.found.extend(_check_grace(r, env))

    # Volumes: the outbox on /data, the rules read-only.
    mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    data = volumes.get(mounts.get("/data", {}).get("name", ""), {})
    if want.data_claim is None:
        p.true("/data is an emptyDir", "emptyDir" in data and len(data) == 2)
    else:
        p.equal("/data volume", data, {"name": "data", "persistentVolumeClaim":
                                       {"claimName": want.data_claim}})
        pvc = r.get("PersistentVolumeClaim", want.data_claim)
        p.true(f"PersistentVolumeClaim {want.data_claim} is rendered", pvc is not None)
        if pvc is not None:
            p.equal("PVC access modes", pvc["spec"].get("accessModes"), ["ReadWriteOnce"])
            p.equal("PVC storageClassName", pvc["spec"].get("storageClassName"), "local-path")
            p.equal("PVC size", pvc["spec"].get("resources", {}).get("requests", {})
                    .get("storage"), want.claim_size)
    config_path = env.get("MLLP_CONFIG", "")
    config_mount = mounts.get(str(Path(config_path).parent), {})
    p.true("MLLP_CONFIG names a file on a read-only mount", config_mount.get("readOnly") is True)
    config_volume = volumes.get(config_mount.get("name", ""), {})
    cm_name = config_volume.get("configMap", {}).get("name", "")
    cm = r.get("ConfigMap", cm_name)
    p.true("MLLP_CONFIG's file is in its ConfigMap",
           cm is not None and Path(config_path).name in cm.get("data", {}))

    # Service.
    service = r.get("Service", "mllpd")
    p.true("Service mllpd is rendered", service is not None)
    if service is not None:
        spec = service["spec"]
        p.equal("Service type", spec.get("type"), "ClusterIP")
        p.equal("Service ports", [(x.get("port"), x.get("targetPort"), x.get("protocol"))
                                  for x in spec.get("ports", [])], [(2575, "mllp", "TCP")])
        p.equal("Service sessionAffinity", spec.get("sessionAffinity"), "ClientIP")
        p.equal("Service session timeout",
                spec.get("sessionAffinityConfig", {}).get("clientIP", {}).get("timeoutSeconds"),
                3600)

    # NetworkPolicy: MLLP only from labelled namespaces.
    policy = r.get("NetworkPolicy", "mllpd")
    p.true("NetworkPolicy mllpd is rendered", policy is not None)
    if policy is not None:
        spec = policy["spec"]
        p.equal("NetworkPolicy types", spec.get("policyTypes"), ["Ingress"])
        p.equal("NetworkPolicy ingress", spec.get("ingress"), [{
            "from": [{"namespaceSelector": {"matchLabels": CLIENT_LABEL}}],
            "ports": [{"protocol": "TCP", "port": 2575}],
        }])

    # PodDisruptionBudget: base keeps minAvailable 1 (SPEC); a deployable
    # overlay must let a node drain evict a pod at its starting size.
    pdb = r.get("PodDisruptionBudget", "mllpd")
    p.true("PodDisruptionBudget mllpd is rendered", pdb is not None)
    if pdb is not None:
        spec = pdb["spec"]
        if name == "base":
            p.equal("PDB minAvailable", spec.get("minAvailable"), 1)
        else:
            p.true(f"the PDB lets a drain evict one of {want.replicas} pods "
                   f"(minAvailable {spec.get('minAvailable')}, "
                   f"maxUnavailable {spec.get('maxUnavailable')})",
                   _allows_eviction(spec, want.replicas))
        if want.replicas > 1:
            p.equal("PDB minAvailable", spec.get("minAvailable"), 1)

    # HPA.
    hpas = r.all("HorizontalPodAutoscaler")
    if want.hpa is None:
        p.equal("HorizontalPodAutoscalers", [h["metadata"]["name"] for h in hpas], [])
    else:
        p.equal("HorizontalPodAutoscalers", len(hpas), 1)
        if hpas:
            p.found.extend(_check_hpa(r, hpas[0], want.hpa))

    # Zone spread.
    spread = pod.get("topologySpreadConstraints", [])
    if want.zone_spread:
        zones = [c for c in spread if c.get("topologyKey") == "topology.kubernetes.io/zone"]
        p.true("a zone topology spread constraint", len(zones) == 1)
        if zones:
            p.equal("zone spread maxSkew", zones[0].get("maxSkew"), 1)
    else:
        p.equal("topologySpreadConstraints", spread, [])

    p.found.extend(check_references(r))
    p.found.extend(check_selectors(r))
    return p.found


def _allows_eviction(spec: Mapping[str, Any], replicas: int) -> bool:
    if "maxUnavailable" in spec:
        return int(spec["maxUnavailable"]) >= 1
    return int(spec.get("minAvailable", 0)) < replicas


def _check_grace(r: Rendered, env: Mapping[str, str]) -> list[str]:
    grace = r.pod().get("terminationGracePeriodSeconds", 30)
    delay = parse_duration(env.get("PRE_SHUTDOWN_DELAY", "0s"))
    drain = parse_duration(env.get("SHUTDOWN_TIMEOUT", "30s"))
    if grace > delay + drain:
        return []
    return [f"terminationGracePeriodSeconds {grace} must exceed PRE_SHUTDOWN_DELAY "
            f"+ SHUTDOWN_TIMEOUT ({delay:g}s + {drain:g}s)"]


def _check_hpa(r: Rendered, hpa: dict[str, Any], want: tuple[int, int, int]) -> list[str]:
    p = _Problems()
    spec = hpa["spec"]
    p.equal("HPA apiVersion", hpa["apiVersion"], "autoscaling/v2")
    target = spec.get("scaleTargetRef", {})
    deployment = r.deployment()
    p.equal("HPA target", (target.get("apiVersion"), target.get("kind"), target.get("name")),
            ("apps/v1", "Deployment", deployment["metadata"]["name"]))
    p.equal("HPA min/max", (spec.get("minReplicas"), spec.get("maxReplicas")), want[:2])
    p.equal("HPA metrics", spec.get("metrics"), [{
        "type": "Resource",
        "resource": {"name": "cpu", "target": {"type": "Utilization",
                                               "averageUtilization": want[2]}},
    }])
    p.true("the Deployment starts within the HPA's range",
           want[0] <= deployment["spec"].get("replicas", 1) <= want[1])
    p.true("the container requests CPU (the HPA's utilisation is relative to it)",
           "cpu" in r.container()["resources"].get("requests", {}))
    return p.found


def check_references(r: Rendered) -> list[str]:
    """Every ConfigMap, Secret, PVC and volume a pod refers to exists."""
    p = _Problems()
    pod = r.pod()
    names = {kind: {d["metadata"]["name"] for d in r.all(kind)}
             for kind in ("ConfigMap", "Secret", "PersistentVolumeClaim")}
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for container in pod.get("containers", []):
        mounted = set()
        for mount in container.get("volumeMounts", []):
            mounted.add(mount["name"])
            p.true(f"volumeMount {mount['name']} has a volume", mount["name"] in volumes)
        for name in volumes:
            p.true(f"volume {name} is mounted", name in mounted)
        for source in container.get("envFrom", []):
            ref = source.get("configMapRef", {}).get("name")
            p.true(f"envFrom ConfigMap {ref} exists", ref in names["ConfigMap"])
    for volume in volumes.values():
        if "configMap" in volume:
            ref = volume["configMap"]["name"]
            p.true(f"volume ConfigMap {ref} exists", ref in names["ConfigMap"])
        if "secret" in volume:
            ref = volume["secret"]["secretName"]
            p.true(f"volume Secret {ref} exists or is documented as made by the operator",
                   ref in names["Secret"] or ref in EXTERNAL_SECRETS)
        if "persistentVolumeClaim" in volume:
            ref = volume["persistentVolumeClaim"]["claimName"]
            p.true(f"PersistentVolumeClaim {ref} exists", ref in names["PersistentVolumeClaim"])
    return p.found


def check_selectors(r: Rendered) -> list[str]:
    """Every selector in the rendering picks the Deployment's pods."""
    p = _Problems()
    deployment = r.deployment()
    pod_labels = deployment["spec"]["template"]["metadata"].get("labels", {})
    p.true("the Deployment selector matches its pod labels",
           _subset(deployment["spec"]["selector"].get("matchLabels"), pod_labels))
    service = r.get("Service", "mllpd")
    if service is not None:
        p.true("the Service selector matches the pod labels",
               _subset(service["spec"].get("selector"), pod_labels))
    pdb = r.get("PodDisruptionBudget", "mllpd")
    if pdb is not None:
        p.true("the PDB selector matches the pod labels",
               _subset(pdb["spec"]["selector"].get("matchLabels"), pod_labels))
    policy = r.get("NetworkPolicy", "mllpd")
    if policy is not None:
        p.true("the NetworkPolicy podSelector matches the pod labels",
               _subset(policy["spec"]["podSelector"].get("matchLabels"), pod_labels))
    for c in r.pod().get("topologySpreadConstraints", []):
        p.true("the topology spread selector matches the pod labels",
               _subset(c.get("labelSelector", {}).get("matchLabels"), pod_labels))
    return p.found


def check_tls(r: Rendered, *, client_ca: bool) -> list[str]:
    """The TLS component: Secret mllp-tls read-only at /etc/mllp/tls and the
    TLS_* variables naming files in it."""
    p = _Problems()
    container = r.container()
    env = r.environment()
    mounts = [m for m in container.get("volumeMounts", []) if m["mountPath"] == "/etc/mllp/tls"]
    p.equal("mounts at /etc/mllp/tls", len(mounts), 1)
    if mounts:
        p.true("/etc/mllp/tls is mounted read-only", mounts[0].get("readOnly") is True)
        volume = {v["name"]: v for v in r.pod()["volumes"]}.get(mounts[0]["name"], {})
        p.equal("/etc/mllp/tls Secret", volume.get("secret", {}).get("secretName"), "mllp-tls")
    p.equal("TLS_CERT_FILE", env.get("TLS_CERT_FILE"), "/etc/mllp/tls/tls.crt")
    p.equal("TLS_KEY_FILE", env.get("TLS_KEY_FILE"), "/etc/mllp/tls/tls.key")
    p.equal("TLS_CLIENT_CA", env.get("TLS_CLIENT_CA"),
            "/etc/mllp/tls/ca.crt" if client_ca else None)
    p.found.extend(check_references(r))
    return p.found
