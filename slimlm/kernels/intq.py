"""The IntQuant kernel operator: repack once at load time, then products straight from codes.

Two paths (`Path`), chosen per kernel when it is built:

- `int8`: each activation row is rounded to int8 per block of 32 columns (inside a group;
  one fp32 scale per block), and each group's products are integer dot products
  (AVX-512 VNNI `vpdpbusd`, unsigned codes × signed activations) scaled in float —
  llama.cpp's Q4_1 × Q8_1 scheme. Not equal to `x @ dequantize().T`: it computes
  `quantize_activations(x) @ dequantize().T` (to float rounding), whose relative error
  from the exact product is ~0.5 % for Gaussian x (rounding step max|x| / 127 per block).
  Layout and arithmetic: csrc/intq_i8.c (`repack_i8`). The same layout runs on every CPU:
  csrc/cpu.c picks AVX-512 VNNI, AVX-VNNI, AVX2 (`vpmaddubsw`), NEON dot product or a
  portable C loop at run time (`slimlm.kernels.isa()`); all give the same sums up to
  float rounding.
- `float`: float32 activations, results equal `x @ dequantize().T` to float rounding.
  Compute-bound at 3–4 cycles per 16 weights, so low bit widths gain little.

The default (`default_path`): SLIMLM_INTQ_PATH=int8|float when set, else DEFAULT_PATH on
every CPU. (Decision and measurements: DEFAULT_PATH.)

`repack(packed)` (float path) turns the format's row-major little-endian bit stream into the kernel's
layout (documented in csrc/intq.c): groups padded to multiples of 16 codes, superblocks
of 64 codes stored as 4-, 2- and 1-bit planes, 8·bits bytes each. The repacked codes
take the same bytes as the stored ones when the group size is a multiple of 16 and the
row a multiple of 64 codes (every layer of the embedded model), a little more otherwise.
Scales and minimums are used as stored (fp16).

Batch sizes. The int8 path runs its kernel for every batch size: up to 4 activation rows
share each unpacked step and more are taken in blocks of 64, so per token it beats even
torch's float32 matmul on cached dequantized weights (1 thread, 256 rows: 2.3–2.6 ms
against 2.6–2.7 ms for a 1536×576 or 576×1536 matrix). The float path runs its kernel for
small batches (≤ `SMALL_BATCH` rows, i.e. decoding and speculative verification); larger
ones (prefill) dequantize into a float32 scratch matrix in C and call torch's matmul.
"""

from __future__ import annotations

import os
from enum import Enum

import torch

from slimlm.errors import SlimlmError

SB = 64  # codes per superblock
CHUNK = 16  # codes per chunk; groups are padded to a multiple of it
SMALL_BATCH = 16


class Path(str, Enum):
    INT8 = "int8"  # int8 activations, integer dot products
    FLOAT = "float"  # float32 activations, exact to float rounding


# The default, by measurement (1 thread, CPU time, RTN groups of 32, asymmetric; 2-vCPU Sapphire
# Rapids VM under load): int8 is 4–7× faster per matrix-vector product (4-bit 1536×576: 20 µs
# against 85; 576×1536: 15 against 95; 49152×576: 1.0 ms against 2.8) and 6–9× at 4–16 rows,
# and a simulated token of the embedded model's block linears (distinct weights per layer) then
# reads them at ~13 GB/s, the memory bound, where float needs 4× longer. Its cost is the
# activation rounding (~0.5 % relative output error, as llama.cpp's Q8 activations). It is
# the default for every kernel call (the lean runtime's decode and prefill); evaluation
# (perplexity, KL) runs the `reference` kernel of CompressedLinear and is not affected.
# Without VNNI the int8 path runs AVX2's vpmaddubsw (or NEON's sdot, or portable C) on the
# same layout, so it is the default everywhere and the fused decode step works on every CPU.
# SLIMLM_INTQ_PATH=float selects the exact path.
DEFAULT_PATH = Path.INT8


def default_path(ext) -> Path:
    """The path a kernel takes when none is given: $SLIMLM_INTQ_PATH, else DEFAULT_PATH."""
    env = os.environ.get("SLIMLM_INTQ_PATH")
    if env:
        try:
            return Path(env)
        except ValueError:
            raise SlimlmError(f"SLIMLM_INTQ_PATH={env!r} is not a kernel path; use int8 or float") from None
    return DEFAULT_PATH


