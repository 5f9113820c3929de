"""Builds the optional C kernels (slimlm.kernels._C) during `pip install`; everything else
is in pyproject.toml. `optional=True`: a machine that cannot compile them still installs
slimlm, which then runs the pure-PyTorch reference path and says so once."""

import sys

from setuptools import Extension, setup

unix = sys.platform != "win32"
kernels = Extension(
    "slimlm.kernels._C",
    sources=[f"slimlm/kernels/csrc/{f}.c" for f in ("intq", "intq_avx512", "intq_i8", "intq_i8_avx512", "lean", "module")],
    depends=["slimlm/kernels/csrc/intq.h", "slimlm/kernels/csrc/lean.h", "slimlm/kernels/csrc/portable.h"],
    extra_compile_args=["-O3", "-fopenmp", "-mprefer-vector-width=512", "-std=gnu11"] if unix else ["/O2", "/openmp"],
    extra_link_args=["-fopenmp"] if unix else [],
    optional=True,
)

setup(ext_modules=[kernels])
