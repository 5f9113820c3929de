"""Token generation with a KV cache: greedy or sampled (temperature, top-k, top-p), seeded,
streaming, with stop strings and the tokenizer's chat template.

A hand-written loop over the model's forward with a transformers `DynamicCache`:
`model.generate` spends most of its time per token in logits processors, stopping
criteria and bookkeeping around the forward (about 10 tokens/s on the embedded model
on 2 cores, against ~40 for this loop; see benchmarks/RESULTS.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from slimlm.errors import SlimlmError


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = no top-k filter
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise SlimlmError(f"max new tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise SlimlmError(f"temperature must be ≥ 0, got {self.temperature}")
        if self.top_k < 0:
            raise SlimlmError(f"top-k must be ≥ 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise SlimlmError(f"top-p must be in (0, 1], got {self.top_p}")


def sample_next(logits: torch.Tensor, cfg: GenerationConfig, gen: torch.Generator) -> int:
    """One token id from (V,) logits."""
    if cfg.temperature == 0:
        return int(logits.argmax())
    logits = logits.float() / cfg.temperature
    if cfg.top_k:
        kth = torch.topk(logits, min(cfg.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, -1)
    if cfg.top_p < 1:
        sp, idx = probs.sort(descending=True)
        keep = sp.cumsum(0) - sp < cfg.top_p  # the smallest prefix whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter(0, idx[keep], sp[keep])
    return int(torch.multinomial(probs, 1, generator=gen))


@torch.inference_mode()
def generate_ids(model, prompt_ids: list[int], cfg: GenerationConfig, eos_ids=(), on_prefill: Callable | None = None) -> Iterator[int]:
    """Yield new token ids one by one until `max_new_tokens` or an end-of-sequence id."""
    from transformers import DynamicCache

    gen = torch.Generator().manual_seed(cfg.seed)
    cache = DynamicCache()
    ids = torch.tensor([prompt_ids])
    logits = model(ids, past_key_values=cache, use_cache=True).logits[0, -1]
    if on_prefill is not None:
        on_prefill()
    for _ in range(cfg.max_new_tokens):
        tok = sample_next(logits, cfg, gen)
        if tok in eos_ids:
            return
        yield tok
        logits = model(torch.tensor([[tok]]), past_key_values=cache, use_cache=True).logits[0, -1]


def chat_prompt(tokenizer, prompt: str, chat: bool) -> list[int]:
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt, add_special_tokens=False)["input_ids"]


def generate(lm, prompt: str, cfg: GenerationConfig = GenerationConfig(), chat: bool = True, on_text: Callable[[str], None] | None = None) -> str:
    """Generate a reply to `prompt`; `on_text` receives each new piece of text as it is decoded."""
    tok = lm.tokenizer
    prompt_ids = chat_prompt(tok, prompt, chat)
    eos = {i for i in (tok.eos_token_id, getattr(lm.model.config, "eos_token_id", None)) if isinstance(i, int)}
    out_ids: list[int] = []
    text = ""
    for t in generate_ids(lm.model, prompt_ids, cfg, eos_ids=eos):
        out_ids.append(t)
        new_text = tok.decode(out_ids, skip_special_tokens=True)
        piece, text = new_text[len(text):], new_text
        hit = next((s for s in cfg.stop if s in text), None)
        if hit is not None:
            cut = text.index(hit)
            if on_text and cut > len(text) - len(piece):
                on_text(text[len(text) - len(piece):cut])
            return text[:cut]
        if on_text and piece:
            on_text(piece)
    return text
