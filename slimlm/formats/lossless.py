"""Lossless formats: entropy-coded float weights (DFloat11-style) and entropy-coded integer codes.

`LosslessFloat` keeps a bfloat16, float16 or float32 matrix bit for bit. A float is
sign | exponent (e bits) | mantissa (m bits); in trained weights the exponent carries
only ~2.6 bits of information, so it is Huffman-coded (see `_entropy.py`) while sign and
mantissa are stored raw:

    dtype       e   m   raw sign+mantissa (r = m + 1 bits) stored as
    bfloat16    8   7   raw      uint8[1, n]         one byte plane
    float16     5  10   raw      uint8[1, n]         low 8 bits, and
                        raw_hi   uint8[ceil(3n/8)]   the top 3 bits bit-packed (bitpack.py)
    float32     8  23   raw      uint8[3, n]         three byte planes, low byte first

    exponents   lengths uint8[A], stream uint8[B], chunk_bits int16[C] (uint16 values)
    crc         CRC-32 of every stored tensor and the shape, kept in the metadata

with n = out·in weights in row-major order. `dequantize()` widens the decoded weights
to float32 (exact); `dequantize_as(dtype)` decodes straight into the forward's dtype.
The decoded weight is not cached by `CompressedLinear` (`cache_decoded = False`): it is
rebuilt just before each use, so only one layer's float weights are alive at a time
(block-level decompression). The decoder's tables are built once per layer and kept
(~40 KB, derived, not stored).

`LosslessInt` holds an `IntQuant` whose integer codes are Huffman-coded instead of
bit-packed; scales and minimums stay fp16. `dequantize()` equals the IntQuant's exactly.

Both formats check their CRC when built, and decoding checks the chunk table, so a
damaged file raises `SlimlmError` instead of yielding wrong weights.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from slimlm.errors import SlimlmError
from slimlm.formats import _entropy, bitpack
from slimlm.formats.base import register_format, stored_bits
from slimlm.formats.intq import IntQuant, n_groups

# dtype name -> (exponent bits, mantissa bits, integer dtype of the same width)
FLOAT_FIELDS = {
    "bfloat16": (8, 7, torch.int16),
    "float16": (5, 10, torch.int16),
    "float32": (8, 23, torch.int32),
}
CRC_BITS = 32


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


def _crc(header: str, *tensors: torch.Tensor | None) -> int:
    crc = zlib.crc32(header.encode())
    for t in tensors:
        if t is not None:
            crc = zlib.crc32(memoryview(_np(t).reshape(-1).view(np.uint8)), crc)
    return crc


def _coded(n: int, chunk: int, lengths: torch.Tensor, stream: torch.Tensor, chunk_bits: torch.Tensor) -> _entropy.Coded:
    return _entropy.Coded(n=n, chunk=chunk, lengths=_np(lengths), stream=_np(stream),
                          chunk_bits=_np(chunk_bits).view(np.uint16))


def _coded_tensors(c: _entropy.Coded) -> dict[str, torch.Tensor]:
    return {"lengths": torch.from_numpy(c.lengths.copy()), "stream": torch.from_numpy(c.stream),
            "chunk_bits": torch.from_numpy(c.chunk_bits.view(np.int16))}


def _check_coded(name: str, lengths, stream, chunk_bits, chunk: int) -> None:
    for field, t in (("lengths", lengths), ("stream", stream)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.dim() != 1:
            raise SlimlmError(f"{name} field {field} must be a 1-D uint8 tensor; the file is corrupt")
    if not isinstance(chunk_bits, torch.Tensor) or chunk_bits.dtype != torch.int16 or chunk_bits.dim() != 1:
        raise SlimlmError(f"{name} field chunk_bits must be a 1-D int16 tensor; the file is corrupt")
    if not 1 <= chunk <= _entropy.MAX_CHUNK:
        raise SlimlmError(f"{name} chunk size {chunk} is outside 1..{_entropy.MAX_CHUNK}; the file is corrupt")


@register_format
@dataclass(eq=False)
class LosslessFloat:
    format_name: ClassVar[str] = "lossless_float"
    cache_decoded: ClassVar[bool] = False  # decode just before each use (block-level decompression)

    out_features: int
    in_features: int
    dtype: str  # "bfloat16" | "float16" | "float32": the dtype reproduced bit for bit
    chunk: int  # symbols per independently decodable chunk
    lengths: torch.Tensor  # uint8 (A,) exponent code lengths
    stream: torch.Tensor  # uint8 (B,) Huffman-coded exponents
    chunk_bits: torch.Tensor  # int16 (C,) bits per chunk, read as uint16
    raw: torch.Tensor  # uint8 (planes, n) sign+mantissa byte planes
    raw_hi: torch.Tensor | None  # uint8, bit-packed top bits of sign+mantissa (float16 only)
    crc: int

    def __post_init__(self):
        if self.dtype not in FLOAT_FIELDS:
            raise SlimlmError(f"lossless float format: dtype {self.dtype!r} is not one of {', '.join(FLOAT_FIELDS)}")
        _check_coded("lossless float format", self.lengths, self.stream, self.chunk_bits, self.chunk)
        n = self.out_features * self.in_features
        planes, hi_bits = divmod(FLOAT_FIELDS[self.dtype][1] + 1, 8)
        if self.raw.dtype != torch.uint8 or tuple(self.raw.shape) != (planes, n):
            raise SlimlmError(f"lossless float format: raw has shape {tuple(self.raw.shape)}, {(planes, n)} expected; "
                              "the file is corrupt")
        want_hi = bitpack.packed_nbytes(n, hi_bits) if hi_bits else 0
        got_hi = 0 if self.raw_hi is None else self.raw_hi.numel()
        if got_hi != want_hi:
            raise SlimlmError(f"lossless float format: raw_hi holds {got_hi} bytes, {want_hi} expected; the file is corrupt")
        if self._checksum() != self.crc:
            raise SlimlmError("lossless float format: the checksum does not match the stored weights; the file is corrupt")

    def _checksum(self) -> int:
        return self.checksum(vars(self))

    @staticmethod
    def checksum(f: dict) -> int:
        header = f"{f['out_features']}x{f['in_features']}:{f['dtype']}:{f['chunk']}"
        return _crc(header, f["lengths"], f["stream"], f["chunk_bits"], f["raw"], f["raw_hi"])

    @classmethod
    def encode(cls, weight: torch.Tensor, chunk: int = 256) -> "LosslessFloat":
        """Code a (out, in) bfloat16 / float16 / float32 tensor; decoding returns its exact bits."""
        dtype = str(weight.dtype).removeprefix("torch.")
        if dtype not in FLOAT_FIELDS or weight.dim() != 2:
            raise SlimlmError(f"lossless coding takes a 2-D {'/'.join(FLOAT_FIELDS)} weight, got {weight.dtype} "
                              f"of shape {tuple(weight.shape)}")
        e, m, int_dtype = FLOAT_FIELDS[dtype]
        width = 1 + e + m
        unsigned = np.uint16 if width == 16 else np.uint32
        x = _np(weight.view(int_dtype)).reshape(-1).view(unsigned)  # (n,) the bit patterns
        exponent = ((x >> m) & ((1 << e) - 1)).astype(np.uint8)
        raw = ((x >> (width - 1)) << m) | (x & ((1 << m) - 1))  # sign above the mantissa, r = m + 1 bits
        planes, hi_bits = divmod(m + 1, 8)
        raw_planes = np.stack([(raw >> (8 * j)).astype(np.uint8) for j in range(planes)])  # astype keeps the low byte
        raw_hi = bitpack.pack(torch.from_numpy((raw >> (8 * planes)).astype(np.uint8)), hi_bits) if hi_bits else None
        coded = _entropy.encode(exponent, chunk=chunk, alphabet=1 << e)
        out, inp = weight.shape
        fields = dict(out_features=out, in_features=inp, dtype=dtype, chunk=chunk, **_coded_tensors(coded),
                      raw=torch.from_numpy(raw_planes), raw_hi=raw_hi)
        return cls(**fields, crc=cls.checksum(fields))

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def _decoder(self) -> _entropy.Decoder:
        """The exponent decoder, built once (tables, chunk starts): decoding runs at every forward."""
        dec = self.__dict__.get("_dec")
        if dec is None:
            n = self.out_features * self.in_features
            dec = self._dec = _entropy.Decoder(_coded(n, self.chunk, self.lengths, self.stream, self.chunk_bits))
        return dec

    def _exponents(self) -> np.ndarray:
        return self._decoder().decode()

    def _bfloat16_bits(self, wide: bool) -> torch.Tensor:
        """(out, in) bf16 bit patterns (int16), or with `wide` the float32 ones (int32, bf16 << 16),
        decoded straight into a new tensor: the exponent shifted into place between the sign
        and mantissa bits of the raw byte (fused into the decoder's store)."""
        bits = torch.empty(self.shape, dtype=torch.int32 if wide else torch.int16)
        store = _entropy.Store.BF16_AS_F32 if wide else _entropy.Store.BF16
        dec = self._decoder()
        if dec.n and self.raw.is_contiguous() and _entropy.kernel_available():  # one call: this runs at every forward
            dec.decode_into(store, bits.data_ptr(), self.raw.data_ptr())
        else:
            dec.decode(store, _np(self.raw)[0], out=bits.numpy().reshape(-1).view(np.uint32 if wide else np.uint16))
        return bits

    def decode_native(self) -> torch.Tensor:
        """The (out, in) weight in its own dtype, bit for bit as it was coded."""
        e, m, int_dtype = FLOAT_FIELDS[self.dtype]
        if self.dtype == "bfloat16":
            return self._bfloat16_bits(False).view(torch.bfloat16)
        n = self.out_features * self.in_features
        exponent = self._exponents()
        raw = _np(self.raw)
        r = sum(raw[j].astype(np.uint32) << np.uint32(8 * j) for j in range(raw.shape[0]))
        if self.raw_hi is not None:
            hi_bits = (m + 1) % 8
            r |= bitpack.unpack(self.raw_hi, hi_bits, n).numpy().astype(np.uint32) << np.uint32(8 * raw.shape[0])
        bits = ((r >> np.uint32(m)) << np.uint32(e + m)) | (exponent.astype(np.uint32) << np.uint32(m))
        bits |= r & np.uint32((1 << m) - 1)
        native = bits.astype(np.uint16).view(np.int16) if int_dtype == torch.int16 else bits.view(np.int32)
        return torch.from_numpy(native).view(getattr(torch, self.dtype)).view(self.shape)

    def dequantize(self) -> torch.Tensor:
        if self.dtype == "bfloat16":  # straight to float32 bits: widening bf16 is a 16-bit shift
            return self._bfloat16_bits(True).view(torch.float32)
        return self.decode_native().float()

    def dequantize_as(self, dtype: torch.dtype) -> torch.Tensor:
        """`dequantize().to(dtype)` without the float32 copy in between: what a forward in
        `dtype` computes with (a bfloat16 model decodes straight to bfloat16)."""
        if dtype == getattr(torch, self.dtype):
            return self.decode_native()
        return self.dequantize().to(dtype)

    def nbits(self) -> int:
        n = sum(stored_bits(t) for t in (self.lengths, self.stream, self.chunk_bits, self.raw))
        return n + (stored_bits(self.raw_hi) if self.raw_hi is not None else 0) + CRC_BITS

    def to_state(self):
        meta = dict(out_features=self.out_features, in_features=self.in_features, dtype=self.dtype,
                    chunk=self.chunk, crc=self.crc)
        tensors = dict(lengths=self.lengths, stream=self.stream, chunk_bits=self.chunk_bits, raw=self.raw)
        if self.raw_hi is not None:
            tensors["raw_hi"] = self.raw_hi
        return meta, tensors

    @classmethod
    def from_state(cls, meta, tensors):
        try:
            return cls(**meta, lengths=tensors["lengths"], stream=tensors["stream"], chunk_bits=tensors["chunk_bits"],
                       raw=tensors["raw"], raw_hi=tensors.get("raw_hi"))
        except (KeyError, TypeError) as e:
            raise SlimlmError(f"lossless float format entry is incomplete ({e}); the file is corrupt") from None


@register_format
@dataclass(eq=False)
class LosslessInt:
    format_name: ClassVar[str] = "lossless_int"

    out_features: int
    in_features: int
    bits: int
    group: int
    symmetric: bool
    chunk: int
    lengths: torch.Tensor  # uint8 (A,) code lengths of the integer codes
    stream: torch.Tensor  # uint8 (B,) Huffman-coded integer codes, row-major
    chunk_bits: torch.Tensor  # int16 (C,)
    scales: torch.Tensor  # fp16 (out, G), as in IntQuant
    mins: torch.Tensor | None  # fp16 (out, G), asymmetric only
    crc: int

    def __post_init__(self):
        _check_coded("lossless integer format", self.lengths, self.stream, self.chunk_bits, self.chunk)
        if not 2 <= self.bits <= 8 or self.lengths.numel() > 1 << self.bits:
            raise SlimlmError(f"lossless integer format: {self.lengths.numel()} code lengths for {self.bits}-bit codes; "
                              "the file is corrupt")
        g = n_groups(self.in_features, self.group) if 1 <= self.group <= self.in_features else -1
        if tuple(self.scales.shape) != (self.out_features, g) or self.symmetric != (self.mins is None):
            raise SlimlmError("lossless integer format: scales or mins do not fit the shape; the file is corrupt")
        if self._checksum() != self.crc:
            raise SlimlmError("lossless integer format: the checksum does not match the stored codes; the file is corrupt")

    def _checksum(self) -> int:
        return self.checksum(vars(self))

    @staticmethod
    def checksum(f: dict) -> int:
        header = f"{f['out_features']}x{f['in_features']}:{f['bits']}:{f['group']}:{f['symmetric']}:{f['chunk']}"
        return _crc(header, f["lengths"], f["stream"], f["chunk_bits"], f["scales"], f["mins"])

    @classmethod
    def encode(cls, q: IntQuant, chunk: int = 256) -> "LosslessInt":
        """Huffman-code the integer codes of `q`; scales and minimums are kept as they are."""
        coded = _entropy.encode(_np(q.int_codes()).reshape(-1), chunk=chunk, alphabet=1 << q.bits)
        fields = dict(out_features=q.out_features, in_features=q.in_features, bits=q.bits, group=q.group,
                      symmetric=q.symmetric, chunk=chunk, **_coded_tensors(coded), scales=q.scales, mins=q.mins)
        return cls(**fields, crc=cls.checksum(fields))

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def int_codes(self) -> torch.Tensor:
        """The (out, in) uint8 integer codes."""
        n = self.out_features * self.in_features
        q = _entropy.decode(_coded(n, self.chunk, self.lengths, self.stream, self.chunk_bits))
        if q.size and int(q.max()) >= 1 << self.bits:
            raise SlimlmError(f"lossless integer format decoded a code above {self.bits} bits; the file is corrupt")
        return torch.from_numpy(q).view(self.shape)

    def to_intquant(self) -> IntQuant:
        """The plain bit-packed `IntQuant` these codes came from (for its fast kernels)."""
        return IntQuant.from_codes(self.int_codes(), self.scales, self.mins, self.bits, self.group)

    def dequantize(self) -> torch.Tensor:
        return self.to_intquant().dequantize()

    def nbits(self) -> int:
        n = sum(stored_bits(t) for t in (self.lengths, self.stream, self.chunk_bits, self.scales))
        return n + (stored_bits(self.mins) if self.mins is not None else 0) + CRC_BITS

    def to_state(self):
        meta = dict(out_features=self.out_features, in_features=self.in_features, bits=self.bits, group=self.group,
                    symmetric=self.symmetric, chunk=self.chunk, crc=self.crc)
        tensors = dict(lengths=self.lengths, stream=self.stream, chunk_bits=self.chunk_bits, scales=self.scales)
        if self.mins is not None:
            tensors["mins"] = self.mins
        return meta, tensors

    @classmethod
    def from_state(cls, meta, tensors):
        try:
            return cls(**meta, lengths=tensors["lengths"], stream=tensors["stream"], chunk_bits=tensors["chunk_bits"],
                       scales=tensors["scales"], mins=tensors.get("mins"))
        except (KeyError, TypeError) as e:
            raise SlimlmError(f"lossless integer format entry is incomplete ({e}); the file is corrupt") from None
