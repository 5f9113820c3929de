"""The sequential engine: compress a model block by block with a recipe.

    plan      every block linear -> the stages that apply to it (Recipe.stages_for),
              then the output head when a stage's patterns name it (`@lm_head`, `@*`);
              each stage's `check` runs on every layer before any work starts
    calibrate only when a stage needs statistics: calibration windows run through the
              model up to block 0, then through each block in turn — after that block
              is compressed, so later blocks see the errors of earlier ones; one
              block's activations are held at a time
    compress  per layer, stages in order; each gets the weight left by the one before
              (the dequantized result) and its packed output as `stats.prev`
    head      last, after every block; a method that needs statistics gets them from the
              final norm's output on the calibration windows (the last block's outputs,
              normed). With tied embeddings the input embedding then gathers rows of the
              compressed head (`CompressedEmbedding`), so the table is stored once; the
              blocks were calibrated with the original embedding, as compression runs
              front to back. An untied model keeps its dense embedding.

The model is changed in place: compressed layers become `CompressedLinear`s.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

import slimlm
from slimlm.compress.calibration import BlockInputs, StatsCollector
from slimlm.compress.recipe import Recipe
from slimlm.data import Split, calibration_windows, resolve_text
from slimlm.errors import SlimlmError
from slimlm.formats.linear import CompressedLinear, replace_linear, tie_compressed_embedding
from slimlm.methods import Kind, LayerStats
from slimlm.models.loaded import LoadedModel


MAX_INPUT_ROWS = 8192  # input rows kept per layer for methods that need "inputs"


@dataclass(frozen=True)
class CalibrationConfig:
    """Calibration data: `n_windows` windows of `seq_len` tokens, drawn with `seed`."""

    text_file: str | None = None  # None: the built-in calibration split
    n_windows: int = 32
    seq_len: int = 512
    seed: int = 0

    def __post_init__(self):
        if self.n_windows < 1:
            raise SlimlmError(f"calibration needs at least one window, got {self.n_windows}")
        if self.seq_len < 2:
            raise SlimlmError(f"calibration windows need at least 2 tokens, got {self.seq_len}")

    @classmethod
    def from_tokens(cls, tokens: int, seq_len: int = 512, **kw) -> "CalibrationConfig":
        return cls(n_windows=max(1, tokens // seq_len), seq_len=seq_len, **kw)


def plan_layers(lm: LoadedModel, recipe: Recipe) -> dict[str, list]:
    """Layer name -> stages, with every stage's check run first (fail before any work): the
    block linears in order, then the head if a stage's patterns name it explicitly."""
    plan = {}
    names = [(n, False) for n in lm.adapter.linear_names(lm.model)] + [(lm.adapter.head_path, True)]
    for name, explicit in names:
        stages = recipe.stages_for(name, explicit)
        if not stages:
            continue
        mod = lm.model.get_submodule(name)
        if isinstance(mod, CompressedLinear):
            raise SlimlmError(f"layer {name} is already compressed; compress the original model instead")
        w = mod.weight
        if not torch.isfinite(w).all():
            raise SlimlmError(f"weight {name} holds NaN or Inf values; the model cannot be compressed")
        for st in stages:
            if st.spec.check is not None:
                try:
                    st.spec.check(st.config, tuple(w.shape))
                except SlimlmError as e:
                    raise SlimlmError(f"stage {st.to_string()!r} cannot compress {name}: {e}") from None
        plan[name] = stages
    return plan


def compress_layer(weight: torch.Tensor, stages: list, stats: LayerStats):
    """Run a layer's stages in order (composition rules in slimlm.methods.registry)."""
    packed = None
    for st in stages:
        new = st.spec.fn(weight, stats, st.config)
        if st.spec.kind is not Kind.ENCODE and packed is not None and hasattr(packed, "absorb"):
            new = packed.absorb(new)
        packed = stats.prev = new
        weight = packed.dequantize()
    return packed


