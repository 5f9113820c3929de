"""Fast CPU kernels, compiled from C by the package build (`setup.py`), with a pure-PyTorch
reference path always available.

`extension()` returns the compiled module or None; when it is missing (a machine where
the build failed, or a checkout never installed) the first caller gets one warning and
everything runs on the reference path. `kernel_for(packed)` gives the fast operator of a
packed format, or None when no kernel serves that format; an IntQuant kernel runs the
int8-activation path or the float path (`IntQKernel.path`, chosen as slimlm/kernels/intq.py
describes).
"""

from __future__ import annotations

import functools
import warnings

from slimlm.kernels.intq import IntQKernel


@functools.lru_cache(maxsize=1)
def extension():
    """The compiled kernel module, or None (with a one-line warning) when it is unavailable."""
    import torch  # noqa: F401  (load torch's OpenMP runtime first, so the kernels share it)

    try:
        from slimlm.kernels import _C
    except ImportError as e:
        warnings.warn(f"slimlm: C kernels are not built ({e}); running the slower PyTorch reference path "
                      "(reinstall with `pip install -e .` and a C compiler to build them)", RuntimeWarning, stacklevel=2)
        return None
    return _C


def available() -> bool:
    return extension() is not None


def isa() -> str:
    """The instruction set the kernels run with on this CPU: avx512, avx2, portable, or none."""
    ext = extension()
    return ext.isa() if ext is not None else "none"


def kernel_for(packed):
    """A callable x (..., in) -> (..., out) for `packed`, or None when no kernel serves it."""
    from slimlm.formats.intq import IntQuant

    if isinstance(packed, IntQuant) and extension() is not None:
        return IntQKernel(packed, extension())
    return None


__all__ = ["IntQKernel", "available", "extension", "isa", "kernel_for"]
