"""Self-speculative decoding: a more compressed copy of the model drafts, the model verifies.

Each round the draft proposes `k` tokens one by one (cheap: fewer bits read per token);
the target scores all of them in one batched forward of k+1 positions (the previous
round's extra token and the k drafted ones, so the target runs once per round); the longest
acceptable prefix is kept, plus one token from the target (a correction, or a bonus when
all k were accepted). Acceptance follows Leviathan et al. / Chen et al. 2023: draft token
x with draft probability q(x) and target probability p(x) is kept with probability
min(1, p(x)/q(x)); on the first rejection the token is drawn from norm(max(0, p − q)).
The output is then distributed exactly as sampling from the target alone; in greedy mode
(temperature 0) a draft token is kept iff it is the target's argmax, so the text equals
plain greedy decoding of the target (up to float rounding between a batched and a
one-token forward, which can only matter at an exact tie of two logits).

`draft_model(model, bits=2)` builds the draft from the target's own weights (RTN of the
block linears, no calibration), sharing embeddings and norms.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from slimlm.errors import SlimlmError
from slimlm.runtime.generate import GenerationConfig, probs, sample_next
from slimlm.runtime.lean import LeanModel, RuntimeConfig, greedy


@dataclass
class SpecStats:
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    emitted: int = 0
    per_round: list[int] = field(default_factory=list)

    @property
    def acceptance(self) -> float:
        """Share of drafted tokens the target accepted."""
        return self.accepted / self.drafted if self.drafted else 0.0


def draft_model(model: nn.Module, bits: int = 2, group: int = 32) -> nn.Module:
    """A copy of `model` whose block linears are RTN-quantized to `bits` (embeddings, norms and
    head shared with the target, not copied)."""
    from slimlm.formats.linear import CompressedLinear, replace_linear
    from slimlm.methods.affine import check_group, quantize_rtn
    from slimlm.models.adapter import adapter_for

    if not 2 <= bits <= 8:
        raise SlimlmError(f"draft bits must be in 2..8, got {bits}")
    memo = {id(p): p for p in model.parameters()}  # share every tensor; only the linears are replaced
    memo.update({id(b): b for b in model.buffers()})
    memo.update({id(m): m for m in model.modules() if isinstance(m, CompressedLinear)})  # a compressed head too
    draft = copy.deepcopy(model, memo)
    for name in adapter_for(draft).linear_names(draft):
        lin = draft.get_submodule(name)
        w = lin.packed.dequantize() if isinstance(lin, CompressedLinear) else lin.weight.detach().float()
        p = quantize_rtn(w, bits, check_group(group if group <= w.shape[1] else 0, w.shape[1]))
        replace_linear(draft, name, CompressedLinear(p, bias=lin.bias, method="draft"))
    return draft


@torch.inference_mode()
def speculative_ids(target: LeanModel, draft: LeanModel, prompt_ids: list[int], cfg: GenerationConfig, k: int = 4,
                    eos_ids=(), stats: SpecStats | None = None, on_prefill=None) -> Iterator[int]:
    """Yield the target's tokens, `k` drafted per round; `stats` (if given) collects acceptance;
    `on_prefill` (if given) is called once both models have run the prompt."""
    if k < 1:
        raise SlimlmError(f"draft length k must be at least 1, got {k}")
    stats = stats if stats is not None else SpecStats()
    gen = torch.Generator().manual_seed(cfg.seed)
    is_greedy = cfg.temperature == 0
    target.reset()
    draft.reset()
    p_last = target.prefill(list(prompt_ids))  # target logits for the next position
    d_logits = draft.prefill(list(prompt_ids))
    if on_prefill is not None:
        on_prefill()
    committed = len(prompt_ids)  # tokens fixed so far (prompt and output)
    pending: list[int] = []  # committed tokens the target has not run yet: last round's extra token
    out: list[int] = []
    while len(out) < cfg.max_new_tokens:
        n = min(k, cfg.max_new_tokens - len(out))
        # draft n tokens; q[i] is the draft distribution the i-th was drawn from
        toks, qs = [], []
        for i in range(n):
            if is_greedy:
                t = greedy(d_logits)
            else:
                q = probs(d_logits, cfg)
                t = int(torch.multinomial(q, 1, generator=gen))
                qs.append(q)
            toks.append(t)
            if i + 1 < n:
                d_logits = draft.step(t)
        # verify in one batched pass that also runs last round's extra token: row i holds the
        # target's logits for drafted token i, row n those for the token after all of them
        if pending:
            p_all = target.extend(pending + toks, all_logits=True)  # (n+1, V): pending is one token
        else:
            p_all = torch.cat([p_last.unsqueeze(0), target.extend(toks, all_logits=True)])
        n_ok, extra = 0, None
        for i, t in enumerate(toks):
            if is_greedy:
                best = greedy(p_all[i])
                if best == t:
                    n_ok += 1
                    continue
                extra = best
                break
            p = probs(p_all[i], cfg)
            if float(torch.rand((), generator=gen)) * float(qs[i][t]) < float(p[t]):  # u < p/q
                n_ok += 1
                continue
            resid = (p - qs[i]).clamp_min(0)
            extra = int(torch.multinomial(resid / resid.sum() if resid.sum() > 0 else p, 1, generator=gen))
            break
        if extra is None:  # all accepted: one more token from the target's last position
            extra = sample_next(p_all[n], cfg, gen)
        stats.rounds += 1
        stats.drafted += n
        stats.accepted += n_ok
        stats.per_round.append(n_ok)
        new = toks[:n_ok] + [extra]
        for t in new:
            if t in eos_ids or len(out) >= cfg.max_new_tokens:
                return
            out.append(t)
            stats.emitted += 1
            yield t
        if len(out) >= cfg.max_new_tokens:
            return
        # roll both caches back to the accepted prefix; the extra token joins the target's next
        # verification pass and is fed to the draft now (it drafts from it)
        target.truncate(committed + n_ok)
        pending = [extra]
        draft.truncate(committed + n_ok)
        d_logits = draft.extend(toks[len(draft.tokens) - committed: n_ok] + [extra])
        committed += n_ok + 1


def speculative_pair(model: nn.Module, draft_bits: int = 2, runtime: RuntimeConfig | None = None,
                     draft: nn.Module | None = None) -> tuple[LeanModel, LeanModel]:
    """Lean runtimes of `model` (target) and of a draft (given, or RTN at `draft_bits`)."""
    runtime = runtime or RuntimeConfig()
    draft = draft if draft is not None else draft_model(model, draft_bits)
    return LeanModel(model, runtime), LeanModel(draft, runtime)
