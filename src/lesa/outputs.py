"""The one output guard: every command checks where it will write before it does any work.

A command's options declare their paths by role (:mod:`lesa.options`: ``input``, ``output_dir``,
``output_file``). :func:`guard_outputs` refuses, with the option and the fix, a destination that

* exists as the wrong kind (a file where a directory goes, or the reverse),
* lies under a file, or under a directory this user cannot write to (checked on the nearest existing
  ancestor: nothing is created here),
* has a name longer than the file system allows,
* is one of the command's input files, or would write a file that is one (``lesa convert ckpt.pth
  ckpt.pth``; ``lesa det predict photos/*.png --output photos`` when a drawing would take a photo's name),
* is a folder that lesa may not write into, or a file it may not replace (:mod:`lesa.ownership`: a new or
  empty folder, or one lesa made, of the kind the command writes; an existing file only if lesa wrote it in
  its own folder).

Writing itself stays atomic (:func:`lesa.utils.atomic_write`).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable, Optional

from .errors import ConfigError, NotFoundError, OwnershipError
from .options import flag
from .ownership import MARKER, RUN_FILES, check_folder, check_write, is_earlier_run, owns, read_marker

OUTPUT_ROLES = ("output_dir", "output_file")
INPUT_ROLES = ("input", "input_file", "input_tree")


def roles(options: Any) -> dict[str, str]:
    """``{option: role}`` of the path options of a :func:`lesa.options.schema` class or instance."""
    found = {}
    for name, info in getattr(options, "__pydantic_fields__", {}).items():
        extra = info.json_schema_extra
        if isinstance(extra, dict) and "role" in extra:
            found[name] = extra["role"]
    return found


def _paths(value: Any) -> list[str]:
    if value is None:
        return []
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]


def input_paths(options: Any) -> list[str]:
    """The paths an options instance reads (its ``input`` and ``input_tree`` options)."""
    return [p for name, role in roles(options).items() if role in INPUT_ROLES
            for p in _paths(getattr(options, name))]


def guard_outputs(options: Any, names: Optional[dict[str, str]] = None, extra_inputs: Sequence[str] = ()) -> None:
    """Check every destination of ``options`` (a :func:`lesa.options.schema` instance) before any work.

    A destination left unset is taken from ``options.default_outputs()`` when the command defines it;
    ``options.planned_outputs()`` may name the files a command writes inside an output directory (so that
    none of them is an input); ``options.OUTPUT_KINDS`` the kinds of lesa folder an output directory may be
    (default ``('run',)``, see :func:`lesa.ownership.check_folder`); ``extra_inputs`` are input files that are
    not options of the schema (``--config``).
    ``names`` maps an option to how the user wrote it (default ``--kebab-case``).

    Raises:
        ConfigError: see the module docstring.
    """
    names = names or {}
    inputs: list[str] = []
    trees: list[str] = []  # input folders the command lists recursively (datasets)
    outputs: list[tuple[str, str, str]] = []  # (path, kind, option)
    # output directories: (path, kinds of lesa folder, option, whether it is the command's default)
    folders: list[tuple[str, tuple[str, ...], str, bool]] = []
    defaults = options.default_outputs() if hasattr(options, "default_outputs") else {}
    planned = options.planned_outputs() if hasattr(options, "planned_outputs") else {}
    kinds = getattr(options, "OUTPUT_KINDS", {})
    inputs += list(extra_inputs)
    for name, role in roles(options).items():
        value = getattr(options, name)
        if role == "input":
            inputs += _paths(value)
        elif role == "input_file":
            inputs += _paths(value)
            for path in _paths(value):  # a missing input is the first thing to fix, before any output's problem
                if not _exists(Path(path)):
                    raise NotFoundError(f"{names.get(name, flag(name))} {path!r} does not exist")
        elif role == "input_tree":
            inputs += _paths(value)
            trees += _paths(value)
        elif role in OUTPUT_ROLES:
            defaulted = value is None
            value = value if value is not None else defaults.get(name)
            for path in _paths(value):
                option = names.get(name, flag(name))
                outputs.append((path, role, option))
                if role == "output_dir":
                    folders.append((path, kinds.get(name, ("run",)), option, defaulted))
                # the files the command will write inside an output directory
                outputs += [(str(Path(path) / file), "planned_file", option) for file in planned.get(name, [])]
    for path, kind, option in outputs:
        check_destination(path, "output_file" if kind == "planned_file" else kind, option, inputs)
        for tree in trees:
            check_not_inside(Path(path), Path(tree), f"{option} {path}")
    for path, folder_kinds, option, defaulted in folders:
        # a default beside the input (RUN/analysis, det eval's RUN) is checked by the command once it has read the
        # input, so that a bad input is named first
        if not (defaulted and any(_within(Path(path), Path(source)) for source in inputs)):
            _owned_or_new(lambda p=path, k=folder_kinds, o=option: check_folder(p, k, o))
    for path, kind, option in outputs:
        if kind == "output_file":
            check_not_a_runs_own_file(Path(path), option)
        # a run folder of an earlier lesa is adopted by the run that resumes it, once its last.pt is read
        if kind in ("output_file", "planned_file") and not is_earlier_run(Path(path).parent):
            _owned_or_new(lambda p=path: check_write(p), f"{option} ")


def check_not_a_runs_own_file(target: Path, option: str) -> None:
    """An output file of export / convert is never one of a run folder's own files (its training state)."""
    marker = read_marker(target.parent)
    if marker is not None and marker.kind == "run" and (target.name in RUN_FILES or target.name == MARKER):
        raise OwnershipError(f"{option} {target} is one of the files of lesa's run in {target.parent} (its training "
                             f"state and records): write to another name, e.g. {target.parent / 'model.safetensors'}")


