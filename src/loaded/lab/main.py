"""``loaded lab``: the balancer on a network of namespaces, traffic through it, a report.

Builds clients, a router, the balancer and N backends (each answering TCP and
UDP with its name and the client address it saw), runs ``loaded`` in the
balancer namespace with a config in the original's format, sends TCP, UDP and
ping from every client address to the VIPs, prints which backend served whom,
and tears everything down, also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from collections.abc import Sequence

from loaded.core.config import STRATEGIES
from loaded.lab import traffic
from loaded.lab.balancer import Balancer, BalancerError, final_workers
from loaded.lab.topology import Lab, LabError, sigterm_as_exit

PORT = 8080


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loaded lab", description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", type=int, default=3, help="backend hosts (default 3)")
    p.add_argument("--clients", type=int, default=4, help="client addresses (default 4)")
    p.add_argument("--requests", type=int, default=5,
                   help="TCP and UDP requests per client and family (default 5)")
    p.add_argument("--strategy", choices=sorted(STRATEGIES), default="rr")
    p.add_argument("--family", choices=("4", "6", "both"), default="both")
    p.add_argument("--mtu", type=int, default=1500, help="MTU of the client link")
    p.add_argument("--keep", type=float, default=0, metavar="SECONDS",
                   help="keep the lab up this long after the traffic, to look around")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    sigterm_as_exit()
    families = (4, 6) if args.family == "both" else (int(args.family),)
    try:
        with Lab(backends=args.backends, clients=args.clients, client_mtu=args.mtu) as lab:
            return run(lab, args, families)
    except KeyboardInterrupt:
        print("\ninterrupted: the lab is torn down", file=sys.stderr)
        return 130
    except (LabError, BalancerError) as e:
        print(f"loaded lab: {e}", file=sys.stderr)
        return 1


def run(lab: Lab, args: argparse.Namespace, families: tuple[int, ...]) -> int:
    assert lab.workdir is not None
    print(f"lab {lab.prefix}: namespaces {', '.join(lab.namespaces)}")
    lab.start_servers(PORT)
    conf = lab.workdir / "loaded.conf"
    lab.write_config(conf, strategy=args.strategy)
    print(f"config (original format): {conf}")
    balancer = Balancer(lab, conf).start()
    workers = len(balancer.stats()["workers"])
    print(f"balancer: {workers} worker(s), strategy {args.strategy}, "
          f"VIPs {lab.vip4} and {lab.vip6}, log {balancer.log_path}\n")
    failures = 0
    try:
        for family in families:
            failures += exercise(lab, family, args.requests)
        if args.keep > 0:
            print(f"\nthe lab stays up for {args.keep:.0f} s; try for example:\n"
                  f"  ip netns exec {lab.ns('cl')} ping {lab.vip4}\n"
                  f"  ip netns exec {lab.ns('lb')} iptables-save\n")
            time.sleep(args.keep)
    finally:
        code = balancer.stop()
        report_stats(balancer.log)  # the workers' last words, logged at exit
        print(f"balancer stopped (exit {code}); every kernel change it made is undone")
    return 1 if failures or code else 0


def exercise(lab: Lab, family: int, requests: int) -> int:
    vip = lab.vip4 if family == 4 else lab.vip6
    clients = lab.clients4 if family == 4 else lab.clients6
    names = [b.name for b in lab.backends]
    served: dict[str, Counter[str]] = {c: Counter() for c in clients}
    wrong_client = failures = 0
    for c in clients:
        for _ in range(requests):
            for kind in ("tcp", "udp"):
                try:
                    if kind == "tcp":
                        line = traffic.tcp_request(c, vip, PORT, timeout=3, ns=lab.ns("cl"))
                    else:
                        line = traffic.udp_request(c, vip, PORT, timeout=3, attempts=3,
                                                   ns=lab.ns("cl"))
                except OSError as e:
                    served[c][f"failed ({type(e).__name__})"] += 1
                    failures += 1
                    continue
                name, seen = line.split()
                served[c][name] += 1
                wrong_client += seen != c
    pings = {c: traffic.ping(lab.ns("cl"), c, vip, count=3, interval=0.05) for c in clients}
    print(f"IPv{family}: {len(clients)} clients x {requests} TCP + {requests} UDP requests "
          f"+ 3 pings to {vip}")
    width = max(len(c) for c in clients)
    print(f"  {'client':<{width}}  " + "  ".join(f"{n:>5}" for n in names) + "   ping")
    for c in clients:
        row = "  ".join(f"{served[c].get(n, 0):>5}" for n in names)
        extra = {k: v for k, v in served[c].items() if k not in names}
        p = pings[c]
        print(f"  {c:<{width}}  {row}   {p.received}/{p.transmitted}"
              + (f"   {extra}" if extra else ""))
    if wrong_client:
        print(f"  ! {wrong_client} replies saw another client address than the sender's")
    print()
    return failures + wrong_client + sum(not p.ok for p in pings.values())


def report_stats(log: str) -> None:
    for w in final_workers(log):
        drops = f" ({w['drops']})" if w["drops"] else ""
        print(f"worker {w['index']} (queue {w['queue']}, pid {w['pid']}): "
              f"{w['packets']} packets, {w['dropped']} dropped{drops}, "
              f"{w['cpu_seconds']:.2f} s CPU")
