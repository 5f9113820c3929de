"""`CompressedLinear`: the nn.Module that holds one packed weight in place of an nn.Linear.

The forward pass computes with `packed.dequantize()` — the format's reference — cached
after the first call so repeated forwards cost one matmul, unless the format sets
`cache_decoded = False` (decode just before use, e.g. block-level decompression of an
entropy-coded format) or the module is built with `cache=False`; an uncached format that
offers `dequantize_as(dtype)` is then decoded straight into the activations' dtype. The packed
tensors are not registered as parameters or buffers: they are saved by
`slimlm.formats.store`, and the module's `state_dict` holds only the bias.

Kernel choice (`Kernel`, explicit, the reference always available):
- `reference`: the path above, dequantize (cached) + matmul;
- `cpu`: the C kernels of `slimlm.kernels` compute straight from the packed codes for
  every batch size (nothing dequantized is cached), for formats they serve;
- `auto`: the C kernel for small batches (decoding, ≤ 16 rows) when one serves the
  format and the extension is built, the reference path otherwise.
Layers are built with `reference` (bit-for-bit what compression and evaluation
measured). The lean runtime (`slimlm.runtime.lean`) does not call these modules for the
formats its kernels serve: it builds its own kernels from `packed` and runs every batch
size through them, so no dequantized copy is ever cached at run time.
A format no kernel serves, or a machine where the extension did not build, always runs
the reference path (the latter with one warning).

`CompressedEmbedding` is the input embedding of a model whose tied output head is a
`CompressedLinear`: it holds no weights of its own and gathers rows of the head's
dequantized weight, so the table is stored once, packed (`tie_compressed_embedding`).
An untied model keeps its dense embedding when its head is compressed.
"""

from __future__ import annotations

from enum import Enum

import torch
import torch.nn.functional as F
from torch import nn

from slimlm.formats.base import Packed, bits_per_weight
from slimlm.kernels.intq import SMALL_BATCH  # rows at or below which `auto` uses the matrix-vector kernel


class Kernel(str, Enum):
    REFERENCE = "reference"
    CPU = "cpu"
    AUTO = "auto"




class CompressedLinear(nn.Module):
    def __init__(self, packed: Packed, bias: torch.Tensor | None = None, method: str = "", cache: bool | None = None,
                 kernel: Kernel | str = Kernel.REFERENCE):
        super().__init__()
        self.packed = packed
        self.kernel = Kernel(kernel)
        self._op = None  # the C operator, built on first use (repacking costs a pass over the codes)
        self._op_tried = False
        self.out_features, self.in_features = packed.shape
        self.method = method
        self.cache = getattr(packed, "cache_decoded", True) if cache is None else cache
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self._weight: torch.Tensor | None = None

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized (out, in) float32 weight."""
        if self._weight is not None:
            return self._weight
        with torch.inference_mode(False):  # a cache filled under inference mode must serve forwards with autograd on
            w = self.packed.dequantize()
        if self.cache:
            self._weight = w
        return w

    def drop_cache(self) -> None:
        self._weight = None

    def set_kernel(self, kernel: Kernel | str) -> "CompressedLinear":
        self.kernel = Kernel(kernel)
        return self

    def kernel_op(self):
        """The C operator x -> x @ W.T serving this layer's format, or None (reference path)."""
        if self.kernel is Kernel.REFERENCE:
            return None
        if not self._op_tried:
            from slimlm.kernels import kernel_for

            self._op, self._op_tried = kernel_for(self.packed), True
        return self._op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not Kernel.REFERENCE:
            rows = x.numel() // self.in_features
            op = self.kernel_op() if self.kernel is Kernel.CPU or rows <= SMALL_BATCH else None
            if op is not None:
                y = op(x)
                return y if self.bias is None else y + self.bias.to(y.dtype)
        as_dtype = getattr(self.packed, "dequantize_as", None)
        if self._weight is None and not self.cache and as_dtype is not None:
            w = as_dtype(x.dtype)  # decoded straight into the forward's dtype, no float32 copy
        else:
            w = self.weight
        return F.linear(x, w if w.dtype == x.dtype else w.to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        p = self.packed
        return (f"in={self.in_features}, out={self.out_features}, format={p.format_name}, "
                f"bpw={bits_per_weight(p):.3f}, kernel={self.kernel.value}")


class CompressedEmbedding(nn.Module):
    """Token ids -> rows of a compressed head's weight, (..., d) in `dtype` (the source
    embedding's dtype, as an nn.Embedding would return them).

    Rows come from the head's cached dequantized weight when there is one; otherwise from
    the format's `dequantize_rows(idx)` when it offers one (equal to `dequantize()[idx]`),
    otherwise from the head's `weight`. The head is not registered as a submodule: it
    lives at its own path, and module listings and state dicts must see it once, there.
    """

    def __init__(self, head: CompressedLinear, dtype: torch.dtype = torch.float32):
        super().__init__()
        object.__setattr__(self, "head", head)  # a plain reference, not a child module
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features
        self.dtype = dtype

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized (V, d) float32 table: the head's weight."""
        return self.head.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        head = self.head
        rows_of = getattr(head.packed, "dequantize_rows", None)
        if head._weight is None and rows_of is not None:
            flat = ids.reshape(-1)
            uniq, inv = torch.unique(flat, return_inverse=True)  # each row decoded once
            rows = rows_of(uniq)[inv]
        else:
            rows = head.weight[ids.reshape(-1)]
        return rows.to(self.dtype).view(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rows of the compressed head"


def tie_compressed_embedding(model: nn.Module, embed_path: str, head_path: str,
                             dtype: torch.dtype | None = None) -> CompressedEmbedding:
    """Make the embedding at `embed_path` read its rows from the CompressedLinear at
    `head_path` (tied embeddings); `dtype` defaults to the embedding's current dtype.

    transformers' `tie_weights()` (run by post_init, resizing, loading) would set
    `lm_head.weight` to `embed_tokens.weight`, neither of which is a parameter any more;
    the tie now lives in the module, so that pair leaves the model's tie mapping."""
    head = model.get_submodule(head_path)
    old = model.get_submodule(embed_path)
    if dtype is None:
        dtype = old.dtype if isinstance(old, CompressedEmbedding) else old.weight.dtype
    emb = CompressedEmbedding(head, dtype)
    replace_linear(model, embed_path, emb)
    keys = {f"{head_path}.weight", f"{embed_path}.weight"}
    for attr in ("_tied_weights_keys", "all_tied_weights_keys"):
        mapping = getattr(model, attr, None)
        if mapping:
            setattr(model, attr, {k: v for k, v in mapping.items() if k not in keys and v not in keys})
    return emb


def replace_linear(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put `new` at module path `name`; returns the module it replaced."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


def set_kernel(model: nn.Module, kernel: Kernel | str) -> int:
    """Set the kernel choice of every CompressedLinear in `model`; returns how many there are."""
    mods = [m for m in model.modules() if isinstance(m, CompressedLinear)]
    for m in mods:
        m.set_kernel(kernel)
    return len(mods)
