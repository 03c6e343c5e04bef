"""A netfilter queue (NFQUEUE) reader on a raw netlink socket, in batches.

Why not libnetfilter_queue bindings: they send one verdict per system call,
cannot set the queue flags (fail-open, GSO) and hide verdict errors. Here:

- one ``recv_into`` per packet into a ring of preallocated buffers, no copy
  of the payload: the handler rewrites it in place through a memoryview;
- every packet received in a burst (up to ``batch``) is answered by one
  ``sendmsg`` carrying all the verdict messages (netlink processes each message
  of a send in turn), the payloads sent straight from the receive buffers;
- the queue flags are set at bind time: ``FAIL_OPEN`` (a full queue accepts
  instead of dropping), ``GSO`` (segmentation offload packets are handed over
  whole, up to 64 KiB, with their transport checksum possibly unfinished, which
  the handler is told);
- errors the kernel reports for verdicts are read and counted, not lost.

Protocol constants are from ``linux/netfilter/nfnetlink_queue.h``.
"""

from __future__ import annotations

import bisect
import errno
import os
import select
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET = 0
NFQNL_MSG_VERDICT = 1
NFQNL_MSG_CONFIG = 2
NLMSG_ERROR = 2
NLM_F_REQUEST = 1
NLM_F_ACK = 4

NFQA_CFG_CMD = 1
NFQA_CFG_PARAMS = 2
NFQA_CFG_QUEUE_MAXLEN = 3
NFQA_CFG_MASK = 4
NFQA_CFG_FLAGS = 5
NFQNL_CFG_CMD_BIND = 1
NFQNL_CFG_CMD_UNBIND = 2
NFQNL_COPY_PACKET = 2
NFQA_CFG_F_FAIL_OPEN = 1
NFQA_CFG_F_GSO = 4

NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2
NFQA_MARK = 3
NFQA_PAYLOAD = 10
NFQA_CAP_LEN = 13
NFQA_SKB_INFO = 14
NFQA_SKB_CSUMNOTREADY = 1

NF_DROP = 0
NF_ACCEPT = 1

SO_RCVBUFFORCE = 33
SO_SNDBUFFORCE = 32
_SNDBUF = 4 << 20
_SEND_BYTES = 1 << 20  # well inside the send buffer: netlink refuses a send larger than it
_SEND_IOVECS = 900  # below UIO_MAXIOV (1024)

MAX_PACKET = 65535
_RECV_SIZE = MAX_PACKET + 512  # payload plus the netlink and attribute headers

_NLMSGHDR = struct.Struct("=IHHII")
_NFGEN = struct.Struct("!BBH")
_NLA = struct.Struct("=HH")
_U32 = struct.Struct("!I")
_ID = struct.Struct("!I")
# nlmsghdr, nfgenmsg, NFQA_VERDICT_HDR attribute, NFQA_PAYLOAD attribute header
_VERDICT = struct.Struct("=IHHII" + "BBH" + "HH" + "II" + "HH")
# nlmsghdr, nfgenmsg, NFQA_VERDICT_HDR attribute, NFQA_MARK attribute
_VERDICT_MARK = struct.Struct("=IHHII" + "BBH" + "HH" + "II" + "HHI")
_PAD = (b"", b"\0\0\0", b"\0\0", b"\0")

DROP = 0
ACCEPT = 1  # with the (rewritten) payload
ACCEPT_UNCHANGED = 2  # without it: the kernel keeps the packet as it was, checksum state too
MARK_MIN = 0x100  # a verdict >= this is a packet mark: accepted unchanged, with that mark

# handler(payload, checksum_unfinished) -> DROP, ACCEPT (payload rewritten in place),
# ACCEPT_UNCHANGED, or a mark >= MARK_MIN (ACCEPT_UNCHANGED and the packet's mark set:
# the conntrack data path's "this connection goes to that backend").
Handler = Callable[[memoryview, bool], int]


LATENCY_BOUNDS = (10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3,
                  25e-3, 100e-3)


class QueueError(OSError):
    """The queue could not be bound or configured."""


