"""Registries of pluggable parts (selection methods, scorers) under versioned names, dolma-style.

A part registers under a versioned name (``lds_v1``); short aliases (``lds``) point at the
current version. Asking for an unknown name raises an error that lists the available ones.

Example:

>>> methods = Registry("selection method")
>>> @methods.register("top_v1", aliases=("top",))
... class Top:
...     pass
>>> methods.get("top") is Top, methods.names()
(True, ['top_v1'])
>>> methods.get("bottom")
Traceback (most recent call last):
...
ValueError: unknown selection method 'bottom'; available: ['top_v1'] (aliases: top → top_v1)
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

_VERSIONED = re.compile(r"^[a-z][a-z0-9_]*_v[0-9]+$")


class Registry:
    """Named, versioned parts of one kind (``kind`` is used in error messages)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._parts: dict[str, Any] = {}
        self._aliases: dict[str, str] = {}

    def register(self, name: str, aliases: Iterable[str] = ()) -> Callable[[Any], Any]:
        """Decorator registering a class or function under ``name`` (``something_vN``) and ``aliases``."""
        if not _VERSIONED.match(name):
            raise ValueError(f"a {self.kind} name must look like 'name_v1', got {name!r}")

        def decorate(part: Any) -> Any:
            if name in self._parts:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._parts[name] = part
            for alias in aliases:
                self._aliases[alias] = name
            if not isinstance(part, _Lazy):
                part.registered_name = name
            return part

        return decorate

    def register_lazily(self, name: str, target: str, aliases: Iterable[str] = ()) -> None:
        """Register ``"package.module:attribute"`` under ``name``; it is imported on first :meth:`get`.

        Lets a registry list heavy parts (a scorer imports torch) without importing them.
        """
        self.register(name, aliases)(_Lazy(target))

    def resolve(self, name: str) -> str:
        """The versioned name behind ``name`` (itself, or what its alias points at)."""
        name = self._aliases.get(name, name)
        if name not in self._parts:
            aliases = ", ".join(f"{a} → {n}" for a, n in sorted(self._aliases.items()))
            raise ValueError(f"unknown {self.kind} {name!r}; available: {self.names()}"
                             + (f" (aliases: {aliases})" if aliases else ""))
        return name

    def get(self, name: str) -> Any:
        """The part registered as ``name`` (or an alias of it)."""
        name = self.resolve(name)
        part = self._parts[name]
        if isinstance(part, _Lazy):
            part = self._parts[name] = part.load()
            part.registered_name = name
        return part

    def names(self) -> list[str]:
        """The versioned names, sorted."""
        return sorted(self._parts)

    def accepted(self) -> list[str]:
        """Every name :meth:`get` accepts: versioned names and aliases."""
        return sorted({*self._parts, *self._aliases})


class _Lazy:
    """A registered part not imported yet: ``"package.module:attribute"``."""

    def __init__(self, target: str) -> None:
        self.target = target

    def load(self) -> Any:
        import importlib

        module, _, attribute = self.target.partition(":")
        return getattr(importlib.import_module(module), attribute)


SCORERS = Registry("scorer")
"""Scorers by versioned name: a class with ``from_run_config(config, device)`` (see `hf_longattn.scorer`)."""
SCORERS.register_lazily("longattn_v1", "hf_longattn.scorer:LongAttnScorer", aliases=("longattn",))
SCORERS.register_lazily("prolong_v1", "hf_longattn.scorers.prolong_scorer:ProLongScorer", aliases=("prolong",))
SCORERS.register_lazily("ladm_cds_v1", "hf_longattn.scorers.ladm:LadmCdsScorer", aliases=("ladm", "ladm_cds"))
