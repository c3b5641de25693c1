"""The registry: every swappable module is a class registered under a kebab-case name.

Configs name modules (``geometry_type: implicit-volume``) and systems build them with
``find(name, category)``. Plugins add names by importing modules that call ``register``;
they are discovered in ``extensions/`` folders and in the ``lift3d.plugins`` entry point group.

Built-in names are known without importing their modules: the source files of the built-in
packages are read once per process and their ``@register("name")`` class decorators collected
(:func:`builtin_index`). ``find`` then imports only the module that defines the requested name,
so asking for a geometry never pulls in a guidance's diffusers/transformers stack. A built-in
module that fails to import is reported, naming it, each time it is needed; nothing is recorded
as loaded unless its import went through.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import importlib.util
import os
import pkgutil
import re
import sys
import traceback
from dataclasses import dataclass
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


class BuiltinImportError(RegistryError, ImportError):
    """A built-in module failed to import; names the module, the original exception is chained.

    It is a :class:`RegistryError` so that callers that report bad module names (``launch``)
    report this too, and an :class:`ImportError` because that is what happened.
    """


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
        if old is None and not _is_builtin_module(cls.__module__):
            # Built-ins are imported lazily, so a plugin could otherwise take a built-in name
            # unnoticed just because the built-in module has not been imported yet.
            entry = builtin_index().names.get(name)
            if entry is not None and entry.module != cls.__module__:
                raise RegistryError(
                    f"registry name {name!r} is registered twice: by {entry.module}.{entry.class_name} "
                    f"(built-in) and by {_qualname(cls)}; rename one of them"
                )
        _REGISTRY[name] = cls
        cls.registry_name = name  # type: ignore[attr-defined]
        return cls

    return decorator


def find(name: str, category: str | None = None) -> type:
    """The class registered as ``name``; with ``category``, it must belong to that category.

    Only the built-in module that defines ``name`` is imported. An unknown name (or one in the
    wrong category) imports every built-in so the error can list what is registered.
    """
    cls = _REGISTRY.get(name)
    if cls is None:
        entry = builtin_index().names.get(name)
        if entry is not None:
            _import_builtin(entry.module, looking_up=name)
            # Missing here means the index is stale (say, a name built at run time): the
            # full import below settles it.
            cls = _REGISTRY.get(name)
    if cls is not None and (category is None or category_of(cls) == category):
        return cls

    failures = _import_all_builtins()
    cls = _REGISTRY.get(name)
    if cls is not None and (category is None or category_of(cls) == category):
        return cls
    pool = _names_in(category)
    where = f" in category '{category}'" if category else ""
    msg = f"unknown module name {name!r}{where}."
    if cls is not None:
        msg += f" It is registered, but as a '{category_of(cls)}', not a '{category}'."
    close = difflib.get_close_matches(name, pool, n=1, cutoff=0.5)
    if close:
        msg += f" Did you mean {close[0]!r}?"
    msg += f" Registered{where}: {', '.join(pool) if pool else '(none)'}."
    if failures:
        msg += " These built-in modules failed to import, so their names are missing: " + "; ".join(
            f"{mod} ({type(exc).__name__}: {exc})" for mod, exc in failures.items()
        ) + "."
    raise RegistryError(msg)


def registered(category: str | None = None) -> list[str]:
    """Sorted names registered (in ``category`` when given).

    Categories come from the classes, so every built-in module is imported; if one fails,
    this raises :class:`BuiltinImportError` rather than return a listing with holes.
    """
    _ensure_builtin_modules()
    return _names_in(category)


def _names_in(category: str | None) -> list[str]:
    return sorted(n for n, c in _REGISTRY.items() if category is None or category_of(c) == category)


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


# ---------------------------------------------------------------------------------------------
# Built-in modules register themselves on import. Their names are read from the source instead,
# so that `import lift3d` and `find(name)` import only what is asked for.

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


@dataclass(frozen=True)
class IndexEntry:
    """Where a built-in name is registered: its module and the decorated class."""

    module: str
    class_name: str


@dataclass(frozen=True)
class BuiltinIndex:
    """What the source of the built-in packages registers, found without importing it.

    ``modules`` lists every built-in module (one level below each package, names starting
    with ``_`` skipped), whether it registers anything or not; ``names`` maps each literal
    ``@register("...")`` name to its entry.
    """

    packages: tuple[str, ...]
    modules: tuple[str, ...]
    names: dict[str, IndexEntry]


_index_cache: dict[tuple[str, ...], BuiltinIndex] = {}


def builtin_index() -> BuiltinIndex:
    """The index of built-in names for the current ``_BUILTIN_PACKAGES``; built once per process."""
    packages = tuple(_BUILTIN_PACKAGES)
    index = _index_cache.get(packages)
    if index is None:
        index = _index_cache[packages] = _build_index(packages)
    return index


def _is_builtin_module(module: str) -> bool:
    return any(module.startswith(pkg + ".") for pkg in _BUILTIN_PACKAGES)


def _build_index(packages: tuple[str, ...]) -> BuiltinIndex:
    modules: list[str] = []
    names: dict[str, IndexEntry] = {}
    for pkg in packages:
        for module, source in _package_sources(pkg):
            modules.append(module)
            if source is None:
                continue
            for reg_name, class_name in _registered_in(source):
                entry = IndexEntry(module, class_name)
                other = names.setdefault(reg_name, entry)
                if other != entry:
                    raise RegistryError(
                        f"registry name {reg_name!r} is registered twice: by {other.module}.{other.class_name} "
                        f"and by {entry.module}.{entry.class_name}; rename one of them"
                    )
    return BuiltinIndex(packages, tuple(modules), names)


def _package_sources(package: str) -> list[tuple[str, Path | None]]:
    """(module name, source file or None) for each module one level below ``package``.

    The package itself is located, not imported (only its parent packages are).
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"built-in package {package!r} not found", name=package)
    out = []
    for info in pkgutil.iter_modules(spec.submodule_search_locations):
        if info.name.startswith("_"):
            continue
        full = f"{package}.{info.name}"
        sub = info.module_finder.find_spec(full)  # type: ignore[call-arg]
        origin = sub.origin if sub is not None else None
        out.append((full, Path(origin) if origin and origin.endswith(".py") else None))
    return out


