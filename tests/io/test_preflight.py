"""The files the daemon would delete, overwrite or bind: absent or its own, else refused.

Issue 13: ``persist_file=`` naming the config itself passed ``--check`` and was
deleted at start; ``control_socket=/etc/passwd`` passed too.
"""

from __future__ import annotations

import json
import os
import socket
import stat
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from loaded.cli import main
from loaded.core.commands import Reply, RestoreQuery
from loaded.core.config import load_config
from loaded.core.persist import saved_document
from loaded.daemon.operator import Operator
from loaded.io.files import NotAFileError, write_atomic
from loaded.io.preflight import check_paths, foreign_file, foreign_socket

BASE = "VIP4=198.18.0.10\nserver4=198.19.0.1\n"


def saved(path: Path, workers: int = 1) -> None:
    dump = {"format": "loaded-clients", "version": 1, "written_at": 1.0, "services": {}}
    path.write_text(json.dumps(saved_document([dump], [0], workers, 1.0)))


def conf(tmp_path: Path, extra: str) -> Path:
    p = tmp_path / "loaded.conf"
    p.write_text(BASE + extra)
    return p


def check(tmp_path: Path, extra: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    p = conf(tmp_path, extra)
    code = main(["-c", str(p), "--check"])
    return code, capsys.readouterr().err


def test_persist_file_naming_the_config_is_refused(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "loaded.conf"
    code, err = check(tmp_path, f"persist_file={p}\ncontrol_socket={tmp_path}/s\n", capsys)
    assert code == 2
    assert f"{p}:3: error: persist_file: {p} is this config file" in err
    assert p.exists()


def test_persist_file_naming_someone_elses_file_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    other = tmp_path / "notes.json"
    other.write_text('{"mine": true}')
    code, err = check(tmp_path, f"persist_file={other}\ncontrol_socket={tmp_path}/s\n", capsys)
    assert code == 2
    assert ":3: error: persist_file:" in err and "not a saved client table" in err
    assert other.read_text() == '{"mine": true}'


def test_control_socket_on_a_regular_file_is_refused(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    victim = tmp_path / "passwd"
    victim.write_text("root:x:0:0::/root:/bin/sh\n")
    code, err = check(tmp_path, f"control_socket={victim}\n"
                                f"persist_file={tmp_path}/t.json\n", capsys)
    assert code == 2
    assert f":3: error: control_socket: {victim} exists and is not a socket" in err
    assert victim.exists()


def test_own_files_pass(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    table = tmp_path / "t.json"
    saved(table)
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "s"))  # a stale socket of an earlier run
    sock.close()
    code, err = check(tmp_path, f"control_socket={tmp_path}/s\npersist_file={table}\n", capsys)
    assert code == 0, err


def test_persist_off_does_not_look_at_persist_file(tmp_path: Path) -> None:
    p = conf(tmp_path, "persist_clients=no\n")
    problems = check_paths(load_config(p), p, tmp_path / "s")
    assert problems == []


def test_non_regular_files_are_foreign(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # reading it would block: never opened
    assert foreign_file(fifo) == "not a regular file"
    assert foreign_file(tmp_path) == "not a regular file"
    assert foreign_file(tmp_path / "absent") is None
    assert foreign_socket(fifo) == "exists and is not a socket"
    assert foreign_socket(tmp_path / "absent") is None


def test_a_broken_table_of_ours_is_still_ours(tmp_path: Path) -> None:
    p = tmp_path / "t.json"
    p.write_text(json.dumps({"format": "loaded-saved-tables", "version": 1, "dumps": 3}))
    assert foreign_file(p) is None


def operator(tmp_path: Path, persist: Path) -> Operator:
    p = conf(tmp_path, f"persist_file={persist}\n")
    sup: Any = SimpleNamespace(config=load_config(p), plan=SimpleNamespace(tag="t"),
                    children=[SimpleNamespace(spec=SimpleNamespace(index=0))])
    return Operator(sup)


def test_restore_leaves_a_foreign_file_alone(tmp_path: Path) -> None:
    other = tmp_path / "other.conf"
    other.write_text(BASE)
    assert operator(tmp_path, other).restore_queries() == {}
    assert other.read_text() == BASE


def test_restore_consumes_its_own_table_once(tmp_path: Path) -> None:
    table = tmp_path / "t.json"
    saved(table)
    op = operator(tmp_path, table)
    queries = op.restore_queries()
    assert set(queries) == {0} and isinstance(queries[0], RestoreQuery)
    assert not table.exists()
    assert op.restore_queries() == {}


def test_save_never_overwrites_a_foreign_file(tmp_path: Path) -> None:
    other = tmp_path / "other.txt"
    other.write_text("keep me")
    reply = Reply(1, 0, {"format": "loaded-clients", "version": 1, "written_at": 1.0,
                         "services": {}})
    operator(tmp_path, other).save_tables([reply])
    assert other.read_text() == "keep me"
    table = tmp_path / "t.json"
    operator(tmp_path, table).save_tables([reply])
    assert json.loads(table.read_text())["format"] == "loaded-saved-tables"
    assert stat.S_IMODE(table.stat().st_mode) == 0o600


# --- write_atomic -----------------------------------------------------------------


def test_write_atomic_does_not_follow_a_planted_link(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    target = tmp_path / "stats.json"
    # The old code opened "<name>.tmp" with O_TRUNC, through any link found there.
    (tmp_path / "stats.tmp").symlink_to(victim)
    write_atomic(target, "new", mode=0o600)
    assert victim.read_text() == "precious"
    assert target.read_text() == "new" and not target.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stats.json", "stats.tmp", "victim"]


def test_write_atomic_refuses_a_target_that_is_not_a_file(tmp_path: Path) -> None:
    d = tmp_path / "dir"
    d.mkdir()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for target in (d, fifo):
        with pytest.raises(NotAFileError):
            write_atomic(target, "x")
    assert d.is_dir() and stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "fifo"]
