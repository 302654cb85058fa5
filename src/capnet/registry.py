"""The one Registry class: components are registered by name and built from configs.

Dassl/timm style: a decorator registers a builder, a duplicate name is an error, an unknown
name is an error that lists the available ones (with the closest match first).
"""
from __future__ import annotations

import difflib
import fnmatch
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, TypeVar

T = TypeVar("T", bound=Callable[..., Any])
Resolver = Callable[[str], Optional[Callable[..., Any]]]


class Registry:
    """A name -> builder mapping with helpful errors."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: Dict[str, Callable[..., Any]] = {}
        self._resolvers: List[Resolver] = []

    def add_resolver(self, resolver: Resolver) -> None:
        """Consult ``resolver(name)`` for unregistered names (timm's ``hf-hub:`` style families).

        A resolver returns a builder for the names it understands (e.g. every open_clip
        "arch.tag" pair, too many to register one by one) and None for the rest.
        """
        self._resolvers.append(resolver)

    def register(self, name: Optional[str] = None) -> Callable[[T], T]:
        """Decorator: ``@REG.register("name")`` (defaults to the object's ``__name__``)."""

        def deco(obj: T) -> T:
            key = name or obj.__name__
            if key in self._items:
                raise KeyError(f"{self.kind} '{key}' is already registered")
            self._items[key] = obj
            return obj

        return deco

    def get(self, name: str) -> Callable[..., Any]:
        """Return the builder registered as ``name`` or raise a KeyError naming the choices."""
        if name in self._items:
            return self._items[name]
        for resolver in self._resolvers:
            builder = resolver(name)
            if builder is not None:
                return builder
        close = difflib.get_close_matches(name, list(self._items), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise KeyError(f"unknown {self.kind} '{name}'.{hint} Available: {', '.join(sorted(self._items))}")

    def build(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Look up ``name`` and call its builder."""
        return self.get(name)(*args, **kwargs)

    def names(self, pattern: str = "*") -> List[str]:
        """Registered names, filtered by a shell-style wildcard."""
        return sorted(n for n in self._items if fnmatch.fnmatch(n, pattern))

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


BACKBONES = Registry("backbone")
PEFT = Registry("PEFT method")
LOSSES = Registry("loss")
DATASETS = Registry("dataset reader")
GRAPHS = Registry("label graph")
FEATURE_FITS = Registry("feature fit")  # model kinds fitted in closed loop on cached final features, by kind name


def unknown_options_message(owner: str, options: Iterable[str], valid: List[str]) -> Optional[str]:
    """A one-line error for keyword options ``owner`` does not accept (None when all are valid)."""
    unknown = sorted(set(options) - set(valid))
    if not unknown:
        return None
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, valid, n=1)
        hints.append(f"'{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
    return f"{owner}: unknown option(s) {', '.join(hints)}; valid options: {', '.join(valid) or '(none)'}"
