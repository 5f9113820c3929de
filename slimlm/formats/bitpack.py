"""Bit packing of unsigned integer codes.

Layout: the codes form one little-endian bit stream — code i occupies bits
[i·b, (i+1)·b) of the stream, least significant bit first, and byte j of the output
holds stream bits [8j, 8j+8). The stream is padded with zero bits to a whole byte,
so n codes of b bits take exactly ceil(n·b / 8) bytes. Vectorised for every b in 1..8.
"""

from __future__ import annotations

import torch


def packed_nbytes(n: int, bits: int) -> int:
    return (n * bits + 7) // 8


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack a 1-D tensor of codes in [0, 2**bits) into a 1-D uint8 tensor."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    codes = codes.reshape(-1).to(torch.uint8)
    if bits == 8:
        return codes.clone()
    n = codes.numel()
    if 8 % bits == 0:  # 1, 2, 4 bits: whole codes per byte, a shift-and-or per slot
        per = 8 // bits
        padded = torch.zeros(-(-n // per) * per, dtype=torch.uint8)
        padded[:n] = codes
        slots = padded.view(-1, per).to(torch.int32)
        shifts = torch.arange(per, dtype=torch.int32) * bits
        return (slots << shifts).sum(1).to(torch.uint8)
    # 3, 5, 6, 7 bits: expand to a bit stream, then gather 8 stream bits per byte.
    stream = ((codes.to(torch.int32).unsqueeze(1) >> torch.arange(bits, dtype=torch.int32)) & 1).reshape(-1)
    padded = torch.zeros(packed_nbytes(n, bits) * 8, dtype=torch.int32)
    padded[: stream.numel()] = stream
    return (padded.view(-1, 8) << torch.arange(8, dtype=torch.int32)).sum(1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack`: the first `n` codes as a 1-D uint8 tensor."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    if packed.numel() != packed_nbytes(n, bits):
        raise ValueError(f"{n} codes of {bits} bits need {packed_nbytes(n, bits)} bytes, got {packed.numel()}")
    packed = packed.reshape(-1).to(torch.int32)
    if bits == 8:
        return packed.to(torch.uint8)
    if 8 % bits == 0:
        per = 8 // bits
        shifts = torch.arange(per, dtype=torch.int32) * bits
        return ((packed.unsqueeze(1) >> shifts) & ((1 << bits) - 1)).reshape(-1)[:n].to(torch.uint8)
    stream = ((packed.unsqueeze(1) >> torch.arange(8, dtype=torch.int32)) & 1).reshape(-1)[: n * bits]
    return (stream.view(n, bits) << torch.arange(bits, dtype=torch.int32)).sum(1).to(torch.uint8)
