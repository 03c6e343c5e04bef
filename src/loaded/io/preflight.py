"""The config against this machine: paths the daemon will write, delete or bind
must be absent or recognisably its own.

The parser (``loaded.core.config``) checks what a value says; only the file
system can tell whether ``persist_file=`` names the operator's config, a
device, or a saved table of ours, and whether ``control_socket=`` names a
socket or ``/etc/passwd``. Both ``--check`` and the start of the daemon ask
here, and the daemon asks again before each delete or overwrite, since the
file may have changed since it started.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from loaded.core.config import Config
from loaded.core.errors import Problem
from loaded.core.persist import NotSavedTables, SavedTables, read_saved

__all__ = ["check_paths", "foreign_file", "foreign_socket", "load_saved"]

# A saved table of a million clients is some tens of MiB; a file far larger is
# not one, and reading it whole as root would be the attack.
MAX_SAVED_BYTES = 1 << 30


def load_saved(path: Path) -> SavedTables:
    """The saved tables at ``path``. ``FileNotFoundError`` when there is nothing,
    ``NotSavedTables`` when what is there is not ours (never to be touched),
    ``ValueError``/``OSError`` when it is ours but unusable."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise NotSavedTables("not a regular file")
    if st.st_size > MAX_SAVED_BYTES:
        raise NotSavedTables(f"larger than {MAX_SAVED_BYTES} bytes")
    return read_saved(path.read_bytes())


def foreign_file(path: Path) -> str | None:
    """Why the daemon must not delete or overwrite ``path``; None when it may
    (absent, or a saved table of ours, even a broken one)."""
    try:
        load_saved(path)
    except FileNotFoundError:
        return None
    except NotSavedTables as e:
        return str(e)
    except ValueError:
        return None
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    return None


def foreign_socket(path: Path) -> str | None:
    """Why ``path`` cannot be the control socket; None when absent or a socket
    (whether somebody listens there is the server's question)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        return f"cannot be examined ({e.strerror or e})"
    if stat.S_ISSOCK(st.st_mode):
        return None
    return "exists and is not a socket"


def check_paths(config: Config, persist: Path, socket: Path) -> list[Problem]:
    """Errors for the paths the daemon would own (``persist``: the saved tables,
    ``socket``: the control socket), each at the line that names it."""
    problems: list[Problem] = []

    def same(a: Path, b: str) -> bool:
        try:
            return os.path.samefile(a, b)
        except OSError:
            return False

    persist_line = config.line_of("persist_file")
    if config.persist_clients:
        if same(persist, config.path):
            problems.append(Problem(config.path, persist_line,
                                    f"persist_file: {persist} is this config file"))
        else:
            why = foreign_file(persist)
            if why is not None:
                problems.append(Problem(
                    config.path, persist_line,
                    f"persist_file: {persist} {_phrase(why)}; loaded deletes and rewrites "
                    f"that file, so it must be absent or a client table loaded saved"))
    why = foreign_socket(socket)
    if why is None and same(socket, config.path):
        why = "is this config file"
    if why is not None:
        problems.append(Problem(
            config.path, config.line_of("control_socket"),
            f"control_socket: {socket} {why}; loaded replaces that path with its socket, "
            f"so it must be absent or a socket"))
    return problems


def _phrase(why: str) -> str:
    return why if why.startswith(("is ", "cannot ", "exists ")) else f"is {why}"
