"""The aarch64 NEON dot-product kernel (csrc/intq_i8_neon.c), cross-compiled and run under
qemu-aarch64 by a plain C harness (tests/csrc/kernel_harness.c) with the real kernel sources.

Python writes the cases (codes repacked by `repack_i8`, fp16 scales and minimums, x), the
harness runs `intq_matmul_i8` once per ISA (neon_dotprod, then scalar) and writes y:

- integer-exact data: codes of the full range, scales in {1/2, 1}, minimums in (1/2)·ℤ,
  activations 2^e · xi with |xi| ≤ 4 and one ±127 per block (so the int8 rounding is
  exact, d = 2^e). Every product and partial sum is then a multiple of 2^-2 below 2^22:
  exact in float32 in any order, so NEON, scalar and the float64 product must agree bit
  for bit.
- random data (RTN codes of Gaussian weights, Gaussian x): NEON and scalar equal
  `quantize_activations(x) @ dequantize().T` within 2e-5 of the largest output, as
  tests/test_kernels.py asserts for the x86 kernels.

Over bits 2..8, symmetric and asymmetric, test_kernels.py's SHAPES and M in 1..5, 16, 70,
three OpenMP threads (uneven row ranges). The harness puts every input against an
unmapped page, so a read past the scales of a row's last groups crashes it. A clang build
of the harness (its dot product is clang's builtin) must give GCC's NEON results bit for bit.
"""

import os
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from slimlm.formats.intq import IntQuant
from slimlm.kernels.intq import act_block, quantize_activations, repack_i8
from slimlm.methods.affine import quantize_rtn

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "slimlm" / "kernels" / "csrc"
HARNESS = ROOT / "tests" / "csrc" / "kernel_harness.c"
CC, QEMU = "aarch64-linux-gnu-gcc", "qemu-aarch64"
FLAGS = ["-O2", "-std=gnu11", "-Wall", "-Werror"]
# others' files that still warn on aarch64 (reported, not ours to edit): -Wno-error for that warning only
KNOWN_WARNINGS: dict[str, str] = {}  # source -> a warning let through (none now)
HARNESS_SOURCES = ["cpu.c", "intq_i8.c", "intq_i8_neon.c"]
X86_ONLY = ["intq_avx512.c", "intq_i8_avx512.c", "intq_i8_avx2.c", "intq_i8_avxvnni.c"]

# tests/test_kernels.py's (out, in, group), group 0 = per channel, and two more
SHAPES = [(7, 576, 32), (5, 1536, 64), (3, 576, 96), (5, 576, 128), (6, 1536, 128), (3, 576, 0), (11, 1536, 0),
          (9, 100, 32), (4, 50, 7), (2, 64, 64), (5, 80, 64), (3, 96, 48), (6, 40, 0),
          (3, 320, 32), (2, 464, 16)]  # and last tiles of 9+ groups with pad lanes (R = 1, ng 10 / 13)
MS = (1, 2, 3, 4, 5, 16, 70)  # matrix-vector, every tile of 4 with a remainder, a batch, blocks of 64
ISAS = ("neon_dotprod", "scalar")
TOL = 2e-5


def _need(*tools):
    for t in tools:
        if shutil.which(t) is None:
            pytest.skip(f"{t} not installed (make tools installs it)")


def _cc(args, what):
    r = subprocess.run(args, capture_output=True, text=True)
    if r.returncode:
        pytest.fail(f"{what} failed:\n{' '.join(map(str, args))}\n{r.stderr[-4000:]}")
    return r


def _build(tmp_path_factory, cc: list[str], flags: list[str]) -> Path:
    """The harness, static (qemu needs no aarch64 libraries), built by cc with the real kernel sources."""
    exe = tmp_path_factory.mktemp("arm") / "kernel_harness"
    srcs = [HARNESS, *(CSRC / n for n in HARNESS_SOURCES)]
    _cc([*cc, *FLAGS, *flags, "-static", f"-I{CSRC}", *map(str, srcs), "-lm", "-o", str(exe)], "building the harness")
    return exe


@pytest.fixture(scope="session")
def harness(tmp_path_factory):
    """GCC's build, with OpenMP (cached for the session)."""
    _need(CC, QEMU)
    return _build(tmp_path_factory, [CC], ["-fopenmp"])


@pytest.fixture(scope="session")
def clang_harness(tmp_path_factory):
    """clang's build (no OpenMP: clang has no aarch64 libomp here), where the kernel's dot
    product is clang's sdot builtin rather than vdotq_s32 (clang < 16)."""
    _need(CC, QEMU, "clang")  # clang links with the GNU cross toolchain's C library
    return _build(tmp_path_factory, ["clang", "--target=aarch64-linux-gnu"], ["-Wno-unknown-pragmas"])


