"""The IntQuant kernel operator: repack once at load time, then products straight from codes.

`repack(packed)` turns the format's row-major little-endian bit stream into the kernel's
layout (documented in csrc/intq.c): groups padded to multiples of 16 codes, superblocks
of 64 codes stored as 4-, 2- and 1-bit planes, 8·bits bytes each. The repacked codes
take the same bytes as the stored ones when the group size is a multiple of 16 and the
row a multiple of 64 codes (every layer of the embedded model), a little more otherwise.
Scales and minimums are used as stored (fp16).

Small batches (≤ `SMALL_BATCH` rows, i.e. decoding and speculative verification) run the
matrix–vector kernel; larger ones (prefill) dequantize into a float32 scratch matrix in C
and call torch's matmul, which is faster per token once the weights are reused many times.
"""

from __future__ import annotations

import torch

SB = 64  # codes per superblock
CHUNK = 16  # codes per chunk; groups are padded to a multiple of it
SMALL_BATCH = 16


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


def stackable(packs) -> bool:
    """Whether IntQuant matrices can share one kernel call (same input width and code layout)."""
    p0 = packs[0]
    return all(getattr(p, "format_name", None) == "int" and (p.in_features, p.bits, p.group, p.symmetric)
               == (p0.in_features, p0.bits, p0.group, p0.symmetric) for p in packs)


class IntQKernel:
    """x (..., in) float32 -> (..., out), computed from the repacked codes of one IntQuant —
    or of several with the same input width and layout stacked along the output rows
    (`IntQKernel([q, k, v], ext)`: one call for the three projections)."""

    def __init__(self, packed, ext):
        packs = list(packed) if isinstance(packed, (list, tuple)) else [packed]
        if not stackable(packs):
            raise ValueError("stacked IntQuant kernels need the same input width, bits, group and symmetry")
        p0 = packs[0]
        self.ext = ext
        self.out_features, self.in_features = sum(p.out_features for p in packs), p0.in_features
        self.bits, self.group = p0.bits, p0.group
        self.codes = torch.cat([repack(p) for p in packs]).contiguous()
        # fp16 bit patterns, read by the C code as uint16
        self.scales = torch.cat([p.scales for p in packs]).contiguous().view(torch.int16)
        self.mins = None if p0.mins is None else torch.cat([p.mins for p in packs]).contiguous().view(torch.int16)
        self._args = (self.codes.data_ptr(), self.scales.data_ptr(), 0 if self.mins is None else self.mins.data_ptr(),
                      self.out_features, self.in_features, self.group, self.bits)

    def nbytes(self) -> int:
        """Bytes the kernel reads per full product (codes, scales, minimums)."""
        n = self.codes.numel() + self.scales.numel() * 2
        return n + (self.mins.numel() * 2 if self.mins is not None else 0)

    def dequantize(self) -> torch.Tensor:
        """The (out, in) float32 weights, decoded in C from the repacked codes."""
        w = torch.empty(self.out_features, self.in_features)
        self.ext.dequant(*self._args, w.data_ptr())
        return w

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.shape[0] <= SMALL_BATCH and x.dtype == torch.float32 and x.is_contiguous():
            y = torch.empty(x.shape[0], self.out_features)  # the decoding path, kept short
            self.ext.matmul(*self._args, x.data_ptr(), x.shape[0], y.data_ptr())
            return y
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype != torch.float32 or not x2.is_contiguous():
            x2 = x2.float().contiguous()
        m = x2.shape[0]
        if m > SMALL_BATCH:
            y = x2 @ self.dequantize().T
        else:
            y = torch.empty(m, self.out_features)
            self.ext.matmul(*self._args, x2.data_ptr(), m, y.data_ptr())
        return y.view(*lead, self.out_features).to(x.dtype)
