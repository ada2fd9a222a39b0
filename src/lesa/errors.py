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


class DataError(LesaError, ValueError):
    """A dataset that is malformed, empty or unreadable."""


class CheckpointError(LesaError, ValueError):
    """A weights or checkpoint file that cannot be read, or does not fit what it is loaded into."""


class NotFoundError(LesaError, FileNotFoundError):
    """A file or directory that the user named does not exist."""


class RunDirError(LesaError, FileExistsError):
    """A run directory that is in use, or holds a run that would be overwritten."""


class NonFiniteLossError(LesaError, RuntimeError):
    """The loss became NaN or infinite; the run stopped without writing a checkpoint."""

    exit_code = 1


class DiskFullError(LesaError, OSError):
    """The disk filled up while writing; the last good checkpoint is kept."""