def _run(exe: Path, cases: Path, isas, threads: int):
    env = {k: v for k, v in os.environ.items() if k != "SLIMLM_ISA"}
    env["OMP_NUM_THREADS"] = str(threads)
    y = cases.with_suffix(".y")
    r = subprocess.run([QEMU, str(exe), str(cases), str(y), *isas], capture_output=True, text=True, env=env,
                       timeout=300)
    if r.returncode:
        pytest.fail(f"the harness failed under {QEMU} (rc {r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return np.fromfile(y, dtype=np.float32), r.stdout


def _exact_case(bits, sym, out, inp, group, m, seed):
    """An IntQuant and x whose int8-path product is exact in float32 (module docstring)."""
    g = torch.Generator().manual_seed(seed)
    group = group or inp
    ng = -(-inp // group)
    q = torch.randint(0, 1 << bits, (out, inp), generator=g, dtype=torch.int32)
    scales = 0.5 * torch.randint(1, 3, (out, ng), generator=g).float()
    mins = None if sym else 0.5 * torch.randint(-8, 9, (out, ng), generator=g).float()
    p = IntQuant.from_codes(q.to(torch.uint8), scales, mins, bits, group)
    b = act_block(group)
    c = torch.arange(inp)
    blk = ((c // group) * (-(-group // b) * b) + c % group) // b  # activation block of each column
    xi = torch.randint(-4, 5, (m, inp), generator=g).float()
    first = torch.ones(inp, dtype=torch.bool)
    first[1:] = blk[1:] != blk[:-1]
    sign = torch.randint(0, 2, (m, inp), generator=g).float() * 2 - 1
    xi = torch.where(first, 127 * sign, xi)
    e = torch.randint(-1, 1, (m, int(blk.max()) + 1), generator=g).float()
    return p, xi * torch.exp2(e[:, blk])


def _random_case(bits, sym, out, inp, group, m, seed):
    g = torch.Generator().manual_seed(seed)
    p = quantize_rtn(torch.randn(out, inp, generator=g), bits, group, sym)
    return p, torch.randn(m, inp, generator=g)


def _pack(p, x) -> bytes:
    codes = repack_i8(p)
    head = struct.pack("<7i", p.out_features, p.in_features, p.group, p.bits, p.mins is not None, x.shape[0],
                       codes.shape[1])
    parts = [head, codes.numpy().tobytes(), p.scales.view(torch.int16).numpy().tobytes()]
    if p.mins is not None:
        parts.append(p.mins.view(torch.int16).numpy().tobytes())
    return b"".join([*parts, x.float().contiguous().numpy().tobytes()])


CASES = [(kind, bits, sym, shape, m) for kind in ("exact", "random") for bits in range(2, 9) for sym in (False, True)
         for shape in SHAPES for m in MS]


@pytest.fixture(scope="module")
def runs(harness, tmp_path_factory):
    """Every case through the harness in one qemu run: {case: (p, x, {isa: y})}, its stdout, the case file."""
    d = tmp_path_factory.mktemp("arm_cases")
    made = {}
    with open(d / "cases.bin", "wb") as f:
        for i, case in enumerate(CASES):
            kind, bits, sym, shape, m = case
            p, x = (_exact_case if kind == "exact" else _random_case)(bits, sym, *shape, m, seed=i)
            f.write(_pack(p, x))
            made[case] = (p, x)
    y, stdout = _run(harness, d / "cases.bin", ISAS, threads=3)
    out, n = {}, 0
    for case in CASES:
        p, x = made[case]
        size = x.shape[0] * p.out_features
        ys = {}
        for isa in ISAS:
            ys[isa] = torch.from_numpy(y[n:n + size].copy()).view(x.shape[0], p.out_features)
            n += size
        out[case] = (p, x, ys)
    assert n == y.size, "the harness wrote more results than cases"
    return out, stdout, d / "cases.bin"


def test_qemu_runs_the_neon_kernel(runs):
    stdout = runs[1]
    assert "default neon_dotprod" in stdout, f"cpu.c did not pick neon_dotprod under {QEMU}:\n{stdout}"
    assert "isas neon_dotprod,scalar" in stdout, stdout


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("sym", [False, True])
def test_neon_is_bit_exact_on_exact_data(runs, bits, sym):
    for shape in SHAPES:
        for m in MS:
            p, x, ys = runs[0][("exact", bits, sym, shape, m)]
            ref = (quantize_activations(x, p.group).double() @ p.dequantize().double().T).float()
            assert torch.equal(ys["scalar"], ref), (shape, m)
            assert torch.equal(ys["neon_dotprod"], ref), (shape, m, float((ys["neon_dotprod"] - ref).abs().max()))


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("sym", [False, True])
def test_neon_equals_the_emulation(runs, bits, sym):
    for shape in SHAPES:
        for m in MS:
            p, x, ys = runs[0][("random", bits, sym, shape, m)]
            ref = quantize_activations(x, p.group) @ p.dequantize().T
            for isa in ISAS:
                rel = float((ys[isa] - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
                assert rel < TOL, (isa, shape, m, rel)


def _rounding(x, group):
    """quantize_blocks of intq_i8.c in float32 torch: xi (M, nsub · B) int8, d and σ (M, nsub)."""
    m, inp = x.shape
    b = act_block(group)
    gpb = -(-group // b) * b
    c = torch.arange(inp)
    xp = torch.zeros(m, -(-inp // group) * gpb)
    xp[:, (c // group) * gpb + c % group] = x
    blocks = xp.view(m, -1, b)
    d = blocks.abs().amax(-1) / 127
    inv = torch.where(d != 0, 1 / d, torch.zeros(()))
    xi = torch.round(blocks * inv[..., None]).clamp(-127, 127)
    return xi.to(torch.int8).view(m, -1), d, d * xi.sum(-1)


def test_neon_activation_rounding_is_the_portable_one(harness, tmp_path):
    """intq_quantize_blocks_neon against quantize_blocks' arithmetic, bit for bit: Gaussian rows
    at two scales, a row of ties (half-integers with max 127: d = 1, so round half to even
    decides every other code) and a zero row (d = 0), on every shape's block layout."""
    g = torch.Generator().manual_seed(0)
    made = []
    with open(tmp_path / "cases.bin", "wb") as f:
        for out, inp, group in SHAPES:
            p = quantize_rtn(torch.randn(out, inp, generator=g), 4, group)
            ties = torch.randint(-254, 255, (inp,), generator=g).float() / 2
            ties[(torch.arange(inp) % p.group) % act_block(p.group) == 0] = 127.0  # every block's max
            x = torch.stack([torch.randn(inp, generator=g), 1e3 * torch.randn(inp, generator=g), ties,
                             torch.zeros(inp)])
            f.write(_pack(p, x))
            made.append((p, x))
    y, _ = _run(harness, tmp_path / "cases.bin", ["--quantize", "neon_dotprod"], threads=1)
    raw, n = y.view(np.uint8), 0
    for p, x in made:
        xi, d, sig = _rounding(x, p.group)
        nsub = d.shape[1]
        for r in range(x.shape[0]):
            got_xi = torch.from_numpy(raw[n:n + xi.shape[1]].copy()).view(torch.int8)
            n += xi.shape[1]
            got = torch.from_numpy(raw[n:n + 8 * nsub].copy()).view(torch.float32)
            n += 8 * nsub
            shape = (p.out_features, p.in_features, p.group)
            assert torch.equal(got_xi, xi[r]), (shape, r)
            assert torch.equal(got[:nsub], d[r]) and torch.equal(got[nsub:], sig[r]), (shape, r)
    assert n == raw.size


def test_clang_build_gives_the_same_results(runs, clang_harness):
    y, _ = _run(clang_harness, runs[2], ["neon_dotprod"], threads=1)
    n = 0
    for case in CASES:
        p, x, ys = runs[0][case]
        size = x.shape[0] * p.out_features
        got = torch.from_numpy(y[n:n + size].copy()).view(x.shape[0], p.out_features)
        n += size
        assert torch.equal(got, ys["neon_dotprod"]), case  # explicit vector float ops: the same bits
    assert n == y.size


def test_every_source_compiles_for_aarch64(tmp_path):
    """All kernel sources build for aarch64 with -Wall -Werror; the x86 ones compile to nothing there."""
    _need(CC, "aarch64-linux-gnu-nm")
    for omp in ([], ["-fopenmp"]):
        for src in sorted(CSRC.glob("*.c")):
            if src.name == "module.c" or (omp and src.name in HARNESS_SOURCES):
                continue  # module.c needs aarch64 Python headers; the harness built the others with OpenMP
            obj = tmp_path / (src.stem + ".o")
            extra = [f"-Wno-error={KNOWN_WARNINGS[src.name]}"] if src.name in KNOWN_WARNINGS else []
            extra += [] if omp else ["-Wno-unknown-pragmas"]  # without OpenMP its pragmas are ignored by design
            _cc([CC, *FLAGS, *omp, *extra, f"-I{CSRC}", "-c", str(src), "-o", str(obj)], f"compiling {src.name}")
            if src.name in X86_ONLY:
                nm = _cc(["aarch64-linux-gnu-nm", "--defined-only", str(obj)], "nm")
                assert not nm.stdout.strip(), f"{src.name} defines symbols on aarch64:\n{nm.stdout}"
