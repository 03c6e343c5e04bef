"""Files the daemon rewrites while others may read them (journal, stats, saved
client tables): written whole, then renamed into place, so a reader or a crash
never sees half of one.

The daemon writes as root into directories an operator chose, so a write
must never be steered elsewhere: the temporary file gets a fresh name, is
created exclusively and never through a symbolic link (a link planted at the
old fixed ``<name>.tmp`` would have made root truncate whatever it pointed
to), and the target is replaced only when it is a regular file or absent
(renaming over a device node or a directory is refused, not attempted).
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

__all__ = ["NotAFileError", "is_replaceable", "write_atomic"]


class NotAFileError(OSError):
    """The target exists and is not a regular file: nothing was written."""


def is_replaceable(path: Path) -> bool:
    """Whether ``path`` is absent or a regular file (a link counts as itself,
    not as what it points to: rename replaces the link)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return True
    return stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)


def write_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    if not is_replaceable(path):
        raise NotAFileError(f"{path} exists and is not a regular file")
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, mode)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        tmp.replace(path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
