"""`bnzoo.layers` and `bnzoo.models`: bnzoo's two libraries under names no user module shadows.

`pip install` puts bnzoo's `layers` and `models` packages at the top level of site-packages,
where a project's own `models.py` or `layers.py` hides them: Python searches the script's folder
(or the working directory) first. `from bnzoo.models import create_model` always reaches
bnzoo's:

- when `import models` and `import layers` give bnzoo's packages (nothing shadows them),
  `bnzoo.models` *is* the package `models` and `bnzoo.models.registry` is `models.registry`:
  the same module objects under two names;
- when a user module shadows either, bnzoo loads both packages from their own folders under
  the names `bnzoo.layers` and `bnzoo.models`; `import models` keeps giving the user's module.

Either way each file runs once per process, so every class exists once: Keras' registry of
`bnzoo>...` names, `isinstance` checks and pickled references agree. A `.keras` file records
those registered names, not module paths, so files saved through either name load through the
other. Inside the libraries, imports are relative, and `models` reaches `layers` as its sibling
(`models/_layers.py`); the rest of bnzoo imports them as `bnzoo.layers` and `bnzoo.models` (an
import-linter contract in pyproject.toml). So no bnzoo code ever imports a shadowable name.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import types
from typing import Any

#: The libraries, each importing only those before it.
LIBRARIES = ("layers", "models")
#: The folder holding `bnzoo`, `layers` and `models`: site-packages, or a checkout.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(library: str) -> types.ModuleType:
    """bnzoo's package `library` (`"layers"` or `"models"`), for `bnzoo.<library>`."""
    alias = f"{__package__}.{library}"
    needed = LIBRARIES[: LIBRARIES.index(library) + 1]
    if all(_top_level_is_ours(name) for name in needed):
        module = importlib.import_module(library)
        _AliasFinder.install()
        _AliasFinder.aliases[alias] = library
        return module
    folder = os.path.join(_ROOT, library)
    spec = importlib.util.spec_from_file_location(
        alias, os.path.join(folder, "__init__.py"), submodule_search_locations=[folder]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[alias] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[alias]
        raise
    return module


def _top_level_is_ours(name: str) -> bool:
    """Whether `import name` gives (or gave) bnzoo's package rather than a user's module."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):  # a user module without a spec, or a broken one
        return False
    ours = os.path.join(_ROOT, name, "__init__.py")
    return (
        spec is not None
        and spec.origin is not None
        and os.path.exists(spec.origin)
        and os.path.samefile(spec.origin, ours)
    )


class _AliasFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Makes `bnzoo.models.X` the module `models.X` (never a second copy of its file) when
    `bnzoo.models` is the top-level package."""

    #: `{alias package: the package it names}`, e.g. `{"bnzoo.models": "models"}`.
    aliases: dict[str, str] = {}
    _installed = False

    @classmethod
    def install(cls) -> None:
        if not cls._installed:
            sys.meta_path.insert(0, cls())
            cls._installed = True

    def find_spec(self, fullname: str, path: Any = None, target: Any = None):
        for alias in self.aliases:
            if fullname.startswith(f"{alias}."):
                return importlib.machinery.ModuleSpec(fullname, self)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        alias = next(a for a in self.aliases if spec.name.startswith(f"{a}."))
        module = importlib.import_module(self.aliases[alias] + spec.name[len(alias) :])
        # The import system then points the module's __spec__ at `spec`; exec_module puts the
        # module's own back.
        spec.loader_state = module.__spec__
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        module.__spec__ = module.__spec__.loader_state
