"""Name -> object registries with loud, helpful lookups.

Every pluggable piece (estimators, losses, policies, pipelines, rewards) lives in a :class:`Registry`.
An unknown name is a :class:`~mmgrpo.core.errors.UserError` that lists the known names and
suggests the nearest one::

    unknown estimator 'mc_grpo2'; known: bnpo, dr_grpo, grpo, mc_grpo, ngrpo, stratified (did you mean 'mc_grpo'?)
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import sys
import types
from collections.abc import Callable, Iterator
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar

from mmgrpo.core import plugins
from mmgrpo.core.errors import UserError

T = TypeVar("T")

_INDEX: dict[str, Registry] = {}
"""plug-in kind -> the registry created with ``plugins=`` that kind (what ``mmgrpo list`` walks)"""


def nearest(name: str, candidates: list[str] | tuple[str, ...] | Any) -> str | None:
    """The candidate closest to ``name`` (difflib ratio >= 0.6), or None."""
    hits = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return hits[0] if hits else None


def first_doc_line(obj: Any) -> str:
    """The first line of an object's docstring (its one-line description in ``mmgrpo list``)."""
    doc = inspect.getdoc(obj) or ""
    return doc.strip().splitlines()[0].strip() if doc.strip() else ""


def import_dotted(name: str, kind: str) -> Any:
    """The object at ``pkg.module.attr`` (or ``pkg.module:attr``); a UserError naming ``kind`` if there is none.

    The module is looked for where Python looks (installed packages, ``PYTHONPATH``) and then in the working
    directory (:func:`import_with_cwd`): ``python -m mmgrpo.train.cli`` puts it on ``sys.path`` but the ``mmgrpo``
    console script does not, and a ``my_reward.py`` next to the config must load the same from both."""
    module_name, sep, attr = name.rpartition(":") if ":" in name else name.rpartition(".")
    try:
        module = import_with_cwd(module_name)
    except ImportError as e:
        top = module_name.partition(".")[0]
        if isinstance(e, ModuleNotFoundError) and e.name in _prefixes(module_name):
            raise UserError(
                f"{kind} {name!r}: cannot import module {module_name!r} ({e}); looked in the working directory "
                f"{os.getcwd()} and the installed packages (sys.path). Put {top}.py (or a package folder {top}/) in "
                f"the directory you run from, add the folder that holds it to PYTHONPATH (PYTHONPATH=/path/to/folder "
                f"mmgrpo train ...), or install it (pip install -e)"
            ) from e
        raise UserError(f"{kind} {name!r}: cannot import module {module_name!r} ({e})") from e
    if not hasattr(module, attr):
        raise UserError(f"{kind} {name!r}: module {module_name!r} has no attribute {attr!r}")
    return getattr(module, attr)


def _prefixes(module_name: str) -> list[str]:
    """``a``, ``a.b``, ``a.b.c`` of ``a.b.c``: the modules whose absence means ``module_name`` itself is missing."""
    parts = module_name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def import_with_cwd(module_name: str) -> types.ModuleType:
    """``importlib.import_module(module_name)``; where its top-level package is not found and the working directory
    is not on ``sys.path``, the working directory is appended to ``sys.path`` (after every installed package, so a
    file there never shadows one) and the import tried again. It stays there when the module was found in it (the
    module's own imports of its neighbours need it), and is taken off again when not."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        top = module_name.partition(".")[0]
        cwd = os.getcwd()
        if e.name != top or _on_path(cwd):
            raise
    sys.path.append(cwd)
    importlib.invalidate_caches()
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name == top and sys.path and sys.path[-1] == cwd:
            sys.path.pop()
        raise


def _on_path(folder: str) -> bool:
    """Whether ``folder`` is on ``sys.path`` (``''`` and ``.`` stand for the working directory)."""
    for entry in sys.path:
        try:
            if os.path.samefile(entry or ".", folder):
                return True
        except OSError:
            continue
    return False


def _importing_module() -> str | None:
    """The module whose top-level code is running (the innermost ``<module>`` frame): the one a registration at
    import time comes from (``register_method(...)`` at the top of ``my_pkg/methods.py`` -> ``my_pkg.methods``)."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "<module>":
            return frame.f_globals.get("__name__")
        frame = frame.f_back
    return None


