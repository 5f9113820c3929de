"""`VectorQuant`: vectors of `dim` input weights replaced by indices into a codebook.

Layout of one (out, in) matrix, V = ceil(in / dim) vectors per row (the last one
shorter when `dim` does not divide `in`), codebook of k entries, b = ceil(log2 k):

    indices   uint8[ceil(out·V·b / 8)]   one b-bit index per vector, row-major, as one
                                         little-endian bit stream (index i occupies stream
                                         bits [i·b, (i+1)·b), least significant first)
    scales    fp16[out]                  one scale per row
    codebook  (stored by its owner only, see below)
      fp16:   values fp16[k, dim]
      int8:   values int8[k, dim], vscale fp16[dim]   entry = values · vscale

    w[r, j·dim + t] = scales[r] · codebook[idx[r, j], t]       (float32; t < dim, cut at in)

Shared codebooks: layers of the same role can use one codebook. The first layer that
uses it (the *owner*) stores it and counts its bits; every other layer stores only
its indices and scales, names the codebook by `codebook_id` (a hash of its bytes) in
its metadata, and counts no codebook bit. Loading resolves that name through a
registry of codebooks alive in the process, filled by the owner's `from_state`, so
the owner must be loaded first — `slimlm.formats.store` loads layers in model order,
and the owner is always the earliest layer of a compression run.
"""

from __future__ import annotations

import hashlib
import weakref
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from slimlm.errors import SlimlmError
from slimlm.formats.base import register_format, stored_bits

MAX_INDEX_BITS = 24


def index_bits(k: int) -> int:
    return max(1, (k - 1).bit_length())


