"""The run directory: lesa's own folder (:mod:`lesa.ownership`), one run at a time (a lock), never overwritten,
cleaned of lesa's interrupted writes.

A run directory holds ``last.pt`` (the state to resume from), ``best.pt``, ``config.yaml``, ``metrics.csv``,
``summary.json``, TensorBoard events in ``tb/``, the task's own outputs and lesa's marker ``.lesa``. ``.lock``
names the process (pid and host) that is using it; a lock whose process is gone (a run killed with SIGKILL) is
stale and is taken over. A run that finished no epoch (no ``last.pt``: killed, diverged or out of disk in its
first epoch) starts again in place, with or without ``--resume``.
"""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any, Optional

from ..errors import NotFoundError, RunDirError
from ..ownership import check_folder, claim, owns, read_marker, register, remove_interrupted_writes
from .checkpoint import load_checkpoint

LOCK = ".lock"


class RunDir:
    """``RunDir(path).open(resume)`` checks and locks the directory and returns the state to resume from
    (``None`` for a new run, or a run that finished no epoch); ``close()`` releases it. Only the main process
    claims, locks and cleans."""

    def __init__(self, path: str | Path, main: bool = True) -> None:
        self.path = Path(path)
        self.main = main
        self.locked = False
        self.removed_temp: list[str] = []
        self.restarted = False  # a run that finished no epoch, started again in place

    def open(self, resume: bool) -> Optional[dict[str, Any]]:
        last = self.path / "last.pt"
        if self.main:  # the other processes meet the main process's lock and marker: they only read
            check_not_in_use(self.path)
            marker = check_folder(self.path, ("run",), "--output")
        else:
            marker = read_marker(self.path)
        if not resume and last.exists():
            raise RunDirError(f"{self.path} already holds a run (last.pt): pass --resume to continue it, or "
                              "--output DIR for a new run")
        if resume and not last.exists():
            if marker is None:
                raise NotFoundError(f"--resume: there is no {last} to continue from; drop --resume to start a new "
                                    "run")
            resume = False  # lesa's run folder, no epoch finished: nothing to continue, so start it again
        self.restarted = marker is not None and not last.exists()
        state = load_checkpoint(last) if resume else None  # a file that is no lesa run is named before any write
        if self.main:
            claim(self.path, "run")
            self.lock()
            self.removed_temp = remove_interrupted_writes(self.path)
        return state

    def lock(self) -> None:
        path = self.path / LOCK
        me = f"{os.getpid()} {socket.gethostname()} {time.strftime('%Y-%m-%dT%H:%M:%S')}"
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                check_not_in_use(self.path)
                if not owns(path):  # a .lock lesa did not write is the user's: never removed
                    raise RunDirError(f"{path} exists and lesa did not write it; it is left as it is: choose "
                                      "another --output") from None
                path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as f:
                f.write(me + "\n")
            register(path)
            self.locked = True
            return
        raise RunDirError(f"could not lock {self.path}: another process keeps taking {path}")

    def close(self) -> None:
        if self.locked:
            (self.path / LOCK).unlink(missing_ok=True)
            self.locked = False


def check_not_in_use(folder: Path) -> None:
    """Refuse a run folder whose lock names a live process (a lock from another host counts as live).

    Raises:
        RunDirError: naming the process, the host and when it started; never advice that would harm it.
    """
    holder = read_lock(folder / LOCK)
    if holder is None or not lock_is_live(*holder):
        return
    pid, host = holder
    since = _lock_time(folder / LOCK)
    if host == socket.gethostname():
        raise RunDirError(f"{folder} is in use by a live run: process {pid} on this machine{since} holds its "
                          f"lock ({folder / LOCK}); wait for that run to end (or stop it), or choose another --output")
    raise RunDirError(f"{folder} is in use by process {pid} on host {host}{since} ({folder / LOCK}); wait for that "
                      f"run to end, or choose another --output. If {host} runs no lesa there any more (a crashed "
                      f"node), delete {folder / LOCK}")


def _lock_time(path: Path) -> str:
    try:
        parts = path.read_text().split()
    except OSError:
        return ""
    return f" since {parts[2]}" if len(parts) > 2 else ""


def read_lock(path: Path) -> Optional[tuple[int, str]]:
    try:
        pid, host = path.read_text().split()[:2]
        return int(pid), host
    except (OSError, ValueError):
        return None  # unreadable or half-written: treated as stale


def lock_is_live(pid: int, host: str) -> bool:
    """Whether the locking process still runs; a lock from another host is assumed live."""
    if host != socket.gethostname():
        return True
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
