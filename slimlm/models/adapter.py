"""Architecture adapter: where the decoder blocks and their linear layers live.

slimlm compresses decoder blocks one by one, so it needs to know, for a model class,
the ordered list of blocks and each block's linear layers (in execution order: the
attention projections before the MLP). This file is the only place that knows
module paths; everything else asks the adapter.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from slimlm.errors import SlimlmError

# model_type -> linear layers of one decoder block, in the order they run.
_LLAMA_LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
SUPPORTED = {
    "llama": _LLAMA_LINEARS,
    "mistral": _LLAMA_LINEARS,
    "qwen2": _LLAMA_LINEARS,
    "qwen3": _LLAMA_LINEARS,
}


@dataclass(frozen=True)
class Adapter:
    """Module paths of one decoder-only model of the Llama family."""

    model_type: str
    block_linears: tuple[str, ...]
    blocks_path: str = "model.layers"
    embed_path: str = "model.embed_tokens"
    norm_path: str = "model.norm"  # the final norm; its output is the head's input
    head_path: str = "lm_head"

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return list(model.get_submodule(self.blocks_path))

    def block_name(self, i: int) -> str:
        return f"{self.blocks_path}.{i}"

    def linear_names(self, model: nn.Module) -> list[str]:
        """Full names of every block linear, block by block, in execution order."""
        n = len(self.blocks(model))
        return [f"{self.block_name(i)}.{lin}" for i in range(n) for lin in self.block_linears]

    def n_blocks(self, model: nn.Module) -> int:
        return len(self.blocks(model))


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter of a transformers causal LM, or a clear refusal."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED:
        raise SlimlmError(
            f"model type {model_type!r} is not supported; slimlm handles the Llama family "
            f"({', '.join(sorted(SUPPORTED))})"
        )
    return Adapter(model_type=model_type, block_linears=SUPPORTED[model_type])
