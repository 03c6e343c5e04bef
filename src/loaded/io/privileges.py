"""Dropping privileges: chroot, user and group, and a minimal capability set.

Python has no capset(2) and no bounding-set calls, so they go through libc with
ctypes; everything else is in ``os``. The order matters:

1. ``PR_SET_KEEPCAPS`` so that setuid() keeps the permitted set;
2. drop every other capability from the bounding set (needs CAP_SETPCAP, which
   root still has);
3. look up the user's groups (needs /etc/group: before the chroot);
4. chroot to an empty, root-owned, read-only directory;
5. setgroups, setresgid, setresuid;
6. capset: effective = permitted = the kept set, inheritable = none; clear the
   ambient set; no_new_privs, so nothing exec'd later can regain anything.
"""

from __future__ import annotations

import ctypes
import os
import pwd
import stat
from collections.abc import Iterable
from pathlib import Path

CAP_CHOWN = 0
CAP_DAC_OVERRIDE = 1
CAP_KILL = 5
CAP_SETGID = 6
CAP_SETUID = 7
CAP_SETPCAP = 8
CAP_NET_ADMIN = 12
CAP_NET_RAW = 13
CAP_SYS_CHROOT = 18
CAP_SYS_NICE = 23

WORKER_CAPS = frozenset((CAP_NET_ADMIN, CAP_NET_RAW))
# What the supervisor needs to undo the kernel set-up (NET_ADMIN, NET_RAW for
# iptables), to start and stop workers that drop to another user (SETUID, SETGID,
# SYS_CHROOT, SETPCAP, KILL) and to raise their priority (SYS_NICE).
SUPERVISOR_CAPS = frozenset((CAP_NET_ADMIN, CAP_NET_RAW, CAP_SETUID, CAP_SETGID,
                             CAP_SYS_CHROOT, CAP_SETPCAP, CAP_KILL, CAP_SYS_NICE,
                             CAP_DAC_OVERRIDE, CAP_CHOWN))

PR_SET_KEEPCAPS = 8
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
_CAP_VERSION_3 = 0x20080522

EMPTY_DIR = Path("/var/run/empty")


class PrivilegeError(OSError):
    pass


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise PrivilegeError(err, f"{what}: {os.strerror(err)}")


def prctl(option: int, arg2: int = 0, arg3: int = 0) -> None:
    _check(_libc.prctl(option, ctypes.c_ulong(arg2), ctypes.c_ulong(arg3), 0, 0),
           f"prctl({option})")


def last_cap() -> int:
    try:
        return int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    except OSError:
        return 40


def capset(caps: Iterable[int]) -> None:
    """effective = permitted = ``caps``; inheritable = none."""
    mask = 0
    for c in caps:
        mask |= 1 << c
    header = _CapHeader(_CAP_VERSION_3, 0)
    data = (_CapData * 2)()
    for i in range(2):
        part = (mask >> (32 * i)) & 0xFFFFFFFF
        data[i].effective = data[i].permitted = part
        data[i].inheritable = 0
    _check(_libc.capset(ctypes.byref(header), data), "capset")


def limit_bounding_set(keep: Iterable[int]) -> None:
    keep = set(keep)
    for cap in range(last_cap() + 1):
        if cap not in keep:
            prctl(PR_CAPBSET_DROP, cap)


def ensure_empty_dir(path: Path = EMPTY_DIR) -> None:
    """The chroot directory: exists, root-owned, writable by nobody else, empty."""
    path.mkdir(mode=0o755, parents=True, exist_ok=True)
    st = path.stat()
    if st.st_uid != 0:
        os.chown(path, 0, 0)
    if stat.S_IMODE(st.st_mode) & 0o022:
        os.chmod(path, 0o755)


def drop_privileges(user: str | None, keep: Iterable[int] = WORKER_CAPS,
                    root: Path = EMPTY_DIR) -> None:
    """Chroot to ``root``, become ``user`` (or stay uid 0), keep only ``keep``."""
    keep = frozenset(keep)
    if user is not None:
        try:
            pw = pwd.getpwnam(user)
        except KeyError:
            raise PrivilegeError(0, f"no such user: {user}") from None
        uid, gid = pw.pw_uid, pw.pw_gid
        groups = os.getgrouplist(user, gid)
    else:
        uid = gid = 0
        groups = [0]
    ensure_empty_dir(root)
    prctl(PR_SET_KEEPCAPS, 1)
    limit_bounding_set(keep)
    os.chroot(root)
    os.chdir("/")
    os.setgroups(groups)
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    capset(keep)
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    prctl(PR_SET_KEEPCAPS, 0)
    prctl(PR_SET_NO_NEW_PRIVS, 1)


def limit_supervisor() -> None:
    """The supervisor stays root but gives up every capability it does not use."""
    limit_bounding_set(SUPERVISOR_CAPS)
    capset(SUPERVISOR_CAPS)
