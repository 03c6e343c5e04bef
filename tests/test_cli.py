"""The command line: the original's options plus --check, --dry-run, --version."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from loaded import __version__

ROOT = Path(__file__).resolve().parents[1]
GOOD = """VIP4=198.18.1.100
VIP6=2001:db8:1::100
server4=198.19.0.11
server6=2001:db8:2::11
RIP4=198.19.0.0/24
RIP6=2001:db8:2::/64
public_NIC=pub0
private_NIC=priv0
private_GW=198.19.0.1/24
"""


def loaded(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "loaded", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=60, check=False)


def test_version_and_help() -> None:
    assert loaded("--version").stdout.strip() == f"loaded {__version__}"
    out = loaded("--help").stdout
    for opt in ("-4", "-6", "-c FILE", "-f", "-D", "-Q QLEN", "-U USER", "--check", "--dry-run"):
        assert opt in out


def test_check_reports_every_error_with_file_and_line(tmp_path: Path) -> None:
    conf = tmp_path / "bad.conf"
    conf.write_text("VIP4=198.18.1.300\nserver4=198.19.0.11\nstrategy=fastest\nnfq_len=-3\n")
    proc = loaded("--check", "-c", str(conf))
    assert proc.returncode == 2
    err = proc.stderr
    for line in (1, 3, 4):
        assert f"{conf}:{line}: error:" in err
    assert "3 error(s)" in err


def test_check_ok_and_family_restriction(tmp_path: Path) -> None:
    conf = tmp_path / "good.conf"
    conf.write_text(GOOD)
    proc = loaded("--check", "-c", str(conf))
    assert proc.returncode == 0 and "IPv4, IPv6" in proc.stdout
    proc = loaded("-6", "--check", "-c", str(conf))
    assert proc.returncode == 0 and "(IPv6)" in proc.stdout
    only4 = tmp_path / "only4.conf"
    only4.write_text("VIP4=198.18.1.100\nserver4=198.19.0.11\n")
    proc = loaded("-6", "--check", "-c", str(only4))
    assert proc.returncode == 2 and "VIP6" in proc.stderr


def test_default_config_file_in_working_directory(tmp_path: Path) -> None:
    (tmp_path / "loaded.conf").write_text(GOOD)
    proc = loaded("--check", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = loaded("--check", cwd=empty)
    assert proc.returncode == 2 and "loaded.conf" in proc.stderr


def test_dry_run_prints_the_plan_and_touches_nothing(tmp_path: Path) -> None:
    conf = tmp_path / "good.conf"
    conf.write_text(GOOD)
    proc = loaded("--dry-run", "-c", str(conf))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "ip addr add 198.18.1.100/32 dev pub0" in out
    assert "ip addr add 198.19.0.1/24 dev priv0" in out
    assert "ip route add 2001:db8:2::/64 dev priv0" in out  # no IPv6 gateway given
    assert "-j HMARK" in out and "NFQUEUE" in out
    assert "sysctl -w net.ipv4.ip_forward=1" in out


@pytest.mark.parametrize("missing", ["public_NIC", "RIP4"])
def test_dry_run_names_what_the_set_up_lacks(tmp_path: Path, missing: str) -> None:
    conf = tmp_path / "c.conf"
    conf.write_text("\n".join(line for line in GOOD.splitlines()
                              if not line.startswith(missing + "=")))
    proc = loaded("--dry-run", "-c", str(conf))
    assert proc.returncode == 2 and missing in proc.stderr