@dataclass
class QueueStats:
    packets: int = 0
    accepted: int = 0
    dropped: int = 0
    batches: int = 0
    truncated: int = 0  # larger than the copy range: dropped, never half-rewritten
    overruns: int = 0  # ENOBUFS: the socket buffer overflowed, the kernel dropped
    verdict_errors: dict[int, int] = field(default_factory=dict)
    # Time in user space, from reading a burst to sending its verdicts, counted
    # once per packet of the burst: a histogram over LATENCY_BOUNDS (+inf last).
    latency_counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BOUNDS) + 1))
    latency_sum: float = 0.0


class NfQueue:
    """One bound queue. Not thread-safe; one per worker process."""

    def __init__(self, num: int, maxlen: int = 4096, *, fail_open: bool = False,
                 gso: bool = True, rcvbuf: int = 32 << 20, batch: int = 128,
                 sock: socket.socket | None = None) -> None:
        self.num = num
        self.batch = batch
        self.stats = QueueStats()
        self._seq = 0
        self.sock = sock or socket.socket(socket.AF_NETLINK, socket.SOCK_RAW,
                                          NETLINK_NETFILTER)
        try:
            # A burst must fit in the socket buffer, or the kernel drops it whole
            # (ENOBUFS). FORCE ignores rmem_max but needs CAP_NET_ADMIN.
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
                self.sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, _SNDBUF)
            except PermissionError:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SNDBUF)
            self.sock.bind((0, 0))
            flags = (NFQA_CFG_F_FAIL_OPEN if fail_open else 0) | (NFQA_CFG_F_GSO if gso else 0)
            mask = NFQA_CFG_F_FAIL_OPEN | NFQA_CFG_F_GSO
            self._config(
                _attr(NFQA_CFG_CMD, struct.pack("!BxH", NFQNL_CFG_CMD_BIND, 0))
                + _attr(NFQA_CFG_PARAMS, struct.pack("!IB", MAX_PACKET, NFQNL_COPY_PACKET))
                + _attr(NFQA_CFG_QUEUE_MAXLEN, _U32.pack(maxlen))
                + _attr(NFQA_CFG_MASK, _U32.pack(mask))
                + _attr(NFQA_CFG_FLAGS, _U32.pack(flags)))
        except OSError as e:
            self.sock.close()
            owner = queue_owner(num) if e.errno in (errno.EPERM, errno.EBUSY) else None
            why = f"bound by {owner}" if owner else e.strerror
            raise QueueError(e.errno, f"cannot bind queue {num}: {why}") from None
        self._bufs = [bytearray(_RECV_SIZE) for _ in range(batch)]
        self._views = [memoryview(b) for b in self._bufs]
        self._headers = [bytearray(max(_VERDICT.size, _VERDICT_MARK.size))
                         for _ in range(batch)]
        self._hviews = [memoryview(h) for h in self._headers]

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        if self.sock.fileno() < 0:
            return
        try:
            self._config(_attr(NFQA_CFG_CMD, struct.pack("!BxH", NFQNL_CFG_CMD_UNBIND, 0)),
                         ack=False)
        except OSError:
            pass
        self.sock.close()

    def _config(self, attrs: bytes, ack: bool = True) -> None:
        self._seq += 1
        msg = (_NLMSGHDR.pack(16 + 4 + len(attrs),
                              (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_CONFIG,
                              NLM_F_REQUEST | (NLM_F_ACK if ack else 0), self._seq, 0)
               + _NFGEN.pack(socket.AF_UNSPEC, 0, self.num) + attrs)
        self.sock.send(msg)
        if not ack:
            return
        while True:
            reply = self.sock.recv(8192)
            _, kind, _, seq, _ = _NLMSGHDR.unpack_from(reply, 0)
            if kind == NLMSG_ERROR and seq == self._seq:
                code = struct.unpack_from("=i", reply, 16)[0]
                if code:
                    raise OSError(-code, os.strerror(-code))
                return

    def run(self, handler: Handler, should_stop: Callable[[], bool],
            tick: Callable[[], None] | None = None, poll_ms: int = 200,
            watch: dict[int, Callable[[], None]] | None = None) -> None:
        """Serve packets until ``should_stop()``; ``tick`` runs between bursts;
        ``watch`` maps other file descriptors to what to call when they are readable
        (the worker's control pipe)."""
        sock = self.sock
        fd = sock.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        watch = watch or {}
        for other in watch:
            poller.register(other, select.POLLIN)
        recv_into = sock.recv_into
        bufs, views, headers, hviews = self._bufs, self._views, self._headers, self._hviews
        stats = self.stats
        batch = self.batch
        dontwait = socket.MSG_DONTWAIT
        pack_into = _VERDICT.pack_into
        pack_mark_into = _VERDICT_MARK.pack_into
        mark_size = _VERDICT_MARK.size
        msg_type = (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_VERDICT
        # Network byte order once, not per packet (the struct is native order).
        num_be = socket.htons(self.num)
        accept_be = socket.htonl(NF_ACCEPT)
        drop_be = socket.htonl(NF_DROP)
        htonl = socket.htonl
        perf_counter = time.perf_counter
        bisect_left = bisect.bisect_left
        bounds = LATENCY_BOUNDS
        while not should_stop():
            try:
                ready = poller.poll(poll_ms)
            except InterruptedError:
                continue
            if not ready:
                if tick is not None:
                    tick()
                continue
            for rfd, _ in ready:
                if rfd != fd:
                    watch[rfd]()
            out: list[memoryview | bytes] = []
            out_bytes = 0
            i = 0
            started = perf_counter()
            while i < batch:
                try:
                    n = recv_into(bufs[i], _RECV_SIZE, dontwait)
                except BlockingIOError:
                    break
                except InterruptedError:
                    continue
                except OSError as e:
                    if e.errno == errno.ENOBUFS:
                        stats.overruns += 1
                        continue
                    raise
                parsed = _parse_packet(bufs[i], n)
                if parsed is None:
                    self._note_error(bufs[i], n)
                    continue
                pid, start, plen, partial, truncated = parsed
                stats.packets += 1
                payload = views[i][start:start + plen]
                if truncated:
                    stats.truncated += 1
                    verdict = DROP
                else:
                    verdict = handler(payload, partial)
                h = headers[i]
                # One netlink send is one kernel buffer, limited by the send
                # buffer, and one sendmsg at most UIO_MAXIOV iovecs: a burst of
                # 64 KiB GSO packets goes out in several sends, whole messages each.
                if out and (out_bytes + plen > _SEND_BYTES or len(out) > _SEND_IOVECS):
                    _send(sock, out, stats)
                    out = []
                    out_bytes = 0
                out_bytes += _VERDICT.size + plen
                if verdict == ACCEPT:
                    stats.accepted += 1
                    pad = (4 - plen) & 3
                    pack_into(h, 0, _VERDICT.size + plen + pad, msg_type, NLM_F_REQUEST, 0, 0,
                              socket.AF_UNSPEC, 0, num_be,
                              12, NFQA_VERDICT_HDR, accept_be, htonl(pid),
                              4 + plen, NFQA_PAYLOAD)
                    out.append(hviews[i][:_VERDICT.size])
                    out.append(payload)
                    if pad:
                        out.append(_PAD[4 - pad])
                elif verdict >= MARK_MIN:
                    stats.accepted += 1
                    pack_mark_into(h, 0, mark_size, msg_type, NLM_F_REQUEST, 0, 0,
                                   socket.AF_UNSPEC, 0, num_be,
                                   12, NFQA_VERDICT_HDR, accept_be, htonl(pid),
                                   8, NFQA_MARK, htonl(verdict))
                    out.append(hviews[i][:mark_size])
                else:
                    if verdict == DROP:
                        stats.dropped += 1
                        code = drop_be
                    else:
                        stats.accepted += 1
                        code = accept_be
                    pack_into(h, 0, _VERDICT.size - 4, msg_type, NLM_F_REQUEST, 0, 0,
                              socket.AF_UNSPEC, 0, num_be,
                              12, NFQA_VERDICT_HDR, code, htonl(pid),
                              0, 0)
                    out.append(hviews[i][:_VERDICT.size - 4])
                i += 1
            if out:
                _send(sock, out, stats)
            if i:
                stats.batches += 1
                took = perf_counter() - started
                stats.latency_counts[bisect_left(bounds, took)] += i
                stats.latency_sum += took * i
            if tick is not None:
                tick()

    def _note_error(self, buf: bytearray, n: int) -> None:
        if n >= 20:
            kind = _NLMSGHDR.unpack_from(buf, 0)[1]
            if kind == NLMSG_ERROR:
                code = -struct.unpack_from("=i", buf, 16)[0]
                if code:
                    errs = self.stats.verdict_errors
                    errs[code] = errs.get(code, 0) + 1


def _send(sock: socket.socket, part: list[memoryview | bytes], stats: QueueStats) -> None:
    for _ in range(3):
        try:
            sock.sendmsg(part)
            return
        except InterruptedError:
            continue
        except OSError as e:
            # A failed send leaves its packets without a verdict; the kernel holds
            # them until the queue is unbound. Count it: never die for it.
            stats.verdict_errors[e.errno or 0] = stats.verdict_errors.get(e.errno or 0, 0) + 1
            return


def _attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return _NLA.pack(length, kind) + payload + b"\0" * ((4 - length) & 3)


def _parse_packet(buf: bytearray, n: int) -> tuple[int, int, int, bool, bool] | None:
    """(packet id, payload offset, payload length, checksum unfinished, truncated).

    None for anything that is not a queued packet (errors, acks).
    """
    if n < 20:
        return None
    length, kind = _NLMSGHDR.unpack_from(buf, 0)[:2]
    if kind != (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
        return None
    end = min(length, n)
    off = 20
    pid = -1
    start = plen = 0
    partial = truncated = False
    while off + 4 <= end:
        alen, atype = _NLA.unpack_from(buf, off)
        if alen < 4:
            break
        atype &= 0x3FFF
        if atype == NFQA_PACKET_HDR:
            pid = _ID.unpack_from(buf, off + 4)[0]
        elif atype == NFQA_PAYLOAD:
            start, plen = off + 4, alen - 4
        elif atype == NFQA_SKB_INFO:
            partial = bool(_U32.unpack_from(buf, off + 4)[0] & NFQA_SKB_CSUMNOTREADY)
        elif atype == NFQA_CAP_LEN:
            truncated = True
        off += (alen + 3) & ~3
    if pid < 0:
        return None
    return pid, start, plen, partial, truncated


def read_proc_stats(path: str = "/proc/net/netfilter/nfnetlink_queue") -> dict[int, dict[str, int]]:
    """The kernel's own counters per queue: queued now, queue drops, user drops."""
    try:
        with open(path) as f:
            return parse_proc_stats(f.read())
    except OSError:
        return {}


def parse_proc_stats(text: str) -> dict[int, dict[str, int]]:
    """``/proc/net/netfilter/nfnetlink_queue``'s lines, per queue number."""
    out: dict[int, dict[str, int]] = {}
    for line in text.splitlines():
        cols = line.split()
        if len(cols) < 8:
            continue
        out[int(cols[0])] = {
            "portid": int(cols[1]),
            "waiting": int(cols[2]),
            "copy_mode": int(cols[3]),
            "copy_range": int(cols[4]),
            "queue_dropped": int(cols[5]),
            "user_dropped": int(cols[6]),
            "id_sequence": int(cols[7]),
        }
    return out


def queue_owner(num: int, proc: str = "/proc") -> str | None:
    """Who has queue ``num`` bound: ``pid N (command line)`` when the process can
    be found, ``netlink port N`` when not; None when nobody has it."""
    entry = read_proc_stats(f"{proc}/net/netfilter/nfnetlink_queue").get(num)
    if entry is None:
        return None
    port = entry["portid"]
    inode = None
    try:
        with open(f"{proc}/net/netlink") as f:
            for line in f:
                cols = line.split()
                # sk Eth Pid Groups Rmem Wmem Dump Locks Drops Inode
                if len(cols) >= 10 and cols[1] == str(NETLINK_NETFILTER) and cols[2] == str(port):
                    inode = cols[9]
                    break
    except OSError:
        pass
    if inode is not None:
        target = f"socket:[{inode}]"
        for pid in (d for d in os.listdir(proc) if d.isdigit()):
            try:
                fds = os.listdir(f"{proc}/{pid}/fd")
                if not any(os.readlink(f"{proc}/{pid}/fd/{fd}") == target for fd in fds):
                    continue
                with open(f"{proc}/{pid}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:
                continue  # gone meanwhile, or not ours to look at
            return f"pid {pid} ({cmd[:200]})" if cmd else f"pid {pid}"
    return f"netlink port {port}"
