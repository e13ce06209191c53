"""Files written whole or not at all: write ``.<name>.<pid>.tmp`` beside the target, then
``os.replace`` it over the target (atomic on POSIX and Windows).

A process killed mid-write (kill -9, power cut) cannot remove its temp file; the next
writer into the same directory does: :func:`remove_stale_temp_files` deletes the temp
files of processes that are no longer alive, and leaves those of live writers alone.
"""
import os
import re
from pathlib import Path
from typing import Callable, List

_TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.(?P<pid>\d+)\.tmp$")


def temp_path(path: Path) -> Path:
    """This process's temporary name for ``path``."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_atomically(path, write: Callable[[object], None], durable: bool = False) -> Path:
    """Call ``write(file)`` on a temp file and rename it over ``path``; the temp file never
    outlives a failed write. ``durable``: fsync the file before, and the directory after,
    the rename, so the new content survives a power cut."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only there when the write failed
    if durable:
        _fsync_dir(path.parent)
    return path


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    except OverflowError:  # not a pid this system can have
        return False
    return True


def remove_stale_temp_files(directory, target: str = None) -> List[Path]:
    """Delete the temp files (of ``target`` only, when given) in ``directory`` whose writing
    process is gone; returns what was removed. Temp files of live processes, including
    this one, are kept: they may be mid-write."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for entry in directory.iterdir():
        match = _TEMP_NAME.match(entry.name)
        if match is None or (target is not None and match["target"] != target):
            continue
        if not pid_alive(int(match["pid"])):
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed
