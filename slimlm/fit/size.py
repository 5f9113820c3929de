"""What a fit choice weighs on disk: the saved directory's bytes, predicted before compressing.

    size = rest + Σ_ℓ ⌈bits(ℓ, c_ℓ) / 8⌉ + recipe          ℓ over the layers fit chooses formats for

`rest` is what no choice changes: every tensor besides those layers' weights, the
tokenizer and config files (written as the store writes them), the safetensors headers
(about HEADER_BYTES_PER_TENSOR an entry) and the manifest's entry of each compressed
layer (about LAYER_BYTES, with the layer's packed-tensor headers). The layers are the
block linears and — when fit compresses it — the output head, whose dense option counts
its stored table. With tied embeddings that table is also the input embedding: it is in
`rest` when the head is not fit's to choose, and in the head's bits when it is (dense:
one fp32 table; compressed: the packed head, which the embedding then reads), so it is
never counted twice.

The recipe is written into the manifest twice (its line and its data). Before the choice
is known the budget sets aside RECIPE_BYTES_PER_LAYER for each layer (a recipe names a
layer at most once); the prediction for a chosen recipe counts its exact bytes.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from slimlm.compress.recipe import Recipe
from slimlm.eval.size import dir_bytes, model_bytes

LAYER_BYTES = 640  # a compressed layer's manifest entry (~330) and its packed tensors' headers (~290)
HEADER_BYTES_PER_TENSOR = 100  # a safetensors header entry: name, dtype, shape, offsets
BASE_BYTES = 512  # the manifest's fixed fields, the safetensors files' own headers
RECIPE_BYTES_PER_LAYER = 120  # set aside per layer for the recipe: a name in its line and in its data
RECIPE_BASE_BYTES = 1024  # and for its stages (method, options), with the indentation


def recipe_bytes(recipe: Recipe) -> int:
    """Bytes `recipe` adds to slimlm.json: its line, and its data indented one level deeper."""
    data = json.dumps(recipe.to_dict(), indent=2)
    return len(json.dumps(recipe.to_string())) + len(data) + 2 * data.count("\n")


def _weight_bytes(lm, name: str) -> int:
    w = lm.model.get_submodule(name).weight
    return w.numel() * w.element_size()


@dataclass(frozen=True)
class SizeModel:
    """The saved size of `lm` as a function of the formats fit chooses."""

    rest_bytes: int  # besides the chosen layers' weights and the recipe (see the module docstring)
    recipe_allowance: int  # bytes set aside for the recipe before it is known
    head: str | None  # the output head when fit chooses its format
    head_dense_bits: int  # the head's stored table, dense (the tied embedding's too)
    tied: bool  # the input embedding is the head's table

    @classmethod
    def of(cls, lm, head: bool) -> SizeModel:
        """The size model of the uncompressed `lm`; `head`: fit chooses the head's format."""
        from slimlm.models import save_hf_dir

        ad = lm.adapter
        names = ad.linear_names(lm.model)
        emb, out = (lm.model.get_submodule(p).weight for p in (ad.embed_path, ad.head_path))
        tied = emb.data_ptr() == out.data_ptr()
        head_bytes = _weight_bytes(lm, ad.head_path)  # once, tied or not
        with tempfile.TemporaryDirectory() as d:
            save_hf_dir(lm.model, lm.tokenizer, Path(d), save_model=lambda *a: None)  # config and tokenizer only
            files = dir_bytes(d)
        n_dense = len({t.untyped_storage().data_ptr() for t in lm.model.state_dict().values()}) - len(names)
        tensors = model_bytes(lm) - sum(_weight_bytes(lm, n) for n in names) - (head_bytes if head else 0)
        n_layers = len(names) + head
        rest = tensors + files + BASE_BYTES + HEADER_BYTES_PER_TENSOR * n_dense + LAYER_BYTES * n_layers
        return cls(rest_bytes=rest, recipe_allowance=RECIPE_BASE_BYTES + RECIPE_BYTES_PER_LAYER * n_layers,
                   head=ad.head_path if head else None, head_dense_bits=head_bytes * 8, tied=tied)

    def predicted_bytes(self, bits: int, recipe: Recipe | None = None) -> int:
        """The directory's bytes when the chosen layers store `bits` in all under `recipe`
        (None: the allowance set aside for it)."""
        return self.rest_bytes + -(-bits // 8) + (self.recipe_allowance if recipe is None else recipe_bytes(recipe))

    def room_bits(self, max_bytes: int) -> int:
        """Bits the chosen layers may store in all within `max_bytes`, whatever the recipe."""
        return (max_bytes - self.rest_bytes - self.recipe_allowance) * 8
