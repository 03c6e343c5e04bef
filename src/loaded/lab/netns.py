"""Low-level helpers to act inside a named network namespace from this process.

A network namespace is a property of a *thread* (task), not of a process, so
the helpers here switch a single thread with setns(2) and never the whole
interpreter: other threads (pytest, asyncio, the balancer's workers) keep
their namespace. Sockets remember the namespace they were created in, so a
socket made by a switched thread stays usable from every thread afterwards.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

NETNS_RUN_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000

T = TypeVar("T")

_libc: ctypes.CDLL | None = None


def _get_libc() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    return _libc


def netns_path(ns: str) -> str:
    """Path of the bind mount that keeps a named namespace alive (as `ip netns`)."""
    return ns if os.sep in ns else os.path.join(NETNS_RUN_DIR, ns)


def _setns(fd: int) -> None:
    # Python 3.11 has no os.setns (3.12 does), hence libc.
    if _get_libc().setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def in_netns(ns: str) -> Iterator[None]:
    """Switch the *calling thread* into namespace `ns` for the block.

    /proc/thread-self (not /proc/self, which is the thread-group leader) is
    what must be saved, or a non-main thread would be "restored" into the
    main thread's namespace.
    """
    saved = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        target = os.open(netns_path(ns), os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(saved)
    finally:
        os.close(saved)


def run_in_netns(ns: str, fn: Callable[..., T], *args: object, timeout: float = 30.0) -> T:
    """Run `fn(*args)` on a short-lived thread that lives in namespace `ns`.

    A dedicated thread means the caller's own namespace is never touched,
    even if restoring it would fail; the thread just ends.
    """
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            fd = os.open(netns_path(ns), os.O_RDONLY | os.O_CLOEXEC)
            try:
                _setns(fd)
            finally:
                os.close(fd)
            result.append(fn(*args))
        except BaseException as exc:  # re-raised in the caller's thread
            error.append(exc)

    thread = threading.Thread(target=target, name=f"netns-{ns}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"operation in namespace {ns} did not finish in {timeout}s")
    if error:
        raise error[0]
    return result[0]


def netns_socket(
    ns: str | None,
    family: int = socket.AF_INET,
    type: int = socket.SOCK_STREAM,
    proto: int = 0,
) -> socket.socket:
    """A socket created in namespace `ns` (None: the caller's namespace)."""
    if ns is None:
        return socket.socket(family, type, proto)
    return run_in_netns(ns, socket.socket, family, type, proto)


def write_sysctl(ns: str, key: str, value: str | int) -> None:
    """Set a net.* sysctl inside `ns`.

    /proc/sys/net resolves to the namespace of the task that *opens* the
    file, so opening it from a thread inside `ns` is enough; no process
    needs to be spawned.
    """
    path = "/proc/sys/" + key.replace(".", "/")

    def write() -> None:
        with open(path, "w") as f:
            f.write(f"{value}\n")

    run_in_netns(ns, write)


def read_sysctl(ns: str, key: str) -> str:
    path = "/proc/sys/" + key.replace(".", "/")

    def read() -> str:
        with open(path) as f:
            return f.read().strip()

    return run_in_netns(ns, read)


def read_proc_net(ns: str, name: str) -> str:
    """Contents of /proc/net/<name> as seen inside `ns` (e.g. netfilter/nfnetlink_queue)."""

    def read() -> str:
        # /proc/self/net follows the reading *process's* leader namespace, but
        # /proc/thread-self/net follows this thread's.
        with open(f"/proc/thread-self/net/{name}") as f:
            return f.read()

    return run_in_netns(ns, read)


def list_netns() -> list[str]:
    try:
        return sorted(os.listdir(NETNS_RUN_DIR))
    except FileNotFoundError:
        return []


def netns_inode(ns: str) -> tuple[int, int] | None:
    """(st_dev, st_ino) identifying the namespace, None if it does not exist."""
    try:
        st = os.stat(netns_path(ns))
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino)


def pids_in_netns(ns: str) -> list[int]:
    """PIDs of every process whose network namespace is `ns` (like `ip netns pids`)."""
    ident = netns_inode(ns)
    if ident is None:
        return []
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue  # exited meanwhile, or a kernel thread
        if (st.st_dev, st.st_ino) == ident:
            pids.append(int(entry))
    return pids


def kill_pids(pids: list[int], grace: float = 2.0) -> None:
    """SIGTERM each PID, wait up to `grace` seconds, then SIGKILL survivors."""
    own = os.getpid()
    pids = [p for p in pids if p != own]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if pid_alive(p)]
        if alive:
            time.sleep(0.02)
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def pid_alive(pid: int) -> bool:
    # A zombie still answers kill(0); its state in /proc says it is gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def create_netns(ns: str) -> None:
    """Create a named namespace (bind mount under /run/netns), like `ip netns add`."""
    from pyroute2 import netns as pr_netns

    if os.path.exists(netns_path(ns)):
        raise FileExistsError(errno.EEXIST, "namespace exists", ns)
    pr_netns.create(ns)


def delete_netns(ns: str) -> None:
    """Remove a named namespace; missing namespaces are ignored (idempotent)."""
    path = netns_path(ns)
    libc = _get_libc()
    # MNT_DETACH=2: lazy unmount, as `ip netns delete` does.
    libc.umount2(path.encode(), 2)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