def padded_positions(in_features: int, group: int) -> tuple[torch.Tensor, int]:
    """Column c's position in the padded row, and the padded row length (whole superblocks)."""
    gpad = -(-group // CHUNK) * CHUNK
    n_groups = -(-in_features // group)
    c = torch.arange(in_features)
    pos = (c // group) * gpad + c % group
    return pos, -(-(n_groups * gpad) // SB) * SB


def repack(packed) -> torch.Tensor:
    """(out, n_superblocks · 8 · bits) uint8 bit planes of an IntQuant's codes."""
    out, inp, bits = packed.out_features, packed.in_features, packed.bits
    pos, row = padded_positions(inp, packed.group)
    q = torch.zeros(out, row, dtype=torch.int32)
    q[:, pos] = packed.int_codes().to(torch.int32)
    q = q.view(out, row // SB, SB)  # (out, nsb, 64)
    if bits == 8:
        return q.to(torch.uint8).reshape(out, -1).contiguous()
    planes, shift = [], 0
    if bits & 4:  # byte 16j+i: code 32j+i low nibble, code 32j+16+i high nibble
        v = ((q >> shift) & 15).view(out, -1, 2, 2, 16)
        planes.append(v[:, :, :, 0] | (v[:, :, :, 1] << 4))
        shift += 4
    if bits & 2:  # byte i, bits 2k..2k+1: code 16k+i
        v = ((q >> shift) & 3).view(out, -1, 4, 16)
        planes.append((v << (2 * torch.arange(4).view(1, 1, 4, 1))).sum(2))
        shift += 2
    if bits & 1:  # byte i, bit k: code 8k+i
        v = ((q >> shift) & 1).view(out, -1, 8, 8)
        planes.append((v << torch.arange(8).view(1, 1, 8, 1)).sum(2))
    nsb = row // SB
    return torch.cat([p.reshape(out, nsb, -1) for p in planes], dim=2).to(torch.uint8).reshape(out, -1).contiguous()


def act_block(group: int) -> int:
    """Columns per int8 activation block: 32, or 16 when the group padded to 16 is not a multiple of 32."""
    return 32 if (-(-group // CHUNK) * CHUNK) % 32 == 0 else 16


def i8_columns(in_features: int, group: int) -> torch.Tensor:
    """(row_codes,) the column of each position of an int8-path row, -1 for pads (csrc/intq_i8.c)."""
    b = act_block(group)
    spg = -(-group // b)
    nsub = -(-in_features // group) * spg
    nfull, rem = divmod(nsub, 16)
    tiles = [(16 * i, 1) for i in range(nfull)]
    if rem:
        tiles.append((16 * nfull, min(16 // (1 << (rem - 1).bit_length()), b // 4)))
    cols = []
    for sb0, r in tiles:  # (steps, lanes, 4): code 4k + p of lane l
        k = torch.arange(b // (4 * r)).view(-1, 1, 1)
        lane = torch.arange(16).view(1, -1, 1)
        sb = sb0 + lane // r
        g = sb // spg
        off = (sb % spg) * b + (lane % r) * (b // r) + 4 * k + torch.arange(4)
        valid = (sb < nsub) & (off < (in_features - g * group).clamp(max=group))
        cols.append(torch.where(valid, g * group + off, -1).reshape(-1))
    return torch.cat(cols)


def repack_i8(packed) -> torch.Tensor:
    """(out, row_codes · bits / 8) uint8: an IntQuant's codes in the int8-path layout (csrc/intq_i8.c)."""
    out, bits = packed.out_features, packed.bits
    cols = i8_columns(packed.in_features, packed.group)
    q = packed.int_codes()[:, cols.clamp(min=0)].to(torch.int32) * (cols >= 0)
    q = q.view(out, -1, 64)  # (out, steps, 64): code of step byte o
    if bits == 8:
        return q.to(torch.uint8).reshape(out, -1).contiguous()
    planes, shift = [], 0
    if bits & 4:  # byte i: step byte i low nibble, step byte 32 + i high nibble
        v = ((q >> shift) & 15).view(out, -1, 2, 32)
        planes.append(v[:, :, 0] | (v[:, :, 1] << 4))
        shift += 4
    if bits & 2:  # byte i, bits 2j..2j+1: step byte 16j + i
        v = ((q >> shift) & 3).view(out, -1, 4, 16)
        planes.append((v << (2 * torch.arange(4).view(1, 1, 4, 1))).sum(2))
        shift += 2
    if bits & 1:  # byte i, bit j: step byte 8j + i
        v = ((q >> shift) & 1).view(out, -1, 8, 8)
        planes.append((v << torch.arange(8).view(1, 1, 8, 1)).sum(2))
    return torch.cat(planes, dim=2).to(torch.uint8).reshape(out, -1).contiguous()


def quantize_activations(x: torch.Tensor, group: int) -> torch.Tensor:
    """x̂ (M, in): x (M, in) rounded as the int8 path rounds it — per block of `act_block(group)`
    columns inside each group, d = max|x| / 127, x̂ = d · round_half_even(x · (1 / d)).
    The int8 path computes x̂ @ dequantize().T; this is its reference."""
    m, inp = x.shape
    b = act_block(group)
    gpb = -(-group // b) * b  # group padded to whole blocks
    c = torch.arange(inp)
    pos = (c // group) * gpb + c % group
    xp = torch.zeros(m, -(-inp // group) * gpb)
    xp[:, pos] = x.float()
    blocks = xp.view(m, -1, b)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d != 0, 1 / d, torch.zeros(()))
    xi = torch.round(blocks * inv).clamp(-127, 127)
    return (xi * d).view(m, -1)[:, pos]


def stackable(packs) -> bool:
    """Whether IntQuant matrices can share one kernel call (same input width and code layout)."""
    p0 = packs[0]
    return all(getattr(p, "format_name", None) == "int" and (p.in_features, p.bits, p.group, p.symmetric)
               == (p0.in_features, p0.bits, p0.group, p0.symmetric) for p in packs)


def _stack_rows(packs, part) -> torch.Tensor:
    """part(p) of every pack stacked along the rows into one buffer allocated once, each part made
    and copied in turn (a cat of all parts would hold the whole twice: 56 MB for an 8-bit head)."""
    first = part(packs[0])
    out = torch.empty((sum(p.out_features for p in packs), *first.shape[1:]), dtype=first.dtype)
    out[: packs[0].out_features] = first
    r = packs[0].out_features
    del first
    for p in packs[1:]:
        out[r: r + p.out_features] = part(p)
        r += p.out_features
    return out


class IntQKernel:
    """x (..., in) float32 -> (..., out), computed from the repacked codes of one IntQuant —
    or of several with the same input width and layout stacked along the output rows
    (`IntQKernel([q, k, v], ext)`: one call for the three projections).

    `path` (a `Path` or its value; None: `default_path(ext)`) fixes the code layout, so it
    is read-only afterwards: build another kernel to change it."""

    def __init__(self, packed, ext, path: Path | str | None = None):
        packs = list(packed) if isinstance(packed, (list, tuple)) else [packed]
        if not stackable(packs):
            raise ValueError("stacked IntQuant kernels need the same input width, bits, group and symmetry")
        p0 = packs[0]
        self.ext = ext
        self.out_features, self.in_features = sum(p.out_features for p in packs), p0.in_features
        self.bits, self.group = p0.bits, p0.group
        self._path = default_path(ext) if path is None else Path(path)
        if self._path is Path.INT8:
            self.codes = _stack_rows(packs, repack_i8)
            if self.codes.shape[1] * 8 != ext.layout_i8(self.in_features, self.group)[1] * self.bits:
                raise RuntimeError("int8-path layout: Python and C disagree on the row length (rebuild the extension)")
            self._matmul, self._dequant = ext.matmul_i8, ext.dequant_i8
        else:
            self.codes = _stack_rows(packs, repack)
            self._matmul, self._dequant = ext.matmul, ext.dequant
        # fp16 bit patterns, read by the C code as uint16
        self.scales = _stack_rows(packs, lambda p: p.scales).view(torch.int16)
        self.mins = None if p0.mins is None else _stack_rows(packs, lambda p: p.mins).view(torch.int16)
        self._args = (self.codes.data_ptr(), self.scales.data_ptr(), 0 if self.mins is None else self.mins.data_ptr(),
                      self.out_features, self.in_features, self.group, self.bits)

    @property
    def path(self) -> Path:
        return self._path

    def nbytes(self) -> int:
        """Bytes the kernel reads per full product (codes, scales, minimums)."""
        n = self.codes.numel() + self.scales.numel() * 2
        return n + (self.mins.numel() * 2 if self.mins is not None else 0)

    def dequantize(self) -> torch.Tensor:
        """The (out, in) float32 weights, decoded in C from the repacked codes."""
        w = torch.empty(self.out_features, self.in_features)
        self._dequant(*self._args, w.data_ptr())
        return w

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m = x.shape[0] if x.dim() == 2 else x.numel() // self.in_features
        kernel = 0 < m and (m <= SMALL_BATCH or self._path is Path.INT8)
        if kernel and x.dim() == 2 and x.dtype == torch.float32 and x.is_contiguous():
            y = torch.empty(m, self.out_features)  # the decoding path, kept short
            self._matmul(*self._args, x.data_ptr(), m, y.data_ptr())
            return y
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype != torch.float32 or not x2.is_contiguous():
            x2 = x2.float().contiguous()
        if kernel:
            y = torch.empty(m, self.out_features)
            self._matmul(*self._args, x2.data_ptr(), m, y.data_ptr())
        else:
            y = x2 @ self.dequantize().T
        return y.view(*lead, self.out_features).to(x.dtype)
