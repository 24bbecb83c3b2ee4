"""Objectives defined outside rlkd: load them, and remember exactly which source was loaded.

A plug-in is a Python module that calls ``@register_objective`` when imported. Three ways name one:

* ``plugins: [my_pkg.objectives, path/to/my_obj.py]`` in a run config or a benchmark spec
  (a path is read relative to the file that names it);
* ``--plugin X`` (repeatable) on ``rlkd objectives``, ``rlkd train``, ``rlkd bench`` and ``rlkd table``;
* the entry-point group ``rlkd.objectives`` of an installed package, loaded whenever the registry
  is first consulted.

Every loaded module is recorded with the SHA-256 of its source file, so a result can say which
version of a plug-in produced it (``loaded_plugins()``).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Iterable

ENTRY_POINT_GROUP = "rlkd.objectives"

# name as given -> {"module": module name, "source": file path, "sha256": hex}
_LOADED: dict[str, dict[str, str | None]] = {}
_ENTRY_POINTS_LOADED = False


class PluginError(ImportError):
    """A plug-in could not be found or failed to import; the message names it."""


def is_path(name: str) -> bool:
    return name.endswith(".py") or "/" in name or "\\" in name


def resolve_plugin_names(names: Iterable[str], base_dir: Path | None) -> list[str]:
    """Paths made absolute (relative to ``base_dir``, the folder of the file that names them);
    module names unchanged. Used when a config or spec is read, so child processes find them."""
    resolved = []
    for name in names:
        if is_path(name):
            path = Path(name).expanduser()
            if not path.is_absolute() and base_dir is not None and (base_dir / path).is_file():
                path = base_dir / path
            resolved.append(str(path.resolve()))
        else:
            resolved.append(name)
    return resolved


def _source_sha256(path: str | None) -> str | None:
    if not path or not Path(path).is_file():
        return None
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_plugin(name: str) -> dict[str, str | None]:
    """Import one plug-in (module name or ``.py`` path) once; return its record."""
    if name in _LOADED:
        return _LOADED[name]
    if is_path(name):
        path = Path(name).expanduser().resolve()
        if not path.is_file():
            raise PluginError(f"plug-in {name}: file not found")
        # A stable module name per file, so that pickling and re-imports find the same module.
        module_name = f"rlkd_plugin_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
        if module_name not in sys.modules:
            spec = importlib.util.spec_from_file_location(module_name, path)
            if spec is None or spec.loader is None:
                raise PluginError(f"plug-in {name}: cannot be imported as a Python file")
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module
            try:
                spec.loader.exec_module(module)
            except Exception as exc:
                del sys.modules[module_name]
                raise PluginError(f"plug-in {name}: import failed: {type(exc).__name__}: {exc}") from exc
        source = str(path)
    else:
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            raise PluginError(f"plug-in {name!r}: {exc}") from exc
        module_name, source = name, getattr(module, "__file__", None)
    record = {"module": module_name, "source": source, "sha256": _source_sha256(source)}
    _LOADED[name] = record
    return record


def load_plugins(names: Iterable[str]) -> list[dict[str, str | None]]:
    return [load_plugin(name) for name in names]


def load_entry_points() -> None:
    """Import every module registered under the ``rlkd.objectives`` entry-point group (once)."""
    global _ENTRY_POINTS_LOADED
    if _ENTRY_POINTS_LOADED:
        return
    _ENTRY_POINTS_LOADED = True
    from importlib.metadata import entry_points

    for entry in entry_points(group=ENTRY_POINT_GROUP):
        if entry.value in _LOADED:
            continue
        try:
            entry.load()
        except Exception as exc:
            raise PluginError(f"entry point {entry.name} = {entry.value} ({ENTRY_POINT_GROUP}): "
                              f"{type(exc).__name__}: {exc}") from exc
        module_name = entry.value.split(":", 1)[0]
        module = sys.modules.get(module_name)
        source = getattr(module, "__file__", None)
        _LOADED[entry.value] = {"module": module_name, "source": source, "sha256": _source_sha256(source),
                                "entry_point": entry.name}


def loaded_plugins() -> dict[str, dict[str, str | None]]:
    """Every plug-in loaded in this process, by the name it was given."""
    return {name: dict(record) for name, record in _LOADED.items()}


def current_hashes(names: Iterable[str]) -> dict[str, str | None]:
    """The SHA-256 of each named plug-in's source as it is on disk now (no import)."""
    hashes = {}
    for name in names:
        if is_path(name):
            hashes[name] = _source_sha256(name)
        else:
            spec = importlib.util.find_spec(name)
            hashes[name] = _source_sha256(spec.origin if spec else None)
    return hashes
