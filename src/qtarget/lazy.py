"""Package attributes loaded on first use, so importing a package imports none of its heavy modules.

A package lists its public names and the module that defines each (relative, `.smollm2`, or absolute,
`qtarget.objectives`) and sets `__getattr__ = lazy_attributes(__name__, exports)`: the first access imports
that module and caches the value on the package. This keeps the torch-only core free of the Hugging Face
stack: `qtarget.models.head` imports without `qtarget.models`' loaders pulling in transformers.
"""
from __future__ import annotations

import importlib
import sys
from typing import Any, Callable

from qtarget.extras import as_missing_extra


def lazy_attributes(package: str, exports: dict[str, str], extras: dict[str, str] | None = None
                    ) -> Callable[[str], Any]:
    """A module-level `__getattr__` for `package` that resolves each name of `exports` from its module.
    A module that needs a missing optional dependency raises one line naming the extra to install
    (`extras`: name -> the extra to name instead of the missing module's own)."""

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        try:
            module = importlib.import_module(exports[name], package)
        except ImportError as e:
            missing = as_missing_extra(e, f"{package}.{name}", (extras or {}).get(name))
            if missing is None:
                raise
            raise missing from e
        value = getattr(module, name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__
