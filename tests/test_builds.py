"""The extension's C sources (slimlm/kernels/csrc) compile with every compiler setup.py may
meet: GCC 12, GCC 11 (no _Float16 on x86-64), clang (whose arm_neon.h before clang 16
hides vdotq_s32 without a -march flag), each with and without OpenMP, with -std=gnu11
-Wall -Werror (without OpenMP its pragmas are ignored by design: -Wno-unknown-pragmas).

Quick checks: every source with -fsyntax-only (types, declarations, intrinsics the
headers lack, -Wall's front-end warnings) on each compiler, and the NEON kernel built at
-O2 by clang for aarch64. The full -O2 builds, where target-attribute inlining is checked,
take minutes (the AVX-512 file alone ~40 s per compiler): marked slow.
"""

import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "slimlm" / "kernels" / "csrc"
SOURCES = sorted(CSRC.glob("*.c"))
FLAGS = ["-std=gnu11", "-Wall", "-Werror", f"-I{CSRC}", f"-I{sysconfig.get_paths()['include']}"]
COMPILERS = ["gcc", "gcc-11", "clang"]
AARCH64 = ["clang", "--target=aarch64-linux-gnu"]
OMP_PROBE = "#include <omp.h>\nint main(void) { return omp_get_max_threads() > 0 ? 0 : 1; }\n"


def _compiler(cc: list[str], omp: bool, tmp: Path) -> list[str]:
    """The command prefix for cc with or without OpenMP; skips, saying why, when it cannot run here."""
    if shutil.which(cc[0]) is None:
        pytest.skip(f"{cc[0]} not installed (make tools installs it)")
    if cc[1:] == AARCH64[1:] and not Path("/usr/aarch64-linux-gnu/include/stdio.h").exists():
        pytest.skip("no aarch64 C library headers (make tools installs libc6-dev-arm64-cross)")
    if not omp:
        return [*cc, "-Wno-unknown-pragmas"]
    probe = tmp / "omp_probe.c"
    probe.write_text(OMP_PROBE)
    r = subprocess.run([*cc, "-fopenmp", "-fsyntax-only", str(probe)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"{' '.join(cc)} has no OpenMP (omp.h) here: clang needs libomp-dev, which make tools does not install")
    return [*cc, "-fopenmp"]


def _compile(cmd: list[str], sources, tmp: Path, *extra: str):
    for src in sources:
        args = [*cmd, *FLAGS, *extra, str(src)]
        args += [] if "-fsyntax-only" in extra else ["-c", "-o", str(tmp / (src.stem + ".o"))]
        r = subprocess.run(args, capture_output=True, text=True)
        assert r.returncode == 0, f"{' '.join(args)}\n{r.stderr[-4000:]}"


@pytest.mark.parametrize("omp", [False, True], ids=["no-openmp", "openmp"])
@pytest.mark.parametrize("cc", COMPILERS)
def test_sources_parse_cleanly(cc, omp, tmp_path):
    _compile(_compiler([cc], omp, tmp_path), SOURCES, tmp_path, "-fsyntax-only")


@pytest.mark.parametrize("omp", [False, True], ids=["no-openmp", "openmp"])
def test_neon_kernel_builds_with_clang_for_aarch64(omp, tmp_path):
    """clang has no vdotq_s32 without a dotprod -march before version 16: the kernel uses its builtin."""
    cmd = _compiler(AARCH64, omp, tmp_path)
    _compile(cmd, [CSRC / "intq_i8_neon.c", CSRC / "cpu.c", CSRC / "intq_i8.c"], tmp_path, "-O2")


# The compilers the package build itself does not use here (gcc 12 with OpenMP is `make install`'s): each
# optimizing build takes ~1 min on 2 cores, so one with OpenMP (gcc 11) and one without (clang), not all six.
@pytest.mark.slow
@pytest.mark.parametrize("cc,omp", [("gcc-11", True), ("clang", False)], ids=["gcc-11-openmp", "clang-no-openmp"])
def test_sources_build_at_O2(cc, omp, tmp_path):
    _compile(_compiler([cc], omp, tmp_path), SOURCES, tmp_path, "-O2")
