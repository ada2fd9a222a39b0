"""The run directory: one run at a time (a lock), never overwritten, cleaned of interrupted writes.

A run directory holds ``last.pt`` (the state to resume from), ``best.pt``, ``config.yaml``, ``metrics.csv``,
``summary.json``, TensorBoard events in ``tb/`` and the task's own outputs. ``.lock`` names the process
(pid and host) that is using it; a lock whose process is gone (a run killed with SIGKILL) is stale and is
taken over.
"""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any, Optional

from ..errors import NotFoundError, RunDirError
from .checkpoint import load_checkpoint

LOCK = ".lock"
OUTPUTS = ("best.pt", "metrics.csv", "summary.json", "tb")


class RunDir:
    """``RunDir(path).open(resume)`` checks and locks the directory and returns the state to resume from
    (``None`` for a new run); ``close()`` releases it. Only the main process locks and cleans."""

    def __init__(self, path: str | Path, main: bool = True) -> None:
        self.path = Path(path)
        self.main = main
        self.locked = False
        self.removed_temp: list[str] = []

    def open(self, resume: bool) -> Optional[dict[str, Any]]:
        last = self.path / "last.pt"
        if not resume:
            if last.exists():
                raise RunDirError(f"{self.path} already holds a run (last.pt): pass --resume to continue it, or "
                                  "--output DIR for a new run")
            found = [name for name in OUTPUTS if (self.path / name).exists()]
            if found:
                raise RunDirError(f"{self.path} holds run output ({', '.join(found)}) but no last.pt to resume "
                                  "from: choose a new --output DIR, or remove that output first")
        elif not last.exists():
            raise NotFoundError(f"--resume: there is no {last} to continue from; drop --resume to start a new run")
        if self.main:
            self.path.mkdir(parents=True, exist_ok=True)
            self.lock()
            self.removed_temp = remove_interrupted_writes(self.path)
        try:
            return load_checkpoint(last) if resume else None
        except BaseException:
            self.close()
            raise

    def lock(self) -> None:
        path = self.path / LOCK
        me = f"{os.getpid()} {socket.gethostname()} {time.strftime('%Y-%m-%dT%H:%M:%S')}"
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = read_lock(path)
                if holder is not None and lock_is_live(*holder):
                    pid, host = holder
                    raise RunDirError(
                        f"{self.path} is in use by process {pid} on {host} ({path}); wait for that run to end, or "
                        f"use another --output. If no run is using it, delete {path}") from None
                path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as f:
                f.write(me + "\n")
            self.locked = True
            return
        raise RunDirError(f"could not lock {self.path}: another process keeps taking {path}")

    def close(self) -> None:
        if self.locked:
            (self.path / LOCK).unlink(missing_ok=True)
            self.locked = False


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


def remove_interrupted_writes(path: Path) -> list[str]:
    """Delete the temporary files of writes that a kill interrupted (``.<name>.<random>.tmp``, see
    :func:`lesa.utils.atomic_write`); they can be as large as a checkpoint."""
    removed = []
    for tmp in path.glob(".*.tmp"):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)
            removed.append(tmp.name)
    return removed