def _within(target: Path, source: Path) -> bool:
    """Whether ``target`` is the folder of ``source`` (a folder, or a file's folder) or lies inside it."""
    try:
        folder = (source if _is_dir(source) else source.parent).resolve()
        return target.resolve().is_relative_to(folder)
    except (OSError, RuntimeError, ValueError):
        return False


def _owned_or_new(check: Callable[[], Any], prefix: str = "") -> None:
    """Run an ownership check (its error prefixed with the option); a path the system cannot look up is left to
    the messages of the checks before."""
    try:
        check()
    except OwnershipError as err:
        if not prefix:
            raise
        raise OwnershipError(prefix + str(err)) from None
    except OSError:
        pass


def check_destination(path: str, kind: str, option: str, inputs: list[str]) -> None:
    """One destination (``kind`` ``'output_dir'`` or ``'output_file'``); see :func:`guard_outputs`."""
    where = f"{option} {path}"
    target = Path(path)
    _check_name_lengths(target, where)
    if _is_symlink(target) and not _exists(target):
        raise ConfigError(f"{where} is a symbolic link to {os.readlink(target)}, which does not exist; remove the "
                          "link or choose another path")
    if kind == "output_dir" and _exists(target) and not target.is_dir():
        raise ConfigError(f"{where} is a file, not a directory; choose a directory (it is created if missing)")
    if kind == "output_file" and _is_dir(target):
        raise ConfigError(f"{where} is a directory; give a file name, e.g. {target / 'model.safetensors'}")
    _check_writable(target, where)
    for source in inputs:
        _check_not_input(target, kind, Path(source), where)


def _check_name_lengths(target: Path, where: str) -> None:
    anchor = _nearest_existing(target)
    try:
        name_max = os.pathconf(anchor, "PC_NAME_MAX")
        path_max = os.pathconf(anchor, "PC_PATH_MAX")
    except (OSError, ValueError):
        name_max, path_max = 255, 4096
    too_long = [part for part in target.parts if len(os.fsencode(part)) > name_max]
    if too_long:
        raise ConfigError(f"{where}: the name {too_long[0][:40]!r}... is {len(os.fsencode(too_long[0]))} bytes, "
                          f"longer than this file system allows ({name_max}); choose a shorter name")
    if len(os.fsencode(str(target.absolute()))) >= path_max:
        raise ConfigError(f"{where}: the path is longer than this file system allows ({path_max} bytes); "
                          "choose a shorter one")


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # e.g. a name too long to look up
        return False


def _is_symlink(path: Path) -> bool:
    try:
        return path.is_symlink()
    except OSError:
        return False


def _is_dir(path: Path) -> bool:
    return _exists(path) and path.is_dir()


def _is_file(path: Path) -> bool:
    return _exists(path) and path.is_file()


def _nearest_existing(target: Path) -> Path:
    current = target.absolute()
    while not _exists(current) and current != current.parent:
        current = current.parent
    return current


def _check_writable(target: Path, where: str) -> None:
    anchor = _nearest_existing(target)
    if anchor != target.absolute() and not anchor.is_dir():
        raise ConfigError(f"{where}: {anchor} is a file, so nothing can be created under it; choose another path")
    # an existing destination must be writable itself; a new one needs a writable nearest ancestor
    if not os.access(anchor, os.W_OK | (os.X_OK if anchor.is_dir() else 0)):
        raise ConfigError(f"{where}: {anchor} is not writable by this user; choose a path you can write to")


def _same(a: Path, b: Path) -> bool:
    try:
        return _exists(a) and _exists(b) and os.path.samefile(a, b)
    except OSError:
        return False


def check_not_inside(target: Path, tree: Path, where: str) -> None:
    """Outputs inside a dataset folder would be listed as data the next time it is read."""
    if not _is_dir(tree):
        return
    anchor = _nearest_existing(target)
    try:
        inside = anchor.resolve().is_relative_to(tree.resolve())
    except OSError:
        return
    if inside:
        raise ConfigError(f"{where} is inside the data folder {tree}: the run's files would be read as data next "
                          "time; choose a folder outside it")


def _check_not_input(target: Path, kind: str, source: Path, where: str) -> None:
    # writing into an input *directory* (a run directory) is how analyze / det eval work; an input *file* is
    # never a destination
    if _same(target, source) and (kind == "output_file" or not _is_dir(source)):
        raise ConfigError(f"{where} is also this command's input {source}: it would be overwritten; write to "
                          "another path")
    # an existing file in an input folder, or beside an input file, may be what the input resolves to (a run
    # directory's best.pt) or the user's own file: never overwritten (lesa's other outputs there are its own:
    # det eval refreshes its run's coco_eval.json)
    folder = source if _is_dir(source) else source.parent
    resolved_to = _is_dir(source) and target.name in ("best.pt", "last.pt")
    if kind == "output_file" and _is_file(target) and _same(target.parent, folder) and (resolved_to or
                                                                                         not owns(target)):
        raise ConfigError(f"{where} exists in the folder of this command's input {source}; it would be "
                          "overwritten: write to another path")
