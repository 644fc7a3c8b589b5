"""Imports run one way (docs/architecture.md, "The parts"): jobs -> actors -> elastic_moe ->
kernels, and inside the library train -> parallel -> model; ``model/`` never imports ``parallel/``;
no import cycles.

The graph is built from the source with ``ast`` (nothing is imported), over the whole
``elastic_moe`` namespace: ``elastic_moe/`` plus the repository's ``kernels/``, ``actors/`` and
``jobs/`` folders as ``elastic_moe.kernels``, ``elastic_moe.actors`` and ``elastic_moe.jobs``.

What counts as an arrow ``a -> b``: every ``import`` / ``from ... import`` statement anywhere in
``a`` (module level, inside functions, and under ``if TYPE_CHECKING:`` too: a type named in a
signature is a dependency of the design even when it costs nothing at run time), resolved to the
longest project module it names (``from elastic_moe.model import hf`` names ``elastic_moe.model.hf``).
Not counted: the implicit import of a module's parent packages (Python runs
``elastic_moe/model/__init__.py`` before ``elastic_moe.model.hf``; a package importing its own
submodules would otherwise always look like a cycle), and imports by string (``importlib``).
"""

from __future__ import annotations

import ast
import os
from collections.abc import Iterator

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGE = "elastic_moe"
# Folder in the repository -> the module name it is imported as.
FOLDERS = {"elastic_moe": PACKAGE, "kernels": f"{PACKAGE}.kernels", "actors": f"{PACKAGE}.actors",
           "jobs": f"{PACKAGE}.jobs"}
# Namespace plumbing every folder's __init__ may use (it maps kernels/ etc. under elastic_moe); it
# imports no project module itself (checked below), so it adds no arrow back up.
PLUMBING = {PACKAGE, f"{PACKAGE}._namespace"}
# Layers from the top; a module may import its own layer or any layer below it, never one above.
# The library's other modules (config, checkpoint, data) sit between actors and kernels and are not
# ordered against train/parallel/model: they may not import actors or jobs, and kernels may not
# import them.
LAYERS = [f"{PACKAGE}.jobs", f"{PACKAGE}.actors", f"{PACKAGE}.train", f"{PACKAGE}.parallel",
          f"{PACKAGE}.model", f"{PACKAGE}.kernels"]


def _modules() -> dict[str, str]:
    """Module name -> source file, for every .py file of the namespace."""
    found = {}
    for folder, name in FOLDERS.items():
        base = os.path.join(ROOT, folder)
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if d not in FOLDERS and not d.startswith((".", "__"))]
            rel = os.path.relpath(dirpath, base)
            parts = [name] + ([] if rel == "." else rel.split(os.sep))
            for filename in filenames:
                if not filename.endswith(".py"):
                    continue
                stem = filename[:-3]
                module = ".".join(parts if stem == "__init__" else [*parts, stem])
                found[module] = os.path.join(dirpath, filename)
    return found


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The longest project module that ``name`` starts with (None for third-party names)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in MODULES:
            return candidate
    return None


def _imported_names(module: str, tree: ast.AST) -> Iterator[tuple[str, int]]:
    is_package = MODULES[module].endswith("__init__.py")
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[:len(base) - node.level + (1 if is_package else 0)]
                source = ".".join([*base, node.module] if node.module else base)
            else:
                source = node.module or ""
            for alias in node.names:
                yield f"{source}.{alias.name}", node.lineno  # a submodule, or a name in `source`


def _graph() -> dict[str, dict[str, int]]:
    """module -> {imported project module: first line}."""
    graph: dict[str, dict[str, int]] = {}
    for module, path in sorted(MODULES.items()):
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), filename=path)
        arrows: dict[str, int] = {}
        for name, line in _imported_names(module, tree):
            target = _resolve(name)
            if target is not None and target != module:
                arrows.setdefault(target, line)
        graph[module] = arrows
    return graph


GRAPH = _graph()


def _where(module: str, target: str) -> str:
    path = os.path.relpath(MODULES[module], ROOT)
    return f"{path}:{GRAPH[module][target]} {module} -> {target}"


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _layer(module: str) -> int | None:
    for index, package in enumerate(LAYERS):
        if _in(module, package):
            return index
    return None


def _cycles() -> list[list[str]]:
    """One cycle (as a path that ends where it starts) per strongly connected component."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan; the graph has ~150 nodes, recursion is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)

    cycles = []
    for component in components:
        members = set(component)
        start = component[0]
        # Shortest way back to `start` inside the component (breadth-first).
        previous: dict[str, str] = {}
        frontier = [start]
        end = None
        while frontier and end is None:
            nxt = []
            for v in frontier:
                for w in sorted(GRAPH[v]):
                    if w not in members:
                        continue
                    if w == start:
                        end = v
                        break
                    if w not in previous:
                        previous[w] = v
                        nxt.append(w)
                if end is not None:
                    break
            frontier = nxt
        assert end is not None
        path = [end]
        while path[-1] != start:
            path.append(previous[path[-1]])
        cycles.append([*reversed(path), start])
    return cycles


def test_the_graph_covers_the_whole_namespace():
    for name in ("elastic_moe.model.transformer", "elastic_moe.parallel.mesh", "elastic_moe.train.step",
                 "elastic_moe.kernels", "elastic_moe.actors.coordinator", "elastic_moe.jobs.train"):
        assert name in MODULES, name
    # Sanity: the resolver sees real arrows (a parse that found nothing would pass every check).
    assert "elastic_moe.model.transformer" in GRAPH["elastic_moe.parallel.setup"]
    assert "elastic_moe.kernels" in GRAPH["elastic_moe.model.moe"]


def test_model_imports_neither_parallel_nor_train():
    bad = [_where(m, t) for m, arrows in GRAPH.items() if _in(m, f"{PACKAGE}.model")
           for t in arrows if _in(t, f"{PACKAGE}.parallel") or _in(t, f"{PACKAGE}.train")]
    assert not bad, "model/ must not import parallel/ or train/:\n" + "\n".join(bad)


def test_no_import_cycles():
    cycles = _cycles()
    message = "\n".join(" -> ".join(cycle) for cycle in cycles)
    assert not cycles, "import cycles:\n" + message


def test_imports_never_go_up_a_layer():
    bad = []
    for module, arrows in GRAPH.items():
        if module in PLUMBING:
            continue
        mine = _layer(module)
        for target in arrows:
            if target in PLUMBING:
                continue
            theirs = _layer(target)
            if theirs is None:  # config, checkpoint, data: below actors, above kernels
                if mine == LAYERS.index(f"{PACKAGE}.kernels"):
                    bad.append(_where(module, target))
                continue
            if mine is None:  # config, checkpoint, data may use train/parallel/model, not above
                if theirs < LAYERS.index(f"{PACKAGE}.train"):
                    bad.append(_where(module, target))
                continue
            if theirs < mine:
                bad.append(_where(module, target))
    assert not bad, ("imports must run jobs -> actors -> elastic_moe (train -> parallel -> model) "
                     "-> kernels:\n" + "\n".join(bad))


def test_namespace_plumbing_imports_no_project_module():
    for module in PLUMBING:
        assert set(GRAPH[module]) <= PLUMBING, (module, GRAPH[module])


def test_the_coordinator_starts_without_torch():
    """A restarted coordinator must be serving the workers' leases within
    elastic.hang_timeout_s, or they stop themselves and the run falls back to its checkpoint;
    importing torch alone takes 2-3 s on a loaded CPU box (seen in CI when it crept in)."""
    import subprocess
    import sys

    code = ("import sys, elastic_moe.actors.run_loop; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))[:5])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout
