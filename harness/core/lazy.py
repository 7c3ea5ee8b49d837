"""Thin package faces that import what they re-export only when it is first used (PEP 562), so that importing one
module of a package (a worker importing harness.study.config) does not import the whole package (the YAML reader, the
search planner, timm): the names stay where `from harness.study import load_study` finds them."""

from __future__ import annotations

import importlib
import sys


def lazy_exports(package: str, exports: dict[str, str]):
    """`__getattr__` and `__dir__` for a package's `__init__`: `exports` maps each public name to its module."""

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name]), name)
        setattr(sys.modules[package], name, value)  # once found, an ordinary attribute
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__
