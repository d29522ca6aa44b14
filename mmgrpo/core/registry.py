"""Name -> object registries with loud, helpful lookups.

Every pluggable piece (estimators, losses, policies, pipelines, rewards) lives in a :class:`Registry`.
An unknown name is a :class:`~mmgrpo.core.errors.UserError` that lists the known names and
suggests the nearest one::

    unknown estimator 'mc_grpo2'; known: bnpo, dr_grpo, grpo, mc_grpo, ngrpo, stratified (did you mean 'mc_grpo'?)
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from mmgrpo.core.errors import UserError

T = TypeVar("T")


def nearest(name: str, candidates: list[str] | tuple[str, ...] | Any) -> str | None:
    """The candidate closest to ``name`` (difflib ratio >= 0.6), or None."""
    hits = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return hits[0] if hits else None


def first_doc_line(obj: Any) -> str:
    """The first line of an object's docstring (its one-line description in ``mmgrpo list``)."""
    doc = inspect.getdoc(obj) or ""
    return doc.strip().splitlines()[0].strip() if doc.strip() else ""


class Registry(Generic[T]):
    """A named collection of ``T`` with a description per entry."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}
        self._descriptions: dict[str, str] = {}

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
        self._descriptions[name] = description if description is not None else first_doc_line(obj)

    def get(self, name: str) -> T:
        if name not in self._items:
            raise UserError(self.unknown_message(name))
        return self._items[name]

    def unknown_message(self, name: str) -> str:
        known = ", ".join(sorted(self._items))
        msg = f"unknown {self.kind} {name!r}; known: {known}"
        hint = nearest(name, self._items)
        return msg + (f" (did you mean {hint!r}?)" if hint else "")

    def describe(self, name: str) -> str:
        return self._descriptions[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)
