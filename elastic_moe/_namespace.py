"""The project's one import namespace, installed or in a source tree.

The repository keeps ``kernels/``, ``actors/`` and ``jobs/`` as top-level folders (the working dir
Ray ships with a job), but they are imported as ``elastic_moe.kernels``, ``elastic_moe.actors`` and
``elastic_moe.jobs``: generic top-level names collide with other distributions (Hugging Face's
``kernels``, which transformers imports when it loads a model).

- Installed from a wheel: setuptools' package-dir mapping (pyproject.toml) puts the folders under
  ``elastic_moe/`` in site-packages; the finder below is not installed there.
- Source tree (``python jobs/train.py``, pytest, a Ray ``--working-dir`` job whose working dir is
  on the workers' sys.path, an editable install): :func:`install_checkout_finder` maps exactly
  those three names to ``<checkout>/<name>``, nothing else in the checkout.
- The checkout root on sys.path also makes the folders reachable as top-level ``kernels`` etc.
  Those names are not ours: the folders' ``__init__`` calls :func:`hand_over_top_level_name`,
  which gives the importer the other distribution's package of that name, or ModuleNotFoundError.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType

PACKAGE = "elastic_moe"
# Top-level folders of the repository that belong to this namespace (pyproject.toml maps the same).
SOURCE_TREE_FOLDERS = ("kernels", "actors", "jobs")


def checkout_root() -> str | None:
    """The checkout this package was imported from, or None when it is installed in site-packages."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # A checkout has pyproject.toml beside elastic_moe/; site-packages does not, and a kernels/
    # folder there is someone else's package, never ours.
    if not os.path.isfile(os.path.join(root, "pyproject.toml")):
        return None
    if not all(os.path.isfile(os.path.join(root, name, "__init__.py")) for name in SOURCE_TREE_FOLDERS):
        return None
    return root


class CheckoutFinder(importlib.abc.MetaPathFinder):
    """Finds ``elastic_moe.<folder>`` at ``<root>/<folder>`` for the folders in SOURCE_TREE_FOLDERS."""

    def __init__(self, root: str) -> None:
        self.root = root

    def find_spec(self, fullname: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> ModuleSpec | None:
        package, _, name = fullname.rpartition(".")
        if package != PACKAGE or name not in SOURCE_TREE_FOLDERS:
            return None
        folder = os.path.join(self.root, name)
        return importlib.util.spec_from_file_location(
            fullname, os.path.join(folder, "__init__.py"), submodule_search_locations=[folder])


def install_checkout_finder() -> None:
    root = checkout_root()
    if root is None:
        return
    if not any(isinstance(finder, CheckoutFinder) for finder in sys.meta_path):
        # First: an editable install of another checkout must not answer for this one (a Ray
        # working dir is a copy of the checkout, with the editable install still in site-packages).
        sys.meta_path.insert(0, CheckoutFinder(root))


def hand_over_top_level_name(name: str, folder: str) -> None:
    """Called by ``<checkout>/<name>/__init__.py`` when it was imported as top-level ``name``.

    That happens only because the checkout root is on sys.path. The name belongs to whatever else
    provides it (Hugging Face's ``kernels``): load that in this module's place, so ``import kernels``
    gives what it would give without the checkout on sys.path, or raise ModuleNotFoundError.
    """
    root = os.path.realpath(os.path.dirname(os.path.abspath(folder)))
    others = [entry for entry in sys.path if os.path.realpath(entry or os.getcwd()) != root]
    spec = importlib.machinery.PathFinder.find_spec(name, others)
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(
            f"No module named {name!r} (the checkout's {name}/ folder is {PACKAGE}.{name}; "
            f"import it by that name)", name=name)
    module = importlib.util.module_from_spec(spec)
    # The import system returns whatever sys.modules holds for the name once this module's code
    # has run, so the other package replaces this one for every importer.
    sys.modules[name] = module
    spec.loader.exec_module(module)
