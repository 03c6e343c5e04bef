"""The ``loaded`` command line.

``loaded [-4|-6] [-c FILE] [-f] [-D] [-Q QLEN] [-U USER]`` runs the balancer with
the original's options; ``--check`` and ``--dry-run`` validate and show without
touching anything. Subcommands (``loaded replay``, ``loaded lab``) are tools
around it; ``loaded status|backend|clients|reload`` talk to a running daemon
through its control socket (``loaded.control``).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from loaded import __version__
from loaded.core.config import DATAPATHS, DEFAULT_CONFIGS, Config, load_config
from loaded.core.errors import ConfigError

EXIT_CONFIG = 2


def find_config(given: str | None) -> str:
    if given:
        return given
    for name in DEFAULT_CONFIGS:
        if Path(name).exists():
            return name
    return DEFAULT_CONFIGS[0]


def read_config(path: str) -> Config | None:
    """The config at ``path``; problems printed to stderr, None when unusable."""
    try:
        config = load_config(path)
    except ConfigError as e:
        for problem in e.problems:
            print(problem, file=sys.stderr)
        errors = sum(p.severity == "error" for p in e.problems)
        print(f"{path}: {errors} error(s)", file=sys.stderr)
        return None
    for warning in config.warnings:
        print(warning, file=sys.stderr)
    return config


def daemon_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="loaded",
        description="Layer-3/4 load balancer on netfilter NFQUEUE, IPv4 and IPv6.",
        epilog="Subcommands: 'loaded replay --help', 'loaded lab --help'; for a running "
               "daemon: 'loaded status|backend|clients|reload --help'.",
    )
    fam = p.add_mutually_exclusive_group()
    fam.add_argument("-4", dest="family", action="store_const", const=4,
                     help="serve only the IPv4 VIP (default: every family the config names)")
    fam.add_argument("-6", dest="family", action="store_const", const=6,
                     help="serve only the IPv6 VIP")
    p.add_argument("-c", dest="config", metavar="FILE",
                   help="config file (default: loaded.conf or loaded.config here)")
    p.add_argument("-f", dest="failover", action="store_true", help="enable failover checks")
    p.add_argument("-D", dest="foreground", action="store_true",
                   help="stay in the foreground and log to stderr")
    p.add_argument("-Q", dest="qlen", type=int, metavar="QLEN", help="queue length")
    p.add_argument("-U", dest="user", metavar="USER", help="drop privileges to USER")
    p.add_argument("--check", action="store_true",
                   help="validate the config, print every problem, touch nothing")
    p.add_argument("--dry-run", action="store_true",
                   help="print the kernel set-up it would do, touch nothing")
    p.add_argument("--version", action="version", version=f"loaded {__version__}")
    return p


def replay_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="loaded replay",
        description="Run a capture through the packet engine offline, as a worker would.",
    )
    p.add_argument("-c", dest="config", metavar="FILE", help="config file")
    p.add_argument("input", help="capture to read (pcap or pcapng: raw IP, Ethernet, Linux cooked)")
    p.add_argument("output", help="pcap (raw IP) to write the accepted, rewritten packets to")
    p.add_argument("--json", action="store_true", help="one JSON object per packet")
    p.add_argument("--datapath", choices=sorted(DATAPATHS), default="perpacket",
                   help="perpacket (default): every packet rewritten by the engine; "
                        "conntrack: every packet decided as a first packet, its mark shown, "
                        "written as kernel NAT sends it")
    return p


def main_replay(argv: Sequence[str]) -> int:
    from loaded.io.capture import CaptureError
    from loaded.replay import replay

    args = replay_parser().parse_args(argv)
    config = read_config(find_config(args.config))
    if config is None:
        return EXIT_CONFIG
    try:
        with open(args.input, "rb") as src, open(args.output, "wb") as dst:
            replay(config, src, dst, as_json=args.json, datapath=args.datapath)
    except (OSError, CaptureError) as e:
        print(f"loaded replay: {e}", file=sys.stderr)
        return 1
    return 0


def main_lab(argv: Sequence[str]) -> int:
    from loaded.lab.main import main as lab_main

    return lab_main(argv)


def main_control(argv: Sequence[str]) -> int:
    """``loaded status|backend|clients|reload ...``: talk to a running daemon."""
    from loaded.control.cli import main as control_main

    return control_main(argv)


SUBCOMMANDS = {"replay": main_replay, "lab": main_lab}
CONTROL_COMMANDS = ("status", "backend", "clients", "reload")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        return SUBCOMMANDS[argv[0]](argv[1:])
    if argv and argv[0] in CONTROL_COMMANDS:
        return main_control(argv)
    args = daemon_parser().parse_args(argv)
    path = find_config(args.config)
    config = read_config(path)
    if config is None:
        return EXIT_CONFIG
    if args.family is not None:
        try:
            config = config.restrict(args.family)
        except ConfigError as e:
            for problem in e.problems:
                print(problem, file=sys.stderr)
            return EXIT_CONFIG
    if not paths_ok(config, path):
        return EXIT_CONFIG
    if args.check:
        print(f"{path}: ok ({', '.join(f'IPv{f}' for f in config.families())})")
        return 0
    return run_daemon(args, config, path)


def paths_ok(config: Config, path: str) -> bool:
    """The files the daemon would delete, overwrite or bind are absent or its own;
    problems printed to stderr."""
    from loaded.control.protocol import socket_path
    from loaded.core.plan import instance_tag
    from loaded.daemon.operator import persist_path
    from loaded.io.preflight import check_paths

    tag = instance_tag(os.path.abspath(path))
    problems = check_paths(config, persist_path(config, tag),
                           Path(config.control_socket or socket_path(tag)))
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        print(f"{path}: {len(problems)} error(s)", file=sys.stderr)
    return not problems


def run_daemon(args: argparse.Namespace, config: Config, path: str) -> int:
    from loaded.core.plan import PlanError, describe, instance_tag, make_plan
    from loaded.daemon.process import detach, setup_logging
    from loaded.daemon.supervisor import Supervisor

    families = config.families()
    try:
        plan = make_plan(config, families, instance_tag(os.path.abspath(path)),
                         os.cpu_count() or 1)
    except PlanError as e:
        print(f"loaded: {e}", file=sys.stderr)
        return EXIT_CONFIG
    if args.dry_run:
        print("\n".join(describe(plan)))
        return 0
    if os.geteuid() != 0:
        print("loaded: must run as root (it sets up the kernel and binds queues)",
              file=sys.stderr)
        return 1
    if args.user is not None:
        import pwd

        try:
            pwd.getpwnam(args.user)
        except KeyError:
            print(f"loaded: no such user: {args.user}", file=sys.stderr)
            return 1
    try:
        # Before detaching: the syslog socket is connected now, and a missing
        # one is reported on the terminal rather than into the void.
        setup_logging(args.foreground)
    except OSError as e:
        print(f"loaded: cannot log to syslog ({e}); use -D to log to stderr", file=sys.stderr)
        return 1
    if not args.foreground:
        detach()
    supervisor = Supervisor(config, families, plan, maxlen=args.qlen or plan.queue_length,
                            user=args.user, failover=args.failover, config_path=path)
    return supervisor.run()


if __name__ == "__main__":
    sys.exit(main())
