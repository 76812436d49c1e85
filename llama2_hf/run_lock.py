"""One run per folder: an OS-level lock on `<folder>/.lock`, held for the run's life.

`flock` locks belong to the open file: the operating system releases them when the process ends, however it ends
(SIGKILL included), so a crashed run never leaves a folder locked. While a run holds the lock the file names who
holds it (pid, host, command, start time), and a second run is refused with those facts.

Within one process a folder's lock is taken once: a later run in the same folder by the same process (a Python
caller retrying after an error, the quickstart resuming a stage) takes it over instead of locking itself out.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from .errors import UsageError

LOCK_FILE = ".lock"

_HELD: dict[str, int] = {}  # real path of a locked folder -> the open file descriptor holding its lock


def _holder_text(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 4096).decode("utf-8", "replace")
    try:
        holder = json.loads(raw)
        return (f"pid {holder['pid']} on {holder['host']}, `{holder['command']}`, since "
                f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder['since']))}")
    except (ValueError, KeyError, TypeError):
        return "another process"


def acquire(folder: str | os.PathLike) -> Path:
    """Lock `folder` (created if missing) for this process, or raise `UsageError` naming the run that holds it.
    Returns the lock file's path."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"output_dir {folder} is a file, not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    key = os.path.realpath(folder)
    path = folder / LOCK_FILE
    if key in _HELD:
        return path
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder_text(fd)
        os.close(fd)
        raise UsageError(f"{folder} is in use by another run ({holder}): wait for it to finish, or choose "
                         "another output_dir") from None
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
              "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300]}
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps(holder).encode())
    _HELD[key] = fd
    return path


def release(folder: str | os.PathLike) -> None:
    """Release this process's lock on `folder` (nothing when it holds none). The lock file stays: removing it
    would let a run that opened it a moment earlier lock a file no one else sees."""
    fd = _HELD.pop(os.path.realpath(folder), None)
    if fd is None:
        return
    try:
        os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def held() -> set[str]:
    """The folders this process holds (real paths)."""
    return set(_HELD)


__all__ = ["LOCK_FILE", "acquire", "held", "release"]
