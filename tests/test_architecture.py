"""The package's layers (docs/architecture.md): the engine imports no task, and no module imports back into a
module that imports it (no cycle), at module level or inside functions."""
import ast
from pathlib import Path

import lesa

PACKAGE = Path(lesa.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """The lesa modules ``path`` imports (relative imports resolved; ``from X import name`` counts X.name when
    that is a module)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")
            base = base[: len(base) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                found.add(candidate if candidate in MODULES else target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in MODULES}


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}
GRAPH = {name: imports(path) for name, path in MODULES.items()}


def test_the_engine_imports_no_task():
    for name, targets in GRAPH.items():
        if name.startswith("lesa.engine"):
            tasks = sorted(t for t in targets if t.startswith(("lesa.classification", "lesa.detection")))
            assert not tasks, f"{name} imports {tasks}"


def test_the_package_has_no_import_cycle():
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for target in GRAPH[node]:
            if target == node or node.startswith(target + "."):  # a module importing its own package's __init__
                continue
            if state.get(target) == 1:
                cycle = stack[stack.index(target):] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[node] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name)


def test_the_old_detection_train_path_warns_and_still_provides_its_names():
    import importlib
    import sys

    import pytest

    sys.modules.pop("lesa.detection.train", None)
    with pytest.warns(DeprecationWarning, match="lesa.detection.train is deprecated"):
        old = importlib.import_module("lesa.detection.train")
    from lesa.detection import config, evaluate, predict, task

    assert (old.DetConfig, old.train_detector, old.evaluate_run, old.predict_images) == \
        (config.DetConfig, task.train_detector, evaluate.evaluate_run, predict.predict_images)


def test_no_source_file_but_the_command_line_is_over_500_lines():
    """One concept a file: a module that outgrows this holds several and is split (cli.py is one section per
    command)."""
    long = {str(path.relative_to(PACKAGE)): n for path in sorted(PACKAGE.rglob("*.py"))
            if path.name != "cli.py" and (n := len(path.read_text().splitlines())) > 500}
    assert not long, long
