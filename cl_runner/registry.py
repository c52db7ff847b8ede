"""One registry type for every kind of named component.

A component registers itself where it is defined::

    @ALGORITHMS.register("ewc", backend="torch")
    class EWC(TorchLearner): ...

An entry may hold one backend-independent object (``backend=None``: a config schema, a benchmark
builder) and one implementation per backend. Looking up an unknown name raises a
:class:`~cl_runner.errors.ConfigError` that lists the valid names and the closest match.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any, Callable

from cl_runner.errors import ConfigError, did_you_mean


@dataclass
class Entry:
    name: str
    impls: dict[str | None, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def backends(self) -> list[str]:
        return sorted(k for k in self.impls if k is not None)


class Registry:
    """Maps names to components, optionally one implementation per backend."""

    def __init__(self, kind: str, plural: str | None = None):
        self.kind = kind
        self.plural = plural or kind + "s"
        self._entries: dict[str, Entry] = {}

    # -- filling -----------------------------------------------------------------------------
    def register(self, name: str, *, backend: str | None = None, **meta: Any) -> Callable:
        """Decorator recording ``obj`` under ``name`` (for ``backend``, if given)."""

        def deco(obj: Any) -> Any:
            entry = self._entries.setdefault(name, Entry(name))
            if backend in entry.impls and entry.impls[backend] is not obj:
                where = f" for backend '{backend}'" if backend else ""
                raise ValueError(f"{self.kind} '{name}' is registered twice{where}")
            entry.impls[backend] = obj
            entry.meta.update(meta)
            return obj

        return deco

    # -- reading -----------------------------------------------------------------------------
    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def names(self, pattern: str = "*") -> list[str]:
        return sorted(n for n in self._entries if fnmatch.fnmatch(n, pattern))

    def entry(self, name: str) -> Entry:
        if not isinstance(name, str) or name not in self._entries:
            valid = self.names()
            raise ConfigError(
                f"unknown {self.kind} '{name}'.{did_you_mean(str(name), valid)} "
                f"Valid {self.plural}: {', '.join(valid) or '(none registered)'}."
            )
        return self._entries[name]

    def get(self, name: str, backend: str | None = None) -> Any:
        """The object registered under ``name`` (for ``backend``, when given)."""
        entry = self.entry(name)
        if backend in entry.impls:
            return entry.impls[backend]
        if backend is None:
            raise ConfigError(f"{self.kind} '{name}' has only backend implementations: "
                              f"{', '.join(entry.backends)}")
        if not entry.backends:
            raise ConfigError(f"{self.kind} '{name}' has a config schema but no implementation yet, "
                              f"on any backend; choose another {self.kind} (see clrun --list).")
        have = ", ".join(entry.backends)
        raise ConfigError(
            f"{self.kind} '{name}' is not available on backend '{backend}' (implemented for: {have}). "
            f"Choose backend={entry.backends[0]} or another {self.kind}."
        )

    def meta(self, name: str) -> dict[str, Any]:
        return self.entry(name).meta

    def items(self):
        return [(n, self._entries[n]) for n in self.names()]


BENCHMARKS = Registry("benchmark")
BACKBONES = Registry("backbone")
ALGORITHMS = Registry("algorithm")
OPTIMIZERS = Registry("optimizer")
BACKENDS = Registry("backend")
CALLBACKS = Registry("callback")
PLUGINS = Registry("plugin")