def compress_head(lm: LoadedModel, stages: list, inputs: BlockInputs | None, seed: int = 0) -> None:
    """Compress the output head with `stages`; `inputs` holds the last block's outputs when a
    stage needs statistics. Tied embeddings become a `CompressedEmbedding` of the new head."""
    model, ad = lm.model, lm.adapter
    lin = model.get_submodule(ad.head_path)
    emb = model.get_submodule(ad.embed_path)
    tied = emb.weight.data_ptr() == lin.weight.data_ptr()  # one table: tie_word_embeddings
    needs = frozenset().union(*(st.spec.needs for st in stages))
    collected = {}
    if needs:
        h = inputs.hidden  # (n, T, d): the last block's outputs
        stride = -(-h.shape[0] * h.shape[1] // MAX_INPUT_ROWS) if "inputs" in needs else 0
        col = StatsCollector(model, {ad.head_path: ad.head_path}, "hessian" in needs, "act_norm" in needs, stride)
        col.remove()  # fed directly below: the head's (T, V) products are not needed
        norm = model.get_submodule(ad.norm_path)
        with torch.inference_mode():
            for x in h:
                col.add(ad.head_path, norm(x.unsqueeze(0)))
        collected = col.stats(ad.head_path)
    stats = LayerStats(name=ad.head_path, seed=seed, dtype=lin.weight.dtype, **collected)
    packed = compress_layer(lin.weight.detach().float(), stages, stats)
    method = "+".join(st.method for st in stages)
    replace_linear(model, ad.head_path, CompressedLinear(packed, bias=lin.bias, method=method))
    if tied:
        tie_compressed_embedding(model, ad.embed_path, ad.head_path, dtype=emb.weight.dtype)


def compress_model(
    lm: LoadedModel,
    recipe: Recipe | str,
    calibration: CalibrationConfig | None = None,
    progress: bool = True,
    seed: int = 0,
) -> LoadedModel:
    """Compress `lm` in place with `recipe`; returns it with a manifest describing the result."""
    if isinstance(recipe, str):
        recipe = Recipe.load(recipe)
    calibration = calibration or CalibrationConfig()
    t0 = time.perf_counter()
    plan = plan_layers(lm, recipe)
    needs = frozenset().union(*(st.spec.needs for stages in plan.values() for st in stages))
    head = lm.adapter.head_path
    head_needs = frozenset().union(*(st.spec.needs for st in plan.get(head, ())))
    blocks = lm.adapter.blocks(lm.model)
    prefix = lm.adapter.blocks_path
    inputs = None
    calib_desc = None
    if needs:
        text, calib_desc = resolve_text(calibration.text_file, Split.CALIBRATION)
        windows = calibration_windows(lm.tokenizer, text, calibration.n_windows, calibration.seq_len, calibration.seed)
        inputs = BlockInputs(lm.model, blocks[0], windows)
    bar = tqdm(total=len(blocks), desc="compress", unit="block", disable=not progress)
    for i, block in enumerate(blocks):
        bname = f"{prefix}.{i}"
        todo = {n[len(bname) + 1:]: n for n in plan if n.startswith(bname + ".")}
        block_needs = frozenset().union(*(st.spec.needs for n in todo.values() for st in plan[n]))
        collected = {}
        if todo and block_needs:
            stride = -(-inputs.hidden.shape[0] * inputs.hidden.shape[1] // MAX_INPUT_ROWS) if "inputs" in block_needs else 0
            col = StatsCollector(block, todo, "hessian" in block_needs, "act_norm" in block_needs, stride)
            try:
                inputs.run(block)
            finally:
                col.remove()
            collected = {full: col.stats(full) for full in todo.values()}
        for local, full in todo.items():
            lin = block.get_submodule(local)
            stats = LayerStats(name=full, seed=seed, dtype=lin.weight.dtype, **collected.get(full, {}))
            packed = compress_layer(lin.weight.detach().float(), plan[full], stats)
            method = "+".join(st.method for st in plan[full])
            replace_linear(block, local, CompressedLinear(packed, bias=lin.bias, method=method))
        if inputs is not None and (i + 1 < len(blocks) or head_needs):
            inputs.advance(block)
        bar.update(1)
    bar.close()
    if head in plan:
        compress_head(lm, plan[head], inputs if head_needs else None, seed)
    lm.kind = "slimlm"
    lm.manifest = dict(
        slimlm_version=slimlm.__version__,
        source=lm.source if not lm.manifest else lm.manifest.get("source", lm.source),
        recipe=recipe.to_string(),
        dtype=str(lm.dtype).removeprefix("torch."),
        recipe_data=recipe.to_dict(),
        calibration=None if not needs else dict(text=calib_desc, n_windows=calibration.n_windows,
                                                seq_len=calibration.seq_len, seed=calibration.seed),
        compress_seconds=round(time.perf_counter() - t0, 2),
    )
    return lm
