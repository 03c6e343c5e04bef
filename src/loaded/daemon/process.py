"""Process housekeeping: logging destination and detaching from the terminal.

Log lines are one event each, ``event=NAME key=value ...``, so that they can be
grepped and parsed the same way from stderr, the journal or syslog.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys

FORMAT = "%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s"
SYSLOG_FORMAT = "loaded[%(process)d]: %(levelname)s %(message)s"


SYSLOG_SOCKET = os.environ.get("LOADED_SYSLOG_SOCKET", "/dev/log")


def setup_logging(foreground: bool, verbose: bool = False) -> None:
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    handler: logging.Handler
    if foreground:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(FORMAT))
    else:
        # Connected now, while /dev/log is reachable: workers chroot later.
        handler = logging.handlers.SysLogHandler(
            address=SYSLOG_SOCKET, facility=logging.handlers.SysLogHandler.LOG_DAEMON)
        handler.setFormatter(logging.Formatter(SYSLOG_FORMAT))
    root.addHandler(handler)


def detach() -> None:
    """Fork into the background as a daemon: new session, no terminal, no inherited fds."""
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    os.chdir("/")
    os.umask(0o022)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    if devnull > 2:
        os.close(devnull)
