"""No untyped dict crosses the boundary between the control loop and the training workers.

Read from the source with ``ast`` (nothing is imported): every public method of the Ray actor
classes in ``actors/`` -- the training worker and the coordinator, with the record it inherits --
returns a declared type from :mod:`elastic_moe.actors.messages` (or a plain value), never a
``dict`` or ``Any``; the worker's arguments are typed the same way. Allowed, and listed here with
the reason: the coordinator's run record, which is a JSON document persisted as such.
"""

from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ACTORS = os.path.join(ROOT, "actors")
# (class, method): why a dict may cross there
ALLOWED = {
    ("CoordinatorState", "snapshot"): "the run record, a JSON document (coordinator.json)",
    ("CoordinatorState", "restore_point"): "the record's committed-checkpoint entry (JSON)",
    ("CoordinatorState", "start_epoch"): "the new epoch's entry of the record (JSON)",
}


def _classes() -> dict[str, ast.ClassDef]:
    out = {}
    for name in sorted(os.listdir(ACTORS)):
        if name.endswith(".py"):
            with open(os.path.join(ACTORS, name)) as f:
                tree = ast.parse(f.read())
            out.update({node.name: node for node in ast.walk(tree)
                        if isinstance(node, ast.ClassDef)})
    return out


def _is_remote(node: ast.ClassDef) -> bool:
    for deco in node.decorator_list:
        target = deco.func if isinstance(deco, ast.Call) else deco
        if ast.unparse(target) == "ray.remote":
            return True
    return False


def _actor_methods() -> list[tuple[str, ast.FunctionDef]]:
    classes = _classes()
    seen, out = set(), []
    queue = [c for c in classes.values() if _is_remote(c)]
    while queue:
        cls = queue.pop()
        if cls.name in seen:
            continue
        seen.add(cls.name)
        queue += [classes[b.id] for b in cls.bases if isinstance(b, ast.Name) and b.id in classes]
        out += [(cls.name, f) for f in cls.body
                if isinstance(f, ast.FunctionDef) and not f.name.startswith("_")]
    return out


def _untyped(annotation: ast.expr | None) -> bool:
    if annotation is None:
        return True
    text = ast.unparse(annotation)
    return text == "Any" or "dict[" in text.split("|")[0] or text.startswith(("dict", "Dict"))


def test_the_actor_classes_are_found():
    names = {cls for cls, _ in _actor_methods()}
    assert {"TrainWorker", "Coordinator", "CoordinatorState"} <= names, names
    methods = {(cls, f.name) for cls, f in _actor_methods()}
    assert {("TrainWorker", "join"), ("TrainWorker", "ping"), ("TrainWorker", "holdings"),
            ("TrainWorker", "info"), ("CoordinatorState", "renew_lease"),
            ("Coordinator", "progress")} <= methods


def test_no_untyped_dict_is_returned_by_an_actor_method():
    bad = [f"{cls}.{f.name} -> {ast.unparse(f.returns) if f.returns else '(none)'}"
           for cls, f in _actor_methods()
           if (cls, f.name) not in ALLOWED and _untyped(f.returns)
           and not (f.returns is not None and ast.unparse(f.returns) == "None")]
    assert not bad, "actor methods returning an untyped dict (use actors/messages.py):\n" + \
        "\n".join(bad)


def test_the_workers_arguments_are_typed():
    bad = [f"TrainWorker.{f.name}({a.arg}: {ast.unparse(a.annotation) if a.annotation else '?'})"
           for cls, f in _actor_methods() if cls == "TrainWorker"
           for a in f.args.args[1:] + f.args.kwonlyargs if _untyped(a.annotation)]
    assert not bad, "\n".join(bad)
