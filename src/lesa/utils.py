"""Small shared helpers."""
from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Union

from .errors import DiskFullError, OwnershipError

PathLike = Union[str, os.PathLike]


def atomic_write(path: PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it into place.

    A crash or a kill during ``write`` leaves any previous ``path`` intact (the temporary file carries lesa's
    prefix, :data:`lesa.ownership.TEMP_PREFIX`, so that only lesa's own leftovers are ever cleaned up).
    ``path`` must be new or a file lesa wrote in a folder of its own, and no input of the running command
    (:func:`lesa.ownership.check_write`); it is recorded in its folder's marker.

    Raises:
        OwnershipError: ``path`` exists and lesa did not write it, or is an input file.
        DiskFullError: the disk filled up (the previous ``path``, if any, is kept).
    """
    from .ownership import TEMP_PREFIX, check_write, make_folder, register

    path = Path(path)
    check_write(path)
    if not path.parent.is_dir():
        make_folder(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(f"no space left on device to write {path}: free space and run the command again "
                                "(a training run: with --resume)") from None
        raise OwnershipError(f"{path} cannot be written ({err.strerror or err}): choose a path on a file system "
                             "you can write to") from None
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        register(path)
        os.replace(tmp, path)
    except BaseException as err:
        full = _is_disk_full(err, path.parent)  # before the temporary file frees its space
        if os.path.exists(tmp):
            os.unlink(tmp)
        if full:
            kept = f"{path} keeps its previous contents" if path.exists() else f"{path} was not written"
            raise DiskFullError(f"no space left on device while writing {path}: {kept} (a checkpoint there is "
                                "the last good one); free space and run the command again (a training run: with "
                                "--resume)") from None
        raise


def _is_disk_full(err: BaseException, directory: Path) -> bool:
    """ENOSPC, or a failed write on a file system with no space left (torch.save reports a full disk as
    an unrelated RuntimeError)."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if not isinstance(err, Exception):
        return False
    try:
        return shutil.disk_usage(directory).free < 1 << 20
    except OSError:
        return False


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())