# A line that starts a `register(` decorator, in any of the accepted spellings.
_DECORATOR_LINE = re.compile(r"^[ \t]*@[ \t]*(?:[A-Za-z_][\w.]*\.)?register[ \t]*\(", re.M)
_CLASS_OR_DEF = re.compile(r"^[ \t]*(?:class|def|async[ \t]+def)\b")


def _registered_in(source: Path) -> list[tuple[str, str]]:
    """(name, class name) for each class decorated with ``register("literal")`` in ``source``.

    Accepts ``@register(...)``, ``@registry.register(...)`` and ``@lift3d.register(...)`` /
    ``@lift3d.registry.register(...)``; other spellings (an alias, a computed name) are not
    seen, and ``find`` falls back to importing everything for them.

    Parsing a whole module with ``ast`` costs milliseconds per file, and the registering
    modules are the big ones, so only the decorated class headers are parsed: each candidate
    decorator line, up to and including its ``class`` line, with a ``pass`` body added. When a
    header cannot be cut out that way the whole file is parsed instead. A file that does not
    parse at all is skipped; importing it will then fail with the real error.
    """
    try:
        text = source.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return []
    found: list[tuple[str, str]] = []
    lines = text.splitlines()
    for match in _DECORATOR_LINE.finditer(text):
        if _inside_triple_quotes(text, match.start()):
            continue  # an example in a docstring
        header = _parse_class_header(lines, text.count("\n", 0, match.start()))
        if header is None:
            return _registered_in_tree(text, source)
        found.extend(_registrations(header))
    return list(dict.fromkeys(found))


def _inside_triple_quotes(text: str, pos: int) -> bool:
    """Whether ``pos`` lies inside a triple-quoted string (good enough for module source)."""
    i, quote = 0, None
    while True:
        if quote is None:
            nxt = min(
                (j for j in (text.find('"""', i, pos), text.find("'''", i, pos)) if j >= 0),
                default=-1,
            )
            if nxt < 0:
                return False
            quote, i = text[nxt : nxt + 3], nxt + 3
        else:
            end = text.find(quote, i, pos)
            if end < 0:
                return True
            quote, i = None, end + 3


def _parse_class_header(lines: list[str], first: int, max_lines: int = 40) -> ast.Module | None:
    """The decorators from line ``first`` down to their ``class`` line, parsed; None if that fails."""
    indent = lines[first][: len(lines[first]) - len(lines[first].lstrip())]
    # An indented header (a class under `if`) parses as the body of a dummy `if`.
    prefix = "if 1:\n" if indent else ""
    stop = min(len(lines), first + max_lines)
    seen_class = False
    for last in range(first, stop):
        seen_class = seen_class or bool(_CLASS_OR_DEF.match(lines[last]))
        if not seen_class:
            continue
        snippet = prefix + "\n".join(lines[first : last + 1])
        for body in (f"\n{indent}    pass\n", "\n"):  # a one-line `class X: pass` needs none
            try:
                return ast.parse(snippet + body)
            except SyntaxError:
                pass
    return None


