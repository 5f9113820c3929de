"""Size accounting: bits per weight of the block linears and bytes of the whole model.

`bpw` is counted over the decoder blocks' linear layers — the layers a recipe
compresses by default: a compressed layer counts its format's exact `nbits()`, an
uncompressed one its stored element size (32 bits in fp32). The output head is not in
it (a recipe compresses it only when it names it); `head_bpw` gives its bits per weight
when it is compressed (None when dense), and its bytes are in `size_bytes` either way.
`size_bytes` is the saved directory's size when the model came from disk, else what
saving it would write (packed bits plus every remaining tensor, shared tensors once —
a tied, compressed head's table once, packed).
"""

from __future__ import annotations

from pathlib import Path

from slimlm.formats.linear import CompressedLinear


def dir_bytes(path: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def linear_bits(lm) -> tuple[int, int]:
    """(stored bits, weights) over every block linear of `lm`."""
    bits = numel = 0
    for name in lm.adapter.linear_names(lm.model):
        mod = lm.model.get_submodule(name)
        if isinstance(mod, CompressedLinear):
            bits += mod.packed.nbits()
            numel += mod.out_features * mod.in_features
        else:
            bits += mod.weight.numel() * mod.weight.element_size() * 8
            numel += mod.weight.numel()
    return bits, numel


def model_bytes(lm) -> int:
    """Bytes of every stored tensor: packed layers exactly, other tensors once each."""
    seen, total = set(), 0
    for mod in lm.model.modules():
        if isinstance(mod, CompressedLinear):
            total += (mod.packed.nbits() + 7) // 8
    for t in lm.model.state_dict().values():
        key = (t.untyped_storage().data_ptr(), t.dtype, tuple(t.shape))
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def head_bpw(lm) -> float | None:
    """Bits per weight of the output head when it is compressed, else None."""
    head = lm.model.get_submodule(lm.adapter.head_path)
    if not isinstance(head, CompressedLinear):
        return None
    return head.packed.nbits() / (head.out_features * head.in_features)


def size_report(lm, path: str | Path | None = None) -> dict:
    bits, numel = linear_bits(lm)
    size = dir_bytes(path) if path is not None and Path(path).is_dir() else model_bytes(lm)
    return {"bpw": bits / numel, "linear_bits": bits, "linear_weights": numel, "head_bpw": head_bpw(lm),
            "size_bytes": size}
