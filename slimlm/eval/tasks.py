"""Multiple-choice accuracy, scored as lm-evaluation-harness scores it.

Per item and choice, the continuation is `" " + choice` after the context (a context's
trailing spaces move to the continuation); the context and the whole string are
tokenized separately and the continuation's tokens are those past the context's.
`acc`: the choice with the largest summed log-probability; `acc_norm`: the largest
log-probability divided by the choice's length in characters. An empty context is
replaced by the end-of-text token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from slimlm.data.tasks import Task


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"] if context else []
    cont = whole[len(ctx):]
    if not ctx:
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        ctx = [eos]
    return ctx, cont


@torch.inference_mode()
def choice_logprob(model, ctx: list[int], cont: list[int]) -> float:
    ids = torch.tensor([ctx + cont])
    logits = model(ids, use_cache=False).logits[0, len(ctx) - 1 : -1].float()  # predicts cont
    logp = F.log_softmax(logits, dim=-1)
    return float(logp.gather(1, torch.tensor(cont).unsqueeze(1)).sum())


def evaluate_task(model, tokenizer, task: Task, progress: bool = True) -> dict:
    """{"acc", "acc_norm", "n"} of `model` on a multiple-choice task."""
    acc = acc_norm = 0
    for item in tqdm(task.items, desc=f"task {task.name}", unit="item", disable=not progress):
        lps = [choice_logprob(model, *encode_pair(tokenizer, item.context, " " + c)) for c in item.choices]
        norm = [lp / len(c) for lp, c in zip(lps, item.choices)]
        acc += int(max(range(len(lps)), key=lps.__getitem__) == item.gold)
        acc_norm += int(max(range(len(norm)), key=norm.__getitem__) == item.gold)
    n = len(task.items)
    return {"acc": acc / n, "acc_norm": acc_norm / n, "n": n}