def _registered_in_tree(text: str, source: Path) -> list[tuple[str, str]]:
    try:
        tree = ast.parse(text, filename=str(source))
    except (SyntaxError, ValueError):
        return []
    return list(dict.fromkeys(_registrations(tree)))


def _registrations(tree: ast.AST) -> list[tuple[str, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            for deco in node.decorator_list:
                name = _register_call_name(deco)
                if name is not None:
                    found.append((name, node.name))
    return found


def _register_call_name(deco: ast.expr) -> str | None:
    if not isinstance(deco, ast.Call):
        return None
    func = deco.func
    if isinstance(func, ast.Name):
        ok = func.id == "register"
    elif isinstance(func, ast.Attribute) and func.attr == "register":
        ok = ast.unparse(func.value) in ("lift3d", "registry", "lift3d.registry")
    else:
        ok = False
    if not ok:
        return None
    args = list(deco.args) + [kw.value for kw in deco.keywords if kw.arg == "name"]
    if len(args) == 1 and isinstance(args[0], ast.Constant) and isinstance(args[0].value, str):
        return args[0].value
    return None


def _import_builtin(module: str, looking_up: str | None = None) -> None:
    """Import one built-in module, or raise :class:`BuiltinImportError` naming it.

    Nothing is cached on failure, so each later request tries again and fails the same way
    (or succeeds, if the cause was fixed meanwhile). Classes that the failed import managed to
    register before it broke are dropped, so the registry never serves half a module.
    """
    if module in sys.modules:
        return
    before = set(_REGISTRY)
    try:
        importlib.import_module(module)
    except Exception as exc:
        for n in set(_REGISTRY) - before:
            if _REGISTRY[n].__module__ not in sys.modules:
                del _REGISTRY[n]
        why = f" while looking up {looking_up!r}" if looking_up else ""
        raise BuiltinImportError(
            f"built-in module {module!r} failed to import{why}: {type(exc).__name__}: {exc}"
        ) from exc


def _import_all_builtins() -> dict[str, Exception]:
    """Import every built-in module; returns {module: exception} for those that failed."""
    failures: dict[str, Exception] = {}
    for module in builtin_index().modules:
        try:
            _import_builtin(module)
        except BuiltinImportError as exc:
            failures[module] = exc.__cause__ if isinstance(exc.__cause__, Exception) else exc
    return failures


def _ensure_builtin_modules() -> None:
    """Import every built-in module; raise :class:`BuiltinImportError` if any fails."""
    failures = _import_all_builtins()
    if failures:
        first_exc = next(iter(failures.values()))
        listing = "; ".join(f"{mod} ({type(exc).__name__}: {exc})" for mod, exc in failures.items())
        raise BuiltinImportError(f"built-in module(s) failed to import: {listing}") from first_exc


def import_submodules(package: str) -> None:
    """Import every module of ``package`` (one level), so their ``@register`` calls run."""
    mod = importlib.import_module(package)
    for info in pkgutil.iter_modules(mod.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package}.{info.name}")


# ---------------------------------------------------------------------------------------------
# Plugins


class ExtensionPathError(PluginImportError):
    """A folder named in $LIFT3D_EXTENSIONS does not exist or is not a folder.

    Skipping it would hide a typo until the plugin's names turn up missing, far from the cause.
    """


def extension_dirs(root: str | os.PathLike | None = None) -> list[Path]:
    """Folders searched for plugins: ``<root>/extensions`` then each folder in $LIFT3D_EXTENSIONS.

    ``<root>/extensions`` is optional; every folder the variable names must exist
    (:class:`ExtensionPathError` otherwise). Empty entries (``a::b``, a trailing separator) are skipped.
    """
    dirs: list[Path] = []
    if root is not None:
        dirs.append(Path(root) / "extensions")
    value = os.environ.get(EXTENSIONS_ENV, "")
    for part in value.split(os.pathsep):
        if not part.strip():
            continue
        folder = Path(part).expanduser()
        if not folder.is_dir():
            what = "is a file, not a folder" if folder.exists() else "does not exist"
            shown = repr(str(folder)) + ("" if folder.is_absolute() else f" ({folder.resolve()})")
            raise ExtensionPathError(
                f"${EXTENSIONS_ENV} names the plugin folder {shown}, which {what} "
                f"(${EXTENSIONS_ENV}={value!r}). Set it to existing folders separated by {os.pathsep!r}, "
                "or unset it"
            )
        dirs.append(folder)
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
    fail later with a confusing unknown-name error. Built-ins are not imported here: a
    plugin needs only ``register``, and clashes with built-in names are caught from the index.
    """
    for folder in extension_dirs(root):
        for entry in _plugin_entries(folder):
            load_plugin_path(entry)
    load_entry_point_plugins()
