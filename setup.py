"""Builds the optional C kernels (slimlm.kernels._C) during `pip install`; everything else
is in pyproject.toml. `optional=True`: a machine that cannot compile them still installs
slimlm, which then runs the pure-PyTorch reference path and says so once (`make install`
checks and reports it).

Every ISA's kernels are compiled into one module with per-function target attributes, so
no build flag decides what a CPU runs: slimlm/kernels/csrc/cpu.c picks at run time. The
flags that not every compiler takes (OpenMP, the AVX-512 vector-width hint) are probed
first: GCC 11 and 12+, clang (macOS without libomp included) and cross compilers build it,
without OpenMP as one thread.
"""

import os
import platform
import sys
import tempfile

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

SOURCES = ("cpu", "intq", "intq_avx512", "intq_i8", "intq_i8_avx512", "intq_i8_avx2", "intq_i8_avxvnni",
           "intq_i8_neon", "lean", "module")
PROBE = "#include <omp.h>\nint main(void) { int n = 0;\n#pragma omp parallel reduction(+:n)\n n += 1;\n return n > 0 ? 0 : 1; }\n"


def _accepts(compiler, flags: list[str], link: bool = False) -> bool:
    """Whether the compiler builds (and links, with `link`) a small OpenMP-using file with `flags`."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.c")
        with open(src, "w") as f:
            f.write(PROBE if "-fopenmp" in flags else "int main(void) { return 0; }\n")
        try:
            objs = compiler.compile([src], output_dir=tmp, extra_postargs=flags)
            if link:
                compiler.link_executable(objs, os.path.join(tmp, "probe"), extra_postargs=flags)
        except Exception:  # noqa: BLE001 — any compiler or linker failure means "not accepted"
            return False
    return True


class BuildExt(build_ext):
    def build_extensions(self):
        cc = self.compiler
        x86 = platform.machine().lower() in ("x86_64", "amd64")
        for ext in self.extensions:
            args, link = ["-O3", "-std=gnu11"], []
            if sys.platform == "win32":
                args, link = ["/O2", "/openmp"], []
            else:
                if _accepts(cc, ["-fopenmp"], link=True):
                    args.append("-fopenmp")
                    link.append("-fopenmp")
                else:
                    print("slimlm: this compiler has no OpenMP; the kernels will run on one thread", file=sys.stderr)
                if x86 and _accepts(cc, ["-mprefer-vector-width=512"]):
                    args.append("-mprefer-vector-width=512")
            ext.extra_compile_args, ext.extra_link_args = args, link
        super().build_extensions()


kernels = Extension(
    "slimlm.kernels._C",
    sources=[f"slimlm/kernels/csrc/{f}.c" for f in SOURCES],
    depends=[f"slimlm/kernels/csrc/{f}" for f in ("intq.h", "lean.h", "portable.h", "intq_i8_x86_256.h")],
    optional=True,
)

setup(ext_modules=[kernels], cmdclass={"build_ext": BuildExt})
