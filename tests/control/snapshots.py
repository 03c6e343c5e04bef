"""Status snapshots for tests: the real types (``loaded.core.status``), with
defaults for what a test does not care about, so that a fixture says only what
it is about and can never hold a key the daemon does not send."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from loaded.core.status import (
    BackendStatus,
    DaemonInfo,
    KernelHashStatus,
    LastCheck,
    Latency,
    QueueStatus,
    ServiceStatus,
    Status,
    WorkerReport,
    WorkerStatus,
)


def daemon(*, pid: int = 4242, tag: str = "test", config: str = "/etc/loaded/loaded.conf",
           version: str = "0.1.0", uptime: float = 1.0, started_at: float = 1_700_000_000.0,
           datapath: str = "perpacket") -> DaemonInfo:
    return DaemonInfo(pid=pid, tag=tag, config=config, version=version, uptime=uptime,
                      started_at=started_at, datapath=datapath)


def check(ok: bool, detail: str, at: float, *, latency: float = 0.001,
          check: str = "tcp:80") -> LastCheck:
    return LastCheck(ok=ok, detail=detail, at=at, latency=latency, check=check)


def backend(address: str, *, weight: int = 1, state: str = "up", mark: int | None = None,
            clients: int = 0, new_clients: int = 0, packets: int = 0, bytes: int = 0,
            admin: str = "enabled", transitions: int = 0, health: str = "up",
            last_check: LastCheck | None = None) -> BackendStatus:
    return BackendStatus(address=address, weight=weight, state=state, mark=mark,
                         clients=clients, new_clients=new_clients, packets=packets,
                         bytes=bytes, admin=admin, transitions=transitions, health=health,
                         last_check=last_check)


def service(vip: str, backends: Sequence[BackendStatus], *, family: int = 4,
            strategy: str = "rr", clients: int = 0, datapath: str = "perpacket",
            client_table_max: int | None = 1_000_000) -> ServiceStatus:
    return ServiceStatus(vip=vip, family=family, strategy=strategy, datapath=datapath,
                         clients=clients, client_table_max=client_table_max,
                         backends=tuple(backends))


def latency(buckets: Sequence[tuple[float, int]] = (), total: float = 0.0,
            count: int | None = None) -> Latency:
    return Latency(buckets=tuple(buckets), sum=total,
                   count=(buckets[-1][1] if buckets else 0) if count is None else count)


def report(*, pid: int = 5000, packets: int = 0, dropped: int = 0, refused: int = 0,
           cpu_seconds: float = 0.0, latency: Latency | None = None) -> WorkerReport:
    return WorkerReport(pid=pid, packets=packets, accepted=packets - dropped,
                        dropped=dropped, batches=0, overruns=0, truncated=0,
                        verdict_errors={}, refused=refused,
                        cpu_seconds=cpu_seconds,
                        latency=Latency((), 0.0, 0) if latency is None else latency)


def worker(index: int, *, alive: bool = True, restarts: int = 0,
           drops: Mapping[str, int] | None = None,
           report: WorkerReport | None = None) -> WorkerStatus:
    """A worker; without ``report`` one that has not reported yet."""
    return WorkerStatus(index=index, queue=index, alive=alive, restarts=restarts,
                        drops=dict(drops or {}), report=report)


def queue(*, waiting: int = 0, queue_dropped: int = 0, user_dropped: int = 0,
          id_sequence: int = 0) -> QueueStatus:
    return QueueStatus(portid=1000, waiting=waiting, copy_mode=2, copy_range=65535,
                       queue_dropped=queue_dropped, user_dropped=user_dropped,
                       id_sequence=id_sequence)


def status(*, daemon_info: DaemonInfo | None = None,
           services: Sequence[ServiceStatus] = (), workers: Sequence[WorkerStatus] = (),
           kernel_queues: Mapping[int, QueueStatus] | None = None,
           endpoints: Mapping[str, str] | None = None,
           kernel_drops: Mapping[str, int] | None = None,
           kernel_hash: KernelHashStatus | None = None) -> Status:
    return Status(daemon=daemon() if daemon_info is None else daemon_info,
                  services=tuple(services), workers=tuple(workers),
                  kernel_queues=dict(kernel_queues or {}), endpoints=dict(endpoints or {}),
                  kernel_drops=None if kernel_drops is None else dict(kernel_drops),
                  kernel_hash=kernel_hash)
