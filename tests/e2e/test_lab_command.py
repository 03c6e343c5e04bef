"""``loaded lab``, the README's main command, end to end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from loaded.lab.netns import list_netns

ROOT = Path(__file__).resolve().parents[2]


def test_lab_command_balances_and_cleans_up() -> None:
    proc = subprocess.run([sys.executable, "-m", "loaded", "lab", "--backends", "2",
                           "--clients", "3", "--requests", "2", "--strategy", "wrr"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "IPv4: 3 clients x 2 TCP + 2 UDP requests" in out
    assert "IPv6: 3 clients x 2 TCP + 2 UDP requests" in out
    rows = [line.split() for line in out.splitlines() if line.startswith(("  198.18.0.",
                                                                           "  2001:db8:c::"))]
    assert len(rows) == 6
    for row in rows:
        counts = [int(x) for x in row[1:3]]
        assert sum(counts) == 4 and max(counts) == 4  # every request answered, sticky
        assert row[3] == "3/3"
    assert "every kernel change it made is undone" in out
    # each worker's final totals, with its queue and pid (issue 13: they read None)
    finals = [line for line in out.splitlines() if line.startswith("worker ")]
    assert finals and all("None" not in line for line in finals), finals
    assert sum(int(line.split("): ")[1].split()[0]) for line in finals) > 0
    prefix = out.split()[1].rstrip(":")
    assert prefix.startswith("ld")
    assert not [ns for ns in list_netns() if ns.startswith(prefix + "-")]
