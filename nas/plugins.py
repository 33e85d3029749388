"""User plugins: a user's own blocks, data sets, training strategies, samplers, latency targets or predictors.

A plugin is ordinary Python that registers entries in nasforge's registries (``BLOCKS``, ``DATASETS``,
``STRATEGIES``, ``SAMPLERS``, ``TARGETS``, ``PREDICTORS``) when it is imported. A space file names its plugins::

    plugins:
      - my_blocks.py          # a file, relative to the space file's folder (or absolute)
      - my_package.nas_parts  # an importable module
      - acme_blocks           # the name of an entry point in the group ``nasforge.plugins`` of an installed package

A plugin is code, so it is imported only when the user's own space file names it (never discovered on its own),
the log says which file it imports, and each plugin is imported once per process however often it is named.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import logging
import sys
from pathlib import Path
from types import ModuleType

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "nasforge.plugins"

_loaded: dict[str, ModuleType] = {}


class PluginError(ValueError):
    """A plugin that cannot be found or fails to import (the message names it and the cause)."""


def _is_file_reference(name: str) -> bool:
    return name.endswith(".py") or "/" in name or "\\" in name


def plugin_file(name: str, base_dir: Path | None) -> Path:
    """The absolute path a file plugin ``name`` refers to (relative names are resolved against ``base_dir``)."""
    path = Path(name).expanduser()
    if not path.is_absolute():
        path = (base_dir or Path.cwd()) / path
    return path.resolve()


def _import_file(path: Path) -> ModuleType:
    if not path.is_file():
        raise PluginError(f"no such plugin file: {path}")
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:10]
    module_name = f"nasforge_plugin_{path.stem}_{digest}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise PluginError(f"cannot import {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    return module


def _entry_point(name: str) -> importlib.metadata.EntryPoint | None:
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if entry.name == name:
            return entry
    return None


def load_plugin(name: str, base_dir: Path | None = None, *, named_in: str = "") -> ModuleType:
    """Import the plugin ``name`` (a ``.py`` file, an entry point of ``nasforge.plugins``, or a module name) once.

    Raises ``PluginError`` naming the plugin and what went wrong (missing file, no such module, an exception raised
    while importing it, such as a name registered twice).
    """
    if not isinstance(name, str) or not name.strip():
        raise PluginError(f"a plugin is a file name or a module name, got {name!r}")
    where = f" (named in {named_in})" if named_in else ""
    if _is_file_reference(name):
        path = plugin_file(name, base_dir)
        key = f"file:{path}"
        if key in _loaded:
            return _loaded[key]
        logger.info("importing plugin file %s%s", path, where)
        loader = lambda: _import_file(path)  # noqa: E731
    else:
        key = f"module:{name}"
        if key in _loaded:
            return _loaded[key]
        entry = _entry_point(name)
        if entry is not None:
            logger.info("importing plugin %s from entry point %s = %s%s", name, ENTRY_POINT_GROUP, entry.value, where)
            loader = entry.load
        else:
            try:
                spec = importlib.util.find_spec(name)
            except (ImportError, ValueError):
                spec = None
            if spec is None:
                raise PluginError(f"no plugin file, entry point ({ENTRY_POINT_GROUP}) or module called {name!r}")
            logger.info("importing plugin module %s%s", name, where)
            loader = lambda: importlib.import_module(name)  # noqa: E731
    try:
        loaded = loader()
    except PluginError:
        raise
    except Exception as error:
        raise PluginError(f"importing plugin {name!r} failed: {type(error).__name__}: {error}") from error
    module = loaded if isinstance(loaded, ModuleType) else sys.modules.get(getattr(loaded, "__module__", ""), ModuleType(name))
    _loaded[key] = module
    return module


def load_plugins(names: list[str] | tuple[str, ...], base_dir: Path | None = None, *, named_in: str = "") -> list[tuple[int, str]]:
    """Import every plugin of ``names``; returns ``(index, message)`` for each plugin that failed (empty when all
    loaded), so a validator can report every failure with its place (``plugins[1]``)."""
    problems = []
    for index, name in enumerate(names):
        try:
            load_plugin(name, base_dir, named_in=named_in)
        except PluginError as error:
            problems.append((index, str(error)))
    return problems
