"""Quality against text and a reference model, per the measurement protocol (DESIGN.md).

Perplexity: non-overlapping windows, every token after the first of a window scored,
natural-log NLL averaged over scored tokens. KL divergence: mean over scored positions
of KL(P_reference ‖ P_model) from full-vocabulary log-softmax. Top-1 agreement: share
of scored positions where both models' argmax agree.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from slimlm.errors import SlimlmError


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits (T, V) of one window, float32, no cache."""
    return model(ids.unsqueeze(0), use_cache=False).logits[0].float()


def same_tokenizer(a, b) -> bool:
    """True when two tokenizers map text to the same ids (same vocabulary and special tokens)."""
    if len(a) != len(b):
        return False
    probe = "def f(x):\n    return x ** 2  # Ünïcode ✓ 1234\n\n<|im_start|>user"
    return a.get_vocab() == b.get_vocab() and a(probe)["input_ids"] == b(probe)["input_ids"]


@torch.inference_mode()
def evaluate_windows(model, windows: list[torch.Tensor], reference=None, progress: bool = True) -> dict:
    """Perplexity (and KL, top-1 against `reference` when given) over token windows."""
    nll, kl, agree, n = 0.0, 0.0, 0, 0
    for ids in tqdm(windows, desc="eval", unit="window", disable=not progress):
        logits = _logits(model, ids)[:-1]  # (T-1, V): position t predicts token t+1
        target = ids[1:]
        logp = F.log_softmax(logits, dim=-1)
        nll += float(-logp.gather(1, target.unsqueeze(1)).sum())
        n += target.numel()
        if reference is not None:
            ref_logp = F.log_softmax(_logits(reference, ids)[:-1], dim=-1)
            kl += float((ref_logp.exp() * (ref_logp - logp)).sum())
            agree += int((ref_logp.argmax(-1) == logp.argmax(-1)).sum())
        del logits, logp
    out = {"ppl": math.exp(nll / n), "nll": nll / n, "tokens": n, "windows": len(windows)}
    if reference is not None:
        out["kl"] = kl / n
        out["top1"] = agree / n
    return out


def check_reference_tokenizer(tokenizer, reference_tokenizer, reference_name: str) -> None:
    if not same_tokenizer(tokenizer, reference_tokenizer):
        raise SlimlmError(
            f"the reference {reference_name} uses a different tokenizer; KL and top-1 need the same one — "
            "compare against the model this one was compressed from"
        )
