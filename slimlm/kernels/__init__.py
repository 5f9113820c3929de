"""Fast CPU kernels, compiled from C by the package build (`setup.py`), with a pure-PyTorch
reference path always available.

`extension()` returns the compiled module or None; when it is missing (a machine where
the build failed, or a checkout never installed) the first caller gets one warning and
everything runs on the reference path. `kernel_for(packed)` gives the fast operator of a
packed format, or None when no kernel serves that format; an IntQuant kernel runs the
int8-activation path or the float path (`IntQKernel.path`, chosen as slimlm/kernels/intq.py
describes).

Which instruction set runs is decided at run time from the CPU (csrc/cpu.c), never by
build flags: `isa()` names the int8-path kernels in use (avx512_vnni, avx_vnni, avx2,
neon_dotprod or scalar), `isas()` every one this CPU can run, `set_isa(name)` (or
SLIMLM_ISA=name before the first use) picks a lower one for comparisons. A CPU that gets
the portable loop is told so once (`slow_path_warning`).
"""

from __future__ import annotations

import functools
import os
import warnings

from slimlm.errors import SlimlmError

FAST = ("avx512_vnni", "avx_vnni", "avx2", "neon_dotprod")  # vector int8 kernels; "scalar" is the portable loop


def _chosen(mod):
    """`mod` (the compiled module) with $SLIMLM_ISA applied when set; a bad value is one SlimlmError."""
    want = os.environ.get("SLIMLM_ISA")
    if want:
        try:
            mod.set_isa(want)
        except ValueError as e:
            raise SlimlmError(f"SLIMLM_ISA={want!r}: {e}") from None
    return mod


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
    return _chosen(_C)


@functools.lru_cache(maxsize=1)
def native_extension():
    """The compiled module for a process without torch (slimlm/runtime/native.py): it links its own
    OpenMP runtime. Importing this package imports no torch; SlimlmError when the module is not built."""
    try:
        from slimlm.kernels import _C
    except ImportError as e:
        raise SlimlmError(f"the C kernels are not built ({e}); reinstall with `pip install -e .` and a C compiler") from None
    return _chosen(_C)


def __getattr__(name):  # IntQKernel lives in intq.py, which imports torch: only on first use
    if name == "IntQKernel":
        from slimlm.kernels.intq import IntQKernel

        return IntQKernel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def available() -> bool:
    return extension() is not None


def isa() -> str:
    """The int8-path kernels in use on this CPU (avx512_vnni, avx_vnni, avx2, neon_dotprod, scalar), or none."""
    ext = extension()
    return ext.isa() if ext is not None else "none"


def isas() -> list[str]:
    """Every int8-path kernel set this CPU can run, best first ([] without the extension)."""
    ext = extension()
    return ext.isas().split(",") if ext is not None else []


def set_isa(name: str | None) -> None:
    """Run the named kernels from now on (None: the best this CPU has); SlimlmError if it cannot."""
    ext = extension()
    if ext is None:
        raise SlimlmError("the C kernels are not built, so no instruction set can be chosen")
    try:
        ext.set_isa(name)
    except ValueError as e:
        raise SlimlmError(str(e)) from None


def describe() -> dict:
    """What runs here, for `info` and `bench --json`: the kernels in use, the alternatives, threads."""
    ext = extension()
    if ext is None:
        return {"built": False, "isa": "none", "isas": [], "openmp": False}
    return {"built": True, "isa": ext.isa(), "isas": isas(), "openmp": bool(ext.openmp())}


@functools.lru_cache(maxsize=1)
def slow_path_warning() -> str | None:
    """One warning (the first call only) when this CPU runs the portable loop; the message, or None."""
    name = isa()
    if name in FAST or name == "none":
        return None
    msg = (f"slimlm: this CPU has no vector int8 kernel ({name} path: no AVX2, AVX-VNNI, AVX-512 VNNI or NEON "
           "dot product found); compressed layers run a portable C loop, several times slower")
    warnings.warn(msg, RuntimeWarning, stacklevel=2)
    return msg


def kernel_name(packed) -> str:
    """What runs `packed` in the runtime: "int8/<isa>" or "float/<isa>" (a C kernel on that path),
    or "reference" (its format has no fast path: PyTorch on the dequantized weight)."""
    from slimlm.formats.intq import IntQuant
    from slimlm.kernels.intq import default_path

    if isinstance(packed, IntQuant) and extension() is not None:
        return f"{default_path(extension()).value}/{isa()}"
    return "reference"


def kernel_summary(model) -> dict:
    """Per kernel name, how many compressed layers of `model` it runs, and the formats with no fast path."""
    from slimlm.formats.linear import CompressedLinear

    counts, slow = {}, set()
    for m in model.modules():
        if isinstance(m, CompressedLinear):
            k = kernel_name(m.packed)
            counts[k] = counts.get(k, 0) + 1
            if k == "reference":
                slow.add(m.packed.format_name)
    return {"layers": counts, "formats_without_kernel": sorted(slow)}


def kernel_for(packed):
    """A callable x (..., in) -> (..., out) for `packed`, or None when no kernel serves it."""
    from slimlm.formats.intq import IntQuant

    if isinstance(packed, IntQuant) and extension() is not None:
        from slimlm.kernels.intq import IntQKernel

        slow_path_warning()
        return IntQKernel(packed, extension())
    return None


__all__ = ["IntQKernel", "available", "describe", "extension", "isa", "isas", "kernel_for", "kernel_name", "kernel_summary",
           "native_extension", "set_isa"]
