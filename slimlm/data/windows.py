"""Tokenized windows for perplexity and calibration.

Evaluation windows follow the measurement protocol in DESIGN.md: the text is
tokenized once as a stream (no special tokens), cut into non-overlapping windows of
`seq_len` tokens, capped at `max_tokens`; a shorter last window is kept when it holds
at least two tokens. Calibration windows are full windows drawn with a seed.
"""

from __future__ import annotations

import torch

from slimlm.errors import SlimlmError


def tokenize_stream(tokenizer, text: str) -> torch.Tensor:
    """All token ids of `text` as one 1-D int64 tensor, without special tokens."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def eval_windows(tokenizer, text: str, seq_len: int = 512, max_tokens: int | None = None) -> list[torch.Tensor]:
    """Non-overlapping windows (each 1-D) over the first `max_tokens` tokens of `text`."""
    if seq_len < 2:
        raise SlimlmError(f"window length must be at least 2 tokens, got {seq_len}")
    ids = tokenize_stream(tokenizer, text)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    windows = [w for w in ids.split(seq_len) if w.numel() >= 2]
    if not windows:
        raise SlimlmError("the evaluation text is shorter than two tokens")
    return windows


def calibration_windows(tokenizer, text: str, n: int, seq_len: int = 512, seed: int = 0) -> torch.Tensor:
    """`n` full windows of `seq_len` tokens drawn without replacement with `seed`: (n, seq_len)."""
    ids = tokenize_stream(tokenizer, text)
    available = ids.numel() // seq_len
    if available == 0:
        raise SlimlmError(f"the calibration text holds {ids.numel()} tokens, fewer than one window of {seq_len}")
    if n > available:
        raise SlimlmError(
            f"asked for {n} calibration windows of {seq_len} tokens but the text holds only {available}; "
            "give fewer windows, shorter ones, or more text"
        )
    full = ids[: available * seq_len].view(available, seq_len)
    order = torch.randperm(available, generator=torch.Generator().manual_seed(seed))[:n]
    return full[order.sort().values]
