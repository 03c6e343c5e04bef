"""`python -m loaded`, except that workers keep their root directory and
privileges, so that a sampling profiler (py-spy) can read the interpreter's
binary through /proc/PID/root. For profiling only (bench/profile_lab.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import loaded.daemon.worker as worker
from loaded.cli import main


def _keep_privileges(*args: object, **kwargs: object) -> None:
    pass


worker.drop_privileges = _keep_privileges  # type: ignore[attr-defined]
sys.exit(main())
