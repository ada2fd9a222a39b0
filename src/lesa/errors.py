"""The errors a user can fix: each message names what was wrong and how to fix it.

The ``lesa`` command prints a :class:`LesaError` as one line and exits with its ``exit_code`` (2 for bad
input); any other exception is a bug in lesa and keeps its traceback. Each class also derives from the
built-in exception a Python caller would expect (``ValueError``, ``FileNotFoundError``, ...).
"""
from __future__ import annotations


class LesaError(Exception):
    """An error in what the user asked for, not in lesa."""

    exit_code = 2


class ConfigError(LesaError, ValueError):
    """An option, argument or configuration value that cannot work."""


class InputError(ConfigError):
    """A tensor that a layer or model cannot take (its rank, channels, size, dtype or device)."""


class DataError(LesaError, ValueError):
    """A dataset that is malformed, empty or unreadable."""


class BadImageError(DataError):
    """An image file that cannot be decoded (not an image, corrupt or truncated) or that exceeds PIL's pixel
    limit; the datasets that tolerate bad images skip and count exactly these."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(path, reason)  # both in ``args``, so the error pickles across DataLoader workers
        self.path, self.reason = path, reason

    def __str__(self) -> str:
        return f"image {self.path} cannot be read: {self.reason}"


class CheckpointError(LesaError, ValueError):
    """A weights or checkpoint file that cannot be read, or does not fit what it is loaded into."""


class NotFoundError(LesaError, FileNotFoundError):
    """A file or directory that the user named does not exist."""


class RunDirError(LesaError, FileExistsError):
    """A run directory that is in use, or holds a run that would be overwritten."""


class OwnershipError(LesaError, PermissionError):
    """A write that would replace or remove a file lesa did not write, or into a folder that is not lesa's
    (see :mod:`lesa.ownership`)."""


class NonFiniteLossError(LesaError, RuntimeError):
    """The loss became NaN or infinite; the run stopped without writing a checkpoint."""

    exit_code = 1


class DiskFullError(LesaError, OSError):
    """The disk filled up while writing; the last good checkpoint is kept."""
