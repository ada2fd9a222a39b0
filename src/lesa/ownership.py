"""What lesa owns: the folders it made and the files it wrote there. lesa never replaces or removes anything else.

A folder lesa writes into (a run, an analysis, predictions, a comparison) carries a marker, ``.lesa``: its
first line a JSON header (format version, kind of folder, the command that made it, when), then one line per
entry lesa wrote there (a JSON string: a file, or a sub-folder it made). The rules, applied at the one place
every write goes through (:func:`lesa.utils.atomic_write`) and checked before any work (:func:`check_folder`,
called by :func:`lesa.outputs.guard_outputs`):

* An output folder must be new, empty or lesa's own (marked, of a kind the command may write into). A folder
  holding anything else is refused before any work, naming a few of its entries and the fix. A folder of an
  earlier lesa without a marker is adopted when every entry is a run file (:data:`RUN_FILES`), one of them
  ``last.pt`` (a run resumes from it only once it has been read as lesa's training checkpoint).
* In lesa's own folder, lesa replaces the files it wrote (a re-run refreshes its outputs) and leaves every
  other entry (a user's notes added later) as it is; a write that would take such an entry's name is refused.
* Outside its folders (``lesa export RUN model.onnx`` into the working folder) lesa writes only new files: an
  existing file there is never replaced.
* The input files of a command (``--config``, images, annotation files, checkpoints) are never an output
  (:func:`running`).
* Temporary files of interrupted writes carry lesa's own prefix (:data:`TEMP_PREFIX`); only those, and only
  in lesa's folders, are cleaned up (:func:`remove_interrupted_writes`).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .errors import OwnershipError

MARKER = ".lesa"
FORMAT = 1
TEMP_PREFIX = ".lesa-tmp-"
TEMP_FILE = re.compile(r"^\.lesa-tmp-.+\.[A-Za-z0-9_]{8}\.tmp$")  # what atomic_write's mkstemp makes
# what a run folder of an earlier lesa (before markers) may hold: adopted only when it holds nothing else
RUN_FILES = ("last.pt", "best.pt", "config.yaml", "metrics.csv", "summary.json", "tb", "curves.png", "coco_eval.json",
             "analysis", ".lock")
RUN_EVIDENCE = ("last.pt",)
# kinds of folder: what each command writes into (det eval writes coco_eval.json into its run by default)
KINDS = ("run", "analysis", "predictions", "compare", "evaluation")


@dataclass
class Marker:
    """A folder's ``.lesa``: its header and the entries lesa wrote there."""

    kind: str
    command: str = ""
    created: str = ""
    entries: set[str] = field(default_factory=set)
    size: int = 0  # of the marker file when read: a changed size means another writer appended


_cache: dict[str, Marker] = {}
_inputs: list[set[str]] = []  # the input files of the commands running in this process (see ``running``)
_commands: list[str] = []  # and their command lines, for the markers of the folders they make


def read_marker(folder: str | Path) -> Optional[Marker]:
    """The marker of ``folder``, or ``None`` (no marker, or a ``.lesa`` that is not lesa's)."""
    path = Path(folder) / MARKER
    try:
        size = path.stat().st_size
        key = str(path.resolve())
    except OSError:
        return None
    cached = _cache.get(key)
    if cached is not None and cached.size == size:
        return cached
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
        header = json.loads(lines[0])
        if not (isinstance(header, dict) and header.get("lesa") == FORMAT and header.get("kind") in KINDS):
            return None
    except (OSError, ValueError, IndexError, UnicodeDecodeError):
        return None
    entries = set()
    for line in lines[1:]:
        with contextlib.suppress(ValueError):  # a line half-written by a kill: ignored
            entry = json.loads(line)
            if isinstance(entry, str):
                entries.add(entry)
    marker = Marker(header["kind"], str(header.get("command", "")), str(header.get("created", "")), entries, size)
    _cache[key] = marker
    return marker


def command_line() -> str:
    """The command that is running (as :func:`running` was told), else this process's own command line."""
    if _commands:
        return _commands[-1]
    return " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "python"


def foreign_entries(folder: Path, marker: Optional[Marker]) -> list[str]:
    """The entries of ``folder`` that lesa did not write: for a folder without a (valid) marker, all of them
    (a user's own ``.lesa`` or ``.lesa-tmp-*`` too)."""
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return []
    if marker is None:
        return names
    return [n for n in names if n != MARKER and n not in marker.entries and not TEMP_FILE.match(n)]


def is_earlier_run(folder: Path) -> bool:
    """A run folder of a lesa from before markers (no ``.lesa``): only run files, among them its checkpoint.
    Only a training command adopts one, once it has read its ``last.pt`` as lesa's (:class:`RunDir`)."""
    if read_marker(folder) is not None:
        return False
    names = foreign_entries(folder, None)
    rest = [n for n in names if n not in RUN_FILES and not (n.startswith(".") and n.endswith(".tmp"))]
    return bool(names) and not rest and all(n in names for n in RUN_EVIDENCE)


