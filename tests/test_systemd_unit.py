"""The systemd unit in contrib/ is valid for systemd itself (``systemd-analyze
verify``), with its paths pointed at this checkout."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "contrib" / "systemd" / "loaded.service"


def test_unit_verifies(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    loaded = Path(sys.executable).with_name("loaded")
    text = UNIT.read_text().replace("/opt/loaded/.venv/bin/loaded", str(loaded))
    text = text.replace("/etc/loaded/loaded.conf", str(ROOT / "examples" / "loaded.conf"))
    unit = tmp_path / "loaded.service"
    unit.write_text(text)
    proc = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                          timeout=60)
    problems = [line for line in (proc.stdout + proc.stderr).splitlines()
                if "loaded.service" in line]
    assert proc.returncode == 0 and problems == [], proc.stdout + proc.stderr
    # what the README promises of it
    assert "ExecReload=/bin/kill -HUP $MAINPID" in text and " -D " in text
