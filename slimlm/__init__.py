"""slimlm: fit a language model to a device budget.

    import slimlm
    lm = slimlm.load("smollm2-135m")          # or an HF directory, a .gguf file, a slimlm directory
    slimlm.compress_model(lm, "rtn:bits=4,group=64")
    slimlm.save(lm, "out/w4")

The names below are imported on first use, so `import slimlm` (and `slimlm --help`) stays fast.
"""

__version__ = "0.1.0"

from slimlm.errors import SlimlmError  # noqa: E402

_LAZY = {
    "compress_model": ("slimlm.compress.engine", "compress_model"),
    "save": ("slimlm.formats.store", "save_compressed"),
    "load": ("slimlm.loading", "load"),
    "LoadedModel": ("slimlm.models.loaded", "LoadedModel"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'slimlm' has no attribute {name!r}")


__all__ = ["LoadedModel", "SlimlmError", "compress_model", "load", "save", "__version__"]
