"""The import graph, read with `ast` (nothing is imported): no package imports one that imports it back,
and dependencies run one way: commands -> training/evaluation -> model/data/faces/metrics -> config.

Imports inside functions count too: a lazy import is still a dependency."""

import ast
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Source folders and the package each installs as (pyproject.toml's package-dir).
ROOTS = {"mm_lightning": "mm_lightning", "callbacks": "mm_lightning.callbacks", "evaluation": "mm_lightning.evaluation"}

# Layer of each module, by longest matching name prefix (higher may import lower, never the reverse).
COMMANDS, TRAINING, BUILDING_BLOCKS, CONFIG = 3, 2, 1, 0
LAYERS = {
    "mm_lightning.cli": COMMANDS,
    "mm_lightning.__main__": COMMANDS,
    "mm_lightning.commands": COMMANDS,
    # training and the evaluation run (sample, score, log), tables and reports
    "mm_lightning.curriculum": TRAINING,
    "mm_lightning.strategies": TRAINING,
    "mm_lightning.module": TRAINING,
    "mm_lightning.ema": TRAINING,
    "mm_lightning.memory": TRAINING,
    "mm_lightning.reliance": TRAINING,
    "mm_lightning.ablation_matrix": TRAINING,
    "mm_lightning.evaluation_run": TRAINING,
    "mm_lightning.callbacks": TRAINING,
    "mm_lightning.reports": TRAINING,
    "mm_lightning.evaluation.suite": TRAINING,
    "mm_lightning.evaluation.sampling": TRAINING,
    # model, data, faces, metrics (the rest of evaluation/, installed as mm_lightning.evaluation)
    "mm_lightning.models": BUILDING_BLOCKS,
    "mm_lightning.data": BUILDING_BLOCKS,
    "mm_lightning.faces": BUILDING_BLOCKS,
    "mm_lightning.text": BUILDING_BLOCKS,
    "mm_lightning.pipeline": BUILDING_BLOCKS,
    "mm_lightning.evaluation": BUILDING_BLOCKS,
    # config, tracking constants, output settings
    "mm_lightning.config": CONFIG,
    "mm_lightning.tracking": CONFIG,
    "mm_lightning.quiet": CONFIG,
    "mm_lightning": CONFIG,  # the package's __init__
}
LAYER_NAMES = {
    COMMANDS: "commands",
    TRAINING: "training/evaluation",
    BUILDING_BLOCKS: "model/data/faces/metrics",
    CONFIG: "config",
}


def _module_name(path: Path) -> str:
    """The installed name: callbacks/evaluation.py is mm_lightning.callbacks.evaluation."""
    folder, *parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join([ROOTS[folder], *(parts[:-1] if parts[-1] == "__init__" else parts)])


def _imports() -> list[tuple[str, str, str]]:
    """(importing module, imported module, 'file:line') for every import of our own packages."""
    edges = []
    for root in ROOTS:
        for path in sorted((REPO / root).rglob("*.py")):
            module = _module_name(path)
            package = module if path.name == "__init__.py" else module.rpartition(".")[0]
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    targets = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom):
                    base = node.module or ""
                    if node.level:  # relative: from ..x import y
                        anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                        base = ".".join(anchor + ([base] if base else []))
                    # `from pkg import name` may name a submodule
                    targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
                else:
                    continue
                where = f"{path.relative_to(REPO)}:{node.lineno}"
                edges += [(module, t, where) for t in targets if t.split(".")[0] == "mm_lightning"]
    return edges


def _known(name: str, modules: set[str]) -> str | None:
    """The module an imported name refers to (`from x import f` names x.f, which is x)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _top_level(module: str) -> str:
    return module.split(".")[0]


def _subpackage(module: str) -> str:
    """A subpackage or top-level module of mm_lightning (mm_lightning.data, mm_lightning.config), or a top-level
    package: the finer unit of the cycle check."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "mm_lightning" else parts[0]


def _layer(module: str) -> int | None:
    prefixes = [p for p in LAYERS if module == p or module.startswith(p + ".")]
    return LAYERS[max(prefixes, key=len)] if prefixes else None


def _graph() -> list[tuple[str, str, str]]:
    modules = {_module_name(p) for root in ROOTS for p in (REPO / root).rglob("*.py")}
    edges = {(src, _known(dst, modules), where) for src, dst, where in _imports()}
    return sorted((src, dst, where) for src, dst, where in edges if dst and dst != src)


def _cycle_violations(_package) -> list[str]:
    """Imports from a package into one that (directly or not) imports it back."""
    reaches = defaultdict(set)
    for src, dst, _ in _graph():
        if _package(src) != _package(dst):
            reaches[_package(src)].add(_package(dst))

    def reachable(start):
        seen, todo = set(), [start]
        while todo:
            for nxt in reaches[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        return seen

    return sorted(
        {
            f"{where}: {src} -> {dst} ({_package(dst)} leads back to {_package(src)})"
            for src, dst, where in _graph()
            if _package(src) != _package(dst) and _package(src) in reachable(_package(dst))
        }
    )


def _layer_violations() -> list[str]:
    out = []
    for src, dst, where in _graph():
        low, high = _layer(src), _layer(dst)
        if low is None or high is None:
            out.append(f"{where}: {src if low is None else dst} has no layer in LAYERS")
        elif high > low:
            out.append(f"{where}: {src} ({LAYER_NAMES[low]}) imports {dst} ({LAYER_NAMES[high]})")
    return sorted(set(out))


def test_the_graph_reader_sees_relative_lazy_and_from_imports():
    graph = {(src, dst) for src, dst, _ in _graph()}
    assert ("mm_lightning.commands.describe", "mm_lightning.models.loading") in graph  # lazy, relative
    assert ("mm_lightning.cli", "mm_lightning.quiet") in graph  # absolute
    assert ("mm_lightning.commands.common", "mm_lightning.config") in graph  # from x import function


def test_no_subpackage_imports_one_that_imports_it_back():
    violations = _cycle_violations(_subpackage)
    assert not violations, "\n".join(violations)


def test_only_one_top_level_package_is_installed():
    assert {_top_level(_module_name(p)) for root in ROOTS for p in (REPO / root).rglob("*.py")} == {"mm_lightning"}


def test_dependencies_run_one_way():
    violations = _layer_violations()
    assert not violations, "\n".join(violations)
