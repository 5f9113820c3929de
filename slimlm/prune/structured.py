"""Structured pruning: remove whole FFN channels, attention heads (respecting grouped KV
heads) and decoder blocks, and rebuild a smaller *dense* model that plain transformers loads.

transformers' Llama-family configs hold one `intermediate_size`, one head count and one
KV-head count for every block, so the widths removed are the same in every block (each
block chooses *which* channels and heads by its own calibration importance, see
importance.py); whole blocks are removed by block influence:

  ffn        share of FFN channels removed from every block (the kept width is rounded to
             a multiple of `multiple`, so group sizes such as 32 or 64 still divide it)
  heads      query heads removed from every KV group (9 query / 3 KV heads, heads=1 → 6 / 3):
             every group keeps the same number of query heads, so the grouping stays valid
  kv_groups  whole KV groups (a KV head with all its query heads) removed from every block
  blocks     whole decoder blocks removed, the lowest block influence first
  target     instead of `ffn`: keep at most this share of the block-linear weights, the FFN
             width being what is left once heads and blocks are chosen

The result is rebuilt from its new config with `from_config` and the sliced state dict
loaded strictly, so it is exactly the model transformers builds from the saved directory;
embeddings, norms and the (tied) output head are untouched.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch

from slimlm.errors import SlimlmError
from slimlm.models.loaded import LoadedModel
from slimlm.prune.importance import BlockImportance

_NEEDED = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}


@dataclass(frozen=True)
class StructuredConfig:
    ffn: float = 0.0
    heads: int = 0
    kv_groups: int = 0
    blocks: int = 0
    multiple: int = 32
    target: float | None = None

    def __post_init__(self):
        if not 0 <= self.ffn < 1:
            raise SlimlmError(f"--ffn is the share of FFN channels to remove, in [0, 1); got {self.ffn}")
        if self.heads < 0 or self.kv_groups < 0 or self.blocks < 0:
            raise SlimlmError("--heads, --kv-groups and --blocks count what to remove; they cannot be negative")
        if self.multiple < 1:
            raise SlimlmError(f"--multiple must be at least 1, got {self.multiple}")
        if self.target is not None and not 0 < self.target <= 1:
            raise SlimlmError(f"--target is the share of block-linear weights to keep, in (0, 1]; got {self.target}")
        if self.target is not None and self.ffn:
            raise SlimlmError("give either --ffn or --target (which sets the FFN width), not both")


@dataclass(frozen=True)
class Shape:
    """The per-block widths of a Llama-family model."""

    hidden: int
    inter: int
    q_heads: int
    kv_heads: int
    head_dim: int
    n_blocks: int

    @classmethod
    def of(cls, config) -> "Shape":
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(config.hidden_size, config.intermediate_size, config.num_attention_heads,
                   config.num_key_value_heads, head_dim, config.num_hidden_layers)

    def block_weights(self) -> int:
        attn = self.hidden * self.head_dim * (2 * self.q_heads + 2 * self.kv_heads)  # q, o; k, v
        return attn + 3 * self.hidden * self.inter

    def linear_weights(self) -> int:
        return self.n_blocks * self.block_weights()


@dataclass
class PrunePlan:
    """What each kept block keeps (indices in the original model, sorted)."""

    shape: Shape  # the pruned widths
    blocks: list[int]  # kept blocks
    channels: list[torch.Tensor] = field(default_factory=list)  # per kept block, FFN channels
    q_heads: list[torch.Tensor] = field(default_factory=list)  # per kept block, query heads, by group
    kv_heads: list[torch.Tensor] = field(default_factory=list)  # per kept block, KV heads

    def summary(self, before: Shape) -> dict:
        return dict(blocks_kept=self.blocks, n_blocks=[before.n_blocks, self.shape.n_blocks],
                    intermediate_size=[before.inter, self.shape.inter], q_heads=[before.q_heads, self.shape.q_heads],
                    kv_heads=[before.kv_heads, self.shape.kv_heads],
                    block_linear_weights=[before.linear_weights(), self.shape.linear_weights()])


def _round_width(width: float, multiple: int, full: int) -> int:
    w = int(round(width / multiple)) * multiple
    return min(full, max(multiple if multiple <= full else full, w))


def pruned_shape(before: Shape, cfg: StructuredConfig) -> Shape:
    """The widths after pruning with `cfg` (the FFN width solved from `target` when given)."""
    group = before.q_heads // before.kv_heads
    if cfg.heads >= group:
        raise SlimlmError(f"--heads {cfg.heads} would empty every KV group (each holds {group} query heads)")
    if cfg.kv_groups >= before.kv_heads:
        raise SlimlmError(f"--kv-groups {cfg.kv_groups} would remove every KV head (the model has {before.kv_heads})")
    if cfg.blocks >= before.n_blocks:
        raise SlimlmError(f"--blocks {cfg.blocks} would remove every block (the model has {before.n_blocks})")
    kv = before.kv_heads - cfg.kv_groups
    s = Shape(before.hidden, before.inter, kv * (group - cfg.heads), kv, before.head_dim, before.n_blocks - cfg.blocks)
    if cfg.target is None:
        inter = _round_width(before.inter * (1 - cfg.ffn), cfg.multiple, before.inter)
    else:
        budget = cfg.target * before.linear_weights() / s.n_blocks  # weights allowed per kept block
        attn = Shape(s.hidden, 0, s.q_heads, s.kv_heads, s.head_dim, 1).block_weights()
        inter = math.floor((budget - attn) / (3 * s.hidden) / cfg.multiple) * cfg.multiple
        if inter < cfg.multiple:
            raise SlimlmError(f"--target {cfg.target} cannot be reached with these heads and blocks; "
                              "remove more blocks or heads, or raise the target")
        inter = min(inter, before.inter)
    return Shape(s.hidden, inter, s.q_heads, s.kv_heads, s.head_dim, s.n_blocks)


def make_plan(before: Shape, cfg: StructuredConfig, importance: list[BlockImportance]) -> PrunePlan:
    """Choose, per block, the most important channels and heads, and the blocks to keep."""
    after = pruned_shape(before, cfg)
    influence = torch.tensor([b.influence for b in importance])
    blocks = sorted(torch.argsort(influence, descending=True, stable=True)[: after.n_blocks].tolist())
    plan = PrunePlan(shape=after, blocks=blocks)
    group = before.q_heads // before.kv_heads
    keep_per_group = after.q_heads // after.kv_heads
    for i in blocks:
        imp = importance[i]
        plan.channels.append(imp.channels.topk(after.inter).indices.sort().values)
        per_group = imp.heads.view(before.kv_heads, group)  # (kv, group): q head g·group + j uses KV head g
        kv = per_group.sum(1).topk(after.kv_heads).indices.sort().values
        q = [g * group + per_group[g].topk(keep_per_group).indices.sort().values for g in kv.tolist()]
        plan.kv_heads.append(kv)
        plan.q_heads.append(torch.cat(q))
    return plan


def _head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (heads.unsqueeze(1) * head_dim + torch.arange(head_dim)).reshape(-1)


def _slice_block(params: dict[str, torch.Tensor], plan: PrunePlan, k: int, head_dim: int) -> dict[str, torch.Tensor]:
    """The state of one kept block (keys relative to the block) with its heads and channels cut."""
    q_rows = _head_rows(plan.q_heads[k], head_dim)
    kv_rows = _head_rows(plan.kv_heads[k], head_dim)
    ch = plan.channels[k]
    rows = {"self_attn.q_proj": q_rows, "self_attn.k_proj": kv_rows, "self_attn.v_proj": kv_rows,
            "mlp.gate_proj": ch, "mlp.up_proj": ch}
    cols = {"self_attn.o_proj": q_rows, "mlp.down_proj": ch}
    out = {}
    for key, t in params.items():
        mod, _, kind = key.rpartition(".")
        if mod in rows:
            t = t[rows[mod]]  # weight (out, in) rows or bias (out,)
        elif mod in cols and kind == "weight":
            t = t[:, cols[mod]]
        out[key] = t.contiguous()
    return out


def apply_plan(lm: LoadedModel, plan: PrunePlan) -> LoadedModel:
    """A new, smaller dense model: `lm` with the plan's blocks, heads and channels only."""
    from transformers import AutoModelForCausalLM

    if not _NEEDED <= set(lm.adapter.block_linears):
        raise SlimlmError(f"structured pruning needs the Llama layout of linear layers; {lm.config.model_type} differs")
    d = lm.model.config.to_dict()
    d.pop("quantization_config", None)
    s = plan.shape
    d.update(intermediate_size=s.inter, num_attention_heads=s.q_heads, num_key_value_heads=s.kv_heads,
             head_dim=s.head_dim, num_hidden_layers=s.n_blocks)
    if isinstance(d.get("layer_types"), list):
        d["layer_types"] = [d["layer_types"][i] for i in plan.blocks]
    config = type(lm.model.config).from_dict(d)
    prefix = lm.adapter.blocks_path + "."
    state, per_block = {}, {}
    for key, t in lm.model.state_dict().items():
        if key.startswith(prefix):
            i, _, rest = key[len(prefix):].partition(".")
            per_block.setdefault(int(i), {})[rest] = t
        else:
            state[key] = t
    for k, i in enumerate(plan.blocks):
        for rest, t in _slice_block(per_block[i], plan, k, s.head_dim).items():
            state[f"{prefix}{k}.{rest}"] = t
    model = AutoModelForCausalLM.from_config(config, dtype=lm.dtype, attn_implementation="sdpa")
    model.load_state_dict(state, strict=True)
    model.tie_weights()
    return LoadedModel(model=model, tokenizer=lm.tokenizer, source=lm.source, kind="hf")


