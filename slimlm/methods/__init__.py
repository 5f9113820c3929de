"""Compression methods: one file each, registered by name (see registry.py).

Every module in this package that does not start with an underscore is imported by
`load_all()`, so adding a method is adding one file.
"""

import importlib
import pkgutil

from slimlm.methods.registry import METHODS, Kind, LayerStats, MethodSpec, get_method, make_config, register

_loaded = False


def load_all() -> dict:
    global _loaded
    if not _loaded:
        for mod in pkgutil.iter_modules(__path__):
            if not mod.name.startswith("_") and mod.name != "registry":
                importlib.import_module(f"{__name__}.{mod.name}")
        _loaded = True
    return METHODS


__all__ = ["METHODS", "Kind", "LayerStats", "MethodSpec", "get_method", "load_all", "make_config", "register"]
