"""The registry: every swappable module is a class registered under a kebab-case name.

Configs name modules (``geometry_type: implicit-volume``) and systems build them with
``find(name, category)``. Plugins add names by importing modules that call ``register``;
they are discovered in ``extensions/`` folders and in the ``lift3d.plugins`` entry point group.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Callable, Iterable, TypeVar

T = TypeVar("T")

ENTRY_POINT_GROUP = "lift3d.plugins"
EXTENSIONS_ENV = "LIFT3D_EXTENSIONS"
_NAME_RE = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")

# name -> class; insertion order kept so listings are stable.
_REGISTRY: dict[str, type] = {}


class RegistryError(KeyError):
    """A name that is unknown, malformed or registered twice."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it readable.
        return str(self.args[0]) if self.args else ""


class PluginImportError(ImportError):
    """A plugin failed to import; carries the plugin's path and the original traceback."""


def category_of(cls: type) -> str:
    """The category a class belongs to (``geometry``, ``renderer``, ...), from its base classes."""
    for klass in cls.__mro__:
        cat = klass.__dict__.get("category")
        if isinstance(cat, str):
            return cat
    return "other"


def register(name: str) -> Callable[[type[T]], type[T]]:
    """Class decorator: make ``cls`` constructible from configs as ``name``."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise RegistryError(
            f"registry name {name!r} is not kebab-case (lowercase words joined by '-', e.g. 'implicit-volume')"
        )

    def decorator(cls: type[T]) -> type[T]:
        old = _REGISTRY.get(name)
        if old is not None and old is not cls and _qualname(old) != _qualname(cls):
            raise RegistryError(
                f"registry name {name!r} is registered twice: by {_qualname(old)} and by {_qualname(cls)}; "
                "rename one of them"
            )
        _REGISTRY[name] = cls
        cls.registry_name = name  # type: ignore[attr-defined]
        return cls

    return decorator


def find(name: str, category: str | None = None) -> type:
    """The class registered as ``name``; with ``category``, it must belong to that category."""
    _ensure_builtin_modules()
    cls = _REGISTRY.get(name)
    if cls is not None and (category is None or category_of(cls) == category):
        return cls
    pool = registered(category)
    where = f" in category '{category}'" if category else ""
    msg = f"unknown module name {name!r}{where}."
    if cls is not None:
        msg += f" It is registered, but as a '{category_of(cls)}', not a '{category}'."
    close = difflib.get_close_matches(name, pool, n=1, cutoff=0.5)
    if close:
        msg += f" Did you mean {close[0]!r}?"
    msg += f" Registered{where}: {', '.join(pool) if pool else '(none)'}."
    raise RegistryError(msg)


def registered(category: str | None = None) -> list[str]:
    """Sorted names registered (in ``category`` when given)."""
    _ensure_builtin_modules()
    return sorted(n for n, c in _REGISTRY.items() if category is None or category_of(c) == category)


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


# ---------------------------------------------------------------------------------------------
# Built-in modules register themselves on import; importing them lazily keeps `import lift3d` cheap.

_BUILTIN_PACKAGES = (
    "lift3d.geometry",
    "lift3d.renderers",
    "lift3d.materials",
    "lift3d.backgrounds",
    "lift3d.guidance",
    "lift3d.prompts",
    "lift3d.data",
    "lift3d.systems",
    "lift3d.exporters",
)
_builtins_loaded = False


def _ensure_builtin_modules() -> None:
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True
    for pkg in _BUILTIN_PACKAGES:
        import_submodules(pkg)


def import_submodules(package: str) -> None:
    """Import every module of ``package`` (one level), so their ``@register`` calls run."""
    import pkgutil

    mod = importlib.import_module(package)
    for info in pkgutil.iter_modules(mod.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package}.{info.name}")


# ---------------------------------------------------------------------------------------------
# Plugins


def extension_dirs(root: str | os.PathLike | None = None) -> list[Path]:
    """Folders searched for plugins: ``<root>/extensions`` then each folder in $LIFT3D_EXTENSIONS."""
    dirs: list[Path] = []
    if root is not None:
        dirs.append(Path(root) / "extensions")
    for part in os.environ.get(EXTENSIONS_ENV, "").split(os.pathsep):
        if part.strip():
            dirs.append(Path(part).expanduser())
    return dirs


def _plugin_entries(folder: Path) -> Iterable[Path]:
    if not folder.is_dir():
        return []
    out = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith((".", "_")):
            continue
        if p.is_dir() and (p / "__init__.py").is_file():
            out.append(p)
        elif p.is_file() and p.suffix == ".py":
            out.append(p)
    return out


_loaded_plugin_paths: set[str] = set()


def load_plugin_path(path: Path) -> None:
    """Import one plugin package (folder with __init__.py) or module file by path."""
    path = Path(path).resolve()
    key = str(path)
    if key in _loaded_plugin_paths:
        return
    name = path.stem if path.is_file() else path.name
    modname = f"lift3d_ext_{re.sub(r'[^0-9a-zA-Z_]', '_', name)}"
    init = path / "__init__.py" if path.is_dir() else path
    search = [str(path)] if path.is_dir() else None
    try:
        spec = importlib.util.spec_from_file_location(modname, init, submodule_search_locations=search)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot build an import spec for {init}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[modname] = module
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(modname, None)
        raise PluginImportError(
            f"plugin at {path} failed to import; fix it or move it out of the extensions folder.\n"
            f"{traceback.format_exc()}"
        ) from exc
    _loaded_plugin_paths.add(key)


def load_entry_point_plugins() -> list[str]:
    """Import every ``lift3d.plugins`` entry point of the installed distributions; returns their names."""
    from importlib.metadata import entry_points

    names = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
        except Exception as exc:
            raise PluginImportError(
                f"plugin entry point {ep.name!r} ({ep.value}) in group {ENTRY_POINT_GROUP!r} failed to import.\n"
                f"{traceback.format_exc()}"
            ) from exc
        if callable(obj) and not isinstance(obj, type):
            obj()  # an entry point may name a function that registers things
        names.append(ep.name)
    return names


def load_plugins(root: str | os.PathLike | None = None) -> None:
    """Import all plugins: ``<root>/extensions``, $LIFT3D_EXTENSIONS folders, then entry points.

    A plugin that fails to import stops here with its traceback: carrying on would only
    fail later with a confusing unknown-name error.
    """
    _ensure_builtin_modules()
    for folder in extension_dirs(root):
        for entry in _plugin_entries(folder):
            load_plugin_path(entry)
    load_entry_point_plugins()
