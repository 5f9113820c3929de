"""lossless: entropy coding that changes no weight (DFloat11, Zhang et al. 2025, and beyond).

On its own (`lossless`) it codes each block linear in the source dtype: the exponent
field is Huffman-coded and sign+mantissa stored raw (`LosslessFloat`), ~11 bits per
weight for BF16 with logits identical bit for bit. After a quantizer
(`rtn:bits=4,group=64+lossless`, `gptq:...+lossless`) it Huffman-codes that stage's
integer codes instead (`LosslessInt`), whose dequantized weights equal the quantizer's.

Options: `chunk` = symbols per independently decodable chunk (default 256): smaller
chunks decode with more parallelism and cost 16 bits of chunk table each.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from slimlm.errors import SlimlmError
from slimlm.formats import _entropy
from slimlm.formats.intq import IntQuant
from slimlm.formats.lossless import FLOAT_FIELDS, LosslessFloat, LosslessInt
from slimlm.methods.registry import Kind, register


@dataclass(frozen=True)
class LosslessConfig:
    chunk: int = 256

    def __post_init__(self):
        if not 16 <= self.chunk <= _entropy.MAX_CHUNK:
            raise SlimlmError(f"chunk must be in 16..{_entropy.MAX_CHUNK} symbols, got {self.chunk}")


@register("lossless", LosslessConfig, kind=Kind.ENCODE)
def lossless(weight, stats, config: LosslessConfig):
    """Entropy coding: of the float weights (exponents), or of the previous stage's integer codes."""
    prev = stats.prev
    if isinstance(prev, IntQuant):
        return LosslessInt.encode(prev, chunk=config.chunk)
    if prev is not None:
        raise SlimlmError(f"lossless coding after a stage applies to integer codes (the 'int' format); "
                          f"layer {stats.name} holds the {prev.format_name!r} format — put lossless after rtn or gptq")
    dtype = str(stats.dtype).removeprefix("torch.")
    if dtype not in FLOAT_FIELDS:
        raise SlimlmError(f"layer {stats.name} has dtype {dtype}; lossless coding takes {', '.join(FLOAT_FIELDS)}")
    return LosslessFloat.encode(_native(weight, stats.dtype, stats.name), chunk=config.chunk)


def _native(weight: torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
    """The float32 `weight` back in its source dtype, refused unless that is exact (the engine
    widens bf16/fp16 weights exactly; anything else means the weights were changed upstream)."""
    weight = weight.float().contiguous()
    if dtype == torch.float32:
        return weight
    if dtype == torch.bfloat16:  # bf16 is the top half of fp32: exact iff the low 16 bits are 0
        bits = weight.numpy().view(np.uint32)
        exact = not (bits & 0xFFFF).any()
        native = torch.from_numpy((bits >> 16).astype(np.uint16).view(np.int16)).view(torch.bfloat16)
    else:
        native = weight.to(dtype)
        exact = torch.equal(native.float(), weight)
    if not exact:
        raise SlimlmError(f"layer {name}: the weight is not exactly representable in {str(dtype).removeprefix('torch.')}; "
                          "lossless coding needs the source weights unchanged")
    return native