def prune_structured(lm: LoadedModel, cfg: StructuredConfig, windows: torch.Tensor) -> tuple[LoadedModel, dict]:
    """Measure importance on calibration `windows` (n, T), choose, and rebuild the model.
    Returns (the pruned model, a summary of what was kept)."""
    from slimlm.formats.linear import CompressedLinear
    from slimlm.prune.importance import measure_importance

    if any(isinstance(m, CompressedLinear) for m in lm.model.modules()):
        raise SlimlmError(f"{lm.source} is already compressed; prune the original model, then compress the result")
    before = Shape.of(lm.model.config)
    pruned_shape(before, cfg)  # refuse impossible settings before the calibration pass
    importance = measure_importance(lm, windows, before.head_dim)
    plan = make_plan(before, cfg, importance)
    out = apply_plan(lm, plan)
    info = plan.summary(before)
    info["block_influence"] = [round(b.influence, 5) for b in importance]
    return out, info


def save_pruned(lm: LoadedModel, dest, info: dict, overwrite: bool = False):
    """Write the pruned model as a plain HF directory (config.json, model.safetensors,
    tokenizer) plus `slimlm-prune.json` (what was kept), atomically."""
    import json
    from pathlib import Path

    from slimlm.atomic import atomic_directory
    from slimlm.models.sources import save_hf_dir

    dest = Path(dest)
    with atomic_directory(dest, overwrite) as tmp:
        save_hf_dir(lm.model, lm.tokenizer, tmp)
        (tmp / "slimlm-prune.json").write_text(json.dumps(info, indent=2))
    return dest
