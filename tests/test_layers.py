"""The house stays readable: headstart's modules import downward only, with no cycle, counting the
imports made inside functions; no module imports another's private name.

LAYERS lists the modules from the top (the command line) to the foundation. A module may import
modules of lower layers only; a module missing from LAYERS fails the test, so a new module
is placed on purpose. Importing ``headstart.a.b`` also runs package ``headstart.a``'s
``__init__``, so that counts as an import of the package too (not of ``headstart`` itself, whose
``__init__`` imports only `_version` and `errors` and loads the public API lazily).
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

LAYERS: list[tuple[str, ...]] = [
    ("__main__",),
    ("cli",),
    ("headstart", "distributed.launch"),  # the public API (loaded lazily); launch runs the CLI
    ("cv", "tune", "budget"),  # verbs built on training (budget: members and their ensemble)
    ("training", "training.demo"),
    ("training.recipe", "compare"),
    ("training.refit",),  # the final fit on train + validation, after the choices
    ("training.session", "ensemble", "deploy", "deploy.serve", "deploy.export", "deploy.predict"),
    ("training.choose", "training.views", "report"),
    ("calibrate", "explain", "deploy.predictor", "training.crossval"),
    (
        "evaluation",
        "extract",
        "check",
        "summaries",
        "training.cache",
        "training.callbacks",
        "training.state",
    ),
    ("runtime",),  # the frozen parts on OpenVINO or Keras (extract and evaluation run them)
    ("runs", "tta", "model", "distributed", "distributed.cluster"),
    ("splits", "freeze", "figures", "imbalance", "tracking"),
    ("config", "data", "augment", "layers", "backbones"),
    (
        "files",
        "metrics",
        "progress",
        "backbones.efficientnet_lite",
        "backbones.hub",
        "training.phases",
        "training.noise",  # folds, standard errors, the one-standard-error rule
    ),
    ("_version", "errors"),  # the foundation
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in (SRC / "headstart").rglob("*.py")}


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int, str]]:
    """(imported module, line, names) for every import of a headstart module, at any depth of
    the file (inside functions too), with the packages each import also initialises."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [(alias.name, "") for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = []
            for alias in node.names:
                child = f"{base}.{alias.name}"
                targets.append((child if child in modules else base, alias.name))
        else:
            continue
        for target, imported in targets:
            if not (target == "headstart" or target.startswith("headstart.")):
                continue
            parts = target.split(".")
            for end in range(2, len(parts) + 1):  # the packages along the way run too
                found.append((".".join(parts[:end]), node.lineno, imported))
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {
        name: {target for target, _, _ in _imports(name, path, modules) if target != name}
        for name, path in modules.items()
    }


def _rank() -> dict[str, int]:
    rank = {}
    for level, names in enumerate(reversed(LAYERS)):
        for short in names:
            rank["headstart" if short == "headstart" else f"headstart.{short}"] = level
    return rank


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (modules in order), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state and (found := visit(target)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_every_module_has_a_layer():
    rank = _rank()
    missing = sorted(set(_modules()) - set(rank))
    assert not missing, f"place these modules in LAYERS: {missing}"
    stale = sorted(set(rank) - set(_modules()))
    assert not stale, f"LAYERS names modules that do not exist: {stale}"


def test_imports_go_down_the_layers_only():
    rank, modules = _rank(), _modules()
    upward = [
        f"{name} (layer {rank[name]}) imports {target} (layer {rank[target]}) at line {line}"
        for name, path in modules.items()
        for target, line, _ in _imports(name, path, modules)
        if target != name
        and target in rank
        and not name.startswith(target + ".")  # a module inside a package may use its package
        and rank[target] >= rank[name]
    ]
    assert not upward, "imports that do not go down:\n" + "\n".join(upward)


def test_no_import_cycle_counting_imports_inside_functions():
    graph = _graph()
    for name in graph:  # a package's own modules importing it is its __init__ running first
        graph[name] = {t for t in graph[name] if not name.startswith(t + ".")}
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph))}"


def test_no_module_imports_another_modules_private_name():
    modules = _modules()
    private = [
        f"{name} imports {imported} from {target} at line {line}"
        for name, path in modules.items()
        for target, line, imported in _imports(name, path, modules)
        if imported.startswith("_") and not imported.startswith("__") and target != name
    ]
    assert not private, "private names used across modules:\n" + "\n".join(private)


def test_the_check_sees_a_cycle_and_an_upward_import(tmp_path):
    """The checks above can fail: a made-up graph with a cycle hidden in a function is caught."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycle(graph) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from headstart.cli import main\n")
    found = _imports("headstart.files", source, {"headstart.cli": source})
    assert ("headstart.cli", 2, "main") in found
    assert _rank()["headstart.cli"] > _rank()["headstart.files"]
