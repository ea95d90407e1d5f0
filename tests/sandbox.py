"""Run the installed server the way the image and a rendered Deployment
would, without Docker: bubblewrap for the mounts and namespaces, setpriv for
the user, groups, capabilities and no_new_privs.

- :func:`dockerfile` reads the Dockerfile's stages, so the sandbox uses the
  image's ENTRYPOINT, ENV and WORKDIR, and the build copies what its build
  stage copies.
- :func:`install` does what the image build does: a wheel built from those
  sources, installed (the wheel only) into a fresh virtualenv that borrows
  the third-party packages from this interpreter, bytecode compiled and
  Twisted's plugin caches written, all before anything runs read-only.
- :func:`sandbox_command` turns the pod spec into a bwrap + setpriv command.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.manifests import REPO, Rendered

__all__ = [
    "DRIVER",
    "Dockerfile",
    "Installation",
    "dockerfile",
    "install",
    "missing_tools",
    "parse_quantity",
    "sandbox_command",
]

DRIVER = Path(__file__).with_name("sandbox_driver.py")
BUILD_TIMEOUT = 300.0


def missing_tools() -> str | None:
    """Why the sandbox cannot run here, or None."""
    for tool, package in (("bwrap", "bubblewrap"), ("setpriv", "util-linux")):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian package {package})"
    return None


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str | None:
        found = self.all(keyword)
        return found[-1] if found else None


@dataclass
class Dockerfile:
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def env(self) -> dict[str, str]:
        """The final stage's ENV, in order."""
        out: dict[str, str] = {}
        for args in self.final.all("ENV"):
            for word in shlex.split(args):
                key, sep, value = word.partition("=")
                assert sep, f"ENV in the legacy `ENV key value` form: {args!r}"
                out[key] = value
        return out

    def entrypoint(self) -> list[str]:
        text = self.final.last("ENTRYPOINT")
        assert text is not None, "the image has no ENTRYPOINT"
        argv = json.loads(text)  # exec form, or this fails
        assert isinstance(argv, list) and all(isinstance(a, str) for a in argv)
        return argv

    def build_sources(self) -> list[str]:
        """The paths the build stage copies from the context."""
        sources: list[str] = []
        for args in self.stages[0].all("COPY"):
            words = [w for w in shlex.split(args) if not w.startswith("--")]
            sources += words[:-1]
        return sources


