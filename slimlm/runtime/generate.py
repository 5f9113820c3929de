"""Token generation: greedy or sampled (temperature, top-k, top-p), seeded, streaming, with
stop strings, the tokenizer's chat template, and KV-cache reuse across chat turns.

Models of the Llama family run on the lean runtime (`slimlm.runtime.lean`: plain-PyTorch
forward, preallocated KV cache, C kernels for packed weights); any other model falls back
to a loop over the transformers forward with a `DynamicCache`.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from slimlm.errors import SlimlmError
from slimlm.runtime.lean import LeanModel, RuntimeConfig, greedy, supports
from slimlm.runtime.text import stream_text


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


def probs(logits: torch.Tensor, cfg: GenerationConfig) -> torch.Tensor:
    """The sampling distribution (V,) of (V,) logits under temperature, top-k and top-p (temperature > 0)."""
    logits = logits.float() / cfg.temperature
    if cfg.top_k:
        kth = torch.topk(logits, min(cfg.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    p = torch.softmax(logits, -1)
    if cfg.top_p < 1:
        sp, idx = p.sort(descending=True)
        keep = sp.cumsum(0) - sp < cfg.top_p  # the smallest prefix whose mass reaches top_p
        p = torch.zeros_like(p).scatter(0, idx[keep], sp[keep])
        p = p / p.sum()
    return p


def sample_next(logits: torch.Tensor, cfg: GenerationConfig, gen: torch.Generator) -> int:
    """One token id from (V,) logits."""
    if cfg.temperature == 0:
        return greedy(logits)
    return int(torch.multinomial(probs(logits, cfg), 1, generator=gen))


_LEAN: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def lean_model(model, runtime: RuntimeConfig | None = None) -> LeanModel:
    """The lean runtime of a transformers model, built once per (model, runtime) and kept while the model lives."""
    runtime = runtime or RuntimeConfig()
    per_model = _LEAN.setdefault(model, {})
    if runtime not in per_model:
        per_model[runtime] = LeanModel(model, runtime)
    return per_model[runtime]


@torch.inference_mode()
def generate_ids(model, prompt_ids: list[int], cfg: GenerationConfig, eos_ids=(), on_prefill: Callable | None = None,
                 runtime: RuntimeConfig | None = None) -> Iterator[int]:
    """Yield new token ids one by one until `max_new_tokens` or an end-of-sequence id.

    `model` is a transformers model (run on a fresh cache each call) or a `LeanModel`
    (its cache is kept: a prompt that extends the previous conversation reuses it).
    """
    if isinstance(model, LeanModel):
        lean = model
    elif supports(model):
        lean = lean_model(model, runtime)
        lean.reset()
    else:
        yield from _generate_ids_transformers(model, prompt_ids, cfg, eos_ids, on_prefill)
        return
    yield from _decode(lean.prefill(list(prompt_ids)), lean.step, cfg, eos_ids, on_prefill)


def _generate_ids_transformers(model, prompt_ids, cfg, eos_ids, on_prefill) -> Iterator[int]:
    from transformers import DynamicCache

    cache = DynamicCache()

    def forward(ids) -> torch.Tensor:
        return model(torch.tensor([ids]), past_key_values=cache, use_cache=True).logits[0, -1]

    yield from _decode(forward(list(prompt_ids)), lambda tok: forward([tok]), cfg, eos_ids, on_prefill)


def _decode(logits: torch.Tensor, step: Callable[[int], torch.Tensor], cfg: GenerationConfig, eos_ids,
            on_prefill: Callable | None) -> Iterator[int]:
    """The sampling loop shared by both engines: `logits` of the prompt's last token, `step(tok)`
    the next token's; no step after the last token."""
    if on_prefill is not None:
        on_prefill()
    gen = torch.Generator().manual_seed(cfg.seed)
    for i in range(cfg.max_new_tokens):
        tok = sample_next(logits, cfg, gen)
        if tok in eos_ids:
            return
        yield tok
        if i + 1 < cfg.max_new_tokens:
            logits = step(tok)


def chat_prompt(tokenizer, prompt: str | list[dict], chat: bool) -> list[int]:
    """Token ids of a prompt: a string, or a list of chat messages, through the chat template when asked."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer("".join(m["content"] for m in messages), add_special_tokens=False)["input_ids"]


def eos_ids(lm) -> set[int]:
    tok = lm.tokenizer
    ids = (tok.eos_token_id, getattr(lm.model.config, "eos_token_id", None))
    out = set()
    for i in ids:
        out.update(i if isinstance(i, (list, tuple)) else [i])
    return {i for i in out if isinstance(i, int)}


def generate(lm, prompt: str, cfg: GenerationConfig = GenerationConfig(), chat: bool = True,
             on_text: Callable[[str], None] | None = None, runtime: RuntimeConfig | None = None) -> str:
    """Generate a reply to `prompt`; `on_text` receives each new piece of text as it is decoded."""
    prompt_ids = chat_prompt(lm.tokenizer, prompt, chat)
    ids = generate_ids(lm.model, prompt_ids, cfg, eos_ids=eos_ids(lm), runtime=runtime)
    return stream_text(lm.tokenizer, ids, cfg.stop, on_text)


class Chat:
    """A multi-turn conversation whose KV cache carries over from turn to turn: each new
    prompt re-encodes the whole history through the chat template, and only the tokens
    after the part already cached are computed."""

    def __init__(self, lm, cfg: GenerationConfig = GenerationConfig(), runtime: RuntimeConfig | None = None):
        if not supports(lm.model):
            raise SlimlmError("multi-turn chat needs the lean runtime, which runs float32 models of the Llama family only")
        self.lm, self.cfg = lm, cfg
        self.lean = LeanModel(lm.model, runtime or RuntimeConfig())
        self.messages: list[dict] = []

    def say(self, text: str, on_text: Callable[[str], None] | None = None) -> str:
        self.messages.append({"role": "user", "content": text})
        prompt_ids = chat_prompt(self.lm.tokenizer, self.messages, chat=True)
        ids = generate_ids(self.lean, prompt_ids, self.cfg, eos_ids=eos_ids(self.lm))
        reply = stream_text(self.lm.tokenizer, ids, self.cfg.stop, on_text)
        self.messages.append({"role": "assistant", "content": reply})
        return reply
