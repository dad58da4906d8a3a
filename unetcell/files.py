"""Atomic writes and the no-silent-overwrite rule, for every file unetcell writes.

A result appears under its final name only when it is complete: it is written to a temporary
file in the same folder (so the rename cannot cross file systems) and renamed over the target.
An interrupted run leaves no half-written TIFF, model or table behind.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import OutputExistsError, UnetcellError

# errno values that mean the disk (or the user's quota or file size limit) is full.
_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class DiskFullError(UnetcellError):
    """The disk filled up while an output was written; the partial file is gone."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_writable(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse to replace a file the user made unless `overwrite` is set."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} exists; pass --overwrite to replace it")
    return path


def _temp_prefix(path: Path) -> str:
    # The writer's process id is in the name, so a later run can tell a temporary file whose
    # writer was killed (kill -9, a power cut) from one that is still being written.
    return f".{path.stem}.{os.getpid()}."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # another user's live process
    return True


def remove_stale_temporaries(path: str | os.PathLike, suffix: str | None = None) -> list[Path]:
    """Remove the temporary files left beside `path` by writers that no longer run; returns
    what was removed."""
    path = Path(path)
    pattern = re.compile(
        re.escape(f".{path.stem}.") + r"(\d+)\.[A-Za-z0-9_]+" + re.escape(suffix or path.suffix) + "$"
    )
    removed = []
    if not path.parent.is_dir():
        return removed
    for candidate in path.parent.glob(f".{glob_escape(path.stem)}.*"):
        match = pattern.match(candidate.name)
        if match is None or _alive(int(match.group(1))):
            continue
        if candidate.is_dir():
            shutil.rmtree(candidate, ignore_errors=True)
        else:
            candidate.unlink(missing_ok=True)
        removed.append(candidate)
    return removed


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def _disk_full(path: Path, tmp: Path, error: OSError, size_hint: int | None) -> DiskFullError:
    written = tmp.stat().st_size if tmp.is_file() else 0
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = None
    need = f"about {format_bytes(size_hint)} needed" if size_hint else f"more than the {format_bytes(written)} written"
    have = f", {format_bytes(free)} free on that disk" if free is not None else ""
    reason = os.strerror(error.errno) if error.errno else "the disk is full or a file size limit was reached"
    return DiskFullError(
        f"{path}: could not be written, {reason.lower()} ({need}{have}); the partial file was "
        "removed. Free some space or write to another disk"
    )


def format_bytes(nbytes: float) -> str:
    """A size for people: 4.0 MiB, 1.2 GiB."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{int(nbytes)} bytes"


@contextlib.contextmanager
def atomic_path(
    path: str | os.PathLike, suffix: str | None = None, size_hint: int | None = None
) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it to `path` when the block succeeds.

    The temporary name keeps the target's suffix (or `suffix`), because writers such as
    Keras and tifffile choose the format by it. Temporary files of killed earlier writers of
    the same path are removed first. A full disk becomes a DiskFullError that says how much
    space the file needed (`size_hint` bytes, when the caller knows).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path, suffix)
    fd, tmp = tempfile.mkstemp(
        prefix=_temp_prefix(path), suffix=suffix or path.suffix, dir=path.parent
    )
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        if tmp.is_file():
            # mkstemp makes the file owner-only; give it the mode a plain open() would.
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as e:
        full = _full_error(e)
        error = _disk_full(path, tmp, full, size_hint) if full is not None else None
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        if error is not None:
            raise error from None
        raise


def _full_error(error: BaseException) -> OSError | None:
    """The OSError saying the disk is full, when `error` is one or was caused by one (writers
    such as h5py wrap it)."""
    seen = 0
    while error is not None and seen < 5:
        if isinstance(error, OSError) and (
            error.errno in _FULL or "No space left" in str(error)
            # numpy's tofile reports a short write without an errno
            or (error.errno is None and re.search(r"requested and \d+ written", str(error)))
        ):
            return error
        error = error.__cause__ or error.__context__
        seen += 1
    return None


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Like `atomic_path` for a folder (a SavedModel): built aside, renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path, "")
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's folder is owner-only
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