def dockerfile(path: Path = REPO / "Dockerfile") -> Dockerfile:
    """The Dockerfile's stages and instructions (continuations joined,
    comments dropped)."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        args = args.strip()
        if keyword == "FROM":
            m = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", args, re.IGNORECASE)
            assert m is not None, f"unreadable FROM {args!r}"
            stages.append(Stage(m.group(1), m.group(2)))
        elif stages:
            stages[-1].instructions.append((keyword, args))
    return Dockerfile(stages)


@dataclass(frozen=True)
class Installation:
    root: Path
    venv: Path
    wheel: Path

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    @property
    def driver(self) -> Path:
        return self.root / DRIVER.name


def _run(argv: list[str], cwd: Path) -> None:
    # No PYTHONPATH, as in the image build: `trial -j` gives its workers one
    # (its own sys.path, with the checkout's twisted/plugins), under which the
    # plugin cache built here would leave out the venv's own plugin.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True,
                          timeout=BUILD_TIMEOUT, check=False, env=env)
    if done.returncode != 0:
        raise AssertionError(f"{shlex.join(argv)} failed:\n{done.stdout}\n{done.stderr}")


def install(root: Path, image: Dockerfile) -> Installation:
    """Build and install the package as the image does, under root."""
    for parent in root.parents:
        # The sandbox's user must be able to reach the installation.
        assert parent.stat().st_mode & stat.S_IXOTH, f"{parent} is not searchable by others"
    root.chmod(0o755)
    src = root / "src"
    src.mkdir()
    for name in image.build_sources():
        source = REPO / name.rstrip("/")
        if source.is_dir():
            shutil.copytree(source, src / source.name,
                            ignore=shutil.ignore_patterns("__pycache__", "dropin.cache"))
        else:
            shutil.copy2(source, src / source.name)
    wheels = root / "wheels"
    # No build isolation: the build uses this interpreter's setuptools and
    # wheel, so the test needs no index.
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
          "--no-index", "--wheel-dir", str(wheels), str(src)], root)
    (wheel,) = wheels.glob("mllpd-*.whl")
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(venv)],
         root)
    installation = Installation(root, venv, wheel)
    # --ignore-installed: an mllpd in the system site-packages (CI installs
    # one) must not stand in for this wheel.
    _run([sys.executable, "-m", "pip", "--python", str(installation.python), "install",
          "--quiet", "--no-deps", "--no-index", "--ignore-installed", str(wheel)], root)
    site = subprocess.run(
        [str(installation.python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        cwd=root, capture_output=True, text=True, check=True, timeout=BUILD_TIMEOUT,
    ).stdout.strip()
    _run([str(installation.python), "-m", "compileall", "-q", site], root)
    # The image's `twistd` console script, for this venv.
    twistd = venv / "bin" / "twistd"
    twistd.write_text(
        f"#!{installation.python}\nimport sys\n"
        "from twisted.scripts.twistd import run\nsys.exit(run())\n"
    )
    twistd.chmod(0o755)
    # Twisted's plugin caches, written now because the root will be read-only.
    _run([str(installation.python), "-c",
          "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"], root)
    _run([str(twistd), "mllp", "--help"], root)
    shutil.copy2(DRIVER, installation.driver)
    return installation


_QUANTITY = re.compile(r"(\d+)(Ki|Mi|Gi|Ti|k|M|G|T)?")
_FACTORS = {None: 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
            "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def parse_quantity(text: str) -> int:
    """A Kubernetes byte quantity ("64Mi", "10Gi", "1000") in bytes."""
    m = _QUANTITY.fullmatch(str(text))
    assert m is not None, f"unsupported quantity {text!r}"
    return int(m.group(1)) * _FACTORS[m.group(2)]


def _unreachable_ancestor(path: Path) -> Path | None:
    """The topmost directory above path that others may not enter."""
    for parent in reversed(path.resolve().parents):
        if parent != Path("/") and not parent.stat().st_mode & stat.S_IXOTH:
            return parent
    return None


def _searchable_parents(path: Path, below: set[Path]) -> list[str]:
    """bwrap creates the missing directories on the way to a mount point
    with its source's modes (root only, for pyenv or a temporary
    directory); create those below a covering mount searchable instead."""
    argv: list[str] = []
    for parent in reversed(path.parents):
        if any(b in parent.parents for b in below):
            argv += ["--perms", "0755", "--dir", str(parent)]
    return argv


def _mirror(directory: Path, covered: set[str], hidden: set[Path], expand: set[Path]
            ) -> list[str]:
    """bwrap arguments that rebuild directory on the sandbox's root from
    read-only binds of its entries."""
    argv: list[str] = []
    for entry in sorted(os.listdir(directory)):
        path = directory / entry
        if str(path) in covered:
            continue
        if path.is_symlink():
            argv += ["--symlink", os.readlink(path), str(path)]
        elif path in hidden:
            argv += ["--perms", "0755", "--dir", str(path)]
        elif path in expand:
            argv += ["--perms", f"{stat.S_IMODE(path.stat().st_mode):04o}", "--dir", str(path)]
            argv += _mirror(path, covered, hidden, expand)
        else:
            argv += ["--ro-bind", str(path), str(path)]
    return argv


# Run as root inside the sandbox before dropping privileges: what the kubelet
# does for fsGroup (group-own each writable volume, group rw, setgid).
_FSGROUP_PRELUDE = (
    'g="$1"; shift; '
    'while [ "$1" != -- ]; do chgrp "$g" "$1" && chmod g+rwxs "$1" || exit 97; shift; done; '
    'shift; exec "$@"'
)


def sandbox_command(
    r: Rendered, inst: Installation, image: Dockerfile, workdir: Path, control_id: str,
    seccomp_fd: int | None = None,
) -> tuple[list[str], dict[str, Path]]:
    """bwrap + setpriv argv that runs the driver (and through it the server)
    under the rendered pod's context; also the host directories standing in
    for PersistentVolumeClaims, by claim name. A ``RuntimeDefault`` seccomp
    profile needs ``seccomp_fd``, an open file holding the filter
    (:func:`tests.seccomp.compile_filter`), passed on to bwrap."""
    pod = r.pod()
    container = r.container()
    psc: dict[str, Any] = pod.get("securityContext", {})
    csc: dict[str, Any] = container.get("securityContext", {})
    uid = csc.get("runAsUser", psc.get("runAsUser"))
    gid = csc.get("runAsGroup", psc.get("runAsGroup"))
    assert csc.get("readOnlyRootFilesystem") is True, (
        "readOnlyRootFilesystem is not true: the sandbox will not bind this "
        "machine's root writable"
    )
    assert uid is not None and uid != 0, f"runAsUser {uid!r}: the pod would run as root"
    assert csc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True, "runAsNonRoot is not set"
    assert gid is not None, "runAsGroup is not set: the image's group would be root's"

    profile = csc.get("seccompProfile", psc.get("seccompProfile", {})).get("type")
    argv = ["bwrap"]
    if profile == "RuntimeDefault":
        assert seccomp_fd is not None, "the pod asks for RuntimeDefault: pass a seccomp filter"
        argv += ["--seccomp", str(seccomp_fd)]
    else:
        assert profile in (None, "Unconfined"), f"unsupported seccomp profile {profile!r}"
    argv += [
        "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
        "--die-with-parent", "--new-session",
    ]
    # The root: an empty tmpfs holding read-only binds of this machine's
    # top-level directories, itself made read-only once every mount point
    # exists (a container runtime creates mount points the image lacks, such
    # as /data; a read-only bind of / could not).
    mounts = sorted(container.get("volumeMounts", []), key=lambda m: m["mountPath"])
    covered = {m["mountPath"] for m in mounts} | {"/dev", "/proc"}
    # The interpreter may live under a directory only root may enter (pyenv
    # in /root); in the image it is world-readable under /usr/local. Such a
    # directory becomes an empty one holding just what is needed, read-only.
    needed = [Path(sys.base_prefix).resolve(), inst.root]
    hidden = {h for h in map(_unreachable_ancestor, needed) if h is not None}
    # Directories that must be rebuilt entry by entry because a mount point
    # inside them does not exist here (/etc for /etc/mllp/config), or
    # because they hold a hidden directory.
    expand = {a for m in mounts if not Path(m["mountPath"]).exists()
              for a in Path(m["mountPath"]).parents if a.exists() and a != Path("/")}
    expand |= {a for h in hidden for a in h.parents if a != Path("/")}
    argv += ["--tmpfs", "/"]
    argv += _mirror(Path("/"), covered, hidden, expand)
    argv += ["--dev", "/dev", "--proc", "/proc"]
    for path in needed:
        if any(h in path.parents for h in hidden):
            argv += _searchable_parents(path, hidden) + ["--ro-bind", str(path), str(path)]
    # Hide the checkout: the server must run from the installed wheel.
    read_only = ["/"]
    # (Not needed where a hidden directory or a volume already covers it.)
    covering = hidden | {Path(m) for m in covered}
    if not any(c == REPO or c in REPO.parents for c in covering):
        argv += ["--perms", "0755", "--tmpfs", str(REPO)]
        read_only.append(str(REPO))

    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    writable: list[str] = []
    claims: dict[str, Path] = {}
    for mount in mounts:
        path = mount["mountPath"]
        volume = volumes[mount["name"]]
        if "emptyDir" in volume:
            limit = (volume["emptyDir"] or {}).get("sizeLimit")
            if limit is not None:
                argv += ["--size", str(parse_quantity(limit))]
            argv += ["--tmpfs", path]
            writable.append(path)
        elif "persistentVolumeClaim" in volume:
            claim = volume["persistentVolumeClaim"]["claimName"]
            host = workdir / "claims" / claim  # kept between runs, like a claim
            host.mkdir(parents=True, exist_ok=True)
            claims[claim] = host
            argv += ["--bind", str(host), path]
            writable.append(path)
        elif "configMap" in volume:
            cm = r.get("ConfigMap", volume["configMap"]["name"])
            assert cm is not None, f"ConfigMap {volume['configMap']['name']} is not rendered"
            host = workdir / "configmaps" / cm["metadata"]["name"]
            host.mkdir(parents=True, exist_ok=True)
            # The kubelet's modes, whatever this process's umask: directories
            # searchable, files the volume's defaultMode (0644 unless set).
            host.parent.chmod(0o755)
            host.chmod(0o755)
            for key, value in cm.get("data", {}).items():
                (host / key).write_text(value)
                (host / key).chmod(volume["configMap"].get("defaultMode", 0o644))
            # The kubelet creates missing parents (/etc/mllp) searchable.
            for parent in reversed(Path(path).parents):
                if not parent.exists():
                    argv += ["--perms", "0755", "--dir", str(parent)]
            argv += ["--ro-bind", str(host), path]  # configMap volumes are read-only
        else:
            raise AssertionError(f"the sandbox cannot stand in for volume {volume}")
        if mount.get("readOnly"):
            argv += ["--remount-ro", path]
    # Put the installation back if a volume (e.g. /tmp) covered it; bwrap
    # would create the directories leading to it for root only.
    argv += _searchable_parents(inst.root, {Path(m) for m in covered})
    argv += ["--ro-bind", str(inst.root), str(inst.root)]
    for ro_path in read_only:
        argv += ["--remount-ro", ro_path]

    env = image.env()
    env["PATH"] = f"{inst.venv / 'bin'}:/usr/local/bin:/usr/bin:/bin"
    env.update(r.environment(pod_name="mllpd-sandbox"))
    argv += ["--clearenv"]
    for key, value in env.items():
        argv += ["--setenv", key, value]
    workdir_in_image = container.get("workingDir") or image.final.last("WORKDIR") or "/"
    argv += ["--chdir", workdir_in_image]

    fs_group = psc.get("fsGroup")
    groups = [g for g in (fs_group, *psc.get("supplementalGroups", [])) if g is not None]
    setpriv = ["setpriv", "--reuid", str(uid), "--regid", str(gid)]
    setpriv += ["--groups", ",".join(map(str, groups))] if groups else ["--clear-groups"]
    setpriv += ["--inh-caps=-all", "--ambient-caps=-all"]
    dropped = csc.get("capabilities", {}).get("drop", [])
    added = csc.get("capabilities", {}).get("add", [])
    assert not added, f"capabilities added: {added}"
    if "ALL" in dropped:
        setpriv += ["--bounding-set=-all"]
    elif dropped:
        setpriv += ["--bounding-set=" + ",".join(f"-{c.lower()}" for c in dropped)]
    if csc.get("allowPrivilegeEscalation") is False:
        setpriv += ["--no-new-privs"]

    port = next(p["containerPort"] for p in container["ports"] if p["name"] == "mllp")
    driver = [
        str(inst.python), str(inst.driver),
        "--entrypoint", json.dumps(image.entrypoint()),
        "--writable", json.dumps(writable),
        "--port", str(port),
        "--grace", str(pod.get("terminationGracePeriodSeconds", 30)),
        "--control-id", control_id,
    ]
    prelude = ["/bin/sh", "-c", _FSGROUP_PRELUDE, "sh", str(fs_group if fs_group is not None
                                                             else gid)]
    argv += ["--", *prelude, *writable, "--", *setpriv, "--", *driver]
    return argv, claims
