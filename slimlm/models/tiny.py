"""Tiny random models for tests: built from a transformers config, no download.

`tiny_model("llama")` gives a 2-block model of width 64 with a small byte-level BPE
tokenizer trained in a fraction of a second on the built-in corpus, so every part of
slimlm (data, compression, evaluation, save/load) can run in seconds.
"""

from __future__ import annotations

import functools
import os

import torch

from slimlm.models.loaded import LoadedModel

_TOKENIZER_VOCAB = 384


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    """The tokenizer's JSON, trained once and kept in the slimlm cache directory."""
    from slimlm.models.sources import cache_dir

    cached = cache_dir() / f"tiny-tokenizer-v1-{_TOKENIZER_VOCAB}.json"
    if cached.is_file():
        return cached.read_text()
    text = _train_tokenizer()
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, cached)
    except OSError:
        pass
    return text


def _train_tokenizer() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from slimlm.data.corpus import builtin_documents

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_TOKENIZER_VOCAB,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    docs = [d.text for d in builtin_documents()][:8]  # ~30 kB: enough merges for a 384-token vocabulary
    tok.train_from_iterator(docs, trainer)
    return tok.to_str()


def tiny_tokenizer():
    """A byte-level BPE tokenizer (vocab 384) as a transformers fast tokenizer."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )


def tiny_config(model_type: str = "llama", **overrides):
    """A transformers config of `model_type` with 2 blocks of width 64 (GQA 4 heads / 2 KV heads)."""
    from transformers import AutoConfig

    kw = dict(
        vocab_size=_TOKENIZER_VOCAB,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        eos_token_id=0,
        pad_token_id=0,
    )
    if model_type == "qwen3":
        kw["head_dim"] = 16
    kw.update(overrides)
    return AutoConfig.for_model(model_type, **kw)


def tiny_model(model_type: str = "llama", seed: int = 0, **overrides) -> LoadedModel:
    """A tiny random causal LM of `model_type` with its tokenizer."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(model_type, **overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    with torch.no_grad():  # larger than the default init, so quantization error is visible in outputs
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    return LoadedModel(model=model, tokenizer=tiny_tokenizer(), source=f"tiny-{model_type}", kind="tiny")
