"""One job per output folder: rank 0 holds an flock on <output>/.lock for the whole run and deletes the file when
it releases the lock, so a finished run leaves no `.lock` behind. A crash leaves the file, but never a held lock:
the kernel drops the flock with the process, and only the flock (not the file) says the folder is busy."""
from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path

from utils.checkpoint import CheckpointError
from utils.distributed import Ranks

LOCK_NAME = ".lock"


class OutputBusyError(CheckpointError):
    """Another live job holds the output folder's lock."""


class OutputLock:
    """flock on <output>/.lock, held by rank 0 from start to exit; the kernel releases it if the process dies."""

    def __init__(self, fd: int | None, path: Path | None = None) -> None:
        self._fd = fd
        self._path = path

    def release(self) -> None:
        if self._fd is not None:
            # unlink while still holding the flock; a job that opened the old file meanwhile sees it is no longer
            # the path's file after it gets the flock, and opens the path again (`lock_output`)
            if self._path is not None and _same_file(self._fd, self._path):
                self._path.unlink()
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None
            if _HELD.get(self._path) is self:
                del _HELD[self._path]

    def __del__(self) -> None:
        self.release()

    def __enter__(self) -> "OutputLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lock_output(output: str | os.PathLike, ranks: Ranks = Ranks(), wait_s: float | None = None) -> OutputLock:
    """Take the output folder's lock on rank 0; every rank raises at once when another job holds it.

    After an elastic restart (TORCHELASTIC_RESTART_COUNT > 0) rank 0 waits up to 60 s for the previous
    attempt's process to be gone; otherwise a held lock fails immediately."""
    output = Path(output)
    fd, holder = None, ""
    if ranks.rank == 0:
        key = output.resolve() / LOCK_NAME
        if key in _HELD:  # runs in one process are sequential: a lock this process still holds is a finished
            _HELD[key].release()  # run's (e.g. kept alive by a traceback), not another job's
        if wait_s is None:
            wait_s = 60.0 if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0 else 0.0
        output.mkdir(parents=True, exist_ok=True)
        path = output / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if _same_file(fd, path):
                    break
                os.close(fd)  # its holder released and deleted it: lock the path's file now
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
                continue
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
                    os.close(fd)
                    fd = None
                    break
                time.sleep(0.2)
        if fd is not None:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                          f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
    if not ranks.agree_all(ranks.rank != 0 or fd is not None):
        raise OutputBusyError(f"output folder {output} is in use by another run ({holder or 'see its ' + LOCK_NAME}): "
                           f"two jobs in one folder would interleave checkpoints. Wait for it, stop it, or set "
                           f"another `output`")
    lock = OutputLock(fd, output.resolve() / LOCK_NAME)
    if fd is not None:
        _HELD[lock._path] = lock
    return lock


def _same_file(fd: int, path: Path) -> bool:
    """Whether the open `fd` is still the file at `path` (not deleted or replaced since it was opened)."""
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


_HELD: dict[Path, OutputLock] = {}  # this process's output locks, by lock file