def pack_indices(idx: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack a 1-D tensor of indices in [0, 2^bits) into ceil(n·bits / 8) bytes (layout above)."""
    idx = idx.reshape(-1).to(torch.int64)
    stream = ((idx.unsqueeze(1) >> torch.arange(bits)) & 1).reshape(-1).to(torch.uint8)  # (n·bits,)
    padded = torch.zeros(-(-stream.numel() // 8) * 8, dtype=torch.uint8)
    padded[: stream.numel()] = stream
    return (padded.view(-1, 8).to(torch.int32) << torch.arange(8, dtype=torch.int32)).sum(1).to(torch.uint8)


def unpack_indices(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack_indices`: the first n indices, int64."""
    if packed.numel() != -(-n * bits // 8):
        raise SlimlmError(f"{n} indices of {bits} bits need {-(-n * bits // 8)} bytes, got {packed.numel()} (corrupt file?)")
    stream = ((packed.to(torch.int32).unsqueeze(1) >> torch.arange(8, dtype=torch.int32)) & 1).reshape(-1)
    stream = stream[: n * bits].view(n, bits).to(torch.int64)
    return (stream << torch.arange(bits)).sum(1)


@dataclass(eq=False)
class Codebook:
    """k entries of `dim` values, fp16 or int8 with a per-coordinate fp16 scale."""

    values: torch.Tensor  # (k, dim) fp16 or int8
    vscale: torch.Tensor | None = None  # (dim,) fp16, int8 only
    id: str = field(init=False)

    def __post_init__(self):
        if self.values.dim() != 2 or self.values.dtype not in (torch.float16, torch.int8):
            raise SlimlmError(f"a codebook is a (k, dim) fp16 or int8 tensor, got {tuple(self.values.shape)} "
                              f"{self.values.dtype} (corrupt file?)")
        if (self.values.dtype == torch.int8) != (self.vscale is not None):
            raise SlimlmError("an int8 codebook needs its per-coordinate scale, an fp16 one has none (corrupt file?)")
        if self.vscale is not None and tuple(self.vscale.shape) != (self.values.shape[1],):
            raise SlimlmError(f"codebook scale has shape {tuple(self.vscale.shape)}, expected ({self.values.shape[1]},)")
        h = hashlib.sha256(self.values.contiguous().view(torch.uint8).numpy().tobytes())
        if self.vscale is not None:
            h.update(self.vscale.contiguous().view(torch.uint8).numpy().tobytes())
        self.id = h.hexdigest()[:32]

    @classmethod
    def from_float(cls, c: torch.Tensor, dtype: str = "fp16") -> "Codebook":
        """Round float entries (k, dim) to the stored form: fp16, or int8 with absmax/127 per coordinate."""
        if dtype == "fp16":
            return cls(c.to(torch.float16).contiguous())
        s = (c.abs().amax(0) / 127).clamp_min(1e-8).half()  # (dim,)
        return cls(torch.round(c / s.float()).clamp(-127, 127).to(torch.int8).contiguous(), s.contiguous())

    @property
    def k(self) -> int:
        return self.values.shape[0]

    @property
    def dim(self) -> int:
        return self.values.shape[1]

    def decoded(self) -> torch.Tensor:
        """The (k, dim) float32 entries."""
        v = self.values.float()
        return v if self.vscale is None else v * self.vscale.float()

    def nbits(self) -> int:
        return stored_bits(self.values) + (stored_bits(self.vscale) if self.vscale is not None else 0)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"codebook": self.values}
        if self.vscale is not None:
            out["codebook_scale"] = self.vscale
        return out


_LIVE: "weakref.WeakValueDictionary[str, Codebook]" = weakref.WeakValueDictionary()  # id -> codebook, for loading


def remember(cb: Codebook) -> Codebook:
    """Make `cb` findable by id (the same bytes give the same id, so one object serves all)."""
    return _LIVE.setdefault(cb.id, cb)


@register_format
@dataclass(eq=False)
class VectorQuant:
    format_name: ClassVar[str] = "vq"

    out_features: int
    in_features: int
    indices: torch.Tensor  # uint8, packed b-bit indices
    scales: torch.Tensor  # fp16 (out,)
    codebook: Codebook
    owner: bool = True  # this layer stores (and counts) the codebook

    def __post_init__(self):
        cb = self.codebook
        self.bits = index_bits(cb.k)
        if self.bits > MAX_INDEX_BITS:
            raise SlimlmError(f"a codebook of {cb.k} entries needs {self.bits}-bit indices; at most {MAX_INDEX_BITS}")
        self.n_vectors = -(-self.in_features // cb.dim)
        want = -(-self.out_features * self.n_vectors * self.bits // 8)
        if self.indices.dtype != torch.uint8 or self.indices.numel() != want:
            raise SlimlmError(f"vq indices hold {self.indices.numel()} bytes, {want} expected (corrupt file?)")
        if tuple(self.scales.shape) != (self.out_features,) or self.scales.dtype != torch.float16:
            raise SlimlmError(f"vq row scales have shape {tuple(self.scales.shape)}, expected fp16 ({self.out_features},)")

    @classmethod
    def from_indices(cls, idx: torch.Tensor, scales: torch.Tensor, codebook: Codebook, in_features: int,
                     owner: bool = True):
        """Build from unpacked indices (out, V) and row scales (out,)."""
        out = idx.shape[0]
        return cls(out_features=out, in_features=in_features, indices=pack_indices(idx, index_bits(codebook.k)),
                   scales=scales.to(torch.float16).contiguous(), codebook=codebook, owner=owner)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def int_indices(self) -> torch.Tensor:
        """(out, V) int64 indices."""
        n = self.out_features * self.n_vectors
        return unpack_indices(self.indices, self.bits, n).view(self.out_features, self.n_vectors)

    def dequantize(self) -> torch.Tensor:
        vecs = self.codebook.decoded()[self.int_indices()]  # (out, V, dim)
        w = vecs.reshape(self.out_features, -1)[:, : self.in_features]
        return w * self.scales.float()[:, None]

    def nbits(self) -> int:
        n = stored_bits(self.indices) + stored_bits(self.scales)
        return n + (self.codebook.nbits() if self.owner else 0)

    def to_state(self):
        meta = dict(out_features=self.out_features, in_features=self.in_features, k=self.codebook.k,
                    dim=self.codebook.dim, codebook_id=self.codebook.id, owner=self.owner)
        tensors = {"indices": self.indices, "scales": self.scales}
        if self.owner:
            tensors.update(self.codebook.tensors())
        return meta, tensors

    @classmethod
    def from_state(cls, meta, tensors):
        try:
            if meta["owner"]:
                cb = Codebook(tensors["codebook"], tensors.get("codebook_scale"))
                if cb.id != meta["codebook_id"]:
                    raise SlimlmError(f"vq codebook {meta['codebook_id']} does not match its stored bytes; the file is corrupt")
                cb = remember(cb)
            else:
                cb = _LIVE.get(meta["codebook_id"])
                if cb is None:
                    raise SlimlmError(f"a vq layer shares codebook {meta['codebook_id']}, stored with an earlier layer "
                                      "that is not loaded; load the whole compressed model directory")
            if (cb.k, cb.dim) != (meta["k"], meta["dim"]):
                raise SlimlmError(f"vq codebook is {cb.k}×{cb.dim}, the layer expects {meta['k']}×{meta['dim']}; corrupt file")
            return cls(out_features=meta["out_features"], in_features=meta["in_features"], indices=tensors["indices"],
                       scales=tensors["scales"], codebook=cb, owner=meta["owner"])
        except (KeyError, TypeError) as e:
            raise SlimlmError(f"vq format entry is incomplete ({e}); the file is corrupt") from None
