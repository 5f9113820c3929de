"""Generation: the lean Llama-family runtime (KV cache, C kernels), sampling, streaming,
multi-turn chat with cache reuse, and self-speculative decoding; `native`, the torch-free
runtime of an exported model (`slimlm run`).

The names below are imported on first use, so `slimlm.runtime.native` runs in a process
that never imports torch.
"""

import importlib
import types

_LAZY = {
    "Chat": "generate", "GenerationConfig": "generate", "generate": "generate", "generate_ids": "generate",
    "LeanModel": "lean", "RuntimeConfig": "lean",
    "SpecStats": "speculative", "draft_model": "speculative", "speculative_ids": "speculative",
    "speculative_pair": "speculative",
}


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _Package(types.ModuleType):
    def __setattr__(self, name, value):
        # importing the submodule `generate` would bind it over the function `generate`
        if not (name in _LAZY and isinstance(value, types.ModuleType)):
            super().__setattr__(name, value)


import sys  # noqa: E402

sys.modules[__name__].__class__ = _Package

__all__ = sorted(_LAZY)
