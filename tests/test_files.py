"""Atomic writes: all or nothing, never over a user's file, with ordinary permissions."""

import os
import stat

import pytest

from unetcell.errors import OutputExistsError
from unetcell.files import atomic_dir, atomic_path, check_writable, write_text_atomic


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_written_files_get_the_mode_of_a_plain_open(tmp_path):
    old = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "a.txt", "x")
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "f").write_text("y")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "a.txt") == 0o644
    assert _mode(tmp_path / "d") == 0o755


def test_a_failed_write_leaves_nothing_behind(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "out.tif") as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("interrupted")
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "model") as tmp:
            (tmp / "part").write_text("half")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_existing_files_are_refused_without_overwrite(tmp_path):
    (tmp_path / "mine.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        check_writable(tmp_path / "mine.txt", overwrite=False)
    assert check_writable(tmp_path / "mine.txt", overwrite=True) == tmp_path / "mine.txt"
