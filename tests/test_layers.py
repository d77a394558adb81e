"""gptft's modules sit in layers and import only down: the graph of every ``import`` in the package
(module level and inside functions; ``if TYPE_CHECKING:`` blocks aside, they never run) goes from a
layer to the same or a lower one, and has no cycle.

A new module goes into ``LAYERS`` (by its name or a package prefix); the test names a module that
is in no layer. Task classes and job classes are named in ``gptft.registry`` as strings and
imported by name when used: that is how a low registry reaches the tasks above it.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "gptft"

# Top to bottom. A name covers the module and everything under it (the longest name decides).
LAYERS = [
    ("entry points", ["gptft.cli", "gptft.__main__"]),
    ("commands", ["gptft.commands"]),
    ("whole jobs and services", ["gptft.run", "gptft.export", "gptft.judge", "gptft.serve",
                                 "gptft.assets"]),
    ("tasks", ["gptft.tasks"]),
    ("training loop and task contract", ["gptft.trainer", "gptft.task"]),
    ("model services and run outputs", ["gptft.runs", "gptft.classifier", "gptft.generate", "gptft.chat",
                                        "gptft.plan", "gptft.activations", "gptft.fsdp",
                                        "gptft.lora", "gptft.trainable", "gptft.checkpoints",
                                        "gptft.tracking", "gptft.plots", "gptft.metrics",
                                        "gptft.console", "gptft.accelerator"]),
    ("data", ["gptft.data"]),
    ("models", ["gptft.model", "gptft.models"]),
    ("configuration, tokenizers, run folder", ["gptft.config", "gptft.data.config", "gptft.prompts",
                                               "gptft.templates", "gptft.tokenizer", "gptft.hub",
                                               "gptft.runfolder"]),
    ("ground floor", ["gptft", "gptft.errors", "gptft.io", "gptft.validation", "gptft.timing",
                      "gptft.cpu", "gptft.signals", "gptft.download", "gptft.registry", "gptft.modes"]),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def layer_of(module: str) -> int:
    """The index in LAYERS of `module` (0: the top), by the longest matching name (the bare
    ``gptft`` is the package's ``__init__`` only: every other module is placed by name)."""
    best = max(((len(name), i) for i, (_, names) in enumerate(LAYERS) for name in names
                if module == name or (name != "gptft" and module.startswith(name + "."))), default=None)
    if best is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in tests/test_layers.py")
    return best[1]


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Every Import / ImportFrom under `tree`, not descending into ``if TYPE_CHECKING:``."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            yield from (n for child in node.orelse for n in _imports_of(child))
            continue
        yield from _imports_of(node)


def _imports_of(node: ast.AST):
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        yield node
    yield from _imports(node)


def imports_of(module: str) -> set[str]:
    """The gptft modules `module` imports (``from gptft.x import y``: ``gptft.x.y`` if a module)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in _imports(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            base = node.module or ""
            if node.level:  # relative: from its package
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        for target in targets:
            while target and target not in MODULES:  # a name inside a module: the module
                target = target.rpartition(".")[0]
            if target and target != module:
                out.add(target)
    return out


GRAPH = {m: imports_of(m) for m in MODULES}


def test_every_module_is_in_a_layer():
    for module in MODULES:
        layer_of(module)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module):
    up = [f"{target} ({LAYERS[layer_of(target)][0]})" for target in sorted(GRAPH[module])
          if layer_of(target) < layer_of(module)]
    assert not up, f"{module} ({LAYERS[layer_of(module)][0]}) imports a layer above it: {', '.join(up)}"


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of `graph` (its modules in order, the first repeated last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycles():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checks_can_fail():
    """An upward import and a cycle are found (the checks above are not vacuous)."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert layer_of("gptft.config") > layer_of("gptft.tasks.base")  # config sits below the tasks
    assert layer_of("gptft.data.config") > layer_of("gptft.data.instruction")
    with pytest.raises(AssertionError, match="in no layer"):
        layer_of("elsewhere.module")
    with pytest.raises(AssertionError, match="in no layer"):
        layer_of("gptft.a_new_module")  # a new module is placed in LAYERS on purpose
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import gptft.cli\n"
                     "def f():\n    from gptft import trainer\n")
    assert [ast.unparse(n) for n in _imports(tree)] == ["from typing import TYPE_CHECKING",
                                                         "from gptft import trainer"]
