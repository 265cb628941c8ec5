"""Public names imported on first use, so that importing a package (and the CLI's argument checks)
needs no torch until a name that needs it is asked for."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_names(package: str, names: dict[str, str], namespace: dict[str, Any]) -> tuple[Callable, Callable]:
    """A module `__getattr__` and `__dir__` for `package`: name -> its submodule, imported on first
    lookup and kept in `namespace` (the package's globals) for the next one."""

    def __getattr__(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{names[name]}", package), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *names})

    return __getattr__, __dir__
