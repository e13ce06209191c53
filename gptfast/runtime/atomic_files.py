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
    check_writable_file(path, "write")  # a directory there: name it, not the temp file's errno
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


def check_output_dir(path, what: str) -> str:
    """Raise the OSError that says which path is wrong and how when ``path`` cannot be (or
    become) a directory for ``what`` (e.g. "save_pretrained", "--out") to write into: a
    file where a directory is wanted (``path`` itself or a parent), or an existing
    directory that is not writable. Creates nothing; returns ``path`` as a str."""
    path = os.fspath(path)
    probe = path
    while probe and not os.path.exists(probe):
        parent = os.path.dirname(probe)
        probe = parent if parent != probe else ""
    if probe and not os.path.isdir(probe):
        where = "" if probe == path else f" (a parent of {path!r})"
        raise NotADirectoryError(f"{what}: {probe!r}{where} is a file, not a directory")
    if probe and not os.access(probe, os.W_OK | os.X_OK):
        where = "" if probe == path else f" (where {path!r} would be created)"
        raise PermissionError(f"{what}: the directory {probe!r}{where} is not writable")
    return path


def make_output_dir(path, what: str) -> str:
    """``check_output_dir``, then create the directory (and its parents) and return it; a
    place that cannot be created (e.g. under /proc) raises the OSError naming it."""
    path = check_output_dir(path, what)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise type(e)(f"{what}: cannot create the directory {path!r}: {e.strerror or e}") from None
    return path


def check_writable_file(path, what: str) -> None:
    """Raise IsADirectoryError naming ``path`` when a directory stands where ``what`` will
    write a file (a rename over it would fail with a bare errno on the temp file)."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"{what}: {os.fspath(path)!r} is a directory, where a file is to be written: "
                                "remove or rename it")


def check_output_file(path, what: str) -> str:
    """Raise the OSError naming ``path`` when ``what`` (e.g. "--json") could not write a file
    there: a directory standing at ``path``, or a parent that cannot be a writable directory
    (``check_output_dir``). Creates nothing; returns ``path`` as a str."""
    path = os.fspath(path)
    check_writable_file(path, what)
    check_output_dir(os.path.dirname(os.path.abspath(path)), what)
    return path
