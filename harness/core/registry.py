"""One flat, typed registry per kind of plugin (methods, datasets).

A decorator registers a class by name: it checks the base class and refuses duplicates; an unknown
name gets "did you mean ...?". Built-in plugins are discovered by importing every module of their
package (one file per plugin); third-party ones come in through a Python entry point group, never
through import paths written in YAML.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Generic, TypeVar

T = TypeVar("T")


class RegistryError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


def did_you_mean(name: str, choices, n: int = 1, prefix: str = "") -> str:
    """"did you mean 'x'? " for the closest of `choices` (n of them), or "" when none is close: the one
    helper behind every suggestion the harness makes (plugins, study keys, profiles, grid axes, backbones)."""
    close = difflib.get_close_matches(name, list(choices), n=n, cutoff=0.5)
    return f"did you mean {', '.join(repr(prefix + c) for c in close)}? " if close else ""


def _name_params(cls: type, name: str, kind: str) -> None:
    """The plugin's name is written once, in its decorator: it becomes the default of its Params' `name`."""
    params = getattr(cls, "Params", None)
    fields = getattr(params, "model_fields", {})
    if "name" not in fields:
        return
    current = fields["name"].default
    if current not in ("", None, name) and isinstance(current, str):
        raise RegistryError(f"{kind} '{name}': its Params already belong to '{current}'; give each plugin its own "
                            "Params class")
    fields["name"].default = name
    params.model_rebuild(force=True)


class Registry(Generic[T]):
    def __init__(self, kind: str, base: type, builtin_package: str, entry_point_group: str):
        self.kind, self.base = kind, base
        self.builtin_package, self.entry_point_group = builtin_package, entry_point_group
        self._items: dict[str, type[T]] = {}
        self._loaded = False

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        def decorator(cls: type[T]) -> type[T]:
            if not (isinstance(cls, type) and issubclass(cls, self.base)):
                raise TypeError(f"{self.kind} '{name}': {cls!r} must subclass {self.base.__name__}")
            if name in self._items and self._items[name] is not cls:
                raise RegistryError(f"duplicate {self.kind} name '{name}': already registered by "
                                    f"{self._items[name].__module__}.{self._items[name].__qualname__}")
            cls.registry_name = name
            _name_params(cls, name, self.kind)
            self._items[name] = cls
            return cls
        return decorator

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        package = importlib.import_module(self.builtin_package)
        for info in pkgutil.iter_modules(package.__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{self.builtin_package}.{info.name}")
        for ep in entry_points(group=self.entry_point_group):
            ep.load()  # importing the module runs its @register decorator

    def get(self, name: str) -> type[T]:
        self._load()
        if name not in self._items:
            hint = did_you_mean(name, self._items) or f"choose one of: {', '.join(sorted(self._items))}"
            raise RegistryError(f"unknown {self.kind} '{name}': {hint.strip()}")
        return self._items[name]

    def names(self) -> list[str]:
        self._load()
        return sorted(self._items)
