"""One registry type for every named, pluggable thing: blocks, training strategies, samplers, latency targets,
data sets and predictors.

A ``Registry`` maps a lower_snake name to an entry plus free-form metadata. Registering a name twice is an error
(a plugin cannot silently replace a built-in); looking up an unknown name raises ``UnknownNameError`` with the
registered names and a "did you mean". The YAML schema, the CLI's choices and help, and the tests read names from
the registries; no other list of names exists.

Built-in entries register when their module is imported; ``Registry(..., discover=PACKAGE)`` imports every module
of ``PACKAGE`` on first use, so a new file in that package is picked up with no list to edit.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Generic, TypeVar

T = TypeVar("T")

NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]*$")


class UnknownNameError(KeyError):
    """A name that is not registered; the message lists the registered names and the closest match."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class DuplicateNameError(ValueError):
    """A name registered twice in one registry."""


def closest(value: object, allowed: Iterable[object]) -> str | None:
    """The entry of ``allowed`` closest to ``value`` (difflib's ratio of at least 0.6), or None."""
    matches = difflib.get_close_matches(str(value), [str(item) for item in allowed], n=1)
    return matches[0] if matches else None


def did_you_mean(value: object, allowed: Iterable[object]) -> str:
    """``"; did you mean 'x'?"`` for the closest of ``allowed`` to ``value``, or ``""`` when none is close (the one
    spelling of the hint in every message nasforge writes)."""
    match = closest(value, allowed)
    return f"; did you mean {match!r}?" if match else ""


@dataclass(frozen=True, slots=True)
class Registered(Generic[T]):
    """One entry: its name, the registered object, where it came from and free-form metadata."""

    name: str
    value: T
    source: str
    metadata: Mapping[str, Any] = field(default_factory=dict)


class Registry(Generic[T]):
    """Named entries of one kind (``kind`` is used in messages: "block type", "sampler", ...).

    ``discover``: a package whose modules are imported (once, recursively) before the first look-up, so that
    every built-in entry in it has registered itself.
    """

    def __init__(self, kind: str, *, discover: str | None = None) -> None:
        self.kind = kind
        self._discover = discover
        self._discovered = discover is None
        self._entries: dict[str, Registered[T]] = {}
        self._missing: dict[str, str] = {}

    def needs(self, name: str, requirement: str) -> None:
        """Declare ``name`` as an entry that is not registered because ``requirement`` is not installed (an optional
        extra): it stays out of ``names()``, and asking for it says what to install instead of "did you mean"."""
        self._missing[name] = requirement

    def register(self, name: str, value: T, *, source: str | None = None, **metadata: Any) -> T:
        """Add ``value`` under ``name``; raises ``DuplicateNameError`` if the name is taken."""
        if not isinstance(name, str) or not NAME_PATTERN.match(name):
            raise ValueError(f"{self.kind} name must be lower_snake_case (letters, digits, _), got {name!r}")
        if name in self._entries:
            previous = self._entries[name].source
            raise DuplicateNameError(f"{self.kind} {name!r} is already registered (by {previous})")
        origin = source if source is not None else getattr(value, "__module__", None) or type(value).__module__
        self._entries[name] = Registered(name, value, origin, MappingProxyType(dict(metadata)))
        return value

    def decorator(self, name: str, **metadata: Any) -> Callable[[T], T]:
        """``@registry.decorator("name")`` registers the decorated class or function."""

        def decorate(value: T) -> T:
            return self.register(name, value, **metadata)

        return decorate

    def unregister(self, name: str) -> None:
        """Remove ``name`` (for tests that register temporary entries)."""
        self._entries.pop(name, None)

    def _ensure_discovered(self) -> None:
        if self._discovered or self._discover is None:
            return
        self._discovered = True
        import_submodules(self._discover)

    def entry(self, name: str) -> Registered[T]:
        """The entry called ``name``; an unknown name raises ``UnknownNameError`` with a "did you mean"."""
        self._ensure_discovered()
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            names = self.names()
            raise UnknownNameError(f"unknown {self.kind} {name!r}; registered: {list(names)}{did_you_mean(name, names)}") from None

    def get(self, name: str) -> T:
        """The object registered as ``name``."""
        return self.entry(name).value

    def metadata(self, name: str) -> Mapping[str, Any]:
        return self.entry(name).metadata

    def names(self) -> tuple[str, ...]:
        """Every registered name, sorted."""
        self._ensure_discovered()
        return tuple(sorted(self._entries))

    def items(self) -> list[tuple[str, T]]:
        self._ensure_discovered()
        return [(name, self._entries[name].value) for name in sorted(self._entries)]

    def problem(self, name: object) -> str | None:
        """``None`` when ``name`` is registered, else the message a validator shows (allowed names, did you mean)."""
        names = self.names()
        if isinstance(name, str) and name in names:
            return None
        if isinstance(name, str) and name in self._missing:
            return f"{name!r} needs {self._missing[name]}; installed: {list(names)}"
        return f"must be one of {list(names)}, got {name!r}{did_you_mean(name, names)}"

    def __contains__(self, name: object) -> bool:
        self._ensure_discovered()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {list(self.names())})"


def import_submodules(package_name: str) -> list[str]:
    """Import every module below ``package_name`` (recursively, skipping names that start with ``_``)."""
    package = importlib.import_module(package_name)
    imported = []
    for module in pkgutil.walk_packages(package.__path__, prefix=f"{package_name}."):
        if module.name.rsplit(".", 1)[-1].startswith("_"):
            continue
        importlib.import_module(module.name)
        imported.append(module.name)
    return imported
