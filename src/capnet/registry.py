"""The one Registry class: components are registered by name and built from configs.

Dassl/timm style: a decorator registers a builder, a duplicate name is an error, an unknown
name is an error that lists the available ones (with the closest match first). Each registry
names the package whose import fills it and imports it on the first lookup, so
``from capnet import BACKBONES; BACKBONES.build(...)`` works without knowing which modules
register what (and ``import capnet`` stays light: nothing heavy is imported until then).
"""
from __future__ import annotations

import difflib
import fnmatch
import importlib
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, TypeVar

T = TypeVar("T", bound=Callable[..., Any])
Resolver = Callable[[str], Optional[Callable[..., Any]]]
Suggester = Callable[[str], Iterable[str]]  # name -> accepted names a resolver knows (for "did you mean")
Checker = Callable[..., Optional[str]]  # (name, **context) -> an error message, or None when fine


class Registry:
    """A name -> builder mapping with helpful errors."""

    def __init__(self, kind: str, home: Optional[str] = None) -> None:
        self.kind = kind
        self._items: Dict[str, Callable[..., Any]] = {}
        self._resolvers: List[Resolver] = []
        self._suggesters: List[Suggester] = []
        self._forms: List[str] = []  # accepted name forms besides the registered names, for messages
        self._checkers: List[Checker] = []
        self._home = home  # the package whose import registers every entry (imported on first lookup)

    def _load(self) -> None:
        """Import the registering package once (registration itself never triggers this)."""
        home, self._home = self._home, None  # cleared first: the import itself may look names up
        if home is not None:
            try:
                importlib.import_module(home)
            except BaseException:
                self._home = home
                raise

    def add_resolver(self, resolver: Resolver, suggest: Optional[Suggester] = None, forms: Iterable[str] = (),
                     check: Optional[Checker] = None) -> None:
        """Consult ``resolver(name)`` for unregistered names (timm's ``hf-hub:`` style families).

        A resolver returns a builder for the names it understands (e.g. every open_clip
        "arch.tag" pair, too many to register one by one) and None for the rest. ``suggest(name)``
        lists the accepted names it knows, so a misspelt one gets a "did you mean" over them
        too; ``forms`` describe its names in errors ("<family>.<tag>"); ``check(name, **context)``
        returns what is wrong with a name the resolver accepts in that context (:meth:`check`).
        """
        self._resolvers.append(resolver)
        if suggest is not None:
            self._suggesters.append(suggest)
        self._forms.extend(forms)
        if check is not None:
            self._checkers.append(check)

    def check(self, name: str, **context: Any) -> None:
        """Raise a KeyError (one line, with the closest names) unless ``name`` is usable in ``context``.

        Config loading calls this so a misspelt name fails before any data is read.
        """
        self.get(name)
        for checker in self._checkers:
            problem = checker(name, **context)
            if problem:
                raise KeyError(problem)

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
        self._load()
        if name in self._items:
            return self._items[name]
        for resolver in self._resolvers:
            builder = resolver(name)
            if builder is not None:
                return builder
        known = list(dict.fromkeys([*self._items, *(c for suggest in self._suggesters for c in suggest(name))]))
        close = difflib.get_close_matches(name, known, n=3)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        forms = f"; or {', '.join(self._forms)}" if self._forms else ""
        raise KeyError(f"unknown {self.kind} '{name}'.{hint} Available: {', '.join(sorted(self._items))}{forms}")

    def build(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Look up ``name`` and call its builder."""
        return self.get(name)(*args, **kwargs)

    def names(self, pattern: str = "*") -> List[str]:
        """Registered names, filtered by a shell-style wildcard."""
        self._load()
        return sorted(n for n in self._items if fnmatch.fnmatch(n, pattern))

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        self._load()
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


BACKBONES = Registry("backbone", "capnet.models.backbones")
PEFT = Registry("PEFT method", "capnet.models.peft")
LOSSES = Registry("loss", "capnet.losses")
DATASETS = Registry("dataset reader", "capnet.data")
GRAPHS = Registry("label graph", "capnet.models.label_graph")
FEATURE_FITS = Registry("feature fit", "capnet.train")  # model kinds fitted in closed loop on cached final features, by kind name


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