class Registry(Generic[T]):
    """A named collection of ``T`` with a description per entry.

    With ``plugins=K`` the registry fills itself on first use from the built-in modules of kind K and the entry
    points of the group ``mmgrpo.K`` (see :mod:`mmgrpo.core.plugins`); ``get`` also accepts a dotted path.
    """

    def __init__(self, kind: str, plugins: str | None = None):
        self.kind = kind
        self._items: dict[str, T] = {}
        self._descriptions: dict[str, str] = {}
        self._origins: dict[str, str | None] = {}
        """name -> the module whose import registered it (:func:`_importing_module`)"""
        self._plugins = plugins
        self._loaded = plugins is None
        self._seen: set[tuple[str, str, str]] = set()
        if plugins is not None:
            _INDEX[plugins] = self  # a reloaded module's registry replaces the stale one

    def load(self) -> None:
        """Import the built-in modules of this registry's kind (once) and its entry points (found so far)."""
        if self._plugins is None:
            return
        self._load_builtins()
        self._scan_entry_points()

    def _load_builtins(self) -> None:
        if self._plugins is not None and not self._loaded:
            self._loaded = True
            for module in plugins.BUILTIN.get(self._plugins, ()):
                importlib.import_module(module)

    def registered(self) -> dict[str, T]:
        """The items registered so far (name -> item), the built-in modules imported first. No entry point is
        loaded: a broken plug-in that the caller does not name stays out of its way."""
        self._load_builtins()
        return dict(self._items)

    def _scan_entry_points(self) -> None:
        """Register the entry points of the kind's group not seen yet (a plug-in installed later is found too)."""
        group = plugins.ENTRY_POINT_GROUPS.get(self._plugins, f"mmgrpo.{self._plugins}")
        for ep in entry_points(group=group):
            if ep.name in self._items or (group, ep.name, ep.value) in self._seen:
                continue
            self._seen.add((group, ep.name, ep.value))
            try:
                obj = ep.load()
            except Exception as e:  # a broken plug-in names itself instead of failing somewhere later
                raise UserError(f"{self.kind} plug-in {ep.name!r} ({ep.value}, entry-point group {group!r}) "
                                f"failed to load: {type(e).__name__}: {e}") from e  # fmt: skip
            if not isinstance(obj, types.ModuleType) and ep.name not in self._items:
                self.add(ep.name, obj)

    def register(self, name: str, description: str | None = None) -> Callable[[T], T]:
        """Decorator: ``@REGISTRY.register("grpo")``. The description defaults to the docstring's first line."""

        def deco(obj: T) -> T:
            self.add(name, obj, description)
            return obj

        return deco

    def add(self, name: str, obj: T, description: str | None = None) -> None:
        if name in self._items and self._items[name] is not obj:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._items[name] = obj
        self._origins[name] = _importing_module()
        if description is None:  # an object with its own ``description`` (a Pipeline) says it better than a docstring
            own = getattr(obj, "description", None)
            description = own if isinstance(own, str) and own else first_doc_line(obj)
        self._descriptions[name] = description

    def builtin(self, name: str) -> bool:
        """Whether ``name`` was registered by mmgrpo itself (a module of the ``mmgrpo`` package), not a plug-in."""
        return (self._origins.get(name) or "").startswith("mmgrpo.")

    def get(self, name: str) -> T:
        if name not in self._items:
            self.load()
        if name in self._items:
            return self._items[name]
        if self._plugins is not None and "." in name:  # a dotted path names a part outside any registry
            try:
                return import_dotted(name, self.kind)
            except UserError:
                # a module that registers its parts binds no attribute of their names (``register_method(Method(
                # name="optimism", ...))``): importing it registered the part, found under its own name. Only a
                # part registered by that very module: one that failed to import, or a typo in its name, must not
                # fall back on a built-in part of the same last name
                module_name, _, short = name.rpartition(":") if ":" in name else name.rpartition(".")
                if short in self._items and module_name in sys.modules and self._origins.get(short) == module_name:
                    return self._items[short]
                raise
        raise UserError(self.unknown_message(name))

    def unknown_message(self, name: str) -> str:
        self.load()
        known = ", ".join(sorted(self._items))
        msg = f"unknown {self.kind} {name!r}; known: {known}"
        if self._plugins is not None:
            msg += f"; or a dotted path 'my_pkg.my_module.my_{self.kind.replace(' ', '_')}'"
        hint = nearest(name, self._items)
        return msg + (f" (did you mean {hint!r}?)" if hint else "")

    def describe(self, name: str) -> str:
        if name not in self._descriptions:
            self.load()
        return self._descriptions[name]

    def names(self) -> list[str]:
        self.load()
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        if name not in self._items:
            self.load()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        self.load()
        return len(self._items)


def registries() -> dict[str, Registry]:
    """Every plug-in kind of :data:`~mmgrpo.core.plugins.BUILTIN` (and any other registry created with ``plugins=``)
    -> its registry, after importing every kind's built-in modules (which creates the registries and fills them).

    A kind whose registry no imported module creates is left out; ``mmgrpo list`` shows it as empty.
    """
    for modules in plugins.BUILTIN.values():
        for module in modules:
            importlib.import_module(module)
    for reg in list(_INDEX.values()):
        reg.load()
    return dict(_INDEX)