def check_folder(folder: str | Path, kinds: tuple[str, ...], option: str) -> Optional[Marker]:
    """Whether a command may write into ``folder`` (it writes folders of the first of ``kinds``): it is new,
    empty, lesa's own of one of ``kinds``, or a run of an earlier lesa. Nothing is written. Returns the marker
    (``None`` for a new or empty folder, or an earlier run).

    Raises:
        OwnershipError: a folder holding entries lesa did not write (a few named), or lesa's folder of
            another kind, with the fix.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return None
    marker = read_marker(folder)
    if marker is not None:
        if marker.kind not in kinds:
            raise OwnershipError(
                f"{option} {folder} is lesa's {marker.kind} folder (made by `{marker.command}`), not a"
                f"{'n' if kinds[0][0] in 'aeiou' else ''} {kinds[0]} folder: choose a new folder (lesa creates it)")
        return marker
    names = foreign_entries(folder, None)
    if not names or (kinds == ("run",) and is_earlier_run(folder)):
        return None
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    raise OwnershipError(
        f"{option} {folder} holds files lesa did not write ({shown}); lesa writes only into a new or empty folder "
        f"(or one it made): choose a new {option} folder (lesa creates it), or an empty one")


def claim(folder: str | Path, kind: str, kinds: Optional[tuple[str, ...]] = None, option: str = "--output"
          ) -> Marker:
    """Make ``folder`` lesa's (of ``kind``) if it is new, empty or an earlier run; keep it if it is already
    lesa's (of one of ``kinds``, default ``(kind,)``). The folder is created with its parents, and registered
    in its parent's marker where the parent is lesa's too.

    Raises:
        OwnershipError: see :func:`check_folder`.
    """
    folder = Path(folder)
    marker = check_folder(folder, kinds or (kind,), option)
    if marker is not None:
        return marker
    earlier = foreign_entries(folder, None) if folder.is_dir() else []
    if earlier:  # not empty, yet accepted: a run folder of an earlier lesa (check_folder)
        kind = "run"
    make_folder(folder)
    header = dict(lesa=FORMAT, kind=kind, command=command_line(), created=time.strftime("%Y-%m-%dT%H:%M:%S"))
    lines = [json.dumps(header)] + [json.dumps(n) for n in earlier if n in RUN_FILES]
    path = folder / MARKER
    tmp = folder / f"{TEMP_PREFIX}{MARKER}.{os.getpid()}"
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    marker = read_marker(folder)
    assert marker is not None
    return marker


def make_folder(folder: Path) -> None:
    """``mkdir -p``, registering each new folder in its parent's marker where the parent is lesa's."""
    missing = []
    current = folder.absolute()
    while not current.exists() and current != current.parent:
        missing.append(current)
        current = current.parent
    for path in reversed(missing):
        try:
            path.mkdir()
        except FileExistsError:
            pass
        except OSError as err:  # e.g. under /proc, which root may "write" but where nothing can be created
            raise OwnershipError(f"{path} cannot be created ({err.strerror or err}): choose a folder on a file "
                                 "system you can write to") from None
        register(path)


def register(path: str | Path) -> None:
    """Record that lesa wrote ``path`` (a file, or a folder it made), in its folder's marker if that folder is
    lesa's; nothing elsewhere."""
    path = Path(path)
    marker = read_marker(path.parent)
    if marker is None or path.name in marker.entries:
        return
    with open(path.parent / MARKER, "a", encoding="utf-8") as f:
        f.write(json.dumps(path.name) + "\n")
    marker.entries.add(path.name)
    with contextlib.suppress(OSError):
        marker.size = (path.parent / MARKER).stat().st_size


def owns(path: str | Path) -> bool:
    """Whether ``path`` is an entry lesa wrote in a folder of its own."""
    path = Path(path)
    marker = read_marker(path.parent)
    return marker is not None and path.name in marker.entries


def check_write(path: str | Path) -> None:
    """Refuse a write that would replace what lesa did not write, or one of the running command's inputs.

    Raises:
        OwnershipError: ``path`` exists and is not lesa's (see the module docstring), or is an input file.
    """
    path = Path(path)
    if is_input(path):
        raise OwnershipError(f"{path} is an input of this command: lesa never writes over its inputs; write the "
                             "output to another path")
    if os.path.lexists(path) and not owns(path):
        if read_marker(path.parent) is None:  # outside lesa's folders no record says who wrote a file
            raise OwnershipError(f"{path} exists: lesa replaces no file outside the folders it made (it keeps no "
                                 "record of writing it); choose another output path, or delete the file first to "
                                 "write it again")
        raise OwnershipError(f"{path} exists and lesa did not write it: it is left as it is; choose another output "
                             "path (or a new folder)")


@contextlib.contextmanager
def running(command: str, inputs: Iterable[str | Path]) -> Iterator[None]:
    """While the block runs, ``command`` (``lesa train ...``) is what the markers of new folders record, and the
    files in ``inputs`` (its input files) are never written (:func:`check_write`)."""
    resolved = set()
    for p in inputs:
        with contextlib.suppress(OSError, ValueError, RuntimeError):
            if Path(p).is_file():
                resolved.add(str(Path(p).resolve()))
    _inputs.append(resolved)
    _commands.append(command)
    try:
        yield
    finally:
        _inputs.pop()
        _commands.pop()


def is_input(path: Path) -> bool:
    if not _inputs:
        return False
    try:
        target = str(path.resolve())
    except (OSError, RuntimeError):
        return False
    return any(target in inputs for inputs in _inputs)


def remove_interrupted_writes(folder: str | Path) -> list[str]:
    """Delete the temporary files that writes interrupted by a kill left in lesa's ``folder``
    (``.lesa-tmp-NAME.XXXXXXXX.tmp``, :data:`TEMP_FILE`, see :func:`lesa.utils.atomic_write`; they can be as
    large as a checkpoint). Nothing else, and nothing in a folder that is not lesa's."""
    folder = Path(folder)
    if read_marker(folder) is None:
        return []
    removed = []
    for tmp in folder.glob(f"{TEMP_PREFIX}*"):
        if TEMP_FILE.match(tmp.name) and tmp.is_file() and not tmp.is_symlink():
            tmp.unlink(missing_ok=True)
            removed.append(tmp.name)
    return removed
