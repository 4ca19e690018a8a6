"""Files a reader can trust: atomic writes, disk-full errors in one line, caches that heal."""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import logging
import os
import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from experiments.core.errors import ExperimentError

log = logging.getLogger(__name__)

# A full disk, a quota, or a file-size limit: the user frees space, then resumes.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
UNWRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)
# What reading a truncated or overwritten .npy / .h5 / .json raises.
CORRUPT = (zipfile.BadZipFile, EOFError, ValueError, KeyError, OSError)

T = TypeVar("T")


def check_writable(path: Path, what: str) -> None:
    """One line unless `path` can be written: the file and its folder if it exists, else the
    nearest folder above it that exists (where the missing ones are then created)."""
    path = Path(path)
    existing = next(p for p in (path, *path.parents) if p.exists())
    for needed in [path, path.parent] if existing == path else [existing]:
        if not os.access(needed, os.W_OK):
            why = "a read-only file system" if _read_only_fs(needed) else "no write permission"
            raise ExperimentError(
                f"{what}: {needed} is not writable ({why}); make it writable, or give a path "
                f"in a writable folder"
            )


def _read_only_fs(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


@contextlib.contextmanager
def atomic_path(path: Path, suffix: str = "") -> Iterator[Path]:
    """A temporary path beside `path`, renamed onto it when the block ends without error.

    A disk-full error becomes one ExperimentError naming `path`, and leaves no partial file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=suffix or path.suffix, dir=path.parent
    )
    os.close(fd)
    tmp = Path(name)
    try:
        with writing_in_one_line(path):
            yield tmp
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def staging_dir(parent: Path, prefix: str) -> Iterator[Path]:
    """A folder of this process in `parent`, removed when the block ends, however it ends.

    Its name holds its owner (host, pid, the pid's start time): a folder of this prefix that a
    process of this host left when it was killed (kill -9 skips every cleanup) is removed
    first, with one line. Another host's folders on a shared disk are left alone.
    """
    from experiments.core.processes import Owner, this_process

    parent.mkdir(parents=True, exist_ok=True)
    me = this_process()
    for left in parent.glob(f"{glob.escape(prefix)}*"):
        host, _, rest = left.name[len(prefix) :].partition("~")
        pid, _, started = rest.partition("~")
        try:
            owner = Owner(host, int(pid), float(started.split("~")[0]))
        except ValueError:
            continue  # not one of ours
        if owner.on_this_host() and not owner.alive():
            shutil.rmtree(left, ignore_errors=True)
            log.info("removed %s, which a killed process (pid %s) left", left, pid)
    owned = f"{prefix}{me.host}~{me.pid}~{me.started:.0f}~"
    tmp = Path(tempfile.mkdtemp(prefix=owned, dir=parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """A temporary folder beside `path`, renamed onto it when the block ends without error.

    If another process put `path` in place meanwhile (two sweep jobs building one cache), its
    folder is kept and ours is dropped: both were built from the same inputs. One left by a
    killed process is removed by the next (`staging_dir`).
    """
    with staging_dir(path.parent, f".{path.name}.") as tmp, writing_in_one_line(path):
        yield tmp
        try:
            os.rename(tmp, path)
        except OSError as err:
            if err.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not path.is_dir():
                raise


@contextlib.contextmanager
def writing_in_one_line(path: Path) -> Iterator[None]:
    """A full disk, or a place that cannot be written (a read-only file system, no permission),
    becomes one ExperimentError naming `path`."""
    try:
        yield
    except OSError as err:
        if err.errno in DISK_FULL:
            raise ExperimentError(
                f"no space left writing {path} ({os.strerror(err.errno)}); free space there "
                f"or point paths.* elsewhere, then run the same command again"
            ) from None
        if err.errno in UNWRITABLE:
            raise ExperimentError(
                f"cannot write {path} ({os.strerror(err.errno)}: {err.filename or path}); "
                f"make it writable or write elsewhere, then run the same command again"
            ) from None
        raise


def write_json(path: Path, data) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data))


def read_cache(path: Path, read: Callable[[Path], T]) -> T | None:
    """`read(path)`, or None when the file is missing or corrupt.

    A corrupt or partial file (a crash from before writes were atomic, a copy cut short, a bad
    disk) would fail every later run the same way: it is moved aside with one warning that names
    it, and the caller rebuilds it.
    """
    if not path.exists():
        return None
    try:
        return read(path)
    except CORRUPT as err:
        aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(path, aside)
        log.warning(
            "cache file %s is corrupt or partial (%s: %s); moved it aside to %s and rebuilding it",
            path,
            type(err).__name__,
            str(err).splitlines()[0][:200] if str(err) else "",
            aside,
        )
        return None
