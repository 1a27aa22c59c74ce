"""One trainer per run directory: an exclusive OS lock on run_dir/.lock.

`flock` belongs to the open file, so the kernel releases it when the process ends in
any way (SIGKILL included): a dead trainer never leaves a stale lock. The file holds
the holder's pid and host for the message a second trainer gets."""
from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

from repo_jax.config import ConfigError
from repo_jax.storage import writing

LOCK_FILE = ".lock"


class RunLock:
    def __init__(self, run_dir: str | os.PathLike):
        run_dir = Path(run_dir)
        path = run_dir / LOCK_FILE
        with writing(str(path)):
            run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise ConfigError(f"run_dir={run_dir} is in use by a running trainer ({holder}); "
                              "wait for it or stop it, or use another run_dir") from None
        try:
            with writing(str(path)):
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
