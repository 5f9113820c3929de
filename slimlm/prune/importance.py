"""Calibration-based importance of the structures a decoder block can lose.

One pass of calibration windows through the (unpruned) model, block by block (the
engine's `BlockInputs`: windows independent, no cache), measures per block:

  FFN channel j    E[h_j²] · ‖W_down[:, j]‖²   h = act(gate(x)) · up(x), the down_proj input:
                   the expected energy channel j adds to the block's output (cross terms
                   ignored) — Wanda's |w|·‖x‖ summed over a whole column of down_proj
  query head q     Σ_{d in q} E[a_d²] · ‖W_o[:, d]‖²   a = attention output, the o_proj input
  block            1 − mean cos(x_in, x_out) over tokens: ShortGPT's block influence; a
                   block that barely turns its input is the cheapest to drop
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from slimlm.compress.calibration import BlockInputs, StatsCollector


@dataclass
class BlockImportance:
    channels: torch.Tensor  # (intermediate,) FFN channel scores
    heads: torch.Tensor  # (n_q_heads,) query head scores
    influence: float  # 1 − mean cosine between the block's input and output


def channel_scores(act_norm: torch.Tensor, down_weight: torch.Tensor) -> torch.Tensor:
    """(inter,) E[h_j²] · ‖W_down[:, j]‖² from down_proj's input second moment and weight (hidden, inter)."""
    return act_norm.float() * down_weight.float().pow(2).sum(0)


def head_scores(act_norm: torch.Tensor, o_weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(heads,) per query head: Σ over its dims of E[a_d²] · ‖W_o[:, d]‖²."""
    per_dim = act_norm.float() * o_weight.float().pow(2).sum(0)  # (heads · head_dim,)
    return per_dim.view(-1, head_dim).sum(1)


def block_influence(x_in: torch.Tensor, x_out: torch.Tensor) -> float:
    """1 − mean over tokens of cos(x_in, x_out); hidden states (n, T, d)."""
    return float(1 - F.cosine_similarity(x_in.float(), x_out.float(), dim=-1).mean())


@torch.inference_mode()
def measure_importance(lm, windows: torch.Tensor, head_dim: int) -> list[BlockImportance]:
    """Importance of every block's FFN channels, query heads and the block itself."""
    blocks = lm.adapter.blocks(lm.model)
    inputs = BlockInputs(lm.model, blocks[0], windows)
    out = []
    for block in blocks:
        names = {"mlp.down_proj": "down", "self_attn.o_proj": "o"}
        col = StatsCollector(block, names, hessian=False, act_norm=True)
        try:
            hidden = inputs.run(block)
        finally:
            col.remove()
        down = col.stats("down")["act_norm"]
        o = col.stats("o")["act_norm"]
        out.append(BlockImportance(
            channels=channel_scores(down, block.mlp.down_proj.weight),
            heads=head_scores(o, block.self_attn.o_proj.weight, head_dim),
            influence=block_influence(inputs.hidden, hidden),
        ))
        inputs.hidden = hidden  # the next block's inputs
    return out
