"""The seccomp filter of every sandbox: allow by default, deny the syscalls that reach the kernel's
most dangerous surfaces or could undo the sandbox.

One policy, two forms:
- bwrap: BPF built once per process with libseccomp (PyPI `pyseccomp`) and handed to bwrap
  through a memfd. Denied calls fail with EPERM (clone3 with ENOSYS, so glibc falls back to
  clone, whose namespace flags are checked). Other architectures' syscall tables (x32/ia32) are
  killed by libseccomp's default bad-arch action.
- gVisor: the OCI `linux.seccomp` section (`oci_seccomp`), which runsc (`--oci-seccomp`) applies
  in its own kernel to the sandbox's first process. Same rules, except clone3: gVisor has no
  clone3 at all (ENOSYS already), and this runsc ignores `errnoRet` (every denial is EPERM),
  which would stop glibc from falling back to clone.
"""

from __future__ import annotations

import errno
import os

from hutch.errors import BackendUnavailable

DENIED = (
    # mounts and the root
    "mount", "umount2", "pivot_root", "chroot", "move_mount", "fsopen", "fsconfig", "fsmount",
    "fspick", "open_tree", "mount_setattr",
    # namespaces (new user namespaces are the classic privilege-escalation step)
    "unshare", "setns",
    # debugging other processes, reading their memory
    "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd", "kcmp",
    # the kernel itself
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module", "reboot",
    "swapon", "swapoff", "acct", "quotactl", "quotactl_fd", "syslog", "lookup_dcookie", "uselib",
    "iopl", "ioperm", "vhangup", "nfsservctl",
    # clocks shared with the host
    "clock_settime", "clock_adjtime", "settimeofday", "adjtimex",
    # large attack surfaces nobody in a sandbox needs
    "bpf", "perf_event_open", "userfaultfd", "io_uring_setup", "io_uring_enter", "io_uring_register",
    "keyctl", "add_key", "request_key", "open_by_handle_at", "name_to_handle_at",
    "fanotify_init",
)  # fmt: skip

NAMESPACE_FLAGS = (
    0x10000000  # CLONE_NEWUSER
    | 0x00020000  # CLONE_NEWNS
    | 0x20000000  # CLONE_NEWPID
    | 0x40000000  # CLONE_NEWNET
    | 0x08000000  # CLONE_NEWIPC
    | 0x04000000  # CLONE_NEWUTS
    | 0x02000000  # CLONE_NEWCGROUP
)
TIOCSTI = 0x5412  # inject input into another terminal
TIOCLINUX = 0x541C

_bpf: bytes | None = None


def filter_bpf() -> bytes:
    """The compiled filter (cached)."""
    global _bpf
    if _bpf is None:
        try:
            import pyseccomp as seccomp
        except (ImportError, OSError) as exc:
            raise BackendUnavailable(f"libseccomp is not usable: {exc}") from None
        flt = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
        for name in DENIED:
            try:
                flt.add_rule(seccomp.ERRNO(errno.EPERM), name)
            except (RuntimeError, ValueError):
                pass  # a syscall this kernel/libseccomp does not know cannot be called either
        for bit in range(32):
            flag = 1 << bit
            if NAMESPACE_FLAGS & flag:
                flt.add_rule(seccomp.ERRNO(errno.EPERM), "clone", seccomp.Arg(0, seccomp.MASKED_EQ, flag, flag))
        flt.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")  # flags live in memory; glibc falls back
        for request in (TIOCSTI, TIOCLINUX):
            flt.add_rule(seccomp.ERRNO(errno.EPERM), "ioctl", seccomp.Arg(1, seccomp.MASKED_EQ, 0xFFFFFFFF, request))
        with os.fdopen(os.memfd_create("hutch-seccomp-build", 0), "w+b") as out:
            flt.export_bpf(out)
            out.flush()
            out.seek(0)
            _bpf = out.read()
    return _bpf


def filter_fd() -> int:
    """A fresh fd holding the filter, positioned at 0, for bwrap's `--seccomp FD`."""
    fd = os.memfd_create("hutch-seccomp", 0)
    os.write(fd, filter_bpf())
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def oci_seccomp() -> dict:
    """The same policy as an OCI runtime-spec `linux.seccomp` section."""
    deny = {"action": "SCMP_ACT_ERRNO", "errnoRet": errno.EPERM}
    rules: list[dict] = [{"names": list(DENIED), **deny}]
    for bit in range(32):
        flag = 1 << bit
        if NAMESPACE_FLAGS & flag:
            condition = {"index": 0, "value": flag, "valueTwo": flag, "op": "SCMP_CMP_MASKED_EQ"}
            rules.append({"names": ["clone"], **deny, "args": [condition]})
    for request in (TIOCSTI, TIOCLINUX):
        condition = {"index": 1, "value": 0xFFFFFFFF, "valueTwo": request, "op": "SCMP_CMP_MASKED_EQ"}
        rules.append({"names": ["ioctl"], **deny, "args": [condition]})
    arch = {"x86_64": "SCMP_ARCH_X86_64", "aarch64": "SCMP_ARCH_AARCH64"}.get(os.uname().machine, "SCMP_ARCH_NATIVE")
    return {"defaultAction": "SCMP_ACT_ALLOW", "architectures": [arch], "syscalls": rules}
