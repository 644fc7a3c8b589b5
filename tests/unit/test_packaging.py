"""The installed distribution exposes one top-level import name, ``elastic_moe``.

Generic names (``kernels``, ``actors``, ``jobs``) collide with other distributions: Hugging
Face's ``kernels``, which transformers imports, was shadowed by ours. The repository's top-level
folders install under the ``elastic_moe`` namespace instead (pyproject's package-dir mapping).
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SOURCE_FOLDERS = {"elastic_moe": "elastic_moe", "kernels": "elastic_moe/kernels",
                  "actors": "elastic_moe/actors", "jobs": "elastic_moe/jobs"}


def _top_level_names(dist: importlib.metadata.Distribution) -> set[str]:
    """What the files of ``dist`` make importable at the top level (as packages_distributions infers)."""
    names = set()
    for file in dist.files or []:
        first = file.parts[0]
        if first.endswith((".dist-info", ".egg-info")) or first == "..":
            continue
        names.add(first[:-3] if first.endswith(".py") else first)
    return names


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The project installed (a real wheel build + install) into a folder of its own."""
    tmp = tmp_path_factory.mktemp("install")
    source = tmp / "src"  # a copy: setuptools writes build/ into the tree it builds
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), source / name)
    for folder in SOURCE_FOLDERS:
        shutil.copytree(os.path.join(ROOT, folder), source / folder,
                        ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(source)], check=True, timeout=300)
    return target


def test_installed_distribution_has_only_the_elastic_moe_namespace(installed):
    (dist,) = importlib.metadata.distributions(path=[str(installed)])
    assert dist.metadata["Name"] == "elastic-moe"
    assert dist.read_text("top_level.txt").split() == ["elastic_moe"]
    assert _top_level_names(dist) == {"elastic_moe"}
    assert sorted(os.listdir(installed)) == ["elastic_moe", f"elastic_moe-{dist.version}.dist-info"]


def test_every_source_module_is_in_the_wheel_under_the_namespace(installed):
    (dist,) = importlib.metadata.distributions(path=[str(installed)])
    in_wheel = {str(file) for file in dist.files if str(file).endswith(".py")}
    expected = set()
    for folder, installed_as in SOURCE_FOLDERS.items():
        for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, folder)):
            dirnames[:] = [name for name in dirnames if name != "__pycache__"]
            rel = os.path.relpath(dirpath, os.path.join(ROOT, folder))
            for name in filenames:
                if name.endswith(".py"):
                    expected.add(os.path.normpath(os.path.join(installed_as, rel, name)))
    assert in_wheel == expected, (sorted(expected - in_wheel), sorted(in_wheel - expected))


def test_the_installed_package_imports_outside_a_checkout(installed, tmp_path):
    code = """
import importlib.util, sys
import elastic_moe, elastic_moe.kernels, elastic_moe.actors.cluster, elastic_moe.jobs.train
from elastic_moe._namespace import checkout_root
assert checkout_root() is None, checkout_root()
for module in (elastic_moe.kernels, elastic_moe.actors.cluster, elastic_moe.jobs.train):
    assert module.__file__.startswith(sys.argv[1]), module.__file__
for name in ("actors", "jobs"):
    spec = importlib.util.find_spec(name)
    assert spec is None or not spec.origin or not spec.origin.startswith(sys.argv[1]), spec
spec = importlib.util.find_spec("kernels")
assert spec is None or not spec.origin.startswith(sys.argv[1]), spec.origin
print("ok")
"""
    env = dict(os.environ, PYTHONPATH=str(installed))
    proc = subprocess.run([sys.executable, "-c", code, str(installed)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_the_environments_own_install_declares_only_elastic_moe():
    dist = importlib.metadata.distribution("elastic-moe")
    assert dist.read_text("top_level.txt").split() == ["elastic_moe"]
    owners = importlib.metadata.packages_distributions()
    ours = sorted(name for name, dists in owners.items() if "elastic-moe" in dists)
    assert ours == ["elastic_moe"], ours


def test_top_level_kernels_is_hugging_faces_even_with_the_checkout_first_on_sys_path():
    """Under pytest the checkout root is on sys.path; the folder still does not claim the name."""
    code = """
import importlib, sys
sys.path.insert(0, sys.argv[1])
kernels = importlib.import_module("kernels")  # by string: see test_fresh_venv.py
assert hasattr(kernels, "Mode"), dir(kernels)  # Hugging Face's API
ours = sys.argv[1] + "/kernels/__init__.py"
assert kernels.__file__ != ours, kernels.__file__
import elastic_moe.kernels
assert elastic_moe.kernels.__file__ == ours, elastic_moe.kernels.__file__
assert callable(elastic_moe.kernels.routed_experts)
for name in ("actors", "jobs"):
    try:
        __import__(name)
    except ModuleNotFoundError as exc:
        assert "elastic_moe." + name in str(exc), exc
    else:
        raise AssertionError(name + " imported as a top-level name")
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code, ROOT], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
