"""A seccomp filter standing in for Kubernetes' ``RuntimeDefault`` profile in
the sandbox tests, compiled with libseccomp (a dependency of apt, so on
every Debian machine) through ctypes.

containerd's default profile is an allow-list; this is the matching
deny-list for a container without capabilities: the syscalls that profile
refuses (module loading, mounts and namespaces, kexec, keyrings, BPF,
ptrace and process_vm_*, clock setting, swap, quotas, NUMA policy, ...),
answered with EPERM as the runtime does.
"""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path

__all__ = ["RUNTIME_DEFAULT_DENIED", "compile_filter", "libseccomp"]

RUNTIME_DEFAULT_DENIED = (
    "acct", "add_key", "bpf", "clock_adjtime", "clock_settime", "create_module",
    "delete_module", "finit_module", "fsconfig", "fsmount", "fsopen", "fspick",
    "get_kernel_syms", "get_mempolicy", "init_module", "ioperm", "iopl", "kcmp",
    "kexec_file_load", "kexec_load", "keyctl", "lookup_dcookie", "mbind", "mount",
    "move_mount", "move_pages", "name_to_handle_at", "nfsservctl", "open_by_handle_at",
    "open_tree", "perf_event_open", "pivot_root", "process_vm_readv", "process_vm_writev",
    "ptrace", "query_module", "quotactl", "reboot", "request_key", "set_mempolicy",
    "setns", "settimeofday", "stime", "swapoff", "swapon", "syslog", "sysfs", "_sysctl",
    "umount", "umount2", "unshare", "uselib", "userfaultfd", "ustat", "vm86", "vm86old",
)

_ACT_ALLOW = 0x7FFF0000
_ACT_ERRNO = 0x00050000


def libseccomp() -> ctypes.CDLL | None:
    try:
        lib = ctypes.CDLL("libseccomp.so.2")
    except OSError:
        return None
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.restype = ctypes.c_int
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_export_bpf.restype = ctypes.c_int
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.seccomp_release.restype = None
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    return lib


def compile_filter(path: Path) -> int:
    """Write the BPF program for this machine's architecture to path;
    returns how many syscalls it denies."""
    lib = libseccomp()
    if lib is None:
        raise RuntimeError("libseccomp.so.2 is not installed (Debian package libseccomp2)")
    ctx = lib.seccomp_init(_ACT_ALLOW)
    if not ctx:
        raise RuntimeError("seccomp_init failed")
    try:
        denied = 0
        for name in RUNTIME_DEFAULT_DENIED:
            nr = lib.seccomp_syscall_resolve_name(name.encode())
            if nr < 0:
                continue  # not a syscall on this architecture
            # seccomp_rule_add is variadic; with no argument filters the
            # fixed arguments are all it reads.
            rc = lib.seccomp_rule_add(
                ctypes.c_void_p(ctx), ctypes.c_uint32(_ACT_ERRNO | errno.EPERM),
                ctypes.c_int(nr), ctypes.c_uint(0),
            )
            if rc < 0:
                raise RuntimeError(f"seccomp_rule_add({name}) failed: {os.strerror(-rc)}")
            denied += 1
        with open(path, "wb") as f:
            rc = lib.seccomp_export_bpf(ctx, f.fileno())
        if rc < 0:
            raise RuntimeError(f"seccomp_export_bpf failed: {os.strerror(-rc)}")
        return denied
    finally:
        lib.seccomp_release(ctx)
